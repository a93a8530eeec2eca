"""Named run configurations: one function per paper configuration, returning a config dataclass.

Recipes register themselves with `@register("pretrain")` (or "finetune", "linprobe") in the
modules of this package; `get_recipe(name)` returns a fresh config each call so callers may
override it in place.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

from supmae.errors import UserError

_RECIPES: dict[str, tuple[str, Callable[[], Any]]] = {}
_MODULES = ("supmae.recipes.pretrain", "supmae.recipes.finetune")
_loaded = False


def register(kind: str) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Decorator: register a zero-argument function returning a config under its own name."""

    def deco(fn: Callable[[], Any]) -> Callable[[], Any]:
        if fn.__name__ in _RECIPES:
            raise RuntimeError(f"recipe {fn.__name__} registered twice")
        _RECIPES[fn.__name__] = (kind, fn)
        return fn

    return deco


def _load() -> None:
    global _loaded
    if _loaded:
        return
    for mod in _MODULES:
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)
    _loaded = True


def list_recipes(kind: str | None = None) -> dict[str, str]:
    """Recipe name -> first line of its docstring, optionally only those of one kind."""
    _load()
    return {
        name: (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        for name, (k, fn) in sorted(_RECIPES.items())
        if kind is None or k == kind
    }


def get_recipe(name: str, kind: str | None = None) -> Any:
    """A fresh config of recipe `name`; `UserError` (with close matches) when unknown."""
    _load()
    names = list_recipes(kind)
    if name not in names:
        close = difflib.get_close_matches(name, list(names), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else f"; known: {', '.join(names)}"
        raise UserError(f"unknown {kind + ' ' if kind else ''}recipe '{name}'{hint}")
    return _RECIPES[name][1]()
