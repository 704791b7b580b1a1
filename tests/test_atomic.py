"""common.atomic.replace_folder: the one way a whole folder (a model, a probe, a Triton model, a
dataset cache) is swapped in; a reader sees the old folder or the new one, never a mix."""
from __future__ import annotations

import os

import pytest

from common.atomic import build_folder_once, make_temp_dir, replace_folder


def _filled(parent, name: str, text: str) -> str:
    tmp = make_temp_dir(str(parent), tag=name)
    with open(os.path.join(tmp, "a.txt"), "w") as f:
        f.write(text)
    return tmp


def test_replace_folder_swaps_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "model"
    assert replace_folder(_filled(tmp_path, "model", "first"), str(out))
    assert (out / "a.txt").read_text() == "first"
    (out / "old-only.txt").write_text("x")
    assert replace_folder(_filled(tmp_path, "model", "second"), str(out))
    assert sorted(os.listdir(out)) == ["a.txt"] and (out / "a.txt").read_text() == "second"
    assert os.listdir(tmp_path) == ["model"]  # no temporary and no old copy left


def test_a_failed_swap_keeps_the_old_folder(tmp_path):
    out = tmp_path / "probe"
    replace_folder(_filled(tmp_path, "probe", "old"), str(out))
    with pytest.raises(OSError):
        replace_folder(str(tmp_path / "vanished"), str(out), fsync=False)
    assert (out / "a.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["probe"]


def test_keep_existing_keeps_the_first_finished_folder(tmp_path):
    out = tmp_path / "cache"
    assert replace_folder(_filled(tmp_path, "cache", "theirs"), str(out), keep_existing=True)
    assert not replace_folder(_filled(tmp_path, "cache", "mine"), str(out), keep_existing=True)
    assert (out / "a.txt").read_text() == "theirs" and os.listdir(tmp_path) == ["cache"]


def test_build_folder_once_builds_once(tmp_path):
    calls = []

    def build(folder):
        calls.append(folder)
        with open(os.path.join(folder, "DONE"), "w") as f:
            f.write("ok")

    out = str(tmp_path / "data")
    assert build_folder_once(out, build, "DONE") == out
    assert build_folder_once(out, build, "DONE") == out
    assert len(calls) == 1 and os.listdir(tmp_path) == ["data"]
