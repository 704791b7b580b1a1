"""The service's whole API on both transports, from a real `cli.py serve` subprocess driven by
tritonclient.grpc and tritonclient.http: two models with their probes in one process (a
repository folder), metadata, config, statistics, repository index, raw binary infer, 16
concurrent clients each way, bad gRPC requests, the API key, and TLS with a certificate made
here."""
import contextlib
import datetime
import ipaddress
import os
import shutil
import ssl
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.servers import READY_TIMEOUT_S, serve_process
from tests.test_serve import images  # noqa: F401  (a fixture)

KEY = "s3cret-key"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, exported_model, fmnist_small):
    """A repository of two different small CNNs (seeds 0 and 1), each with a probe fitted on
    its own embeddings in MODEL/probes/fm; and their libraries' pipelines."""
    from common.data import load_dataset
    from runtime import FeaturePipeline, LogisticRegressionProbe, save_probe
    from runtime.probes import description_fingerprint

    root = tmp_path_factory.mktemp("repo")
    data = load_dataset(fmnist_small)
    models = {}
    for name, seed in (("cnn", 0), ("cnn2", 1)):
        folder = str(root / "models" / name)
        shutil.copytree(exported_model(fmnist_small, seed=seed), folder)
        pipe = FeaturePipeline(folder, device="cpu", batch_size=8)
        train = pipe.embed(data.paths("train")[::4])
        probe = LogisticRegressionProbe(C=1.0).fit(train.vectors[train.ok],
                                                   data.labels("train")[::4][train.ok])
        save_probe(probe, os.path.join(folder, "probes", "fm"), metadata={
            "model_fingerprint": description_fingerprint(pipe.description_),
            "architecture": pipe.description_.architecture})
        models[name] = {"dir": folder, "pipe": pipe, "probe": probe}
    yield {"root": str(root / "models"), "models": models}
    for m in models.values():
        m["pipe"].close()


@contextlib.contextmanager
def serving(args, *, scheme="http", timeout=READY_TIMEOUT_S, verify=None):
    """`cli.py serve ARGS` on free HTTP and gRPC ports; yields (http_port, grpc_port, proc)."""
    with serve_process([*args, "--log-level", "warning"], scheme=scheme, verify=verify,
                       timeout=timeout) as served:
        yield served.port, served.grpc_port, served.proc


@pytest.fixture(scope="module")
def server(repo):
    with serving(["--repository", repo["root"], "--api-key", KEY, "--max-body-mb", "1",
                  "--max-batch", "8"]) as (port, grpc_port, _):
        yield {"http": port, "grpc": grpc_port}


def _grpc(server):
    import tritonclient.grpc as grpcclient
    return grpcclient.InferenceServerClient(url=f"127.0.0.1:{server['grpc']}")


def _http(server):
    import tritonclient.http as httpclient
    return httpclient.InferenceServerClient(url=f"127.0.0.1:{server['http']}",
                                            connection_timeout=60, network_timeout=60)


def _infer_grpc(client, model, batch, outputs=("embedding", "error", "fm_label")):
    import tritonclient.grpc as grpcclient
    inp = grpcclient.InferInput("image", [len(batch)], "BYTES")
    inp.set_data_from_numpy(np.array(batch, dtype=object))
    return client.infer(model, [inp], headers=AUTH, client_timeout=60,
                        outputs=[grpcclient.InferRequestedOutput(n) for n in outputs])


def _infer_http(client, model, batch, outputs=("embedding", "error", "fm_label")):
    import tritonclient.http as httpclient
    inp = httpclient.InferInput("image", [len(batch)], "BYTES")
    inp.set_data_from_numpy(np.array(batch, dtype=object), binary_data=True)
    # a copy: tritonclient.http adds its header-length entry to the dict it is given
    return client.infer(model, [inp], headers=dict(AUTH), outputs=[
        httpclient.InferRequestedOutput(n, binary_data=True) for n in outputs])


def _expected(repo, name, batch):
    m = repo["models"][name]
    vectors = m["pipe"].embed(batch).vectors
    labels = [str(c).encode() for c in m["probe"].classes_[
        m["probe"].predict_proba(vectors).argmax(1)]]
    return vectors, labels


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_two_models_each_give_their_own_library_rows(server, repo, images, transport):  # noqa: F811
    client = (_grpc if transport == "grpc" else _http)(server)
    infer = _infer_grpc if transport == "grpc" else _infer_http
    batch = images[:5]
    rows = {}
    for name in ("cnn", "cnn2"):
        result = infer(client, name, batch)
        vectors, labels = _expected(repo, name, batch)
        np.testing.assert_allclose(result.as_numpy("embedding"), vectors, rtol=1e-5, atol=1e-6)
        assert list(result.as_numpy("error")) == [b""] * len(batch)
        assert list(result.as_numpy("fm_label")) == labels
        rows[name] = vectors
    assert not np.allclose(rows["cnn"], rows["cnn2"])  # two models, not one served twice
    client.close()


def test_grpc_metadata_config_statistics_and_index(server, repo, images):  # noqa: F811
    from tritonclient.grpc import model_config_pb2
    client = _grpc(server)
    assert client.is_server_live() and client.is_server_ready()  # no key needed
    assert client.is_model_ready("cnn") and client.is_model_ready("cnn2")
    meta = client.get_server_metadata(headers=AUTH)
    assert meta.name == "unirep" and "statistics" in meta.extensions
    meta = client.get_model_metadata("cnn2", headers=AUTH, as_json=True)
    outputs = {o["name"]: o for o in meta["outputs"]}
    dim = repo["models"]["cnn2"]["pipe"].feature_dim_
    assert [int(d) for d in outputs["embedding"]["shape"]] == [-1, dim]
    assert {"fm_label", "fm_score", "fm_topk_label", "fm_topk_score"} <= set(outputs)
    config = client.get_model_config("cnn", headers=AUTH).config
    assert isinstance(config, model_config_pb2.ModelConfig) and config.name == "cnn"
    assert [i.name for i in config.input] == ["image", "pixels"]
    assert config.input[0].data_type == model_config_pb2.TYPE_STRING
    assert config.dynamic_batching.preferred_batch_size == [8]
    index = client.get_model_repository_index(headers=AUTH)
    assert sorted((m.name, m.state) for m in index.models) == [("cnn", "READY"),
                                                               ("cnn2", "READY")]
    before = client.get_inference_statistics("cnn2", headers=AUTH).model_stats[0]
    _infer_grpc(client, "cnn2", images[:3])
    after = client.get_inference_statistics("cnn2", headers=AUTH).model_stats[0]
    assert after.inference_count == before.inference_count + 3
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.execution_count >= before.execution_count + 1
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    assert after.inference_stats.queue.count == after.inference_stats.success.count
    every = client.get_inference_statistics(headers=AUTH)
    assert sorted(s.name for s in every.model_stats) == ["cnn", "cnn2"]
    client.close()


def test_http_config_statistics_and_index(server, images):  # noqa: F811
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2
    client = _http(server)
    config = client.get_model_config("cnn2", headers=AUTH)
    parsed = json_format.ParseDict(config, model_config_pb2.ModelConfig())  # Triton's schema
    assert parsed.name == "cnn2" and parsed.output[0].name == "embedding"
    index = client.get_model_repository_index(headers=AUTH)
    assert sorted((m["name"], m["state"]) for m in index) == [("cnn", "READY"),
                                                              ("cnn2", "READY")]
    before = client.get_inference_statistics("cnn", headers=AUTH)["model_stats"][0]
    _infer_http(client, "cnn", images[:4])
    after = client.get_inference_statistics("cnn", headers=AUTH)["model_stats"][0]
    assert after["inference_count"] == before["inference_count"] + 4
    assert after["inference_stats"]["success"]["count"] == \
        before["inference_stats"]["success"]["count"] + 1
    assert after["inference_stats"]["compute_infer"]["ns"] > \
        before["inference_stats"]["compute_infer"]["ns"]
    client.close()


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_sixteen_concurrent_clients_per_transport(server, repo, images, transport):  # noqa: F811
    expected, _ = _expected(repo, "cnn", images)

    def one(k):
        client = (_grpc if transport == "grpc" else _http)(server)
        infer = _infer_grpc if transport == "grpc" else _infer_http
        try:
            return k, infer(client, "cnn", [images[k]], outputs=("embedding",)
                            ).as_numpy("embedding")[0]
        finally:
            client.close()

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, [k % len(images) for k in range(48)]))
    assert len(got) == 48
    for k, row in got:
        np.testing.assert_allclose(row, expected[k], rtol=1e-5, atol=1e-6)


def test_bad_grpc_requests_get_a_status_with_a_reason(server, images):  # noqa: F811
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc

    from runtime.service.protocol import pack_bytes

    channel = grpc.insecure_channel(f"127.0.0.1:{server['grpc']}")
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    meta = list(AUTH.items())

    def request(model="cnn", name="image", datatype="BYTES", shape=(1,), raw=None):
        req = pb.ModelInferRequest(model_name=model)
        req.inputs.add(name=name, datatype=datatype, shape=list(shape))
        req.raw_input_contents.append(pack_bytes([images[1]]) if raw is None else raw)
        return req

    cases = [
        (request(model="nope"), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
        (request(datatype="FP32", raw=b"\0" * 4), grpc.StatusCode.INVALID_ARGUMENT,
         "must be BYTES"),
        (request(name="photo"), grpc.StatusCode.INVALID_ARGUMENT, "unknown input"),
        (request(datatype="FLOAT"), grpc.StatusCode.INVALID_ARGUMENT, "unknown datatype"),
        (request(shape=(3,)), grpc.StatusCode.INVALID_ARGUMENT, "ends before element 1"),
        (request(raw=pack_bytes([b"GIF89a broken"])), grpc.StatusCode.INVALID_ARGUMENT,
         "item 0: .*cannot decode"),
        (request(name="pixels", datatype="UINT8", shape=(2, 2, 4), raw=b"\0" * 16),
         grpc.StatusCode.INVALID_ARGUMENT, "RGB HWC"),
        (request(raw=pack_bytes([os.urandom(1_200_000)])),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
    ]
    two = request()
    two.raw_input_contents.append(b"extra")
    cases.append((two, grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents has 2 entries"))
    import re
    for req, code, reason in cases:
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(req, metadata=meta, timeout=60)
        assert info.value.code() == code, (reason, info.value.details())
        assert re.search(reason, info.value.details()), info.value.details()
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    ok = stub.ModelInfer(request(), metadata=meta, timeout=60)  # still serving
    assert ok.model_name == "cnn" and [o.name for o in ok.outputs][:2] == ["embedding", "error"]
    channel.close()


def test_without_the_key_refused_on_both_transports(server):
    import httpx
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    base = f"http://127.0.0.1:{server['http']}"
    for path in ("/v2", "/v2/models/cnn", "/v2/models/cnn/config", "/v2/models/stats",
                 "/metrics"):
        r = httpx.get(base + path, timeout=10)
        assert r.status_code == 401 and "API key" in r.json()["error"], path
        assert r.headers["www-authenticate"].startswith("Bearer")
    r = httpx.post(base + "/v2/models/cnn/infer", content=b"{}", timeout=10,
                   headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401 and "wrong" in r.json()["error"]
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/cnn/ready"):
        assert httpx.get(base + path, timeout=10).status_code == 200, path  # probes stay open
    assert httpx.get(base + "/v2", headers=AUTH, timeout=10).status_code == 200
    assert "unirep_requests_total" in httpx.get(base + "/metrics", headers=AUTH,
                                                timeout=10).text
    client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{server['grpc']}")
    for call in (lambda: client.get_model_metadata("cnn"),
                 lambda: client.get_model_metadata("cnn", headers={"authorization": "Bearer x"}),
                 lambda: client.get_model_repository_index()):
        with pytest.raises(InferenceServerException) as info:
            call()
        assert "UNAUTHENTICATED" in str(info.value.status()) and "API key" in info.value.message()
    assert client.get_model_metadata("cnn", headers=AUTH).name == "cnn"
    client.close()


def _certificate(folder) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and localhost (cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_on_both_transports(repo, images, tmp_path):  # noqa: F811
    import httpx
    import tritonclient.grpc as grpcclient

    cert, key = _certificate(str(tmp_path))
    key_file = tmp_path / "api-key.txt"
    key_file.write_text(KEY + "\n")
    model = repo["models"]["cnn"]["dir"]
    trust = ssl.create_default_context(cafile=cert)
    with serving([model, "--tls-cert", cert, "--tls-key", key, "--api-key-file",
                  str(key_file)], scheme="https", verify=trust) as (port, grpc_port, _):
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not spoken on the TLS port
            httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=5)
        r = httpx.get(f"https://127.0.0.1:{port}/v2/models/cnn", headers=AUTH, timeout=10,
                      verify=trust)
        assert r.status_code == 200 and r.json()["name"] == "cnn"
        with open(cert, "rb") as f:
            root = f.read()
        client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{grpc_port}", ssl=True,
                                                  root_certificates=cert)
        result = _infer_grpc(client, "cnn", images[:2], outputs=("embedding",))
        expected, _ = _expected(repo, "cnn", images[:2])
        np.testing.assert_allclose(result.as_numpy("embedding"), expected, rtol=1e-5,
                                   atol=1e-6)
        client.close()
        assert root.startswith(b"-----BEGIN CERTIFICATE")


def test_serve_refuses_ambiguous_models_and_probes(repo):
    from click.testing import CliRunner

    from runtime.cli.serve import serve
    a, b = repo["models"]["cnn"]["dir"], repo["models"]["cnn2"]["dir"]
    cases = [([a, b, "--probe", "fm=x"], "MODEL:NAME=PROBE_DIR"),
             ([a, b, "--probe", "zzz:fm=x"], "no served model is named 'zzz'"),
             ([a, b, "--name", "x"], "--name names the one model"),
             ([a, a], "both named 'cnn'"),
             ([], "MODEL_DIR"),
             ([a, "--tls-cert", a + "/description.json"], "both --tls-cert and --tls-key")]
    for args, message in cases:
        result = CliRunner().invoke(serve, args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
