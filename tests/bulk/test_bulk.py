"""Bulk jobs (runtime/bulk): Parquet shards + manifest, resume after kill -9, tables, WebDataset
tars, paths that try to leave their folder, probe columns, and the Ray Data engine with an actor
killed. Real digits images, a real exported small CNN, real onnxruntime sessions."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from runtime.bulk.output import MANIFEST, read_output
from tests.bulk.common import embed, wait_for_shards
from tests.conftest import ROOT

pytest.importorskip("pyarrow")


def test_folder_to_shards_equals_library_rows(model_dir, pipe, digits_small, digit_paths,
                                              tmp_path):
    out = str(tmp_path / "feats")
    result = embed(model_dir, digits_small, "--out", out, "--shard-size", "64")
    assert result.exit_code == 0, result.output
    manifest = json.load(open(os.path.join(out, MANIFEST)))
    assert manifest["finished"] and manifest["rows"] == 300 and manifest["shard_size"] == 64
    assert [s["rows"] for _, s in sorted(manifest["shards"].items(), key=lambda kv: int(kv[0]))
            ] == [64, 64, 64, 64, 44]
    assert manifest["model"]["dim"] == pipe.feature_dim_
    ids, vectors, errors, _ = read_output(out)
    assert ids == digit_paths and errors == {}
    expected = pipe.embed(digit_paths)
    np.testing.assert_allclose(vectors, expected.vectors, rtol=0, atol=1e-6)
    assert "300 rows" in result.output and "5 shards written" in result.output
    assert "(300 new, 0 changed)" in result.output

    # the same command again: nothing to do, and it says so
    again = embed(model_dir, digits_small, "--out", out, "--shard-size", "64")
    assert again.exit_code == 0, again.output
    assert "embedded 0/0 images" in again.output and "kept 300 unchanged rows" in again.output
    assert read_output(out)[0] == digit_paths
    # another job into the same folder is refused, and --overwrite replaces it
    other = embed(model_dir, digit_paths[0], "--out", out, "--shard-size", "64")
    assert other.exit_code != 0 and "another job's shards" in other.output
    with open(os.path.join(out, "keep.parquet"), "wb") as f:  # not ours: left alone
        f.write(b"user data")
    replaced = embed(model_dir, digit_paths[0], "--out", out, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert read_output(out)[0] == [digit_paths[0]]
    assert sorted(os.listdir(out)) == ["_lock", MANIFEST, "keep.parquet",
                                       "shard-000000.parquet"]


def _tar_bytes(paths, prefix="s"):
    """A WebDataset tar in memory (key NNNN: NNNN.png + NNNN.cls) and each sample's offset."""
    buf = io.BytesIO()
    offsets = []
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, path in enumerate(paths):
            offsets.append(buf.tell())
            for name, data in ((f"{prefix}/{i:04d}.png", _png_bytes(path)),
                               (f"{prefix}/{i:04d}.cls", str(i % 10).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), offsets


def _feed_pipe(fifo, data, stop=None):
    """Write `data` into the named pipe `fifo` from a thread; with `stop` (an Event), keep the
    pipe open after writing until it is set, as a slow producer would."""
    def run():
        try:
            with open(fifo, "wb") as f:
                f.write(data)
                f.flush()
                if stop is not None:
                    stop.wait(120)
        except BrokenPipeError:  # the reader was killed
            pass
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_kill_9_then_resume(model_dir, pipe, digit_paths, tmp_path):
    """A job killed with SIGKILL mid-way resumes: every input exactly once, in input order.

    The 200 images come as a WebDataset tar on a named pipe whose writer stops after 100
    samples, so the job has written some shards of 16 and waits for more when it is killed;
    the rerun gets the whole tar again and must skip the complete shards."""
    data, offsets = _tar_bytes(digit_paths[:200])
    fifo = str(tmp_path / "stream.tar")
    os.mkfifo(fifo)
    out = str(tmp_path / "out")
    cmd = [sys.executable, os.path.join(ROOT, "cli.py"), "embed", model_dir, fifo,
           "--out", out, "--shard-size", "16", "--batch-size", "8", "--device", "cpu"]
    stop = threading.Event()
    writer = _feed_pipe(fifo, data[:offsets[100]], stop)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_shards(proc, out, 1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
        writer.join(30)
    assert proc.returncode == -signal.SIGKILL
    written = json.load(open(os.path.join(out, MANIFEST)))
    assert not written["finished"] and 1 <= len(written["shards"]) <= 6

    writer = _feed_pipe(fifo, data)
    try:
        rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        writer.join(30)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    skipped = len(written["shards"])
    assert f"kept {16 * skipped} unchanged rows" in rerun.stderr
    assert f"({200 - 16 * skipped} new, 0 changed)" in rerun.stderr
    ids, vectors, errors, _ = read_output(out)
    expected_ids = [f"stream.tar/s/{i:04d}" for i in range(200)]
    assert ids == expected_ids and len(set(ids)) == 200 and errors == {}
    expected = pipe.embed([_png_bytes(p) for p in digit_paths[:200]]).vectors
    np.testing.assert_allclose(vectors, expected, rtol=0, atol=1e-6)


def _png_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def test_webdataset_tar_input(model_dir, pipe, digit_paths, tmp_path):
    tar_path = tmp_path / "shard-0001.tar"
    with tarfile.open(tar_path, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for i in range(20):
            add(f"s/{i:04d}.png", _png_bytes(digit_paths[i]))
            add(f"s/{i:04d}.cls", str(i % 10).encode())
        add("../evil.png", _png_bytes(digit_paths[0]))   # escapes: refused, not read
        add("s/label-only.cls", b"3")                    # no image in this sample
    out = str(tmp_path / "out")
    result = embed(model_dir, str(tar_path), "--out", out, "--shard-size", "8")
    assert result.exit_code == 0, result.output
    ids, vectors, errors, _ = read_output(out)
    assert ids == [f"shard-0001.tar/s/{i:04d}" for i in range(20)] + [
        "shard-0001.tar/../evil", "shard-0001.tar/s/label-only"]
    assert sorted(errors) == [20, 21]
    assert "leaves the archive" in errors[20] and "no image member" in errors[21]
    assert np.isnan(vectors[20:]).all()
    expected = pipe.embed([_png_bytes(p) for p in digit_paths[:20]]).vectors
    np.testing.assert_allclose(vectors[:20], expected, rtol=0, atol=1e-6)


def test_parquet_bytes_column_input(model_dir, pipe, digit_paths, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    data = [_png_bytes(p) for p in digit_paths[:30]] + [b"not an image", None]
    keys = [f"img{i}" for i in range(32)]
    pq.write_table(pa.table({"key": keys, "jpg": pa.array(data, pa.binary())}),
                   tmp_path / "t.parquet")
    out = str(tmp_path / "out")
    result = embed(model_dir, str(tmp_path / "t.parquet"), "--out", out, "--shard-size", "10")
    assert result.exit_code == 0, result.output
    ids, vectors, errors, _ = read_output(out)
    assert ids == keys and sorted(errors) == [30, 31]
    assert errors[30].startswith("img30") and "null" in errors[31]
    expected = pipe.embed(data[:30]).vectors
    np.testing.assert_allclose(vectors[:30], expected, rtol=0, atol=1e-6)


def test_csv_path_column_refuses_escaping_paths(model_dir, pipe, digit_paths, tmp_path):
    """Relative paths are read from the table's folder; absolute ones and ones that climb out
    of it fail their row only (the policy in runtime/bulk/sources.py)."""
    table_dir = tmp_path / "catalog"
    (table_dir / "img").mkdir(parents=True)
    rows = []
    for i, path in enumerate(digit_paths[:12]):
        shutil.copy(path, table_dir / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{i % 10}")
    outside = tmp_path / "outside.png"
    shutil.copy(digit_paths[12], outside)
    rows += [f"{outside},1", "../outside.png,2", "img/missing.png,3"]
    (table_dir / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    out = str(tmp_path / "out")
    result = embed(model_dir, str(table_dir / "list.csv"), "--out", out)
    assert result.exit_code == 0, result.output
    ids, vectors, errors, _ = read_output(out)
    assert ids == [r.split(",")[0] for r in rows]
    assert sorted(errors) == [12, 13, 14]
    assert "absolute path" in errors[12] and "leaves" in errors[13]
    assert "missing.png" in errors[14]
    expected = pipe.embed([str(table_dir / "img" / f"{i}.png") for i in range(12)]).vectors
    np.testing.assert_allclose(vectors[:12], expected, rtol=0, atol=1e-6)
    # a named column that is not there: a clear usage error, nothing written
    bad = embed(model_dir, str(table_dir / "list.csv"), "--out", str(tmp_path / "o2"),
                 "--column", "file")
    assert bad.exit_code == 2 and "no column 'file'" in bad.output


def test_probe_predict_to_shards(model_dir, pipe, digits_small, digit_paths, tmp_path):
    from common.data import load_dataset
    from runtime.probes import LogisticRegressionProbe, save_probe
    data = load_dataset(digits_small)
    train = pipe.embed(data.paths("train"))
    probe = LogisticRegressionProbe(C=1.0).fit(train.vectors, data.labels("train"))
    probe_dir = str(tmp_path / "digits")
    save_probe(probe, probe_dir)
    out = str(tmp_path / "preds")
    result = CliRunner().invoke(cli.main, ["probe", "predict", model_dir, probe_dir,
                                           digits_small, "--out", out, "--device", "cpu",
                                           "--shard-size", "100"])
    assert result.exit_code == 0, result.output
    ids, vectors, errors, extra = read_output(out)
    assert ids == digit_paths and errors == {}
    assert sorted(extra) == ["digits_label", "digits_score"]
    expected = pipe.embed(digit_paths).vectors
    assert extra["digits_label"] == [str(c) for c in probe.predict(expected)]
    np.testing.assert_allclose(extra["digits_score"],
                               probe.predict_proba(expected).max(axis=1), atol=1e-5)


@pytest.mark.slow
def test_ray_engine_survives_a_killed_actor(model_dir, pipe, digit_paths, tmp_path):
    """Two actors on a local Ray instance; one is SIGKILLed after the first shard is written.
    Ray restarts it and retries its tasks, and the output still has every input once."""
    pytest.importorskip("ray")
    from runtime.bulk.job import run_job
    from runtime.bulk.ray_engine import RayEngine
    from runtime.bulk.sources import ItemsSource
    from runtime.cli.bulk import model_identity

    model, _ = model_identity(model_dir, "fp32")
    source = ItemsSource([(p, p) for p in digit_paths], "digits")
    killed = []
    out = str(tmp_path / "out")
    with RayEngine(model_dir, {"device": "cpu", "batch_size": 4}, actors=2, num_cpus=2,
                   cpus_per_actor=1) as engine:
        def kill_one(index):
            if not killed:  # an actor process that has returned rows, so surely alive
                pid = min(engine.actor_pids_)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

        summary = run_job(source, out, engine, dim=model["dim"], model=model, shard_size=8,
                          on_shard=kill_one)
    assert killed
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0], 0)
    assert summary.total == 300 and summary.failed == 0
    ids, vectors, errors, _ = read_output(out)
    assert ids == digit_paths and len(set(ids)) == 300 and errors == {}
    np.testing.assert_allclose(vectors, pipe.embed(digit_paths).vectors, rtol=0, atol=1e-6)


def test_renamed_file_is_new_and_the_old_row_kept_until_pruned(model_dir, pipe, digit_paths,
                                                                tmp_path):
    """Same folder, a file renamed: the new name is embedded, the old row is reported as gone
    and kept; --prune removes it."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, path in enumerate(digit_paths[:40]):
        shutil.copy(path, folder / f"{i:04d}.png")
    out = str(tmp_path / "out")
    first = embed(model_dir, str(folder), "--out", out, "--shard-size", "16")
    assert first.exit_code == 0, first.output
    os.rename(folder / "0000.png", folder / "0000b.png")
    again = embed(model_dir, str(folder), "--out", out, "--shard-size", "16")
    assert again.exit_code == 0, again.output
    assert "(1 new, 0 changed)" in again.output and "kept 39 unchanged rows" in again.output
    assert "1 rows have no input any more" in again.output and "--prune" in again.output
    ids = read_output(out)[0]
    assert len(ids) == 41 and str(folder / "0000.png") in ids and str(folder / "0000b.png") in ids
    pruned = embed(model_dir, str(folder), "--out", out, "--shard-size", "16", "--prune")
    assert pruned.exit_code == 0, pruned.output
    assert "1 inputs gone: 1 rows removed" in pruned.output
    ids, vectors, errors, _ = read_output(out)
    assert sorted(ids) == sorted(str(p) for p in folder.iterdir()) and errors == {}
    by_id = dict(zip(ids, vectors))
    np.testing.assert_allclose(by_id[str(folder / "0000b.png")],
                               pipe.embed([str(folder / "0000b.png")]).vectors[0], atol=1e-6)
