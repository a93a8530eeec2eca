"""Helpers of the tests that start the `supmae` command in subprocesses and under torchrun."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

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
    procs = job_processes(pid)
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


def job_processes(pid: int) -> list:
    """`pid` and every descendant (psutil processes; empty when `pid` is gone)."""
    import psutil

    try:
        return [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def run_job(cmd: list[str], timeout: float, env: dict[str, str] | None = None, cwd: str = REPO,
            extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a job (one `supmae` process, or torchrun and its ranks) to its end and return its output.

    A job still running after `timeout` seconds is a hang, and the test says where: every process of the
    job gets SIGUSR1 (the `supmae` command dumps each thread's Python stack to stderr on it), then the
    whole job is SIGKILLed (`subprocess.run` would kill only torchrun and leave its ranks running) and
    an AssertionError carries the tail of both streams, the dumps included."""
    env = dict(subprocess_env() if env is None else env, **(extra_env or {}))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        import psutil

        for member in job_processes(proc.pid):
            try:
                if "torch.distributed.run" not in " ".join(member.cmdline()):  # the agent has no handler
                    os.kill(member.pid, signal.SIGUSR1)
            except (ProcessLookupError, OSError, psutil.Error):
                pass
        time.sleep(3)
        kill_job(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(
            f"job still running after {timeout:.0f} s, killed (the stacks follow): {' '.join(cmd)}\n"
            f"--- stdout\n{out[-4000:]}\n--- stderr\n{err[-12000:]}"
        ) from None
    finally:
        if proc.poll() is None:
            kill_job(proc.pid)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
