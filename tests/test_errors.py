"""One family of errors: every error the user can fix subclasses common.errors.UserError, and a
command that raises one ends with exactly one line, "Error: ...", and exit status 1.

The error classes are found by reading the source (every class whose bases lead to an
exception), so a new error type is checked without editing this file: it subclasses UserError,
or it is listed in NOT_USER_ERRORS with the reason it is not the user's to fix.
"""
from __future__ import annotations

import ast
import builtins
import importlib
import json
import os
import pickle

import click
import pytest
from click.testing import CliRunner

import cli
from common.errors import ItemError, UserError, renamed
from tests.conftest import ROOT
from tests.test_structure import PACKAGES, _module_files

NOT_USER_ERRORS = {
    "common.errors.UserError": "the base class itself",
    "runtime.service.batcher.QueueFull": "the service is overloaded (HTTP 503), not bad input",
    "runtime.service.batcher.Closed": "the service is stopping; the request may be retried",
    "runtime.service.batcher.Expired": "the request waited past its timeout (HTTP 504)",
    "export.caffe2_exec.Caffe2ExecError": "a net we exported does not run: a bug, not the input",
    "runtime.service.app._Disconnected": "the client went away mid-request: nothing to answer",
}
_BUILTIN_EXCEPTIONS = {n for n, v in vars(builtins).items()  # warnings are not errors
                       if isinstance(v, type) and issubclass(v, BaseException)
                       and not issubclass(v, Warning)}


def _base_name(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def exception_classes(root: str = ROOT) -> dict[str, str]:
    """{'module.Class': module} for every exception class defined in the packages (by name: a
    class is one when a base is a built-in exception or another class found here)."""
    classes: list[tuple[str, str, set[str]]] = []
    for module, path in _module_files(root).items():
        if module.split(".")[0] not in PACKAGES:
            continue
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        classes += [(module, node.name, {_base_name(b) for b in node.bases})
                    for node in tree.body if isinstance(node, ast.ClassDef)]
    known = set(_BUILTIN_EXCEPTIONS)
    found: dict[str, str] = {}
    changed = True
    while changed:
        changed = False
        for module, name, bases in classes:
            if f"{module}.{name}" not in found and bases & known:
                found[f"{module}.{name}"] = module
                known.add(name)
                changed = True
    return found


def _load(qualname: str) -> type:
    module, name = qualname.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def user_error_classes() -> list[type]:
    return sorted((_load(q) for q in exception_classes() if q not in NOT_USER_ERRORS),
                  key=lambda c: f"{c.__module__}.{c.__qualname__}")


def test_the_scan_finds_the_errors_of_every_stage():
    found = exception_classes()
    for qualname in ("common.model_dir.ModelError", "common.model_dir.MissingModelError",
                     "common.data.DataError", "common.images.ImageDecodeError",
                     "export.onnx_files.ExportError", "export.caffe2_ops.UnsupportedOnnxOp",
                     "train.pretrained.PretrainedUnavailable", "runtime.bulk.job.JobError",
                     "runtime.service.protocol.ProtocolError", "runtime.prefix.PrefixError"):
        assert qualname in found, qualname
    assert set(NOT_USER_ERRORS) <= set(found), "NOT_USER_ERRORS names a class that is gone"


@pytest.mark.parametrize("qualname", sorted(set(exception_classes()) - set(NOT_USER_ERRORS)))
def test_every_error_the_user_can_fix_is_a_user_error(qualname):
    cls = _load(qualname)  # importable under the name the scan found
    assert issubclass(cls, UserError), (
        f"{qualname} must subclass common.errors.UserError (keep its old base second), or be "
        "listed in NOT_USER_ERRORS with the reason it is not the user's to fix")


def test_old_bases_still_catch_them():
    from common.data import DataError
    from common.model_dir import MissingModelError
    from runtime.bulk.job import JobError
    assert issubclass(DataError, ValueError) and issubclass(JobError, RuntimeError)
    assert issubclass(MissingModelError, FileNotFoundError)


def test_item_errors_carry_the_id_and_survive_pickling():
    from common.images import ImageDecodeError, open_image
    with pytest.raises(ImageDecodeError) as caught:
        open_image(os.path.join(ROOT, "no-such-image.png"))
    err = caught.value
    assert err.item_id.endswith("no-such-image.png") and err.reason == "file not found"
    renamed_err = err.for_item("row-7")
    assert str(renamed_err) == "row-7: file not found"
    assert isinstance(renamed_err, ImageDecodeError) and isinstance(renamed_err, ValueError)
    for e in (err, ImageDecodeError("UNIREP_MAX_PIXELS='x': expected a number"),
              ItemError("a", "b")):  # decode workers and Ray send errors between processes
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e) and back.item_id == e.item_id
    assert renamed("/p/a.jpg: cannot decode image", "/p/a.jpg", "a.jpg") == \
        "a.jpg: cannot decode image"
    assert renamed("embedding is not finite", "/p/a.jpg", "a.jpg") == "embedding is not finite"


def _raise(cls: type) -> None:
    """Raise CLS with a two-line message as its last argument (ids and names before it)."""
    import inspect
    message = "the first part\n   and the second part"
    params = [p for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
              if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
    raise cls(*[f"name-{i}" for i in range(len(params) - 1)], message) if len(params) > 1 else cls(message)


@click.command("boom")
@click.argument("qualname")
def boom(qualname):
    """A command that raises the named error class, as a stage's command would."""
    _raise(_load(qualname))


@pytest.mark.parametrize("cls", user_error_classes(), ids=lambda c: c.__name__)
def test_cli_ends_every_user_error_in_one_line(cls, monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "boom", (__name__, "boom", "raises an error"))
    result = CliRunner().invoke(cli.main, ["boom", f"{cls.__module__}.{cls.__name__}"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "the first part and the second part" in lines[0]


def test_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "boom", (__name__, "boom", "raises an error"))
    result = CliRunner().invoke(cli.main, ["boom", "builtins.KeyError"])
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)


def _run(*args: str):
    return CliRunner().invoke(cli.main, list(args))


def _one_error_line(result) -> str:
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


def test_real_commands_end_in_one_line(tmp_path, exported_model, fmnist_small):
    """Bad input found while working ends in one line and exit status 1."""
    image = tmp_path / "a.png"
    image.write_bytes(b"not read: the model is checked first")
    missing = _run("embed", str(tmp_path / "no-model"), str(image), "--out",
                   str(tmp_path / "f.npy"))
    assert missing.exit_code == 1 and missing.output.count("\n") == 1, missing.output
    assert "model folder not found" in _one_error_line(missing)

    model = tmp_path / "model"
    model.mkdir()
    (model / "description.json").write_text("{ not json")
    corrupt = _run("embed", str(model), str(image), "--out", str(tmp_path / "f.npy"))
    assert corrupt.exit_code == 1 and corrupt.output.count("\n") == 1, corrupt.output

    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "probe.json").write_text("{ not json")
    (probe / "probe.npz").write_bytes(b"PK")
    bad_probe = _run("probe", "predict", exported_model(fmnist_small), str(probe), str(image),
                     "--out", str(tmp_path / "p.jsonl"))
    assert bad_probe.exit_code == 1 and bad_probe.output.count("\n") == 1, bad_probe.output
    assert "probe.json: not valid JSON" in _one_error_line(bad_probe)


def test_bad_arguments_end_in_one_error_line(tmp_path):
    """A bad argument (a dataset spec, an export input) is click's usage error: the usage hint,
    then one 'Error:' line naming the argument, and exit status 2, as before the redesign."""
    spec = _run("embed", str(tmp_path), "emoji:styles=bogus", "--out", str(tmp_path / "f.npy"))
    assert spec.exit_code == 2
    assert "styles='bogus' must be google, twitter or google+twitter" in _one_error_line(spec)

    run = tmp_path / "run"
    run.mkdir()
    (run / "description.json").write_text(json.dumps({"format_version": 99}))
    export = _run("export", str(run), "--out", str(tmp_path / "m"))
    assert export.exit_code == 2 and "description.json" in _one_error_line(export)
    assert not (tmp_path / "m").exists()
