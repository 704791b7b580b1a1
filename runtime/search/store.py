"""The index folder: `index.faiss` (faiss's own binary format, never pickle), `ids.json` (the id
of each row) and `index.json` (kind, parameters, recall, the model that made the vectors and the
embeddings it was built from). Written as a temporary folder renamed into place.

Where it lives by default: inside a Parquet output folder as `FOLDER/_index/` (a name Parquet
readers skip), beside a FEATURES.npy as `FEATURES.index/`.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np

from .index import SearchIndex, SearchIndexError, _faiss

INDEX_FORMAT = "unirep.index"
INDEX_FORMAT_VERSION = 1
INDEX_FILE, IDS_FILE, INFO_FILE = "index.faiss", "ids.json", "index.json"
FOLDER_INDEX = "_index"


def default_index_dir(source: str) -> str:
    """Where `index build SOURCE` writes when no --out is given."""
    if source.endswith(".npy"):
        return source[:-4] + ".index"
    return os.path.join(source, FOLDER_INDEX)


def find_index_dir(path: str) -> str:
    """An index folder, or an embed output whose default index folder exists."""
    for candidate in (path, default_index_dir(path.rstrip("/\\") or path)):
        if os.path.isfile(os.path.join(candidate, INFO_FILE)):
            return candidate
    raise SearchIndexError(f"{path}: no index here; build one with `cli.py index build "
                           f"{path}` (or name the index folder given to --out)")


def source_signature(source: str) -> dict:
    """Size and modification time of what the embeddings were read from (to tell a stale
    index): FEATURES.npy itself, or the bulk folder's manifest."""
    from runtime.bulk import output
    path = source if source.endswith(".npy") else os.path.join(source, getattr(
        output, "MANIFEST", "manifest.json"))
    try:
        st = os.stat(path)
    except OSError:
        return {}
    return {"file": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def save_index(index: SearchIndex, folder: str, **extra: Any) -> None:
    """Write the index folder atomically; `extra` goes into index.json (model, source...)."""
    from common.atomic import make_temp_dir, replace_folder
    folder = os.path.abspath(folder)
    if os.path.exists(folder) and (not os.path.isdir(folder) or (
            os.listdir(folder) and not os.path.exists(os.path.join(folder, INFO_FILE)))):
        raise SearchIndexError(f"{folder} exists and is not an index folder; choose another "
                               "--out")
    data = _faiss().serialize_index(index.index)
    doc = {"format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION, **index.info,
           **extra}
    tmp = make_temp_dir(os.path.dirname(folder), tag="index")
    try:
        with open(os.path.join(tmp, INDEX_FILE), "wb") as f:
            f.write(np.asarray(data, dtype=np.uint8).tobytes())
        with open(os.path.join(tmp, IDS_FILE), "w", encoding="utf-8") as f:
            json.dump(index.ids, f)
        with open(os.path.join(tmp, INFO_FILE), "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        replace_folder(tmp, folder)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    index.info = doc


def load_index(path: str) -> SearchIndex:
    """The index of an index folder (or of an embed output's default index folder)."""
    folder = find_index_dir(path)
    info_path = os.path.join(folder, INFO_FILE)
    try:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
        with open(os.path.join(folder, IDS_FILE), encoding="utf-8") as f:
            ids = json.load(f)
        with open(os.path.join(folder, INDEX_FILE), "rb") as f:
            data = np.frombuffer(f.read(), dtype=np.uint8)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SearchIndexError(f"{folder}: unreadable index ({e}); rebuild it with "
                               "`cli.py index build`") from e
    if not isinstance(info, dict) or info.get("format") != INDEX_FORMAT:
        raise SearchIndexError(f"{info_path}: not a unirep index")
    if int(info.get("format_version", 0)) > INDEX_FORMAT_VERSION:
        raise SearchIndexError(f"{info_path}: index format {info['format_version']} is newer "
                               "than this toolkit understands; upgrade it")
    try:
        faiss_index = _faiss().deserialize_index(data)
    except RuntimeError as e:  # faiss raises RuntimeError for a damaged file
        raise SearchIndexError(f"{folder}/{INDEX_FILE}: damaged ({e}); rebuild the index") from e
    if not isinstance(ids, list) or len(ids) != faiss_index.ntotal:
        raise SearchIndexError(f"{folder}: {IDS_FILE} does not list one id per indexed vector "
                               f"({len(ids) if isinstance(ids, list) else '?'} ids, "
                               f"{faiss_index.ntotal} vectors); rebuild the index")
    index = SearchIndex(faiss_index, [str(i) for i in ids], info)
    breadth = info.get("params", {}).get("nprobe", info.get("params", {}).get("efSearch"))
    if breadth:
        index.set_breadth(int(breadth))
    index.info["folder"] = folder
    return index


def is_stale(index: SearchIndex) -> bool:
    """Whether the embeddings it was built from changed since (size or time)."""
    source, then = index.info.get("source"), index.info.get("source_signature")
    return bool(source and then and source_signature(source) != then)
