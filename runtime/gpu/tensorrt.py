"""Make onnxruntime's TensorRT provider find TensorRT from the pip wheels, with no manual step.

The `tensorrt-cu13-libs` 10.x wheel installs `libnvinfer.so.10` and its siblings into a
`tensorrt_libs` package folder, which is on no library search path: onnxruntime's provider
then fails to load and the session silently runs on CUDA. `preload_tensorrt` finds that folder
in the interpreter's site folders and loads its libraries with RTLD_GLOBAL before any session
is created (libnvinfer first: the plugin and parser libraries link against it, and libnvinfer
dlopens its builder resource by soname, which an already loaded library satisfies).

`tensorrt_options` gives the provider options this project uses: engine and timing caches in
a folder (a second session with the same model, shapes and options loads the engine instead of
building it), FP16, and INT8 for QDQ models (explicit quantization: the scales come from the
model's Q/DQ nodes, no calibration table).
"""
from __future__ import annotations

import ctypes
import glob
import os
import site
import sys
from collections.abc import Iterable

LIBRARY = "libnvinfer.so.10"
INSTALL_HINT = "pip install tensorrt-cu13-libs==10.x"
# load order: the core library before the ones linking against it
_ORDER = ("libnvinfer.so", "libnvinfer_builder_resource", "libnvinfer_plugin", "libnvonnxparser")

_loaded: dict[str, tuple[bool, str]] = {}


def site_folders() -> list[str]:
    """Folders Python imports packages from: site-packages (system and user) and sys.path."""
    folders: list[str] = []
    try:
        folders += site.getsitepackages()
    except AttributeError:  # virtualenvs built by old tools
        pass
    try:
        folders.append(site.getusersitepackages())
    except AttributeError:
        pass
    folders += [p for p in sys.path if p]
    return list(dict.fromkeys(os.path.abspath(f) for f in folders))


def find_tensorrt_libs(folders: Iterable[str] | None = None) -> str | None:
    """The first `tensorrt_libs` folder holding libnvinfer.so.10, or None."""
    for folder in (site_folders() if folders is None else folders):
        candidate = os.path.join(folder, "tensorrt_libs")
        if os.path.isfile(os.path.join(candidate, LIBRARY)):
            return candidate
    return None


def library_files(folder: str) -> list[str]:
    """The shared libraries of a tensorrt_libs folder, in load order."""
    files = sorted(glob.glob(os.path.join(folder, "lib*.so*")))

    def rank(path: str) -> tuple[int, str]:
        name = os.path.basename(path)
        for k, prefix in enumerate(_ORDER):
            if name.startswith(prefix):
                return k, name
        return len(_ORDER), name
    return sorted(files, key=rank)


def preload_tensorrt(folders: Iterable[str] | None = None, loader=None) -> tuple[bool, str]:
    """Load TensorRT's libraries globally; (True, folder) or (False, why not).

    `loader` (default ctypes.CDLL with RTLD_GLOBAL) is there for the tests. The result is
    remembered per folder list, so sessions after the first cost nothing."""
    key = repr(None if folders is None else list(folders))
    if key in _loaded and loader is None:
        return _loaded[key]
    try:  # already loadable (system install, LD_LIBRARY_PATH): nothing to do
        if loader is None:
            ctypes.CDLL(LIBRARY, mode=ctypes.RTLD_GLOBAL)
            _loaded[key] = (True, "system")
            return _loaded[key]
    except OSError:
        pass
    folder = find_tensorrt_libs(None if folders is None else list(folders))
    if folder is None:
        result = (False, f"{LIBRARY} not found ({INSTALL_HINT})")
    else:
        load = loader or (lambda path: ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL))
        result = (True, folder)
        for path in library_files(folder):
            try:
                load(path)
            except OSError as e:
                if os.path.basename(path).startswith("libnvinfer.so"):
                    result = (False, f"{path} does not load ({e})")
                    break
                # optional pieces (a lean or dispatch runtime) may need what is not installed
        if result[0]:  # child processes (decode workers, tools) find it too
            paths = os.environ.get("LD_LIBRARY_PATH", "")
            if folder not in paths.split(os.pathsep):
                os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (folder, paths) if p)
    if loader is None:
        _loaded[key] = result
    return result


def tensorrt_options(cache_dir: str | None, *, fp16: bool = False, int8: bool = False,
                     device_id: int = 0, cuda_graph: bool = False) -> dict[str, str]:
    """TensorRT provider options: caches under cache_dir, FP16, INT8 for a QDQ model."""
    opts = {"device_id": str(device_id), "trt_fp16_enable": str(bool(fp16 or int8)),
            "trt_int8_enable": str(bool(int8)), "trt_cuda_graph_enable": str(bool(cuda_graph))}
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        opts.update({"trt_engine_cache_enable": "True", "trt_engine_cache_path": cache_dir,
                     "trt_timing_cache_enable": "True", "trt_timing_cache_path": cache_dir})
    return opts


def engine_files(cache_dir: str) -> list[str]:
    """The engine files a cache folder holds (to tell a cache hit from a build)."""
    return sorted(glob.glob(os.path.join(cache_dir, "*.engine")))
