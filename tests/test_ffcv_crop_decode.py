"""The ffcv pipeline's crop-window JPEG decoder (pipelines/_cropdecode.cpp) and the crop it is given.

- Pixels: decoding only a window (rows above skipped, or cut off at a restart marker; iMCU
  columns cropped, rows below never decoded; at DCT scales 8/8, 4/8, 2/8, 1/8) gives exactly the
  bytes of a whole-image decode cut to the same window, for 4:2:0, 4:2:2, 4:4:4 and grey JPEGs of
  awkward sizes, with and without restart markers. Exact, not "within
  rounding": both use libjpeg-turbo's IFAST IDCT at the same scale, and the decoder asks for one
  column of margin beyond the window on each side, the only pixels libjpeg documents as different
  in a cropped decode (fancy chroma upsampling at the region's edges).
- The resize: within one level of OpenCV's INTER_LINEAR, the same bytes from its AVX2 and scalar
  paths, the flip an exact mirror, nothing written past the image.
- Through the pipeline: crop_decode on and off give the same batches (train with flip and colour
  jitter, and val); "area" interpolation reproduces FFCV's own resize byte for byte.
- Statistics: the (seed, epoch, index) counter draw of the crop window has RandomResizedCrop's
  distribution of area fraction and log aspect ratio (two-sample KS against torchvision's
  get_params on 20,000 draws per image shape).
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv")

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "imagenet-sample", "train")


def textured(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth colour gradients plus noise: chroma that varies column to column, so a wrong
    upsampling edge or a shifted window shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack(
        [128 + 100 * np.sin(x / 7.0 + seed), 128 + 100 * np.cos(y / 5.0), 128 + 60 * np.sin((x + y) / 3.0)], -1
    )
    img += rng.normal(0, 20, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(img: np.ndarray, subsampling: int | None, restart: bool = False) -> np.ndarray:
    """JPEG bytes via PIL: subsampling 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0, None = greyscale; with
    `restart`, a restart marker after every MCU row (as the converter writes them)."""
    from PIL import Image

    buf = io.BytesIO()
    markers = {"restart_marker_rows": 1} if restart else {}
    if subsampling is None:
        Image.fromarray(img).convert("L").save(buf, format="JPEG", quality=90, **markers)
    else:
        Image.fromarray(img).save(buf, format="JPEG", quality=90, subsampling=subsampling, **markers)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8).copy()


def full_decode(jpeg: np.ndarray, height: int, width: int, k: int) -> np.ndarray:
    """FFCV's whole-image decoder (TurboJPEG) at DCT scale k/8, RGB [ceil(H k/8), ceil(W k/8), 3]."""
    from ffcv.libffcv import imdecode

    sh, sw = (height * k + 7) // 8, (width * k + 7) // 8
    out = np.zeros(sh * sw * 3, dtype=np.uint8)
    assert imdecode(jpeg, out, height, width, height, width, 0, 0, k, 8, False, False) == 0
    return out.reshape(sh, sw, 3)


def scaled_window(i: int, j: int, h: int, w: int, k: int, sh: int, sw: int) -> tuple[int, int, int, int]:
    i0, j0 = i * k // 8, j * k // 8
    return i0, min(sh, max(i0 + 1, (i + h) * k // 8)), j0, min(sw, max(j0 + 1, (j + w) * k // 8))


def check_windows(jpeg: np.ndarray, height: int, width: int, rng: np.random.Generator, tries: int) -> int:
    """Random windows (and the edge cases) at every DCT scale: the window decode equals the full
    decode cut to it. Returns the number of windows checked."""
    from pipelines.ffcv_cropdecode import decode_window

    windows = [(0, 0, height, width), (0, 0, 1, 1), (height - 1, width - 1, 1, 1), (1, 1, height - 1, width - 1)]
    for _ in range(tries):
        h, w = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        windows.append((int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w))
    checked = 0
    for k in (8, 4, 2, 1):
        full = full_decode(jpeg, height, width, k)
        for i, j, h, w in windows:
            i0, i1, j0, j1 = scaled_window(i, j, h, w, k, *full.shape[:2])
            got = decode_window(jpeg, (height, width), (i, j, h, w), (i1 - i0, j1 - j0), scale_num=k)
            np.testing.assert_array_equal(got, full[i0:i1, j0:j1], err_msg=f"k={k} window={(i, j, h, w)}")
            checked += 1
    return checked


@pytest.mark.parametrize("restart", [False, True], ids=["skip-rows", "restart-markers"])
@pytest.mark.parametrize("subsampling", [2, 1, 0, None], ids=["420", "422", "444", "grey"])
def test_window_decode_equals_full_decode_cut(subsampling, restart):
    """Also with a restart marker after every MCU row (the converter's JPEGs), where the decoder
    starts at the window's MCU row from a cut JPEG (cut_rows) instead of skipping rows: the same
    bytes. Grey JPEGs (one component) always take the skip path."""
    from pipelines.ffcv_cropdecode import test_switches

    cuts = test_switches()[2]
    rng = np.random.default_rng(subsampling or 7)
    before = cuts()
    for height, width in ((203, 317), (64, 48), (17, 250)):  # sizes off the 16-px MCU grid
        jpeg = encode(textured(height, width, seed=height), subsampling, restart)
        assert check_windows(jpeg, height, width, rng, tries=12) == 4 * 16
    if restart and subsampling is not None:
        assert cuts() - before > 30  # of 192: those starting below their first MCU row (+ margin)
    else:
        assert cuts() == before


def test_a_restart_cut_and_a_row_skip_decode_the_same_window():
    """The switch that turns the cut off (tests only) gives the skip path the same windows."""
    from pipelines.ffcv_cropdecode import decode_window, test_switches

    no_cut, _scalar, cuts = test_switches()
    jpeg = encode(textured(256, 192, 3), 2, restart=True)
    windows = [(100, 10, 120, 150), (17, 0, 239, 192), (255, 191, 1, 1), (33, 40, 50, 60)]
    before = cuts()
    cut = [decode_window(jpeg, (256, 192), w, (224, 224), flip=True) for w in windows]
    assert cuts() - before == len(windows)
    no_cut(1)
    try:
        skipped = [decode_window(jpeg, (256, 192), w, (224, 224), flip=True) for w in windows]
    finally:
        no_cut(0)
    assert cuts() - before == len(windows)
    for a, b in zip(cut, skipped):
        np.testing.assert_array_equal(a, b)


def test_window_decode_equals_full_decode_cut_on_real_imagenet_jpegs():
    if not os.path.isdir(SAMPLE):
        pytest.skip("the ImageNet sample is not here")
    from PIL import Image

    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(SAMPLE) for f in files)[::100]  # 10 classes
    rng = np.random.default_rng(0)
    for path in paths:
        jpeg = np.fromfile(path, dtype=np.uint8)
        with Image.open(path) as im:
            if im.mode not in ("RGB", "L"):
                continue  # CMYK: neither decoder converts it to RGB
            width, height = im.size
        check_windows(jpeg, height, width, rng, tries=4)


def test_window_decode_resizes_and_flips():
    from pipelines.ffcv_cropdecode import decode_window

    jpeg = encode(textured(120, 160, 1), 2)
    plain = decode_window(jpeg, (120, 160), (10, 20, 90, 100), (32, 40))
    flipped = decode_window(jpeg, (120, 160), (10, 20, 90, 100), (32, 40), flip=True)
    assert plain.shape == (32, 40, 3)
    np.testing.assert_array_equal(flipped, plain[:, ::-1])
    # The resize keeps the window's content: cv2's INTER_LINEAR on the full decode's window, to
    # within one level (ours rounds its fixed-point weights its own way; test_linear_resize_...).
    import cv2

    ref = cv2.resize(full_decode(jpeg, 120, 160, 8)[10:100, 20:120], (40, 32), interpolation=cv2.INTER_LINEAR)
    assert np.abs(plain.astype(int) - ref).max() <= 1


def _resize(img: np.ndarray, out_h: int, out_w: int, flip: bool, guard: int = 64) -> np.ndarray:
    """The C library's linear resize (+ flip) of all of `img`, into an array with `guard` bytes
    after the image that must stay untouched."""
    from pipelines.ffcv_cropdecode import crop_decode_functions

    resize = crop_decode_functions()[1]
    h, w = img.shape[:2]
    out = np.full(out_h * out_w * 3 + guard, 77, dtype=np.uint8)
    status = resize(img.ctypes.data, h, w, w * 3, 0, h, 0, w, out.ctypes.data, out_h, out_w, 1, int(flip))
    assert status == 0
    assert (out[out_h * out_w * 3 :] == 77).all(), "the resize wrote past the image"
    return out[: out_h * out_w * 3].reshape(out_h, out_w, 3)


def test_linear_resize_is_cv2s_to_one_level_the_same_on_every_cpu_and_writes_nothing_past_the_image():
    """Our bilinear resize (pipelines/_cropdecode.cpp, resize_linear): within one level of OpenCV's
    INTER_LINEAR for up- and downscales of every small width (the AVX2 steps and their scalar
    tails), its AVX2 and scalar paths byte for byte equal (the same bytes on any CPU), the flip an
    exact mirror, a same-size resize the identity, and no byte written past the output."""
    import cv2

    from pipelines.ffcv_cropdecode import test_switches

    force_scalar = test_switches()[1]
    rng = np.random.default_rng(0)
    shapes = [((1, 1), (5, 7)), ((2, 3), (1, 1)), ((7, 9), (16, 17)), ((150, 150), (224, 224)), ((300, 201), (224, 224))]
    shapes += [((int(rng.integers(1, 90)), int(rng.integers(1, 90))), (int(rng.integers(1, 70)), int(rng.integers(1, 70))))
               for _ in range(40)]
    for (h, w), (oh, ow) in shapes:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        plain = _resize(img, oh, ow, False)
        ref = cv2.resize(img, (ow, oh), interpolation=cv2.INTER_LINEAR)
        assert np.abs(plain.astype(int) - ref).max() <= 1, ((h, w), (oh, ow))
        np.testing.assert_array_equal(_resize(img, oh, ow, True), plain[:, ::-1])
        force_scalar(1)
        try:
            np.testing.assert_array_equal(_resize(img, oh, ow, False), plain)
            np.testing.assert_array_equal(_resize(img, oh, ow, True), plain[:, ::-1])
        finally:
            force_scalar(0)
        np.testing.assert_array_equal(_resize(img, h, w, False), img)


@pytest.mark.parametrize("out_w", [1, 2, 3, 41, 224])
def test_flip_mirrors_every_output_width(out_w):
    """The flip writes 4 bytes per 3-byte pixel from a row copy: every width, the odd and the
    one-pixel ones included, comes out as the exact mirror, with nothing written past the row."""
    from pipelines.ffcv_cropdecode import decode_window

    jpeg = encode(textured(120, 160, 2), 2)
    plain = decode_window(jpeg, (120, 160), (5, 7, 100, 130), (9, out_w))
    flipped = decode_window(jpeg, (120, 160), (5, 7, 100, 130), (9, out_w), flip=True)
    np.testing.assert_array_equal(flipped, plain[:, ::-1])


def test_area_interpolation_is_ffcvs_own_resize():
    from ffcv.libffcv import resize_crop

    from pipelines.ffcv_cropdecode import decode_window

    jpeg = encode(textured(150, 200, 2), 2)
    full = full_decode(jpeg, 150, 200, 8)
    for window in ((0, 0, 150, 200), (13, 29, 101, 77), (40, 50, 20, 30)):
        i, j, h, w = window
        ref = np.zeros((24, 24, 3), dtype=np.uint8)
        resize_crop(full, i, i + h, j, j + w, ref)
        np.testing.assert_array_equal(decode_window(jpeg, (150, 200), window, (24, 24), interpolation="area"), ref)


def test_window_decode_rejects_bad_input_with_an_error():
    from pipelines.errors import DataError
    from pipelines.ffcv_cropdecode import decode_window

    jpeg = encode(textured(40, 40, 3), 2)
    with pytest.raises(DataError, match="crop decode failed"):
        decode_window(np.frombuffer(b"not a jpeg at all" * 8, dtype=np.uint8), (40, 40), (0, 0, 40, 40), (8, 8))
    with pytest.raises(DataError, match="crop decode failed"):
        decode_window(jpeg[: len(jpeg) // 3], (40, 40), (0, 0, 40, 40), (8, 8))  # truncated
    with pytest.raises(DataError, match="crop decode failed"):
        decode_window(jpeg, (40, 40), (30, 30, 20, 20), (8, 8))  # window outside the image
    with pytest.raises(DataError, match="crop decode failed"):
        decode_window(jpeg, (41, 40), (0, 0, 40, 40), (8, 8))  # metadata disagrees with the header


def test_the_ceiling_helper_decodes_what_it_times():
    """supmae_decode_ceiling, what `bench loaders` and the doctor put the pipelines beside: mode 1
    is a whole-image decode (the bytes of FFCV's decoder at the same settings), mode 0 writes no
    pixels, and a JPEG that does not decode, or an image larger than the scratch given, is counted
    as failed in both modes instead of timed."""
    import ctypes

    from pipelines.ffcv_cropdecode import decode_ceiling_function, time_decode_ceilings

    decode = decode_ceiling_function()
    shapes = [(37, 53, 2), (64, 48, 1), (40, 40, 0), (33, 70, None)]
    jpegs = [encode(textured(h, w, k), sub, restart=k % 2 == 1) for k, (h, w, sub) in enumerate(shapes)]

    def run(blobs: list[np.ndarray], mode: int, scratch: np.ndarray) -> int:
        addresses = np.array([b.ctypes.data for b in blobs], dtype=np.uint64)
        sizes = np.array([b.size for b in blobs], dtype=np.uint64)
        return decode(addresses.ctypes.data, sizes.ctypes.data, len(blobs), mode,
                      scratch.ctypes.data_as(ctypes.c_void_p), scratch.size)

    for jpeg, (h, w, sub) in zip(jpegs, shapes):
        scratch = np.full(h * w * 3, 7, dtype=np.uint8)
        assert run([jpeg], 0, scratch) == 0 and (scratch == 7).all()  # entropy decoding only
        assert run([jpeg], 1, scratch) == 0
        np.testing.assert_array_equal(scratch.reshape(h, w, 3), full_decode(jpeg, h, w, 8))
        assert run([jpeg], 1, scratch[:-1]) == 1  # one byte short of the image: failed, nothing written past
    bad = np.frombuffer(b"not a jpeg at all" * 8, dtype=np.uint8)
    truncated = jpegs[0][: len(jpegs[0]) // 3]
    scratch = np.zeros(70 * 70 * 3, dtype=np.uint8)
    for mode in (0, 1):
        assert run([jpegs[0], bad, jpegs[1], truncated], mode, scratch) == 2
    rates = time_decode_ceilings(jpegs, passes=2)
    assert set(rates) == {"entropy_floor", "full_c_decode"} and all(r > 0 for r in rates.values())
    with pytest.raises(ValueError, match="1 of 5 JPEGs do not decode"):
        time_decode_ceilings([*jpegs, bad], passes=1, warmup=False)


def test_unbuilt_decoder_is_a_clear_error(monkeypatch):
    from pipelines import ffcv_cropdecode
    from pipelines.errors import DataError

    ffcv_cropdecode.crop_decode_functions.cache_clear()
    monkeypatch.setattr(ffcv_cropdecode, "CROP_DECODE_MODULE", "pipelines._no_such_cropdecode")
    try:
        with pytest.raises(DataError, match="pip install -e"):
            ffcv_cropdecode.crop_decode_functions()
    finally:
        ffcv_cropdecode.crop_decode_functions.cache_clear()


# ----------------------------------------------------------------------------------------------
# Through the pipeline


@pytest.fixture(scope="module")
def varied(tmp_path_factory) -> str:
    """A converted dataset of textured JPEGs of varied, non-square sizes, large enough against a
    24 px output that the decoder takes every DCT scale."""
    from PIL import Image

    from tools.convert import convert

    root = tmp_path_factory.mktemp("cropdecode")
    sizes = [(240, 180), (97, 131), (250, 250), (60, 200), (180, 240), (33, 47), (200, 140), (128, 96)]
    for split, per_class in (("train", 6), ("val", 2)):
        for cls in range(2):
            folder = root / "src" / split / f"c{cls}"
            folder.mkdir(parents=True)
            for n in range(per_class):
                height, width = sizes[(n + 3 * cls) % len(sizes)]
                Image.fromarray(textured(height, width, 10 * cls + n)).save(folder / f"{n}.jpg", quality=90)
    out = str(root / "out")
    convert(str(root / "src"), out, formats=("ffcv",), workers=0, progress=False)
    return out


def batches(root: str, split: str, **kw) -> list[torch.Tensor]:
    from pipelines import build_pipeline

    kw.setdefault("num_workers", 1)
    pipe = build_pipeline(
        "ffcv",
        root,
        split=split,
        batch_size=4,
        img_size=24,
        seed=5,
        color_jitter=0.4 if split == "train" else 0.0,
        **kw,
    )
    out = []
    for epoch in (0, 1):
        pipe.set_epoch(epoch)
        out += [images.clone() for images, _ in pipe]
    return out


@pytest.mark.parametrize("crop_decode", [True, False])
def test_the_decode_loop_runs_in_parallel_over_workers(varied, crop_decode):
    """With 2 workers FFCV compiles the decode loop as a numba prange; anything that gives the loop a
    second exit (a `raise` inside it) makes numba run it serially, one core whatever the workers,
    and say so with a NumbaPerformanceWarning."""
    import warnings

    from numba.core.errors import NumbaPerformanceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches(varied, "train", num_workers=2, crop_decode=crop_decode)
    serial = [str(w.message).strip().splitlines()[0] for w in caught if issubclass(w.category, NumbaPerformanceWarning)]
    assert not serial, serial


@pytest.mark.slow
@pytest.mark.parametrize("interpolation", ["linear", "area"])
def test_pipeline_window_decode_equals_whole_image_decode(varied, interpolation):
    for split in ("train", "val"):
        window = batches(varied, split, interpolation=interpolation)
        whole = batches(varied, split, crop_decode=False, interpolation=interpolation)
        assert len(window) == len(whole) > 0
        for a, b in zip(window, whole):
            assert torch.equal(a, b)
    # Not a degenerate comparison: the two interpolations differ.
    if interpolation == "area":
        linear = batches(varied, "train")
        assert any(not torch.equal(a, b) for a, b in zip(linear, batches(varied, "train", interpolation="area")))


def test_pipeline_rejects_an_unknown_interpolation(varied):
    from pipelines import build_pipeline
    from pipelines.errors import DataError

    with pytest.raises(DataError, match="interpolation must be one of linear, area, got 'cubic'"):
        build_pipeline("ffcv", varied, batch_size=4, img_size=24, num_workers=1, interpolation="cubic")


# ----------------------------------------------------------------------------------------------
# The crop window's statistics are RandomResizedCrop's

DRAWS = 20000
SCALE = (0.2, 1.0)
RATIO = (3 / 4, 4 / 3)
# Two-sample KS critical value at alpha = 0.001 for 20,000 + 20,000 draws: 1.95 * sqrt(2 / 20000).
KS_BOUND = 1.95 * math.sqrt(2 / DRAWS)


def ours(height: int, width: int, scale: tuple[float, float] = SCALE) -> tuple[np.ndarray, np.ndarray]:
    """Area fraction and log aspect ratio (log w/h) of the decoder's crop for DRAWS sample indices."""
    from pipelines.ffcv_cropdecode import compiled_kernels

    crop = compiled_kernels()[0]
    lr = (math.log(RATIO[0]), math.log(RATIO[1]))
    wins = np.array([crop(height, width, scale[0], scale[1], lr[0], lr[1], 3, 0, n) for n in range(DRAWS)], dtype=float)
    return wins[:, 2] * wins[:, 3] / (height * width), np.log(wins[:, 3] / wins[:, 2])


def torchvisions(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    img = torch.empty(1, height, width)
    wins = np.array([RandomResizedCrop.get_params(img, list(SCALE), list(RATIO)) for _ in range(DRAWS)], dtype=float)
    return wins[:, 2] * wins[:, 3] / (height * width), np.log(wins[:, 3] / wins[:, 2])


@pytest.mark.slow  # 20,000 torchvision draws per shape
@pytest.mark.parametrize("shape", [(256, 192), (375, 500), (224, 224), (60, 400)])
def test_crop_window_statistics_are_random_resized_crops(shape):
    from scipy.stats import ks_2samp

    area, log_ratio = ours(*shape)
    ref_area, ref_log_ratio = torchvisions(*shape)
    assert ks_2samp(area, ref_area).statistic < KS_BOUND
    assert ks_2samp(log_ratio, ref_log_ratio).statistic < KS_BOUND
    qs = [0.05, 0.25, 0.5, 0.75, 0.95]
    np.testing.assert_allclose(np.quantile(area, qs), np.quantile(ref_area, qs), atol=0.02)
    np.testing.assert_allclose(np.quantile(log_ratio, qs), np.quantile(ref_log_ratio, qs), atol=0.02)
    assert abs(area.mean() - ref_area.mean()) < 0.01 and abs(log_ratio.mean() - ref_log_ratio.mean()) < 0.01
    if max(shape) / min(shape) < 2:  # (60 x 400 mostly falls back to the clamped centre crop)
        # The test can tell a different crop apart: torchvision's default scale (0.08, 1) is far outside the bound.
        other_area, _ = ours(*shape, scale=(0.08, 1.0))
        assert ks_2samp(other_area, ref_area).statistic > 5 * KS_BOUND


def test_uint8_batches_are_pooled_and_keep_their_values(varied):
    """dtype=torch.uint8 on the CPU: the batch leaves FFCV's buffer through a pooled copy made in
    FFCV's thread; a batch the consumer still holds is never rewritten by later batches."""
    from pipelines import build_pipeline

    pipe = build_pipeline("ffcv", varied, batch_size=4, img_size=24, seed=5, num_workers=1, dtype=torch.uint8)
    held = []
    for epoch in (0, 1):
        pipe.set_epoch(epoch)
        for images, _ in pipe:
            assert images.dtype == torch.uint8 and tuple(images.shape) == (4, 3, 24, 24)
            held.append((images, images.clone()))
    assert len({images.data_ptr() for images, _ in held}) >= 2  # several pooled arrays in turn
    for images, copy in held:
        assert torch.equal(images, copy)


def test_uint8_batches_are_decoded_straight_into_the_pooled_arrays(varied, monkeypatch):
    """After an epoch thread's first batch (decoded into FFCV's buffer and copied out), the decoder
    writes each batch into the pooled array it is handed: one copy per epoch, not per batch, and
    the same pixels (flip and colour jitter included) as the float32 path, which decodes into
    FFCV's own buffer and normalises."""
    import ctypes

    from pipelines import build_pipeline
    from pipelines.base import Normalizer

    args = {"batch_size": 2, "img_size": 24, "seed": 5, "num_workers": 1, "color_jitter": 0.4}
    raw = build_pipeline("ffcv", varied, dtype=torch.uint8, **args)
    ref = build_pipeline("ffcv", varied, **args)
    copies = []
    memmove = ctypes.memmove
    monkeypatch.setattr(ctypes, "memmove", lambda dst, src, n: copies.append(n) or memmove(dst, src, n))
    count = 0
    for epoch in (0, 1):
        raw.set_epoch(epoch)
        ref.set_epoch(epoch)
        for (x8, y8), (xf, yf) in zip(raw, ref, strict=True):
            assert torch.equal(y8, yf)
            assert (Normalizer(torch.device("cpu"), torch.float32)(x8) - xf).abs().max() < 1e-5
            count += 1
    assert count == 2 * len(raw) >= 6
    assert copies == [2 * 24 * 24 * 3] * 2  # the first batch of each epoch only


# ----------------------------------------------------------------------------------------------
# A worker that dies is an error, not a hang


def corrupt_copy(root: str, dest: str, sample: int) -> str:
    """A copy of the converted dataset `root` whose .beton has sample `sample`'s JPEG bytes zeroed
    (FFCV's own index still points at them, so only the decode fails)."""
    import shutil

    from ffcv.reader import Reader

    from pipelines.constants import beton_path

    shutil.copytree(root, dest)
    fname = beton_path(dest, "train")
    field = Reader(fname).metadata[sample]["f0"]  # the image, the first field
    assert field["mode"] == 0  # stored as JPEG: libjpeg rejects the zeroed bytes
    with open(fname, "r+b") as f:
        f.seek(int(field["data_ptr"]))
        f.write(b"\0" * 64)
    return dest


@pytest.mark.timeout(60)  # FFCV's consumer waited on its queue forever before
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_a_failing_decode_in_ffcvs_worker_thread_is_an_error_not_a_hang(varied, tmp_path, dtype):
    import time

    from pipelines import build_pipeline
    from pipelines.errors import DataError

    root = corrupt_copy(varied, str(tmp_path / "corrupt"), sample=3)
    pipe = build_pipeline("ffcv", root, batch_size=4, img_size=24, seed=5, num_workers=1, dtype=dtype)
    for _ in range(2):  # and again: the dead thread leaves nothing behind that hangs the next epoch
        pipe.set_epoch(0)
        start = time.monotonic()
        with pytest.raises(DataError, match="sample 3 of split 'train' is damaged") as info:
            for _ in pipe:
                pass
        assert time.monotonic() - start < 10
        died = info.value.__cause__
        assert "ffcv worker thread died" in str(died) and isinstance(died.__cause__, ValueError)  # chained
