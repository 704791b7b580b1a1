"""State dicts from files, never unpickled, fitted to a backbone with one-line errors.

`read_state_dict(path)` reads `.safetensors` (safetensors) or `.pth`/`.pt`/`.bin`/`.ckpt`
(torch.load with weights_only=True: tensors and plain containers only, no code runs). A checkpoint
that wraps the weights (`{"state_dict": {...}}`, `{"model": {...}}`) is unwrapped, and the
`module.` prefix DistributedDataParallel adds is removed.

`fit_state_dict(module, state, classifier_prefixes, source)` loads it into `module`: keys under a
classifier prefix are dropped (a backbone has no classifier; its size may differ anyway), a
tensor whose shape differs is a one-line error naming it, and missing or unexpected keys are one
line listing them. Only BatchNorm's `num_batches_tracked` may be absent (old torchvision files
lack it; it is not used in evaluation).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from common.errors import UserError

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
SHOWN = 4  # key names shown per list in an error line


class WeightsError(UserError, ValueError):
    """A weights file that cannot be read, or that does not fit the architecture."""


def _names(keys, shown: int = SHOWN) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """{name: tensor} from a weights file (see the module docstring); WeightsError if unreadable."""
    if not os.path.isfile(path):
        raise WeightsError(f"--weights {path}: no such file")
    lower = path.lower()
    if lower.endswith(SAFETENSORS_SUFFIXES):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            state = load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"--weights {path}: not a readable safetensors file "
                               f"({str(e).splitlines()[0][:160]})") from e
    elif lower.endswith(TORCH_SUFFIXES):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError (refused object), EOFError, RuntimeError (zip)
            raise WeightsError(f"--weights {path}: not a plain state dict that loads with "
                               f"weights_only=True ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:160] if str(e) else 'truncated'})") from e
    else:
        raise WeightsError(f"--weights {path}: unknown file type; give a .safetensors, .pth, "
                           ".pt, .bin or .ckpt file")
    return _unwrap(state, path)


def _unwrap(state, path: str) -> dict[str, torch.Tensor]:
    for _ in range(2):  # {"model": {"state_dict": ...}} at most
        if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
            inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
            if inner is not None:
                state = inner
    if not isinstance(state, dict) or not state:
        raise WeightsError(f"--weights {path}: holds no state dict (a mapping of names to tensors)")
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"--weights {path}: holds no tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def fit_state_dict(module: nn.Module, state: dict[str, torch.Tensor],
                   classifier_prefixes: tuple[str, ...], source: str) -> dict:
    """Load `state` into `module` (see the module docstring). Returns what was dropped."""
    dropped = sorted(k for k in state if k.startswith(classifier_prefixes))
    state = {k: v for k, v in state.items() if k not in set(dropped)}
    own = module.state_dict()
    for name, tensor in state.items():
        if name in own and tuple(own[name].shape) != tuple(tensor.shape):
            raise WeightsError(
                f"{source}: tensor {name} has shape {list(tensor.shape)} in the file but "
                f"{list(own[name].shape)} in the model; the file is for another architecture or "
                "configuration")
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = ([f"{len(missing)} missing ({_names(missing)})"] if missing else []) + \
            ([f"{len(unexpected)} unexpected ({_names(unexpected)})"] if unexpected else [])
        raise WeightsError(f"{source}: the file does not fit this architecture: "
                           + "; ".join(parts) + " (key names must be the framework's own)")
    module.load_state_dict(state, strict=False)
    return {"classifier_keys_dropped": len(dropped)}


def file_fingerprint(path: str) -> dict:
    """What the description records about a weights file: its name, size and SHA-256."""
    import hashlib
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"file": os.path.abspath(path), "bytes": os.path.getsize(path),
            "sha256": digest.hexdigest()}
