"""Similarity search over saved embeddings (faiss): "find the parts that look like this one"
and near-duplicates. Imported only when used; faiss only when an index is built or read
(`pip install 'unirep[search]'`).

    saved = load_saved_embeddings("feats/")            # an embed output: a Parquet folder or .npy
    index = build_index(saved.vectors, saved.ids)      # exact, or IVF above EXACT_UP_TO vectors
    save_index(index, "feats/_index", model=saved.model)
    index = load_index("feats/")                       # the folder or its index folder
    index.neighbours(pipe.embed(["query.jpg"]).vectors, k=10)   # [[(id, cosine), ...]]

Modules: `saved` (embed outputs read back), `index` (build, tune, search, near-duplicates),
`store` (the index folder), `query` (the model of an index; embedding the query images).
"""
from __future__ import annotations

from .index import (
    EXACT_UP_TO,
    KINDS,
    TARGET_RECALL,
    SearchIndex,
    SearchIndexError,
    build_index,
    near_duplicates,
    recall_at_k,
)
from .query import QueryError, check_model, index_model_dir
from .saved import SavedEmbeddings, SavedEmbeddingsError, load_saved_embeddings
from .store import default_index_dir, find_index_dir, is_stale, load_index, save_index

__all__ = [
    "EXACT_UP_TO", "KINDS", "TARGET_RECALL", "QueryError", "SavedEmbeddings",
    "SavedEmbeddingsError", "SearchIndex", "SearchIndexError", "build_index", "check_model",
    "default_index_dir", "find_index_dir", "index_model_dir", "is_stale", "load_index",
    "load_saved_embeddings", "near_duplicates", "recall_at_k", "save_index",
]
