"""Helpers of the tests that start the `supmae` command in subprocesses and under torchrun."""

from __future__ import annotations

import os
import signal
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


def kill_job(pid: int) -> None:
    """SIGKILL a job started with `start_new_session=True` (one process, or torchrun and its ranks), as a
    lost node would lose it: every process of it at once.

    Killing the job's process group is not enough under torchrun: the agent starts each rank in a
    session of its own, so the ranks would live on as orphans and go on writing the run directory.
    So the process groups of the job and of every descendant are killed (a rank's DataLoader workers
    are in its group).
    """
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    groups = {pid}
    for proc in procs:
        try:
            groups.add(os.getpgid(proc.pid))
        except ProcessLookupError:
            pass
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
