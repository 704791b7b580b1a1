"""Kept so that `from runtime.universality import ...` still works: now
`runtime.evaluation.statistics`."""
from __future__ import annotations

from runtime.evaluation.statistics import *  # noqa: F403
