"""`python -m offline_opd.tools.scratch_project`: a fresh git+DVC project with this checkout's pipeline."""

import subprocess

import pytest
import yaml

from offline_opd.errors import UserError
from offline_opd.tools.scratch_project import init_project, main
from tests.tiny_models import REPO


def test_project_holds_the_pipeline_and_the_preset(tmp_path):
    main([str(tmp_path / "p"), "--preset", "toy"])
    root = tmp_path / "p"
    assert yaml.safe_load((root / "params.yaml").read_text()) == yaml.safe_load((REPO / "configs/toy.yaml").read_text())
    assert (root / "dvc.yaml").read_bytes() == (REPO / "dvc.yaml").read_bytes()
    assert (root / "pipeline/offline_opd/stages/teacher.py").is_file() and (root / ".dvc").is_dir()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
    assert status.stdout == "", "everything is committed"


def test_unknown_preset_and_non_checkout_are_refused(tmp_path):
    with pytest.raises(UserError, match="no preset 'nope'"):
        init_project(tmp_path / "a", "nope")
    with pytest.raises(UserError, match="not a source checkout"):
        init_project(tmp_path / "b", "toy", checkout=tmp_path)
