"""Nothing lost or accepted without a word: a class folder whose name starts with a dot is
reported (scan, runtime folder input, bulk walk all share one walker), a probe whose
fingerprint was removed warns wherever it meets a model, a probe fit on one image per class
warns."""
from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest

from common.data import load_dataset, scan_imagefolder
from common.description import ModelDescription, Preprocessing
from runtime.inputs import iter_folder
from runtime.probes import (
    LogisticRegressionProbe,
    ProbeMismatchError,
    description_fingerprint,
    load_probe_for,
    save_probe,
)


@pytest.fixture()
def dotted_dataset(tmp_path, digits_small):
    """Two class folders, one of them named '.three', plus a '.git' folder holding no image."""
    source = load_dataset(digits_small).paths("train")[:12]
    root = tmp_path / "data"
    for name, paths in (("two", source[:4]), (".three", source[4:12])):
        (root / name).mkdir(parents=True)
        for p in paths:
            shutil.copy(p, root / name / os.path.basename(p))
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return root


def test_a_class_folder_named_with_a_dot_is_reported_not_dropped(dotted_dataset, caplog):
    with caplog.at_level(logging.WARNING):
        ds = scan_imagefolder(str(dotted_dataset))
    hidden = [p for p in ds.problems if ".three" in p]
    assert len(hidden) == 1 and "holding 8 image(s)" in hidden[0], ds.problems
    assert "rename it without the leading '.'" in hidden[0]
    assert not [p for p in ds.problems if ".git" in p]  # no images there: nothing to say
    assert ".three" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unirep.files"):
        found = list(iter_folder(str(dotted_dataset)))
    assert len(found) == 4 and ".three" in caplog.text


def _description(dim: int = 8) -> ModelDescription:
    return ModelDescription(architecture="tiny", feature_dim=dim, preprocessing=Preprocessing())


def _probe(per_class: int = 5, classes: int = 3):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(classes), per_class)
    X = rng.normal(size=(len(y), 8)) + y[:, None]
    return LogisticRegressionProbe(C=1.0).fit(X, y)


def test_a_probe_without_its_fingerprint_warns_wherever_it_is_loaded(tmp_path, caplog):
    from runtime.service.model import load_probes
    description = _description()
    meta = {"model_fingerprint": description_fingerprint(description), "architecture": "tiny"}
    save_probe(_probe(), str(tmp_path / "good"), metadata=meta)
    save_probe(_probe(), str(tmp_path / "stripped"), metadata={"architecture": "tiny"})
    save_probe(_probe(), str(tmp_path / "other"),
               metadata=dict(meta, model_fingerprint="f" * 16))
    with caplog.at_level(logging.WARNING):
        load_probe_for(description, str(tmp_path / "good"))
    assert "fingerprint" not in caplog.text
    for load in (lambda p: load_probe_for(description, p),
                 lambda p: load_probes({"x": p}, description),
                 lambda p: load_probe_for(description.to_dict(), p)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            load(str(tmp_path / "stripped"))
        assert "records no model fingerprint" in caplog.text and "stripped" in caplog.text
    with pytest.raises(ProbeMismatchError, match="fingerprint ffff"):
        load_probe_for(description, str(tmp_path / "other"))


def test_a_probe_fit_on_one_image_per_class_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="unirep.probes"):
        _probe(per_class=5)
    assert "single image" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="unirep.probes"):
        probe = _probe(per_class=1)
    assert "3 of 3 classes have a single image" in caplog.text
    assert list(probe.classes_) == [0, 1, 2]  # it still fits: a warning, not a refusal
