"""The runtime benchmark of the README (`make bench`): random-weights ResNet-18 (224 px) and the
default small CNN (32 px), each exported fp32 + int8 (calibrated on the JPEG corpus), then
`cli.py bench` on both (onnxruntime against PyTorch, side by side; see benchmarks/commands.py).
Run it on a quiet machine (check `uptime`): the figures are timings.

    python -m benchmarks.bench_runtime                          # everything under bench-out/
    python -m benchmarks.bench_runtime --out /tmp/b --archs small_cnn:32 -- --repeats 1 --limit 64

Options after `--` go to `cli.py bench` as they are. The environment variables BENCH_OUT,
BENCH_ARCHS and BENCH_ARGS give the defaults (what scripts/bench_runtime.sh took).
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

from .harness import log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def export(arch: str, size: int, out: str, corpus: str) -> str:
    """A seeded random-weights run of `arch` at `size` px, exported fp32 + int8 (again each
    time: the export is part of what `make bench` checks)."""
    run, model = (os.path.join(out, kind, f"{arch}-{size}") for kind in ("runs", "models"))
    subprocess.run([sys.executable, "-c", "from train.runs import untrained_run; "
                    f"untrained_run({arch!r}, {run!r}, input_size={size})"], cwd=ROOT, check=True)
    subprocess.run([sys.executable, "cli.py", "export", run, "--out", model, "--int8", "--calib",
                    corpus, "--check-data", corpus, "--overwrite"], cwd=ROOT, check=True)
    return model


def bench(model: str, out_json: str, corpus: str, extra: list[str]) -> None:
    """`cli.py bench` on one model; its table goes to the terminal and beside the JSON (.txt)."""
    log(f"load average {os.getloadavg()}")
    done = subprocess.run([sys.executable, "cli.py", "bench", model, "--images", corpus,
                           "--batch-size", "32", "--repeats", "3", "--out", out_json, *extra],
                          cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True)
    print(done.stdout, end="", flush=True)     # progress went to stderr as it ran
    with open(os.path.splitext(out_json)[0] + ".txt", "w") as f:
        f.write(done.stdout)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else shlex.split(
        os.environ.get("BENCH_ARGS", ""))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("BENCH_OUT", "bench-out"))
    parser.add_argument("--archs", default=os.environ.get("BENCH_ARCHS",
                                                          "resnet18:224 small_cnn:32"),
                        help="ARCH:SIZE, space- or comma-separated")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    from .corpus import ensure_corpus
    os.makedirs(args.out, exist_ok=True)
    corpus = ensure_corpus()
    log(f"corpus: {corpus}")
    for spec in args.archs.replace(",", " ").split():
        arch, size = spec.split(":")
        model = export(arch, int(size), args.out, corpus)
        bench(model, os.path.join(args.out, f"bench-{arch}-{size}.json"), corpus, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
