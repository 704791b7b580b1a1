"""What an export reads: its sources, each turned into one member of the exported graph.

A source is
- a run folder (`train`'s RUN_DIR: description.json + model.pt),
- a named architecture with its starting weights, no run needed (`ArchSource`, or the text
  `ARCH@pretrained` / `ARCH@FILE`): a registry name (efficientnet_lite2...), `timm:NAME` or
  `torchvision:NAME`, with `--pretrained` or `--weights FILE`,
- a model folder (`export`'s or `import`'s MODEL_DIR: model.onnx + description.json), composed
  into the graph at the ONNX level (export.compose), for combinations.

`load_members(sources, taps)` -> list of `Member` (torch network or ONNX file, description,
label). With `taps`, each torch member's embedding is its multi-depth features (train.taps).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from common.description import ModelDescription
from common.model_dir import MODEL_FILE

from .onnx_files import ExportError

PRETRAINED_WORD = "pretrained"


@dataclass
class ArchSource:
    """A named architecture and its starting weights (see the module docstring)."""
    arch: str
    pretrained: bool = False
    weights: str | None = None
    input_size: int | None = None
    arch_kwargs: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.arch}@{'pretrained' if self.pretrained else os.path.abspath(self.weights or '')}"


@dataclass
class Member:
    """One member of the exported graph: a torch `network` (with `forward_features`) or an ONNX
    file (`onnx_path`, input `image`, output `embedding`), its description and label."""
    label: str
    desc: ModelDescription
    network: Any = None
    onnx_path: str | None = None

    @property
    def is_onnx(self) -> bool:
        return self.onnx_path is not None


def parse_source(text: str) -> str | ArchSource:
    """A folder path stays a path; `ARCH@pretrained` / `ARCH@FILE` becomes an ArchSource."""
    if os.path.isdir(text) or "@" not in text:
        return text
    arch, _, what = text.rpartition("@")
    if what == PRETRAINED_WORD:
        return ArchSource(arch, pretrained=True)
    return ArchSource(arch, weights=what)


def kind_of(path: str) -> str:
    """'model' for a model folder (model.onnx, no model.pt), else 'run'."""
    if os.path.exists(os.path.join(path, MODEL_FILE)) and \
            not os.path.exists(os.path.join(path, "model.pt")):
        return "model"
    return "run"  # load_runs names what a run folder lacks


def load_members(sources: list, taps: list[str] | None = None) -> list[Member]:
    """Each source (path, ArchSource or its text) as a Member; clear ExportErrors."""
    members = []
    for source in sources:
        source = parse_source(source) if isinstance(source, str) else source
        if isinstance(source, ArchSource):
            members.append(arch_member(source))
        elif kind_of(source) == "run":
            members.append(run_member(source))
        else:
            members.append(model_folder_member(source))
    if taps:
        for member in members:
            apply_taps(member, taps)
    return members


def load_runs(run_dirs: list[str]):
    """Load each run (weights only) -> list of (Network, ModelDescription); clear errors."""
    from train.models import load_run
    loaded = []
    for run_dir in run_dirs:
        if not os.path.isdir(run_dir):
            raise ExportError(f"{run_dir}: run folder not found")
        if not os.path.exists(os.path.join(run_dir, "description.json")):
            raise ExportError(f"{run_dir}: no description.json; is this a run folder written by "
                              "`train`?")
        try:
            loaded.append(load_run(run_dir))
        except FileNotFoundError as e:
            raise ExportError(str(e)) from e
        except (ValueError, json.JSONDecodeError) as e:
            raise ExportError(f"{run_dir}: unreadable description.json ({e})") from e
        except Exception as e:  # torch raises RuntimeError/EOFError/pickle errors for bad files
            raise ExportError(
                f"{run_dir}/model.pt is corrupt or does not match description.json "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). Re-run or resume training "
                "to rewrite it.") from e
    return loaded


def run_member(run_dir: str) -> Member:
    network, desc = load_runs([run_dir])[0]
    return Member(os.path.abspath(run_dir), desc, network=network)


def arch_member(source: ArchSource) -> Member:
    """The architecture with its starting weights, no heads (a plain pretrained model)."""
    from common.errors import UserError
    from train.models import Network, create_backbone, default_preprocessing
    from train.pretrained import load_starting_weights
    from train.runs import versions

    if not source.pretrained and not source.weights:
        raise ExportError(f"--arch {source.arch}: give --pretrained or --weights FILE (a plain "
                          "model folder needs real weights; a trained run is exported by its "
                          "folder)")
    try:
        backbone = create_backbone(source.arch, **source.arch_kwargs)
        info = load_starting_weights(backbone, source.arch, pretrained=source.pretrained,
                                     weights_file=source.weights)
        pre = default_preprocessing(source.arch, source.input_size)
    except (UserError, ValueError) as e:
        raise ExportError(str(e)) from e
    network = Network(backbone, []).eval()
    desc = ModelDescription(
        architecture=source.arch, feature_dim=network.feature_dim, preprocessing=pre,
        arch_kwargs=dict(source.arch_kwargs), method="pretrained",
        method_args={"weights": info}, versions=versions())
    return Member(source.label, desc, network=network)


def model_folder_member(model_dir: str) -> Member:
    """An exported or imported model folder, as an ONNX member (its fp32 model.onnx)."""
    from common.model_dir import ModelDir, ModelError
    try:
        md = ModelDir(model_dir)
        io = md.check_model("fp32")
        desc = md.description
    except ModelError as e:
        raise ExportError(str(e)) from e
    if "image" not in io["inputs"] or "embedding" not in io["outputs"]:
        raise ExportError(f"{model_dir}: its model.onnx has inputs {sorted(io['inputs'])} and "
                          f"outputs {sorted(io['outputs'])}; a member needs input 'image' and "
                          "output 'embedding'")
    return Member(os.path.abspath(model_dir), desc, onnx_path=md.model_path("fp32"))


def apply_taps(member: Member, taps: list[str]) -> None:
    """Replace a torch member's embedding by its multi-depth features (train.taps)."""
    from train.models import Network
    from train.taps import TapError, TappedBackbone
    if member.is_onnx:
        raise ExportError(f"--taps: {member.label} is a model folder (an ONNX graph); taps are "
                          "taken from PyTorch networks (runs and named architectures)")
    try:
        tapped = TappedBackbone(member.network.backbone, taps, member.desc.architecture)
    except TapError as e:
        raise ExportError(str(e)) from e
    member.network = Network(tapped, []).eval()
    member.desc = ModelDescription.from_dict(json.loads(json.dumps(member.desc.to_dict())))
    member.desc.extra = dict(member.desc.extra, taps=tapped.describe(),
                             untapped_feature_dim=member.desc.feature_dim)
    member.desc.feature_dim = tapped.feature_dim
