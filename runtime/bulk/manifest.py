"""`OUT/_manifest.json`: which job owns the folder and which shards are complete; and the checks
a rerun makes before it trusts them.

    {"format": "unirep-bulk/2",
     "model": {fingerprint, architecture, variant, dim}, "probes": [{name, fingerprint}],
     "identity": the inputs by kind and path (a rerun with other inputs is another job),
     "inputs": what was read last time (paths; a file's size and mtime; a folder's file count,
               total size and newest mtime),
     "model_dir": the model folder's absolute path (where `search` finds the model; not part of
                  the job's identity),
     "shard_size": S, "shards": {"0": {file, rows, errors, bytes, sha256, first_id, last_id}},
     "finished": bool, "rows": rows in the folder, "last_run": {added, changed, kept, ...}}

Nothing from the manifest is used unchecked: a shard entry must name `shard-NNNNNN.parquet` for
its own index (so no name can reach outside the folder), be a regular file of the recorded size
and SHA-256, and hold the recorded number of rows; a shard that fails is reported, deleted and
its inputs embedded again.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from common.atomic import TEMP_PREFIX, atomic_open

from .output import FORMAT, MANIFEST, OLD_MANIFEST, SHARD_FILE, OutputError, load_manifest, shard_name

__all__ = ["load_manifest", "prepare", "remove_unlisted", "save_manifest", "verify_shards"]


def save_manifest(out_dir: str, manifest: dict) -> None:
    with atomic_open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)


def job_mismatch(old: dict, new: dict) -> str | None:
    """Why an existing manifest belongs to another job (None: the same job, update it)."""
    for key, what in (("model", "model"), ("identity", "inputs"), ("probes", "probes")):
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
        # the model folder may have moved: where it is now, not part of the job's identity
        manifest = {**old, "shard_size": job["shard_size"], "finished": False,
                    **({"model_dir": job["model_dir"]} if "model_dir" in job else {})}
    else:
        if not overwrite and any(SHARD_FILE.fullmatch(n) for n in os.listdir(out_dir)):
            raise OutputError(f"{out_dir} holds Parquet files but no {MANIFEST}; pass "
                              f"--overwrite to replace them, or choose another --out")
        manifest = {"format": FORMAT, **job, "shards": {}, "finished": False, "rows": None}
    remove_unlisted(out_dir, manifest)
    if overwrite and os.path.exists(os.path.join(out_dir, OLD_MANIFEST)):
        os.unlink(os.path.join(out_dir, OLD_MANIFEST))
    save_manifest(out_dir, manifest)
    return manifest


def remove_unlisted(out_dir: str, manifest: dict) -> None:
    """Delete our own names the manifest does not list (a killed run's temporaries and
    shards); the folder may hold other files, which are left alone."""
    listed = {info.get("file") for info in manifest["shards"].values()
              if isinstance(info, dict)}
    for name in os.listdir(out_dir):
        stale = ((name.startswith(TEMP_PREFIX) and name.endswith((".parquet", ".json")))
                 or (SHARD_FILE.fullmatch(name) is not None and name not in listed))
        if stale:
            os.unlink(os.path.join(out_dir, name))


@dataclass
class ShardRows:
    """The ids and input stamps of one verified shard, in row order."""

    index: int
    ids: list[str]
    stamps: list[str]


def _problem(out_dir: str, key: str, info) -> tuple[str | None, ShardRows | None]:
    """(why shard `key` cannot be trusted, or None; its rows when it can)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    if not (key.isdigit() and isinstance(info, dict)):
        return "is not a shard entry", None
    name = info.get("file")
    if name != shard_name(int(key)):  # the only name it may have: nothing escapes the folder
        return f"names {name!r}, not {shard_name(int(key))}", None
    path = os.path.join(out_dir, name)
    try:
        st = os.lstat(path)
        if not os.path.isfile(path) or os.path.islink(path):
            return "is not a regular file", None
        if st.st_size != info.get("bytes"):
            return f"has {st.st_size} bytes, not the {info.get('bytes')} written", None
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return "is missing", None
    except OSError as e:
        return f"cannot be read ({e.strerror or e})", None
    if hashlib.sha256(data).hexdigest() != info.get("sha256"):
        return "does not hold the bytes written (its SHA-256 differs)", None
    try:
        table = pq.read_table(pa.BufferReader(data), columns=["id", "input_stamp"])
    except (pa.ArrowException, OSError, ValueError) as e:
        return f"is not a readable shard ({e})", None
    if table.num_rows != info.get("rows"):
        return f"holds {table.num_rows} rows, not {info.get('rows')}", None
    return None, ShardRows(int(key), table.column("id").to_pylist(),
                           table.column("input_stamp").to_pylist())


def verify_shards(out_dir: str, manifest: dict) -> tuple[list[ShardRows], list[str]]:
    """Check every listed shard and drop the ones that fail from `manifest` (their files go
    with the next `remove_unlisted`). Returns (rows of the good shards, one line per shard
    dropped)."""
    good: list[ShardRows] = []
    dropped: list[str] = []
    for key in sorted(manifest["shards"], key=lambda k: (not k.isdigit(), k.zfill(12))):
        info = manifest["shards"][key]
        why, rows = _problem(out_dir, key, info)
        if rows is not None:
            good.append(rows)
            continue
        del manifest["shards"][key]
        n = info.get("rows") if isinstance(info, dict) else None
        name = info.get("file") if isinstance(info, dict) else None
        dropped.append(f"shard {key} ({name!r}) {why}: its {n if isinstance(n, int) else '?'} "
                       f"rows are embedded again")
    return good, dropped
