"""What hostile requests cost the service: a real `cli.py serve` subprocess on 127.0.0.1.

    python -m benchmarks.bench_hostile MODEL_DIR [--out bench-out/hostile.json]
    python -m benchmarks.bench_hostile MODEL_DIR --root /tmp/before   # another checkout's server

Prints and writes (JSON): the time to answer a BYTES tensor whose shape claims 10**8 elements
with 4 bytes of data, and the server's peak-memory growth for it (VmHWM); the slowest
liveness answer while a 7 MB JSON body of pixels is parsed; the server's resident memory
after a 97 KB PNG of 99.8 MP has been embedded; and the peak memory of decoding that PNG in a
fresh process by the runtime's path and by the exact reference path (its VmHWM).
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np

from benchmarks.harness import log, machine_info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def grey_png(width: int, height: int) -> bytes:
    """A uniform 8-bit grey PNG, streamed through zlib (never held decoded)."""
    row = b"\x00" + b"\x7f" * width
    z = zlib.compressobj(9)
    body = b"".join([z.compress(row) for _ in range(height)] + [z.flush()])

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0,
                                                              0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def _vm(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _decode_peak_mb(data: bytes, fast: bool) -> float:
    # VmHWM: this process's own peak (ru_maxrss starts from the parent's at fork + exec)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from common.description import Preprocessing; from runtime.decode import load_crop\n"
            "def peak():\n    with open('/proc/self/status') as f:\n"
            "        return next(int(l.split()[1]) for l in f if l.startswith('VmHWM:'))\n"
            "data = sys.stdin.buffer.read(); base = peak()\n"
            f"load_crop(data, Preprocessing(input_size=224, resize_size=256), fast={fast})\n"
            "print((peak() - base) / 1024)")
    out = subprocess.run([sys.executable, "-c", code, ROOT], input=data, capture_output=True,
                         check=True, timeout=600)
    return float(out.stdout.decode().split()[-1])


@contextlib.contextmanager
def _server(model_dir: str, root: str = ROOT):
    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, os.path.join(root, "cli.py"), "serve", model_dir,
                             "--name", "m", "--port", str(port), "--grpc-port", "0",
                             "--device", "cpu", "--max-body-mb", "8", "--log-level",
                             "warning"], cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready",
                             timeout=5).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.1)
        yield port, proc.pid
    finally:
        proc.kill()
        proc.wait(timeout=60)


def measure(model_dir: str, root: str = ROOT) -> dict:
    """Long because it runs the four measurements in order against one server; each is a
    few lines and reads best where it is."""
    import httpx
    figures: dict = {"machine": machine_info()}
    bomb = grey_png(10_000, 9_980)
    with _server(model_dir, root) as (port, pid):
        url = f"http://127.0.0.1:{port}/v2/models/m/infer"
        blob = b"\x00" * 4
        header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES",
                                         "shape": [10**8],
                                         "parameters": {"binary_data_size": 4}}]}).encode()
        before = _vm(pid, "VmHWM")
        start = time.perf_counter()
        r = httpx.post(url, content=header + blob, timeout=60,
                       headers={"Inference-Header-Content-Length": str(len(header))})
        figures["shape_lie"] = {"status": r.status_code,
                                "ms": round((time.perf_counter() - start) * 1000, 1),
                                "peak_growth_mb": round((_vm(pid, "VmHWM") - before) / 2**20, 1)}
        pixels = np.random.default_rng(0).integers(0, 256, (1, 450, 1000, 3)).tolist()
        big = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8",
                                      "shape": [1, 450, 1000, 3], "data": pixels}]}).encode()
        done, slowest, count = threading.Event(), 0.0, 0

        def send() -> None:
            httpx.post(url, content=big, timeout=120)
            done.set()
        sender = threading.Thread(target=send)
        sender.start()
        while not done.is_set():
            t = time.perf_counter()
            httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=60)
            slowest, count = max(slowest, time.perf_counter() - t), count + 1
        sender.join()
        figures["liveness_during_7mb_json"] = {"body_mb": round(len(big) / 2**20, 1),
                                               "answers": count,
                                               "slowest_ms": round(slowest * 1000, 1)}
        doc = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                      "data": [base64.b64encode(bomb).decode()]}]}).encode()
        rss0 = _vm(pid, "VmRSS")
        statuses = [httpx.post(url, content=doc, timeout=120).status_code for _ in range(3)]
        figures["bomb_png_97kb_99mp"] = {
            "statuses": statuses, "rss_before_mb": round(rss0 / 2**20, 1),
            "rss_after_mb": round(_vm(pid, "VmRSS") / 2**20, 1)}
    if root == ROOT:
        figures["bomb_decode_peak_mb"] = {"runtime_path": _decode_peak_mb(bomb, True),
                                          "reference_path": _decode_peak_mb(bomb, False)}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--out", default=None)
    parser.add_argument("--root", default=ROOT,
                        help="the checkout whose cli.py serves (to measure an older version)")
    args = parser.parse_args()
    figures = measure(args.model_dir, os.path.abspath(args.root))
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        from common.atomic import atomic_open
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with atomic_open(args.out, "w") as f:
            f.write(text)
    log("done")


if __name__ == "__main__":
    main()
