"""PIL's antialiased resampling, restricted to the centre-crop window, in NumPy.

This is the reference the GPU kernels (runtime.gpu.kernels) mirror line for line, and it is
tested bit-exact against `common.images.resize_and_crop` on the CPU. The host computes, per
image, the filter coefficients Pillow's Resample.c computes for the *whole* resize (same
support scaled by the downscale factor, same normalisation, same 22-bit fixed point), then keeps
only the output columns and rows of the crop window. Pixels of the full resize depend only on
their own column's and row's coefficients, so evaluating the window alone gives exactly the
pixels the reference crops (including the uint8 rounding between the horizontal and the
vertical pass, which Pillow does through an 8-bit temporary image).

A plan (`WindowPlan`) holds, for one image, the horizontal taps (first source column, count,
weights) of each of the S output columns, the vertical taps of each of the S output rows, and
the band of source rows the horizontal pass must produce (`row0`, `rows`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images
_HALF = 1 << (PRECISION_BITS - 1)
_MAX = 1 << (PRECISION_BITS + 8)

# Pillow's filter supports (Resample.c): bilinear is a triangle of radius 1, bicubic a = -0.5.
SUPPORTS = {"bilinear": 1.0, "bicubic": 2.0}


def _filter(kind: str, x: np.ndarray) -> np.ndarray:
    """The filter on float64 values, with Pillow's expressions in its order of operations."""
    x = np.abs(x)
    if kind == "bilinear":
        return np.where(x < 1.0, 1.0 - x, 0.0)
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _c_int(x: np.ndarray) -> np.ndarray:
    """C's (int) cast of a double: truncation towards zero."""
    return np.trunc(x).astype(np.int64)


def coefficients(in_size: int, out_size: int, kind: str) -> tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray]:
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc for resizing in_size -> out_size over
    the whole axis: (first source index [out], tap count [out], int32 weights [out, ksize])."""
    if kind not in SUPPORTS:
        raise ValueError(f"no GPU resampling for interpolation {kind!r}; "
                         f"choose from {', '.join(SUPPORTS)}")
    # Pillow takes the box edges as C floats; 0 and in_size are exact in float32.
    scale = float(np.float32(in_size) - np.float32(0.0)) / out_size
    filterscale = max(scale, 1.0)
    support = SUPPORTS[kind] * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    centre = 0.0 + (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum(_c_int(centre - support + 0.5), 0)
    xmax = np.minimum(_c_int(centre + support + 0.5), in_size) - xmin
    taps = np.arange(ksize, dtype=np.float64)
    w = _filter(kind, (taps[None, :] + xmin[:, None] - centre[:, None] + 0.5) * (1.0 / filterscale))
    w = np.where(taps[None, :] < xmax[:, None], w, 0.0)
    total = _row_sums(w, xmax)
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    fixed = np.where(w < 0, _c_int(-0.5 + w * (1 << PRECISION_BITS)),
                     _c_int(0.5 + w * (1 << PRECISION_BITS)))
    return xmin.astype(np.int32), xmax.astype(np.int32), fixed.astype(np.int32)


def _row_sums(w: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Left-to-right sums, as Pillow's loop adds them (NumPy's pairwise sum may round
    differently in the last bit, which can flip a fixed-point weight)."""
    total = np.zeros(len(w), np.float64)
    for t in range(w.shape[1]):
        total = np.where(t < counts, total + w[:, t], total)
    return total


@dataclass(frozen=True)
class Taps:
    """One filtering pass's taps: for output position p along the filtered axis, source
    indices start[p] .. start[p] + count[p] - 1 with int32 weights weights[p, :count[p]]."""

    start: np.ndarray
    count: np.ndarray
    weights: np.ndarray


@dataclass(frozen=True)
class Pass:
    """One pass over one image: out[r, c] filters the source along `axis` ("x" or "y").

    Along x: out[r, c] = sum_t src[row0 + r, taps.start[c] + t] * w[c, t]
    Along y: out[r, c] = sum_t src[taps.start[r] + t, col0 + c] * w[r, t]
    (rounded to uint8 as Pillow's clip8 does)."""

    axis: str
    rows: int
    cols: int
    row0: int
    col0: int
    taps: Taps


@dataclass(frozen=True)
class WindowPlan:
    """The two passes that turn a decoded image into its SxS crop (see the module docstring)."""

    size: int
    first: Pass             # source image -> temporary band
    second: Pass            # temporary band -> SxS crop
    vertical_first: bool


def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """The reference's 'shorter side to resize' size (common.images.resize_and_crop)."""
    if min(width, height) == resize:
        return width, height
    if width <= height:
        return resize, max(1, int(round(height * resize / width)))
    return max(1, int(round(width * resize / height))), resize


def vertical_first(width: int, height: int, new_height: int) -> bool:
    """Which pass Pillow runs first for this aspect-kept resize.

    Measured on this Pillow (13) against both orders, not read from its source: an image
    reduced in height and at least twice as tall as wide is filtered along y first, every
    other aspect-kept resize along x first (tests/test_gpu.py checks it on real photos)."""
    return new_height < height and height >= 2 * width


def plan_window(width: int, height: int, resize: int, crop: int, kind: str) -> WindowPlan:
    """The plan for an image of width x height, or ValueError when the reference would pad
    (resized image smaller than the crop: that case stays on the CPU)."""
    nw, nh = resized_size(width, height, resize)
    if nw < crop or nh < crop:
        raise ValueError(f"resized image {nw}x{nh} is smaller than the {crop} px crop")
    left, top = int(round((nw - crop) / 2.0)), int(round((nh - crop) / 2.0))
    xs, xn, xk = (a[left:left + crop] for a in coefficients(width, nw, kind))
    ys, yn, yk = (a[top:top + crop] for a in coefficients(height, nh, kind))
    if not vertical_first(width, height, nh):
        row0 = int(ys.min())
        band = int((ys + yn).max()) - row0
        first = Pass("x", band, crop, row0, 0, Taps(xs, xn, xk))
        second = Pass("y", crop, crop, 0, 0, Taps(ys - row0, yn, yk))
        return WindowPlan(crop, first, second, False)
    col0 = int(xs.min())
    band = int((xs + xn).max()) - col0
    first = Pass("y", crop, band, 0, col0, Taps(ys, yn, yk))
    second = Pass("x", crop, crop, 0, 0, Taps(xs - col0, xn, xk))
    return WindowPlan(crop, first, second, True)


def _clip8(acc: np.ndarray) -> np.ndarray:
    """Pillow's clip8: fixed point -> uint8 (saturating)."""
    return np.where(acc >= _MAX, 255, np.where(acc <= 0, 0, acc >> PRECISION_BITS)).astype(
        np.uint8)


def run_pass(src: np.ndarray, p: Pass) -> np.ndarray:
    """HxWx3 uint8 -> p.rows x p.cols x 3 uint8, as the GPU kernel computes it."""
    acc = np.full((p.rows, p.cols, 3), _HALF, np.int64)
    taps = p.taps
    for t in range(taps.weights.shape[1]):
        w = np.where(t < taps.count, taps.weights[:, t], 0).astype(np.int64)
        if p.axis == "x":
            cols = np.minimum(taps.start + t, src.shape[1] - 1)  # weight 0 past the count
            block = src[p.row0:p.row0 + p.rows][:, cols, :]
            acc += block.astype(np.int64) * w[None, :, None]
        else:
            rows = np.minimum(taps.start + t, src.shape[0] - 1)
            block = src[rows][:, p.col0:p.col0 + p.cols, :]
            acc += block.astype(np.int64) * w[:, None, None]
    return _clip8(acc)


def resize_crop(image: np.ndarray, resize: int, crop: int, kind: str = "bilinear"
                ) -> np.ndarray:
    """HxWx3 uint8 -> SxSx3 uint8: the reference resize and centre crop, by the plan."""
    plan = plan_window(image.shape[1], image.shape[0], resize, crop, kind)
    return run_pass(run_pass(image, plan.first), plan.second)
