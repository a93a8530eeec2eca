"""Checkpoint files: atomic writes, safe loads, newest-valid selection."""

from __future__ import annotations

import argparse
import os
import pickle

import pytest
import torch

from supmae.errors import UserError
from supmae.train.checkpoint import LAST_NAME, atomic_save, find_resume_checkpoint, load_checkpoint, model_state


class NotPlain:
    def __reduce__(self):
        return (os.getcwd, ())


def test_atomic_save_round_trip_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "ck.pth"
    atomic_save({"model": {"w": torch.ones(2)}, "epoch": 3}, str(path))
    assert os.listdir(path.parent) == ["ck.pth"]
    ck = load_checkpoint(str(path))
    assert ck["epoch"] == 3 and torch.equal(model_state(ck)["w"], torch.ones(2))


def test_reference_namespace_args_allowed(tmp_path):
    path = tmp_path / "ref.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1.0), "epoch": 399}, path)
    assert load_checkpoint(str(path))["args"].lr == 1.0


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": NotPlain()}, path, pickle_module=pickle)
    with pytest.raises(UserError, match="not a plain tensor"):
        load_checkpoint(str(path))


def test_missing_and_truncated_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(str(tmp_path / "nope.pth"))
    good = tmp_path / "good.pth"
    atomic_save({"model": {"w": torch.randn(1000)}}, str(good))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="cannot read checkpoint .*bad.pth"):
        load_checkpoint(str(bad))


def test_resume_skips_corrupt_last_and_uses_previous(tmp_path):
    atomic_save({"model": {}, "epoch": 1, "step": 20}, str(tmp_path / "checkpoint-0001.pth"))
    atomic_save({"model": {}, "epoch": 2, "step": 30}, str(tmp_path / "checkpoint-0002.pth"))
    (tmp_path / LAST_NAME).write_bytes(b"\x00garbage")
    messages = []
    path, ck = find_resume_checkpoint(str(tmp_path), log=messages.append)
    assert path.endswith("checkpoint-0002.pth") and ck["epoch"] == 2
    assert any(LAST_NAME in m for m in messages)
    assert find_resume_checkpoint(str(tmp_path / "empty")) is None
