"""Shared fixtures: small *real* datasets, materialised from the built-ins (no downloads), and
real exported models built once per session."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, check=True):
    """`python cli.py ARGS` in a subprocess (a real process, as a user runs it), with a time
    limit; `check` asserts it succeeded and shows its output when it did not."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc
sys.path.insert(0, ROOT)


# Tests that use these fixtures export a model first: slow, in whatever module they are.
SLOW_FIXTURES = {"exported_model"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def fmnist_small():
    """Fashion-MNIST, 2 levels (generic > specific), 20 train + 20 test images per class."""
    from common.data import materialise_builtin
    return materialise_builtin("fashion-mnist:per_class=20")


@pytest.fixture(scope="session")
def digits_small():
    from common.data import materialise_builtin
    return materialise_builtin("digits:per_class=15")


@pytest.fixture()
def nested_folder(tmp_path, fmnist_small):
    """A user-style nested ImageFolder (no splits) copied from real Fashion-MNIST images."""
    dst = tmp_path / "nested"
    shutil.copytree(os.path.join(fmnist_small, "train"), dst)
    return str(dst)


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory):
    """Factory: a small CNN with seeded random weights, exported by the export stage (real ONNX,
    parity proven on real images of `data`), built once per distinct request in the session.

        model_dir = exported_model(fmnist_small, heads=[("specific", classes)], fp16=True)

    The folder is shared: copy it before changing it. `name` is the folder's name (evaluation
    reports name models by it); other keywords go to the architecture (width, feature_dim).
    """
    made: dict[str, str] = {}

    def get(data: str, *, name: str = "model", heads=None, input_size=None, seed: int = 0,
            fp16: bool = False, int8: bool = False, **arch_kwargs) -> str:
        key = json.dumps([data, name, heads, input_size, seed, fp16, int8, arch_kwargs],
                         sort_keys=True)
        if key not in made:
            from export.onnx_export import export_runs
            from train.runs import untrained_run

            base = tmp_path_factory.mktemp("exported")
            run = str(base / "runs" / name)
            untrained_run("small_cnn", run, heads=heads, input_size=input_size, seed=seed,
                          **arch_kwargs)
            variants: dict = {"fp16": fp16}
            if int8:
                variants.update(int8_calib=data, variant_images=40, calib_images=20)
            export_runs([run], str(base / name), parity_images=4, check_data=data, **variants)
            made[key] = str(base / name)
        return made[key]

    return get
