"""A cosine-similarity index over saved embeddings, on faiss: exact (a flat inner-product scan)
for small sets, approximate (IVF or HNSW) above a size, with its recall measured at build.

    index = build_index(vectors, ids)                  # kind "auto": exact up to EXACT_UP_TO
    index.neighbours(query_vectors, k=10)              # [[(id, cosine), ...], ...] nearest first
    save_index(index, "feats/_index"); index = load_index("feats/_index")   # store.py

Vectors are L2-normalised before they go in (and queries before they search), so the inner
product faiss ranks by is the cosine similarity. An approximate index is tuned when it is built:
its search breadth (IVF `nprobe`, HNSW `efSearch`) is raised until recall@10 against the exact
scan, on a sample of the indexed vectors, reaches `target_recall`; that recall is recorded.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.errors import UserError

KINDS = ("auto", "exact", "ivf", "hnsw")
# Up to this many vectors "auto" builds the exact index. Measured (benchmarks/search_bench.py,
# README, 2 loaded cores, 512-d): an exact scan answers 2,200 queries/s in batches at 10k, 560 at
# 50k, 150 at 100k, 60 at 200k, and a lone query reads the whole set (100 MB at 50k); IVF
# answers 5,000-12,000/s at recall@10 >= 0.96 whatever the size, after a build of ~25-45 s at
# 60-100k. Below 50k the exact scan needs no build and is fast enough; above, IVF pays.
EXACT_UP_TO = 50_000
TARGET_RECALL = 0.97
RECALL_K = 10
RECALL_QUERIES = 1000
_IVF_NPROBES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
_HNSW_EFS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class SearchIndexError(UserError, ValueError):
    """An index that cannot be built, read or searched as asked; the message says why."""


def _faiss():
    try:
        import faiss
    except ImportError as e:  # an optional extra: say how to get it
        raise SearchIndexError("similarity search needs faiss: pip install 'unirep[search]'") from e
    return faiss


def normalized(vectors: np.ndarray) -> np.ndarray:
    """float32 copies of the rows, scaled to unit length (zero rows stay zero)."""
    x = np.array(vectors, dtype=np.float32, order="C", copy=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x /= np.maximum(norms, 1e-12)
    return x


@dataclass
class SearchIndex:
    """A faiss index with the ids of its rows and what it is (kind, parameters, recall)."""

    index: Any
    ids: list[str]
    info: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(cosine scores [Q, k], row numbers [Q, k]) nearest first; -1 rows where fewer than
        k were found."""
        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise SearchIndexError(f"queries must be [Q, {self.dim}] vectors (the index's "
                              f"dimension); got shape {list(queries.shape)}")
        k = max(1, min(int(k), len(self.ids)))
        scores, rows = self.index.search(normalized(queries), k)
        return scores, rows

    def neighbours(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Per query, [(id, cosine similarity), ...] nearest first."""
        scores, rows = self.search(queries, k)
        return [[(self.ids[r], float(s)) for s, r in zip(srow, rrow) if r >= 0]
                for srow, rrow in zip(scores, rows)]

    def set_breadth(self, value: int) -> None:
        """How widely an approximate index searches (IVF nprobe, HNSW efSearch)."""
        kind = self.info.get("kind")
        if kind == "ivf":
            self.index.nprobe = int(value)
        elif kind == "hnsw":
            self.index.hnsw.efSearch = int(value)


def _exact(x: np.ndarray):
    index = _faiss().IndexFlatIP(x.shape[1])
    index.add(x)
    return index


def _ivf(x: np.ndarray, nlist: int | None, seed: int):
    faiss = _faiss()
    n, d = x.shape
    nlist = int(nlist or min(65536, max(16, round(4 * math.sqrt(n)))))
    nlist = max(1, min(nlist, n // 39 or 1))  # k-means needs ~39 points a centre
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    sample = x
    if n > 256 * nlist:  # k-means samples at most 256 points a centre anyway
        sample = x[np.random.default_rng(seed).choice(n, 256 * nlist, replace=False)]
    index.train(sample)
    index.add(x)
    return index, {"nlist": nlist}


def _hnsw(x: np.ndarray, m: int):
    faiss = _faiss()
    index = faiss.IndexHNSWFlat(x.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 40
    index.add(x)
    return index, {"M": m, "efConstruction": 40}


def recall_at_k(exact_rows: np.ndarray, found_rows: np.ndarray, k: int = RECALL_K) -> float:
    """Mean share of each query's k exact neighbours that the approximate search found."""
    hits = [len(set(e[:k].tolist()) & set(f[:k].tolist())) for e, f in zip(exact_rows,
                                                                            found_rows)]
    return float(np.mean(hits) / k) if hits else 1.0


def _without_self(rows: np.ndarray, query_rows: np.ndarray, k: int) -> np.ndarray:
    """Each row's neighbours less the query itself (a sample query is an indexed vector)."""
    out = np.full((len(rows), k), -1, dtype=np.int64)
    for i, (row, q) in enumerate(zip(rows, query_rows)):
        kept = row[(row != q) & (row >= 0)][:k]
        out[i, :len(kept)] = kept
    return out


def _tune(index: SearchIndex, x: np.ndarray, *, breadths, fixed: int | None,
          target: float, queries: int, seed: int) -> tuple[int, float]:
    """(chosen breadth, its recall@10): the smallest breadth whose recall reaches `target`
    (or `fixed`, measured), against an exact scan of the same vectors."""
    k = min(RECALL_K, len(x) - 1)
    if k < 1:
        return fixed or breadths[0], 1.0
    sample = np.random.default_rng(seed).choice(len(x), min(queries, len(x)), replace=False)
    q = x[sample]
    _, exact = _exact(x).search(q, k + 1)
    exact = _without_self(exact, sample, k)
    recall = 0.0
    for breadth in ([fixed] if fixed else breadths):
        index.set_breadth(breadth)
        _, found = index.index.search(q, k + 1)
        recall = recall_at_k(exact, _without_self(found, sample, k), k)
        if recall >= target:
            return breadth, recall
    return breadth, recall


def choose_kind(count: int, kind: str = "auto", exact_up_to: int = EXACT_UP_TO) -> str:
    if kind not in KINDS:
        raise SearchIndexError(f"index kind {kind!r}: choose one of {', '.join(KINDS)}")
    if kind != "auto":
        return kind
    return "exact" if count <= exact_up_to else "ivf"


def build_index(vectors: np.ndarray, ids: list[str], *, kind: str = "auto",
                exact_up_to: int = EXACT_UP_TO, target_recall: float = TARGET_RECALL,
                nlist: int | None = None, breadth: int | None = None, hnsw_m: int = 32,
                recall_queries: int = RECALL_QUERIES, seed: int = 0) -> SearchIndex:
    """Index the rows of `vectors` (named by `ids`) for cosine search; see the module doc.

    kind: "auto" (exact up to `exact_up_to` vectors, else "ivf"), "exact", "ivf" or "hnsw".
    breadth fixes nprobe / efSearch instead of tuning it to `target_recall`."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or len(vectors) == 0 or len(vectors) != len(ids):
        raise SearchIndexError(f"need a non-empty [N, D] array and N ids; got shape "
                          f"{list(vectors.shape)} and {len(ids)} ids")
    if len(set(ids)) != len(ids):
        raise SearchIndexError("the ids repeat; each indexed row needs its own id")
    chosen = choose_kind(len(vectors), kind, exact_up_to)
    x = normalized(vectors)
    start = time.perf_counter()
    params: dict[str, Any] = {}
    if chosen == "exact":
        faiss_index = _exact(x)
    elif chosen == "ivf":
        faiss_index, params = _ivf(x, nlist, seed)
    else:
        faiss_index, params = _hnsw(x, hnsw_m)
    info: dict[str, Any] = {"kind": chosen, "requested_kind": kind, "metric": "cosine",
                            "dim": int(x.shape[1]), "count": len(ids), "params": params}
    index = SearchIndex(faiss_index, list(ids), info)
    build_seconds = time.perf_counter() - start
    if chosen == "exact":
        info["recall_at_10"] = 1.0
    else:
        breadths = _IVF_NPROBES if chosen == "ivf" else _HNSW_EFS
        limit = params.get("nlist", max(breadths))
        value, recall = _tune(index, x, breadths=[b for b in breadths if b <= limit] or [limit],
                              fixed=breadth, target=target_recall, queries=recall_queries,
                              seed=seed)
        index.set_breadth(value)
        params["nprobe" if chosen == "ivf" else "efSearch"] = int(value)
        info["recall_at_10"] = round(recall, 4)
        info["recall_queries"] = int(min(recall_queries, len(x)))
    info["build_seconds"] = round(build_seconds, 3)
    info["tune_seconds"] = round(time.perf_counter() - start - build_seconds, 3)
    return index


def near_duplicates(index: SearchIndex, vectors: np.ndarray, *, threshold: float,
                    k: int = 10, batch: int = 4096) -> list[tuple[float, str, str]]:
    """Pairs (cosine, id_a, id_b) of indexed rows at least `threshold` alike, most alike
    first; each pair once. `vectors` are the indexed rows in the index's order; each row's
    `k` nearest are examined, so a group larger than k+1 shows as overlapping pairs."""
    pairs: dict[tuple[int, int], float] = {}
    for start in range(0, len(vectors), batch):
        scores, rows = index.search(vectors[start:start + batch], k + 1)
        for i, (srow, rrow) in enumerate(zip(scores, rows)):
            a = start + i
            for s, b in zip(srow, rrow):
                if b < 0 or b == a or s < threshold:
                    continue
                key = (min(a, int(b)), max(a, int(b)))
                pairs[key] = max(pairs.get(key, -2.0), float(s))
    ordered = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
    return [(s, index.ids[a], index.ids[b]) for (a, b), s in ordered]
