#!/usr/bin/env python
"""Export every registered architecture (seeded random weights) and report export time, model
sizes fp32/fp16/int8, parity, int8 probe-accuracy change and onnxruntime CPU images/s fp32 vs int8.

    .venv/bin/python -m benchmarks.bench_export [--archs resnet18,small_cnn] [--out bench.json]

Runs sequentially in one process, so the throughput figures of one run compare with each other.
Images are real (Fashion-MNIST from the built-in, upscaled to each architecture's input size).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from .harness import median_rate, write_json


def images_per_second(model_path: str, images, batch_size: int, repeats: int = 3) -> float:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count() or 1
    session = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    session.run(None, {"image": images[:batch_size]})  # first call allocates: not timed

    def one_pass() -> int:
        for start in range(0, len(images), batch_size):
            session.run(None, {"image": images[start:start + batch_size]})
        return len(images)

    return median_rate(one_pass, repeats, warmup=0)


def main() -> None:
    from common.data import load_dataset, materialise_builtin
    from common.model_dir import DESCRIPTION_FILE, MODEL_FILE, VARIANT_FILES
    from export.onnx_export import export_runs
    from export.parity import decode_images, pick_samples
    from train.models import ARCHITECTURES
    from train.runs import untrained_run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(ARCHITECTURES))
    parser.add_argument("--data", default="fashion-mnist:per_class=20")
    parser.add_argument("--throughput-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args()

    data = materialise_builtin(args.data)
    dataset = load_dataset(data)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            run = os.path.join(tmp, arch)
            desc = untrained_run(arch, run, levels=dataset.levels)
            desc.data = {"spec": data}
            desc.save(os.path.join(run, DESCRIPTION_FILE))
            out = os.path.join(tmp, f"{arch}-model")
            t0 = time.perf_counter()
            report = export_runs([run], out, fp16=True, int8_calib=data, variant_images=100,
                                 calib_images=64)
            total_s = time.perf_counter() - t0
            paths = [p for p, _ in pick_samples(dataset, args.throughput_images, seed=3)]
            images, _ = decode_images(paths, desc.preprocessing)
            fp32_ips = images_per_second(os.path.join(out, MODEL_FILE), images, args.batch_size)
            int8_ips = images_per_second(os.path.join(out, VARIANT_FILES["int8"]), images,
                                         args.batch_size)
            emb = report["parity"]["onnxruntime"]["outputs"]["embedding"]
            int8 = report["variants"]["int8"]
            row = {
                "arch": arch, "input": desc.preprocessing.input_size,
                "exporter": report["exporter"], "onnx_export_s": report["timings_s"]["onnx_export"],
                "export_total_s": round(total_s, 1),
                "fp32_MB": report["files"][MODEL_FILE]["bytes"] / 1e6,
                "fp16_MB": report["variants"]["fp16"]["bytes"] / 1e6,
                "int8_MB": report["variants"]["int8"]["bytes"] / 1e6,
                "parity_max_abs": emb["max_abs_diff"], "parity_min_cos": emb["min_cosine"],
                "int8_min_cos": int8["drift_vs_fp32"]["outputs"]["embedding"]["min_cosine"],
                "int8_probe_change": report["variants"]["int8"]["probe"]["change"],
                "fp16_probe_change": report["variants"]["fp16"]["probe"]["change"],
                "fp32_img_s": round(fp32_ips, 1), "int8_img_s": round(int8_ips, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    header = ("arch", "input", "exporter", "onnx_export_s", "export_total_s", "fp32_MB", "fp16_MB",
              "int8_MB", "parity_max_abs", "int8_min_cos", "int8_probe_change", "fp32_img_s",
              "int8_img_s")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(f"{row[k]:.3g}" if isinstance(row[k], float) else str(row[k])
                         for k in header))
    if args.out:
        write_json(args.out, {"load_average": os.getloadavg(), "rows": rows})


if __name__ == "__main__":
    main()
