"""POST /v1/embed: images uploaded as multipart/form-data (curl -F), JSON rows back.

    curl -F image=@cat.jpg -F image=@dog.png http://127.0.0.1:8000/v1/embed
    curl -F image=@cat.jpg 'http://127.0.0.1:8000/v1/embed?model=spe'   # several models served

Not part of the Open Inference Protocol: a convenience for people with curl. The images go
through the data plane like an infer request; the model is `?model=NAME` (needed only when the
server serves several).
"""
from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qs

from .dataplane import DataPlane
from .errors import BadRequest


async def _read_form(scope: dict, body: bytes, max_body: int) -> list[tuple[str, bytes]]:
    """(file name, bytes) of every file part of a multipart body; BadRequest when malformed."""
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartParser

    async def stream():
        yield body

    try:
        form = await MultiPartParser(Headers(raw=scope["headers"]), stream(), max_files=1024,
                                     max_fields=16, max_part_size=max_body).parse()
    except Exception as e:
        raise BadRequest(f"malformed multipart body: {e}") from None
    files = [(key, value) for key, value in form.multi_items() if isinstance(value, UploadFile)]
    out = [(f.filename or key, await f.read()) for key, f in files]
    await form.close()
    return out


async def embed_upload(plane: DataPlane, scope: dict, headers: dict[str, str], body: bytes,
                       max_body: int, offload_bytes: int = 64 << 10) -> tuple[dict, int]:
    """(JSON document, HTTP status) of one upload; 400 when every image failed. A body over
    `offload_bytes` is parsed in a worker thread (its own event loop), off the server's."""
    if "multipart/form-data" not in headers.get("content-type", ""):
        raise BadRequest("send images as multipart/form-data, e.g. "
                         "curl -F image=@photo.jpg URL/v1/embed")
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    names = list(plane.endpoints)
    if "model" in query:
        endpoint = plane.endpoint(query["model"][0])
    elif len(names) == 1:
        endpoint = plane.endpoints[names[0]]
    else:
        raise BadRequest(f"this server serves several models ({', '.join(names)}); "
                         "say which with ?model=NAME")
    if len(body) > offload_bytes:
        parts = await asyncio.to_thread(asyncio.run, _read_form(scope, body, max_body))
    else:
        parts = await _read_form(scope, body, max_body)
    if not parts:
        raise BadRequest("no file in the upload; use curl -F image=@photo.jpg")
    file_names = [name for name, _ in parts]
    items = [data for _, data in parts]
    results = await endpoint.embed(items)
    model = endpoint.model
    outputs = model.outputs(results)
    rows: list[dict[str, Any]] = []
    for i, (name, r) in enumerate(zip(file_names, results)):
        row: dict[str, Any] = {"file": name, "error": f"{name}: {r.error}" if r.error else None}
        row["embedding"] = None if r.error else [float(v) for v in r.vector]
        if model.probes_ and not r.error:
            row["probes"] = {p.name: {
                "label": outputs[f"{p.name}_label"][i].decode(),
                "score": float(outputs[f"{p.name}_score"][i]),
                "top_k": [[lab.decode(), float(s)] for lab, s in zip(
                    outputs[f"{p.name}_topk_label"][i], outputs[f"{p.name}_topk_score"][i])],
            } for p in model.probes_}
        rows.append(row)
    status = 400 if all(r.error for r in results) else 200
    return {"model": model.name, "results": rows}, status
