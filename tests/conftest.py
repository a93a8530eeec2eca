"""Shared fixtures: small real JPEG datasets made in the test session, and the GPU marker."""

from __future__ import annotations

import os

import pytest

SAMPLE_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "imagenet-sample")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except (ImportError, RuntimeError):
        return False


def pytest_collection_modifyitems(config, items):
    # The slow tests first (a stable sort keeps each module's order): under pytest-xdist (make test) the long
    # ones (subprocess jobs, the kill -9 matrix, the device-check rehearsal) start at once and the many short
    # ones fill the gaps, instead of a long test starting last and running alone at the end.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if _has_cuda():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> str:
    """A learnable 10-class JPEG dataset (train 40/class, val 10/class, 64 px) in ImageFolder layout."""
    from tools.synthetic import make_dataset

    root = tmp_path_factory.mktemp("synthetic")
    return make_dataset(str(root), train_per_class=40, val_per_class=10, size=64, seed=0)


@pytest.fixture(scope="session")
def synthetic_converted(synthetic_root, tmp_path_factory) -> str:
    """`synthetic_root` written once by `supmae convert` (FFCV .beton + DALI shards, 64 px max side), for
    every test that only reads it (five modules converted the same images each)."""
    from tools.convert import convert

    out = str(tmp_path_factory.mktemp("synthetic-converted"))
    convert(synthetic_root, out, max_res=64, workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def imagenet_sample() -> str:
    """The 1,000 real ImageNet JPEGs of shared/data, or a clean skip when absent."""
    path = os.path.abspath(SAMPLE_DIR)
    if not os.path.isdir(os.path.join(path, "train")):
        pytest.skip("shared/data/imagenet-sample is not present")
    return path
