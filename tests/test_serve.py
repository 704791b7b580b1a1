"""The model service: the protocol (pure), the batcher, and the real server on a local port,
driven by tritonclient and by raw HTTP; the Ray Serve deployment. The whole API on both
transports is in test_serve_api.py, the Triton repository in test_triton.py."""
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from runtime.service.batcher import Batcher, QueueFull
from runtime.service.protocol import (
    HEADER_LENGTH,
    ProtocolError,
    encode_infer_response,
    pack_bytes,
    parse_infer_request,
    unpack_bytes,
)
from tests.conftest import ROOT
from tests.servers import READY_TIMEOUT_S, free_port, serve_process, wait_until

# ---------------------------------------------------------------------------------------------
# protocol.py (pure)


def _binary_body(header: dict, *blobs: bytes) -> tuple[bytes, int]:
    text = json.dumps(header).encode()
    return text + b"".join(blobs), len(text)


def test_json_tensors_parse_flat_or_nested():
    body = json.dumps({"id": "r1", "inputs": [
        {"name": "pixels", "datatype": "UINT8", "shape": [1, 2, 2, 3],
         "data": [[[[1, 2, 3], [4, 5, 6]], [[7, 8, 9], [10, 11, 12]]]]}],
        "outputs": [{"name": "embedding", "parameters": {"binary_data": True}}]}).encode()
    req = parse_infer_request(body)
    assert req.id == "r1" and req.outputs == {"embedding": True}
    t = req.input("pixels")
    assert t.data.dtype == np.uint8 and t.data.shape == (1, 2, 2, 3)
    assert t.data.reshape(-1).tolist() == list(range(1, 13))


def test_binary_tensors_and_bytes_elements():
    images = [b"\xff\xd8jpeg", b"", b"png\x00\x01"]
    pixels = np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3)
    blob_a, blob_b = pack_bytes(images), pixels.tobytes()
    body, n = _binary_body({"inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [3],
         "parameters": {"binary_data_size": len(blob_a)}},
        {"name": "pixels", "datatype": "UINT8", "shape": [2, 2, 2, 3],
         "parameters": {"binary_data_size": len(blob_b)}}],
        "parameters": {"binary_data_output": True}}, blob_a, blob_b)
    req = parse_infer_request(body, str(n))
    assert list(req.input("image").data) == images
    np.testing.assert_array_equal(req.input("pixels").data, pixels)
    assert req.binary_outputs is True
    assert list(unpack_bytes(pack_bytes(["a", b"bc"]), 2)) == [b"a", b"bc"]


_SHORT = (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], '
          b'"parameters": {"binary_data_size": 8}}]}')


@pytest.mark.parametrize("body, header_length, message", [
    (b"{not json", None, "malformed JSON"),
    (b"[]", None, "JSON object"),
    (b'{"inputs": []}', None, "non-empty `inputs`"),
    (b'{"inputs": [{"name": "x", "datatype": "FLOAT", "shape": [1], "data": [1]}]}', None,
     "unknown datatype"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1, 2]}]}', None,
     "needs 3 elements"),
    (b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [300]}]}', None,
     "out of range"),
    (b'{"inputs": [{"name": "x", "datatype": "INT32", "shape": [-1], "data": [1]}]}', None,
     "non-negative"),
    (_SHORT + b"\x00" * 4, str(len(_SHORT)), "does not fit"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}', "999",
     HEADER_LENGTH),
])
def test_malformed_requests_say_what_is_wrong(body, header_length, message):
    with pytest.raises(ProtocolError, match=message):
        parse_infer_request(body, header_length)


def test_binary_size_must_match_the_shape():
    blob = np.zeros(3, np.float32).tobytes()
    body, n = _binary_body({"inputs": [{"name": "x", "datatype": "FP32", "shape": [4],
                                        "parameters": {"binary_data_size": len(blob)}}]}, blob)
    with pytest.raises(ProtocolError, match="needs 16 bytes"):
        parse_infer_request(body, n)
    with pytest.raises(ProtocolError, match="hold at most 1"):
        unpack_bytes(pack_bytes([b"abc"]), 2)
    with pytest.raises(ProtocolError, match="ends before element 1"):
        unpack_bytes(pack_bytes([b"a"]) + b"\x00" * 3, 2)


def test_response_encoding_json_and_binary():
    emb = np.array([[1.5, np.nan]], np.float32)
    err = np.array([b"item 0: bad"], dtype=object)
    body, n = encode_infer_response("m", "7", {"embedding": emb, "error": err},
                                    {"embedding": False, "error": False})
    assert n is None
    doc = json.loads(body)
    assert doc["id"] == "7" and doc["outputs"][0]["data"] == [1.5, None]  # NaN -> null
    assert doc["outputs"][1] == {"name": "error", "datatype": "BYTES", "shape": [1],
                                 "data": ["item 0: bad"]}
    body, n = encode_infer_response("m", None, {"embedding": emb, "error": err},
                                    {"embedding": True, "error": True})
    doc = json.loads(body[:n])
    size = doc["outputs"][0]["parameters"]["binary_data_size"]
    assert size == 8
    back = np.frombuffer(body[n:n + size], "<f4")
    assert back[0] == 1.5 and np.isnan(back[1])
    assert list(unpack_bytes(body[n + size:], 1)) == [b"item 0: bad"]


# ---------------------------------------------------------------------------------------------
# batcher.py


def test_batcher_groups_concurrent_requests_up_to_max_batch():
    sizes = []

    def run(items):
        sizes.append(len(items))
        return [x * 10 for x in items]

    batcher = Batcher(run, max_batch=4, max_delay_s=0.2, max_queue=100, workers=1)
    try:
        futures = [batcher.submit([i]) for i in range(10)]
        assert [f.result(timeout=10) for f in futures] == [[i * 10] for i in range(10)]
        big = batcher.submit(list(range(6))).result(timeout=10)  # larger than max_batch: alone
        assert big == [i * 10 for i in range(6)]
    finally:
        batcher.close(timeout=10)
    assert sizes == [4, 4, 2, 6]


def test_batcher_shares_waiting_requests_between_idle_workers():
    # 8 requests that arrive together run as two batches of 4 side by side, not one batch of 8
    # on one worker while the other idles (each worker has half the cores for its model)
    sizes, both_running = [], threading.Barrier(2, timeout=10)

    def run(items):
        sizes.append(len(items))
        both_running.wait()  # fails (BrokenBarrierError) unless the two batches overlap
        return items

    batcher = Batcher(run, max_batch=32, max_delay_s=0.2, max_queue=100, workers=2)
    try:
        futures = [batcher.submit([i]) for i in range(8)]
        assert [f.result(timeout=20) for f in futures] == [[i] for i in range(8)]
    finally:
        batcher.close(timeout=10)
    assert sizes == [4, 4]


def test_batcher_queue_bound_failures_and_cancellation():
    gate, started = threading.Event(), threading.Event()

    def run(items):
        started.set()
        gate.wait(10)
        if "bad" in items:
            raise ValueError("boom")
        return items

    batcher = Batcher(run, max_batch=1, max_delay_s=0, max_queue=2, workers=1)
    try:
        first = batcher.submit(["a"])
        assert started.wait(10)  # the worker took it: the queue is empty again
        bad = batcher.submit(["bad"])
        dropped = batcher.submit(["c"])
        with pytest.raises(QueueFull, match="max-queue 2"):
            batcher.submit(["d"])
        assert dropped.cancel()  # its client gave up: never run
        gate.set()
        assert first.result(timeout=10) == ["a"]
        with pytest.raises(ValueError, match="boom"):
            bad.result(timeout=10)
        assert batcher.submit(["e"]).result(timeout=10) == ["e"]  # the worker lives on
    finally:
        gate.set()
        batcher.close(timeout=10)


def test_batcher_drops_expired_requests_and_close_gives_up_at_its_deadline():
    from runtime.service.batcher import Closed, Expired
    gate, started = threading.Event(), threading.Event()
    ran: list = []

    def run(items):
        ran.extend(items)
        started.set()
        gate.wait(30)
        return items

    batcher = Batcher(run, max_batch=1, max_delay_s=0, workers=1)
    try:
        first = batcher.submit(["a"])
        assert started.wait(10)
        expired = batcher.submit(["late"], deadline=time.monotonic() - 1)  # waited too long
        gate.set()
        assert first.result(timeout=10) == ["a"]
        with pytest.raises(Expired):
            expired.result(timeout=10)
        assert "late" not in ran  # dropped unrun
    finally:
        gate.set()
        batcher.close(timeout=10)
    gate.clear()
    started.clear()
    batcher = Batcher(run, max_batch=1, max_delay_s=0, workers=1)
    long_batch = batcher.submit(["long"])
    assert started.wait(10)
    queued = batcher.submit(["queued"])
    assert batcher.close(timeout=0.2) is False  # the long batch still runs at the deadline
    with pytest.raises(Closed, match="stopped before this request ran"):
        queued.result(timeout=10)
    gate.set()
    assert long_batch.result(timeout=10) == ["long"] and "queued" not in ran


# ---------------------------------------------------------------------------------------------
# fixtures: a real exported small CNN, a probe fitted on it, real images


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, fmnist_small):
    from export.onnx_export import export_runs
    from train.runs import untrained_run

    base = tmp_path_factory.mktemp("serve")
    untrained_run("small_cnn", str(base / "run"),
                  heads=[("specific", [f"c{i}" for i in range(10)])])
    out = str(base / "cnn")
    export_runs([str(base / "run")], out, parity_images=4, check_data=fmnist_small)
    return out


@pytest.fixture(scope="module")
def images(fmnist_small):
    """Real Fashion-MNIST test images as PNG bytes and as JPEG bytes."""
    import io

    from PIL import Image

    from common.data import load_dataset
    paths = load_dataset(fmnist_small).paths("test")[::5][:24]
    out = []
    for k, p in enumerate(paths):
        with open(p, "rb") as f:
            data = f.read()
        if k % 2:
            buf = io.BytesIO()
            Image.open(io.BytesIO(data)).convert("RGB").save(buf, "JPEG", quality=90)
            data = buf.getvalue()
        out.append(data)
    return out


@pytest.fixture(scope="module")
def library(model_dir):
    from runtime import FeaturePipeline
    with FeaturePipeline(model_dir, device="cpu", batch_size=8) as pipe:
        yield pipe


@pytest.fixture(scope="module")
def probes(model_dir, library, fmnist_small, tmp_path_factory):
    """A probe fitted on this model (with its fingerprint) and one claiming another backbone."""
    from common.data import load_dataset
    from runtime import LogisticRegressionProbe, save_probe
    from runtime.probes import description_fingerprint

    data = load_dataset(fmnist_small)
    train = library.embed(data.paths("train"))
    y = data.labels("train")[train.ok]
    probe = LogisticRegressionProbe(C=1.0).fit(train.vectors[train.ok], y)
    base = tmp_path_factory.mktemp("probes")
    meta = {"model_fingerprint": description_fingerprint(library.description_),
            "architecture": library.description_.architecture}
    save_probe(probe, str(base / "good"), metadata=meta)
    save_probe(probe, str(base / "other"), metadata=dict(meta, model_fingerprint="0" * 16))
    return {"good": str(base / "good"), "other": str(base / "other"), "probe": probe}


_free_port = free_port


@contextlib.contextmanager
def running_server(model_dir, *args, timeout=READY_TIMEOUT_S, env=None):
    """`cli.py serve` in a subprocess on a free port; yields (port, process); always killed."""
    with serve_process([model_dir, *args], grpc=False, env=env) as served:
        yield served.port, served.proc


@pytest.fixture(scope="module")
def server(model_dir, probes):
    with running_server(model_dir, "--probe", f"fm={probes['good']}", "--name", "cnn",
                        "--max-body-mb", "1", "--max-batch", "8") as (port, _):
        yield port


def _url(port, path):
    return f"http://127.0.0.1:{port}{path}"


def _healthy(port):
    import httpx
    assert httpx.get(_url(port, "/v2/health/ready"), timeout=10).status_code == 200
    assert httpx.get(_url(port, "/v2/models/cnn/ready"), timeout=10).status_code == 200


# ---------------------------------------------------------------------------------------------
# the real server


def test_tritonclient_metadata_ready_and_binary_infer(server, images, library, probes):
    import tritonclient.http as httpclient
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("cnn")
    meta = client.get_model_metadata("cnn")
    assert {"name": "image", "datatype": "BYTES", "shape": [-1]} in meta["inputs"]
    outputs = {o["name"]: o for o in meta["outputs"]}
    assert outputs["embedding"]["shape"] == [-1, library.feature_dim_]
    assert {"fm_label", "fm_score", "fm_topk_label", "fm_topk_score"} <= set(outputs)

    batch = images[:5]
    inp = httpclient.InferInput("image", [len(batch)], "BYTES")
    inp.set_data_from_numpy(np.array(batch, dtype=object), binary_data=True)
    wanted = ["embedding", "error", "fm_label", "fm_score", "fm_topk_score"]
    result = client.infer("cnn", [inp], outputs=[
        httpclient.InferRequestedOutput(n, binary_data=True) for n in wanted])
    expected = library.embed(batch).vectors
    np.testing.assert_allclose(result.as_numpy("embedding"), expected, rtol=1e-5, atol=1e-6)
    assert [e for e in result.as_numpy("error")] == [b""] * 5
    proba = probes["probe"].predict_proba(expected)
    labels = [str(c).encode() for c in probes["probe"].classes_[proba.argmax(1)]]
    assert list(result.as_numpy("fm_label")) == labels
    np.testing.assert_allclose(result.as_numpy("fm_score"), proba.max(1), rtol=1e-4)
    assert result.as_numpy("fm_topk_score").shape == (5, 5)
    client.close()


def test_tritonclient_json_pixels(server, library):
    import tritonclient.http as httpclient
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 40, 30, 3), dtype=np.uint8)
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server}")
    inp = httpclient.InferInput("pixels", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels, binary_data=False)
    result = client.infer("cnn", [inp], outputs=[
        httpclient.InferRequestedOutput("embedding", binary_data=False)])
    np.testing.assert_allclose(result.as_numpy("embedding"), library.embed(list(pixels)).vectors,
                               rtol=1e-5, atol=1e-6)
    client.close()


def test_sixteen_concurrent_clients_get_the_library_rows(server, images, library):
    import tritonclient.http as httpclient
    expected = library.embed(images).vectors

    def one(k):
        client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server}")
        try:
            inp = httpclient.InferInput("image", [1], "BYTES")
            inp.set_data_from_numpy(np.array([images[k]], dtype=object), binary_data=True)
            out = client.infer("cnn", [inp], outputs=[
                httpclient.InferRequestedOutput("embedding", binary_data=True)])
            return k, out.as_numpy("embedding")[0]
        finally:
            client.close()

    with ThreadPoolExecutor(16) as pool:
        got = dict(pool.map(one, [k % len(images) for k in range(48)]))
    for k, row in got.items():
        np.testing.assert_allclose(row, expected[k], rtol=1e-5, atol=1e-6)
    _healthy(server)


def test_curl_style_upload_with_a_corrupt_file(server, images, library):
    import httpx
    files = [("image", ("a.png", images[0], "image/png")),
             ("image", ("broken.jpg", b"\xff\xd8 not really a jpeg", "image/jpeg")),
             ("image", ("b.jpg", images[1], "image/jpeg"))]
    r = httpx.post(_url(server, "/v1/embed"), files=files, timeout=30)
    assert r.status_code == 200
    rows = r.json()["results"]
    assert [row["file"] for row in rows] == ["a.png", "broken.jpg", "b.jpg"]
    assert rows[1]["embedding"] is None and rows[1]["error"].startswith("broken.jpg: ")
    expected = library.embed([images[0], images[1]]).vectors
    np.testing.assert_allclose([rows[0]["embedding"], rows[2]["embedding"]], expected,
                               rtol=1e-5, atol=1e-6)
    assert rows[0]["probes"]["fm"]["label"] == rows[0]["probes"]["fm"]["top_k"][0][0]
    r = httpx.post(_url(server, "/v1/embed"), files=[files[1]], timeout=30)
    assert r.status_code == 400 and "cannot decode" in r.json()["results"][0]["error"]
    _healthy(server)


def _infer(port, doc, name="cnn"):
    import httpx
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return httpx.post(_url(port, f"/v2/models/{name}/infer"), content=body, timeout=30)


def test_bad_requests_get_the_right_status_and_the_server_stays_healthy(server, images):
    jpeg = base64.b64encode(images[1]).decode()
    cases = [
        (b'{"inputs": [', 400, "malformed JSON"),
        ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 2, 2, 3],
                      "data": [0.5] * 12}]}, 400, "must be UINT8"),
        ({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [2, 2, 4],
                      "data": [1] * 16}]}, 400, "RGB HWC"),
        ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 2],
                      "data": [jpeg, jpeg]}]}, 400, r"shape \[N\]"),
        ({"inputs": [{"name": "photo", "datatype": "BYTES", "shape": [1],
                      "data": [jpeg]}]}, 400, "unknown input"),
        ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                      "data": ["not base64!"]}]}, 400, "base64"),
        ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                      "data": [base64.b64encode(b"GIF89a broken").decode()]}]}, 400,
         "item 0: .*cannot decode"),
    ]
    for doc, status, message in cases:
        r = _infer(server, doc)
        assert r.status_code == status, (doc, r.text)
        assert set(r.json()) == {"error"}
        assert __import__("re").search(message, r.json()["error"]), r.json()
    r = _infer(server, cases[1][0], name="nope")
    assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]
    # a corrupt image among good ones fails only its own item
    doc = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3],
                       "data": [jpeg, base64.b64encode(b"junk").decode(), jpeg]}],
           "outputs": [{"name": "embedding"}, {"name": "error"}]}
    r = _infer(server, doc)
    assert r.status_code == 200
    emb, err = r.json()["outputs"]
    assert err["data"][0] == err["data"][2] == "" and err["data"][1].startswith("item 1: ")
    assert emb["data"][emb["shape"][1]] is None and emb["data"][0] is not None
    _healthy(server)


def test_oversize_body_is_refused_before_it_is_read(server):
    """--max-body-mb 1: a request announcing 50 MB gets 413 after only its headers."""
    with socket.create_connection(("127.0.0.1", server), timeout=10) as s:
        s.sendall(b"POST /v2/models/cnn/infer HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 52428800\r\n\r\n{")
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"max-body-mb" in reply
    import httpx  # and a real oversize body without Content-Length trickery
    r = httpx.post(_url(server, "/v1/embed"),
                   files=[("image", ("big.png", os.urandom(2 * 1024 * 1024), "image/png"))],
                   timeout=30)
    assert r.status_code == 413
    _healthy(server)


def test_metrics_count_requests_batches_and_images(server, images):
    import httpx
    text = httpx.get(_url(server, "/metrics"), timeout=10).text
    for name in ("unirep_requests_total", "unirep_request_seconds_bucket",
                 "unirep_batch_size_bucket", "unirep_queue_depth", "unirep_images_total"):
        assert name in text
    ok = [line for line in text.splitlines() if line.startswith('unirep_images_total{outcome="ok"')]
    assert ok and float(ok[0].split()[-1]) >= 1


def test_probe_for_another_backbone_is_refused_at_start(model_dir, probes):
    from click.testing import CliRunner

    from runtime.cli.serve import serve
    result = CliRunner().invoke(serve, [model_dir, "--probe", f"x={probes['other']}",
                                        "--port", "1"])
    assert result.exit_code == 2
    assert "fingerprint 0000000000000000" in result.output and "refit" in result.output
    result = CliRunner().invoke(serve, [model_dir, "--probe", "no-equals-sign"])
    assert result.exit_code == 2 and "NAME=PROBE_DIR" in result.output


def test_probe_without_fingerprint_is_served_with_a_warning(library, probes, tmp_path, caplog):
    from runtime import load_probe, save_probe
    from runtime.service.model import load_probes
    old = load_probe(probes["good"])
    old.metadata_ = {}
    save_probe(old, str(tmp_path / "old"))
    with caplog.at_level("WARNING", logger="unirep.serve"):
        served = load_probes({"old": str(tmp_path / "old")}, library.description_)
    assert served[0].name == "old" and "no model fingerprint" in caplog.text


def _queue_depth(port) -> float:
    import httpx
    text = httpx.get(_url(port, "/metrics"), timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("unirep_queue_depth"))


@pytest.mark.slow
def test_full_queue_503_timeout_504_and_sigterm_drains(model_dir, images):
    """--max-queue 1 with a long batching delay: a second waiting request is refused with
    503 + Retry-After; SIGTERM then lets the first one finish before the process exits."""
    jpeg = base64.b64encode(images[1]).decode()
    doc = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [jpeg]}]}
    with running_server(model_dir, "--name", "cnn", "--max-queue", "1", "--max-delay-ms",
                        "1500", "--timeout-s", "20") as (port, proc):
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(_infer, port, doc)
            wait_until(lambda: _queue_depth(port) >= 1, timeout=60,
                       what="the first request waiting in the queue")
            r = _infer(port, doc)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert "max-queue 1" in r.json()["error"]
            proc.send_signal(signal.SIGTERM)
            assert first.result(timeout=30).status_code == 200
        # uvicorn re-raises the SIGTERM after its graceful shutdown, as process managers expect
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    with running_server(model_dir, "--name", "cnn", "--max-delay-ms", "3000",
                        "--timeout-s", "0.3") as (port, _):
        r = _infer(port, doc)
        assert r.status_code == 504 and "--timeout-s 0.3" in r.json()["error"]
        _healthy(port)


# ---------------------------------------------------------------------------------------------
# Ray Serve


@contextlib.contextmanager
def ray_serve_patience(seconds: float = 600.0):
    """Ray Serve waits a fixed 60 s for its HTTP proxy (HTTP_PROXY_TIMEOUT, no setting) and 5 s
    for each of the proxy's health and ready checks: too little on a loaded machine (load 5-6
    on 2 cores). Longer waits for the Ray started inside: the checks' environment variables
    (inherited by Ray's processes) and the proxy constant where Serve reads it."""
    import ray.serve._private.api as serve_api
    import ray.serve._private.client as serve_client
    names = ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S")
    saved = {n: os.environ.get(n) for n in names}
    saved_timeouts = serve_api.HTTP_PROXY_TIMEOUT, serve_client.HTTP_PROXY_TIMEOUT
    os.environ.update({n: str(seconds / 10) for n in names})
    serve_api.HTTP_PROXY_TIMEOUT = serve_client.HTTP_PROXY_TIMEOUT = seconds
    try:
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v
        serve_api.HTTP_PROXY_TIMEOUT, serve_client.HTTP_PROXY_TIMEOUT = saved_timeouts


@pytest.mark.slow
def test_ray_serve_deployment_with_two_replicas(model_dir, images, library):
    import httpx
    import ray
    from ray import serve

    from runtime.local_ray import LOOPBACK, init_local_ray, node_addresses
    from runtime.service.ray_serve import deployment
    port = _free_port()
    patience = contextlib.ExitStack()
    patience.enter_context(ray_serve_patience())
    init_local_ray(num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    try:
        assert node_addresses() == {LOOPBACK}  # nothing listens beyond the loopback
        serve.start(http_options={"host": LOOPBACK, "port": port})
        app = deployment(replicas=2, num_cpus=1).bind(model_dir, name="cnn", workers=1,
                                                        max_batch=8, device="cpu")
        serve.run(app, name="unirep", route_prefix="/", blocking=False)

        def ready() -> bool:  # serve.run returns when the replicas are up; the proxy may lag
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(_url(port, "/v2/health/ready"), timeout=5).status_code == 200
            return False
        wait_until(ready, timeout=READY_TIMEOUT_S * 2, what="the Ray Serve app", interval=0.5)
        status = serve.status().applications["unirep"].deployments["unirep"]
        assert status.replica_states.get("RUNNING") == 2
        expected = library.embed(images[:8]).vectors

        def one(k):
            doc = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                               "data": [base64.b64encode(images[k]).decode()]}]}
            r = httpx.post(_url(port, "/v2/models/cnn/infer"), json=doc, timeout=60)
            assert r.status_code == 200, r.text
            (emb,) = [o for o in r.json()["outputs"] if o["name"] == "embedding"]
            return k, np.array(emb["data"], np.float32)

        with ThreadPoolExecutor(8) as pool:
            for k, row in pool.map(one, range(8)):
                np.testing.assert_allclose(row, expected[k], rtol=1e-5, atol=1e-6)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        patience.close()


def test_service_modules_stay_off_the_light_import_paths():
    """`import runtime`, the pipeline and the serve command's module import no web stack."""
    code = ("import sys, runtime, cli, runtime.cli.serve, runtime.service.protocol, "
            "runtime.service.batcher\nfrom runtime import FeaturePipeline\n"
            "heavy = [m for m in ('starlette', 'fastapi', 'uvicorn', 'prometheus_client', "
            "'tritonclient', 'ray', 'httpx', 'multipart') if m in sys.modules]\n"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
