"""The `supmae` command.

Each subcommand lives in the module that implements it and owns its own argument parser: it is
a function `main(argv: list[str]) -> int`, imported lazily so that `supmae --help` stays fast and
a subcommand's heavy libraries (DALI, FFCV, matplotlib) load only when it runs.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module:function, one-line help). Only subcommands that work are listed.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("supmae.demo:main", "end-to-end CPU demo on a generated dataset: convert, pretrain, evaluate, report"),
    "convert": ("tools.convert:main", "convert an ImageNet-style folder to FFCV .beton and DALI webdataset shards"),
    "pretrain": ("supmae.job_cli:main", "timed SupMAE / MAE pretraining run (one CPU to many GPUs)"),
    "finetune": ("supmae.job_cli:main_finetune", "fine-tune a pretrained encoder (Table 4)"),
    "linprobe": ("supmae.job_cli:main_linprobe", "linear probing of a frozen encoder (Table 5)"),
    "eval": ("supmae.job_cli:main_eval", "top-1/top-5 of a fine-tuned or probed checkpoint"),
    "export": ("supmae.export:main", "write a pretrained encoder for timm (safetensors) or the MAE fine-tuning code"),
    "visualize": ("supmae.visualize:main", "PNG grid of masked inputs and reconstructions"),
    "bench": ("benchmarks.cli:main", "benchmarks: loaders, step, table1"),
    "report": ("supmae.report:main", "cost report of a pretrain / finetune / linprobe run directory"),
    "doctor": ("supmae.doctor:main", "measure this machine for a recipe: data- or compute-bound, what to use, cost"),
}


def _usage() -> str:
    width = max(len(n) for n in SUBCOMMANDS)
    lines = ["usage: supmae <command> [options]", "", "commands:"]
    for name, (_, text) in SUBCOMMANDS.items():
        lines.append(f"  {name:<{width}}  {text}")
    lines += ["", "Run 'supmae <command> --help' for the options of a command."]
    return "\n".join(lines)


def _resolve(target: str):
    module_name, func_name = target.split(":")
    module = importlib.import_module(module_name)
    return getattr(module, func_name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(SUBCOMMANDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"supmae: error: unknown command '{name}'{hint}", file=sys.stderr)
        return 2

    from pipelines.errors import DataError
    from supmae.errors import UserError

    _stacks_on_sigusr1()
    try:
        func = _resolve(SUBCOMMANDS[name][0])
        return int(func(rest) or 0)
    except (UserError, DataError) as exc:
        print(f"supmae {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"supmae {name}: interrupted", file=sys.stderr)
        return 130


def _stacks_on_sigusr1() -> None:
    """`kill -USR1 PID` prints every thread's Python stack to the process's stderr and lets it run on: what
    a job that seems stuck is doing (a rank in a collective, a loader waiting on a worker). DataLoader
    workers forked later inherit it."""
    import faulthandler
    import signal

    if hasattr(signal, "SIGUSR1"):
        try:
            faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
        except (AttributeError, ValueError, OSError, RuntimeError):  # a stderr without a file (an embedding caller)
            pass


if __name__ == "__main__":
    sys.exit(main())
