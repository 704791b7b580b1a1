"""The model behind an index: which folder embeds the queries, and the check that it is the
model whose vectors were indexed (the description fingerprint, as probes use)."""
from __future__ import annotations

import os

from common.errors import UserError

from .index import SearchIndex


class QueryError(UserError, ValueError):
    """Queries that cannot be embedded for this index (no model known, another model)."""


def index_model_dir(index: SearchIndex, override: str | None = None) -> str:
    """The model folder to embed queries with: `override`, else the one the index records."""
    if override:
        return override
    model_dir = (index.info.get("model") or {}).get("model_dir")
    if model_dir and os.path.exists(model_dir):
        return model_dir
    where = f" ({model_dir} is gone)" if model_dir else ""
    raise QueryError(f"{index.info.get('folder', 'the index')}: does not record which model "
                     f"made its vectors{where}; pass --model MODEL_DIR (or build the index "
                     "with `index build ... --model MODEL_DIR`)")


def check_model(index: SearchIndex, description, model_name: str = "the model") -> None:
    """Refuse a model whose fingerprint or dimension differs from the indexed vectors'."""
    from runtime.probes import description_fingerprint
    expected = (index.info.get("model") or {}).get("fingerprint")
    found = description_fingerprint(description)
    if expected and expected != found:
        raise QueryError(f"{model_name} (fingerprint {found}) is not the model whose vectors "
                         f"were indexed (fingerprint {expected}); pass that model's folder")
    dim = int(getattr(description, "feature_dim", index.dim))
    if dim != index.dim:
        raise QueryError(f"{model_name} gives {dim}-d vectors; the index holds {index.dim}-d")
