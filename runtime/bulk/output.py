"""A bulk job's output folder: Parquet shards and the manifest that says which are complete.

    OUT_DIR/shard-000000.parquet   rows [0, S) of the input stream, S = the job's shard size
    OUT_DIR/shard-000001.parquet   rows [S, 2S) ...
    OUT_DIR/manifest.json          model, inputs, shard size, and every complete shard

Columns: `id` (string), `embedding` (fixed-size list<float32>[D], NaN for failed rows), `error`
(string, null when the row is fine), and per probe `<probe>_label` (string) and
`<probe>_score` (float32). A shard is written to a temporary name, fsynced and renamed; the
manifest is rewritten atomically after it, so a crash leaves at worst a complete shard that the
manifest does not list yet, which a rerun writes again under the same name.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from common.atomic import atomic_open
from common.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "unirep-bulk/1"
SHARD_FILE = re.compile(r"shard-\d{6,}\.parquet")


class OutputError(UserError, ValueError):
    """The output folder belongs to another job, or cannot be written: one line."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.parquet"


def shard_table(ids: list[str], vectors: np.ndarray, errors: dict[int, str],
                extra: dict[str, Any] | None = None):
    """The rows of one shard as a pyarrow Table."""
    import pyarrow as pa
    dim = vectors.shape[1]
    flat = pa.array(np.ascontiguousarray(vectors, np.float32).reshape(-1), pa.float32())
    columns = {
        "id": pa.array(ids, pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        "error": pa.array([errors.get(i) for i in range(len(ids))], pa.string()),
    }
    for name, values in (extra or {}).items():
        columns[name] = pa.array(values)
    return pa.table(columns)


def write_shard(out_dir: str, index: int, table) -> str:
    """Write `table` as shard `index`, atomically; return its file name."""
    import pyarrow.parquet as pq
    name = shard_name(index)
    with atomic_open(os.path.join(out_dir, name), "wb") as f:
        pq.write_table(table, f)
    return name


def load_manifest(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise OutputError(f"{path}: unreadable manifest ({e}); pass --overwrite to start "
                          f"again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise OutputError(f"{path}: not a unirep bulk manifest; pass --overwrite or choose "
                          f"another --out")
    return manifest


def save_manifest(out_dir: str, manifest: dict) -> None:
    with atomic_open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)


def job_mismatch(old: dict, new: dict) -> str | None:
    """Why an existing manifest belongs to another job (None: same job, resume it)."""
    for key, what in (("model", "model"), ("inputs", "inputs"), ("shard_size", "shard size"),
                      ("probes", "probes")):
        if old.get(key) != new.get(key):
            return f"it was written with another {what}"
    return None


def prepare(out_dir: str, job: dict, *, overwrite: bool) -> dict:
    """The manifest to continue: the existing one when it is the same job, else a new one.

    Leftovers of a killed run (temporary files, shards the manifest does not list) are
    removed, and nothing else: other files in the folder are left alone. Another job's folder
    is refused unless `overwrite`."""
    os.makedirs(out_dir, exist_ok=True)
    old = load_manifest(out_dir) if not overwrite else None
    if old is not None:
        problem = job_mismatch(old, job)
        if problem:
            raise OutputError(f"{out_dir} holds another job's shards ({problem}); pass "
                              f"--overwrite to replace them, or choose another --out")
        manifest = old
    else:
        if not overwrite and any(SHARD_FILE.fullmatch(n) for n in os.listdir(out_dir)):
            raise OutputError(f"{out_dir} holds Parquet files but no manifest; pass "
                              f"--overwrite to replace them, or choose another --out")
        manifest = {"format": FORMAT, **job, "shards": {}, "finished": False, "rows": None}
    listed = {info["file"] for info in manifest["shards"].values()}
    for name in os.listdir(out_dir):  # only our own names: the folder may hold other files
        stale = ((name.startswith(".tmp-") and name.endswith((".parquet", ".json")))
                 or (SHARD_FILE.fullmatch(name) is not None and name not in listed))
        if stale:
            os.unlink(os.path.join(out_dir, name))
    save_manifest(out_dir, manifest)
    return manifest


def read_output(out_dir: str) -> tuple[list[str], np.ndarray, dict[int, str], dict]:
    """(ids, vectors, {row: error}, other columns) of a finished job, shards in order."""
    import pyarrow.parquet as pq
    manifest = load_manifest(out_dir)
    if manifest is None:
        raise OutputError(f"{out_dir}: no {MANIFEST}; not a bulk job's output")
    ids: list[str] = []
    blocks: list[np.ndarray] = []
    errors: dict[int, str] = {}
    extra: dict[str, list] = {}
    for key in sorted(manifest["shards"], key=int):
        table = pq.read_table(os.path.join(out_dir, manifest["shards"][key]["file"]))
        dim = table.schema.field("embedding").type.list_size
        blocks.append(table.column("embedding").combine_chunks().flatten()
                      .to_numpy().reshape(-1, dim))
        for i, e in enumerate(table.column("error").to_pylist()):
            if e is not None:
                errors[len(ids) + i] = e
        for name in table.column_names:
            if name not in ("id", "embedding", "error"):
                extra.setdefault(name, []).extend(table.column(name).to_pylist())
        ids += table.column("id").to_pylist()
    vectors = np.concatenate(blocks) if blocks else np.empty((0, 0), np.float32)
    return ids, vectors, errors, extra
