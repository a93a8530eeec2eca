"""`supmae demo` (what `make demo` runs) twice into one directory: the second run reuses what is done."""

from __future__ import annotations

import json
import os

import pytest

from supmae import demo
from supmae.train.run_dir import read_jsonl


def _state(out: str) -> dict[str, object]:
    """What a rerun must not touch: the conversion, both runs' checkpoints and books."""
    state: dict[str, object] = {}
    for rel in ("data/converted/manifest.json", "pretrain/checkpoint-last.pth", "linprobe/checkpoint-last.pth"):
        st = os.stat(os.path.join(out, rel))
        state[rel] = (st.st_mtime_ns, st.st_size)
    for run in ("pretrain", "linprobe"):
        for name in ("log.jsonl", "starts.jsonl"):
            state[f"{run}/{name}"] = read_jsonl(os.path.join(out, run, name))
    return state


@pytest.mark.slow
def test_demo_twice_reuses_what_is_done(tmp_path, capsys):
    out = str(tmp_path / "demo")
    small = ["--output-dir", out, "--train-per-class", "8", "--val-per-class", "4", "--pipeline", "torchvision",
             "--workers", "1", "--probe-epochs", "1"]
    assert demo.main([*small, "--epochs", "1"]) == 0
    first = _state(out)
    with open(os.path.join(out, "summary.json")) as fh:
        summary = json.load(fh)
    capsys.readouterr()

    assert demo.main([*small, "--epochs", "1"]) == 0
    text = capsys.readouterr().out
    assert "dataset already generated" in text and "already in" in text
    assert text.count("nothing to do") == 2  # the pretraining and the probe found themselves finished
    assert _state(out) == first  # nothing converted, trained or logged again
    with open(os.path.join(out, "summary.json")) as fh:
        again = json.load(fh)
    for key in ("checkpoint", "loss_first_epoch", "loss_last_epoch", "val_cls_acc1", "linprobe_acc1"):
        assert again[key] == summary[key], key

    # More pretraining epochs: the pretraining continues, and the probe of the older encoder is moved aside
    # (kept) while the new encoder is probed.
    assert demo.main([*small, "--epochs", "2"]) == 0
    assert [r["epoch"] for r in read_jsonl(os.path.join(out, "pretrain", "log.jsonl"))] == [0, 1]
    assert read_jsonl(os.path.join(out, "linprobe-superseded-1", "log.jsonl")) == first["linprobe/log.jsonl"]
    with open(os.path.join(out, "linprobe", "config.json")) as fh:
        assert json.load(fh)["pretrained"] == os.path.join(out, "pretrain", "checkpoint-0001.pth")
