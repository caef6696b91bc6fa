"""An optional import that fails says what really happened: only an absent package gets the install hint."""
from __future__ import annotations

import sys

import pytest

from offline_opd.errors import UserError, require


def test_an_absent_package_gets_the_install_hint():
    with pytest.raises(UserError) as err:
        require("opd_surely_absent_pkg", "make install EXTRAS=dev,x", "the thing")
    assert str(err.value) == ("the thing needs the Python package 'opd_surely_absent_pkg', which is not installed; "
                              "install it with make install EXTRAS=dev,x")


def test_an_installed_package_that_breaks_names_its_own_error(tmp_path, monkeypatch):
    """The failure that hid behind 'needs the gguf and accelerate packages': a package present but broken."""
    pkg = tmp_path / "opd_broken_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from kernels_not_here_either import CUDAProperties\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError) as err:
        require("opd_broken_pkg", "make install EXTRAS=dev,x", "reading model.gguf")
    msg = str(err.value)
    assert "install it with" not in msg
    assert "'opd_broken_pkg' is installed but failed to import: ModuleNotFoundError" in msg
    assert "kernels_not_here_either" in msg and "python -c 'import opd_broken_pkg'" in msg
    sys.modules.pop("opd_broken_pkg", None)


def test_a_wrong_name_inside_an_installed_package_is_reported_with_its_file(tmp_path, monkeypatch):
    (tmp_path / "opd_other_pkg.py").write_text("X = 1\n")
    pkg = tmp_path / "opd_shadowed_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from opd_other_pkg import CUDAProperties\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError) as err:
        require("opd_shadowed_pkg", "make install EXTRAS=dev,x", "backend 'vllm'")
    assert "ImportError: cannot import name 'CUDAProperties'" in str(err.value)
    assert str(tmp_path / "opd_other_pkg.py") in str(err.value)
    for name in ("opd_shadowed_pkg", "opd_other_pkg"):
        sys.modules.pop(name, None)
