"""Outputs honour the umask (common/atomic.py): under umask 022 every file the project writes is
0644 and every folder 0755, whatever kind of output: an exported model folder, bulk shards and
their manifest, an evaluation report (and its embedding cache), a Triton model repository. Under
another umask (027) the modes follow it, so they come from the umask, not from a constant."""
import os
import stat

import numpy as np
import pytest

from common.atomic import atomic_open, build_folder_once, make_temp_dir, replace_folder


@pytest.fixture()
def umask():
    """Set the process umask for one test, and put the old one back."""
    old = os.umask(0o022)
    try:
        yield lambda mask: os.umask(mask)
    finally:
        os.umask(old)


def _modes(root):
    """{relative path: mode bits} of `root` and everything under it (links not followed)."""
    found = {".": stat.S_IMODE(os.lstat(root).st_mode)}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = stat.S_IMODE(os.lstat(path).st_mode)
    return found


def _assert_modes(root, *, file_mode=0o644, folder_mode=0o755, skip=()):
    modes = _modes(root)
    assert len(modes) > 1, f"{root} is empty"
    for rel, mode in modes.items():
        if rel in skip:
            continue
        path = os.path.join(root, rel)
        want = folder_mode if os.path.isdir(path) else file_mode
        if os.path.isfile(path) and mode & 0o111:
            want = folder_mode  # a file made executable on purpose keeps x for all (none here)
        assert mode == want, f"{rel}: {oct(mode)}, expected {oct(want)}"


def test_atomic_writes_follow_the_umask(umask, tmp_path):
    for mask, file_mode, folder_mode in ((0o022, 0o644, 0o755), (0o027, 0o640, 0o750),
                                         (0o077, 0o600, 0o700)):
        umask(mask)
        base = tmp_path / f"m{mask:o}"
        with atomic_open(str(base / "a.json"), "w") as f:
            f.write("{}")
        tmp = make_temp_dir(str(base), tag="built")
        with atomic_open(os.path.join(tmp, "inner.bin"), "wb") as f:
            f.write(b"x")
        replace_folder(tmp, str(base / "folder"))
        build_folder_once(str(base / "cache"), lambda d: open(os.path.join(d, "done"), "w")
                          .close(), "done")
        assert stat.S_IMODE(os.stat(base / "a.json").st_mode) == file_mode
        assert stat.S_IMODE(os.stat(base / "folder").st_mode) == folder_mode
        assert stat.S_IMODE(os.stat(base / "folder" / "inner.bin").st_mode) == file_mode
        assert stat.S_IMODE(os.stat(base / "cache").st_mode) == folder_mode


@pytest.fixture(scope="module")
def model_under_022(tmp_path_factory, fmnist_small):
    """A small CNN exported by the export stage while the umask is 022."""
    from export.onnx_export import export_runs
    from train.runs import untrained_run
    old = os.umask(0o022)
    try:
        base = tmp_path_factory.mktemp("modes")
        run = str(base / "runs" / "model")
        untrained_run("small_cnn", run, heads=[("specific", [f"c{i}" for i in range(10)])])
        export_runs([run], str(base / "model"), parity_images=2, check_data=fmnist_small)
    finally:
        os.umask(old)
    return str(base / "model"), run


@pytest.mark.slow
def test_a_model_folder_and_its_run(model_under_022):
    model_dir, run = model_under_022
    _assert_modes(model_dir)
    _assert_modes(run)


@pytest.mark.slow
def test_bulk_shards_manifest_and_lock(umask, model_under_022, digits_small, tmp_path):
    from click.testing import CliRunner

    import cli
    out = tmp_path / "feats"
    result = CliRunner().invoke(cli.main, ["embed", model_under_022[0], digits_small, "--out",
                                           str(out), "--shard-size", "100", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == ["_lock", "_manifest.json", "shard-000000.parquet",
                                       "shard-000001.parquet", "shard-000002.parquet"]
    _assert_modes(str(out))


@pytest.mark.slow
def test_an_evaluation_report_and_its_cache(umask, model_under_022, digits_small, tmp_path):
    from runtime.evaluation import evaluate_models
    out, cache = tmp_path / "report", tmp_path / "cache"
    evaluate_models([model_under_022[0]], [digits_small], str(out), cache_dir=str(cache),
                    probe_params={"Cs": np.logspace(-2, 2, 3), "refine": 0}, progress=False)
    assert {"report.json", "report.md", "report.png"} <= set(os.listdir(out))
    _assert_modes(str(out))
    _assert_modes(str(cache))


@pytest.mark.slow
def test_a_triton_repository(umask, model_under_022, tmp_path):
    from export.triton import write_triton_repository
    repo = tmp_path / "triton"
    write_triton_repository(model_under_022[0], str(repo))
    _assert_modes(str(repo))
