"""Read one source file and turn it into the JPEG bytes every output format stores.

The rules (each one is a decision the converter documents, see `tools/convert.py`):

- The file is read once, and its format is found from its content, never from its name: a PNG,
  GIF, TIFF, WebP or BMP named `.JPEG` is converted like any image.
- Colour: everything becomes 8-bit RGB. Grayscale, bilevel, palette, CMYK and YCbCr go through
  Pillow's `convert("RGB")`; 16-bit and 32-bit grayscale are scaled to 8 bits (`>> 8`);
  any alpha channel (RGBA, LA, PA, palette or colour-key transparency) is composited on a white
  background, so transparent areas come out white rather than as whatever colour the hidden
  pixels happened to hold. Embedded ICC profiles and EXIF orientation are ignored, as the
  torchvision `ImageFolder` loader ignores them. Animated/multi-page files give their first frame.
- Size: the longer side is brought down to at most `max_res`, never up. A JPEG is first decoded
  at a reduced DCT scale (Pillow's `draft`, 1/2, 1/4 or 1/8) no smaller than the target size,
  then resized exactly to the target with area averaging (antialiased).
- Output: baseline JPEG at `quality`, 4:2:0 chroma subsampling, no metadata, a restart marker
  after every MCU row (16 pixel rows): the ffcv pipeline's crop decoder then starts decoding at the
  crop window's first row instead of entropy-decoding every row above it (pipelines/_cropdecode.cpp,
  `cut_rows`); it costs 2-3 bytes a row (0.1% of a 256 px image) and every JPEG decoder reads it.
  The same Pillow build with the same settings gives the same bytes, which the resumable converter
  relies on.
- Bad input raises `SkipImage(code, detail)`; the codes are the first column of the reasons
  in `skipped.tsv`: `empty`, `not-an-image`, `truncated`, `corrupt`, `too-many-pixels`,
  `unsupported-mode`, `broken-symlink`, `not-a-regular-file`, `unreadable`.
  A truncated JPEG is skipped (Pillow could fill the missing part with grey under
  `LOAD_TRUNCATED_IMAGES`, but a half-grey image is a silently wrong sample).
  A JPEG whose entropy-coded data is damaged but which libjpeg still decodes to the end is
  converted, exactly as torchvision would load it: the decoder gives no signal to tell it apart.
"""

from __future__ import annotations

import functools
import io
import os
import stat
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from tools.files import is_resource_error

# Pillow's own decompression-bomb limit; ours is applied to every format before any pixel is decoded.
DEFAULT_MAX_PIXELS = 89_478_485
JPEG_SUBSAMPLING = "4:2:0"
JPEG_RESTART_ROWS = 1  # a restart marker after every MCU row (see the module docstring)
# Downscale filter applied after the reduced-scale JPEG decode: area averaging (Pillow's BOX),
# the antialiasing rule FFCV's own writer uses (OpenCV INTER_AREA). After `draft` the remaining
# factor is below 2, where it is as sharp as bicubic, and it costs half as much here.
RESAMPLE = Image.Resampling.BOX
RESAMPLE_NAME = "box (area average)"
ALPHA_BACKGROUND = (255, 255, 255)

# Magic numbers of the formats Pillow reads: a file starting with one of them that Pillow cannot
# parse is a damaged image ("corrupt"), anything else is "not-an-image".
_IMAGE_MAGIC = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"II*\x00",  # TIFF little-endian
    b"MM\x00*",  # TIFF big-endian
    b"BM",
)


class SkipImage(Exception):
    """This input is not converted; `code` is a stable reason name, `detail` says what happened."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Encoded:
    jpeg: bytes
    width: int
    height: int
    source_bytes: int


def target_size(width: int, height: int, max_res: int) -> tuple[int, int]:
    """(w, h) with the longer side at most `max_res`, aspect ratio kept, never upscaled."""
    longer = max(width, height)
    if longer <= max_res:
        return width, height
    scale = max_res / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


def _looks_like_image(data: bytes) -> bool:
    if data.startswith(_IMAGE_MAGIC):
        return True
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if mode.startswith("I;16") or mode == "I":
        wide = np.asarray(img).astype(np.int64)  # [H, W]
        return Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        return Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L").convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise SkipImage("unsupported-mode", f"cannot convert mode {mode} to RGB: {exc}") from exc


@functools.cache
def restart_markers_written() -> bool:
    """Whether this Pillow writes the restart markers asked for (its `restart_marker_rows` save
    option; an older Pillow ignores the option and writes none: the files still decode everywhere,
    and the ffcv pipeline skips rows instead of cutting at them). What the manifest records."""
    out = io.BytesIO()
    Image.new("RGB", (16, 32)).save(out, format="JPEG", restart_marker_rows=JPEG_RESTART_ROWS)
    return b"\xff\xdd" in out.getvalue()


def encode_bytes(data: bytes, max_res: int, quality: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Encoded:
    """Decode `data` (any format Pillow reads), make it RGB, cap its longer side, encode as JPEG."""
    if not data:
        raise SkipImage("empty", "zero-byte file")
    # Our own pixel limit replaces Pillow's global one for the duration of the open (Pillow would
    # refuse only above twice its limit and merely warn below that).
    previous_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                img = Image.open(io.BytesIO(data))
            except MemoryError:
                raise  # this machine is short of memory: the run fails (resumable), no image is skipped
            except UnidentifiedImageError as exc:
                if _looks_like_image(data):
                    raise SkipImage("corrupt", "image header cannot be parsed") from exc
                raise SkipImage("not-an-image", "content is not an image format Pillow reads") from exc
            except Exception as exc:  # Pillow's plugins raise many types on malformed headers
                if is_resource_error(exc):
                    raise
                raise SkipImage("corrupt", _describe(exc)) from exc
            width, height = img.size
            if width * height > max_pixels:
                raise SkipImage("too-many-pixels", f"{width}x{height} = {width * height} pixels > limit {max_pixels}")
            if width < 1 or height < 1:
                raise SkipImage("corrupt", f"image size {width}x{height}")
            target = target_size(width, height, max_res)
            if target != (width, height):
                # JPEG only: libjpeg decodes at 1/2, 1/4 or 1/8 scale, never below `target`.
                img.draft("RGB", target)
            try:
                img.load()
            except MemoryError:
                raise  # as above: a failure of the run, not of this image (the pixel limit was checked)
            except Exception as exc:  # as above: a damaged stream can fail anywhere in a plugin
                if is_resource_error(exc):
                    raise
                message = _describe(exc)
                if isinstance(exc, OSError) and "truncated" in message.lower():
                    raise SkipImage("truncated", message) from exc
                raise SkipImage("corrupt", message) from exc
            rgb = _to_rgb(img)
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit
    if rgb.size != target:
        rgb = rgb.resize(target, RESAMPLE)
    out = io.BytesIO()
    rgb.save(
        out,
        format="JPEG",
        quality=quality,
        subsampling=JPEG_SUBSAMPLING,
        optimize=False,
        progressive=False,
        restart_marker_rows=JPEG_RESTART_ROWS,
    )
    return Encoded(out.getvalue(), rgb.size[0], rgb.size[1], len(data))


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())  # one line: the reason goes into a TSV cell
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_source(path: str) -> bytes:
    """The bytes of one input file; anything that is not a readable regular file raises SkipImage."""
    try:
        st = os.stat(path)  # follows symlinks
    except FileNotFoundError as exc:
        if os.path.islink(path):
            raise SkipImage("broken-symlink", f"points to missing {os.readlink(path)!r}") from exc
        raise SkipImage("unreadable", "file vanished after the directory was listed") from exc
    except OSError as exc:
        if is_resource_error(exc):
            raise
        raise SkipImage("unreadable", exc.strerror or str(exc)) from exc
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "fifo"
            if stat.S_ISFIFO(st.st_mode)
            else "socket"
            if stat.S_ISSOCK(st.st_mode)
            else "device"
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "directory"
            if stat.S_ISDIR(st.st_mode)
            else "special file"
        )
        # Opening a FIFO would block forever; nothing but regular files is read.
        raise SkipImage("not-a-regular-file", kind)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        if is_resource_error(exc):
            raise
        raise SkipImage("unreadable", exc.strerror or str(exc)) from exc


def encode_file(path: str, max_res: int, quality: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Encoded:
    """`read_source` then `encode_bytes`."""
    return encode_bytes(read_source(path), max_res, quality, max_pixels)
