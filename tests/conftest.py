"""Shared test settings: CPU-only JAX and the location of the real image data."""

import os
import pathlib

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Real images live beside the checkout; CI provides them, a fresh user usually does not.
SHARED_DATA = pathlib.Path(os.environ.get("ADAPTIVE_JAX_DATA", REPO_ROOT.parent / "shared" / "data"))
CIFAR10_DIR = SHARED_DATA / "cifar10"
IMAGENET_SAMPLES_DIR = SHARED_DATA / "imagenet-samples"


def require_dir(path: pathlib.Path) -> pathlib.Path:
    """Skip the calling test, naming the folder, when real data is not present."""
    if not path.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{path} not found; CI must provide the real image data.")
        pytest.skip(
            f"{path} not found; set ADAPTIVE_JAX_DATA to the folder that contains cifar10/ "
            "(an image folder with train/ and test/) and imagenet-samples/ (flat photos)."
        )
    return path
