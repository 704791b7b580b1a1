"""What an evaluation runs: `EvaluationPlan` (the settings, checked in one place before anything
is read, embedded or taken from the cache) and the rows and columns it resolves to."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar

from common.params import Interval, StrOptions, validate_params

from .errors import EvaluationError, EvaluationParameterError
from .targets import DEFAULT_TEST_FRACTION, _dedupe, _target_name

PROBES = ("logreg", "svm")
DEVICES = ("auto", "cpu", "cuda", "tensorrt")


@dataclass
class EvaluationPlan:
    """Every model on every target, and how.

    `reference` is a model dir (in `model_dirs` or not; it is evaluated too) that mNRG/aNRG are
    relative to. `cache_dir` defaults to $UNIREP_CACHE/embeddings; `use_cache=False` embeds
    afresh without reading or writing it. `probe_params` go to `runtime.probes.make_probe` (e.g.
    a shorter `Cs` sweep for a pilot; the default is the full protocol). `variant` picks
    model.onnx / model.fp16.onnx / model.int8.onnx; `fast_decode=False` (default) decodes
    exactly as training evaluated, which the protocol asks. `pipeline_args` go to the
    FeaturePipeline (device_id, decode threads or processes).

    Rigour: `seeds=N` repeats every (model, target) with evaluation seeds seed..seed+N-1 (the
    split of targets without their own, the per-class cap and the probe's validation split), and
    reports the mean with a `confidence` t interval. `groups` {NAME: [MODEL_DIR, ...]} are
    networks trained alike with different seeds: each member is evaluated (as NAME[i]) and the
    group reports its mean and interval over members. `controls` (names of models or groups;
    default: the reference) are compared with every other model and group, per target and on
    the mean: paired t intervals over seeds or over members (member i with member i), Welch's
    interval for groups of different sizes, and a paired bootstrap over test images when each
    side is one model with one seed. A difference is "larger than seed noise" when its interval
    excludes 0. `pairs` [(model or group, control), ...] replaces the all-against-controls
    list when only some comparisons matter.
    """

    model_dirs: list[str]
    targets: list[str]
    out_dir: str | None = None
    reference: str | None = None
    probe: str = "logreg"
    probe_params: dict | None = None
    seed: int = 0
    seeds: int = 1
    names: list[str] | None = None
    groups: dict[str, list[str]] | None = None
    controls: list[str] | None = None
    pairs: list[tuple[str, str]] | None = None
    confidence: float = 0.95
    test_fraction: float = DEFAULT_TEST_FRACTION
    max_per_class: int | None = None
    cache_dir: str | None = None
    use_cache: bool = True
    device: str = "auto"
    batch_size: int = 32
    threads: int | None = None
    variant: str = "fp32"
    fast_decode: bool = False
    pipeline_args: dict | None = None
    progress: bool = True

    _parameter_constraints: ClassVar[dict[str, list]] = {
        "probe": [StrOptions(PROBES)],
        "seed": [Interval(int, 0, None, closed="left")],
        "seeds": [Interval(int, 1, None, closed="left")],
        "confidence": [Interval(float, 0.5, 1, closed="left")],
        "test_fraction": [Interval(float, 0, 1, closed="neither")],
        "max_per_class": [Interval(int, 1, None, closed="left"), None],
        "batch_size": [Interval(int, 1, None, closed="left")],
        "threads": [Interval(int, 1, 4 * (os.cpu_count() or 1), closed="both"), None],
        "use_cache": [bool],
        "fast_decode": [bool],
        "progress": [bool],
    }

    def check(self) -> None:
        """Refuse unusable settings before anything is read, embedded or taken from the cache
        (a fully cached evaluation would otherwise never reach the code that rejects them)."""
        from dataclasses import fields

        validate_params({f.name: getattr(self, f.name) for f in fields(self)},
                        self._parameter_constraints, "evaluate", error=EvaluationParameterError)
        if not self.model_dirs and not self.groups:
            raise EvaluationError("give at least one model dir")
        if not self.targets:
            raise EvaluationError("give at least one target (--target DATA)")
        if self.names and len(self.names) != len(self.model_dirs):
            raise EvaluationError(f"{len(self.names)} names for {len(self.model_dirs)} model "
                                  "dirs; give one --name per model dir, in the same order")
        if self.device.split(":")[0] not in DEVICES:
            raise EvaluationError(f"unknown device {self.device!r}; choose from "
                                  f"{', '.join(DEVICES)} (cuda:N for a given GPU)")
        for g, dirs in (self.groups or {}).items():
            if len(dirs) < 2:
                raise EvaluationError(f"group {g!r} has {len(dirs)} model; a group needs 2 or "
                                      "more (networks trained alike with different seeds)")
        self._check_probe()

    def _check_probe(self) -> None:
        """The probe's own constraints on `probe_params`, in the same style."""
        from runtime.probes import make_probe
        try:
            make_probe(self.probe, **(self.probe_params or {}))._validate_params()
        except (TypeError, ValueError) as e:
            raise EvaluationError(f"probe parameters {self.probe_params}: {e}") from e

    def resolve(self) -> Rows:
        """The rows (models, group members, the reference) and columns (targets, seeds)."""
        self.check()
        return Rows.of(self)


@dataclass
class Rows:
    """The names and folders a plan evaluates: models (deduplicated names), the reference's
    name, each group's members (NAME[i]), the controls and the pairs compared, the targets'
    names and the evaluation seeds."""

    model_names: list[str]
    model_dirs: list[str]
    reference: str | None
    groups: dict[str, list[str]]
    members: dict[str, list[str]]
    controls: list[str]
    target_names: list[str]
    seeds: list[int]
    pairs: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def of(cls, plan: EvaluationPlan) -> Rows:
        groups = {str(k): [os.path.normpath(d) for d in v] for k, v in (plan.groups or {}).items()}
        model_dirs = [os.path.normpath(d) for d in plan.model_dirs]
        model_names = (list(plan.names) if plan.names
                       else [os.path.basename(os.path.abspath(d)) for d in model_dirs])
        reference_name = None
        if plan.reference is not None:
            reference = os.path.normpath(plan.reference)
            same = [i for i, d in enumerate(model_dirs)
                    if os.path.exists(d) and os.path.exists(reference)
                    and os.path.samefile(d, reference)]
            if same:
                reference_name = _dedupe(model_names)[same[0]]
            else:
                model_dirs.append(reference)
                model_names.append(os.path.basename(os.path.abspath(reference)))
        model_names = _dedupe(model_names)
        if plan.reference is not None and reference_name is None:
            reference_name = model_names[-1]
        clash = sorted(set(groups) & set(model_names))
        if clash:
            raise EvaluationError(f"group name(s) {clash} are also model names; rename the group")
        members = {g: [f"{g}[{i}]" for i in range(len(dirs))] for g, dirs in groups.items()}
        for g, dirs in groups.items():
            model_names += members[g]
            model_dirs += dirs
        controls = (list(plan.controls) if plan.controls
                    else ([reference_name] if reference_name else []))
        unknown = [c for c in [*controls, *(x for pair in plan.pairs or [] for x in pair)]
                   if c not in model_names and c not in groups]
        if unknown:
            raise EvaluationError(f"control(s) {unknown} are neither a model name nor a group; "
                                  f"choose from {sorted(set(model_names) | set(groups))}")
        rows = cls(model_names, model_dirs, reference_name, groups, members, controls,
                   _dedupe([_target_name(t) for t in plan.targets]),
                   list(range(plan.seed, plan.seed + int(plan.seeds))))
        rows.pairs = list(plan.pairs) if plan.pairs is not None else rows._all_pairs()
        return rows

    def is_member(self, name: str) -> bool:
        return any(name in m for m in self.members.values())

    def _all_pairs(self) -> list[tuple[str, str]]:
        """Every model (not a group member) and group against every control."""
        units = [n for n in self.model_names if not self.is_member(n)] + list(self.groups)
        return [(a, c) for c in self.controls for a in units if a != c]
