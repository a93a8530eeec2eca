"""A training sample's augmentation is a function of (seed, epoch, dataset index) alone, for the
ffcv and torchvision pipelines: the same batches with 1 or 2 workers, after a resume, on the
matching positions of a 2-rank job; colour jitter included. Also: a held batch keeps its values
while later ones are drawn, and building or iterating the FFCV loader leaves torch's thread count
as the caller set it.

Data: a tiny tools.synthetic dataset (textured, 48 px, 48 training images) converted by the
converter; torchvision reads the raw tree the converted manifest names.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

BATCH = 4
SIZE = 24
SEED = 11
JITTER = 0.4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    from tools.convert import convert
    from tools.synthetic import make_dataset

    root = tmp_path_factory.mktemp("determinism")
    src = make_dataset(str(root / "src"), train_per_class=12, val_per_class=1, size=48, num_classes=4, seed=3)
    out = str(root / "out")
    convert(src, out, formats=("ffcv",), workers=0, splits=("train",), progress=False)
    return out


def build(kind: str, root: str, **kw):
    from pipelines import build_pipeline

    args = {"batch_size": BATCH, "img_size": SIZE, "seed": SEED, "num_workers": 1, "color_jitter": JITTER}
    args.update(kw)
    return build_pipeline(kind, root, **args)


def epoch_batches(pipe, epoch: int | None = None, limit: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if epoch is not None:
        pipe.set_epoch(epoch)
    out = []
    for images, labels in pipe:
        out.append((images.clone(), labels.clone()))
        if limit is not None and len(out) == limit:
            break
    return out


def assert_same(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb)
        assert torch.equal(xa, xb)


# ----------------------------------------------------------------------------------------------
# The counter draw and the FFCV kernels: the pure-Python reference equals the compiled code


def test_counter_uniform_reference_equals_numba():
    pytest.importorskip("numba")
    from pipelines.base import counter_uniform, counter_uniform_jit

    jit = counter_uniform_jit()
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**62, size=(500, 4)).tolist() + [[-1, 0, 0, 0], [0, 0, 0, 0], [2**40, 7, 3, 1]]
    values = []
    for seed, epoch, index, stream in words:
        ref = counter_uniform(seed, epoch, index, stream)
        assert jit(seed, epoch, np.uint64(index), stream) == ref
        assert 0.0 <= ref < 1.0
        values.append(ref)
    assert abs(np.mean(values) - 0.5) < 0.05
    # Each word matters.
    variants = ([1, 2, 3, 4], [0, 2, 3, 4], [1, 0, 3, 4], [1, 2, 0, 4], [1, 2, 3, 0])
    assert len({counter_uniform(*w) for w in variants}) == 5


@pytest.mark.slow
def test_ffcv_crop_and_jitter_kernels_equal_their_python_reference():
    pytest.importorskip("ffcv")
    from pipelines.base import counter_uniform
    from pipelines.ffcv_cropdecode import compiled_kernels, make_flip_and_jitter, make_random_crop

    crop_jit, augment_jit, _ = compiled_kernels()
    crop_ref = make_random_crop(counter_uniform)
    log_lo, log_hi = np.log(3 / 4), np.log(4 / 3)
    rng = np.random.default_rng(1)
    shapes = [(int(h), int(w)) for h, w in rng.integers(8, 600, size=(200, 2))] + [(10, 900), (900, 10)]
    for n, (h, w) in enumerate(shapes):
        args = (h, w, 0.2, 1.0, log_lo, log_hi, SEED, n % 3, n)
        ref = crop_ref(*args)
        assert tuple(crop_jit(np.uint32(h), np.uint32(w), *args[2:8], np.uint64(n))) == ref
        i, j, ch, cw = ref
        assert 0 <= i and 0 <= j and 0 < ch and 0 < cw and i + ch <= h and j + cw <= w
    assert crop_ref(10, 900, 0.2, 1.0, log_lo, log_hi, 0, 0, 0)[2:] == (10, 13)  # fallback: clamped to 4/3

    augment_ref = make_flip_and_jitter(counter_uniform)
    flips = 0
    for index in range(12):
        img = rng.integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
        ref, jit = img.copy(), img.copy()
        augment_ref(ref, JITTER, SEED, 2, index)
        augment_jit(jit, JITTER, SEED, 2, np.uint64(index))
        assert np.array_equal(ref, jit)
        plain = img.copy()
        augment_ref(plain, 0.0, SEED, 2, index)
        flipped = np.array_equal(plain, img[:, ::-1])
        assert flipped or np.array_equal(plain, img)
        flips += flipped
        assert not np.array_equal(ref, plain)  # jitter moved the colours
    assert 0 < flips < 12


# ----------------------------------------------------------------------------------------------
# Both backends


KINDS = [pytest.param("ffcv", marks=pytest.mark.slow), "torchvision"]


def _available(kind: str) -> None:
    from pipelines import available

    if available(kind):
        pytest.skip(available(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_workers_resume_jitter_and_ranks(kind, tiny):
    """One seed, one augmentation per (epoch, sample): 1 vs 2 workers, a fresh pipeline at epoch 1
    vs one that iterated epoch 0 first, and the two ranks of a 2-rank job vs the 1-rank run."""
    _available(kind)
    one = build(kind, tiny, num_workers=1)
    two = build(kind, tiny, num_workers=2)
    assert_same(epoch_batches(one, 0, limit=3), epoch_batches(two, 0, limit=3))

    # Resume: `one` reaches epoch 1 after iterating epoch 0 to its end; `two` jumps there directly.
    epoch0 = epoch_batches(one, 0)
    after_epoch0 = epoch_batches(one)
    direct = epoch_batches(two, 1)
    assert_same(after_epoch0, direct)
    assert not torch.equal(epoch0[0][0], direct[0][0])  # a new epoch, new order and new crops

    # Colour jitter is part of the draw: the same seed without it keeps the crops and flips (same
    # streams) but not the colours.
    plain = epoch_batches(build(kind, tiny, num_workers=1, color_jitter=0.0), 0, limit=1)
    assert torch.equal(plain[0][1], epoch0[0][1])
    assert (plain[0][0] - epoch0[0][0]).abs().mean() > 0.05

    # Two ranks read disjoint parts of the epoch's permutation; each sample keeps its augmentation. Both
    # deal it out in blocks of a batch: rank r's batch k is the one process's batch 2k + r.
    images = torch.cat([x for x, _ in epoch0])
    labels = torch.cat([y for _, y in epoch0])
    for rank in range(2):
        pipe = build(kind, tiny, num_workers=1, rank=rank, world_size=2)
        got = epoch_batches(pipe, 0, limit=2)
        positions = torch.cat([torch.arange(BATCH) + (2 * k + rank) * BATCH for k in range(len(got))])
        assert torch.equal(torch.cat([y for _, y in got]), labels[positions])
        assert torch.equal(torch.cat([x for x, _ in got]), images[positions])


@pytest.mark.parametrize("kind", KINDS)
def test_held_batch_keeps_its_values(kind, tiny):
    """A batch held while the next three are drawn (more than FFCV's batches_ahead + 2 slots with
    batches_ahead=1) still holds the values it had when it was yielded."""
    _available(kind)
    pipe = build(kind, tiny, num_workers=2, batches_ahead=1)
    batches = iter(pipe)
    held_x, held_y = next(batches)
    copy_x, copy_y = held_x.clone(), held_y.clone()
    later = [next(batches) for _ in range(3)]
    assert all(not torch.equal(x, copy_x) for x, _ in later)
    assert torch.equal(held_x, copy_x) and torch.equal(held_y, copy_y)
    del batches


@pytest.mark.slow
def test_ffcv_keeps_the_callers_thread_count(tiny):
    """FFCV's Loader sets torch's thread count to its worker count at construction and at every
    epoch start; the pipeline restores the caller's setting (--train.cpu_threads)."""
    _available("ffcv")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # neither 1 nor the 2 workers below
        pipe = build("ffcv", tiny, num_workers=2)
        assert torch.get_num_threads() == 3
        for _ in pipe:
            assert torch.get_num_threads() == 3
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_randaugment_posterize_to_zero_bits_gives_black_not_an_error():
    """rand-m9-mstd0.5-inc1 draws PosterizeIncreasing magnitudes that keep 0 bits (about 8 in 5,000
    images); Pillow refuses 0 bits, so the op must handle it instead of killing a worker."""
    from PIL import Image

    from pipelines.torchvision_pipeline import build_transform

    transform = build_transform(True, 32, (0.35, 1.0), 0.0, "rand-m9-mstd0.5-inc1")
    posterize = [op for op in transform.randaugment.ops if op.name == "PosterizeIncreasing"]
    assert posterize, [op.name for op in transform.randaugment.ops]
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert list(posterize[0].aug_fn(img, 0).getdata()) == [(0, 0, 0)] * 64
    assert posterize[0].aug_fn(img, 4).getpixel((0, 0)) == (192, 96, 48)
