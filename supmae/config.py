"""Strict dotted-key overrides for nested config dataclasses.

Every component owns a small dataclass; a run config nests them (`cfg.optim.blr`). The command
line changes any leaf with `--optim.blr 1e-4` or `--optim.blr=1e-4`. Unknown keys and values of
the wrong type raise `UserError` naming the key and its close matches, so a typo never silently
trains with the default.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from typing import Any

from supmae.errors import UserError


def leaf_keys(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """All dotted leaf keys of a (nested) dataclass instance, mapped to their current values."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(leaf_keys(value, key + "."))
        else:
            out[key] = value
    return out


def _field_type(owner: Any, name: str) -> Any:
    hints = typing.get_type_hints(type(owner))
    return hints[name]


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _convert(text: Any, tp: Any) -> Any:
    """Convert a command-line string (or a JSON value) to the annotated type `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        is_none = text is None or (isinstance(text, str) and text.strip().lower() in ("none", "null"))
        if is_none and len(non_none) < len(args):
            return None
        errors = []
        for a in non_none:
            try:
                return _convert(text, a)
            except (ValueError, TypeError) as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors))
    if tp is Any:
        return text
    if origin in (tuple, list):
        if isinstance(text, str):
            parts = [p for p in text.replace("(", "").replace(")", "").replace("[", "").replace("]", "").split(",")]
            parts = [p.strip() for p in parts if p.strip()]
        else:
            parts = list(text)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(parts) != len(args):
                raise ValueError(f"expected {len(args)} comma-separated values, got {len(parts)}")
            return tuple(_convert(p, a) for p, a in zip(parts, args))
        elem = args[0] if args else str
        seq = [_convert(p, elem) for p in parts]
        return tuple(seq) if origin is tuple else seq
    if tp is bool:
        if isinstance(text, bool):
            return text
        return _parse_bool(str(text))
    if tp is int:
        if isinstance(text, bool):
            raise ValueError("expected an integer, got a boolean")
        if isinstance(text, int):
            return text
        try:
            return int(str(text))
        except ValueError:
            as_float = float(str(text))
            if as_float.is_integer():
                return int(as_float)
            raise ValueError(f"expected an integer, got {text!r}") from None
    if tp is float:
        if isinstance(text, bool):
            raise ValueError("expected a number, got a boolean")
        return float(text)
    if tp is str:
        return str(text)
    if typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(map(str, choices))}")
        return text
    if typing.get_origin(tp) is dict or tp is dict:
        if isinstance(text, dict):
            return text
        return json.loads(text)
    raise TypeError(f"unsupported config type {tp!r}")


def set_key(cfg: Any, key: str, raw: Any) -> None:
    """Set dotted `key` of `cfg` from a string (or JSON value), with type checking."""
    known = leaf_keys(cfg)
    if key not in known:
        close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""
        raise UserError(f"unknown config key --{key}{hint}")
    *path, leaf = key.split(".")
    owner = cfg
    for part in path:
        owner = getattr(owner, part)
    tp = _field_type(owner, leaf)
    try:
        value = _convert(raw, tp)
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise UserError(f"bad value for --{key}: {raw!r} ({exc})") from None
    setattr(owner, leaf, value)


def apply_overrides(cfg: Any, argv: list[str]) -> Any:
    """Apply `--a.b value` / `--a.b=value` pairs to `cfg` in place and return it."""
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise UserError(f"unexpected argument {token!r}: overrides look like --section.key value")
        token = token[2:]
        if "=" in token:
            key, raw = token.split("=", 1)
            i += 1
        else:
            key = token
            if i + 1 >= len(argv):
                raise UserError(f"--{key} needs a value")
            raw = argv[i + 1]
            i += 2
        set_key(cfg, key.replace("-", "_"), raw)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON-compatible dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a config dataclass from `to_dict` output, strictly (unknown keys are errors)."""
    cfg = cls()
    _load_into(cfg, data, "")
    return cfg


def _load_into(cfg: Any, data: dict[str, Any], prefix: str) -> None:
    for k, v in data.items():
        current = getattr(cfg, k, None)
        if dataclasses.is_dataclass(current) and isinstance(v, dict):
            _load_into(current, v, f"{prefix}{k}.")
        else:
            set_key_at(cfg, f"{prefix}{k}", k, v)


def set_key_at(owner: Any, full_key: str, leaf: str, raw: Any) -> None:
    names = {f.name for f in dataclasses.fields(owner)}
    if leaf not in names:
        close = difflib.get_close_matches(leaf, sorted(names), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown config key {full_key}{hint}")
    try:
        setattr(owner, leaf, _convert(raw, _field_type(owner, leaf)))
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise UserError(f"bad value for {full_key}: {raw!r} ({exc})") from None
