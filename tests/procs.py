"""Helpers of the tests that start the `supmae` command in subprocesses and under torchrun."""

from __future__ import annotations

import os
import socket
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on (for a torchrun rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    """The environment of a child `supmae`: this checkout importable, one OpenMP thread per process."""
    return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    """`torchrun --nproc_per_node nproc ARGS` on the loopback interface, with a fresh rendezvous port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), *args]
