"""The typed result of an evaluation: `EvaluationReport` and one `ModelResult` per row.

`to_dict()` gives report.json's layout (see runtime.evaluation.report), which the renderers and
the study read, so a report loaded back from disk and one just computed read the same way. A
cell (one model on one target) stays a plain mapping: its keys depend on the probe and the
number of seeds (see `protocol.probe_target` and `protocol.merge_seeds`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class ModelResult:
    """One evaluated model: what it is, its cells per target and its aggregates over them."""

    model_dir: str
    embedding_dim: int
    architecture: str
    method: str | None
    fingerprint: str
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    mean: float | None = None            # top-1 over targets, a fraction
    logit_mean: float | None = None      # Kornblith et al.'s mean logit
    mnrg: float | None = None            # x100, relative to the reference (None without one)
    anrg: float | None = None
    images_per_s: float | None = None    # as measured when embedded, cached or not

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class EvaluationReport:
    """Every model on every target, the groups, the comparisons and how it was all made."""

    models: dict[str, ModelResult]
    groups: dict[str, dict]
    comparisons: list[dict]
    reference: str | None
    targets: dict[str, dict]
    probe: str
    probe_params: dict
    seed: int
    seeds: list[int]
    confidence: float
    settings: dict
    cache: dict
    versions: dict
    created: str
    metric: str = "top1"
    files: dict[str, str] | None = None   # report.json/.md/.png, once written

    def to_dict(self) -> dict[str, Any]:
        """report.json's layout (keys in the order earlier reports had them)."""
        out: dict[str, Any] = {
            "models": {name: m.to_dict() for name, m in self.models.items()},
            "groups": self.groups, "comparisons": self.comparisons,
            "reference": self.reference, "targets": self.targets, "probe": self.probe,
            "probe_params": self.probe_params, "seed": self.seed, "seeds": self.seeds,
            "confidence": self.confidence, "metric": self.metric, "settings": self.settings,
            "cache": self.cache, "versions": self.versions, "created": self.created,
        }
        if self.files is not None:
            out["files"] = self.files
        return out
