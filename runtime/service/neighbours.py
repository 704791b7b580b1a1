"""Similarity search as two more outputs of `infer`, so every transport (HTTP, gRPC, a stock
tritonclient) can search by image: a model served with `--index` also offers

    neighbour_id     BYTES [n, k]  the k nearest indexed ids of each image, nearest first
    neighbour_score  FP32  [n, k]  their cosine similarities

computed only when a request names one of them in `outputs`; k comes from the request
parameter `neighbours` (default 10). A row whose image failed has empty ids and NaN scores;
its reason is in the `error` output."""
from __future__ import annotations

from typing import Any

import numpy as np

from .errors import BadRequest

NEIGHBOUR_OUTPUTS = ("neighbour_id", "neighbour_score")
K_PARAMETER = "neighbours"
DEFAULT_K, MAX_K = 10, 10_000


def neighbour_specs() -> list[dict]:
    return [{"name": "neighbour_id", "datatype": "BYTES", "shape": [-1, -1]},
            {"name": "neighbour_score", "datatype": "FP32", "shape": [-1, -1]}]


def wanted(requested: dict) -> bool:
    return any(name in requested for name in NEIGHBOUR_OUTPUTS)


def k_from(parameters: dict) -> int:
    """The request parameter `neighbours` as k (BadRequest unless a whole number in range)."""
    value = parameters.get(K_PARAMETER, DEFAULT_K)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        value = None
    try:
        k = int(value) if value is not None and float(value) == int(float(value)) else 0
    except (TypeError, ValueError, OverflowError):
        k = 0
    if not 1 <= k <= MAX_K:
        raise BadRequest(f"request parameter {K_PARAMETER!r} must be a whole number in "
                         f"1..{MAX_K} (how many neighbours per image), not {value!r:.40}")
    return k


def neighbour_outputs(index: Any, vectors: list[np.ndarray | None], k: int
                      ) -> dict[str, np.ndarray]:
    """The two outputs for one embedding per image (None where the image failed)."""
    n = len(vectors)
    ok = [i for i, v in enumerate(vectors) if v is not None]
    queries = [v for v in vectors if v is not None]
    ids = np.empty((n, k), dtype=object)
    ids[:] = b""
    scores = np.full((n, k), np.nan, np.float32)
    if ok:
        found = index.neighbours(np.stack(queries), k)
        for row, hits in zip(ok, found):
            for j, (item_id, score) in enumerate(hits):  # fewer than k when the index is small
                ids[row, j] = str(item_id).encode()
                scores[row, j] = score
    return {"neighbour_id": ids, "neighbour_score": scores}
