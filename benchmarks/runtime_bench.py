"""The runtime benchmark: onnxruntime pipeline against PyTorch, side by side in one process.

Every speed figure is images/s, the median over `repeats`, and the configurations are timed
round robin (one repeat of each, then the next repeat) so that a change in the machine's load
hits all of them alike. Same model, batch size and thread count everywhere:

  model-only   ORT session on preprocessed arrays  vs  PyTorch eager (the source runs rebuilt)
  end-to-end   our FeaturePipeline on image files   vs  the usual PyTorch recipe: torchvision
               ImageFolder + DataLoader(num_workers=2) + Resize/CenterCrop/ToTensor/Normalize
               + eager model under torch.inference_mode (workers start anew each pass, as in a
               plain `for x, _ in loader` loop without persistent_workers)
  latency      one image file at a time through the pipeline plus a fitted probe: p50, p99
  INT8         model.int8.onnx against model.onnx: speed, and probe accuracy on a real target
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from common.model_dir import VARIANT_FILES

from .harness import Config, log, machine_info, pyplot, save_figure, time_round_robin, versions

FLOORS_NOTE = "floors set for resnet18 at 224 px, batch 32, on the 2-core CPU"
TORCH_RECIPE_WORKERS = 2


# ---------------------------------------------------------------------------------------------
# images

def image_files(root: str, limit: int | None = None) -> tuple[list[str], bool]:
    """(paths, is_imagefolder): the files torchvision's ImageFolder would read, in its order,
    when `root` has class folders; else every image under `root` (sorted)."""
    from torchvision.datasets import ImageFolder
    try:
        paths, as_folder = [p for p, _ in ImageFolder(root).samples], True
    except (FileNotFoundError, RuntimeError):  # no class folders: a flat folder of images
        from runtime.pipeline import iter_folder
        paths, as_folder = list(iter_folder(root)), False
    if not paths:
        raise FileNotFoundError(f"{root}: no image files")
    return paths[:limit] if limit else paths, as_folder


class _FileList:
    """A map-style dataset over image files for flat folders (ImageFolder needs class folders)."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from torchvision.datasets.folder import default_loader
        return self.transform(default_loader(self.paths[i])), 0


def torchvision_transform(pre):
    """The usual eval transform, written with torchvision: what a PyTorch user would run."""
    from torchvision import transforms as T
    interpolation = {"bilinear": T.InterpolationMode.BILINEAR,
                     "bicubic": T.InterpolationMode.BICUBIC,
                     "nearest": T.InterpolationMode.NEAREST}[pre.interpolation]
    return T.Compose([T.Resize(pre.resize_size, interpolation=interpolation),
                      T.CenterCrop(pre.input_size), T.ToTensor(),
                      T.Normalize(pre.mean, pre.std)])


# ---------------------------------------------------------------------------------------------
# the PyTorch side

def resolve_source_runs(desc, model_dir: str) -> list[str]:
    """The runs the model was exported from, found as recorded or relative to MODEL_DIR."""
    if not desc.source_runs:
        raise FileNotFoundError(f"{model_dir}: the description names no source runs (an "
                                "imported ONNX, or an architecture exported without a run), so "
                                "there is no PyTorch model to time beside it")
    found = []
    for run in desc.source_runs:
        candidates = [run, os.path.join(model_dir, run), os.path.join(os.path.dirname(
            os.path.abspath(model_dir)), run)]
        hit = next((c for c in candidates if os.path.exists(os.path.join(c, "model.pt"))), None)
        if hit is None:
            raise FileNotFoundError(f"source run {run!r} of {model_dir} not found (no model.pt); "
                                    "the PyTorch side of the benchmark rebuilds it from there")
        found.append(hit)
    return found


def torch_model(run_dirs: list[str]):
    """The same network (or combination) in PyTorch eager, returning the embedding only."""
    import torch

    from export.onnx_export import build_export_module, load_runs
    graph = build_export_module([net for net, _ in load_runs(run_dirs)], logits=False)

    class EmbeddingOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.graph = graph

        def forward(self, x):
            return self.graph(x)[0]

    return EmbeddingOnly().eval()


def torch_model_only(model, arrays: np.ndarray, batch_size: int) -> int:
    import torch
    with torch.inference_mode():
        for i in range(0, len(arrays), batch_size):
            model(torch.from_numpy(arrays[i:i + batch_size]))
    return len(arrays)


def torch_recipe(model, root: str, paths: list[str], as_folder: bool, pre, batch_size: int,
                 workers: int = TORCH_RECIPE_WORKERS) -> int:
    """ImageFolder + DataLoader + eager model, from files on disk to embeddings."""
    import torch
    from torch.utils.data import DataLoader, Subset
    from torchvision.datasets import ImageFolder
    transform = torchvision_transform(pre)
    if as_folder:
        dataset = ImageFolder(root, transform=transform)
        if len(paths) < len(dataset):  # --limit, or files skipped as undecodable
            wanted = set(paths)
            dataset = Subset(dataset, [i for i, (p, _) in enumerate(dataset.samples)
                                       if p in wanted])
    else:
        dataset = _FileList(paths, transform)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    seen = 0
    with torch.inference_mode():
        for x, _ in loader:
            model(x)
            seen += len(x)
    return seen


# ---------------------------------------------------------------------------------------------
# our side

def pipeline(model_dir: str, variant: str, batch_size: int, threads: int,
             decode_threads: int | None, fast_decode: bool = True):
    from runtime.pipeline import FeaturePipeline
    return FeaturePipeline(model_dir, device="cpu", threads=threads, decode_threads=decode_threads,
                           batch_size=batch_size, variant=variant, fast_decode=fast_decode)


def ours_end_to_end(pipe, paths: list[str]) -> int:
    result = pipe.embed(paths)
    if result.errors:
        raise RuntimeError(f"{len(result.errors)} image(s) failed: "
                           f"{next(iter(result.errors.values()))}")
    return len(result)


def ours_model_only(pipe, arrays: np.ndarray) -> int:
    pipe.embed_arrays(arrays)
    return len(arrays)


# ---------------------------------------------------------------------------------------------
# latency

def latency(pipe, probe, paths: list[str], count: int, warmup: int = 3) -> dict:
    """Single image file -> embedding -> probe prediction, one at a time: milliseconds."""
    paths = [paths[i % len(paths)] for i in range(count + warmup)]
    times: list[float] = []
    for i, path in enumerate(paths):
        t0 = time.perf_counter()
        result = pipe.embed(path)
        probe.predict(result.vectors)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
    ms = np.array(times)
    return {"images": int(len(ms)), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "mean_ms": round(float(ms.mean()), 2)}


# ---------------------------------------------------------------------------------------------
# probes on a real target

def target_splits(spec: str):
    """(train paths, train labels, test paths, test labels) of a labelled dataset; a seeded
    stratified half split when it has no test split."""
    from common.data import load_dataset, stratified_split
    data = load_dataset(spec)
    if data.has_test_split and "train" in data.splits:
        return (data.paths("train"), data.labels("train"), data.paths("test"),
                data.labels("test"))
    split = next(iter(data.splits))
    paths, labels = data.paths(split), data.labels(split)
    train, test = stratified_split(labels, 0.5, seed=0)
    return ([paths[i] for i in train], labels[train], [paths[i] for i in test], labels[test])


def embed_ok(pipe, paths, labels):
    result = pipe.embed(paths)
    ok = result.ok
    return result.vectors[ok], np.asarray(labels)[ok]


def probe_accuracy(pipe, splits) -> tuple[float, object]:
    """The project's probe protocol: logistic regression on train embeddings, C chosen on a
    validation part of them, accuracy on the held-out test split."""
    from runtime.probes import LogisticRegressionProbe
    train_paths, train_labels, test_paths, test_labels = splits
    Xtr, ytr = embed_ok(pipe, train_paths, train_labels)
    Xte, yte = embed_ok(pipe, test_paths, test_labels)
    probe = LogisticRegressionProbe(blas_threads=pipe.threads_).fit(Xtr, ytr)
    return float(probe.score(Xte, yte)), probe


def make_int8(model_dir: str, calib_paths: list[str], pre) -> str:
    """Write MODEL_DIR/model.int8.onnx (static QDQ, like `export --int8`), atomically."""
    from common.model_dir import ModelDir
    from export.parity import decode_images
    from export.variants import make_int8 as quantise
    md = ModelDir(model_dir)
    desc = md.description
    calib, _ = decode_images(calib_paths, pre, "calibration images")
    out = md.file(VARIANT_FILES["int8"])
    fd, tmp = tempfile.mkstemp(prefix=".int8-", suffix=".onnx", dir=model_dir)
    os.close(fd)
    try:
        quantise(md.model_path("fp32"), tmp, desc.to_dict(), calib)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


# ---------------------------------------------------------------------------------------------
# the whole benchmark

def run_benchmark(model_dir: str, images: str | None = None, batch_size: int = 32,
                  threads: int | None = None, decode_threads: int | None = None,
                  repeats: int = 3, target: str | None = "fashion-mnist:per_class=60",
                  int8: bool | None = None, limit: int | None = None,
                  latency_images: int = 100, calib_images: int = 200,
                  fast_decode: bool = True) -> dict:
    """Measure everything (see module docstring); returns the report dict.

    int8: None = include INT8 if model.int8.onnx exists; True = make it if missing (calibrated
    on `calib_images` files of the image folder); False = leave INT8 out. target: labelled real
    data for the probes (None: latency uses a probe fitted on the image folder's classes).
    fast_decode=False times the pipeline's exact reference decode instead of the fast one."""
    import torch

    from common.model_dir import ModelDir
    from runtime.providers import available_cores

    threads = threads or available_cores()
    torch.set_num_threads(threads)
    md = ModelDir(model_dir)
    md.check_model("fp32")  # a missing or corrupt model.onnx: one ModelError line
    desc = md.description
    report: dict = {"model_dir": os.path.abspath(model_dir), "architecture": desc.architecture,
                    "combination": desc.combination, "feature_dim": desc.feature_dim,
                    "input_size": desc.preprocessing.input_size, "batch_size": batch_size,
                    "repeats": repeats, "machine": machine_info(), "versions": versions()}
    images = images or _default_corpus()
    paths, as_folder = image_files(images, limit)
    report["images"] = _images_section(images, paths, as_folder)
    use_int8 = _int8_variant(report, md, int8, paths[:calib_images])

    log("bench: loading the ONNX pipeline(s) and the PyTorch model (when it can be rebuilt)")
    fp32 = pipeline(model_dir, "fp32", batch_size, threads, decode_threads, fast_decode)
    q8 = (pipeline(model_dir, "int8", batch_size, threads, decode_threads, fast_decode)
          if use_int8 else None)
    model = _torch_side(report, desc, model_dir)
    report["threads"] = _threads_section(fp32, torch.get_num_threads())
    arrays, paths = _model_inputs(fp32, paths, images, report)
    _warm_up([p for p in (fp32, q8) if p is not None], model, arrays[:batch_size], batch_size)
    configs = _speed_configs(fp32, q8, model, arrays, paths, (images, as_folder),
                             desc.preprocessing, batch_size)
    report["speed"] = time_round_robin(configs, repeats)
    del arrays, configs  # frees the decoded images
    report["ratios"] = _ratios(report["speed"])
    probe = _probe_section(report, fp32, q8, target, paths, threads)
    log(f"bench: single-image latency ({latency_images} images)")
    report["latency"] = latency(fp32, probe, paths, latency_images)
    for pipe in filter(None, (fp32, q8)):
        pipe.close()
    report["machine"]["load_average_end"] = machine_info()["load_average"]
    # the pipeline may grow its decode workers while the model waits for images
    report["threads"]["decode_end"] = getattr(fp32, "decode_parallelism_", fp32.decode_threads_)
    report["floors"] = floors(report)
    return report


def _torch_side(report: dict, desc, model_dir: str):
    """The PyTorch eager model rebuilt from the source runs, or None (an imported ONNX, a
    folder whose runs are elsewhere): then only our side is timed, and the report says why."""
    try:
        model = torch_model(resolve_source_runs(desc, model_dir))
    except FileNotFoundError as e:
        report["pytorch"] = f"left out: {e}"
        log(f"bench: PyTorch side {report['pytorch']}")
        return None
    report["pytorch"] = "measured"
    return model


def _default_corpus() -> str:
    from .corpus import ensure_corpus
    log("bench: building (or reusing) the JPEG corpus")
    return ensure_corpus()


def _images_section(images: str, paths: list[str], as_folder: bool) -> dict:
    from .corpus import corpus_info
    return {"folder": os.path.abspath(images), "count": len(paths), "imagefolder": as_folder,
            "corpus": corpus_info(images),
            "mean_kb": round(sum(os.path.getsize(p) for p in paths) / len(paths) / 1024, 1)}


def _int8_variant(report: dict, md, int8: bool | None, calib_paths: list[str]) -> bool:
    """Whether INT8 is measured (made first when `int8` asks for it and it is missing); says
    which in report["int8"]."""
    int8_path = md.file(VARIANT_FILES["int8"])
    if int8 and not os.path.exists(int8_path):
        log(f"bench: no model.int8.onnx; quantising with {len(calib_paths)} "
            "calibration images of the image folder")
        make_int8(md.path, calib_paths, md.description.preprocessing)
        report["int8_made_by_bench"] = True
    use_int8 = int8 is not False and os.path.exists(int8_path)
    report["int8"] = ("measured" if use_int8 else "left out (--no-int8)" if int8 is False
                      else "no model.int8.onnx (pass --int8 to make one)")
    return use_int8


def _threads_section(fp32, torch_threads: int) -> dict:
    return {"intra_op": fp32.threads_, "decode": fp32.decode_threads_,
            "stream_workers": fp32.stream_workers_, "stream_intra_op": fp32.stream_threads_,
            "normalize_in_model": fp32.normalize_in_model_, "torch": torch_threads,
            "torch_recipe_workers": TORCH_RECIPE_WORKERS, "fast_decode": fp32.fast_decode}


def _model_inputs(fp32, paths: list[str], images: str, report: dict
                  ) -> tuple[np.ndarray, list[str]]:
    """The preprocessed arrays of the model-only figures, and the files both sides then read
    (those that decode: an undecodable file is skipped on both sides, and said)."""
    log(f"bench: preprocessing {len(paths)} images for the model-only figures")
    arrays, errors = fp32.preprocess(paths)
    if errors:
        for position, message in sorted(errors.items()):
            log(f"bench: skipped {paths[position]}: {message}")
        paths = [p for i, p in enumerate(paths) if i not in errors]
        report["images"].update(count=len(paths), skipped=len(errors))
        if not paths:
            raise FileNotFoundError(f"{images}: none of the images could be decoded")
    return arrays, paths


def _warm_up(pipes: list, model, warm: np.ndarray, batch_size: int) -> None:
    log("bench: warm-up")
    for pipe in pipes:
        pipe.embed_arrays(warm)  # the float-input model (model-only figures)
        pipe.warmup()            # the session embed() runs (uint8 input when normalised inside)
    if model is not None:
        torch_model_only(model, warm, batch_size)


def _speed_configs(fp32, q8, model, arrays: np.ndarray, paths: list[str],
                   folder: tuple[str, bool], pre, batch_size: int) -> list[Config]:
    """The configurations timed round robin: both sides model-only and end to end (INT8 too
    when `q8`); `folder` is (the image folder, whether it has class folders)."""
    images, as_folder = folder
    configs = [
        Config("ort_model_only_fp32", "ORT model-only fp32",
               lambda: ours_model_only(fp32, arrays), []),
        Config("ours_end_to_end_fp32", "ours end-to-end fp32",
               lambda: ours_end_to_end(fp32, paths), []),
    ]
    if model is not None:
        configs[1:1] = [Config("torch_model_only", "PyTorch eager model-only",
                               lambda: torch_model_only(model, arrays, batch_size), [])]
        configs.append(Config("torch_recipe_end_to_end", "PyTorch recipe end-to-end",
                              lambda: torch_recipe(model, images, paths, as_folder, pre,
                                                   batch_size), []))
    if q8 is not None:
        configs += [Config("ort_model_only_int8", "ORT model-only int8",
                           lambda: ours_model_only(q8, arrays), []),
                    Config("ours_end_to_end_int8", "ours end-to-end int8",
                           lambda: ours_end_to_end(q8, paths), [])]
    return configs


def _ratios(speed: dict) -> dict:
    rate = {k: v["images_per_s"] for k, v in speed.items()}
    # (ratio, numerator, denominator): a ratio is given when both were timed
    wanted = [
        ("model_only_ort_vs_torch", "ort_model_only_fp32", "torch_model_only"),
        ("end_to_end_ours_vs_torch_recipe", "ours_end_to_end_fp32", "torch_recipe_end_to_end"),
        ("end_to_end_fraction_of_model_only", "ours_end_to_end_fp32", "ort_model_only_fp32"),
        ("int8_vs_fp32_model_only", "ort_model_only_int8", "ort_model_only_fp32"),
        ("int8_vs_fp32_end_to_end", "ours_end_to_end_int8", "ours_end_to_end_fp32"),
        ("int8_end_to_end_vs_torch_recipe", "ours_end_to_end_int8", "torch_recipe_end_to_end"),
        ("int8_end_to_end_fraction_of_model_only", "ours_end_to_end_int8",
         "ort_model_only_int8"),
    ]
    return {name: round(rate[a] / rate[b], 3) for name, a, b in wanted
            if a in rate and b in rate}


def _probe_section(report: dict, fp32, q8, target: str | None, paths: list[str],
                   threads: int):
    """Probe accuracy on the target (fp32, int8) into report["probe"]; returns the probe the
    latency figure uses (without a target: one fitted on the image folder's own classes)."""
    accuracy = {}
    if target:
        log(f"bench: probe accuracy on {target} (fp32)")
        splits = target_splits(target)
        accuracy["fp32"], probe = probe_accuracy(fp32, splits)
        if q8 is not None:
            log(f"bench: probe accuracy on {target} (int8)")
            accuracy["int8"], _ = probe_accuracy(q8, splits)
    else:  # no target: a probe on the image folder's own classes, for the latency only
        from runtime.probes import LogisticRegressionProbe
        labels = [os.path.basename(os.path.dirname(p)) for p in paths]
        if len(set(labels)) < 2:  # flat folder: any two groups will do to time a prediction
            labels = [f"group{i % 2}" for i in range(len(paths))]
        X, y = embed_ok(fp32, paths, labels)
        probe = LogisticRegressionProbe(blas_threads=threads).fit(X, y)
    report["probe"] = {"target": target, "probe": "logreg",
                       "train_test": [len(splits[1]), len(splits[3])] if target else None,
                       "accuracy": {k: round(v, 4) for k, v in accuracy.items()}}
    if "int8" in accuracy:
        report["probe"]["int8_change_points"] = round(100 * (accuracy["int8"] - accuracy["fp32"]),
                                                      2)
    return probe


def floors(report: dict) -> list[dict]:
    """The issue's floors as figures (PASS/MISS), never assertions."""
    r = report["ratios"]
    rows: list[tuple[str, float, float | None]] = []
    if "end_to_end_ours_vs_torch_recipe" in r:
        rows.append(("end-to-end fp32 >= 1.9x PyTorch recipe",
                     r["end_to_end_ours_vs_torch_recipe"], 1.9))
    rows.append(("end-to-end fp32 >= 95% of ORT model-only",
                 r["end_to_end_fraction_of_model_only"], 0.95))
    if "int8_end_to_end_vs_torch_recipe" in r:
        rows.append(("end-to-end int8 >= 3x PyTorch recipe", r["int8_end_to_end_vs_torch_recipe"],
                     3.0))
    change = report["probe"].get("int8_change_points")
    if change is not None:
        rows.append(("int8 probe accuracy lost <= 0.5 point", -change, None))
    out = []
    for name, value, floor in rows:
        passed = value >= floor if floor is not None else value <= 0.5
        out.append({"floor": name, "value": value + 0.0, "pass": bool(passed)})  # no -0.0
    return out


# ---------------------------------------------------------------------------------------------
# printing and writing

def format_report(report: dict) -> str:
    m, t, s, r = report["machine"], report["threads"], report["speed"], report["ratios"]
    v = report["versions"]
    if t.get("stream_workers"):
        ours = (f"pipeline {t['stream_workers']} workers x {t['stream_intra_op']} intra-op "
                "(each decodes a batch, then runs it)")
    else:
        ours = f"decode {t['decode']}"
    lines = [
        f"machine   {m['cpu']}; {m['usable_cores']} usable of {m['logical_cores']} logical cores;"
        f" load average {m['load_average']}",
        "versions  " + ", ".join(f"{k} {x}" for k, x in v.items()),
        f"model     {report['architecture']} ({report['feature_dim']}-d) at "
        f"{report['input_size']} px, batch {report['batch_size']}, median of "
        f"{report['repeats']}",
        f"images    {report['images']['count']} files, {report['images']['mean_kb']} KB mean, "
        f"{report['images']['folder']}",
        f"threads   onnxruntime intra-op {t['intra_op']}, {ours}; "
        + (f"torch {t['torch']}; PyTorch recipe DataLoader workers "
           f"{t['torch_recipe_workers']}; " if "torch_model_only" in s else "")
        + f"{'fast' if t['fast_decode'] else 'exact'} decode"
        + (", normalised in the model" if t.get("normalize_in_model") else "")
        + (f" (decode workers grew to {t['decode_end']})"
           if t.get("decode_end", t["decode"]) != t["decode"] else ""),
        *([] if report.get("pytorch", "measured") == "measured"
          else [f"PyTorch   {report['pytorch']}"]),
        "",
        "1. model-only (preprocessed arrays)",
        _speed_line("onnxruntime fp32", s["ort_model_only_fp32"]),
        *_torch_lines(s, r, "torch_model_only", "PyTorch eager", "model_only_ort_vs_torch"),
        "2. end-to-end (JPEG files -> embeddings)",
        _speed_line("ours fp32", s["ours_end_to_end_fp32"]),
        *_torch_lines(s, r, "torch_recipe_end_to_end", "PyTorch recipe",
                      "end_to_end_ours_vs_torch_recipe"),
        f"   of our model-only     {100 * r['end_to_end_fraction_of_model_only']:7.1f} %",
        "3. single-image latency (file -> embedding -> probe)",
        f"   p50 {report['latency']['p50_ms']:.1f} ms, p99 {report['latency']['p99_ms']:.1f} ms "
        f"over {report['latency']['images']} images",
    ]
    p = report["probe"]
    if "ort_model_only_int8" in s:
        lines += [
            "4. INT8 vs FP32",
            f"   model-only int8       {s['ort_model_only_int8']['images_per_s']:8.1f} images/s"
            f" ({r['int8_vs_fp32_model_only']:.2f}x fp32; "
            f"{s['ort_model_only_int8']['cpu_ms_per_image']:.1f} CPU ms/image)",
            f"   end-to-end int8       {s['ours_end_to_end_int8']['images_per_s']:8.1f} images/s"
            f" ({r['int8_vs_fp32_end_to_end']:.2f}x fp32"
            + (f", {r['int8_end_to_end_vs_torch_recipe']:.2f}x PyTorch recipe)"
               if "int8_end_to_end_vs_torch_recipe" in r else ")"),
        ]
        if "int8" in p["accuracy"]:
            lines.append(f"   probe accuracy on {p['target']}: fp32 "
                         f"{100 * p['accuracy']['fp32']:.2f}%, int8 "
                         f"{100 * p['accuracy']['int8']:.2f}% "
                         f"({p['int8_change_points']:+.2f} points)")
    else:
        lines.append(f"4. INT8 vs FP32: {report['int8']}")
        if "fp32" in p["accuracy"]:
            lines.append(f"   probe accuracy on {p['target']}: fp32 "
                         f"{100 * p['accuracy']['fp32']:.2f}%")
    # Only the load seen before starting says whether others were busy: the load at the end
    # counts this benchmark's own threads.
    start = m["load_average"]
    if start and start[0] > 0.5 * m["usable_cores"] + 0.5:
        lines += ["", f"WARNING: the machine was busy (1-min load average {start[0]} before "
                      f"starting, on {m['usable_cores']} cores): these timings "
                      "are noisy, and multi-threaded PyTorch (OpenMP) suffers most from shared "
                      "cores. Rerun on a quiet machine for figures to quote."]
    lines += ["", f"floors ({FLOORS_NOTE}):"]
    for f in report["floors"]:
        lines.append(f"   {'PASS' if f['pass'] else 'MISS'}  {f['floor']}: {f['value']:.3f}")
    return "\n".join(lines)


def _speed_line(label: str, figures: dict) -> str:
    return (f"   {label:22s}{figures['images_per_s']:8.1f} images/s"
            f"  ({figures['cpu_ms_per_image']:.1f} CPU ms/image)")


def _torch_lines(speed: dict, ratios: dict, key: str, label: str, ratio: str) -> list[str]:
    """The PyTorch figure and our ratio to it (nothing when the PyTorch side was left out)."""
    if key not in speed:
        return []
    return [_speed_line(label, speed[key]), f"   ratio                 {ratios[ratio]:8.2f}x"]


def write_chart(report: dict, path: str) -> None:
    """A bar chart of images/s per configuration, written atomically."""
    plt = pyplot()
    speed = report["speed"]
    labels = [v["label"] for v in speed.values()]
    values = [v["images_per_s"] for v in speed.values()]
    colours = ["#4c72b0" if "PyTorch" not in label else "#dd8452" for label in labels]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(labels) + 1.5))
    bars = ax.barh(labels[::-1], values[::-1], color=colours[::-1])
    ax.bar_label(bars, fmt="%.1f", padding=3)
    ax.set_xlabel("images/s (median)")
    ax.set_title(f"{report['architecture']} {report['input_size']} px, batch "
                 f"{report['batch_size']}, {report['threads']['intra_op']} threads; "
                 f"{report['machine']['cpu'][:40]}", fontsize=9)
    ax.set_xlim(0, max(values) * 1.18)
    fig.tight_layout()
    save_figure(fig, path)
