"""Which models a server serves: MODEL_DIR arguments and/or a repository folder.

    model_specs(["models/spe"], None, ["mnist=probes/mnist"], None)
    model_specs([], "models", [], None)      # models/*/ with their probes in models/*/probes/*/

A repository is a folder of model folders (each holding a model description); each is served
under its folder name, with the probes found in its `probes/NAME/` subfolders and the
similarity index in its `index/` subfolder (`cli.py index build FEATS --out REPO/NAME/index`).
`--probe MODEL:NAME=DIR` adds a probe to one model (`NAME=DIR` when only one is served).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from common.model_dir import DESCRIPTION_FILE, MODEL_FILE

from .model import parse_probe_specs

PROBES_SUBDIR = "probes"
INDEX_SUBDIR = "index"


@dataclass
class ModelSpec:
    model_dir: str
    name: str
    probes: dict[str, str] = field(default_factory=dict)
    index: str | None = None   # a similarity index found in the model folder (repository)


def folder_name(path: str) -> str:
    return os.path.basename(os.path.normpath(os.path.abspath(path)))


def _is_model_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MODEL_FILE)) or \
        os.path.isfile(os.path.join(path, DESCRIPTION_FILE))


def folder_probes(model_dir: str) -> dict[str, str]:
    """{name: dir} of the probe folders under MODEL_DIR/probes/ (none: {})."""
    base = os.path.join(model_dir, PROBES_SUBDIR)
    if not os.path.isdir(base):
        return {}
    return {entry: os.path.join(base, entry) for entry in sorted(os.listdir(base))
            if not entry.startswith(".") and os.path.isdir(os.path.join(base, entry))}


def folder_index(model_dir: str) -> str | None:
    """MODEL_DIR/index/ when it is a folder (its contents are checked when it is loaded)."""
    path = os.path.join(model_dir, INDEX_SUBDIR)
    return path if os.path.isdir(path) else None


def repository_models(repository: str) -> list[str]:
    if not os.path.isdir(repository):
        raise ValueError(f"--repository {repository}: not a folder")
    found = [os.path.join(repository, e) for e in sorted(os.listdir(repository))
             if not e.startswith(".") and _is_model_folder(os.path.join(repository, e))]
    if not found:
        raise ValueError(f"--repository {repository}: no model folder in it (each needs "
                         f"{MODEL_FILE} and {DESCRIPTION_FILE}; make one with `cli.py export`)")
    return found


def model_specs(model_dirs: list[str], repository: str | None, probe_specs: list[str],
                name: str | None) -> list[ModelSpec]:
    """The models to serve, named and with their probes; ValueError says what is wrong."""
    specs = [ModelSpec(d, folder_name(d)) for d in model_dirs]
    if repository:
        specs += [ModelSpec(d, folder_name(d), folder_probes(d), folder_index(d))
                  for d in repository_models(repository)]
    if not specs:
        raise ValueError("give MODEL_DIR (one or more) or --repository DIR")
    if name:
        if len(specs) != 1:
            raise ValueError("--name names the one model served; with several, each is named "
                             "after its folder")
        specs[0].name = name
    names = [s.name for s in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"two model folders are both named {repeated[0]!r}; each model is "
                         "served under its folder name, so rename one")
    by_name = {s.name: s for s in specs}
    for spec in probe_specs:
        left, sep, path = spec.partition("=")
        model, colon, probe = left.rpartition(":")
        if not colon:
            if len(specs) != 1:
                raise ValueError(f"--probe {spec!r}: several models are served; write "
                                 f"MODEL:NAME=PROBE_DIR with MODEL one of {', '.join(names)}")
            model = specs[0].name
        if model not in by_name:
            raise ValueError(f"--probe {spec!r}: no served model is named {model!r}; "
                             f"choose from {', '.join(names)}")
        target = by_name[model]
        (probe_name, probe_dir), = parse_probe_specs([f"{probe}{sep}{path}"]).items()
        if probe_name in target.probes:
            raise ValueError(f"--probe {probe_name!r} is given twice for model {model!r}")
        target.probes[probe_name] = probe_dir
    return specs
