"""The one base class for errors a user can fix (bad params, paths, prompt files, shards, provenance).

Stage entry points print these as one line naming the file and the fix, and exit with status 2;
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class UserError(Exception):
    """Bad input a user can fix; the message names the file, the field and the fix."""


def require(module: str, install: str, purpose: str) -> ModuleType:
    """Import an optional package, or fail with the cause that really happened.

    Only a package that is absent gets the install hint. One that is installed but fails to import (a
    dependency of its own missing, an incompatible build, a same-named folder shadowing it) gets its
    own exception instead: a guessed "install X" there sends the user after the wrong fix.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.split(".")[0]
        if exc.name in (module, top):
            raise UserError(f"{purpose} needs the Python package {top!r}, which is not installed; "
                            f"install it with {install}") from None
        cause = exc
    except ImportError as exc:
        cause = exc
    where = f" (from {cause.path})" if getattr(cause, "path", None) else ""
    raise UserError(f"{purpose}: {module!r} is installed but failed to import: {type(cause).__name__}: {cause}"
                    f"{where}; run `python -c 'import {module}'` for the full traceback") from cause
