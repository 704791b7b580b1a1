"""`python cli.py index build|duplicates` and `python cli.py search`: similarity search over an
`embed` output (runtime/search/, faiss). Heavy imports happen inside the commands."""
from __future__ import annotations

import json
import os

import click

from runtime.cli.options import PipelineOptions, pipeline_options

_pipeline_options = pipeline_options(decode="fast")


def _model_record(saved, model_dir: str | None, variant: str) -> dict:
    """What index.json records of the model: the output's own record, with the folder to
    embed queries with (checked against the output's fingerprint when it has one)."""
    model = dict(saved.model or {})
    if model_dir:
        from runtime.pipeline import load_description, resolve_model
        from runtime.probes import description_fingerprint
        description = load_description(resolve_model(model_dir, variant))
        found = description_fingerprint(description)
        if model.get("fingerprint") and model["fingerprint"] != found:
            raise click.UsageError(f"--model {model_dir} (fingerprint {found}) did not make "
                                   f"these embeddings (fingerprint {model['fingerprint']})")
        model.update({"fingerprint": found, "architecture": description.architecture,
                      "dim": int(description.feature_dim), "variant": variant,
                      "model_dir": os.path.abspath(model_dir)})
    return model


@click.group("index")
def index():
    """Build a similarity index over an embed output, and list its near-duplicates.

    \b
    Typical flow:
      python cli.py embed models/spe photos/ --out feats/
      python cli.py index build feats/                  # feats/_index/
      python cli.py search feats/ query.jpg --k 10
      python cli.py index duplicates feats/ --threshold 0.98
    """


@index.command("build")
@click.argument("source", type=click.Path(exists=True))
@click.option("--out", "-o", default=None, type=click.Path(file_okay=False),
              help="Index folder to write; default SOURCE/_index/ for a Parquet folder, "
                   "FEATURES.index/ beside a FEATURES.npy.")
@click.option("--kind", type=click.Choice(["auto", "exact", "ivf", "hnsw"]), default="auto",
              show_default=True, help="auto: exact up to --exact-up-to vectors, else ivf "
                                      "(inverted lists); hnsw: a graph index.")
@click.option("--exact-up-to", type=click.IntRange(1), default=None,
              help="Largest set 'auto' indexes exactly (default 50,000, measured).")
@click.option("--target-recall", type=click.FloatRange(0.5, 1.0), default=None,
              help="Recall@10 the approximate index is tuned to reach (default 0.97).")
@click.option("--nlist", type=click.IntRange(1), default=None,
              help="IVF lists (default about 4 x sqrt(N)).")
@click.option("--breadth", type=click.IntRange(1), default=None,
              help="Fix IVF nprobe / HNSW efSearch instead of tuning it to --target-recall.")
@click.option("--model", "model_dir", default=None, type=click.Path(exists=True),
              help="The model folder that made the embeddings (recorded, so `search` can "
                   "embed queries with it); default: what SOURCE records.")
@click.option("--variant", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32",
              show_default=True, help="Which model file of --model made the embeddings.")
def build(source, out, kind, exact_up_to, target_recall, nlist, breadth, model_dir, variant):
    """Index the embeddings of SOURCE (an embed output: a Parquet folder, or FEATURES.npy
    with FEATURES.ids.json) for cosine similarity search.

    Failed rows are left out. An approximate index prints its recall@10 against the exact
    search, measured at build on a sample of the indexed vectors.

    \b
    Examples:
      python cli.py index build feats/
      python cli.py index build features.npy --model models/spe --kind hnsw --out idx/
    """
    from runtime.search import (
        EXACT_UP_TO,
        TARGET_RECALL,
        build_index,
        default_index_dir,
        load_saved_embeddings,
        save_index,
    )
    from runtime.search.store import source_signature

    saved = load_saved_embeddings(source)
    if not saved.ids:
        raise click.UsageError(f"{source}: no embedded rows to index")
    model = _model_record(saved, model_dir, variant)
    built = build_index(saved.vectors, saved.ids, kind=kind,
                        exact_up_to=exact_up_to or EXACT_UP_TO,
                        target_recall=target_recall or TARGET_RECALL, nlist=nlist,
                        breadth=breadth)
    out = out or default_index_dir(source)
    save_index(built, out, model=model, source=os.path.abspath(source),
               source_signature=source_signature(source), dropped=saved.dropped)
    info = built.info
    params = ", ".join(f"{k} {v}" for k, v in info["params"].items())
    click.echo(f"indexed {len(built)} vectors ({built.dim}-d) of {source}"
               + (f" ({saved.dropped} failed rows left out)" if saved.dropped else "")
               + f": {info['kind']}" + (f" ({params})" if params else "")
               + f", built in {info['build_seconds']:.2f} s")
    if info["kind"] == "exact":
        click.echo("recall@10 vs exact: 1.0000 (exact search)")
    else:
        click.echo(f"recall@10 vs exact: {info['recall_at_10']:.4f} on "
                   f"{info['recall_queries']} of the indexed vectors as queries (tuned in "
                   f"{info['tune_seconds']:.2f} s)")
    if not model.get("model_dir"):
        click.echo(f"note: {source} does not say which model folder made it; pass --model to "
                   "`search` (or rebuild with --model)", err=True)
    click.echo(f"wrote {out}", err=True)


@index.command("duplicates")
@click.argument("source", type=click.Path(exists=True))
@click.option("--threshold", type=click.FloatRange(-1.0, 1.0), default=0.98, show_default=True,
              help="Cosine similarity from which two images count as near-duplicates.")
@click.option("--k", "k", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Neighbours examined per image.")
@click.option("--out", "-o", default=None, type=click.Path(dir_okay=False),
              help="Also write the pairs as CSV (score,id_a,id_b).")
def duplicates(source, threshold, k, out):
    """List pairs of near-duplicate images in SOURCE (an embed output or its index folder),
    most alike first: `score<TAB>id_a<TAB>id_b`. Uses SOURCE's index when it has a current
    one, else searches exactly."""
    from runtime.search import build_index, is_stale, load_index, load_saved_embeddings
    from runtime.search.index import SearchIndexError, near_duplicates

    index = None
    try:
        index = load_index(source)
        source = index.info.get("source", source)
    except SearchIndexError:
        pass
    saved = load_saved_embeddings(source)
    if index is None or is_stale(index) or index.ids != saved.ids:
        index = build_index(saved.vectors, saved.ids, kind="exact")
    pairs = near_duplicates(index, saved.vectors, threshold=threshold, k=k)
    for score, a, b in pairs:
        click.echo(f"{score:.4f}\t{a}\t{b}")
    if out:
        import csv

        from common.atomic import atomic_open
        with atomic_open(out, "w") as f:
            writer = csv.writer(f)
            writer.writerow(["score", "id_a", "id_b"])
            writer.writerows([(f"{s:.6f}", a, b) for s, a, b in pairs])
    click.echo(f"{len(pairs)} near-duplicate pairs at cosine >= {threshold:g} among "
               f"{len(saved.ids)} images ({index.info['kind']} search)", err=True)


@click.command("search")
@click.argument("target", type=click.Path(exists=True))
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...")
@click.option("--k", "k", type=click.IntRange(1, 10_000), default=10, show_default=True,
              help="Neighbours to list per query image.")
@click.option("--model", "model_dir", default=None, type=click.Path(exists=True),
              help="Model folder to embed the queries with; default the index's.")
@click.option("--format", "fmt", type=click.Choice(["text", "jsonl"]), default="text",
              show_default=True, help="text: a block per query; jsonl: one JSON line per query "
                                      '{"query", "neighbours": [{"id", "score"}]} or "error".')
@_pipeline_options
def search(target, images, k, model_dir, fmt, pipeline: PipelineOptions):
    """Find the indexed images most like each IMAGE: ids and cosine scores, nearest first.

    TARGET is an embed output with an index (`index build`) or an index folder. The query
    images are embedded with the model the index records (or --model), which must be the
    model that made the indexed vectors. IMAGE may be files, folders or list files.

    \b
    Example:
      python cli.py search feats/ part-1234.jpg --k 10
    """
    from runtime.cli.items import collect_items, embed_items
    from runtime.cli.options import open_pipeline
    from runtime.search import check_model, index_model_dir, is_stale, load_index

    found = load_index(target)
    if is_stale(found):
        click.echo(f"warning: {found.info.get('source')} changed since its index was built; "
                   "rebuild it with `cli.py index build`", err=True)
    items = collect_items(images)
    pipe = open_pipeline(index_model_dir(found, model_dir), pipeline)
    with pipe:
        check_model(found, pipe.description_, pipe.model_path_)
        vectors, errors = embed_items(pipe, items, "embed queries")
    ok = [i for i in range(len(items)) if i not in errors]
    results = dict(zip(ok, found.neighbours(vectors[ok], k))) if ok else {}
    for i, (item_id, _) in enumerate(items):
        if fmt == "jsonl":
            doc = ({"query": item_id, "error": errors[i]} if i in errors else
                   {"query": item_id, "neighbours": [{"id": n, "score": s}
                                                     for n, s in results[i]]})
            click.echo(json.dumps(doc))
        elif i in errors:
            click.echo(f"{item_id}\n  error: {errors[i]}")
        else:
            click.echo(item_id)
            for rank, (n, s) in enumerate(results[i], 1):
                click.echo(f"  {rank:3d}  {s:.4f}  {n}")
    if not ok:
        raise click.ClickException(f"none of the {len(items)} query images could be embedded")
