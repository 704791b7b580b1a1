"""Shared fixtures: small *real* datasets, materialised from the built-ins (no downloads)."""
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


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
