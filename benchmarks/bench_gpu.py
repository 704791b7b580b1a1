#!/usr/bin/env python
"""GPU benchmark of the runtime: ResNet-50 FP16 at batch 256, onnxruntime against PyTorch.

What `cli.py bench` measures on the CPU, for a CUDA machine, side by side in one run:
  model-only   FeaturePipeline.embed_arrays (CUDA provider, IOBinding, batch buckets; with and
               without CUDA graphs; fp16 and fp32 variants) against PyTorch eager fp16 with
               channels_last, both fed the same host arrays
  end-to-end   FeaturePipeline.embed on JPEG files (GPU model; decoding in worker processes,
               the default there, and in threads) against the usual recipe: ImageFolder +
               DataLoader(workers = cores, pinned memory) + eager fp16
  latency      one image file at a time, p50 / p99
  TensorRT     whether the provider came up, or the fallback the pipeline reported
Every figure is the median of --repeats, configurations timed round robin.

    python scripts/bench_gpu.py --out gpu.json               # exports resnet50 if needed
    python scripts/bench_gpu.py --arch resnet18 --batch-size 64 --images 256 --device cpu  # dry run

Random weights: speed does not depend on them, and this machine may have no ImageNet weights.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from benchmarks.corpus import ensure_corpus
from benchmarks.runtime_bench import Config, image_files, time_round_robin, torch_model, torchvision_transform
from common.atomic import atomic_open
from common.model_dir import VARIANT_FILES, ModelDir


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare_model(arch: str, work: str, corpus: str) -> tuple[str, str]:
    """(run_dir, model_dir): a seeded random-weight run and its ONNX export with fp16."""
    from export.onnx_export import export_runs
    from train.runs import untrained_run
    run_dir, model_dir = os.path.join(work, f"run-{arch}"), os.path.join(work, f"model-{arch}")
    if not os.path.exists(os.path.join(run_dir, "model.pt")):
        untrained_run(arch, run_dir)
    if not os.path.exists(os.path.join(model_dir, VARIANT_FILES["fp16"])):
        t0 = time.perf_counter()
        export_runs([run_dir], model_dir, fp16=True, check_data=corpus, overwrite=True,
                    variant_images=120)
        log(f"export of {arch} with fp16: {time.perf_counter() - t0:.1f} s")
    return run_dir, model_dir


def torch_side(run_dir: str, device: str, half: bool):
    import torch
    model = torch_model([run_dir]).to(device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if half:
        model = model.half()
    return model


def torch_model_only(model, arrays: np.ndarray, batch_size: int, device: str, half: bool) -> int:
    import torch
    with torch.inference_mode():
        for i in range(0, len(arrays), batch_size):
            x = torch.from_numpy(arrays[i:i + batch_size]).to(device, non_blocking=True)
            x = x.half() if half else x
            if device == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            model(x).float().cpu()
    return len(arrays)


def torch_recipe(model, root: str, pre, batch_size: int, device: str, half: bool,
                 workers: int) -> int:
    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder
    loader = DataLoader(ImageFolder(root, transform=torchvision_transform(pre)),
                        batch_size=batch_size, num_workers=workers,
                        pin_memory=device == "cuda")
    seen = 0
    with torch.inference_mode():
        for x, _ in loader:
            x = x.to(device, non_blocking=True)
            x = x.half() if half else x
            if device == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            model(x).float().cpu()
            seen += len(x)
    return seen


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=2048, help="JPEGs in the corpus")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--work", default="bench-out/gpu")
    parser.add_argument("--out", default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)

    import onnxruntime as ort
    import torch

    from runtime.pipeline import FeaturePipeline

    cores = os.cpu_count() or 1
    report = {"arch": args.arch, "batch_size": args.batch_size, "device": args.device,
              "cpu": platform.processor(), "cores": cores,
              "onnxruntime": ort.__version__, "torch": torch.__version__,
              "ort_providers": ort.get_available_providers(),
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    log(json.dumps(report))

    def save():
        if args.out:
            with atomic_open(args.out, "w") as f:
                json.dump(report, f, indent=2)

    corpus = ensure_corpus(count=args.images)
    paths, _ = image_files(corpus)
    run_dir, model_dir = prepare_model(args.arch, args.work, corpus)
    report["export"] = {k: v for k, v in ModelDir(model_dir).export_report().items()
                        if k in ("parity", "variants", "seconds", "files")}
    save()

    half = args.device == "cuda"
    variant = "fp16" if half else "fp32"
    bs = args.batch_size
    pipes = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipes["graph"] = FeaturePipeline(model_dir, device=args.device, batch_size=bs,
                                         variant=variant, cuda_graph=True)
        pipes["plain"] = FeaturePipeline(model_dir, device=args.device, batch_size=bs,
                                         variant=variant)
        pipes["fp32"] = FeaturePipeline(model_dir, device=args.device, batch_size=bs)
    report["pipelines"] = {k: {"provider": p.provider_, "fell_back": p.fell_back_,
                               "reason": p.fallback_reason_, "cuda_graph": p.cuda_graph_,
                               "buckets": p.buckets_, "threads": p.threads_,
                               "decode_threads": p.decode_threads_}
                           for k, p in pipes.items()}
    report["warnings"] = [str(w.message) for w in caught]
    log(json.dumps(report["pipelines"]))
    save()

    # real preprocessed images, 4 batches
    arrays = pipes["plain"].preprocess(paths[:bs])[0]
    arrays = np.ascontiguousarray(np.concatenate([arrays] * 4))
    model = torch_side(run_dir, args.device, half)
    with torch.inference_mode():  # agreement of the timed models on the same images
        ref = torch_side(run_dir, args.device, False)(
            torch.from_numpy(arrays[:32]).to(args.device)).float().cpu().numpy()
    for key, p in pipes.items():
        got = p.embed_arrays(arrays[:32])
        cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
        report["pipelines"][key]["min_cosine_vs_torch_fp32"] = round(float(cos.min()), 6)
        p.warmup()
    model_only = [Config(f"ort_{k}", f"onnxruntime {k} model-only",
                         lambda p=p: (p.embed_arrays(arrays), len(arrays))[1], [])
                  for k, p in pipes.items()]
    model_only.append(Config("torch", f"PyTorch eager {'fp16 channels_last' if half else 'fp32'}"
                             " model-only",
                             lambda: torch_model_only(model, arrays, bs, args.device, half), []))
    torch_model_only(model, arrays[:bs], bs, args.device, half)  # cudnn autotune, lazy init
    report["model_only"] = time_round_robin(model_only, args.repeats)
    save()

    pre = pipes["plain"].preprocessing_
    best = max(("graph", "plain"), key=lambda k: report["model_only"][f"ort_{k}"]["images_per_s"])
    threads_only = FeaturePipeline(model_dir, device=args.device, batch_size=bs, variant=variant,
                                   cuda_graph=best == "graph", decode_processes=0)
    threads_only.warmup()
    pipes[best].warmup()  # starts its decode processes, if any
    report["pipelines"][best]["decode_processes"] = pipes[best].decode_processes_
    e2e = [Config("ours", f"our pipeline ({best}, {pipes[best].decode_processes_} decode "
                  "processes) end-to-end", lambda: len(pipes[best].embed(paths)), []),
           Config("ours_threads", f"our pipeline ({best}, {threads_only.decode_threads_} decode "
                  "threads) end-to-end", lambda: len(threads_only.embed(paths)), []),
           Config("recipe", f"PyTorch recipe ({cores} workers) end-to-end",
                  lambda: torch_recipe(model, corpus, pre, bs, args.device, half, cores), [])]
    report["end_to_end"] = time_round_robin(e2e, args.repeats)
    report["end_to_end"]["ours_decode_parallelism"] = pipes[best].decode_parallelism_
    save()

    # alignment on the device path: a corrupt item in the middle, its neighbours unchanged
    mixed = pipes["plain"].embed([paths[0], b"not an image", paths[1]])
    alone = pipes["plain"].embed([paths[0], paths[1]]).vectors
    report["corrupt_item"] = {
        "errors": {str(k): v for k, v in mixed.errors.items()},
        "neighbours_max_abs_diff": float(np.abs(mixed.vectors[[0, 2]] - alone).max())}
    log(json.dumps(report["corrupt_item"]))

    times = []
    single = pipes["plain"]
    for i in range(53):
        t0 = time.perf_counter()
        single.embed(paths[i])
        if i >= 3:
            times.append(1000 * (time.perf_counter() - t0))
    report["latency_ms"] = {"p50": round(float(np.percentile(times, 50)), 2),
                            "p99": round(float(np.percentile(times, 99)), 2)}
    save()

    if args.device == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                trt = FeaturePipeline(model_dir, device="tensorrt", batch_size=bs, variant=variant)
                report["tensorrt"] = {"provider": trt.provider_, "fell_back": trt.fell_back_,
                                      "reason": trt.fallback_reason_}
            except Exception as e:
                report["tensorrt"] = {"error": f"{type(e).__name__}: {e}"}
        report["tensorrt"]["warnings"] = [str(w.message)[:500] for w in caught]
    save()

    mo, ee = report["model_only"], report["end_to_end"]
    best_ort = max(mo[f"ort_{k}"]["images_per_s"] for k in ("graph", "plain"))
    print(f"{args.arch} {variant} batch {bs} on {report['gpu'] or 'CPU'} ({cores} CPU cores)")
    for _key, row in list(mo.items()) + [(k, v) for k, v in ee.items() if isinstance(v, dict)]:
        print(f"  {row['label']:<52} {row['images_per_s']:>9.1f} images/s")
    print(f"  model-only ORT / torch: {best_ort / mo['torch']['images_per_s']:.2f}x;  "
          f"end-to-end ours / recipe: {ee['ours']['images_per_s'] / ee['recipe']['images_per_s']:.2f}x;"
          f"  ours end-to-end / ORT model-only: {ee['ours']['images_per_s'] / best_ort:.1%}")
    print(f"  latency p50 {report['latency_ms']['p50']} ms, p99 {report['latency_ms']['p99']} ms")
    if "tensorrt" in report:
        print(f"  tensorrt: {report['tensorrt']}")


if __name__ == "__main__":
    main()
