"""The model description: one JSON document that travels with every checkpoint and exported model.

It is the contract between the three stages. `train` writes it beside each checkpoint, `export`
copies (and extends) it into the ONNX metadata and `MODEL_DIR/description.json`, and `runtime`
reads it to preprocess images exactly as training evaluated them. Pure Python: no torch, no
onnxruntime, so every stage can import it.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .atomic import atomic_open
from .errors import UserError

FORMAT_VERSION = 1
ONNX_METADATA_KEY = "unirep.description"


INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
# How the long side's length is made an integer when the shorter side is resized: "round" (this
# project's own models) or "truncate" (torchvision's Resize, hence timm's and torchvision's
# evaluation transforms: a 574x470 photo resized to 256 gets 313 columns rounded, 312 truncated).
RESIZE_ROUNDINGS = ("round", "truncate")


class DescriptionError(UserError, ValueError):
    """A model description that cannot be used; the message names the file when there is one."""


@dataclass
class Preprocessing:
    """Deterministic evaluation transform: decode -> RGB (alpha over `background`) ->
    resize shorter side to `resize_size` (the long side rounded or truncated: `resize_rounding`)
    -> centre crop `input_size` -> scale to [0,1] -> (x - mean) / std, channels first."""

    input_size: int = 32
    resize_size: int = 32
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    interpolation: str = "bilinear"
    background: list[int] = field(default_factory=lambda: [255, 255, 255])
    resize_rounding: str = "round"

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """Size of a width x height image after 'resize the shorter side to resize_size, aspect
        kept'; the one definition every decode path uses."""
        target = self.resize_size
        if min(width, height) == target:
            return width, height
        short, long = (width, height) if width <= height else (height, width)
        if self.resize_rounding == "truncate":  # torchvision: int(size * long / short)
            new_long = int(target * long / short)
        else:
            new_long = int(round(long * target / short))
        new_long = max(1, new_long)
        return (target, new_long) if width <= height else (new_long, target)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        if not isinstance(d, dict):
            raise DescriptionError(f"preprocessing must be an object, not {type(d).__name__}")
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        pre = cls(**known)
        problem = pre.problem()
        if problem:
            raise DescriptionError(f"preprocessing: {problem}")
        return pre

    def problem(self) -> str | None:
        """Why this transform cannot be applied (None when it can): a std of 0 or a non-finite
        mean would turn every embedding into NaN while the images look fine."""
        for name in ("input_size", "resize_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                return f"{name} must be a positive integer, not {v!r}"
        for name in ("mean", "std"):
            v = getattr(self, name)
            if (not isinstance(v, (list, tuple)) or len(v) != 3 or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                    for x in v)):
                return f"{name} must be 3 finite numbers (one per RGB channel), not {v!r}"
        if any(x <= 0 for x in self.std):
            return f"std must be positive for every channel, not {list(self.std)!r}"
        if self.interpolation not in INTERPOLATIONS:
            return f"interpolation must be one of {INTERPOLATIONS}, not {self.interpolation!r}"
        if self.resize_rounding not in RESIZE_ROUNDINGS:
            return (f"resize_rounding must be one of {RESIZE_ROUNDINGS}, not "
                    f"{self.resize_rounding!r}")
        b = self.background
        if (not isinstance(b, (list, tuple)) or len(b) != 3 or not all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 255 for x in b)):
            return f"background must be 3 integers in 0..255, not {b!r}"
        return None


@dataclass
class Level:
    """One categorical level: its name and its class names (full folder paths, e.g. 'tops/shirt')."""

    name: str
    classes: list[str]


def save_json_atomic(path: str, obj: Any) -> None:
    """Write JSON so that a reader never sees a half-written file."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)


@dataclass
class ModelDescription:
    """Architecture, preprocessing and label levels of a model; see module docstring.

    `levels` lists every level of the source data from the coarsest (0) to the leaf.
    `heads` names the levels the network was trained to classify (a head per entry, in order),
    each `{"name": ..., "classes": [...]}`; finer pseudo-classes (FiNet) or clustered groups
    appear here even though they are not data levels.
    `components` is filled by export for combinations: one description per source network.
    """

    architecture: str
    feature_dim: int
    preprocessing: Preprocessing
    levels: list[Level] = field(default_factory=list)
    heads: list[dict] = field(default_factory=list)
    arch_kwargs: dict = field(default_factory=dict)
    method: str = "specific"
    method_args: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    source_runs: list[str] = field(default_factory=list)
    components: list[dict] = field(default_factory=list)
    combination: str | None = None
    versions: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> ModelDescription:
        if not isinstance(d, dict):
            raise DescriptionError(f"a model description is a JSON object, not "
                                   f"{type(d).__name__}")
        d = copy.deepcopy(d)
        version = d.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int):
            raise DescriptionError(f"format_version must be an integer, not {version!r}")
        if version > FORMAT_VERSION:
            raise DescriptionError(
                f"model description format {version} is newer than this toolkit understands "
                f"({FORMAT_VERSION}); upgrade the toolkit")
        for required in ("architecture", "feature_dim", "preprocessing"):
            if required not in d:
                raise DescriptionError(f"model description is missing '{required}'")
        fd = d["feature_dim"]
        if isinstance(fd, bool) or not isinstance(fd, int) or fd < 1:
            raise DescriptionError(f"feature_dim must be a positive integer, not {fd!r}")
        d["preprocessing"] = Preprocessing.from_dict(d["preprocessing"])
        try:
            d["levels"] = [Level(**lv) for lv in d.get("levels", [])]
        except TypeError as e:
            raise DescriptionError(f"levels must be objects with 'name' and 'classes' ({e})"
                                   ) from e
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @classmethod
    def from_json(cls, text: str) -> ModelDescription:
        return cls.from_dict(json.loads(text))

    def save(self, path: str) -> None:
        save_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str) -> ModelDescription:
        if os.path.isdir(path):
            path = os.path.join(path, "description.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no model description at {path}")
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_json(f.read())
        except DescriptionError as e:
            raise DescriptionError(f"{path}: {e}") from e
        except (UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            raise DescriptionError(f"{path}: not a valid model description ({e})") from e

    # -- helpers -------------------------------------------------------------------------
    def level_index(self, level: int | str) -> int:
        """Resolve a level given by number (0 = coarsest) or by name."""
        names = [lv.name for lv in self.levels]
        if isinstance(level, str) and not level.lstrip("-").isdigit():
            if level not in names:
                raise ValueError(f"unknown level {level!r}; levels are {names}")
            return names.index(level)
        i = int(level)
        if not -len(names) <= i < len(names):
            raise ValueError(f"level {i} out of range; levels are 0..{len(names) - 1}: {names}")
        return i % len(names)
