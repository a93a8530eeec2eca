"""`supmae bench <what>`: dispatch to the benchmark modules, each owning its own options."""

from __future__ import annotations

import importlib
import sys

BENCHES: dict[str, tuple[str, str]] = {
    "loaders": ("benchmarks.loaders:main", "images/s of every data pipeline against the torchvision baseline"),
    "convert": ("benchmarks.convert_bench:main", "conversion speed against FFCV's own DatasetWriter"),
    "step": ("benchmarks.step:main", "SupMAE training step: our configuration against a paper-faithful one"),
    "checkpoint": ("benchmarks.checkpoint_bench:main", "the loop's stall of a checkpoint save: sync against async"),
    "table1": ("benchmarks.table1:main", "the paper's Table 1 (GPU-hours of five methods) on this hardware"),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        width = max(len(n) for n in BENCHES)
        print("usage: supmae bench <what> [options]\n\nbenchmarks:")
        for name, (_, text) in BENCHES.items():
            print(f"  {name:<{width}}  {text}")
        return 0
    name = argv[0]
    if name not in BENCHES:
        print(f"supmae bench: error: unknown benchmark '{name}' (known: {', '.join(BENCHES)})", file=sys.stderr)
        return 2
    module_name, func = BENCHES[name][0].split(":")
    return int(getattr(importlib.import_module(module_name), func)(argv[1:]) or 0)
