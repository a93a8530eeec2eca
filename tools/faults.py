"""Fault injection for the converter's isolation tests: a decode that crashes or hangs on one input.

A TEST HOOK, not a feature. A real input that segfaults a decoder or sends it into an endless loop
depends on one library version's bugs, so the tests that check a crash or a hang is isolated (the
input reported as `decoder-crashed` / `decode-timeout`, everything else converted) need one made
to order. Setting the environment variable `SUPMAE_TEST_POISON` arms it:

- `crash:GLOB`: the process decoding an input whose file name matches GLOB (`fnmatch`, on the
  base name; for an archive member, the archive's base name + `@` + the member's byte offset)
  sends itself SIGSEGV, as a decoder bug does (no Python exception, no cleanup);
- `hang:GLOB`: that process writes one line `test hook: hanging on NAME` to stderr and sleeps
  forever, as a decoder stuck in a loop does.

Unset, every check is one environment lookup (`poison_point`).
"""

from __future__ import annotations

import fnmatch
import os
import signal
import sys
import time

ENV = "SUPMAE_TEST_POISON"
_KINDS = ("crash", "hang")


def _armed() -> tuple[str, str] | None:
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    kind, _, pattern = raw.partition(":")
    if kind not in _KINDS or not pattern:
        raise ValueError(f"{ENV}={raw!r}: expected crash:GLOB or hang:GLOB (a test hook; unset it to convert normally)")
    return kind, pattern


def poison_point(path: str, offset: int) -> None:
    """Test hook, called before an input is decoded: crash or hang here when armed for its name."""
    if ENV not in os.environ:
        return
    armed = _armed()
    if armed is None:
        return
    kind, pattern = armed
    name = os.path.basename(path) if offset < 0 else f"{os.path.basename(path)}@{offset}"
    if not fnmatch.fnmatchcase(name, pattern):
        return
    if kind == "crash":
        import faulthandler
        import resource

        faulthandler.disable()  # pytest's traceback dump of every thread would only be noise here
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file in the test's working directory
        os.kill(os.getpid(), signal.SIGSEGV)
    print(f"test hook: hanging on {name}", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)
