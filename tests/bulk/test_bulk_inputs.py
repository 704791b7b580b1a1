"""Hostile bulk inputs (runtime/bulk/sources.py and the job's id rule): tars cut short, a CSV
path that a symbolic link takes out of the table's folder, ids repeated in a list file and in a
tar, and Ctrl-C in the middle of a job. Every input is made here from real digits images."""
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

from runtime.bulk.output import MANIFEST, read_output
from runtime.bulk.sources import BadItem, TableSource, TarSource
from tests.bulk.common import embed, wait_for_shards
from tests.conftest import ROOT

pytest.importorskip("pyarrow")


def _tar(paths, keys=None):
    """A WebDataset tar (KEY.png + KEY.cls per sample) in memory, and each member's end."""
    buf = io.BytesIO()
    ends = []
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, path in enumerate(paths):
            key = keys[i] if keys else f"{i:04d}"
            for name, data in ((f"{key}.png", open(path, "rb").read()),
                               (f"{key}.cls", str(i % 10).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                ends.append(buf.tell())  # header + data, padded to 512
    return buf.getvalue(), ends


@pytest.mark.parametrize("where", ["inside an image", "inside a header", "between members"])
def test_a_truncated_tar_says_truncated(where, digit_paths, tmp_path):
    data, ends = _tar(digit_paths[:6])
    # ends[3]: the end of sample 0001; 0002.png's header follows, then its (>100 byte) data
    cut = {"inside an image": ends[3] + 512 + 60,
           "inside a header": ends[3] + 100,
           "between members": ends[5]}[where]        # after 0002.cls: no end-of-archive blocks
    path = tmp_path / "cut.tar"
    path.write_bytes(data[:cut])
    items = list(TarSource(str(path)))
    ids = [i for i, _ in items]
    bad = {i: item.message for i, item in items if isinstance(item, BadItem)}
    assert ids[:2] == ["cut.tar/0000", "cut.tar/0001"] and ids[-1] == "cut.tar/#corrupt"
    assert all(isinstance(item, bytes) for _, item in items[:2])
    assert "truncated archive" in bad["cut.tar/#corrupt"]
    assert not any("no image member" in m for m in bad.values()), bad
    if where == "inside an image":
        assert ids == ["cut.tar/0000", "cut.tar/0001", "cut.tar/0002", "cut.tar/#corrupt"]
        assert "truncated archive" in bad["cut.tar/0002"]
    # the whole tar is read without a word of truncation
    path.write_bytes(data)
    assert [i for i, _ in TarSource(str(path))] == [f"cut.tar/{i:04d}" for i in range(6)]


def test_a_csv_path_through_a_link_out_of_the_folder_is_refused(digit_paths, tmp_path):
    table_dir = tmp_path / "catalog"
    (table_dir / "img").mkdir(parents=True)
    shutil.copy(digit_paths[0], table_dir / "img" / "0.png")
    outside = tmp_path / "private"
    outside.mkdir()
    shutil.copy(digit_paths[1], outside / "secret.png")
    os.symlink(outside, table_dir / "img" / "door")                # a folder link out
    os.symlink(outside / "secret.png", table_dir / "img" / "s.png")  # a file link out
    os.symlink(table_dir / "img" / "0.png", table_dir / "inside.png")  # a link that stays in
    (table_dir / "list.csv").write_text(
        "path\nimg/0.png\nimg/door/secret.png\nimg/s.png\ninside.png\n")
    items = list(TableSource(str(table_dir / "list.csv")))
    assert [i for i, _ in items] == ["img/0.png", "img/door/secret.png", "img/s.png",
                                     "inside.png"]
    assert items[0][1] == str(table_dir / "img" / "0.png")
    assert items[3][1] == str(table_dir / "inside.png")
    for _, item in items[1:3]:
        assert isinstance(item, BadItem) and "symbolic link; refused" in item.message


def test_repeated_ids_keep_their_first_occurrence(model_dir, digit_paths, tmp_path):
    """The rule (README, Bulk jobs): ids are unique in an output; a later input with an id seen
    before is skipped with a warning, whether a path repeated in a list file or a key repeated
    non-adjacently in a tar."""
    from runtime import FeaturePipeline
    paths = digit_paths[:5]
    (tmp_path / "list.txt").write_text("\n".join(paths + [paths[1], paths[3], paths[1]]) + "\n")
    out = str(tmp_path / "out")
    result = embed(model_dir, str(tmp_path / "list.txt"), "--out", out)
    assert result.exit_code == 0, result.output
    assert f"warning: duplicate id {paths[1]!r} (input 6): only its first occurrence" \
        in result.output
    assert "3 duplicate ids skipped" in result.output
    ids, vectors, errors, _ = read_output(out)
    assert ids == paths and errors == {}

    data, _ = _tar(digit_paths[10:14], keys=["a", "b", "a", "c"])  # 'a' again, not adjacent
    (tmp_path / "dup.tar").write_bytes(data)
    out = str(tmp_path / "out-tar")
    result = embed(model_dir, str(tmp_path / "dup.tar"), "--out", out)
    assert result.exit_code == 0, result.output
    assert "duplicate id 'dup.tar/a' (input 3)" in result.output
    ids, vectors, errors, _ = read_output(out)
    assert ids == ["dup.tar/a", "dup.tar/b", "dup.tar/c"] and errors == {}
    with FeaturePipeline(model_dir, device="cpu") as pipe:
        first = pipe.embed([open(digit_paths[10], "rb").read()]).vectors[0]
    np.testing.assert_allclose(vectors[0], first, rtol=0, atol=1e-6)


def test_ctrl_c_says_how_to_resume(model_dir, digit_paths, tmp_path):
    """SIGINT while the job waits for more input (a tar on a named pipe whose writer stops
    after 64 of 96 samples): exit 130 at once, a line saying that the same command resumes, no
    traceback; and it does."""
    data, ends = _tar(digit_paths[:96])
    fifo = str(tmp_path / "stream.tar")
    os.mkfifo(fifo)
    out = str(tmp_path / "out")
    cmd = [sys.executable, os.path.join(ROOT, "cli.py"), "embed", model_dir, fifo, "--out", out,
           "--shard-size", "8", "--batch-size", "8", "--device", "cpu"]
    stop = threading.Event()

    def feed(blob, hold):
        try:
            with open(fifo, "wb") as f:
                f.write(blob)
                f.flush()
                if hold:
                    stop.wait(120)
        except BrokenPipeError:
            pass
    writer = threading.Thread(target=feed, args=(data[:ends[2 * 64 - 1]], True), daemon=True)
    writer.start()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_shards(proc, out, 2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=100)  # the writer holds the pipe open for 120 s
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
        writer.join(30)
    text = err.decode()
    assert proc.returncode == 130, text[-2000:]
    assert "interrupted: the complete shards in" in text and \
        "run the same command again to resume" in text
    assert "Traceback" not in text
    done = len(json.load(open(os.path.join(out, MANIFEST)))["shards"])
    assert done >= 2

    writer = threading.Thread(target=feed, args=(data, False), daemon=True)
    writer.start()
    try:
        rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        writer.join(30)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert read_output(out)[0] == [f"stream.tar/{i:04d}" for i in range(96)]
    assert f"kept {8 * done} unchanged rows" in rerun.stderr


def test_a_tar_cut_then_whole_again_ends_like_a_clean_run(model_dir, digit_paths, tmp_path):
    """The cut sample is embedded again once its bytes are whole, and the row reporting the
    cut goes (it was no input)."""
    data, ends = _tar(digit_paths[:6])
    path = tmp_path / "t.tar"
    path.write_bytes(data[:ends[3] + 512 + 60])
    out = str(tmp_path / "out")
    assert embed(model_dir, str(path), "--out", out).exit_code == 0
    ids, _, errors, _ = read_output(out)
    assert ids == ["t.tar/0000", "t.tar/0001", "t.tar/0002", "t.tar/#corrupt"]
    assert sorted(errors) == [2, 3]
    path.write_bytes(data)
    again = embed(model_dir, str(path), "--out", out)
    assert again.exit_code == 0, again.output
    assert "(3 new, 1 changed)" in again.output and "have no input any more" not in again.output
    ids, _, errors, _ = read_output(out)
    assert sorted(ids) == [f"t.tar/{i:04d}" for i in range(6)] and errors == {}


def test_an_old_format_folder_is_refused_with_the_way_out(model_dir, digit_paths, tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "unirep-bulk/1", "shards": {}}))
    refused = embed(model_dir, digit_paths[0], "--out", str(out))
    assert refused.exit_code == 1
    assert "written by an older version (manifest.json); pass --overwrite" in refused.output
    replaced = embed(model_dir, digit_paths[0], "--out", str(out), "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert not (out / "manifest.json").exists() and read_output(str(out))[0] == [digit_paths[0]]
