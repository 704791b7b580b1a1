"""Hostile requests against the service, all generated here: tensors whose shape lies about
their data, malformed bodies by the hundred on HTTP and gRPC, decoded-size bombs, bodies that
add up past the buffer budget, slowloris sockets, requests that time out, SIGTERM during a long
batch. Memory is measured in the server's own process or in a subprocess (VmHWM in
/proc/PID/status: the peak of that process alone), never guessed."""
from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.conftest import ROOT
from tests.servers import serve_process, wait_until
from tests.test_serve import images, model_dir  # noqa: F401  (fixtures)

# ---------------------------------------------------------------------------------------------
# hostile inputs, made here


def png_bytes(width: int, height: int, *, bit_depth: int = 8, color_type: int = 0) -> bytes:
    """A uniform PNG of any size, streamed through zlib (a 10000x10000 one is ~100 KB and
    never exists decoded here). color_type 0 grey, 2 RGB, 4 grey+alpha, 6 RGBA."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row = b"\x00" + b"\x7f" * (width * channels * bit_depth // 8)
    z = zlib.compressobj(9)
    body = b"".join([z.compress(row) for _ in range(height)] + [z.flush()])

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body)
            + chunk(b"IEND", b""))


def malformed_bodies(seed: int, n: int, valid: dict) -> list[bytes]:
    """`n` request bodies that are wrong in one or several ways, from a valid one."""
    rng = random.Random(seed)
    fixed = [b"[" * 100_000 + b"]" * 100_000, b'{"inputs": [' * 50_000,
             b'{"inputs": 1' + b"0" * 5000 + b"}", b"\xff\xfe garbage", b"",
             b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], '
             b'"data": ["\\ud800"]}]}']
    values = [None, True, -1, 0, 1, 2**31, 2**64, 10**300, -10**30, 1.5, float("inf"), "x",
              "", [], {}, [[[]]], [1, [2, [3]]], "A" * 1000, {"binary_data_size": 10**9}]

    def mutate(doc):
        doc = json.loads(json.dumps(doc))
        spec = doc["inputs"][0]
        for _ in range(rng.randint(1, 3)):
            op = rng.randrange(9)
            if op == 0:
                spec[rng.choice(["name", "datatype", "shape", "data", "parameters"])] = \
                    rng.choice(values)
            elif op == 1:
                spec["shape"] = [rng.choice([0, 1, 3, 10**8, 2**62, 2**70, -5])
                                 for _ in range(rng.randint(0, 70))]
            elif op == 2:
                spec["datatype"] = rng.choice(["FP32", "INT8", "UINT64", "BOOL", "FP16",
                                               "BYTES", "UINT8", "fp32", "STRING"])
            elif op == 3:
                spec["data"] = [rng.choice(values) for _ in range(rng.randint(0, 5))]
            elif op == 4:
                spec.pop(rng.choice(list(spec) or ["name"]), None)
            elif op == 5:
                doc[rng.choice(["inputs", "outputs", "parameters", "id"])] = rng.choice(values)
            elif op == 6:
                doc["outputs"] = [rng.choice(values), {"name": rng.choice(values)}]
            elif op == 7:
                spec["parameters"] = {"binary_data_size": rng.choice(values)}
            elif isinstance(doc.get("inputs"), list):
                doc["inputs"].append(rng.choice(values))
        return doc

    out = list(fixed)
    while len(out) < n:
        body = json.dumps(mutate(valid)).encode()
        if rng.random() < 0.15:  # a byte-level cut or flip on top
            k = rng.randrange(max(1, len(body)))
            body = body[:k] + bytes([rng.randrange(256)]) + body[k + 1:]
        out.append(body)
    return out


def _vm(pid: int, key: str) -> int:
    """VmRSS / VmHWM of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _infer(port: int, body: bytes, headers: dict | None = None, timeout: float = 60):
    import httpx
    return httpx.post(f"http://127.0.0.1:{port}/v2/models/cnn/infer", content=body,
                      headers=headers or {}, timeout=timeout)


def _read_reply(sock: socket.socket) -> bytes:
    """One HTTP response from a raw socket: headers and a Content-Length body."""
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = sock.recv(4096)
        if not chunk:
            return reply
        reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _image_doc(*blobs: bytes) -> dict:
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(blobs)],
                        "data": [base64.b64encode(b).decode() for b in blobs]}]}


def _binary_body(header: dict, blob: bytes) -> tuple[bytes, dict]:
    h = json.dumps(header).encode()
    return h + blob, {"Inference-Header-Content-Length": str(len(h))}


# ---------------------------------------------------------------------------------------------
# decoding: the decoded-size limit, reduced decoding, memory measured in a subprocess

MEASURE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from common.description import Preprocessing
from runtime.decode import load_crop

def peak():  # this process's own high-water mark (ru_maxrss would include the parent's at fork)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024

data = open(sys.argv[2], "rb").read()
base = peak()
try:
    load_crop(data, Preprocessing(input_size=224, resize_size=256), fast=True)
    outcome = "ok"
except Exception as e:
    outcome = str(e)
print(json.dumps({"outcome": outcome, "peak_mb": peak() - base}))
"""


def _decode_in_subprocess(tmp_path, data: bytes, env: dict | None = None) -> dict:
    path = tmp_path / f"img-{len(data)}.png"
    path.write_bytes(data)
    proc = subprocess.run([sys.executable, "-c", MEASURE, ROOT, str(path)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_decoded_size_bombs_are_reduced_or_refused_within_a_measured_bound(tmp_path):
    """A 97 KB grey PNG of 99.8 MP is decoded once (100 MB) and shrunk before any conversion;
    a 16-bit RGBA one decoding past UNIREP_MAX_DECODED_MB is refused from its header."""
    grey = _decode_in_subprocess(tmp_path, png_bytes(10_000, 9_980))
    assert grey["outcome"] == "ok"
    assert 50 < grey["peak_mb"] < 1.5 * 100, grey  # decoded once; the reference path: ~480 MB
    rgba16 = png_bytes(9_000, 9_000, bit_depth=16, color_type=6)
    refused = _decode_in_subprocess(tmp_path, rgba16)
    assert "UNIREP_MAX_DECODED_MB" in refused["outcome"] and "MiB" in refused["outcome"]
    assert refused["peak_mb"] < 20, refused  # refused from the header: nothing decoded
    small_limit = _decode_in_subprocess(tmp_path, png_bytes(3000, 3000),
                                        env={"UNIREP_MAX_DECODED_MB": "4"})
    assert "above the limit of 4 MiB" in small_limit["outcome"]


def test_grey_conversion_in_strips_is_bit_identical_to_whole_image_float64():
    from PIL import Image

    from common.images import GREY_STRIP_PIXELS, grey_to_8bit
    rng = np.random.default_rng(0)
    cases = [Image.fromarray(rng.integers(0, 65536, (1500, 800), dtype=np.uint16)),
             Image.fromarray(rng.integers(0, 256, (300, 200), dtype=np.int32)),
             Image.fromarray(rng.integers(0, 10**6, (300, 200), dtype=np.int32)),
             Image.fromarray(rng.random((700, 1600), dtype=np.float32))]
    assert GREY_STRIP_PIXELS < 1500 * 800  # several strips
    for img in cases:
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            scale = 255.0 if float(np.nanmax(arr)) <= 1.0 else 1.0
        elif img.mode == "I" and float(arr.max()) <= 255:
            scale = 1.0
        else:
            scale = 255.0 / 65535.0
        expected = np.clip(np.nan_to_num(arr * scale), 0, 255).round().astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(grey_to_8bit(img)), expected)


def test_large_non_jpeg_reduced_decode_stays_close_to_the_exact_path():
    from PIL import Image

    from common.description import Preprocessing
    from runtime.decode import REDUCE_ABOVE_PIXELS, load_crop
    y, x = np.mgrid[0:4200, 0:4100]
    smooth = ((np.sin(x / 300.0) + np.cos(y / 200.0)) * 60 + 128).astype(np.uint8)
    import io
    buf = io.BytesIO()
    Image.fromarray(np.stack([smooth, smooth[::-1], smooth[:, ::-1]], -1)).save(buf, "PNG",
                                                                                compress_level=1)
    assert REDUCE_ABOVE_PIXELS < 4200 * 4100
    pre = Preprocessing(input_size=224, resize_size=256)
    fast = load_crop(buf.getvalue(), pre, fast=True).astype(int)
    exact = load_crop(buf.getvalue(), pre, fast=False).astype(int)
    assert np.abs(fast - exact).mean() < 1.0 and np.abs(fast - exact).max() <= 8


# ---------------------------------------------------------------------------------------------
# protocol (pure): shapes checked before allocation, malformed JSON as ProtocolError


def test_shape_lies_and_malformed_json_are_protocol_errors_without_allocating():
    import tracemalloc

    from runtime.service.protocol import ProtocolError, pack_bytes, parse_infer_request
    blob = pack_bytes([b"abcd"])
    header = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [10**8],
                          "parameters": {"binary_data_size": len(blob)}}]}
    body, headers = _binary_body(header, blob)
    tracemalloc.start()
    with pytest.raises(ProtocolError, match="hold at most 2"):
        parse_infer_request(body, headers["Inference-Header-Content-Length"])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20  # the shape's 10**8 elements were never allocated (800 MB)
    for text, reason in [(b"[" * 100_000, "nests too deeply"),
                         (b'{"inputs": ' + b"9" * 5000 + b"}", "malformed JSON"),
                         (json.dumps({"inputs": [{"name": "x", "datatype": "FP32",
                                                  "shape": [0, 2**70], "data": []}]}).encode(),
                          "out of range"),
                         (json.dumps({"inputs": [{"name": "x", "datatype": "FP32",
                                                  "shape": [1] * 40, "data": [1]}]}).encode(),
                          "out of range"),
                         (json.dumps({"inputs": [{"name": "x", "datatype": "FP32",
                                                  "shape": [0] + [2**30] * 3,
                                                  "data": []}]}).encode(), "out of range"),
                         (json.dumps({"inputs": [{"name": "x", "datatype": "FP64",
                                                  "shape": [1], "data": [10**400]}]}).encode(),
                          "FP64 values")]:
        with pytest.raises(ProtocolError, match=reason):
            parse_infer_request(text)


def test_parsers_turn_thousands_of_malformed_requests_into_client_errors():
    """The pure parsers of both transports (and the model's tensor check) on 2,000 generated
    HTTP bodies and 3,000 gRPC requests: every failure is a ProtocolError/ServiceError."""
    from tritonclient.grpc import service_pb2 as pb

    from runtime.service.errors import ServiceError
    from runtime.service.grpc_server import request_from_proto
    from runtime.service.model import ServedModel
    from runtime.service.protocol import ProtocolError, parse_infer_request
    model = ServedModel("unused", name="cnn")  # its tensor checks need no loaded model
    failures = []

    def check(parse) -> None:
        try:
            model.items_from_request(parse())
        except (ProtocolError, ServiceError):
            pass
        except Exception as e:  # a bug: would be a 500
            failures.append(f"{type(e).__name__}: {e}"[:200])

    jpeg = b"\xff\xd8\xff" + bytes(60)
    for seed in range(10):
        for k, body in enumerate(malformed_bodies(seed, 200, _image_doc(jpeg))):
            length = str((k * 37) % (len(body) + 3)) if k % 7 == 3 else None
            check(lambda: parse_infer_request(body, length))  # noqa: B023 (called at once)
    rng = random.Random(3)
    dims = [0, 1, 2, 3, 10**8, 2**30, 2**31, 2**62, 2**63 - 1, -1, -2**62]
    fields = {"bytes_contents": [b"ab"], "int_contents": [-2**31], "uint_contents": [2**32 - 1],
              "fp32_contents": [1e38], "bool_contents": [True], "int64_contents": [-2**63],
              "uint64_contents": [2**64 - 1], "fp64_contents": [float("nan")]}
    for _ in range(3000):
        request = pb.ModelInferRequest(model_name="cnn")
        for _ in range(rng.choice([1, 1, 2])):
            spec = request.inputs.add(
                name=rng.choice(["image", "pixels", "x"]),
                datatype=rng.choice(["BYTES", "UINT8", "FP32", "FP16", "INT64", "BOOL", "x"]),
                shape=[rng.choice(dims) for _ in range(rng.randint(0, 6))])
            if rng.random() < 0.5:
                request.raw_input_contents.append(rng.randbytes(rng.choice([0, 3, 4, 12, 64])))
            else:
                name = rng.choice(list(fields))
                getattr(spec.contents, name).extend(fields[name] * rng.randint(0, 4))
        check(lambda: request_from_proto(request))  # noqa: B023 (called at once)
    assert not failures, failures[:5]


# ---------------------------------------------------------------------------------------------
# the real server


@pytest.fixture(scope="module")
def hostile_server(model_dir):  # noqa: F811
    """A server with small limits, so the hostile cases reach them quickly."""
    with serve_process([model_dir, "--name", "cnn", "--max-body-mb", "8",
                        "--max-buffered-mb", "12", "--max-json-mb", "7", "--header-timeout-s", "2",
                        "--max-connections", "40", "--log-level", "warning"]) as served:
        yield served


def _healthy(port: int) -> None:
    import httpx
    assert httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=30).status_code == 200


def test_shape_lie_is_answered_at_once_with_flat_memory_and_liveness_meanwhile(
        hostile_server, images):  # noqa: F811
    import httpx
    port, pid = hostile_server.port, hostile_server.proc.pid
    blob = b"\x00\x00\x00\x00"
    header = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [10**8],
                          "parameters": {"binary_data_size": len(blob)}}]}
    body, headers = _binary_body(header, blob)
    before = _vm(pid, "VmHWM")
    start = time.perf_counter()
    r = _infer(port, body, headers)
    seconds = time.perf_counter() - start
    assert r.status_code == 400 and "hold at most 1" in r.json()["error"]
    assert seconds < 1.0, seconds  # it was 5-11 s; ~ms now (generous for a loaded machine)
    assert _vm(pid, "VmHWM") - before < 20 << 20  # it was up to 1.6 GB
    # a 7 MB JSON body of pixels is parsed off the event loop: liveness answers meanwhile
    pixels = np.random.default_rng(0).integers(0, 256, (1, 450, 1000, 3)).tolist()
    big = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8",
                                  "shape": [1, 450, 1000, 3], "data": pixels}]}).encode()
    assert 4 << 20 < len(big) < 8 << 20
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_infer, port, big)
        answered = 0
        while not pending.done():
            assert httpx.get(f"http://127.0.0.1:{port}/v2/health/live",
                             timeout=10).status_code == 200
            answered += 1
        assert pending.result().status_code == 200
    assert answered >= 1


def test_big_json_is_refused_but_the_same_tensor_in_binary_is_served(hostile_server):
    """--max-json-mb 7: JSON costs the event loop its interpreter lock while it is scanned;
    the binary extension carries the same pixels at a fraction of the cost."""
    port = hostile_server.port
    r = _infer(port, b'{"inputs": [' + b" " * (7 << 20) + b"]}")
    assert r.status_code == 413 and "--max-json-mb 7" in r.json()["error"]
    pixels = np.random.default_rng(1).integers(0, 256, (1, 1600, 1600, 3), dtype=np.uint8)
    body, headers = _binary_body({"inputs": [{"name": "pixels", "datatype": "UINT8",
                                              "shape": list(pixels.shape),
                                              "parameters": {"binary_data_size": pixels.size}}],
                                  "outputs": [{"name": "embedding"}]}, pixels.tobytes())
    assert 7 << 20 < len(body) < 8 << 20
    r = _infer(port, body, headers)
    assert r.status_code == 200, r.text


def test_hundreds_of_malformed_bodies_get_400_never_500(hostile_server, images):  # noqa: F811
    import httpx
    valid = _image_doc(images[1])
    bodies = malformed_bodies(24, 300, valid)
    statuses: dict[int, int] = {}
    with httpx.Client(timeout=60) as client:
        url = f"http://127.0.0.1:{hostile_server.port}/v2/models/cnn/infer"
        for k, body in enumerate(bodies):
            headers = {}
            if k % 7 == 3:  # some as a binary-extension header with a wrong length
                headers["Inference-Header-Content-Length"] = str((k * 37) % (len(body) + 3))
            r = client.post(url, content=body, headers=headers)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (k, body[:200], r.text[:300])
            error = r.json().get("error", "") if r.status_code >= 400 else ""
            assert "Traceback" not in error and "internal error" not in error
    assert statuses.get(400, 0) > 250, statuses
    _healthy(hostile_server.port)


def test_malformed_grpc_requests_get_invalid_argument_never_internal(model_dir, images):  # noqa: F811
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc

    rng = random.Random(7)
    dims = [0, 0, 1, 2, 3, 10**8, 2**30, 2**31, 2**62, -1, -2**62]
    types = ["BYTES", "UINT8", "FP32", "FP16", "INT64", "BOOL", "x", ""]
    with serve_process([model_dir, "--name", "cnn", "--max-body-mb", "4",
                        "--log-level", "warning"]) as served:
        channel = grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}")
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        codes: dict[str, int] = {}
        for k in range(200):
            request = pb.ModelInferRequest(model_name="cnn")
            for _ in range(rng.choice([1, 1, 2])):
                spec = request.inputs.add(name=rng.choice(["image", "pixels", "x"]),
                                          datatype=rng.choice(types),
                                          shape=[rng.choice(dims)
                                                 for _ in range(rng.randint(0, 20))])
                if rng.random() < 0.6:
                    request.raw_input_contents.append(os.urandom(rng.choice([0, 3, 4, 64])))
                else:
                    spec.contents.bytes_contents.append(images[0][:rng.randint(0, 50)])
                    spec.contents.int_contents.extend([rng.randint(-300, 300)] * 3)
            try:
                stub.ModelInfer(request, timeout=60)
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.RpcError as e:
                codes[e.code().name] = codes.get(e.code().name, 0) + 1
                assert e.code() != grpc.StatusCode.INTERNAL, (k, request, e.details())
                assert "Traceback" not in (e.details() or "")
        channel.close()
    assert codes.get("INVALID_ARGUMENT", 0) > 150, codes


def test_decoded_bomb_request_gives_its_memory_back(hostile_server):
    port, pid = hostile_server.port, hostile_server.proc.pid
    bomb = png_bytes(10_000, 9_980)  # 97 KB, 100 MB decoded
    r = _infer(port, json.dumps(_image_doc(bomb)).encode())
    assert r.status_code == 200  # decoded within the limit, shrunk before conversion
    settled = _vm(pid, "VmRSS")
    for _ in range(3):
        assert _infer(port, json.dumps(_image_doc(bomb)).encode()).status_code == 200
    # each request peaks at ~100 MB more; afterwards the process is back where it was
    assert _vm(pid, "VmRSS") - settled < 40 << 20
    refused = _infer(port, json.dumps(_image_doc(
        png_bytes(9_000, 9_000, bit_depth=16, color_type=6))).encode())
    assert refused.status_code == 400 and "UNIREP_MAX_DECODED_MB" in refused.json()["error"]


def test_a_big_upload_is_parsed_off_the_event_loop(hostile_server, images):  # noqa: F811
    import httpx
    files = [("image", ("bomb.png", png_bytes(10_000, 9_980), "image/png")),
             ("image", ("b.jpg", images[1], "image/jpeg")),
             ("image", ("junk.bin", os.urandom(300_000), "application/octet-stream"))]
    r = httpx.post(f"http://127.0.0.1:{hostile_server.port}/v1/embed", files=files, timeout=120)
    assert r.status_code == 200, r.text
    rows = r.json()["results"]
    assert [row["file"] for row in rows] == ["bomb.png", "b.jpg", "junk.bin"]
    assert rows[0]["embedding"] and rows[1]["embedding"] and rows[2]["embedding"] is None
    assert "cannot decode" in rows[2]["error"]


def test_bodies_past_the_buffer_budget_get_503_with_retry_after(hostile_server):
    """--max-buffered-mb 12: two announced 7 MB bodies still being sent hold 14 MB; the second
    is refused at once, and once the first is answered the budget is free again."""
    port = hostile_server.port
    head = (b"POST /v2/models/cnn/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n\r\n" % (7 << 20))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as first:
        first.sendall(head + b'{"inputs": [')
        with socket.create_connection(("127.0.0.1", port), timeout=30) as second:
            second.sendall(head + b"{")
            reply = _read_reply(second)
        assert reply.startswith(b"HTTP/1.1 503"), reply[:200]
        assert b"retry-after: 1" in reply.lower() and b"max-buffered-mb" in reply
    # once the first client is gone its bytes are given back: a 6 MB body is read again
    # (and refused as malformed JSON)
    wait_until(lambda: _infer(port, b"{" + b" " * (6 << 20) + b"}").status_code == 400,
               timeout=60, what="the budget given back", interval=0.2)


def test_slowloris_sockets_are_closed_and_the_connection_cap_holds(hostile_server):
    """--header-timeout-s 2, --max-connections 40: 60 sockets dribbling headers; those past
    the cap are closed at once, the rest after the header timeout; then the server serves."""
    port = hostile_server.port
    socks = []
    for _ in range(60):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"POST /v2/models/cnn/infer HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)

    def closed(s: socket.socket) -> bool:
        s.settimeout(0.01)
        try:
            with_data = s.recv(1)
        except (TimeoutError, BlockingIOError):
            return False
        except OSError:
            return True
        return with_data == b""

    try:
        wait_until(lambda: sum(closed(s) for s in socks) >= 20, timeout=30,
                   what="the sockets past --max-connections closed")
        for s in socks:  # keep dribbling: a header line every now and then
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except OSError:
                pass
        wait_until(lambda: all(closed(s) for s in socks), timeout=60,
                   what="every slowloris socket closed after --header-timeout-s")
    finally:
        for s in socks:
            s.close()
    _healthy(port)


def test_a_body_that_stops_arriving_gets_408_and_its_budget_back(hostile_server):
    """--header-timeout-s 2: each body chunk may take 6 s; a body that stalls is answered 408."""
    port = hostile_server.port
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(b"POST /v2/models/cnn/infer HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: 5000000\r\n\r\n{\"inputs\": [")
        reply = _read_reply(s)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"did not arrive within 6 s" in reply
    _healthy(port)


def _images_ok(port: int) -> float:
    import httpx
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith('unirep_images_total{outcome="ok"'))


def _long_request(n: int = 40) -> bytes:
    """One request of `n` 100 MP PNGs: a batch of ~0.3-1 s an image, whatever the machine."""
    bomb = base64.b64encode(png_bytes(10_000, 9_980)).decode()
    return json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [n],
                                   "data": [bomb] * n}]}).encode()


@pytest.mark.slow
def test_timed_out_requests_are_dropped_so_good_ones_are_served(model_dir, images):  # noqa: F811
    """--timeout-s 2, one worker busy with a long batch: ten requests queued behind it time out
    (504) and are dropped unrun, so once the worker is free a good request is served at once
    instead of after ten abandoned ones. The metrics prove they never ran."""
    good = json.dumps(_image_doc(images[1])).encode()
    with serve_process([model_dir, "--name", "cnn", "--timeout-s", "2", "--workers", "1",
                        "--max-batch", "64", "--max-body-mb", "16",
                        "--log-level", "warning"]) as served:
        port, pid = served.port, served.proc.pid
        with ThreadPoolExecutor(11) as pool:
            long = pool.submit(_infer, port, _long_request())
            cpu = _cpu_seconds(pid)
            wait_until(lambda: _cpu_seconds(pid) - cpu > 1.0, timeout=120,
                       what="the long batch running")
            queued = [pool.submit(_infer, port, good) for _ in range(10)]
            assert [f.result().status_code for f in queued] == [504] * 10
            assert long.result().status_code == 504
        wait_until(lambda: _images_ok(port) >= 40, timeout=300, what="the long batch done")
        r = _infer(port, good)
        assert r.status_code == 200, r.text
        assert _images_ok(port) == 40 + 1  # the ten timed-out requests never ran


@pytest.mark.slow
def test_sigterm_during_a_long_batch_exits_within_the_graceful_limit(model_dir):  # noqa: F811
    """--timeout-s 2 (graceful limit 7 s): a request of 80 large images (20-80 s of decoding)
    is running when SIGTERM comes; the process is gone well before the batch would end."""
    with serve_process([model_dir, "--name", "cnn", "--timeout-s", "2", "--workers", "1",
                        "--max-batch", "128", "--max-body-mb", "16",
                        "--log-level", "warning"]) as served:
        pid = served.proc.pid
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(_infer, served.port, _long_request(80))
            cpu = _cpu_seconds(pid)
            wait_until(lambda: _cpu_seconds(pid) - cpu > 1.5, timeout=120,
                       what="the long batch running")
            sent = time.monotonic()
            served.proc.send_signal(signal.SIGTERM)
            served.proc.wait(timeout=120)
            took = time.monotonic() - sent
            with contextlib.suppress(Exception):  # answered 503/504, or the socket closed
                pending.result()
        assert took < 7 + 6, took  # the graceful limit and a margin; the batch needs 20-80 s
        assert served.proc.returncode in (0, -signal.SIGTERM)
