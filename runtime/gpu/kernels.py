"""The crop-window resampling of runtime.gpu.resample as CUDA kernels, batched over images.

One kernel, `resample_pass`, runs one pass (see resample.Pass) for every image of a batch in a
single launch: blockIdx.z is the image, and a row of int64 parameters per image gives its
source and destination pointers, pitches, pass geometry and where its taps start in the
batch's packed tap tables. A batch is resized with two launches: source images -> temporary
bands (per-image offsets into one buffer), bands -> the uint8 NHWC batch the model reads.

`pack_pass` builds those tables on the host; `emulate_pass` executes them in NumPy with the
kernel's exact indexing, so the packing is tested on the CPU and the kernel's arithmetic is
the reference's (int32 accumulators starting at 1 << 21, Pillow's clip8).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .resample import _HALF, PRECISION_BITS, Pass, _clip8

# Per-image parameter columns, in the kernel's order.
SRC, SRC_PITCH, DST, DST_PITCH, ROWS, COLS, ROW0, COL0, AXIS, TAP_BASE, WEIGHT_BASE, KSIZE = \
    range(12)
PARAMS = 12

KERNEL_SOURCE = r"""
extern "C" __device__ __forceinline__ unsigned char clip8(int acc) {
    if (acc >= (1 << (PRECISION_BITS + 8))) return 255;
    if (acc <= 0) return 0;
    return (unsigned char)(acc >> PRECISION_BITS);
}

extern "C" __global__ void resample_pass(const long long* params, const int* starts,
                                         const int* counts, const int* weights) {
    const long long* p = params + (long long)blockIdx.z * 12;
    const int rows = (int)p[4], cols = (int)p[5];
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const int r = blockIdx.y * blockDim.y + threadIdx.y;
    if (r >= rows || c >= cols) return;
    const unsigned char* src = (const unsigned char*)p[0];
    const long long src_pitch = p[1];
    unsigned char* dst = (unsigned char*)p[2];
    const long long dst_pitch = p[3];
    const int row0 = (int)p[6], col0 = (int)p[7], axis = (int)p[8];
    const int pos = axis == 0 ? c : r;
    const int start = starts[p[9] + pos], n = counts[p[9] + pos];
    const int* w = weights + p[10] + (long long)pos * p[11];
    int acc0 = 1 << (PRECISION_BITS - 1), acc1 = acc0, acc2 = acc0;
    for (int t = 0; t < n; ++t) {
        const unsigned char* px = axis == 0
            ? src + (long long)(row0 + r) * src_pitch + (long long)(start + t) * 3
            : src + (long long)(start + t) * src_pitch + (long long)(col0 + c) * 3;
        acc0 += (int)px[0] * w[t];
        acc1 += (int)px[1] * w[t];
        acc2 += (int)px[2] * w[t];
    }
    unsigned char* out = dst + (long long)r * dst_pitch + (long long)c * 3;
    out[0] = clip8(acc0);
    out[1] = clip8(acc1);
    out[2] = clip8(acc2);
}
""".replace("PRECISION_BITS", str(PRECISION_BITS))

BLOCK = (32, 8, 1)


def pack_pass(passes: Sequence[Pass]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(params int64 [B, 12] without pointers and pitches, starts, counts, weights int32) for
    one pass of every image; the caller fills SRC, SRC_PITCH, DST, DST_PITCH."""
    params = np.zeros((len(passes), PARAMS), np.int64)
    starts, counts, weights = [], [], []
    tap_base = weight_base = 0
    for i, p in enumerate(passes):
        ksize = p.taps.weights.shape[1]
        params[i, [ROWS, COLS, ROW0, COL0, AXIS, TAP_BASE, WEIGHT_BASE, KSIZE]] = (
            p.rows, p.cols, p.row0, p.col0, 0 if p.axis == "x" else 1, tap_base, weight_base,
            ksize)
        starts.append(p.taps.start)
        counts.append(p.taps.count)
        weights.append(p.taps.weights.reshape(-1))
        tap_base += len(p.taps.start)
        weight_base += p.taps.weights.size
    cat = (lambda xs: np.ascontiguousarray(np.concatenate(xs), np.int32) if xs
           else np.zeros(1, np.int32))
    return params, cat(starts), cat(counts), cat(weights)


def emulate_pass(sources: Sequence[np.ndarray], params: np.ndarray, starts: np.ndarray,
                 counts: np.ndarray, weights: np.ndarray) -> list[np.ndarray]:
    """What `resample_pass` writes for each image, computed in NumPy from the packed tables
    (sources are HxWx3 uint8 arrays standing for the SRC pointers)."""
    outs = []
    for i, src in enumerate(sources):
        p = params[i]
        rows, cols, row0, col0, axis = (int(p[k]) for k in (ROWS, COLS, ROW0, COL0, AXIS))
        n_pos = cols if axis == 0 else rows
        base, wbase, ksize = int(p[TAP_BASE]), int(p[WEIGHT_BASE]), int(p[KSIZE])
        st = starts[base:base + n_pos].astype(np.int64)
        cn = counts[base:base + n_pos]
        w = weights[wbase:wbase + n_pos * ksize].reshape(n_pos, ksize).astype(np.int64)
        acc = np.full((rows, cols, 3), _HALF, np.int64)
        for t in range(ksize):
            wt = np.where(t < cn, w[:, t], 0)
            if axis == 0:
                idx = np.minimum(st + t, src.shape[1] - 1)
                acc += src[row0:row0 + rows][:, idx].astype(np.int64) * wt[None, :, None]
            else:
                idx = np.minimum(st + t, src.shape[0] - 1)
                acc += src[idx][:, col0:col0 + cols].astype(np.int64) * wt[:, None, None]
        outs.append(_clip8(acc))
    return outs


_KERNEL = None


def kernel():
    """The compiled RawKernel (cupy compiles it once per process, and caches it on disk)."""
    global _KERNEL
    if _KERNEL is None:
        import cupy
        _KERNEL = cupy.RawKernel(KERNEL_SOURCE, "resample_pass")
    return _KERNEL


def launch_pass(params: np.ndarray, starts: np.ndarray, counts: np.ndarray,
                weights: np.ndarray, stream=None) -> None:
    """One launch of `resample_pass` over every image of `params` (pointers filled in)."""
    import cupy
    if not len(params):
        return
    rows, cols = int(params[:, ROWS].max()), int(params[:, COLS].max())
    grid = (-(-cols // BLOCK[0]), -(-rows // BLOCK[1]), len(params))
    with stream if stream is not None else cupy.cuda.get_current_stream():
        args = tuple(cupy.asarray(a) for a in (params, starts, counts, weights))
        kernel()(grid, BLOCK, args)
