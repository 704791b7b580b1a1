"""Bulk outputs as a data product (runtime/bulk): incremental reruns, changed inputs, damaged
shards, one writer per folder, a full disk, the progress bar, and the folder read as one dataset
by pandas, pyarrow, polars and DuckDB. Real digits images, a real exported small CNN, real
onnxruntime sessions; every damaged file is made here."""
import fcntl
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from common.files import iter_image_files
from runtime.bulk.output import MANIFEST, read_output
from tests.bulk.common import embed

pytest.importorskip("pyarrow")


def _folder(path, sources, names):
    path.mkdir(exist_ok=True)
    for src, name in zip(sources, names):
        shutil.copy(src, path / name)
    return path


def _rows(out):
    """{id: (embedding, error, input_stamp)} of an output folder, read shard by shard."""
    import pyarrow.parquet as pq
    manifest = json.load(open(os.path.join(out, MANIFEST)))
    rows = {}
    for info in manifest["shards"].values():
        t = pq.read_table(os.path.join(out, info["file"])).to_pydict()
        for i, item_id in enumerate(t["id"]):
            assert item_id not in rows, f"id {item_id} twice"
            rows[item_id] = (np.asarray(t["embedding"][i], np.float32), t["error"][i],
                             t["input_stamp"][i])
    return rows


def _assert_same_rows(out, clean):
    got, want = _rows(out), _rows(clean)
    assert sorted(got) == sorted(want)
    for item_id, (vector, error, stamp) in want.items():
        np.testing.assert_allclose(got[item_id][0], vector, rtol=0, atol=1e-6)
        assert got[item_id][1:] == (error, stamp), item_id


def _job(model_dir, pipe, source, out, *, seen=None, **kwargs):
    """run_job through the local engine; `seen` (a list) records every id sent to the model."""
    from runtime.bulk.job import pipeline_engine, run_job
    from runtime.cli.bulk import model_identity
    model, description = model_identity(model_dir, "fp32")
    inner = pipeline_engine(pipe)

    def engine(stream):
        def tap():
            for seq, item_id, item in stream:
                if seen is not None:
                    seen.append(item_id)
                yield seq, item_id, item
        return inner(tap())
    return run_job(source, str(out), engine, dim=model["dim"], model=model,
                   description=description.to_dict(), **kwargs)


def test_files_added_in_the_middle_are_the_only_ones_embedded(model_dir, pipe, digit_paths,
                                                              tmp_path):
    """40 files named 0000, 0002, ...; then 10 odd names sorting between them. The rerun sends
    only those 10 to the model and ends with the rows of a clean run of the 50."""
    from runtime.bulk.sources import FolderSource
    folder = _folder(tmp_path / "imgs", digit_paths[:40], [f"{2 * i:04d}.png" for i in range(40)])
    out = tmp_path / "out"
    first = _job(model_dir, pipe, FolderSource(str(folder)), out, shard_size=16)
    assert (first.added, first.kept, first.total) == (40, 0, 40)
    new = [f"{2 * i + 1:04d}.png" for i in range(10)]
    _folder(folder, digit_paths[100:110], new)
    seen: list[str] = []
    second = _job(model_dir, pipe, FolderSource(str(folder)), out, shard_size=16, seen=seen)
    assert seen == [str(folder / n) for n in new]
    assert (second.added, second.changed, second.kept, second.images, second.total) == (
        10, 0, 40, 10, 50)
    clean = tmp_path / "clean"
    _job(model_dir, pipe, FolderSource(str(folder)), clean, shard_size=16)
    _assert_same_rows(out, clean)
    manifest = json.load(open(out / MANIFEST))
    assert manifest["last_run"]["added"] == 10 and manifest["rows"] == 50
    assert manifest["inputs"]["files"] == 50 and manifest["inputs"]["bytes"] == sum(
        os.path.getsize(p) for p in iter_image_files(str(folder)))


@pytest.mark.parametrize("kind", ["folder", "list", "csv"])
def test_changed_content_under_the_same_name_is_embedded_again(kind, model_dir, pipe,
                                                               digit_paths, tmp_path):
    folder = _folder(tmp_path / "imgs", digit_paths[:20], [f"{i:04d}.png" for i in range(20)])
    if kind == "folder":
        arg = str(folder)
    elif kind == "list":
        arg = str(tmp_path / "list.txt")
        (tmp_path / "list.txt").write_text("".join(f"imgs/{i:04d}.png\n" for i in range(20)))
    else:
        arg = str(tmp_path / "list.csv")
        (tmp_path / "list.csv").write_text("path\n" + "".join(f"imgs/{i:04d}.png\n"
                                                                for i in range(20)))
    out = str(tmp_path / "out")
    assert embed(model_dir, arg, "--out", out, "--shard-size", "8").exit_code == 0
    target = folder / "0005.png"
    before = os.stat(target)
    shutil.copy(digit_paths[200], target)  # other content, same name
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns + 2_000_000_000))
    again = embed(model_dir, arg, "--out", out, "--shard-size", "8")
    assert again.exit_code == 0, again.output
    assert "embedded 1/1 images (0 new, 1 changed)" in again.output
    assert "kept 19 unchanged rows" in again.output
    ids, vectors, errors, _ = read_output(out)
    assert len(ids) == len(set(ids)) == 20 and errors == {}
    row = next(i for i, item_id in enumerate(ids) if item_id.endswith("0005.png"))
    np.testing.assert_allclose(vectors[row], pipe.embed([str(target)]).vectors[0], atol=1e-6)


def test_damaged_shards_are_redone_and_manifest_names_cannot_escape(model_dir, digit_paths,
                                                                    tmp_path):
    """One shard truncated, one overwritten with garbage of the same size, one deleted, and a
    manifest entry naming a file outside the folder: the rerun reports each, embeds their
    inputs again, never touches the outside file, and ends like a clean run."""
    folder = str(_folder(tmp_path / "imgs", digit_paths[:40], [f"{i:04d}.png" for i in range(40)]))
    out, clean = tmp_path / "out", tmp_path / "clean"
    for target in (out, clean):
        assert embed(model_dir, folder, "--out", str(target), "--shard-size", "10").exit_code == 0
    manifest = json.load(open(out / MANIFEST))
    files = [manifest["shards"][k]["file"] for k in sorted(manifest["shards"], key=int)]
    assert len(files) == 4
    with open(out / files[0], "r+b") as f:
        f.truncate(os.path.getsize(out / files[0]) // 2)
    size = os.path.getsize(out / files[1])
    (out / files[1]).write_bytes(os.urandom(size))
    os.unlink(out / files[2])
    victim = tmp_path / "victim.parquet"
    victim.write_bytes(b"not yours")
    manifest["shards"]["9"] = {**manifest["shards"]["3"], "file": "../victim.parquet"}
    (out / MANIFEST).write_text(json.dumps(manifest))

    again = embed(model_dir, folder, "--out", str(out), "--shard-size", "10")
    assert again.exit_code == 0, again.output
    text = again.output
    assert f"({files[0]!r}) has " in text and "bytes, not the" in text          # truncated
    assert f"({files[1]!r}) does not hold the bytes written" in text            # garbage
    assert f"({files[2]!r}) is missing" in text                                # deleted
    assert "'../victim.parquet', not shard-000009.parquet" in text            # escape
    assert "embedded 30/30 images (30 new, 0 changed)" in text and "kept 10 unchanged" in text
    assert "4 damaged shards redone" in text
    assert victim.read_bytes() == b"not yours"
    _assert_same_rows(str(out), str(clean))
    assert len(read_output(str(out))[0]) == 40


def test_the_folder_reads_as_one_dataset(model_dir, digits_small, digit_paths, tmp_path):
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.parquet as pq
    out = str(tmp_path / "feats")
    result = embed(model_dir, digits_small, "--out", out, "--shard-size", "64")
    assert result.exit_code == 0, result.output
    ids, vectors, _, _ = read_output(out)
    manifest = json.load(open(os.path.join(out, MANIFEST)))

    frame = pd.read_parquet(out)
    assert sorted(frame["id"]) == sorted(ids) and list(frame.columns) == [
        "id", "embedding", "error", "input_stamp"]
    table = pq.read_table(out)
    assert table.num_rows == 300
    assert table.schema.field("embedding").type.list_size == vectors.shape[1]
    polars_frame = pl.read_parquet(os.path.join(out, "*.parquet"))
    assert polars_frame.height == 300 and set(polars_frame["id"]) == set(ids)
    con = duckdb.connect()
    n, distinct, nulls = con.execute(
        f"SELECT count(*), count(DISTINCT id), count(error) FROM '{out}/*.parquet'").fetchone()
    assert (n, distinct, nulls) == (300, 300, 0)
    first = con.execute(f"SELECT embedding FROM '{out}/*.parquet' WHERE id = ?",
                        [ids[7]]).fetchone()[0]
    np.testing.assert_allclose(np.asarray(first, np.float32), vectors[7], rtol=0, atol=0)

    for info in manifest["shards"].values():
        meta = pq.read_schema(os.path.join(out, info["file"])).metadata
        assert json.loads(meta[b"unirep.model"]) == manifest["model"]
        assert json.loads(meta[b"unirep.description"])["feature_dim"] == vectors.shape[1]
        assert meta[b"unirep.format"] == b"unirep-bulk/2"


def test_a_second_job_is_refused_and_a_dead_ones_lock_taken_over(model_dir, pipe, digit_paths,
                                                                 tmp_path):
    folder = str(_folder(tmp_path / "imgs", digit_paths[:10], [f"{i}.png" for i in range(10)]))
    out = tmp_path / "out"
    out.mkdir()
    lock = str(out / "_lock")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys\n"
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, str(os.getpid()).encode())\n"
         "print('locked', flush=True)\nsys.stdin.read()\n", lock],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        refused = embed(model_dir, folder, "--out", str(out))
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
        holder.stdout.close()
    assert refused.exit_code == 1
    lines = [line for line in refused.output.splitlines() if line.startswith("Error")]
    assert lines == [f"Error: {out} is being written by another job (process {holder.pid}); "
                     f"wait for it to finish or stop it, or choose another --out"]
    assert not os.path.exists(out / MANIFEST)
    # the holder is gone: its pid is still in the file, but the lock went with it
    assert open(lock).read() == str(holder.pid)
    done = embed(model_dir, folder, "--out", str(out))
    assert done.exit_code == 0, done.output
    assert len(read_output(str(out))[0]) == 10
    # in one process too: a held lock refuses a second holder, and run_job with it
    from runtime.bulk.lock import BusyError, OutputLock
    from runtime.bulk.sources import FolderSource
    with OutputLock(str(out)):
        with pytest.raises(BusyError):
            OutputLock(str(out)).__enter__()
        with pytest.raises(BusyError, match="being written by another job"):
            _job(model_dir, None, FolderSource(folder), out)
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released after each job
    finally:
        os.close(fd)


def test_a_full_disk_is_one_line_and_the_resume_completes(model_dir, digit_paths, tmp_path):
    """A 64 KiB tmpfs fills up after a few shards: one line, exit 1; with room again the same
    command completes the job (skipped where tmpfs cannot be mounted)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                             capture_output=True, timeout=60)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        folder = str(_folder(tmp_path / "imgs", digit_paths[:120],
                             [f"{i:04d}.png" for i in range(120)]))
        out = str(mnt / "feats")
        full = embed(model_dir, folder, "--out", out, "--shard-size", "8")
        assert full.exit_code == 1, full.output
        assert "Traceback" not in full.output and "Errno" not in full.output
        errors = [line for line in full.output.splitlines() if line.startswith("Error")]
        assert len(errors) == 1 and "the disk is full" in errors[0], full.output
        assert "run the same command again to resume" in errors[0]
        subprocess.run(["mount", "-o", "remount,size=16m", str(mnt)], check=True, timeout=60)
        again = embed(model_dir, folder, "--out", out, "--shard-size", "8")
        assert again.exit_code == 0, again.output
        clean = str(tmp_path / "clean")
        assert embed(model_dir, folder, "--out", clean, "--shard-size", "8").exit_code == 0
        _assert_same_rows(out, clean)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=60)


def test_killed_mid_update_resumes_to_the_rows_of_a_clean_run(model_dir, pipe, digit_paths,
                                                              tmp_path):
    """An update dies twice: after its first new shard, then just before it drops the old row
    of a changed file (so that id is in two shards). The next run keeps the newer row."""
    from runtime.bulk.sources import FolderSource
    from runtime.bulk.writer import ShardWriter
    folder = _folder(tmp_path / "imgs", digit_paths[:30], [f"{i:04d}.png" for i in range(30)])
    out = tmp_path / "out"
    _job(model_dir, pipe, FolderSource(str(folder)), out, shard_size=8)
    _folder(folder, digit_paths[50:70], [f"n{i:04d}.png" for i in range(20)])
    target = folder / "0003.png"
    before = os.stat(target)
    shutil.copy(digit_paths[250], target)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns + 2_000_000_000))

    def die(index):
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError, match="killed"):
        _job(model_dir, pipe, FolderSource(str(folder)), out, shard_size=8, on_shard=die)
    original = ShardWriter.rewrite
    try:
        ShardWriter.rewrite = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            _job(model_dir, pipe, FolderSource(str(folder)), out, shard_size=8)
    finally:
        ShardWriter.rewrite = original
    listed = [item_id for item_id in read_output(str(out))[0]]
    assert listed.count(str(target)) == 2  # the old row and the new one
    last = _job(model_dir, pipe, FolderSource(str(folder)), out, shard_size=8)
    assert last.images == 0 and last.total == 50
    clean = tmp_path / "clean"
    _job(model_dir, pipe, FolderSource(str(folder)), clean, shard_size=8)
    _assert_same_rows(str(out), str(clean))


def test_the_progress_bar_has_a_total_for_a_folder(model_dir, pipe, digit_paths, tmp_path):
    from runtime.bulk.sources import FolderSource
    folder = _folder(tmp_path / "imgs", digit_paths[:24], [f"{i:04d}.png" for i in range(24)])
    assert FolderSource(str(folder)).estimate() == 24 and FolderSource(str(folder)).count() is None
    bar = io.StringIO()
    _job(model_dir, pipe, FolderSource(str(folder)), tmp_path / "out", shard_size=8,
         progress=True, bar_file=bar)
    assert "24/24" in bar.getvalue()
    _folder(folder, digit_paths[30:36], [f"x{i}.png" for i in range(6)])
    bar = io.StringIO()
    _job(model_dir, pipe, FolderSource(str(folder)), tmp_path / "out", shard_size=8,
         progress=True, bar_file=bar)
    assert "6/6" in bar.getvalue()  # this run's work: the kept rows are not in the total


def test_small_updates_do_not_pile_up_tiny_shards(model_dir, pipe, digit_paths, tmp_path):
    """Nightly updates of a few files each: shards under half the shard size are merged (two
    or more at a time, at most a shard's worth), and the rows stay those of a clean run."""
    from runtime.bulk.sources import FolderSource
    folder = _folder(tmp_path / "imgs", digit_paths[:32], [f"{i:04d}.png" for i in range(32)])
    out = tmp_path / "out"
    _job(model_dir, pipe, FolderSource(str(folder)), out, shard_size=16)
    sizes = []
    for night in range(5):
        _folder(folder, digit_paths[40 + 3 * night:43 + 3 * night],
                [f"{night}-{i}.png" for i in range(3)])
        summary = _job(model_dir, pipe, FolderSource(str(folder)), out, shard_size=16)
        assert (summary.added, summary.kept) == (3, 32 + 3 * night)
        shards = json.load(open(out / MANIFEST))["shards"]
        sizes.append(sorted(info["rows"] for info in shards.values()))
    assert sizes == [[3, 16, 16], [6, 16, 16], [9, 16, 16], [3, 9, 16, 16], [6, 9, 16, 16]]
    clean = tmp_path / "clean"
    _job(model_dir, pipe, FolderSource(str(folder)), clean, shard_size=16)
    _assert_same_rows(str(out), str(clean))
