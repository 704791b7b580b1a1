"""GpuDecoder: a batch of items -> the uint8 NHWC crops on the GPU, with per-item errors.

Why nvImageCodec (`nvidia-nvimgcodec-cu13`): it decodes a whole list of JPEGs in one call with
nvJPEG's hardware decoder where the GPU has one (A100, H100/H200) and its CUDA/hybrid backends
otherwise, leaves the pixels on the device behind `__cuda_array_interface__`, applies EXIF
orientation, handles progressive and grey JPEGs, and needs neither torch nor DALI's pipeline
model (a 25 MB wheel against DALI's ~500 MB). torchvision.io.decode_jpeg would bring torch into
the runtime, which never imports it.

After decoding, the reference resize + centre crop runs as two batched kernel launches
(runtime.gpu.kernels) that write straight into the batch buffer. Whatever the GPU path does
not take goes through the CPU's exact transform, item by item, and is copied into its row:
non-JPEG inputs, CMYK/YCCK JPEGs (PIL's own CMYK conversion is the reference), PIL images and
arrays, images whose resize is smaller than the crop (the reference pads), and anything
nvImageCodec fails on (the CPU path then words the error, or decodes it).
"""
from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from common.description import Preprocessing
from common.errors import UserError
from common.images import ImageDecodeError

from ..decode import JPEG_MAGIC, _name, _read_bytes, jpeg_segments, load_crop
from . import kernels as K
from .resample import SUPPORTS, WindowPlan, plan_window

log = logging.getLogger("unirep.runtime")


class GpuUnavailable(UserError, RuntimeError):
    """GPU decoding cannot run here; the message says why and what to install."""


def jpeg_components(data: bytes) -> int | None:
    """Colour components of a JPEG from its frame header (1 grey, 3 YCbCr, 4 CMYK/YCCK), or
    None when no frame header is found before the scan."""
    try:
        for marker, segment in jpeg_segments(data):
            # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC)
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                return segment[5]
    except (ValueError, struct.error, IndexError):
        return None
    return None


def gpu_decode_available() -> tuple[bool, str]:
    """(True, "") when cupy, nvImageCodec and a CUDA device are all present, else the reason."""
    try:
        import cupy
    except ImportError as e:
        return False, f"cupy is not installed ({e}; pip install cupy-cuda13x)"
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except ImportError as e:
        return False, (f"nvImageCodec is not installed ({e}; "
                       "pip install 'nvidia-nvimgcodec-cu13[nvjpeg]')")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False, "no CUDA device"
    except Exception as e:  # cupy raises CUDARuntimeError without a driver
        return False, f"no CUDA device ({type(e).__name__}: {e})"
    return True, ""


class GpuDecoder:
    """Decode items into a device batch: `decode(items, out)` -> {k: error}.

    `out` is a cupy uint8 array [>= len(items), S, S, 3]; row k receives item k's crop (failed
    rows are left as they were). pre: the model's preprocessing (resize, crop, interpolation).
    """

    def __init__(self, pre: Preprocessing, *, device_id: int = 0):
        ok, why = gpu_decode_available()
        if not ok:
            raise GpuUnavailable(why)
        import cupy
        from nvidia import nvimgcodec
        self.pre, self.device_id = pre, device_id
        self.cupy, self.nvimgcodec = cupy, nvimgcodec
        # the GPU plan rounds the resized long side; truncating models resample on the CPU
        self.gpu_resample = pre.interpolation in SUPPORTS and pre.resize_rounding == "round"
        with cupy.cuda.Device(device_id):
            self.stream = cupy.cuda.Stream(non_blocking=True)
            try:  # hardware decoder first where there is one, then CUDA, then hybrid
                backends = [nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY),
                            nvimgcodec.Backend(nvimgcodec.BackendKind.GPU_ONLY),
                            nvimgcodec.Backend(nvimgcodec.BackendKind.HYBRID_CPU_GPU)]
                # libjpeg-turbo (the reference's decoder) upsamples chroma smoothly by default;
                # nvImageCodec's JPEG decoders do so only when asked
                self.decoder = nvimgcodec.Decoder(device_id=device_id, backends=backends,
                                                  options=":fancy_upsampling=1")
            except Exception as e:  # older releases: the library's own default choice
                log.info("nvImageCodec backends/options not selectable (%s); using its "
                         "defaults", e)
                self.decoder = nvimgcodec.Decoder()
            self.params = nvimgcodec.DecodeParams(color_spec=nvimgcodec.ColorSpec.RGB,
                                                  allow_any_depth=False,
                                                  apply_exif_orientation=True)
        # items decoded on the GPU / on the CPU / failed; "gpu_error" when the GPU path broke
        self.stats: dict = {"gpu": 0, "cpu": 0, "failed": 0}

    def new_batch(self, n: int):
        s = self.pre.input_size
        with self.cupy.cuda.Device(self.device_id):
            return self.cupy.zeros((n, s, s, 3), self.cupy.uint8)

    def decode(self, items: Sequence[Any], out) -> dict[int, str]:
        """Items -> crops in out[:len(items)]; {k: '<item>: <cause>'} for the failures."""
        cupy = self.cupy
        errors: dict[int, str] = {}
        cpu: list[int] = []
        jpeg_rows, jpeg_data = [], []
        for k, item in enumerate(items):
            try:
                data = _read_bytes(item)
            except ImageDecodeError as e:
                errors[k] = str(e)
                continue
            if (data is not None and self.gpu_resample and data[:3] == JPEG_MAGIC
                    and jpeg_components(data) in (1, 3)):
                jpeg_rows.append(k)
                jpeg_data.append(data)
            else:
                cpu.append(k)
        with cupy.cuda.Device(self.device_id), self.stream:
            if jpeg_data:
                try:
                    cpu += self._decode_jpegs(jpeg_rows, jpeg_data, out)
                except Exception as e:  # kernels or decoder broken: the CPU keeps rows coming
                    if "gpu_error" not in self.stats:
                        log.warning("GPU decoding failed (%s: %s); decoding on the CPU",
                                    type(e).__name__, e)
                    self.stats["gpu_error"] = f"{type(e).__name__}: {e}"
                    cpu += jpeg_rows
            for k in sorted(cpu):
                try:
                    crop = load_crop(items[k], self.pre, fast=False)
                except ImageDecodeError as e:
                    errors[k] = str(e) if str(e).startswith(_name(items[k])) else (
                        f"{_name(items[k])}: {e}")
                    continue
                out[k].set(crop, stream=self.stream)
                self.stats["cpu"] += 1
            self.stream.synchronize()  # the session runs on onnxruntime's stream
        self.stats["failed"] += len(errors)
        return errors

    def _decode_jpegs(self, rows: list[int], data: list[bytes], out) -> list[int]:
        """nvImageCodec + the two resampling launches; returns the rows left for the CPU."""
        try:
            images = self.decoder.decode(data, self.params, cuda_stream=self.stream.ptr)
        except TypeError:  # releases without the cuda_stream keyword
            images = self.decoder.decode(data, self.params)
        except Exception as e:  # the whole batch refused: the CPU decides item by item
            log.info("nvImageCodec failed on a batch (%s); decoding it on the CPU", e)
            return list(rows)
        self.cupy.cuda.Device(self.device_id).synchronize()  # decoder's stream -> ours
        left, plans, sources, taken = [], [], [], []
        for k, image in zip(rows, images):
            if image is None:
                left.append(k)
                continue
            cai = image.__cuda_array_interface__
            shape = tuple(cai["shape"])
            if len(shape) != 3 or shape[2] != 3 or cai["typestr"] != "|u1":
                left.append(k)
                continue
            try:
                plan = plan_window(shape[1], shape[0], self.pre.resize_size,
                                   self.pre.input_size, self.pre.interpolation)
            except ValueError:  # the reference pads: keep its exact code
                left.append(k)
                continue
            strides = cai.get("strides")
            pitch = strides[0] if strides else shape[1] * 3
            plans.append(plan)
            sources.append((int(cai["data"][0]), int(pitch)))
            taken.append(k)
        if taken:
            self._resample(plans, sources, taken, out)
            self.stats["gpu"] += len(taken)
        del images  # the decoded frames are freed once the kernels have read them
        return left

    def _resample(self, plans: list[WindowPlan], sources: list[tuple[int, int]],
                  rows: list[int], out) -> None:
        s = self.pre.input_size
        first, s1, c1, w1 = K.pack_pass([p.first for p in plans])
        second, s2, c2, w2 = K.pack_pass([p.second for p in plans])
        sizes = [p.first.rows * p.first.cols * 3 for p in plans]
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        temp = self.cupy.empty(int(sum(sizes)), self.cupy.uint8)
        base = int(out.data.ptr)
        row_bytes = s * s * 3
        for i, (plan, (ptr, pitch), k) in enumerate(zip(plans, sources, rows)):
            band = int(temp.data.ptr) + int(offsets[i])
            first[i, [K.SRC, K.SRC_PITCH, K.DST, K.DST_PITCH]] = (
                ptr, pitch, band, plan.first.cols * 3)
            second[i, [K.SRC, K.SRC_PITCH, K.DST, K.DST_PITCH]] = (
                band, plan.first.cols * 3, base + k * row_bytes, s * 3)
        K.launch_pass(first, s1, c1, w1, self.stream)
        K.launch_pass(second, s2, c2, w2, self.stream)
        self.stream.synchronize()  # temp and the decoded frames must outlive the kernels
