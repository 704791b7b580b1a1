"""End-to-end throughput of the arm's models, measured apart from the evaluation: the same JPEG
photos (real photographs shipped with matplotlib and scikit-learn, cropped to 500x375 and
encoded at quality 90: the decode cost of an ImageNet photo) through each model's pipeline (decode, resize, onnxruntime
on this CPU), models interleaved over several rounds so that a change of load on a shared
machine touches every model alike; a model's figure is its best round. Kept in
RECORDS/speed.json (one entry per model, reused while every model file is unchanged; when
one is new or changed, all are timed again together)."""
from __future__ import annotations

import io
import json
import os
import time

import numpy as np

from common.description import save_json_atomic

from .stages import log


def _photos() -> list[str]:
    """Real photos that ship with installed packages (matplotlib, scikit-learn)."""
    import matplotlib
    import sklearn
    paths = [os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data",
                          "grace_hopper.jpg")]
    images = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
    paths += [os.path.join(images, f) for f in ("china.jpg", "flower.jpg")]
    return [p for p in paths if os.path.exists(p)]


def photo_corpus(n: int, seed: int = 0) -> list[bytes]:
    """`n` JPEG images (bytes): seeded random crops of real photos, resized to 500x375."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    photos = [Image.open(p).convert("RGB") for p in _photos()]
    if not photos:
        raise FileNotFoundError("no sample photos (matplotlib's grace_hopper.jpg, "
                                "scikit-learn's china.jpg) for the speed stage")
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = photo.crop((x, y, x + cw, y + ch)).resize((500, 375), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def measure_speeds(models: dict[str, str], records: str, threads: int, device: str,
                   n_images: int = 96, rounds: int = 3) -> dict[str, dict]:
    """{model name: {"images_per_s", "rounds", "load_average"}} for `models` {name: model dir};
    RECORDS/speed.json is returned as it is while it holds every model for the same files."""
    from runtime.pipeline import FeaturePipeline
    path = os.path.join(records, "speed.json")
    known: dict = {}
    if os.path.exists(path):
        with open(path) as f:
            known = json.load(f)

    def stamp(model_dir: str) -> float:
        return os.path.getmtime(os.path.join(model_dir, "model.onnx"))

    stale = [n for n, d in models.items()
             if n not in known or known[n].get("stamp") != stamp(d)]
    if not stale:
        return known
    # one new model means timing them all again: figures compare only within one session
    todo = dict(models)
    known = {}
    images = photo_corpus(n_images)
    speeds: dict[str, list[float]] = {n: [] for n in todo}
    loads = []
    for r in range(rounds):
        for n, d in todo.items():
            # one pipeline open at a time: a dozen sessions at once do not fit a small machine
            pipe = FeaturePipeline(d, device=device, threads=threads)
            try:
                pipe.embed(images[:8])                # warm-up: session, allocations
                t0 = time.perf_counter()
                pipe.embed(images)
                speeds[n].append(len(images) / (time.perf_counter() - t0))
            finally:
                pipe.close()
        loads.append(os.getloadavg()[0])
        log(f"speed round {r + 1}/{rounds} done")
    session = time.time()   # every figure of one interleaved session carries the same stamp
    for n in todo:
        known[n] = {"images_per_s": round(max(speeds[n]), 1), "session": session,
                    "rounds": [round(v, 1) for v in speeds[n]], "stamp": stamp(todo[n]),
                    "n_images": n_images, "threads": threads,
                    "load_average": [round(min(loads), 2), round(max(loads), 2)]}
    save_json_atomic(path, known)
    return known
