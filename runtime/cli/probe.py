"""`python cli.py probe fit|predict|fuse`: probes on frozen embeddings from the runtime pipeline.

Heavy imports (numpy, onnxruntime, scipy) happen inside the commands so `cli.py --help` stays
instant; nothing here imports torch.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import click

from common.checks import FiniteFloat, data_spec, writable_output
from common.errors import ItemError
from runtime.cli.bulk import bulk_options
from runtime.cli.items import embed_items
from runtime.cli.options import PipelineOptions, pipeline_options
from runtime.cli.options import open_pipeline as open_command_pipeline
from runtime.cli.probe_saved import resolve_level

KINDS = ("logreg", "svm", "ncm", "knn")
MAX_ERRORS_SHOWN = 20


# --device, --batch-size, --threads, --decode, --decode-threads/-processes, --variant
_pipeline_options = pipeline_options(decode="fast")


def open_pipeline(model_dir, pipeline: PipelineOptions):
    pipe = open_command_pipeline(model_dir, pipeline)
    note = f" (fell back: {pipe.fallback_reason_})" if pipe.fell_back_ else ""
    click.echo(f"model {pipe.model_path_}: {pipe.description_.architecture}, "
               f"{pipe.feature_dim_}-d; provider {pipe.provider_}{note}", err=True)
    return pipe


def _item_message(item: tuple[str, str], message: str) -> str:
    """The pipeline's '<path>: <cause>' for an (id, path) item, named by the item's id."""
    item_id, path = item
    return str(ItemError(path, message.removeprefix(f"{path}: ")).for_item(item_id))


def _report_errors(errors: dict[int, str], what: str) -> None:
    for k in sorted(errors)[:MAX_ERRORS_SHOWN]:
        click.echo(f"skipped: {errors[k]}", err=True)
    if len(errors) > MAX_ERRORS_SHOWN:
        click.echo(f"... and {len(errors) - MAX_ERRORS_SHOWN} more", err=True)
    if errors:
        click.echo(f"{len(errors)} {what} image(s) could not be embedded and were skipped",
                   err=True)


def _load_probe_or_fail(probe_dir: str, model_dir: str | None = None, variant: str = "fp32"):
    """The probe of PROBE_DIR, once checked to fit MODEL_DIR when given (`load_probe_for`,
    with the description read without opening a session)."""
    from runtime.pipeline import load_description, resolve_model
    from runtime.probes import ProbeMismatchError, load_probe, load_probe_for

    model_path = description = None
    if model_dir is not None:  # a bad model folder is a ModelError of its own, not the probe's
        model_path = resolve_model(model_dir, variant)
        description = load_description(model_path)
    try:
        return load_probe(probe_dir) if description is None else load_probe_for(description,
                                                                                probe_dir)
    except ProbeMismatchError as e:
        raise click.UsageError(f"probe {probe_dir} does not match model {model_path}: {e.reason}")
    except (FileNotFoundError, ValueError, KeyError) as e:  # ProbeFileError is a ValueError
        raise click.ClickException(f"cannot load probe {probe_dir}: {e}")


def _plain(value):
    """numpy scalar label -> JSON-friendly Python value."""
    return value.item() if hasattr(value, "item") else value


@click.group("probe")
def probe():
    """Fit, apply and fuse probes on frozen embeddings (onnxruntime; no torch needed).

    \b
    Typical flow:
      python cli.py probe fit models/spe --data mnist --out probes/mnist
      python cli.py probe predict models/spe probes/mnist photos/ --out preds.jsonl --top-k 3
      python cli.py probe fuse models/spe probes/mnist --out models/spe-mnist.onnx
    """


@probe.command("fit")
@click.argument("model_dir", type=click.Path(exists=True))
@click.option("--data", default=None, callback=data_spec,
              help="A folder (nested folders are label levels; train/ and test/ are splits) or "
                   "a built-in: fashion-mnist, mnist, digits, emoji[:...], any with per_class=N. "
                   "With --embeddings: the labels and splits of the saved rows.")
@click.option("--embeddings", default=None, type=click.Path(exists=True),
              help="Fit on saved embeddings instead of embedding images: an embed output "
                   "(FEATURES.npy with its ids, or a Parquet folder). Labels from --data, "
                   "--labels, or else each image's parent folder name.")
@click.option("--labels", "labels_csv", default=None, type=click.Path(exists=True,
              dir_okay=False), help="With --embeddings: a CSV of id,label (ids as in the "
                                    "output); rows without a label are left out.")
@click.option("--out", "-o", "out", required=True, type=click.Path(file_okay=False),
              callback=writable_output("folder"), help="Probe folder to write (probe.npz + probe.json).")
@click.option("--kind", type=click.Choice(KINDS), default="logreg", show_default=True,
              help="logreg: multinomial logistic regression; svm: one-vs-rest linear SVM; "
                   "ncm: nearest class mean (cosine); knn: k nearest neighbours (cosine).")
@click.option("--C", "C", type=FiniteFloat(0, min_open=True), default=None,
              help="Inverse regularisation for logreg/svm (default: chosen on a validation "
                   "split from a log-spaced sweep, then refit on train+val).")
@click.option("--k", "k", type=click.IntRange(1), default=None,
              help="Neighbours for knn (default: chosen on a validation split).")
@click.option("--level", default=None,
              help="Label level: number (0 = coarsest) or name; default the leaf level.")
@click.option("--val-fraction", type=click.FloatRange(0.05, 0.5), default=0.2, show_default=True,
              help="Hold-out of the training images used to choose C / k / temperature.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="Seed of the hold-out split.")
@_pipeline_options
def fit(model_dir, data, embeddings, labels_csv, out, kind, C, k, level, val_fraction, seed,
        pipeline: PipelineOptions):
    """Fit a probe on MODEL_DIR's embeddings of DATA's training images (or on saved ones).

    Uses the 'train' split when DATA has train/ and test/ (and then prints the test accuracy),
    otherwise all images. Images that fail to load are reported and skipped. The probe folder
    records the model's fingerprint, so applying it to another model is refused.

    \b
    Examples:
      python cli.py probe fit models/spe --data digits --kind logreg --out probes/digits
      python cli.py probe fit models/spe --embeddings feats/ --data photos/ --out probes/parts
      python cli.py probe fit models/spe --embeddings feats.npy --labels labels.csv --out p/
    """
    _check_fit_options(kind, C, k, out)
    if embeddings is None and (data is None or labels_csv):
        raise click.UsageError("give --data (images to embed), or --embeddings (saved "
                               "embeddings) with --data or --labels for their labels")
    if embeddings:
        from runtime.cli.probe_saved import saved_training_data
        train, test, info = saved_training_data(model_dir, embeddings, data, labels_csv,
                                                level, pipeline.variant)
    else:
        train, test, info = _image_training_data(model_dir, data, level, pipeline)
    X, y = train
    if len(set(y.tolist())) < 2:
        raise click.UsageError(f"{data or embeddings}: need images of at least 2 classes at "
                               f"level {info['level']!r} to fit a probe; got "
                               f"{len(set(y.tolist()))}")
    params: dict[str, Any] = {"seed": seed, "val_fraction": val_fraction}
    params.update({"C": C} if kind in ("logreg", "svm") else {"k": k} if kind == "knn" else {})
    estimator, fit_seconds, train_acc = _fit_and_echo(kind, params, X, y, info["level"])
    summary = _echo_choice(estimator)
    metadata = {**info, "n_train": int(len(y)), "train_accuracy": train_acc,
                "test_accuracy": _test_accuracy(estimator, test),
                "fit_seconds": round(fit_seconds, 3), **summary}
    from runtime.probes import save_probe
    try:
        save_probe(estimator, out, metadata)
    except FileExistsError as e:
        raise click.UsageError(str(e))
    click.echo(f"wrote {out}", err=True)


def _image_training_data(model_dir: str, data: str, level: str | None,
                         pipeline: PipelineOptions):
    """((X, y) train, (X, y) test or None, metadata) by embedding DATA's images."""
    from common.data import DataError, load_dataset
    try:
        dataset = load_dataset(data)
    except DataError as e:
        raise click.UsageError(str(e))
    level_index = resolve_level(dataset.levels, level)
    split = "train" if dataset.has_test_split else "all"
    click.echo(dataset.summary(), err=True)
    pipe = open_pipeline(model_dir, pipeline)
    with pipe:
        X, y, skipped = _embed_side(pipe, dataset, split, level_index)
        test = _embed_side(pipe, dataset, "test", level_index)[:2] if dataset.has_test_split \
            else None
        info = {**_model_metadata(pipe, model_dir, pipeline.variant), "data": data,
                "data_fingerprint": dataset.fingerprint(),
                "level": dataset.levels[level_index].name, "split": split, "skipped": skipped}
    return (X, y), test, info


def _check_fit_options(kind: str, C, k, out: str) -> None:
    if C is not None and kind in ("ncm", "knn"):
        raise click.UsageError(f"--C applies to logreg and svm probes, not {kind}")
    if k is not None and kind != "knn":
        raise click.UsageError("--k applies to knn probes only")
    if os.path.exists(out) and os.listdir(out) and not os.path.exists(
            os.path.join(out, "probe.json")):
        raise click.UsageError(f"--out {out} exists and is not a probe folder; choose another")


def _embed_side(pipe, dataset, split: str, level_index: int):
    """(X, y, skipped) of one side of the data: the finite embeddings and their class names
    at the level; failures are reported and counted."""
    import numpy as np

    paths = dataset.paths(split)
    items = [(os.path.relpath(p, dataset.root).replace(os.sep, "/"), p) for p in paths]
    vectors, errors = embed_items(pipe, items, f"embed {split}")
    _report_errors(errors, split)
    ok = np.isfinite(vectors).all(axis=1)
    names = np.array(dataset.levels[level_index].classes)
    return vectors[ok], names[dataset.labels(split, level_index)[ok]], int(len(errors))


def _fit_and_echo(kind: str, params: dict, X, y, level_name: str):
    """(fitted probe, seconds, train accuracy), with a line saying so."""
    from runtime.probes import make_probe

    estimator = make_probe(kind, **params)
    start = time.perf_counter()
    estimator.fit(X, y)
    fit_seconds = time.perf_counter() - start
    train_acc = estimator.score(X, y)
    click.echo(f"fitted {kind} probe on {len(y)} images, {len(estimator.classes_)} classes "
               f"(level {level_name}) in {fit_seconds:.2f} s; train accuracy {train_acc:.4f}")
    return estimator, fit_seconds, train_acc


def _echo_choice(estimator) -> dict[str, Any]:
    """What validation chose (C, k or a temperature), echoed and returned for the metadata."""
    from runtime.probes import KNNProbe, LinearSVMProbe, LogisticRegressionProbe, NearestClassMeanProbe

    # by the probe's class (what `kind` made), so that each branch reads its own attributes
    if isinstance(estimator, (LogisticRegressionProbe, LinearSVMProbe)):
        scores = estimator.val_scores_
        if not scores:
            click.echo(f"C = {estimator.C_:.4g} (given, or too few images to validate)")
            return {"C": estimator.C_}
        summary = {"C": estimator.C_, "val_accuracy": scores[estimator.C_]}
        click.echo(f"validation: C = {estimator.C_:.4g} chosen from {len(scores)} values "
                   f"({min(scores):.3g}..{max(scores):.3g}), "
                   f"accuracy {summary['val_accuracy']:.4f}; refit on train+val")
        return summary
    if isinstance(estimator, KNNProbe):
        click.echo(f"k = {estimator.k_}")
        return {"k": estimator.k_}
    if isinstance(estimator, NearestClassMeanProbe):
        click.echo(f"softmax temperature = {estimator.temperature_:.4g}")
        return {"temperature": estimator.temperature_}
    return {}


def _test_accuracy(estimator, test) -> float | None:
    """Accuracy on the test side (X, y), echoed (None without a test side or images)."""
    if test is None or not len(test[1]):
        return None
    accuracy = estimator.score(*test)
    click.echo(f"test accuracy {accuracy:.4f} on {len(test[1])} images "
               f"(chance {1 / len(estimator.classes_):.4f})")
    return accuracy


def _model_metadata(pipe, model_dir: str, variant: str) -> dict[str, Any]:
    """The backbone a probe is fitted on, as its metadata records it (fingerprint first)."""
    from runtime.probes import description_fingerprint

    description = pipe.description_
    return {"model_fingerprint": description_fingerprint(description),
            "architecture": description.architecture,
            "feature_dim": int(pipe.feature_dim_),
            "model_dir": os.path.abspath(model_dir),
            "variant": variant}


@probe.command("predict")
@click.argument("model_dir", type=click.Path(exists=True))
@click.argument("probe_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("--out", "-o", "out", required=True, type=click.Path(),
              callback=writable_output("file or folder"),
              help="Predictions file (.jsonl): one JSON object per input image, in order; or "
                   "a folder: resumable Parquet shards with embedding, <probe>_label and "
                   "<probe>_score columns (as `embed --probe`).")
@click.option("--top-k", type=click.IntRange(1), default=1, show_default=True,
              help="How many (label, probability) pairs to list per image.")
@click.option("--labels", "labels_csv", default=None, type=click.Path(exists=True,
              dir_okay=False), help="True labels as a CSV of id,label (default: the folders "
                                    "the images sit in, when they name the probe's classes).")
@click.option("--report", "report_dir", default=None, type=click.Path(file_okay=False),
              help="Where labelled inputs get their accuracy report (report.json, "
                   "confusion.json, confusion.png); default OUT without .jsonl + .report/.")
@_pipeline_options
@bulk_options
def predict(model_dir, probe_dir, inputs, out, top_k, labels_csv, report_dir,
            pipeline: PipelineOptions, **bulk):
    """Predict labels for images with a fitted probe on MODEL_DIR's embeddings.

    \b
    INPUT is any mix of: image files, folders (recursive, sorted), a text file listing image
    paths (list.txt or @list), or a built-in dataset (all its images).

    \b
    Writes one line per image, aligned with the inputs:
      {"id": ..., "label": ..., "score": p, "top_k": [[label, p], ...]}
    or, for an image that cannot be read, {"id": ..., "error": "why"}.
    Labelled inputs (images in folders named after the probe's classes, as `probe fit --data`
    reads them, or --labels CSV) also print the accuracy and write a per-class report and a
    confusion matrix (--report). When --out is not a .jsonl file it is a folder of resumable
    Parquet shards (see
    `embed --help`, Bulk jobs); tables, tar shards and --engine ray work there too.

    \b
    Examples:
      python cli.py probe predict models/spe probes/mnist photos/ --out preds.jsonl --top-k 3
      python cli.py probe predict models/spe probes/mnist photos/ --out preds/ --shard-size 5000
    """
    if not out.endswith(".jsonl"):
        if labels_csv or report_dir:
            raise click.UsageError("--labels and --report need a .jsonl --out")
        from runtime.cli.bulk import run_bulk
        return run_bulk(model_dir, inputs, out, probe_dirs=(probe_dir,), file_suffix=".jsonl",
                        pipeline=pipeline.pipeline_kwargs(), **bulk)
    from runtime.cli.items import collect_items

    estimator = _load_probe_or_fail(probe_dir, model_dir, pipeline.variant)
    items = collect_items(inputs)
    if not items:
        raise click.UsageError("no images to predict: the inputs named none")
    pipe = open_pipeline(model_dir, pipeline)
    top_k = min(top_k, len(estimator.classes_))

    from common.atomic import make_temp_file
    fd, tmp = make_temp_file(os.path.dirname(os.path.abspath(out)), suffix=".jsonl")
    try:
        with os.fdopen(fd, "w") as f, pipe:
            errors, predicted = _write_predictions(f, pipe, estimator, items, top_k)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    done = len(items) - len(errors)
    _report_errors(errors, "input")
    click.echo(f"predicted {done}/{len(items)} images; wrote {out}", err=True)
    if done == 0:
        raise click.ClickException(f"all {len(items)} images failed; see the errors above")
    from runtime.cli.probe_saved import report_accuracy
    report_accuracy(items, predicted, [str(c) for c in estimator.classes_], labels_csv,
                    report_dir or out[: -len(".jsonl")] + ".report", probe_dir)


def _write_predictions(f, pipe, estimator, items: list[tuple[str, str]], top_k: int
                       ) -> tuple[dict[int, str], dict[int, str]]:
    """One JSON line per item into `f`, streamed batch by batch (memory stays flat however
    many images there are); returns ({row: message} of the items that failed, {row: predicted
    label} of the others)."""
    from tqdm import tqdm

    errors: dict[int, str] = {}
    predicted: dict[int, str] = {}
    row = 0
    with tqdm(total=len(items), unit="img", file=sys.stderr, desc="predict",
              dynamic_ncols=True, disable=None) as bar:
        for _, batch, batch_errors in pipe.iter_batches(p for _, p in items):
            for record in _batch_records(estimator, batch, batch_errors, items[row:], top_k):
                if "error" in record:
                    errors[row] = record["error"]
                else:
                    predicted[row] = str(record["label"])
                f.write(json.dumps(record, allow_nan=False) + "\n")
                row += 1
            bar.update(len(batch))
    return errors, predicted


def _batch_records(estimator, batch, batch_errors: dict[int, str], items, top_k: int) -> list[dict]:
    """The prediction records of one batch; `items` starts at the batch's first row."""
    import numpy as np

    ok = np.isfinite(batch).all(axis=1)
    probabilities = np.zeros((len(batch), len(estimator.classes_)))
    if ok.any():
        probabilities[ok] = estimator.predict_proba(batch[ok])
    # JSON has no NaN: a row whose probabilities are not finite becomes an error
    finite = np.asarray(np.isfinite(probabilities).all(axis=1))
    probabilities[~finite] = 0.0
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
    records: list[dict[str, Any]] = []
    for j in range(len(batch)):
        item_id = items[j][0]
        if not ok[j] or not finite[j]:
            message = batch_errors.get(j, "embedding is not finite" if not ok[j]
                                       else "probe probabilities are not finite")
            records.append({"id": item_id, "error": _item_message(items[j], message)})
            continue
        best = [(_plain(estimator.classes_[c]), float(probabilities[j, c])) for c in order[j]]
        records.append({"id": item_id, "label": best[0][0], "score": best[0][1],
                        "top_k": [list(pair) for pair in best]})
    return records


@probe.command("fuse")
@click.argument("model_dir", type=click.Path(exists=True))
@click.argument("probe_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "-o", "out", required=True, type=click.Path(dir_okay=False),
              callback=writable_output("file"), help="The fused ONNX model to write.")
@click.option("--variant", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32",
              show_default=True, help="Which exported model file to fuse the probe into.")
def fuse(model_dir, probe_dir, out, variant):
    """Write one ONNX model = MODEL_DIR's embedding model with the probe inside.

    Outputs: embedding [B, D], probabilities [B, K] and label [B] (int64 index into the class
    names, stored as JSON in the metadata key 'unirep.probe.classes'). Every probe kind fuses:
    logreg, svm and ncm as a matrix product and softmax, knn as a TopK vote.

    \b
    Example:
      python cli.py probe fuse models/spe probes/mnist --out models/spe-mnist.onnx
    """
    from runtime.probes import FuseError, fuse_probe

    if not out.endswith(".onnx"):
        raise click.UsageError(f"--out {out}: the fused model file must end in .onnx")
    estimator = _load_probe_or_fail(probe_dir)
    try:
        info = fuse_probe(model_dir, estimator, out, variant=variant)
    except (FuseError, FileNotFoundError) as e:
        raise click.UsageError(f"cannot fuse probe {probe_dir}: {e}")
    click.echo(f"wrote {info['path']}: outputs {', '.join(info['outputs'])}; "
               f"{len(info['classes'])} classes; opset {info['opset']}")
