# Two commands do all set-up on a fresh machine (Python >= 3.10 with venv):
#   make run    install into .venv, then `dvc repro` the embedded default and show the metrics
#   make test   install into .venv, then run the test suite (what CI runs)
# TORCH picks the torch build; the default is the CPU wheel this project is developed against.
# On a GPU machine: `make run TORCH=torch EXTRAS=dev,vllm` (then switch presets, see README).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
EXTRAS ?= dev
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-all clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, explicitly: a plain `pip install .` would otherwise resolve the newest (CUDA) build.
	$(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -m pip install -e ".[$(EXTRAS)]"
	touch $@

run: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@echo "accuracy (teacher, pi_ref = student_sft, distilled = student_opd); all metrics: dvc metrics show"
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc metrics show metrics/eval.json

test: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not slow" -q

test-all: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

clean-venv:  # after changing TORCH or EXTRAS
	rm -rf $(VENV)
