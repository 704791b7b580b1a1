"""Kept so that `from runtime.report import ...` still works: now `runtime.evaluation.report`."""
from __future__ import annotations

from runtime.evaluation.report import (  # noqa: F401
    plot_report,
    render_markdown,
    render_rigour,
    render_table,
    write_report,
)
