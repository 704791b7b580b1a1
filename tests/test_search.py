"""Similarity search (runtime/search, faiss): exact neighbours on real images, the recall of
the approximate index on 60,000 Fashion-MNIST images, near-duplicates, the CLI on an embed
output, and the service's search endpoint answering like the CLI."""
import base64
import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("faiss", reason="similarity search needs faiss: pip install 'unirep[search]'")

from runtime.search import (
    SearchIndexError,
    build_index,
    load_index,
    load_saved_embeddings,
    near_duplicates,
    recall_at_k,
    save_index,
)
from tests.conftest import run_cli


def _fashion_mnist(split: str) -> np.ndarray:
    """The real Fashion-MNIST images of a split as float pixel vectors (784-d)."""
    from common.data import _find_fashion_mnist, _read_idx
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(os.path.join(_find_fashion_mnist(), f"{prefix}-images-idx3-ubyte.gz"))
    return images.reshape(len(images), -1).astype(np.float32)


def _brute_force(database: np.ndarray, queries: np.ndarray, k: int):
    """(scores, rows) of the k most cosine-similar rows, by NumPy alone."""
    d = database / np.linalg.norm(database, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ d.T.astype(np.float64)
    rows = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, rows, axis=1), rows


def test_exact_index_returns_the_exact_neighbours():
    data = _fashion_mnist("test")
    database, queries = data[:3000], data[3000:3100]
    ids = [f"img{i}" for i in range(len(database))]
    index = build_index(database, ids)  # 3,000 vectors: "auto" chooses the exact scan
    assert index.info["kind"] == "exact" and index.info["recall_at_10"] == 1.0
    scores, rows = index.search(queries, 10)
    want_scores, want_rows = _brute_force(database, queries, 10)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    # the same neighbours; an order may differ only between equal scores
    for got, want, s in zip(rows, want_rows, want_scores):
        if not np.array_equal(got, want):
            assert set(got) == set(want) and len(set(np.round(s, 5))) < len(s)
    first = index.neighbours(queries[:1], 3)[0]
    assert [n for n, _ in first] == [ids[r] for r in rows[0][:3]]
    assert first[0][1] == pytest.approx(float(want_scores[0, 0]), abs=1e-5)


def test_index_folder_round_trip_and_refusals(tmp_path):
    data = _fashion_mnist("test")[:500]
    ids = [f"x/{i}.png" for i in range(len(data))]
    index = build_index(data, ids, kind="hnsw")
    save_index(index, str(tmp_path / "idx"), model={"fingerprint": "abc"})
    loaded = load_index(str(tmp_path / "idx"))
    assert loaded.ids == ids and loaded.info["kind"] == "hnsw"
    assert loaded.info["params"]["efSearch"] == index.info["params"]["efSearch"]
    assert loaded.neighbours(data[:5], 4) == index.neighbours(data[:5], 4)
    with open(tmp_path / "idx" / "index.faiss", "r+b") as f:
        f.truncate(100)  # a damaged file is one clear error, not a crash
    with pytest.raises(SearchIndexError, match="damaged|unreadable"):
        load_index(str(tmp_path / "idx"))
    with pytest.raises(SearchIndexError, match="repeat"):
        build_index(data[:3], ["a", "a", "b"])
    with pytest.raises(SearchIndexError, match="no index here"):
        load_index(str(tmp_path))


def test_saved_npy_output_and_a_stale_index(tmp_path):
    """An embed-style FEATURES.npy (NaN rows for failures) read back and indexed; rewriting
    the embeddings afterwards marks the index stale."""
    from runtime.search import is_stale
    from runtime.search.store import source_signature
    data = _fashion_mnist("test")[:50].copy()
    data[7] = np.nan  # a failed image
    npy = str(tmp_path / "f.npy")
    np.save(npy, data)
    (tmp_path / "f.ids.json").write_text(json.dumps([f"p{i}.png" for i in range(50)]))
    saved = load_saved_embeddings(npy)
    assert len(saved.ids) == 49 and saved.dropped == 1 and "p7.png" not in saved.ids
    index = build_index(saved.vectors, saved.ids)
    save_index(index, str(tmp_path / "f.index"), source=npy, source_signature=source_signature(npy))
    loaded = load_index(npy)  # the output itself finds its default index folder
    assert not is_stale(loaded)
    np.save(npy, data[::-1])
    os.utime(npy, ns=(os.stat(npy).st_atime_ns, os.stat(npy).st_mtime_ns + 10**9))
    assert is_stale(load_index(npy))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_recall_at_10_on_60000_images(kind):
    """The 60,000 Fashion-MNIST training images indexed approximately; the 1,000 first test
    images (never indexed) as queries: recall@10 against the exact neighbours >= 0.95, and
    the recall measured at build agrees."""
    database, queries = _fashion_mnist("train"), _fashion_mnist("test")[:1000]
    ids = [str(i) for i in range(len(database))]
    index = build_index(database, ids, kind=kind)
    assert index.info["kind"] == kind and len(index) == 60_000
    _, exact_rows = build_index(database, ids, kind="exact").search(queries, 10)
    _, found = index.search(queries, 10)
    recall = recall_at_k(exact_rows, found, 10)
    assert recall >= 0.95
    assert index.info["recall_at_10"] >= 0.95
    assert abs(index.info["recall_at_10"] - recall) < 0.04


def test_auto_kind_switches_at_the_measured_size():
    from runtime.search.index import choose_kind
    assert choose_kind(50_000) == "exact" and choose_kind(50_001) == "ivf"
    assert choose_kind(10, "hnsw") == "hnsw"
    with pytest.raises(SearchIndexError, match="choose one of"):
        choose_kind(10, "lsh")


def test_near_duplicates_find_the_copies_and_nothing_else():
    data = _fashion_mnist("test")[:400]
    rng = np.random.default_rng(0)
    copies = data[[3, 50, 51]] + rng.normal(0, 2.0, (3, data.shape[1])).astype(np.float32)
    vectors = np.concatenate([data, copies])
    ids = [f"i{i}" for i in range(len(data))] + ["copy3", "copy50", "copy51"]
    index = build_index(vectors, ids, kind="exact")
    pairs = near_duplicates(index, vectors, threshold=0.999)
    assert {(a, b) for _, a, b in pairs} == {("i3", "copy3"), ("i50", "copy50"),
                                             ("i51", "copy51")}
    assert all(s >= 0.999 for s, _, _ in pairs)
    assert [s for s, _, _ in pairs] == sorted((s for s, _, _ in pairs), reverse=True)


# ---------------------------------------------------------------------------------------------
# the commands and the service, on a real exported model


_cli = run_cli


@pytest.fixture(scope="module")
def embedded(exported_model, fmnist_small, tmp_path_factory):
    """(model folder, a .npy output, a Parquet output, the query images) of 400 images."""
    pytest.importorskip("pyarrow")
    from common.data import load_dataset
    model = exported_model(fmnist_small)
    base = tmp_path_factory.mktemp("search")
    folder = os.path.join(fmnist_small, "train")
    _cli("embed", model, folder, "--out", str(base / "feats.npy"), "--device", "cpu")
    _cli("embed", model, folder, "--out", str(base / "feats"), "--device", "cpu",
         "--shard-size", "150")
    data = load_dataset(fmnist_small)
    queries = data.paths("test")[:3]
    return model, str(base / "feats.npy"), str(base / "feats"), queries, data.paths("train")[7]


def _search_jsonl(target, queries, *extra):
    out = _cli("search", target, *queries, "--k", "5", "--format", "jsonl", "--device", "cpu",
               *extra).stdout
    return [json.loads(line) for line in out.splitlines()]


def test_cli_index_build_and_search_on_an_npy_output(embedded, tmp_path):
    model, npy, _, queries, own = embedded
    build = _cli("index", "build", npy)
    assert "indexed 200 vectors" in build.stdout and "recall@10 vs exact: 1.0000" in build.stdout
    assert os.path.isfile(npy[:-4] + ".index/index.faiss")
    saved = load_saved_embeddings(npy)
    # an indexed image as the query finds itself first, at cosine 1
    rows = _search_jsonl(npy, [own, *queries])
    assert rows[0]["neighbours"][0]["id"].endswith(os.path.basename(own))
    assert rows[0]["neighbours"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    # the same answer as the library: the query's embedding against the saved vectors
    from runtime import FeaturePipeline
    with FeaturePipeline(model, device="cpu") as pipe:
        q = pipe.embed(queries).vectors
    want_scores, want_rows = _brute_force(saved.vectors, q, 5)
    for row, s, r in zip(rows[1:], want_scores, want_rows):
        assert [n["id"] for n in row["neighbours"]] == [saved.ids[i] for i in r]
        np.testing.assert_allclose([n["score"] for n in row["neighbours"]], s, atol=1e-4)
    text = _cli("search", npy, queries[0], "--k", "2", "--device", "cpu").stdout.splitlines()
    assert text[0] == queries[0] and text[1].split()[0] == "1" and len(text) == 3


def test_cli_on_a_parquet_folder_needs_and_checks_the_model(embedded, exported_model,
                                                            fmnist_small, tmp_path):
    model, npy, folder, queries, _ = embedded
    build = _cli("index", "build", folder, "--model", model, "--kind", "hnsw")
    assert "hnsw" in build.stdout and "recall@10 vs exact" in build.stdout
    assert os.path.isfile(os.path.join(folder, "_index", "index.json"))
    exact = str(tmp_path / "npy-exact")      # its own index: the test runs alone too
    _cli("index", "build", npy, "--kind", "exact", "--out", exact)
    assert _search_jsonl(folder, queries) == _search_jsonl(exact, queries)
    other = exported_model(fmnist_small, name="other", seed=1)
    refused = _cli("search", folder, queries[0], "--model", other, "--device", "cpu",
                   check=False)
    assert refused.returncode == 1 and "not the model whose vectors were indexed" in \
        refused.stderr
    refused = _cli("index", "build", folder, "--model", other, "--out", str(tmp_path / "i"),
                   check=False)
    assert refused.returncode == 2 and "did not make these embeddings" in refused.stderr


def test_a_parquet_folder_names_its_model(embedded, tmp_path):
    """The bulk manifest records the model folder, so build and search need no --model."""
    model, npy, folder, queries, _ = embedded
    with open(os.path.join(folder, "_manifest.json")) as f:
        assert json.load(f)["model_dir"] == os.path.abspath(model)
    _cli("index", "build", folder, "--kind", "exact", "--out", str(tmp_path / "idx"))
    _cli("index", "build", npy, "--kind", "exact", "--out", str(tmp_path / "npy-exact"))
    assert _search_jsonl(str(tmp_path / "idx"), queries) == \
        _search_jsonl(str(tmp_path / "npy-exact"), queries)


def test_service_search_endpoint_answers_like_the_cli(embedded):
    import httpx

    from tests.servers import serve_process
    model, npy, _, queries, _ = embedded
    _cli("index", "build", npy)
    want = _search_jsonl(npy, queries)
    images = []
    for p in queries:
        with open(p, "rb") as f:
            images.append(base64.b64encode(f.read()).decode())
    images.append(base64.b64encode(b"not an image").decode())
    with serve_process([model, "--index", npy, "--name", "m"]) as served:
        port = served.port
        _infer_neighbours_like_the_cli(served, queries, want)
        r = httpx.post(f"http://127.0.0.1:{port}/v2/models/m/search",
                       json={"image": images, "k": 5}, timeout=60)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["model"] == "m" and len(doc["results"]) == 4
        for got, cli_row in zip(doc["results"], want):
            assert [n["id"] for n in got["neighbours"]] == \
                [n["id"] for n in cli_row["neighbours"]]
            np.testing.assert_allclose([n["score"] for n in got["neighbours"]],
                                       [n["score"] for n in cli_row["neighbours"]], atol=1e-4)
        assert "error" in doc["results"][3]
        bad = httpx.post(f"http://127.0.0.1:{port}/v2/models/m/search", json={"k": 5},
                         timeout=30)
        assert bad.status_code == 400 and "image" in bad.json()["error"]


def test_a_repository_model_serves_the_index_in_its_folder(embedded, exported_model,
                                                           fmnist_small, tmp_path):
    """REPO/NAME/index/ is attached to NAME without --index; an index of another model's
    vectors in a model folder stops the start with a one-line error."""
    import httpx

    from tests.servers import serve_process
    model, npy, _, queries, _ = embedded
    repo = tmp_path / "repo"
    shutil.copytree(model, repo / "spe")
    shutil.copytree(model, repo / "plain")            # no index: no search
    _cli("index", "build", npy, "--kind", "exact", "--out", str(repo / "spe" / "index"))
    want = _search_jsonl(str(repo / "spe" / "index"), queries)
    image = base64.b64encode(open(queries[0], "rb").read()).decode()
    with serve_process(["--repository", str(repo)], grpc=False) as served:
        r = httpx.post(served.url("/v2/models/spe/search"), json={"image": [image], "k": 5},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert [n["id"] for n in r.json()["results"][0]["neighbours"]] == \
            [n["id"] for n in want[0]["neighbours"]]
        none = httpx.post(served.url("/v2/models/plain/search"), json={"image": [image]},
                          timeout=60)
        assert none.status_code == 400 and "no similarity index" in none.json()["error"]
        assert "spe: similarity index" in served.log()
    other = exported_model(fmnist_small, name="other-for-repo", seed=1)
    shutil.copytree(other, repo / "other")
    shutil.copytree(repo / "spe" / "index", repo / "other" / "index")
    refused = _cli("serve", "--repository", str(repo), "--port", "0", "--grpc-port", "0",
                   check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "not the model whose vectors were indexed" in refused.stderr


def _infer_neighbours_like_the_cli(served, queries, want):
    """neighbour_id / neighbour_score as infer outputs: tritonclient over gRPC and over HTTP
    give the CLI's answer; a bad image keeps its row (empty ids, its error); a bad k is
    INVALID_ARGUMENT / 400; the metadata lists the two outputs."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException
    batch = [open(p, "rb").read() for p in queries] + [b"not an image"]
    names = ["neighbour_id", "neighbour_score", "error"]
    answers = []
    with grpcclient.InferenceServerClient(url=f"127.0.0.1:{served.grpc_port}") as client:
        meta = client.get_model_metadata("m", as_json=True)
        assert {"neighbour_id", "neighbour_score"} <= {o["name"] for o in meta["outputs"]}
        inp = grpcclient.InferInput("image", [len(batch)], "BYTES")
        inp.set_data_from_numpy(np.array(batch, dtype=object))
        outs = [grpcclient.InferRequestedOutput(n) for n in names]
        answers.append(client.infer("m", [inp], outputs=outs, parameters={"neighbours": 5},
                                    client_timeout=60))
        with pytest.raises(InferenceServerException, match="neighbours.*1..10000") as bad:
            client.infer("m", [inp], outputs=outs, parameters={"neighbours": 0},
                         client_timeout=60)
        assert "INVALID_ARGUMENT" in str(bad.value.status())
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{served.port}",
                                              network_timeout=60)
    inp = httpclient.InferInput("image", [len(batch)], "BYTES")
    inp.set_data_from_numpy(np.array(batch, dtype=object), binary_data=True)
    answers.append(client.infer("m", [inp], parameters={"neighbours": 5}, outputs=[
        httpclient.InferRequestedOutput(n, binary_data=True) for n in names]))
    for answer in answers:
        ids, scores = answer.as_numpy("neighbour_id"), answer.as_numpy("neighbour_score")
        assert ids.shape == scores.shape == (4, 5)
        for i, cli_row in enumerate(want):
            assert [x.decode() for x in ids[i]] == [n["id"] for n in cli_row["neighbours"]]
            np.testing.assert_allclose(scores[i], [n["score"] for n in cli_row["neighbours"]],
                                       atol=1e-4)
        assert list(ids[3]) == [b""] * 5 and np.isnan(scores[3]).all()
        assert answer.as_numpy("error")[3].startswith(b"item 3:")


def test_search_on_a_model_without_an_index_is_a_bad_request():
    import asyncio

    from runtime.service.dataplane import DataPlane, ModelEndpoint
    from runtime.service.errors import BadRequest
    from runtime.service.model import ServedModel
    plane = DataPlane([ModelEndpoint(ServedModel("models/never-loaded", name="m"))])
    with pytest.raises(BadRequest, match="no similarity index.*--index m="):
        asyncio.run(plane.search("m", None, [b"x"], 5))
    # infer asking for the neighbour outputs says the same, before any image is embedded
    from runtime.service.protocol import InferRequest
    request = InferRequest(id=None, inputs=[], outputs={"neighbour_id": True},
                           binary_outputs=True)
    with pytest.raises(BadRequest, match="no similarity index, so no neighbour_id"):
        asyncio.run(plane._neighbours(plane.endpoint("m", None), [], request))


@pytest.mark.parametrize("value, k", [(None, 10), (5, 5), ("7", 7), (3.0, 3), (10_000, 10_000)])
def test_neighbours_parameter_is_a_whole_number_in_range(value, k):
    from runtime.service.neighbours import k_from
    assert k_from({} if value is None else {"neighbours": value}) == k


@pytest.mark.parametrize("value", [0, -1, 10_001, 2.5, "x", True, [3], None, float("nan")])
def test_a_bad_neighbours_parameter_is_a_bad_request(value):
    from runtime.service.errors import BadRequest
    from runtime.service.neighbours import k_from
    with pytest.raises(BadRequest, match="'neighbours' must be a whole number in 1..10000"):
        k_from({"neighbours": value})
