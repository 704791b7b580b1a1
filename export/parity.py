"""Numerical proof that an exported graph computes what PyTorch computes, on real images.

Every check runs a *fresh* onnxruntime session (CPUExecutionProvider) at batch size 1 and at a
larger odd size (7: odd sizes catch kernels that silently assume even batches), compares each
output with the reference and records the largest absolute difference (also relative to the
output's scale) and the smallest cosine similarity between matching rows.
"""
from __future__ import annotations

import sys

import numpy as np

from common.description import ModelDescription, Preprocessing

from .onnx_files import ExportError

BATCH_SIZES = (1, 7)
# fp32 graphs from either exporter match eager PyTorch to ~1e-6 relative; these bounds leave
# room for reordered reductions while catching any real mistake (a wrong op, a missed fold).
FP32_RTOL, FP32_ATOL, FP32_MIN_COSINE = 1e-3, 1e-5, 0.9999


def _error(message: str) -> Exception:
    return ExportError(message)


# ---------------------------------------------------------------------------------------------
# Real images

def data_specs(descs: list[ModelDescription]) -> list[str]:
    specs = []
    for desc in descs:
        spec = (desc.data or {}).get("spec")
        if spec and spec not in specs:
            specs.append(spec)
    return specs


def resolve_dataset(descs: list[ModelDescription], check_data: str | None):
    """The runs' own training data if it can be loaded here, else `check_data`."""
    from common.data import load_dataset
    tried = []
    for spec in data_specs(descs) + ([check_data] if check_data else []):
        try:
            return load_dataset(spec), spec
        except Exception as e:  # DataError, missing folder, missing data package
            tried.append(f"{spec}: {e}")
    detail = "; ".join(tried) if tried else "the run's description names no data spec"
    raise _error(f"no real images to check parity against ({detail}). Pass --check-data DATA "
                 "(a folder or a built-in such as fashion-mnist) with images like the training "
                 "data.")


def pick_samples(dataset, n: int, seed: int = 0, prefer_split: str = "train"
                 ) -> list[tuple[str, int]]:
    """Up to n (path, leaf label) pairs, seeded, spread evenly over the leaf classes."""
    split = prefer_split if prefer_split in dataset.splits else next(iter(dataset.splits))
    samples = dataset.splits[split]
    if len(samples) < n:
        samples = dataset.all_samples()
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[tuple[str, int]]] = {}
    for k in rng.permutation(len(samples)):
        by_class.setdefault(samples[k][1], []).append(samples[k])
    picked, queues = [], [by_class[c] for c in sorted(by_class)]
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop())
    return picked


def decode_images(paths: list[str], pre: Preprocessing, desc: str = "decode"
                  ) -> tuple[np.ndarray, list[int]]:
    """Preprocess each path with the reference transform; undecodable files are reported and
    skipped. Returns the batch and the indices of the paths kept."""
    from tqdm import tqdm

    from common.images import ImageDecodeError, preprocess
    arrays, kept = [], []
    for i, path in enumerate(tqdm(paths, desc=desc, file=sys.stderr, leave=False,
                                  disable=len(paths) < 64)):
        try:
            arrays.append(preprocess(path, pre))
            kept.append(i)
        except ImageDecodeError as e:
            print(f"skipped: {e}", file=sys.stderr)
    if not arrays:
        raise _error("none of the images could be decoded")
    if len(kept) < len(paths):
        print(f"skipped {len(paths) - len(kept)} undecodable image(s)", file=sys.stderr)
    return np.stack(arrays).astype(np.float32), kept


# Real images for models that name no training data (plain pretrained architectures): the first
# of these built-ins that loads here.
DEFAULT_CHECK_DATA = ("fashion-mnist:per_class=20", "digits")


def default_check_data(descs: list[ModelDescription]) -> str | None:
    """None when a description names its data; else the first DEFAULT_CHECK_DATA that loads."""
    if data_specs(descs):
        return None
    from common.data import load_dataset
    for spec in DEFAULT_CHECK_DATA:
        try:
            load_dataset(spec)
            return spec
        except Exception:  # DataError, missing data package: try the next
            continue
    return None


def load_check_images(descs: list[ModelDescription], check_data: str | None, n: int
                      ) -> tuple[np.ndarray, dict]:
    """n preprocessed real images for parity, from the runs' data (or `check_data`)."""
    dataset, spec = resolve_dataset(descs, check_data)
    samples = pick_samples(dataset, n)
    images, kept = decode_images([p for p, _ in samples], descs[0].preprocessing, "parity images")
    return images, {"data": spec, "count": len(kept), "classes": len({samples[i][1] for i in kept})}


def load_labelled_images(spec: str, n: int, pre: Preprocessing, level: int = -1
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Up to n real images of `spec` with labels at `level`, spread evenly over the classes."""
    from common.data import load_dataset
    dataset = load_dataset(spec)
    samples = pick_samples(dataset, n, seed=1)
    images, kept = decode_images([p for p, _ in samples], pre, f"images of {spec}")
    leaf = np.array([samples[i][1] for i in kept])
    return images, dataset.leaf_to_level[level][leaf]


# ---------------------------------------------------------------------------------------------
# Running and comparing

def torch_outputs(module, images: np.ndarray, output_names: list[str], batch_size: int = 16
                  ) -> dict[str, np.ndarray]:
    import torch
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in output_names}
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            outs = module(torch.from_numpy(images[start:start + batch_size]))
            for name, out in zip(output_names, outs):
                chunks[name].append(out.float().numpy())
    return {n: np.concatenate(c) for n, c in chunks.items()}


def new_session(model_path: str):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])


def run_onnx(model_path: str, images: np.ndarray, batch_size: int, session=None,
             progress: str | None = None) -> dict[str, np.ndarray]:
    """Outputs of the ONNX model over `images` in batches of `batch_size` (a fresh session unless
    one is given), as float32; a progress bar titled `progress` when given."""
    from tqdm import tqdm
    session = session or new_session(model_path)
    names = [o.name for o in session.get_outputs()]
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=progress, file=sys.stderr, leave=False,
                      disable=progress is None or len(starts) < 4):
        outs = session.run(names, {"image": images[start:start + batch_size]})
        for name, out in zip(names, outs):
            chunks[name].append(np.asarray(out, dtype=np.float32))
    return {n: np.concatenate(c) for n, c in chunks.items()}


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = (a * b).sum(axis=1)
    both_zero = (na < 1e-12) & (nb < 1e-12)  # two all-zero rows agree
    cos = dot / np.maximum(na * nb, 1e-24)
    return np.where(both_zero, 1.0, cos)


def compare(reference: np.ndarray, got: np.ndarray) -> dict:
    if reference.shape != got.shape:
        return {"shape_reference": list(reference.shape), "shape": list(got.shape), "ok": False}
    diff = np.abs(reference.astype(np.float64) - got.astype(np.float64))
    scale = float(np.abs(reference).max()) if reference.size else 0.0
    cos = cosine_rows(reference, got)
    finite = bool(np.isfinite(got).all())
    return {"max_abs_diff": float(diff.max()) if diff.size else 0.0, "scale": scale,
            "max_rel_diff": float(diff.max() / scale) if scale and diff.size else 0.0,
            "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()), "finite": finite}


def within_fp32_tolerance(figures: dict) -> bool:
    if "max_abs_diff" not in figures or not figures["finite"]:
        return False
    tolerance = FP32_RTOL * figures["scale"] + FP32_ATOL
    return figures["max_abs_diff"] <= tolerance and figures["min_cosine"] >= FP32_MIN_COSINE


def _merge(per_batch: dict[int, dict[str, dict]]) -> dict:
    """Worst figures over batch sizes, per output, plus the per-batch detail."""
    outputs: dict[str, dict] = {}
    for figures_by_name in per_batch.values():
        for name, fig in figures_by_name.items():
            worst = outputs.setdefault(name, dict(fig))
            if "max_abs_diff" in fig and "max_abs_diff" in worst:
                worst["max_abs_diff"] = max(worst["max_abs_diff"], fig["max_abs_diff"])
                worst["max_rel_diff"] = max(worst["max_rel_diff"], fig["max_rel_diff"])
                worst["min_cosine"] = min(worst["min_cosine"], fig["min_cosine"])
                worst["mean_cosine"] = min(worst["mean_cosine"], fig["mean_cosine"])
                worst["finite"] = worst["finite"] and fig["finite"]
    for fig in outputs.values():
        fig["tolerance_abs"] = FP32_RTOL * fig.get("scale", 0.0) + FP32_ATOL
        fig["min_cosine_required"] = FP32_MIN_COSINE
        fig["ok"] = within_fp32_tolerance(fig)
    return {"batch_sizes": list(per_batch), "outputs": outputs,
            "ok": all(f["ok"] for f in outputs.values())}


def _failure_message(label: str, result: dict) -> str:
    nan = float("nan")
    bad = [f"{name}: max abs diff {f.get('max_abs_diff', nan):.3g} "
           f"(allowed {f['tolerance_abs']:.3g}), min cosine {f.get('min_cosine', nan):.6f} "
           f"(required {f['min_cosine_required']})"
           + ("" if f.get("finite", True) else ", non-finite values")
           for name, f in result["outputs"].items() if not f["ok"]]
    return f"{label} parity failed, nothing written: " + "; ".join(bad)


def check_parity(model_path: str, reference: dict[str, np.ndarray], images: np.ndarray,
                 batch_sizes=BATCH_SIZES) -> dict:
    """onnxruntime (a fresh session per batch size) against reference outputs; raise on failure."""
    per_batch = {}
    for bs in batch_sizes:
        got = run_onnx(model_path, images, bs)
        missing = set(reference) - set(got)
        if missing:
            raise _error(f"exported graph lacks outputs {sorted(missing)}")
        per_batch[bs] = {name: compare(reference[name], got[name]) for name in reference}
    result = _merge(per_batch)
    result["sessions"] = "a fresh CPUExecutionProvider session per batch size"
    if not result["ok"]:
        raise _error(_failure_message("onnxruntime vs PyTorch", result))
    return result


def check_against(model_path: str, run_fn, images: np.ndarray, label: str,
                  batch_sizes=BATCH_SIZES) -> dict:
    """Another executor (`run_fn(batch) -> {name: array}`) against onnxruntime, on the first
    image at batch 1 and the first `max(batch_sizes)` images in one batch."""
    session = new_session(model_path)
    per_batch = {}
    for bs in batch_sizes:
        batch = images[:bs]
        reference = run_onnx(model_path, batch, bs, session=session)
        got = run_fn(batch)
        missing = set(reference) - set(got)
        if missing:
            raise _error(f"{label} nets lack outputs {sorted(missing)}")
        per_batch[bs] = {n: compare(reference[n], np.asarray(got[n], np.float32))
                         for n in reference}
    result = _merge(per_batch)
    result["reference"] = "onnxruntime"
    if not result["ok"]:
        raise _error(_failure_message(f"{label} vs onnxruntime", result))
    return result
