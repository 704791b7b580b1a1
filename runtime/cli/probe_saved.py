"""`probe fit --embeddings`: the training rows of a probe from an `embed` output instead of
from images, labelled by a dataset's folders (--data), a CSV (--labels) or the parent folder
of each image."""
from __future__ import annotations

import os
from typing import Any

import click


def resolve_level(levels, level: str | None) -> int:
    """--level as a number (0 = coarsest, -1 = leaf) or a level name -> index into levels."""
    names = [lv.name for lv in levels]
    if level is None:
        return len(levels) - 1
    if level.lstrip("-").isdigit():
        i = int(level)
        if not -len(names) <= i < len(names):
            raise click.UsageError(f"--level {i} is out of range; the data's levels are "
                                   f"0..{len(names) - 1}: {', '.join(names)}")
        return i % len(names)
    if level not in names:
        raise click.UsageError(f"--level {level!r}: unknown level; the data's levels are "
                               f"{', '.join(names)}")
    return names.index(level)


def _model_info(model_dir: str, variant: str, saved) -> dict[str, Any]:
    """The probe's model metadata from MODEL_DIR's description, refused when the saved rows
    were made by another model."""
    from runtime.pipeline import load_description, resolve_model
    from runtime.probes import description_fingerprint
    model_path = resolve_model(model_dir, variant)
    description = load_description(model_path)
    fingerprint = description_fingerprint(description)
    recorded = (saved.model or {}).get("fingerprint")
    if recorded and recorded != fingerprint:
        raise click.UsageError(f"{saved.source} was embedded by another model (fingerprint "
                               f"{recorded}) than {model_path} ({fingerprint}); pass that model")
    if saved.vectors.shape[1] != int(description.feature_dim):
        raise click.UsageError(f"{saved.source} holds {saved.vectors.shape[1]}-d rows; "
                               f"{model_path} gives {description.feature_dim}-d features")
    return {"model_fingerprint": fingerprint, "architecture": description.architecture,
            "feature_dim": int(description.feature_dim),
            "model_dir": os.path.abspath(model_dir), "variant": variant}


def _rows_by_key(ids: list[str]) -> dict[str, int]:
    from runtime.probes.labels import id_keys
    rows: dict[str, int] = {}
    for row, item in enumerate(ids):
        for key in id_keys(item):
            rows.setdefault(key, row)
    return rows


def _dataset_side(saved, rows: dict[str, int], dataset, split: str, level_index: int):
    """(X, y, missing) of one split of DATA, in the dataset's order (as `probe fit --data`
    embeds it), from the saved rows; images without a saved row are counted."""
    import numpy as np
    names = np.array(dataset.levels[level_index].classes)
    labels = dataset.labels(split, level_index)
    picked, y, missing = [], [], []
    for path, label in zip(dataset.paths(split), labels):
        rel = os.path.relpath(path, dataset.root).replace(os.sep, "/")
        row = next((rows[key] for key in (os.path.abspath(path), path, rel) if key in rows), None)
        if row is None:
            missing.append(path)
            continue
        picked.append(row)
        y.append(names[label])
    return saved.vectors[picked], np.array(y), missing


def _from_dataset(saved, data: str, level: str | None):
    from common.data import DataError, load_dataset
    try:
        dataset = load_dataset(data)
    except DataError as e:
        raise click.UsageError(str(e))
    level_index = resolve_level(dataset.levels, level)
    rows = _rows_by_key(saved.ids)
    split = "train" if dataset.has_test_split else "all"
    X, y, missing = _dataset_side(saved, rows, dataset, split, level_index)
    test = None
    if dataset.has_test_split:
        Xt, yt, missing_test = _dataset_side(saved, rows, dataset, "test", level_index)
        test, missing = (Xt, yt), missing + missing_test
    if missing:
        click.echo(f"{len(missing)} image(s) of {data} have no embedded row in "
                   f"{saved.source} (first: {missing[0]}); left out", err=True)
    info = {"data": data, "data_fingerprint": dataset.fingerprint(),
            "level": dataset.levels[level_index].name, "split": split,
            "skipped": len(missing) + saved.dropped}
    return (X, y), test, info


def _from_labels(saved, labels_csv: str | None):
    """Rows labelled by the CSV (or, without one, by each image's parent folder name)."""
    from runtime.probes.labels import id_keys, parent_folder, read_label_csv
    if labels_csv:
        labels = read_label_csv(labels_csv)
        by_key = {key: label for item, label in labels.items() for key in id_keys(item)}
        found = [(row, next((by_key[k] for k in id_keys(item) if k in by_key), None))
                 for row, item in enumerate(saved.ids)]
        unused = len(labels) - sum(1 for _, label in found if label is not None)
        if unused > 0:
            click.echo(f"{unused} id(s) of {labels_csv} are not in {saved.source}", err=True)
    else:
        found = [(row, parent_folder(item) or None) for row, item in enumerate(saved.ids)]
    import numpy as np
    kept = [(row, label) for row, label in found if label is not None]
    unlabelled = len(found) - len(kept)
    if unlabelled:
        click.echo(f"{unlabelled} embedded row(s) have no label; left out", err=True)
    X = saved.vectors[[row for row, _ in kept]]
    info = {"labels": os.path.abspath(labels_csv) if labels_csv else "parent folder",
            "level": "label", "split": "all", "skipped": unlabelled + saved.dropped}
    return (X, np.array([label for _, label in kept])), None, info


def saved_training_data(model_dir: str, embeddings: str, data: str | None,
                        labels_csv: str | None, level: str | None, variant: str):
    """((X, y) train, (X, y) test or None, metadata) from saved embeddings."""
    from runtime.search.saved import load_saved_embeddings
    saved = load_saved_embeddings(embeddings)
    info = _model_info(model_dir, variant, saved)
    if data:
        train, test, more = _from_dataset(saved, data, level)
    else:
        train, test, more = _from_labels(saved, labels_csv)
    click.echo(f"{embeddings}: {len(saved.ids)} embedded rows; {len(train[1])} for training"
               + (f", {len(test[1])} for testing" if test else ""), err=True)
    return train, test, {**info, "embeddings": os.path.abspath(embeddings), **more}


def report_accuracy(items: list[tuple[str, str]], predicted: dict[int, str], classes: list[str],
                    labels_csv: str | None, report_dir: str, title: str) -> dict | None:
    """`probe predict` on labelled images: the accuracy printed, the per-class report and the
    confusion matrix written into `report_dir`. Labels from the CSV, else from the folders of
    the images when they name the probe's classes; nothing when the images are unlabelled."""
    from runtime.probes.diagnostics import classification_report, write_report
    from runtime.probes.labels import folder_class, id_keys, read_label_csv
    if labels_csv:
        by_key = {key: label for item, label in read_label_csv(labels_csv).items()
                  for key in id_keys(item)}
        truth = {row: next((by_key[k] for k in id_keys(items[row][0]) if k in by_key), None)
                 for row in predicted}
    else:
        truth = {row: folder_class(items[row][0], classes) for row in predicted}
    labelled = sorted(row for row, label in truth.items() if label is not None)
    if not labelled:
        if labels_csv:
            click.echo(f"none of the predicted images has a label in {labels_csv}", err=True)
        return None
    report = classification_report([str(truth[r]) for r in labelled],
                                   [predicted[r] for r in labelled], classes)
    unlabelled = len(predicted) - len(labelled)
    click.echo(f"accuracy {report['accuracy']:.4f} on {report['images']} labelled images"
               + (f" ({unlabelled} without a label left out)" if unlabelled else "")
               + f"; macro F1 {report['macro']['f1']:.4f}")
    for confusion in report["top_confusions"][:3]:
        click.echo(f"  {confusion['count']} x {confusion['true']} taken for "
                   f"{confusion['predicted']}")
    written = write_report(report, report_dir, title=os.path.basename(os.path.normpath(title)))
    click.echo(f"wrote {', '.join(written)}", err=True)
    if not any(w.endswith(".png") for w in written):
        click.echo("(no confusion.png: matplotlib is not installed)", err=True)
    return report
