"""Image decoding, mode conversion and the evaluation transform, with PIL and NumPy only.

Every stage converts images the same way: this module is the single definition. Training's
evaluation transform *is* `preprocess`, and the runtime's faster paths are tested against it.
"""
from __future__ import annotations

import io
import os
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .description import Preprocessing
from .errors import ItemError, UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                    ".ppm", ".pgm", ".pbm", ".pnm")

# Truncated files must fail loudly (and be reported), not decode as half-grey images.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Images above this many pixels are refused before their pixels are decoded: a 166 KB PNG can
# hold 12000x12000 pixels (430 MB decoded). 100 MP is well above any camera photo.
MAX_PIXELS = 100_000_000
MAX_PIXELS_ENV = "UNIREP_MAX_PIXELS"
# Up to this many times the crop's area the whole image is resized then cropped (the exact
# reference, unchanged); beyond it only the crop window is resampled, so memory stays bounded
# for extreme shapes (a 1x20000 image resized whole at 224 px would need 3 GB).
WHOLE_RESIZE_FACTOR = 16
# Arrays are taken as 8-bit (uint8) or 16-bit (uint16, scaled like 16-bit files): any other
# dtype has no unambiguous meaning as pixels (is a float 0..1 or 0..255?), so it is refused.
ARRAY_DTYPES = ("uint8", "uint16")

# Our own limit (checked on the header) decides; PIL's bomb warning would only repeat it.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


class ImageDecodeError(ItemError, ValueError):
    """An input could not be turned into an image; the message names the input and the cause.

    `ImageDecodeError(name, reason)` carries the input's name as its item id;
    `ImageDecodeError(message)` is one whose message already says everything (a setting, or an
    input with no name), kept as given."""

    def __init__(self, item_or_message: str, reason: str | None = None):
        if reason is not None:
            super().__init__(item_or_message, reason)
            return
        UserError.__init__(self, item_or_message)
        self.item_id, self.reason = "", str(item_or_message)

    def __reduce__(self):
        return (type(self), (self.reason,)) if not self.item_id else super().__reduce__()


def max_pixels() -> int:
    """The pixel limit: $UNIREP_MAX_PIXELS when set (a positive integer), else MAX_PIXELS."""
    raw = os.environ.get(MAX_PIXELS_ENV)
    if raw is None or not raw.strip():
        return MAX_PIXELS
    try:
        value = int(float(raw))
    except ValueError:
        value = 0
    if value <= 0:
        raise ImageDecodeError(f"{MAX_PIXELS_ENV}={raw!r}: expected a positive number of pixels, "
                               f"e.g. {MAX_PIXELS_ENV}={MAX_PIXELS}")
    return value


def apply_pixel_limit() -> int:
    """Set PIL's decompression-bomb limit (checked when a file is opened; PIL raises at twice it)
    to ours, so both follow $UNIREP_MAX_PIXELS; returns the limit."""
    limit = max_pixels()
    Image.MAX_IMAGE_PIXELS = limit
    return limit


def check_pixels(size: tuple[int, int], name: str) -> None:
    """Refuse an image of `size` (width, height) above the pixel limit, naming the limit and
    how to raise it. Called on the header, before any pixel is decoded."""
    limit = apply_pixel_limit()
    w, h = int(size[0]), int(size[1])
    if w * h > limit:
        raise ImageDecodeError(
            f"{name}: {w}x{h} = {w * h:,} pixels is above the limit of {limit:,} pixels; "
            f"set {MAX_PIXELS_ENV} to a larger number to accept it")


def bomb_error(name: str, e: Exception) -> ImageDecodeError:
    """PIL's DecompressionBombError worded as our pixel-limit error."""
    return ImageDecodeError(
        f"{name}: image is above the limit of {max_pixels():,} pixels ({e}); "
        f"set {MAX_PIXELS_ENV} to a larger number to accept it")


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _describe(src: Any) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    if isinstance(src, np.ndarray):
        return f"<array {src.shape} {src.dtype}>"
    return f"<{type(src).__name__}>"


def to_rgb(img: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB the same way everywhere.

    Alpha (RGBA, LA, PA, palette transparency) is composited over `background`; 16/32-bit grey is
    scaled to 8 bits by its bit depth (not clipped); CMYK and YCbCr go through PIL's converters.
    """
    background = tuple(int(c) for c in background)
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    elif mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F" and not np.isfinite(arr).all():
            raise ImageDecodeError("32-bit float image contains NaN or infinite values")
        if mode == "F":
            scale = 255.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 1.0
        elif mode == "I" and arr.size and float(arr.max()) <= 255:
            scale = 1.0
        else:
            scale = 255.0 / 65535.0
        arr = np.clip(np.nan_to_num(arr * scale), 0, 255).round().astype(np.uint8)
        img = Image.fromarray(arr, "L")
        mode = "L"
    elif mode == "1":
        img = img.convert("L")
        mode = "L"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img.convert("RGB")


def open_image(src: Any, background=(255, 255, 255)) -> Image.Image:
    """Turn a path, bytes, file object, PIL image or HWC/HW uint8 array into an RGB PIL image.

    Raises ImageDecodeError naming the input when it cannot be used.
    """
    try:
        if isinstance(src, Image.Image):
            img = src
        elif isinstance(src, np.ndarray):
            img = _array_to_pil(src)
        elif isinstance(src, (str, os.PathLike)):
            if not os.path.exists(src):
                raise ImageDecodeError(str(src), "file not found")
            with open(src, "rb") as f:
                data = f.read()
            apply_pixel_limit()
            img = Image.open(io.BytesIO(data))
        elif isinstance(src, (bytes, bytearray, memoryview)):
            apply_pixel_limit()
            img = Image.open(io.BytesIO(bytes(src)))
        elif hasattr(src, "read"):
            apply_pixel_limit()
            img = Image.open(io.BytesIO(src.read()))
        else:
            raise ImageDecodeError(
                _describe(src), "unsupported input type; give a path, bytes, a PIL image "
                "or an HxW / HxWxC uint8 or uint16 array")
        check_pixels(img.size, _describe(src))  # on the header: nothing decoded yet
        img.load()
        img = ImageOps.exif_transpose(img) if not isinstance(src, np.ndarray) else img
        return to_rgb(img, background)
    except ImageDecodeError as e:
        if str(e).startswith(("<", _describe(src))):
            raise
        raise ImageDecodeError(_describe(src), str(e)) from e
    except Image.DecompressionBombError as e:  # PIL's own check, at twice our limit
        raise bomb_error(_describe(src), e) from e
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        raise ImageDecodeError(_describe(src),
                               f"cannot decode image ({type(e).__name__}: {e})") from e


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    name = _describe(arr)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageDecodeError(name, "expected HxW or HxWxC with C in 1, 3, 4")
    if arr.dtype == np.uint16:  # like a 16-bit file: scaled by the bit depth, never clipped
        arr = (arr.astype(np.float64) * (255.0 / 65535.0)).round().astype(np.uint8)
    elif arr.dtype != np.uint8:
        hint = (" (for floats in [0, 1]: (x * 255).round().astype(np.uint8))"
                if np.issubdtype(arr.dtype, np.floating) else "")
        raise ImageDecodeError(
            name, f"arrays must be {' or '.join(ARRAY_DTYPES)}, not {arr.dtype}; "
            f"convert the array first{hint}")
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[arr.shape[2]]
    return Image.fromarray(np.ascontiguousarray(arr if mode != "L" else arr[:, :, 0]), mode)


_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST}


def resized_size(width: int, height: int, resize_size: int, rounding: str = "round"
                 ) -> tuple[int, int]:
    """Size after 'resize the shorter side to resize_size, aspect kept' (Preprocessing.resized)."""
    return Preprocessing(resize_size=resize_size, resize_rounding=rounding).resized(width, height)


def resize_and_crop(img: Image.Image, pre: Preprocessing) -> Image.Image:
    """Resize the shorter side to `resize_size` (aspect kept), then centre-crop `input_size`
    (padding with the background where the resized image is smaller than the crop).

    Memory stays bounded by the input and the crop: when the resized image would be more than
    WHOLE_RESIZE_FACTOR times the crop's area, only the crop window is resampled (PIL's `box`;
    the same sample positions and filter, within one grey level of rounding). Below that the
    whole image is resized then cropped, exactly as always."""
    nw, nh = pre.resized(img.width, img.height)
    s = pre.input_size
    if nw * nh > WHOLE_RESIZE_FACTOR * s * s:
        return resize_crop_window(img, (nw, nh), pre)
    w, h = img.size
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), _RESAMPLE[pre.interpolation])
        w, h = nw, nh
    if (w, h) != (s, s):
        if w < s or h < s:  # resize_size < input_size: pad symmetrically with the background
            canvas = Image.new("RGB", (max(w, s), max(h, s)), tuple(pre.background))
            canvas.paste(img, ((canvas.width - w) // 2, (canvas.height - h) // 2))
            img, w, h = canvas, canvas.width, canvas.height
        left, top = int(round((w - s) / 2.0)), int(round((h - s) / 2.0))
        img = img.crop((left, top, left + s, top + s))
    return img


def _window(n: int, s: int) -> tuple[int, int, int]:
    """Along one axis of resized length n and crop s: (start, stop) in resized coordinates and
    the offset in the crop where they land (the reference's pad-then-crop geometry)."""
    if n < s:
        return 0, n, (s - n) // 2
    start = int(round((n - s) / 2.0))
    return start, start + s, 0


def resize_crop_window(img: Image.Image, resized: tuple[int, int], pre: Preprocessing
                       ) -> Image.Image:
    """The crop of `img` resized to `resized`, resampling only the crop window. `img` may be a
    pre-shrunk version of the image (e.g. a JPEG decoded at 1/2 scale): sample positions are
    scaled from `resized` to its size."""
    nw, nh = resized
    s = pre.input_size
    x0, x1, ox = _window(nw, s)
    y0, y1, oy = _window(nh, s)
    sx, sy = img.width / nw, img.height / nh
    part = img.resize((x1 - x0, y1 - y0), _RESAMPLE[pre.interpolation],
                      box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy))
    if part.size == (s, s):
        return part
    canvas = Image.new("RGB", (s, s), tuple(pre.background))
    canvas.paste(part, (ox, oy))
    return canvas


def normalize(hwc_uint8: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """HxWx3 uint8 -> 3xHxW float32, scaled to [0,1] then standardised."""
    x = hwc_uint8.astype(np.float32) * np.float32(1.0 / 255.0)
    x -= np.asarray(pre.mean, np.float32)
    x /= np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess(src: Any, pre: Preprocessing) -> np.ndarray:
    """The reference evaluation transform: any input -> 3xSxS float32 ready for the network."""
    img = open_image(src, pre.background)
    img = resize_and_crop(img, pre)
    return normalize(np.asarray(img, dtype=np.uint8), pre)
