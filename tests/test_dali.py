"""The dali pipeline: seeded augmentation (threads, epochs, resume), torch-owned batches, and
RandAugment (policy strings, op statistics against timm's, the benchmark row).

The dataset: 48 classes of one textured JPEG each (sizes 40..72 px), converted to webdataset
shards of 12, so a label names its sample and its shard, and a different crop shows in the pixels.
"""

from __future__ import annotations

import glob
import json
import math
import os
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

NUM = 48
SHARD = 12
BATCH = 8
SIZE = 32
SPEC = "rand-m9-mstd0.5-inc1"


@pytest.fixture(scope="module")
def textured(tmp_path_factory) -> str:
    from tools.convert import convert

    root = tmp_path_factory.mktemp("dali")
    rng = np.random.default_rng(0)
    for i in range(NUM):
        folder = root / "src" / "train" / f"c{i:02d}"
        folder.mkdir(parents=True)
        h, w = (int(v) for v in rng.integers(40, 73, size=2))
        # smooth random texture (noise upsampled), so crops and flips change the pixels
        small = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        img.save(folder / "0.jpg", quality=95)
    out = str(root / "out")
    convert(
        str(root / "src"), out, formats=("wds",), max_res=128, quality=95, workers=0, shard_size=SHARD, progress=False
    )
    return out


def dali(path: str, **kw):
    from pipelines import build_pipeline

    args = {"batch_size": BATCH, "img_size": SIZE, "num_workers": 1, "seed": 3} | kw
    return build_pipeline("dali", path, **args)


def epoch_batches(pipe, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    pipe.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in pipe]


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


# ----------------------------------------------------------------------------------------------
# Seeded augmentation: a function of (seed, epoch, sample), not of threads or of what ran before


@pytest.mark.parametrize("aug", [{"color_jitter": 0.4}, {"randaugment": SPEC}], ids=["jitter", "randaugment"])
def test_same_batches_with_one_and_two_threads_and_after_a_resume(textured, aug):
    one = dali(textured, num_workers=1, **aug)
    two = dali(textured, num_workers=2, **aug)
    first_one, first_two = next(iter(one)), next(iter(two))
    assert torch.equal(first_one[1], first_two[1]) and torch.equal(first_one[0], first_two[0])

    direct = epoch_batches(dali(textured, num_workers=2, **aug), 2)  # a resumed run starts at epoch 2
    for epoch in (0, 1):
        epoch_batches(one, epoch)
    assert same(epoch_batches(one, 2), direct)
    # not a vacuous equality: the augmentation differs with the epoch and the seed
    assert not same(epoch_batches(one, 3), direct)
    assert not same(epoch_batches(dali(textured, seed=4, **aug), 2), direct)


def test_augmentation_differs_between_epochs_for_the_same_sample(textured):
    """Replaying one epoch gives the same pixels per sample; another epoch other crops."""
    pipe = dali(textured, batch_size=NUM // 2, drop_last=False, scale=(0.2, 0.5))

    def by_label(epoch: int) -> dict[int, torch.Tensor]:
        return {int(y): x for xs, ys in epoch_batches(pipe, epoch) for x, y in zip(xs, ys)}

    e0, e1, e0_again = by_label(0), by_label(1), by_label(0)
    assert sorted(e0) == sorted(e1) == list(range(NUM))
    assert all(torch.equal(e0[k], e0_again[k]) for k in e0)
    assert sum(not torch.equal(e0[k], e1[k]) for k in e0) > NUM * 0.9


def test_shard_order_changes_between_epochs(textured):
    """The per-epoch rebuild still visits the tar shards in a new order each epoch."""
    from pipelines.constants import wds_dir

    shard_of = {}
    for i, tar in enumerate(sorted(glob.glob(os.path.join(wds_dir(textured, "train"), "*.tar")))):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".label"):
                    shard_of[int(np.frombuffer(tf.extractfile(m).read(), np.int64)[0])] = i
    assert sorted(set(shard_of.values())) == list(range(NUM // SHARD))
    pipe = dali(textured, initial_fill=1)  # no buffer shuffle: the order is the shard order

    def shards(epoch: int) -> list[int]:
        seq: list[int] = []
        for _, ys in epoch_batches(pipe, epoch):
            for y in ys.tolist():
                if not seq or seq[-1] != shard_of[y]:
                    seq.append(shard_of[y])
        return seq

    orders = [shards(e) for e in range(4)]
    assert all(sorted(o) == list(range(NUM // SHARD)) for o in orders)  # whole shards, one after another
    assert len({tuple(o) for o in orders}) >= 3
    assert shards(1) == orders[1]


# ----------------------------------------------------------------------------------------------
# Hand-off to torch


def test_batch_held_while_the_next_three_are_drawn_keeps_its_values(textured):
    pipe = dali(textured, batches_ahead=1)
    it = iter(pipe)
    held, labels = next(it)
    kept = held.clone(), labels.clone()
    later = [next(it) for _ in range(3)]
    assert torch.equal(held, kept[0]) and torch.equal(labels, kept[1])
    # writing into a batch in place (mixup, random erasing) touches no other batch
    later[0][0].mul_(0.0)
    replay = epoch_batches(pipe, 0)
    assert torch.equal(replay[0][0], kept[0])
    assert torch.equal(replay[2][0], later[1][0]) and torch.equal(replay[3][0], later[2][0])


def test_cpu_batches_are_dalis_own_buffers_and_outlive_their_pipeline(textured):
    """The CPU hand-off copies nothing (a copy into fresh torch memory cost a core share at two
    threads): the batch is DALI's output buffer, and it stays the consumer's after its epoch's
    pipeline is gone and later epochs have run."""
    from nvidia.dali import Pipeline, fn

    from pipelines.dali_pipeline import share_host

    pipe = Pipeline(batch_size=4, num_threads=1, device_id=None, seed=1, prefetch_queue_depth=2)
    with pipe:
        pipe.set_outputs(fn.random.uniform(range=[0, 1], shape=[64]))
    pipe.build()
    assert pipe.exec_dynamic
    (out,) = pipe.run()
    assert share_host(out).data_ptr() == out.as_tensor().data_ptr()

    loader = dali(textured, batches_ahead=1)
    held = list(loader)  # the whole of epoch 0: its pipeline released when the generator ended
    kept = [(x.clone(), y.clone()) for x, y in held]
    assert len({x.data_ptr() for x, _ in held}) == len(held)  # no two batches share a buffer
    epoch_batches(loader, 1)
    replay = epoch_batches(loader, 0)
    assert same(held, kept) and same(replay, kept)


def test_to_torch_copies_out_of_buffers_dali_recycles():
    """DALI's legacy executor reuses its output buffers after `prefetch_queue_depth` runs: a DLPack
    view of batch 0 then shows later data; `to_torch`'s copy keeps batch 0."""
    from nvidia.dali import Pipeline, fn

    from pipelines.dali_pipeline import to_torch

    pipe = Pipeline(batch_size=4, num_threads=1, device_id=None, seed=1, prefetch_queue_depth=2, exec_dynamic=False)
    with pipe:
        pipe.set_outputs(fn.random.uniform(range=[0, 1], shape=[64]))
    pipe.build()
    (out,) = pipe.run()
    view, copy = torch.from_dlpack(out.as_tensor()), to_torch(out, torch.device("cpu"))
    expected = view.clone()
    for _ in range(3):
        pipe.run()
    assert not torch.equal(view, expected)  # the hazard is real in this DALI
    assert torch.equal(copy, expected)


# ----------------------------------------------------------------------------------------------
# CUDA flavour of the DALI wheel against torch's CUDA


def test_cuda_flavour_mismatch_message():
    from pipelines.dali_pipeline import cuda_flavour_mismatch, dali_cuda_flavours

    assert cuda_flavour_mismatch([13], "13.0") is None
    text = cuda_flavour_mismatch([13], "12.4")
    assert text and "\n" not in text and "nvidia-dali-cuda130" in text and "nvidia-dali-cuda120" in text
    assert cuda_flavour_mismatch([12], None) is None  # CPU-only torch: nothing to match
    assert cuda_flavour_mismatch([], "12.4") is None  # DALI built from source: no flavour to read
    installed = dali_cuda_flavours()  # the wheel this venv has (nvidia-dali-cudaNNN)
    assert installed and all(isinstance(m, int) and m >= 11 for m in installed)


# ----------------------------------------------------------------------------------------------
# RandAugment: the policy string


def timm_policy(spec: str):
    from timm.data.auto_augment import rand_augment_transform

    return rand_augment_transform(spec, {"img_mean": (124, 116, 104)})


@pytest.mark.parametrize("spec", [SPEC, "rand-m5-n3", "rand-n1-m7-mstd101-p0.8", "rand-m12-mmax15-inc0-mstd1", "rand"])
def test_policy_parsing_agrees_with_timm(spec):
    from pipelines.dali_randaugment import parse_policy

    ours, ref = parse_policy(spec), timm_policy(spec)
    op = ref.ops[0]
    assert ours.n == ref.num_layers and ours.m == op.magnitude and ours.p == op.prob
    assert ours.mstd == op.magnitude_std and ours.mmax == (op.magnitude_max or 10)
    assert list(ours.ops) == [o.name for o in ref.ops]
    assert spec in ours.describe()


@pytest.mark.parametrize(
    "spec,why",
    [
        ("augmix-m5", "start with 'rand'"),
        ("rand-m9-x3", "unknown section 'x3'"),
        ("rand-m9-mstd", "unknown section 'mstd'"),
        ("rand-m9.5", "'9.5' is not a number"),
        ("rand-n0", "n must be >= 1"),
        ("rand-p1.5", "p must be in [0, 1]"),
        ("rand-inc2", "inc must be 0 or 1"),
        ("rand-tweights", "transform sets"),
        ("rand-m9-m5", "given twice"),
        ("rand-mmax500", "mmax must be"),
    ],
)
def test_bad_policy_is_a_one_line_data_error(spec, why):
    from pipelines import DataError
    from pipelines.dali_randaugment import parse_policy

    with pytest.raises(DataError) as info:
        parse_policy(spec)
    text = str(info.value)
    assert "\n" not in text and why in text and repr(spec) in text


def test_randaugment_in_train_mode_only_and_not_with_jitter(textured):
    from pipelines import DataError

    train = dali(textured, randaugment=SPEC)
    assert train.randaugment is not None and SPEC in train.describe() and "dali" in train.augmentation
    val = dali(textured, randaugment=SPEC, train=False, drop_last=False)
    assert val.randaugment is None and "RandAugment" not in val.describe()
    plain = next(iter(dali(textured)))[0]
    augmented = next(iter(train))[0]
    assert augmented.shape == plain.shape and not torch.equal(augmented, plain)
    with pytest.raises(DataError, match="cannot be combined"):
        dali(textured, randaugment=SPEC, color_jitter=0.4)
    with pytest.raises(DataError, match="not a RandAugment spec"):
        dali(textured, randaugment="rand-q3")


# ----------------------------------------------------------------------------------------------
# RandAugment: op statistics against timm's on the same inputs


def timm_counts(spec: str, images: list[np.ndarray]) -> dict:
    """Run timm's RandAugment on `images` with every op instrumented: what fired, at which magnitude
    and level argument."""
    ref = timm_policy(spec)
    fired: dict = {op.name: [] for op in ref.ops}  # name -> [(magnitude, level or None)]
    for op in ref.ops:
        level_fn, name = op.level_fn, op.name
        current: dict = {}

        def record_level(magnitude, hparams, level_fn=level_fn, current=current):
            current["m"] = magnitude
            current["level"] = level_fn(magnitude, hparams)
            return current["level"]

        def record_apply(img, *args, name=name, current=current, **kwargs):
            # Count the draw and leave the pixels alone: the statistics are what is compared, and
            # timm's PosterizeIncreasing at magnitude 10 asks Pillow for 0 bits, which Pillow >= 10
            # refuses with a ValueError (about 1 image in 600 with this policy).
            level = current.pop("level", None)
            fired[name].append((current.pop("m", None), None if level is None else float(level[0])))
            return img

        if level_fn is not None:
            op.level_fn = record_level
        op.aug_fn = record_apply
    random.seed(0)
    np.random.seed(0)
    for img in images:
        ref(Image.fromarray(img))
    return {"fired": fired, "layers": len(images) * ref.num_layers}


def dali_counts(spec: str, images: list[np.ndarray], batch: int) -> tuple[dict, list[tuple]]:
    """Run our DALI policy on the same images; count from the draws it recorded, and return
    (input, output, ops) per sample to check that the draws are what ran."""
    from nvidia.dali import fn, pipeline_def

    from pipelines.dali_randaugment import BINS_PER_UNIT, SKIP, levels, parse_policy, rand_augment

    policy = parse_policy(spec)
    size = images[0].shape[0]
    chunks = [images[i : i + batch] for i in range(0, len(images), batch)]
    feed = iter(chunks)

    @pipeline_def(batch_size=batch, num_threads=2, device_id=None, seed=11, enable_conditionals=True)
    def graph():
        x = fn.external_source(source=lambda: next(feed), batch=True, layout="HWC")
        y, (op, bins, sign) = rand_augment(x, policy, size, record=True)
        return x, y, op, bins, sign

    pipe = graph()
    pipe.build()
    names = [*policy.ops, SKIP]
    fired: dict = {name: [] for name in policy.ops}
    samples = []
    for _ in chunks:
        x, y, op, bins, sign = (np.array(o.as_tensor()) for o in pipe.run())
        for i in range(batch):
            ops = [names[k] for k in op[i]]
            mags = (bins[i] if bins.ndim else np.full(policy.n, bins)) / BINS_PER_UNIT
            for name, mag, neg in zip(ops, mags, sign[i]):
                if name == SKIP:
                    continue
                lv = levels(name, np.array([mag]), size)
                level = None if lv is None else float(lv[0]) * (-1 if neg and name in NEGATED_OPS else 1)
                if level is not None and name in ENHANCE_INC:
                    level = max(0.1, 1.0 + level)  # timm's level function returns the factor itself
                if name.startswith("Translate"):
                    level /= size  # timm's level is the fraction of the side; ours is pixels
                fired[name].append((float(mag), level))
            samples.append((x[i], y[i], ops))
    return {"fired": fired, "layers": len(images) * policy.n}, samples


ENHANCE_INC = {"ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"}
NEGATED_OPS = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"} | ENHANCE_INC


def within(a: np.ndarray, b: np.ndarray) -> float:
    """5 standard errors of the difference of two sample means (plus a floor for constant samples)."""
    return 5 * math.sqrt(a.var() / len(a) + b.var() / len(b)) + 1e-6


def test_randaugment_op_statistics_match_timm():
    """2,000 images through timm's policy and ours: the same ops, each firing as often (within
    5 standard deviations), the same skip rate, the same magnitude distribution, the same level
    range and sign balance per op. Then the recorded draws are checked against the pixels."""
    from pipelines.dali_randaugment import SKIP

    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8) for _ in range(2000)]
    ref = timm_counts(SPEC, images)
    ours, samples = dali_counts(SPEC, images, batch=250)
    assert set(ours["fired"]) == set(ref["fired"]) and len(ref["fired"]) == 15
    layers = ref["layers"]
    for stats in (ref, ours):
        fired = sum(len(v) for v in stats["fired"].values())
        assert abs(fired / layers - 0.5) < 5 * math.sqrt(0.25 / layers)  # p = 0.5 per layer
    sd = math.sqrt(2 * (0.5 / 15) * (1 - 0.5 / 15) / layers)  # of a difference of two op frequencies
    for name in ref["fired"]:
        f_ref, f_ours = len(ref["fired"][name]) / layers, len(ours["fired"][name]) / layers
        assert abs(f_ref - f_ours) < 5 * sd, (name, f_ref, f_ours)
        levels_ref = [lv for _, lv in ref["fired"][name] if lv is not None]
        levels_ours = [lv for _, lv in ours["fired"][name] if lv is not None]
        assert (len(levels_ref) > 0) == (len(levels_ours) > 0), name
        if levels_ref:
            lo, hi = min(levels_ref), max(levels_ref)
            span = max(hi - lo, abs(hi), 1e-6)
            assert min(levels_ours) >= lo - 0.25 * span and max(levels_ours) <= hi + 0.25 * span, name
            a, b = np.abs(levels_ref), np.abs(levels_ours)
            assert abs(a.mean() - b.mean()) < within(a, b), name
            if name in NEGATED_OPS:
                neutral = 1.0 if name in ENHANCE_INC else 0.0
                for lv in (levels_ref, levels_ours):
                    assert abs(np.mean(np.array(lv) < neutral) - 0.5) < 0.2, name
    mags_ref = np.array([m for v in ref["fired"].values() for m, _ in v if m is not None])
    mags_ours = np.array([m for v in ours["fired"].values() for m, _ in v])
    for mags in (mags_ref, mags_ours):
        assert mags.min() >= 0 and mags.max() <= 10
    assert abs(mags_ref.mean() - mags_ours.mean()) < within(mags_ref, mags_ours)
    assert abs(mags_ref.std() - mags_ours.std()) < 0.06  # 5 standard errors of a std over ~1,600 draws

    # the draws are what ran: two skipped layers leave the image alone, one Invert inverts it
    skipped = [(x, y) for x, y, ops in samples if ops == [SKIP, SKIP]]
    inverted = [(x, y) for x, y, ops in samples if sorted(ops) == sorted(["Invert", SKIP])]
    assert len(skipped) > 300 and len(inverted) > 20
    assert all(np.array_equal(x, y) for x, y in skipped)
    assert all(np.array_equal(255 - x, y) for x, y in inverted)
    changed = [not np.array_equal(x, y) for x, y, ops in samples if ops[0] == "Rotate"]
    assert all(changed)


# ----------------------------------------------------------------------------------------------
# The loader benchmark with RandAugment


def test_bench_loaders_randaugment_and_epochs(textured, tmp_path, capsys):
    from benchmarks.loaders import main

    out = tmp_path / "bench.json"
    argv = f"--data {textured} --batch-size 8 --workers 1 --img-size {SIZE} --batches 2 --warmup 1 --rounds 1"
    argv += f" --pipelines ffcv,dali,torchvision --randaugment {SPEC} --dali-rebuild 2 --dali-rounds 3 --json {out}"
    assert main(argv.split()) == 0
    text = capsys.readouterr().out
    assert f"RandAugment {SPEC}" in text and "1.00x" in text and "dali across epochs" in text
    assert "gap between epochs" in text and "stock DALI: not compared" in text
    result = json.loads(out.read_text())
    rows = {r["pipeline"]: r for r in result["results"]}
    assert rows["ffcv"]["available"] is False and "randaugment" in rows["ffcv"]["reason"].lower()
    assert rows["torchvision"]["ratio_to_baseline"] == pytest.approx(1.0)
    assert rows["dali"]["images"] == 16 and rows["dali"]["ratio_to_baseline"] > 0
    assert SPEC in rows["dali"]["augmentation"]
    (epochs,) = result["dali_epochs"]  # one entry per worker count
    assert epochs["epochs"] == 2 and epochs["batches_per_epoch"] == NUM // 8 and epochs["rounds"] == 3
    assert len(epochs["gaps_seconds"]) == 3 and epochs["gap_seconds"] > 0 and epochs["steady_batch_seconds"] > 0
    assert epochs["stock_images_per_sec"] is None and epochs["ratio_to_stock"] is None


def test_bench_loaders_dali_against_stock(textured, tmp_path, capsys):
    """Without RandAugment the same run compares our dali pipeline with stock DALI on the same shards."""
    from benchmarks.loaders import main

    out = tmp_path / "bench.json"
    argv = f"--data {textured} --batch-size 8 --workers 1 --img-size {SIZE} --batches 1 --warmup 0 --rounds 1"
    argv += f" --pipelines dali --dali-rebuild 2 --dali-rounds 3 --ceiling-images 8 --json {out}"
    assert main(argv.split()) == 0
    assert "ours / stock" in capsys.readouterr().out
    (epochs,) = json.loads(out.read_text())["dali_epochs"]  # one entry per worker count
    assert len(epochs["stock_rounds"]) == 3 and epochs["stock_images_per_sec"] > 0
    paired = [a / b for a, b in zip(epochs["ours_rounds"], epochs["stock_rounds"])]
    assert epochs["ratio_rounds"] == pytest.approx(paired)
    assert epochs["ratio_to_stock"] == pytest.approx(float(np.median(paired)))


# ----------------------------------------------------------------------------------------------
# Epoch boundaries: nothing decoded past an epoch's end, the next epoch's pipeline ready in time


def test_no_batch_is_decoded_past_the_end_of_an_epoch_and_the_next_one_fills_meanwhile(textured, monkeypatch):
    """DALI's run() keeps `prefetch` batches in flight, which a per-epoch pipeline throws away at
    every epoch end. Our pipeline schedules exactly the epoch's batches, and epoch e + 1's pipeline
    (built on a background thread) starts filling before epoch e's last batch is handed out."""
    from nvidia.dali import Pipeline as DaliGraph

    pipe = dali(textured, batches_ahead=3)
    n = len(pipe)
    assert n == NUM // BATCH > 3
    scheduled: dict[int, int] = {}  # id(DALI pipeline) -> iterations scheduled
    order: list[int] = []
    real = DaliGraph.schedule_run

    def counting(self):
        first = not scheduled.get(id(self))
        real(self)
        scheduled[id(self)] = scheduled.get(id(self), 0) + (self._prefetch_queue_depth if first else 1)
        order.append(id(self))

    monkeypatch.setattr(DaliGraph, "schedule_run", counting)
    reference = [(x.clone(), y.clone()) for x, y in dali(textured, batches_ahead=3)]
    scheduled.clear()
    order.clear()
    it = iter(pipe)
    got = [next(it) for _ in range(n)]  # the whole epoch, the generator not yet finished
    this, later = order[0], [p for p in dict.fromkeys(order) if p != order[0]]
    assert scheduled[this] == n  # not n + prefetch - 1
    assert len(later) == 1 and scheduled[later[0]] == 3  # epoch 1 already filling
    assert same(got, reference)
    assert same(epoch_batches(pipe, 1), epoch_batches(dali(textured, batches_ahead=3), 1))


def test_randaugment_graph_runs_on_the_gpu_when_placed_there(textured):
    """The RandAugment graph defined for the GPU (no GPU needed to define it): every operator that
    touches pixels (decode, resize, flip, the RandAugment ops, the conditional merges of image
    batches, crop_mirror_normalize) is on the GPU; the same operators as the CPU graph's."""
    import collections
    import re

    from nvidia.dali import pipeline_def

    from pipelines.dali_pipeline import define_graph

    args = dict(dali(textured, randaugment=SPEC).graph_args)

    def nodes(placement: str) -> list[tuple[str, str]]:
        captured = []

        def graph():
            out = define_graph(placement, reader_seed=1, shard_order_seed=2, **args)
            captured.append(out)
            return out

        pipeline_def(graph, enable_conditionals=True)(
            batch_size=4, num_threads=1, device_id=0 if placement == "gpu" else None, seed=1
        )
        seen: dict[int, tuple[str, str]] = {}

        def walk(node) -> None:
            if id(node) not in seen:
                seen[id(node)] = (re.sub(r"^_+|_\d+", "", node.name), node.device)
                for parent in node.source.inputs:
                    walk(parent)

        for out in captured[0]:
            walk(out)
        return list(seen.values())

    gpu, cpu = nodes("gpu"), nodes("cpu")
    assert collections.Counter(n for n, _ in gpu) == collections.Counter(n for n, _ in cpu)
    assert all(d == "cpu" for _, d in cpu)
    pixel_ops = {
        "ImageRandomCrop",
        "Resize",
        "Flip",
        "WarpAffine",
        "Rotate",
        "Brightness",
        "Saturation",
        "Equalize",
        "Filter",
        "Merge",
        "CropMirrorNormalize",
    }
    placed = collections.defaultdict(set)
    for name, dev in gpu:
        placed[name].add(dev)
    assert pixel_ops <= set(placed)  # the policy's operators are all in the graph
    assert all(placed[name] == {"gpu"} for name in pixel_ops), {n: placed[n] for n in pixel_ops}
    assert placed["reader[0]"] == {"cpu"} and placed["reader[1]"] == {"gpu"}


# ----------------------------------------------------------------------------------------------
# nvJPEG's preallocation, sized from the dataset


def test_nvjpeg_padding_is_sized_from_the_largest_stored_image():
    from pipelines.dali_pipeline import nvjpeg_padding

    # decoded RGB (3 bytes a pixel) on the device, int16 coefficients of 3 components on the host, 64 KiB steps
    assert nvjpeg_padding(256) == (256 * 256 * 3, 256 * 256 * 6) == (196608, 393216)
    assert nvjpeg_padding(512) == (512 * 512 * 3, 512 * 512 * 6)
    assert nvjpeg_padding(1) == (65536, 65536)
    assert nvjpeg_padding(300)[0] >= 300 * 300 * 3 and nvjpeg_padding(300)[0] % 65536 == 0
    with pytest.raises(ValueError):
        nvjpeg_padding(0)


def test_gpu_graph_passes_the_sized_padding_to_the_decoder(textured, monkeypatch):
    """The GPU graph (defined without a GPU) hands nvJPEG the padding sized from the manifest's
    max_res (128 here), not ImageNet-at-full-size constants; the CPU decoder gets none."""
    from nvidia.dali import Pipeline as DaliGraph
    from nvidia.dali import fn

    from pipelines.dali_pipeline import define_graph, nvjpeg_padding

    seen: list[dict] = []
    real = fn.decoders.image_random_crop

    def recording(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(fn.decoders, "image_random_crop", recording)
    pipe = dali(textured)
    assert pipe.graph_args["preallocate_hint"] == 128
    seen.clear()  # the pipeline's own (CPU) build
    for placement in ("gpu", "cpu"):
        graph = DaliGraph(batch_size=4, num_threads=1, device_id=0 if placement == "gpu" else None, seed=1)
        with graph:
            define_graph(placement, reader_seed=1, shard_order_seed=2, **pipe.graph_args)
    gpu, cpu = seen
    assert gpu["device"] == "mixed" and cpu["device"] == "cpu"
    assert (gpu["device_memory_padding"], gpu["host_memory_padding"]) == nvjpeg_padding(128) == (65536, 131072)
    assert gpu["preallocate_width_hint"] == gpu["preallocate_height_hint"] == 128
    assert "device_memory_padding" not in cpu and "host_memory_padding" not in cpu
