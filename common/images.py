"""Image decoding, mode conversion and the evaluation transform, with PIL and NumPy only.

Every stage converts images the same way: this module is the single definition. Training's
evaluation transform *is* `preprocess`, and the runtime's faster paths are tested against it.
"""
from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .description import Preprocessing

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                    ".ppm", ".pgm", ".pbm", ".pnm")

# Truncated files must fail loudly (and be reported), not decode as half-grey images.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(ValueError):
    """An input could not be turned into an image; the message names the input and the cause."""


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
                raise ImageDecodeError(f"{src}: file not found")
            with open(src, "rb") as f:
                data = f.read()
            img = Image.open(io.BytesIO(data))
        elif isinstance(src, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(src)))
        elif hasattr(src, "read"):
            img = Image.open(io.BytesIO(src.read()))
        else:
            raise ImageDecodeError(
                f"{_describe(src)}: unsupported input type; give a path, bytes, a PIL image "
                "or an HxW / HxWxC uint8 array")
        img.load()
        img = ImageOps.exif_transpose(img) if not isinstance(src, np.ndarray) else img
        return to_rgb(img, background)
    except ImageDecodeError:
        raise
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        raise ImageDecodeError(f"{_describe(src)}: cannot decode image ({type(e).__name__}: {e})") from e


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageDecodeError(f"{_describe(arr)}: expected HxW or HxWxC with C in 1, 3, 4")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and float(np.nanmax(arr)) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.nan_to_num(arr.astype(np.float64)), 0, 255).round().astype(np.uint8)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[arr.shape[2]]
    return Image.fromarray(np.ascontiguousarray(arr if mode != "L" else arr[:, :, 0]), mode)


def resize_and_crop(img: Image.Image, pre: Preprocessing) -> Image.Image:
    """Resize the shorter side to `resize_size` (aspect kept), then centre-crop `input_size`."""
    w, h = img.size
    short = min(w, h)
    target = pre.resize_size
    if short != target:
        if w <= h:
            nw, nh = target, max(1, int(round(h * target / w)))
        else:
            nw, nh = max(1, int(round(w * target / h))), target
        resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                    "nearest": Image.NEAREST}[pre.interpolation]
        img = img.resize((nw, nh), resample)
        w, h = nw, nh
    s = pre.input_size
    if (w, h) != (s, s):
        if w < s or h < s:  # resize_size < input_size: pad symmetrically with the background
            canvas = Image.new("RGB", (max(w, s), max(h, s)), tuple(pre.background))
            canvas.paste(img, ((canvas.width - w) // 2, (canvas.height - h) // 2))
            img, w, h = canvas, canvas.width, canvas.height
        left, top = int(round((w - s) / 2.0)), int(round((h - s) / 2.0))
        img = img.crop((left, top, left + s, top + s))
    return img


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
