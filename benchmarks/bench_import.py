#!/usr/bin/env python
"""An imported foreign ONNX, end to end against model-only, beside what its user ran before.

    .venv/bin/python -m benchmarks.bench_import [--arch resnet18] [--repeats 3] [--out F.json]

A timm architecture with seeded random weights is exported by timm's own exporter
(timm.utils.onnx.onnx_export, as a user brings a file), imported with `cli.py import --like
timm:ARCH`, then timed round robin in one process, same batch size and threads everywhere:

  model-only   the imported graph (onnxruntime, embed_arrays)  vs  the original file in an
               onnxruntime session, on the same preprocessed arrays: the import costs nothing
  end-to-end   our FeaturePipeline on the JPEG files  vs  the recipe a user of the original
               file runs: torchvision ImageFolder + DataLoader(2 workers) + timm's eval
               transform (Resize/CenterCrop/ToTensor/Normalize) + the original ONNX session
  PyTorch      timm's eager model on the arrays, for scale

The images are the benchmark corpus (512 JPEGs of 500x375, real photos; benchmarks/corpus.py).
"""
from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

from .harness import Config, log, machine_info, time_round_robin, versions, write_json
from .runtime_bench import image_files, ours_end_to_end, ours_model_only, pipeline, torch_recipe


def foreign_onnx(arch: str, path: str):
    """timm's ARCH with seeded random weights, exported by timm's own exporter; returns the
    eager model too (the PyTorch row)."""
    import warnings

    import timm
    import torch
    from timm.utils.onnx import onnx_export
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=0).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_export(model, path, input_size=model.pretrained_cfg["input_size"], batch_size=2,
                    opset=17)
    return model


class OriginalSession:
    """The original file in onnxruntime, callable on torch tensors (for the recipe) and on
    arrays, with the same thread count as our pipeline."""

    def __init__(self, path: str, threads: int):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.name = self.session.get_inputs()[0].name

    def __call__(self, x):
        return self.session.run(None, {self.name: np.ascontiguousarray(np.asarray(x))})[0]

    def model_only(self, arrays: np.ndarray, batch_size: int) -> int:
        for i in range(0, len(arrays), batch_size):
            self(arrays[i:i + batch_size])
        return len(arrays)


def run(arch: str, images: str, batch_size: int, repeats: int, limit: int | None) -> dict:
    import torch

    from export.import_onnx import PreprocessingOptions, import_onnx
    from runtime.providers import available_cores

    from .runtime_bench import torch_model_only
    threads = available_cores()
    torch.set_num_threads(threads)
    paths, as_folder = image_files(images, limit)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, f"{arch}.onnx")
        log(f"bench: timm {arch} -> ONNX with timm's exporter")
        eager = foreign_onnx(arch, src)
        model_dir = os.path.join(tmp, arch)
        log("bench: import")
        imported = import_onnx(src, model_dir, PreprocessingOptions(like=f"timm:{arch}"),
                               check_data=images)
        ours = pipeline(model_dir, "fp32", batch_size, threads, None)
        original = OriginalSession(src, threads)
        pre = ours.preprocessing_
        arrays, errors = ours.preprocess(paths)
        if errors:
            raise RuntimeError(f"{len(errors)} image(s) failed to decode")
        log("bench: warm-up")
        ours.embed_arrays(arrays[:batch_size])
        ours.warmup()
        original.model_only(arrays[:batch_size], batch_size)
        configs = [
            Config("imported_model_only", "imported graph model-only",
                   lambda: ours_model_only(ours, arrays), []),
            Config("original_model_only", "original file model-only (onnxruntime)",
                   lambda: original.model_only(arrays, batch_size), []),
            Config("torch_model_only", "timm eager model-only",
                   lambda: torch_model_only(eager, arrays, batch_size), []),
            Config("ours_end_to_end", "ours end-to-end (imported)",
                   lambda: ours_end_to_end(ours, paths), []),
            Config("original_recipe_end_to_end", "DataLoader recipe + original file",
                   lambda: torch_recipe(original, images, paths, as_folder, pre, batch_size), []),
        ]
        speed = time_round_robin(configs, repeats)
        ours.close()
    rate = {k: v["images_per_s"] for k, v in speed.items()}
    return {
        "arch": f"timm:{arch}", "exporter": "timm.utils.onnx.onnx_export (TorchScript)",
        "input_size": pre.input_size, "resize_size": pre.resize_size,
        "interpolation": pre.interpolation, "feature_dim": imported["feature_dim"],
        "batch_size": batch_size, "threads": threads, "repeats": repeats,
        "images": {"folder": os.path.abspath(images), "count": len(paths)},
        "import_parity": imported["parity"]["onnxruntime"]["outputs"]["embedding"],
        "speed": speed,
        "ratios": {
            "model_only_imported_vs_original": round(rate["imported_model_only"]
                                                     / rate["original_model_only"], 3),
            "end_to_end_ours_vs_recipe": round(rate["ours_end_to_end"]
                                               / rate["original_recipe_end_to_end"], 3),
            "end_to_end_fraction_of_model_only": round(rate["ours_end_to_end"]
                                                       / rate["imported_model_only"], 3)},
        "machine": machine_info(), "versions": versions(),
    }


def print_report(report: dict) -> None:
    m = report["machine"]
    print(f"machine   {m['cpu']}; {m['usable_cores']} usable cores; load {m['load_average']}")
    print(f"model     {report['arch']} ({report['feature_dim']}-d) at {report['input_size']} px "
          f"(resize {report['resize_size']} {report['interpolation']}), exported by "
          f"{report['exporter']}, imported; batch {report['batch_size']}, median of "
          f"{report['repeats']}")
    print(f"images    {report['images']['count']} files, {report['images']['folder']}")
    for fig in report["speed"].values():
        print(f"   {fig['label']:42s} {fig['images_per_s']:8.1f} images/s "
              f"({fig['cpu_ms_per_image']:.1f} CPU ms/image)")
    for key, value in report["ratios"].items():
        print(f"   {key:42s} {value:8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18", help="a timm architecture name")
    parser.add_argument("--images", default=None, help="an image folder (default: the corpus)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, default=None, help="use the first N images")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    from .corpus import ensure_corpus
    report = run(args.arch, args.images or ensure_corpus(), args.batch_size, args.repeats,
                 args.limit)
    print_report(report)
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
