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


def broken_package(tmp_path, monkeypatch, name: str, init: str, purpose: str) -> str:
    """The message `require` gives for an installed package `name` whose __init__ runs `init`."""
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text(init)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError) as err:
        require(name, "make install EXTRAS=dev,x", purpose)
    return str(err.value)


def test_an_installed_package_that_breaks_names_its_own_error(tmp_path, monkeypatch):
    """The failure that hid behind 'needs the gguf and accelerate packages': a package present but broken."""
    msg = broken_package(tmp_path, monkeypatch, "opd_broken_pkg",
                         "from kernels_not_here_either import CUDAProperties\n", "reading model.gguf")
    assert "install it with" not in msg
    assert "'opd_broken_pkg' is installed but failed to import: ModuleNotFoundError" in msg
    assert "kernels_not_here_either" in msg and "python -c 'import opd_broken_pkg'" in msg
    sys.modules.pop("opd_broken_pkg", None)


def test_a_wrong_name_inside_an_installed_package_is_reported_with_its_file(tmp_path, monkeypatch):
    (tmp_path / "opd_other_pkg.py").write_text("X = 1\n")
    msg = broken_package(tmp_path, monkeypatch, "opd_shadowed_pkg", "from opd_other_pkg import CUDAProperties\n",
                         "backend 'vllm'")
    assert "ImportError: cannot import name 'CUDAProperties'" in msg
    assert str(tmp_path / "opd_other_pkg.py") in msg
    for name in ("opd_shadowed_pkg", "opd_other_pkg"):
        sys.modules.pop(name, None)
