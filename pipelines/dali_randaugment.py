"""timm's RandAugment policy as DALI graph operators (runs on the GPU, and on the CPU with `device_id=None`).

    rand_augment(images, parse_policy("rand-m9-mstd0.5-inc1"), img_size)

`parse_policy` reads a timm policy string; `rand_augment` draws, per sample, `n` layers of (op,
fires?, magnitude, sign) with DALI's random operators and applies each layer with
`nvidia.dali.auto_aug.core.select` (a conditional split of the batch, so the pipeline must be
defined with `enable_conditionals=True`). The ops are DALI's `auto_aug.augmentations` with their
magnitude tables rebuilt from timm's level functions, so "magnitude 9" means what it means in timm.

Policy string (timm's `rand_augment_transform` grammar): `rand` then dash-separated sections:
  `m<int>`   magnitude on timm's 0..10 scale (default 10)
  `n<int>`   layers per image (default 2)
  `mstd<f>`  magnitude noise: per layer, gauss(m, mstd); above 100 means uniform(0, m) (default 0)
  `mmax<int>` upper clip of the drawn magnitude (default 10)
  `p<f>`     probability that a layer applies its op (default 0.5)
  `inc<0|1>` timm's "increasing" op set (strength grows with the magnitude; default 0)
timm's `t<name>` (weighted or named transform sets) is refused; so is any section timm would skip
or reject, and magnitudes that would not fit DALI's tables.

What matches timm (`timm.data.auto_augment`, as `create_transform` builds it for the torchvision
pipeline): the 15 ops of `_RAND_TRANSFORMS` / `_RAND_INCREASING_TRANSFORMS` (AutoContrast,
Equalize, Invert, Rotate, Posterize[Increasing], Solarize[Increasing], SolarizeAdd,
Color/Contrast/Brightness/Sharpness[Increasing], ShearX, ShearY, TranslateXRel, TranslateYRel);
ops drawn uniformly with replacement, `n` per image; each layer applied with probability `p`;
the magnitude drawn per layer (gauss or uniform), clipped to [0, mmax]; a random sign per layer
for rotate, shear, translate and the increasing enhance ops; the level functions (rotate 30 deg,
shear 0.3, translate 0.45 of the side, enhance 1 +- 0.9 m/10 floored at 0.1 or 0.1 + 1.8 m/10,
posterize bits 4 - int(4 m/10) or int(4 m/10) including 0 bits = black, solarize threshold
256 - int(256 m/10) or int(256 m/10), solarize-add int(110 m/10) below 128). RandAugment runs after
the crop, resize and flip and before normalisation, as in timm's transform.

Differences from timm (all of them we know of):
  - Magnitudes are quantised to steps of 0.01 (DALI looks parameters up in a per-bin table);
    timm uses the float draw. With mstd 0.5 the quantisation is 1/50 of a standard deviation.
  - Geometric ops (rotate, shear, translate) interpolate bilinearly (DALI's warp ops have linear
    and nearest only); timm's pipeline here uses bicubic. They fill with one grey level, 115 (the
    mean of timm's fill colour (124, 116, 104) = ImageNet mean): DALI's fill value is a scalar.
  - Color: DALI's `saturation` (HSV) instead of PIL's blend with the luma grey image; same factor.
  - Equalize: DALI's (OpenCV) histogram equalisation; PIL's lookup table rounds differently.
  - Sharpness: PIL's smoothing kernel, but DALI filters the 1-pixel border too (PIL keeps it).
  - Contrast: the luma mean is not rounded to an integer as PIL's histogram mean is.
  - Random numbers: DALI's per-sample generators, not Python's `random`; same distributions.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.constants import IMAGENET_MEAN
from pipelines.errors import DataError

LEVEL_DENOM = 10.0  # timm's magnitude scale: m / 10 is the fraction of an op's full range
BINS_PER_UNIT = 100  # magnitude resolution of DALI's parameter tables (0.01)
TRANSLATE_PCT = 0.45  # timm's default `translate_pct`
# One grey for the warp fill: the mean of timm's fill colour, round(255 * ImageNet mean) per channel.
FILL_VALUE = int(np.rint(np.mean([round(255 * m) for m in IMAGENET_MEAN])))
MAX_MMAX = 100  # keeps the per-op parameter tables small; timm's clip is 10 unless `mmax` says more

OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip
OPS_INCREASING = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)  # fmt: skip
SKIP = "Skip"  # the identity a layer applies when its coin says no (index len(ops))


@dataclass(frozen=True)
class RandAugmentPolicy:
    """A parsed timm RandAugment string."""

    spec: str
    n: int = 2
    m: int = 10
    mstd: float = 0.0  # math.inf: uniform(0, m)
    mmax: int = 10
    p: float = 0.5
    increasing: bool = False

    @property
    def ops(self) -> tuple[str, ...]:
        return OPS_INCREASING if self.increasing else OPS

    @property
    def num_bins(self) -> int:
        return self.mmax * BINS_PER_UNIT + 1

    def describe(self) -> str:
        mstd = "uniform(0, m)" if math.isinf(self.mstd) else f"{self.mstd:g}"
        return (
            f"RandAugment {self.spec} (dali: n={self.n}, m={self.m}, mstd={mstd}, mmax={self.mmax}, p={self.p:g}, "
            f"{'increasing' if self.increasing else 'standard'} ops)"
        )


def parse_policy(spec: str) -> RandAugmentPolicy:
    """`rand-m9-mstd0.5-inc1` -> RandAugmentPolicy; DataError (one line, naming the section) otherwise."""

    def bad(why: str) -> DataError:
        return DataError(f"not a RandAugment spec the dali pipeline runs: {spec!r} ({why})")

    if not isinstance(spec, str) or not spec:
        raise bad("expected a string like 'rand-m9-mstd0.5-inc1'")
    sections = spec.split("-")
    if sections[0] != "rand":
        raise bad("it must start with 'rand'; timm's AutoAugment / AugMix policies are not implemented")
    values: dict[str, Any] = {}
    for section in sections[1:]:
        if section.startswith("t"):
            raise bad(f"section {section!r}: weighted or named transform sets are not implemented")
        match = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(\d[\d.]*)", section)
        if not match:
            raise bad(f"unknown section {section!r}; known: m<int>, n<int>, mstd<float>, mmax<int>, p<float>, inc<0|1>")
        key, text = match.groups()
        if key in values:
            raise bad(f"section {key!r} given twice")
        try:
            if key in ("m", "n", "mmax", "inc"):
                values[key] = int(text)  # timm reads these with int()
            else:
                values[key] = float(text)
        except ValueError:
            raise bad(f"section {section!r}: {text!r} is not a number of the right kind") from None
    n = values.get("n", 2)
    m = values.get("m", int(LEVEL_DENOM))
    mstd = values.get("mstd", 0.0)
    if mstd > 100:
        mstd = math.inf  # timm: uniform sampling in [0, m]
    mmax = values.get("mmax", int(LEVEL_DENOM))
    p = values.get("p", 0.5)
    inc = values.get("inc", 0)
    if n < 1:
        raise bad("n must be >= 1 (turn RandAugment off with an empty spec instead)")
    if not 0.0 <= p <= 1.0:
        raise bad(f"p must be in [0, 1], got {p:g}")
    if inc not in (0, 1):
        raise bad(f"inc must be 0 or 1, got {inc}")
    if not 1 <= mmax <= MAX_MMAX:
        raise bad(f"mmax must be in [1, {MAX_MMAX}], got {mmax}")
    return RandAugmentPolicy(spec=spec, n=n, m=m, mstd=mstd, mmax=mmax, p=p, increasing=bool(inc))


# ----------------------------------------------------------------------------------------------
# timm's level functions on a magnitude array (one entry per DALI bin). Unsigned: the sign of the
# ops timm negates at random is applied by DALI (`randomly_negate`) from the layer's sign draw.


def _floor(x: np.ndarray) -> np.ndarray:
    # timm's int() of a float product; the epsilon keeps exact grid points (m = 2.5: 1.0) from
    # landing just below an integer through binary rounding of k / 100.
    return np.floor(x + 1e-9).astype(np.int64)


def levels(name: str, magnitudes: np.ndarray, img_size: int) -> np.ndarray | None:
    """timm's op argument (before random negation) for each magnitude; None for ops without one."""
    frac = magnitudes / LEVEL_DENOM
    if name in ("AutoContrast", "Equalize", "Invert"):
        return None
    if name == "Rotate":
        return frac * 30.0  # degrees
    if name in ("ShearX", "ShearY"):
        return frac * 0.3
    if name in ("TranslateXRel", "TranslateYRel"):
        return frac * TRANSLATE_PCT * img_size  # pixels at the output size
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return frac * 1.8 + 0.1  # enhance factor, 1 = unchanged
    if name.endswith("Increasing") and name[: -len("Increasing")] in ("Color", "Contrast", "Brightness", "Sharpness"):
        return frac * 0.9  # distance of the factor from 1, negated at random
    if name == "Posterize":
        return _floor(frac * 4).astype(np.float64)  # bits kept
    if name == "PosterizeIncreasing":
        return 4.0 - _floor(frac * 4)
    if name == "Solarize":
        return np.minimum(256, _floor(frac * 256)).astype(np.float64)  # threshold
    if name == "SolarizeIncreasing":
        return 256.0 - np.minimum(256, _floor(frac * 256))
    if name == "SolarizeAdd":
        return np.minimum(128, _floor(frac * 110)).astype(np.float64)  # added below 128
    raise KeyError(name)


NEGATED = frozenset(
    ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
    + tuple(f"{op}Increasing" for op in ("Color", "Contrast", "Brightness", "Sharpness"))
)


def _no_autograph(func: Callable) -> Callable:
    """DALI's `do_not_convert`: with `enable_conditionals`, DALI rewrites every function the graph
    calls; the table arithmetic below is plain numpy and is many times slower rewritten (a graph
    built in 40 s instead of under one)."""
    try:
        from nvidia.dali.pipeline import do_not_convert
    except ImportError:
        return func
    return do_not_convert(func)


def _enhance_factor(distance: float) -> np.ndarray:
    return np.array(max(0.1, 1.0 + distance), dtype=np.float32)  # timm floors the factor at 0.1


def _posterize_mask(bits: float) -> np.ndarray:
    bits = int(np.rint(bits))
    # PIL keeps the `bits` most significant bits; 0 bits is a black image (timm allows it at m = 10).
    return np.array(255 if bits >= 8 else (0xFF << (8 - bits)) & 0xFF, dtype=np.uint8)


def _shift(amount: float) -> np.ndarray:
    # Pixels below 128 get at most +128: 127 + 128 fits in uint8, so no wrap-around (timm clips at 255).
    return np.array(int(np.rint(amount)), dtype=np.uint8)


def _sharpness_kernel(factor: np.ndarray) -> np.ndarray:
    # PIL's Sharpness: blend(smoothed, image, factor); smoothing kernel [[1 1 1] [1 5 1] [1 1 1]] / 13.
    blur = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13
    ident = np.zeros((3, 3), dtype=np.float32)
    ident[1, 1] = 1
    return (factor * ident + (1 - factor) * blur).astype(np.float32)


def _scalar(value: float) -> np.ndarray:
    return np.array(value, dtype=np.float32)


def _equalize(data: Any, _: Any) -> Any:
    from nvidia.dali import fn

    # DALI's auto_aug still calls the deprecated `fn.experimental` alias (and forces its warning
    # on); the operator itself left the experimental namespace.
    return (fn.equalize if hasattr(fn, "equalize") else fn.experimental.equalize)(data)


def _sharpness(data: Any, kernel: Any) -> Any:
    from nvidia.dali import fn

    return (fn.filter if hasattr(fn, "filter") else fn.experimental.filter)(data, kernel)


# timm name -> (DALI `auto_aug.augmentations` name, level -> DALI op parameter)
_PARAM: dict[str, tuple[str, Callable[[float], np.ndarray] | None]] = {
    "AutoContrast": ("auto_contrast", None),
    "Equalize": ("equalize", None),
    "Invert": ("invert", None),
    "Rotate": ("rotate", _scalar),
    "ShearX": ("shear_x", lambda v: np.array([v, 0], dtype=np.float32)),
    "ShearY": ("shear_y", lambda v: np.array([0, v], dtype=np.float32)),
    "TranslateXRel": ("translate_x_no_shape", lambda v: np.array([v, 0], dtype=np.float32)),
    "TranslateYRel": ("translate_y_no_shape", lambda v: np.array([0, v], dtype=np.float32)),
    "Posterize": ("posterize", _posterize_mask),
    "PosterizeIncreasing": ("posterize", _posterize_mask),
    "Solarize": ("solarize", _scalar),
    "SolarizeIncreasing": ("solarize", _scalar),
    "SolarizeAdd": ("solarize_add", _shift),
    "Color": ("color", _scalar),
    "Contrast": ("contrast", _scalar),
    "Brightness": ("brightness", _scalar),
    "Sharpness": ("sharpness", _sharpness_kernel),
    "ColorIncreasing": ("color", _enhance_factor),
    "ContrastIncreasing": ("contrast", _enhance_factor),
    "BrightnessIncreasing": ("brightness", _enhance_factor),
    "SharpnessIncreasing": ("sharpness", lambda d: _sharpness_kernel(_enhance_factor(d))),
}
_WARPS = frozenset(("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"))


@dataclass(frozen=True, eq=False)
class OpSpec:
    """One op of the policy: DALI's operator function and its parameter per magnitude bin.

    `table` [num_bins * (2 if signed else 1), ...]: for a signed op, row 2b is the parameter at
    +level(bin b) and row 2b + 1 at -level(bin b); None for ops without a parameter."""

    name: str
    fn: Callable[..., Any]
    table: np.ndarray | None
    signed: bool
    param_device: str  # "cpu", or "auto" (where the images are), as DALI declares the op
    warp: bool


@functools.lru_cache(maxsize=16)
@_no_autograph
def op_specs(policy: RandAugmentPolicy, img_size: int) -> tuple[OpSpec, ...]:
    """`policy.ops` in timm's order, then the identity a skipped layer applies. Cached: the
    per-epoch pipeline rebuild reuses the tables."""
    from nvidia.dali.auto_aug import augmentations as a

    mags = np.arange(policy.num_bins, dtype=np.float64) / BINS_PER_UNIT
    specs = []
    for name in policy.ops:
        dali_name, to_param = _PARAM[name]
        aug = getattr(a, dali_name)
        table = None
        signed = name in NEGATED
        if to_param is not None:
            lv = levels(name, mags, img_size)
            values = np.stack([lv, -lv], axis=1).reshape(-1) if signed else lv  # [2 * bins] or [bins]
            table = np.stack([to_param(float(v)) for v in values])
        op = {"equalize": _equalize, "sharpness": _sharpness}.get(dali_name, aug.op)
        specs.append(OpSpec(name, op, table, signed, aug.param_device, name in _WARPS))
    specs.append(OpSpec(SKIP, a.identity.op, None, False, "cpu", False))
    return tuple(specs)


class _Layer:
    """One layer's draws for the ops of `select`: the sample's magnitude bin (an int when fixed)
    and its sign; each op looks its parameter up from them."""

    def __init__(self, bins: Any, sign: Any) -> None:
        self.bins, self.sign = bins, sign

    def apply(self, spec: OpSpec, data: Any) -> Any:
        from nvidia.dali import types

        kwargs = {"fill_value": FILL_VALUE, "interp_type": types.INTERP_LINEAR} if spec.warp else {}
        if spec.table is None:
            return spec.fn(data, None, **kwargs)
        device = (data.device or "cpu") if spec.param_device == "auto" else spec.param_device
        if isinstance(self.bins, int):  # fixed magnitude: the sign picks one of two rows
            if spec.signed:
                param = types.Constant(spec.table[2 * self.bins : 2 * self.bins + 2], device=device)[self.sign]
            else:
                param = types.Constant(spec.table[self.bins], device=device)
        else:
            index = 2 * self.bins + self.sign if spec.signed else self.bins
            param = types.Constant(spec.table, device=device)[index]
        return spec.fn(data, param, **kwargs)


class _Op:
    """A callable for `select` (which calls `ops[i](data, layer=...)`)."""

    def __init__(self, spec: OpSpec) -> None:
        self.spec = spec

    def __call__(self, data: Any, *, layer: _Layer) -> Any:
        return layer.apply(self.spec, data)


def draw_layers(policy: RandAugmentPolicy) -> tuple[Any, Any, Any]:
    """Per sample, per layer: (op index [n], with len(ops) = skipped; magnitude bin [n], or the
    fixed int bin; sign [n], 1 = negate). Drawn before the batch is split between ops."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    n, num_ops = policy.n, len(policy.ops)
    op = fn.random.uniform(values=list(range(num_ops)), shape=(n,), dtype=types.INT32)
    if policy.p < 1.0:
        fires = fn.random.coin_flip(probability=policy.p, shape=(n,), dtype=types.INT32)
        op = fires * op + (1 - fires) * num_ops
    sign = fn.random.coin_flip(probability=0.5, shape=(n,), dtype=types.INT32)
    if policy.mstd == 0:
        return op, int(min(policy.m, policy.mmax) * BINS_PER_UNIT), sign
    if math.isinf(policy.mstd):
        mag = fn.random.uniform(range=[0.0, float(policy.m)], shape=(n,))
    else:
        mag = fn.random.normal(mean=float(policy.m), stddev=float(policy.mstd), shape=(n,))
    # clip to [0, mmax] as timm does, then the nearest bin (DALI's cast rounds to nearest)
    bins = fn.cast(dmath.clamp(mag, 0.0, float(policy.mmax)) * float(BINS_PER_UNIT), dtype=types.INT32)
    return op, bins, sign


def rand_augment(images: Any, policy: RandAugmentPolicy, img_size: int, *, record: bool = False) -> Any:
    """Apply `policy` to uint8 HWC `images` (a DALI DataNode of img_size x img_size samples).

    With `record`, also returns the draws (op index [n], magnitude bin [n] or an int, sign [n]) so
    that a test can count what fired; the pipeline itself does not output them."""
    from nvidia.dali.auto_aug.core import select

    ops = [_Op(spec) for spec in op_specs(policy, img_size)]
    op, bins, sign = draw_layers(policy)
    for k in range(policy.n):
        layer = _Layer(bins if isinstance(bins, int) else bins[k], sign[k])
        images = select(ops, op[k], images, layer=layer)
    if record:
        return images, (op, bins, sign)
    return images
