"""The small parts of `supmae.train` the engine relies on: TF32 through the API this torch has, the
NVML device a rank reads, one host-to-device copy per evaluation, the per-process records that
count device time, and the checkpoint loader's messages."""

from __future__ import annotations

import json
import os
import sys
import warnings

import pytest
import torch

from supmae.train import precision
from supmae.train.energy import EnergyMeter, match_nvml_index
from supmae.train.process import ProcessRecord, previous_processes, process_span, read_process_records

# ---------------------------------------------------------------------------------------------- TF32


@pytest.fixture
def tf32_state():
    """Put back every TF32 setting a test changes (they are process-wide)."""
    new_api = precision.has_fp32_precision_api()
    saved = (torch.get_float32_matmul_precision(),
             torch.backends.cuda.matmul.fp32_precision if new_api else None,
             torch.backends.cudnn.conv.fp32_precision if new_api else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        legacy = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = legacy
        torch.set_float32_matmul_precision(saved[0])
        if new_api:
            torch.backends.cuda.matmul.fp32_precision = saved[1]
            torch.backends.cudnn.conv.fp32_precision = saved[2]


def test_tf32_goes_through_the_fp32_precision_api_where_this_torch_has_it(tf32_state):
    cuda = torch.device("cuda", 0)  # a CUDA-typed device: setting the flags needs no GPU
    assert precision.set_matmul_precision(torch.device("cpu"), False) == ""
    assert precision.set_matmul_precision(cuda, True) == ""  # deterministic: TF32 rounding stays off
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecation warning (mixing the two APIs) fails the test
        used = precision.set_matmul_precision(cuda, False)
    if precision.has_fp32_precision_api():
        assert used == "fp32_precision"
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    else:
        assert used == "legacy"


def test_tf32_falls_back_to_the_legacy_flags_on_an_older_torch(tf32_state, monkeypatch):
    monkeypatch.setattr(precision, "has_fp32_precision_api", lambda: False)
    assert precision.set_matmul_precision(torch.device("cuda"), False) == "legacy"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


# ---------------------------------------------------------------------------------------------- energy


NVML = [("GPU-0a0a0a0a-1111-2222-3333-444444444444", "00000000:01:00.0"),
        ("GPU-1b1b1b1b-1111-2222-3333-444444444444", b"00000000:41:00.0"),
        ("GPU-2c2c2c2c-1111-2222-3333-444444444444", "00000000:C1:00.0")]


def test_a_rank_reads_the_nvml_device_of_its_own_cuda_device_not_the_same_index():
    # CUDA_VISIBLE_DEVICES=2,0: the process's cuda:0 is the machine's third GPU, cuda:1 its first.
    assert match_nvml_index("2c2c2c2c-1111-2222-3333-444444444444", None, NVML) == 2  # torch's UUID form
    assert match_nvml_index("GPU-0A0A0A0A-1111-2222-3333-444444444444", None, NVML) == 0
    # No UUID (an older torch): the PCI bus id, whatever its domain width or case.
    assert match_nvml_index(None, "0000:c1:00.0", NVML) == 2
    assert match_nvml_index(None, "00000000:41:00.0", NVML) == 1
    assert match_nvml_index("ffffffff-0000-0000-0000-000000000000", "0000:c1:00.0", NVML) == 2
    # Nothing matches, or the match is not unique: nothing is measured rather than a wrong GPU.
    assert match_nvml_index("ffffffff-0000-0000-0000-000000000000", None, NVML) is None
    assert match_nvml_index(None, None, NVML) is None
    assert match_nvml_index(None, "0000:01:00.0", [*NVML, ("GPU-x", "0000:01:00.0")]) is None


def test_energy_without_a_gpu_is_not_measured_never_estimated():
    meter = EnergyMeter(torch.device("cpu"))
    meter.start()
    assert not meter.available and meter.joules() is None
    assert meter.reason.startswith("not measured")


# ---------------------------------------------------------------------------------------------- evaluation


def test_evaluation_copies_one_host_value_to_the_device_per_evaluation_and_its_numbers_hold(synthetic_root,
                                                                                          monkeypatch):
    from supmae.models.vit import build_vit
    from supmae.train.data import DataConfig
    from supmae.train.finetune import evaluate

    torch.manual_seed(0)
    model = build_vit(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10)
    loader = DataConfig(path=synthetic_root, pipeline="torchvision", batch_size=16, num_workers=0,
                        img_size=32).build("val", train=False, device=torch.device("cpu"))
    # What evaluate must give, computed plainly over the same batches.
    loss_sum, c1, c5, n = 0.0, 0, 0, 0
    model.eval()
    with torch.no_grad():
        batches = 0
        for images, labels in loader:
            logits = model(images).double()
            loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            top5 = logits.topk(5, dim=1).indices
            c1 += int((top5[:, 0] == labels).sum())
            c5 += int((top5 == labels[:, None]).any(dim=1).sum())
            n += labels.shape[0]
            batches += 1
    assert batches >= 3
    made = []
    real_tensor = torch.tensor

    def counting_tensor(*args, **kwargs):
        if sys._getframe(1).f_code is evaluate.__wrapped__.__code__:  # made by evaluate itself, not the loader
            made.append(args)
        return real_tensor(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", counting_tensor)
    stats = evaluate(model, loader, torch.device("cpu"))
    monkeypatch.undo()
    # Building a tensor from a host value and moving it to the device waits for the queued work: once
    # per evaluation (the sample count), not once per batch.
    assert len(made) == 1
    assert stats["samples"] == n == 100
    assert stats["acc1"] == pytest.approx(100.0 * c1 / n) and stats["acc5"] == pytest.approx(100.0 * c5 / n)
    assert stats["loss"] == pytest.approx(loss_sum / n, rel=1e-5)


# ---------------------------------------------------------------------------------------------- process records


def test_process_records_survive_as_of_their_last_heartbeat(tmp_path):
    run = str(tmp_path)
    first = ProcessRecord(run, True, job="pretrain", world_size=1, device="cpu", start_epoch=0, started=1000.0,
                          started_from="process")
    first.beat()
    first.saved(0)
    second = ProcessRecord(run, True, job="pretrain", world_size=2, device="cpu", start_epoch=1, started=2000.0,
                           started_from="process")
    second.beat(step=7)
    silent = ProcessRecord(run, False, job="pretrain", world_size=2, device="cpu", start_epoch=1, started=3000.0,
                           started_from="process")
    silent.beat()  # not the writer (rank > 0): writes nothing
    records = read_process_records(run)
    assert [r["start"] for r in records] == [1000.0, 2000.0]
    assert records[0]["saves"][0][0] == 0 and records[1]["step"] == 7 and records[1]["world_size"] == 2
    assert process_span(records[0]) == pytest.approx(records[0]["heartbeat"] - 1000.0)
    assert [r["start"] for r in previous_processes(run, second)] == [1000.0]
    # A damaged file is skipped, the others still read.
    with open(os.path.join(run, "processes", "broken.json"), "w", encoding="utf-8") as fh:
        fh.write("{")
    assert len(read_process_records(run)) == 2
    assert not [n for n in os.listdir(os.path.join(run, "processes")) if n.endswith(".tmp")]
    with open(first.path, encoding="utf-8") as fh:
        assert json.load(fh)["job"] == "pretrain"


# ---------------------------------------------------------------------------------------------- checkpoint messages


def test_the_encoder_note_appears_only_when_the_checkpoint_has_no_model_args():
    from supmae.models import create_model
    from supmae.models.vit import encoder_args_from_checkpoint

    model = create_model("supmae_vit_tiny_patch4", embed_dim=64, depth=1, num_heads=2, decoder_embed_dim=32,
                         decoder_num_heads=2, cls_hidden_dim=64, num_classes=10)
    said: list[str] = []
    ours = encoder_args_from_checkpoint({"model": model.state_dict(), "model_args": model.model_args},
                                        log=said.append)
    assert ours["source"] == "the checkpoint's model_args" and said == []
    bare = encoder_args_from_checkpoint({"model": model.state_dict()}, log=said.append)
    assert bare["source"] == "the state dict's shapes" and len(said) == 1 and "no model_args" in said[0]
    said.clear()
    encoder_args_from_checkpoint({"model": model.state_dict()}, "supmae_vit_tiny_patch4", log=said.append)
    assert said == []  # the shape came from --model, not from the weights
