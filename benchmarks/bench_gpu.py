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

    python -m benchmarks.bench_gpu --out gpu.json               # exports resnet50 if needed
    python -m benchmarks.bench_gpu --arch resnet18 --batch-size 64 --images 256 --device cpu  # dry run

Random weights: speed does not depend on them, and this machine may have no ImageNet weights.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import numpy as np

from common.machine import cpu_name
from common.model_dir import VARIANT_FILES, ModelDir

from .corpus import ensure_corpus
from .harness import Config, log, time_round_robin, write_json
from .runtime_bench import image_files, torch_model, torchvision_transform


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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=2048, help="JPEGs in the corpus")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--work", default="bench-out/gpu")
    parser.add_argument("--out", default=None, help="write the figures as JSON")
    return parser.parse_args(argv)


def machine_section(args) -> dict:
    import onnxruntime as ort
    import torch
    return {"arch": args.arch, "batch_size": args.batch_size, "device": args.device,
            "cpu": cpu_name(), "cores": os.cpu_count() or 1,
            "onnxruntime": ort.__version__, "torch": torch.__version__,
            "ort_providers": ort.get_available_providers(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def open_pipelines(model_dir: str, args, variant: str, report: dict) -> dict:
    """The pipelines compared: with and without CUDA graphs, and fp32; how each came up (and
    the warnings they gave) into report["pipelines"] / ["warnings"]."""
    from runtime.pipeline import FeaturePipeline
    bs, pipes = args.batch_size, {}
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
    return pipes


def model_only(report: dict, pipes: dict, model, run_dir: str, paths: list[str], args,
               half: bool) -> None:
    """Model-only images/s on real preprocessed images (4 batches), each pipeline against
    PyTorch eager, after checking they agree with PyTorch fp32 on the same images."""
    import torch
    bs, device = args.batch_size, args.device
    arrays = pipes["plain"].preprocess(paths[:bs])[0]
    arrays = np.ascontiguousarray(np.concatenate([arrays] * 4))
    with torch.inference_mode():  # agreement of the timed models on the same images
        ref = torch_side(run_dir, device, False)(
            torch.from_numpy(arrays[:32]).to(device)).float().cpu().numpy()
    for key, p in pipes.items():
        got = p.embed_arrays(arrays[:32])
        cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
        report["pipelines"][key]["min_cosine_vs_torch_fp32"] = round(float(cos.min()), 6)
        p.warmup()
    configs = [Config(f"ort_{k}", f"onnxruntime {k} model-only",
                      lambda p=p: (p.embed_arrays(arrays), len(arrays))[1], [])
               for k, p in pipes.items()]
    configs.append(Config("torch", f"PyTorch eager {'fp16 channels_last' if half else 'fp32'}"
                          " model-only",
                          lambda: torch_model_only(model, arrays, bs, device, half), []))
    torch_model_only(model, arrays[:bs], bs, device, half)  # cudnn autotune, lazy init
    report["model_only"] = time_round_robin(configs, args.repeats)


def end_to_end(report: dict, pipes: dict, model, model_dir: str, corpus: str,
               paths: list[str], args, variant: str, half: bool) -> None:
    """From JPEG files: the faster pipeline with decode processes, and with decode threads,
    against the PyTorch recipe with a DataLoader worker per core."""
    from runtime.pipeline import FeaturePipeline
    bs, cores = args.batch_size, os.cpu_count() or 1
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


def alignment_and_latency(report: dict, single, paths: list[str]) -> None:
    """A corrupt item in the middle leaves its neighbours unchanged; single-image p50/p99."""
    mixed = single.embed([paths[0], b"not an image", paths[1]])
    alone = single.embed([paths[0], paths[1]]).vectors
    report["corrupt_item"] = {
        "errors": {str(k): v for k, v in mixed.errors.items()},
        "neighbours_max_abs_diff": float(np.abs(mixed.vectors[[0, 2]] - alone).max())}
    log(json.dumps(report["corrupt_item"]))
    times = []
    for i in range(53):
        t0 = time.perf_counter()
        single.embed(paths[i])
        if i >= 3:
            times.append(1000 * (time.perf_counter() - t0))
    report["latency_ms"] = {"p50": round(float(np.percentile(times, 50)), 2),
                            "p99": round(float(np.percentile(times, 99)), 2)}


def tensorrt_section(model_dir: str, batch_size: int, variant: str) -> dict:
    """Whether the TensorRT provider came up, or the fallback the pipeline reported."""
    from runtime.pipeline import FeaturePipeline
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trt = FeaturePipeline(model_dir, device="tensorrt", batch_size=batch_size,
                                  variant=variant)
            out = {"provider": trt.provider_, "fell_back": trt.fell_back_,
                   "reason": trt.fallback_reason_}
        except Exception as e:
            out = {"error": f"{type(e).__name__}: {e}"}
    out["warnings"] = [str(w.message)[:500] for w in caught]
    return out


def print_summary(report: dict, args, variant: str) -> None:
    mo, ee = report["model_only"], report["end_to_end"]
    best_ort = max(mo[f"ort_{k}"]["images_per_s"] for k in ("graph", "plain"))
    print(f"{args.arch} {variant} batch {args.batch_size} on {report['gpu'] or 'CPU'} "
          f"({report['cores']} CPU cores)")
    for _key, row in list(mo.items()) + [(k, v) for k, v in ee.items() if isinstance(v, dict)]:
        print(f"  {row['label']:<52} {row['images_per_s']:>9.1f} images/s")
    print(f"  model-only ORT / torch: {best_ort / mo['torch']['images_per_s']:.2f}x;  "
          f"end-to-end ours / recipe: {ee['ours']['images_per_s'] / ee['recipe']['images_per_s']:.2f}x;"
          f"  ours end-to-end / ORT model-only: {ee['ours']['images_per_s'] / best_ort:.1%}")
    print(f"  latency p50 {report['latency_ms']['p50']} ms, p99 {report['latency_ms']['p99']} ms")
    if "tensorrt" in report:
        print(f"  tensorrt: {report['tensorrt']}")


def main(argv=None) -> None:
    args = parse_args(argv)
    report = machine_section(args)
    log(json.dumps(report))

    def save():
        if args.out:
            write_json(args.out, report)

    corpus = ensure_corpus(count=args.images)
    paths, _ = image_files(corpus)
    run_dir, model_dir = prepare_model(args.arch, args.work, corpus)
    report["export"] = {k: v for k, v in ModelDir(model_dir).export_report().items()
                        if k in ("parity", "variants", "seconds", "files")}
    save()
    half = args.device == "cuda"
    variant = "fp16" if half else "fp32"
    pipes = open_pipelines(model_dir, args, variant, report)
    save()
    model = torch_side(run_dir, args.device, half)
    model_only(report, pipes, model, run_dir, paths, args, half)
    save()
    end_to_end(report, pipes, model, model_dir, corpus, paths, args, variant, half)
    save()
    alignment_and_latency(report, pipes["plain"], paths)
    save()
    if args.device == "cuda":
        report["tensorrt"] = tensorrt_section(model_dir, args.batch_size, variant)
    save()
    print_summary(report, args, variant)


if __name__ == "__main__":
    main()
