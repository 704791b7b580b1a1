"""Kept so that `from runtime.evaluate import ...` (scripts, older notebooks) still works: the
library is `runtime.evaluation`, the command `runtime.cli.evaluate`."""
from __future__ import annotations

from runtime.evaluation import *  # noqa: F403
from runtime.evaluation import __all__  # noqa: F401
