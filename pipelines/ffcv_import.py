"""Importing FFCV, once per process, without recompiling what numba can keep on disk.

`import ffcv` builds a numba typed `Dict` at module level (`ffcv/fields/rgb_image.py`), which
compiles numba's own dict functions in every process that imports it: about 3 s of a 5 s import
on this 2-core machine, paid again by every rank of every run, every DataLoader-free reader of a
`.beton` and every test subprocess. Those functions are plain module-level numba functions, so
numba's on-disk cache can keep them (`Dispatcher.enable_caching`, numba's documented cache:
`NUMBA_CACHE_DIR` when set, else beside numba's files or in the user-wide cache): the first process
compiles and writes them, later ones load them (the import drops to about 2 s). Where no cache
location is writable, numba compiles as before.
"""

from __future__ import annotations

import functools
from typing import Any

from pipelines.errors import DataError

# numba's typed-dict functions FFCV's import-time Dict() and its first insertions compile.
_TYPED_DICT_FUNCTIONS = ("_make_dict", "_setitem", "_getitem", "_contains", "_length")


@functools.cache
def _cache_typed_dict() -> None:
    try:
        from numba.typed import typeddict
    except ImportError:  # no numba: the ffcv import below says what is missing
        return
    for name in _TYPED_DICT_FUNCTIONS:
        dispatcher = getattr(typeddict, name, None)
        if dispatcher is None or not hasattr(dispatcher, "enable_caching"):
            continue
        try:
            dispatcher.enable_caching()
        except (RuntimeError, OSError):  # no writable cache location: compile in memory, as without this
            return


def import_ffcv() -> Any:
    """The `ffcv` package (its loader imported too); `DataError` when it cannot be imported."""
    _cache_typed_dict()
    try:
        import ffcv
        import ffcv.loader
    except ImportError as exc:
        raise DataError(f"the ffcv pipeline needs the 'ffcv' package, which cannot be imported: {exc}") from None
    return ffcv


def ffcv_importable() -> bool:
    """Whether `import_ffcv` succeeds (for the readers that can do without FFCV)."""
    try:
        import_ffcv()
    except DataError:
        return False
    return True
