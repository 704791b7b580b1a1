"""A bulk job's output folder: Parquet shards that read as one dataset, and how to read it back.

    OUT/shard-000000.parquet   rows of the job, at most S per shard (S = --shard-size)
    OUT/shard-000001.parquet   ...
    OUT/_manifest.json         model, inputs, and every complete shard (runtime/bulk/manifest.py)
    OUT/_lock                  the single-writer lock (runtime/bulk/lock.py)

Readers of Parquet folders (pyarrow datasets, pandas, polars, DuckDB with 'OUT/*.parquet') skip
names that start with '_' or '.', so the shards read as one table, and every shard has the same
schema:

    id            string     the input's id (a path, TABLE#row, a table's id column, TAR/key);
                             unique in the folder
    embedding     fixed_size_list<float32>[D]   NaN for a row that failed
    error         string     null when the row is fine, else '<id>: reason'
    input_stamp   string     what a rerun compares to see that the input changed
                             (runtime.bulk.sources.stamp_of: size-mtime of a file, a hash of bytes)
    <probe>_label string     per --probe: the predicted class (null for a failed row)
    <probe>_score float32    its probability

Each shard's Parquet key-value metadata holds `unirep.format`, `unirep.model` (JSON: fingerprint,
architecture, variant, dim) and `unirep.description` (the model's description.json), so a shard
copied on its own still says which model made it. Shards are written whole to a temporary name,
fsynced and renamed (common/atomic.py); the manifest, rewritten after each, lists a shard only
once it is complete, with its size and SHA-256, so a rerun can tell a damaged one.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import numpy as np

from common.atomic import atomic_open
from common.errors import UserError

MANIFEST = "_manifest.json"
FORMAT = "unirep-bulk/2"
SHARD_FILE = re.compile(r"shard-\d{6,}\.parquet")
BASE_COLUMNS = ("id", "embedding", "error", "input_stamp")
OLD_MANIFEST = "manifest.json"  # unirep-bulk/1, before the folder read as one dataset


class OutputError(UserError, ValueError):
    """The output folder belongs to another job, or cannot be written: one line."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.parquet"


def shard_metadata(model: dict, description: dict | None = None) -> dict[bytes, bytes]:
    """The key-value metadata every shard carries (bytes keys, JSON values)."""
    meta = {b"unirep.format": FORMAT.encode(),
            b"unirep.model": json.dumps(model, sort_keys=True).encode()}
    if description is not None:
        meta[b"unirep.description"] = json.dumps(description, sort_keys=True).encode()
    return meta


def shard_table(ids: list[str], vectors: np.ndarray, errors: dict[int, str],
                stamps: list[str], extra: dict[str, Any] | None = None,
                metadata: dict[bytes, bytes] | None = None):
    """The rows of one shard as a pyarrow Table, with the documented column types."""
    import pyarrow as pa
    dim = vectors.shape[1]
    flat = pa.array(np.ascontiguousarray(vectors, np.float32).reshape(-1), pa.float32())
    columns = {
        "id": pa.array(ids, pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        "error": pa.array([errors.get(i) for i in range(len(ids))], pa.string()),
        "input_stamp": pa.array(stamps, pa.string()),
    }
    for name, values in (extra or {}).items():  # typed: a shard of failed rows is all nulls
        columns[name] = pa.array(values, pa.float32() if name.endswith("_score")
                                 else pa.string())
    table = pa.table(columns)
    return table.replace_schema_metadata(metadata) if metadata else table


def write_shard(out_dir: str, index: int, table) -> dict:
    """Write `table` as shard `index`, atomically; return its manifest entry."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    name = shard_name(index)
    with atomic_open(os.path.join(out_dir, name), "wb") as f:
        f.write(data)
    ids = table.column("id")
    return {"file": name, "rows": table.num_rows,
            "errors": table.num_rows - table.column("error").null_count,
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "first_id": ids[0].as_py() if table.num_rows else None,
            "last_id": ids[-1].as_py() if table.num_rows else None}


def load_manifest(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        if os.path.exists(os.path.join(out_dir, OLD_MANIFEST)):
            raise OutputError(f"{out_dir}: written by an older version ({OLD_MANIFEST}); pass "
                              f"--overwrite to rebuild it, or choose another --out")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise OutputError(f"{path}: unreadable manifest ({e}); pass --overwrite to start "
                          f"again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or not isinstance(manifest.get("shards"), dict):
        raise OutputError(f"{path}: not a unirep bulk manifest; pass --overwrite or choose "
                          f"another --out")
    return manifest


def read_output(out_dir: str) -> tuple[list[str], np.ndarray, dict[int, str], dict[str, list]]:
    """A job's folder in memory, shards in the manifest's order:

        ids      list[str], one per row
        vectors  float32 array (rows, D); NaN rows for failed inputs
        errors   {row: '<id>: reason'} for the rows that failed
        extra    {column: list} of the other columns (probes: `<probe>_label`,
                 `<probe>_score`), aligned with `ids`

    Row order is the order rows were written: input order for one run, new and changed inputs
    after the kept ones for an update; join or sort by id when order matters."""
    import pyarrow.parquet as pq
    manifest = load_manifest(out_dir)
    if manifest is None:
        raise OutputError(f"{out_dir}: no {MANIFEST}; not a bulk job's output")
    ids: list[str] = []
    blocks: list[np.ndarray] = []
    errors: dict[int, str] = {}
    extra: dict[str, list] = {}
    for key in sorted(manifest["shards"], key=int):
        name = manifest["shards"][key]["file"]
        if not SHARD_FILE.fullmatch(str(name)):
            raise OutputError(f"{out_dir}/{MANIFEST}: shard {key} names {name!r}, not a shard "
                              f"file; rerun the job to repair the folder")
        table = pq.read_table(os.path.join(out_dir, name))
        dim = table.schema.field("embedding").type.list_size
        blocks.append(table.column("embedding").combine_chunks().flatten()
                      .to_numpy().reshape(-1, dim))
        for i, e in enumerate(table.column("error").to_pylist()):
            if e is not None:
                errors[len(ids) + i] = e
        for name in table.column_names:
            if name not in BASE_COLUMNS:
                extra.setdefault(name, []).extend(table.column(name).to_pylist())
        ids += table.column("id").to_pylist()
    vectors = np.concatenate(blocks) if blocks else np.empty((0, 0), np.float32)
    return ids, vectors, errors, extra
