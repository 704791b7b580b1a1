"""What machine a figure was measured on: the CPU's name, the load, a one-line summary. Shared
by the benchmarks and the study so that every page describes the machine the same way."""
from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_summary() -> str:
    """'CPU, N logical cores, Python X.Y.Z': one line for a results page."""
    return f"{cpu_name()}, {os.cpu_count()} logical cores, Python {platform.python_version()}"
