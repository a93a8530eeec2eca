"""Distributed helpers on real gloo process groups of two CPU processes (no torchrun needed)."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from supmae.errors import UserError
from supmae.train import distributed as D
from supmae.train.metrics import DeviceMeter


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_env(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))


def _worker(rank: int, port: int, out_dir: str) -> None:
    _set_env(rank, 2, port)
    torch.set_num_threads(1)
    result: dict = {}
    with D.distributed("cpu", timeout_s=60) as info:
        result["info"] = [info.rank, info.world_size, info.backend, info.is_main]
        result["agree_all"] = D.agree(True, info.device)
        result["agree_one_false"] = D.agree(rank == 0, info.device)
        result["gathered"] = D.all_gather_object({"rank": rank})
        result["broadcast"] = D.broadcast_object(f"from {rank}")

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        result["in_sync"] = D.check_in_sync(model, info.device)
        if rank == 1:
            with torch.no_grad():
                model[0].weight[0, 0] += 1e-6
        result["out_of_sync"] = D.check_in_sync(model, info.device)

        meter = DeviceMeter(["loss"], info.device)
        meter.set_step(1)
        meter.add(torch.tensor(1.0 + rank))
        meter.set_step(2)
        meter.add(torch.tensor(float("nan")) if rank == 1 else torch.tensor(2.0))
        meter.set_step(3)
        meter.add(torch.tensor(float("inf")) if rank == 0 else torch.tensor(2.0))
        sums, count, first_bad = meter.read_sums()
        result["meter"] = [count, first_bad, sums[0] if sums[0] == sums[0] else "nan"]
    result["after_shutdown"] = D.is_dist()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh)


def test_single_process_needs_no_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with D.distributed("cpu") as info:
        assert (info.rank, info.world_size, info.distributed, info.is_main) == (0, 1, False, True)
        assert not D.is_dist() and D.get_world_size() == 1
        assert D.agree(True, info.device) and not D.agree(False, info.device)
        assert D.all_gather_object(5) == [5] and D.broadcast_object("x") == "x"
    D.shutdown()  # safe without a group


def test_bad_environment_and_device_are_user_errors(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UserError, match="WORLD_SIZE"):
        D.init_distributed("cpu")
    with pytest.raises(UserError, match="unknown device"):
        D.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            D.resolve_device("cuda")


@pytest.mark.slow
def test_two_gloo_ranks(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["info"] == [0, 2, "gloo", True] and r1["info"] == [1, 2, "gloo", False]
    for r in (r0, r1):
        assert r["agree_all"] is True and r["agree_one_false"] is False
        assert r["gathered"] == [{"rank": 0}, {"rank": 1}] and r["broadcast"] == "from 0"
        assert r["in_sync"] is True and r["out_of_sync"] is False
        # 3 values per rank; the first non-finite one on any rank was at step 2 (rank 1's NaN).
        assert r["meter"][:2] == [6, 2]
        assert r["after_shutdown"] is False


def _no_shared_fs_worker(rank: int, port: int, out_dir: str) -> None:
    """Rank 0 sees the run directory and checkpoints; rank 1 is given paths that do not exist on its
    "node": it must receive rank 0's decision and files, and never look at its own disk."""
    from supmae.train.engine import decide_resume, load_on_main
    from supmae.train.rng import gather_rng, restore_rank_rng
    from supmae.train.run_dir import RunDir

    _set_env(rank, 2, port)
    torch.set_num_threads(1)
    here = out_dir if rank == 0 else os.path.join(out_dir, "not-on-this-node")
    result: dict = {}
    with D.distributed("cpu", timeout_s=60) as info:
        path, ckpt = decide_resume("auto", RunDir(os.path.join(here, "run"), writer=info.is_main), info, print)
        result["resume"] = [os.path.basename(path), ckpt["epoch"], ckpt["model"]["w"].tolist()]
        result["pretrained"] = load_on_main(os.path.join(here, "pretrained.pth"), info)["model"]["w"].tolist()
        try:
            load_on_main(os.path.join(here, "corrupt.pth"), info)
        except UserError as exc:
            result["refusal"] = str(exc)
        # Per-rank RNG: each rank gets its own state back from the gathered dict.
        torch.manual_seed(100 + rank)
        saved = gather_rng(info.device)
        expected = torch.rand(3).tolist()
        torch.manual_seed(7)
        restore_rank_rng(saved, info.rank, info.world_size, info.device)
        result["rng"] = [len(saved["by_rank"]), torch.rand(3).tolist() == expected, expected]
    with open(os.path.join(out_dir, f"nfs{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh)


@pytest.mark.slow
def test_only_rank_0_reads_checkpoints_and_a_rank_without_the_run_dir_is_fine(tmp_path):
    from supmae.train.checkpoint import atomic_save

    atomic_save({"model": {"w": torch.tensor([1.0, 2.0])}, "epoch": 3}, str(tmp_path / "run" / "checkpoint-last.pth"))
    atomic_save({"model": {"w": torch.tensor([5.0])}}, str(tmp_path / "pretrained.pth"))
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    mp.spawn(_no_shared_fs_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "nfs0.json").read_text())
    r1 = json.loads((tmp_path / "nfs1.json").read_text())
    assert r0["resume"] == r1["resume"] == ["checkpoint-last.pth", 3, [1.0, 2.0]]
    assert r0["pretrained"] == r1["pretrained"] == [5.0]
    # Rank 0's own one-line message (naming its file) on both ranks.
    assert r0["refusal"] == r1["refusal"] and str(tmp_path / "corrupt.pth") in r0["refusal"]
    assert r0["rng"][:2] == r1["rng"][:2] == [2, True] and r0["rng"][2] != r1["rng"][2]


def _lonely_rank(port: int, out_dir: str) -> None:
    _set_env(0, 2, port)  # a world of two where the second never comes
    t0 = time.monotonic()
    try:
        D.init_distributed("cpu", timeout_s=3)
        outcome = "joined"
    except Exception as exc:  # noqa: BLE001 - torch raises a version-dependent store/timeout error type
        outcome = type(exc).__name__
    with open(os.path.join(out_dir, "lonely.json"), "w", encoding="utf-8") as fh:
        json.dump({"outcome": outcome, "seconds": time.monotonic() - t0}, fh)


@pytest.mark.slow
def test_init_times_out_instead_of_hanging(tmp_path):
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_lonely_rank, args=(_free_port(), str(tmp_path)))
    proc.start()
    proc.join(timeout=120)
    if proc.is_alive():
        proc.kill()
        pytest.fail("init_process_group waited for the missing rank for more than 120 s")
    got = json.loads((tmp_path / "lonely.json").read_text())
    assert got["outcome"] != "joined" and got["seconds"] < 60
