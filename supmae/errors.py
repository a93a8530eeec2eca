"""User-facing errors: the CLI prints their message as one line and exits with code 2."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """A problem with the user's input (arguments, files, configuration), not a bug."""


def require_package(module: str, package: str) -> Any:
    """Import `module` or raise a one-line `UserError` naming the package to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"this needs the '{package}' package: pip install {package}") from None
