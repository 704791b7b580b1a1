"""The bulk tests' shared fixtures: one exported small CNN with a 10-class head, its pipeline,
and the digits images as files (module-scoped, as each module had them)."""
import pytest

from common.files import iter_image_files


@pytest.fixture(scope="module")
def model_dir(exported_model, fmnist_small):
    """small_cnn (seeded random weights) exported by the export stage."""
    return exported_model(fmnist_small, heads=[("specific", [f"c{i}" for i in range(10)])])


@pytest.fixture(scope="module")
def pipe(model_dir):
    from runtime import FeaturePipeline
    with FeaturePipeline(model_dir, device="cpu", batch_size=8) as p:
        yield p


@pytest.fixture(scope="module")
def digit_paths(digits_small):
    """300 real digits PNGs, in the order a folder walk gives them."""
    paths = list(iter_image_files(digits_small))
    assert len(paths) == 300
    return paths
