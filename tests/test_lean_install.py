"""The lean runtime install: `pip install .` with the core dependencies only, into a fresh
virtual environment, offline (`--no-index`, wheels from this machine's wheel folders and pip
cache). The installed package holds every package of the project (not a hand-kept list), torch
is absent, and the runtime imports and embeds real images there, as in the full environment.

Skipped, with the reason, where no offline wheel source can satisfy the core dependencies.
Where the GPU build of onnxruntime has no offline wheel, the CPU build (`onnxruntime`, the same
`onnxruntime` module) stands in for it, and simplejpeg (an accelerator of JPEG decoding that the
runtime falls back from) is left out when missing; the test says so in its output.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

STANDINS = {"onnxruntime-gpu": "onnxruntime"}  # the same module, a CPU build
OPTIONAL = {"simplejpeg"}                      # the runtime falls back without it
PACKAGES = ("common", "runtime", "runtime.cli", "runtime.probes", "runtime.evaluation",
            "runtime.search", "runtime.bulk", "runtime.service", "export", "train")


def _pip_config() -> dict[str, str]:
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                          text=True, timeout=60)
    values = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip().strip("'\"")
    return values


def wheel_folders() -> list[str]:
    """Local folders of wheels: pip's find-links, the `files` folder of each file:// index,
    pip's cache of built wheels, and $UNIREP_WHEELS."""
    config = _pip_config()
    found = []
    for key, value in config.items():
        for entry in value.split():
            path = entry[len("file://"):] if entry.startswith("file://") else entry
            if not os.path.isabs(path):
                continue
            if key.endswith("find-links") and os.path.isdir(path):
                found.append(path)
            elif key.endswith("index-url"):
                files = os.path.join(os.path.dirname(path.rstrip("/")), "files")
                if os.path.isdir(files):
                    found.append(files)
    cache = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True,
                           text=True, timeout=60).stdout.strip()
    if cache and os.path.isdir(os.path.join(cache, "wheels")):
        found.append(os.path.join(cache, "wheels"))
    found += [p for p in os.environ.get("UNIREP_WHEELS", "").split(os.pathsep) if p]
    return list(dict.fromkeys(found))


def _core_requirements(wheel: str) -> list[str]:
    """Requires-Dist of the built wheel without an extra marker: the core dependencies."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(name).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line]


def _run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=900, **kw)


def _dist_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


@pytest.fixture(scope="module")
def lean_env(tmp_path_factory):
    """(python of the lean venv, notes on stand-ins, site-packages size in MB)."""
    folders = wheel_folders()
    if not folders:
        pytest.skip("no offline wheel folder (pip find-links, a file:// index, pip's cache or "
                    "$UNIREP_WHEELS) to install from")
    base = tmp_path_factory.mktemp("lean")
    offline = ["--no-index", "--disable-pip-version-check", "-q"]
    for f in folders:
        offline += ["--find-links", f]
    src = base / "src"  # a copy: building in the checkout would leave build/ and egg-info there
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv*", ".git", "__pycache__", "*.egg-info", "build", ".*_cache", "bench-out", "out",
        "runs", "models", "tests"))
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *offline, "-w",
                  str(base / "dist"), str(src)])
    if built.returncode:
        pytest.skip(f"cannot build the project's wheel offline: {built.stderr.strip()[-300:]}")
    wheel = str(next((base / "dist").glob("unirep-*.whl")))
    requirements = _core_requirements(wheel)
    assert not [r for r in requirements if _dist_name(r) in ("torch", "torchvision")]
    venv = base / "venv"
    made = _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)])
    assert made.returncode == 0, made.stderr
    python = str(venv / "bin" / "python")
    strict = _run([python, "-m", "pip", "install", *offline, wheel])
    notes = []
    if strict.returncode:  # a dependency without an offline wheel: stand-ins, then optional
        wanted = []
        for r in requirements:
            name = _dist_name(r)
            if name in STANDINS:
                wanted.append(STANDINS[name])
                notes.append(f"{name} -> {STANDINS[name]}")
            elif name in OPTIONAL:
                probe = _run([python, "-m", "pip", "download", "--no-deps", *offline, "-d",
                              str(base / "probe"), r])
                if probe.returncode:
                    notes.append(f"{name} left out (no offline wheel)")
                    continue
                wanted.append(r)
            else:
                wanted.append(r)
        deps = _run([python, "-m", "pip", "install", *offline, *wanted])
        if deps.returncode:
            pytest.skip("the core dependencies have no offline wheels here: "
                        + deps.stderr.strip().splitlines()[-1][-300:])
        project = _run([python, "-m", "pip", "install", "--no-deps", *offline, wheel])
        assert project.returncode == 0, project.stderr
    print(f"lean install from {folders}; stand-ins: {notes or 'none'}")
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                ).stdout.strip()
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(site) for f in fs)
    return python, notes, size / 2**20


def test_a_fresh_install_holds_every_package_and_no_torch(lean_env, tmp_path):
    python, _, size_mb = lean_env
    code = ("import importlib, importlib.util, json, os\n"
            f"names = {list(PACKAGES)!r}\n"
            "found = {n: os.path.dirname(importlib.util.find_spec(n).origin) for n in names}\n"
            "print(json.dumps({'found': found, 'torch': importlib.util.find_spec('torch') "
            "is not None}))\n")
    proc = _run([python, "-c", code], cwd=str(tmp_path))  # not the checkout: the installed copy
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert not doc["torch"]
    for name, folder in doc["found"].items():
        assert "site-packages" in folder, (name, folder)
    print(f"lean environment: {size_mb:.0f} MB of site-packages")


def test_the_lean_runtime_embeds_like_the_full_one(lean_env, exported_model, fmnist_small,
                                                  tmp_path):
    from common.data import load_dataset
    from runtime import FeaturePipeline
    python, _, _ = lean_env
    model = exported_model(fmnist_small)
    paths = load_dataset(fmnist_small).paths("test")[:12]
    (tmp_path / "list.txt").write_text("\n".join(paths) + "\n")
    cli = os.path.join(os.path.dirname(python), "unirep")
    out = str(tmp_path / "f.npy")
    proc = _run([cli, "embed", model, str(tmp_path / "list.txt"), "--out", out, "--device",
                 "cpu"], cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    check = _run([python, "-c", "import sys, runtime.pipeline, runtime.probes, runtime.cli.probe;"
                  " print('torch' in sys.modules)"], cwd=str(tmp_path))
    assert check.returncode == 0 and check.stdout.strip() == "False", check.stderr
    with FeaturePipeline(model, device="cpu") as pipe:
        want = pipe.embed(paths).vectors
    np.testing.assert_allclose(np.load(out), want, rtol=1e-5, atol=1e-5)
