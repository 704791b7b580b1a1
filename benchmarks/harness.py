"""What every benchmark shares: the machine and versions it ran on, timing (warm-up, then the
median of repeats, configurations round robin) and writing its figures as JSON and PNG."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from common.atomic import atomic_open
from common.machine import cpu_name, load_average


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# machine and versions

def machine_info() -> dict:
    """The CPU, its cores (logical, and usable by this process) and the load before a run."""
    from runtime.providers import available_cores
    return {"cpu": cpu_name(), "logical_cores": os.cpu_count(), "usable_cores": available_cores(),
            "load_average": load_average(), "platform": platform.platform()}


def versions(names: tuple[str, ...] = ("torch", "torchvision", "onnxruntime-gpu", "onnxruntime",
                                       "numpy", "pillow", "simplejpeg")) -> dict:
    """Python and the installed versions of `names` (those not installed are left out)."""
    import importlib.metadata as md
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


# ---------------------------------------------------------------------------------------------
# timing

@dataclass
class Config:
    """One timed configuration: `run()` processes images and returns how many."""
    key: str
    label: str
    run: Callable[[], int]
    seconds: list


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (DataLoader workers)."""
    import resource
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def time_round_robin(configs: list[Config], repeats: int) -> dict:
    """Run each config once per repeat, in turn; {key: figures} with the median images/s and
    the median CPU milliseconds per image (less sensitive than wall time to a shared machine)."""
    for r in range(repeats):
        for c in configs:
            t0, cpu0 = time.perf_counter(), cpu_seconds()
            n = c.run()
            c.seconds.append((time.perf_counter() - t0, cpu_seconds() - cpu0, n))
            log(f"bench: repeat {r + 1}/{repeats} {c.label}: {n / c.seconds[-1][0]:.1f} images/s")
    out = {}
    for c in configs:
        rates = [n / s for s, _, n in c.seconds]
        cpu = [1000 * u / n for _, u, n in c.seconds]
        out[c.key] = {"label": c.label, "images_per_s": round(float(np.median(rates)), 2),
                      "runs_images_per_s": [round(x, 2) for x in rates],
                      "cpu_ms_per_image": round(float(np.median(cpu)), 2),
                      "images": c.seconds[0][2]}
    return out


def median_rate(run: Callable[[], int], repeats: int, warmup: int = 1) -> float:
    """Items per second of `run()` (which returns how many it processed): `warmup` untimed
    calls, then the median of `repeats` timed ones."""
    for _ in range(warmup):
        run()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = run()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


# ---------------------------------------------------------------------------------------------
# output

def write_json(path: str, report: dict) -> None:
    """The figures as JSON, written atomically (the folder made if missing)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path, "w") as f:
        json.dump(report, f, indent=1)


def save_figure(fig, path: str, dpi: int = 120) -> None:
    """A matplotlib figure as PNG, written atomically, then closed."""
    import matplotlib.pyplot as plt
    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
    finally:
        plt.close(fig)


def pyplot():
    """matplotlib.pyplot on the file-only backend (benchmarks run headless)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
