"""Compare the Flax selector and patching modules with their PyTorch reference.

``fixtures/seed_parity.npz`` contains the inputs, torch-layout weights and outputs of the
reference modules; ``fixtures/make_seed_fixture.py`` defines them and rewrites the file.
Torch is not needed here: the weights are converted to Flax layout and the Flax modules
run on the same images in NHWC.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptive_jax.patch_embed import MultiResolutionPatching
from adaptive_jax.selection import AdaptivePatchSelector

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "seed_parity.npz"
PATCH_SIZES = (8, 16, 32)
THRESHOLDS = (0.7, 0.5)
EMBED_DIM = 16
IMPORTANCE_ATOL = 1e-5
TOKENS_ATOL = 1e-4


def _conv_params(weight: np.ndarray, bias: np.ndarray) -> dict:
    """Convert a torch Conv2d (out, in, kh, kw) weight to a Flax kernel (kh, kw, in, out)."""
    return {"kernel": jnp.asarray(weight.transpose(2, 3, 1, 0)), "bias": jnp.asarray(bias)}


def _nchw_to_nhwc(x: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(x.transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURE) as data:
        return {name: data[name] for name in data.files}


@pytest.fixture(scope="module")
def images(reference):
    return _nchw_to_nhwc(reference["images"])


@pytest.fixture(scope="module")
def selector_variables(reference):
    params = {
        "conv_hidden": _conv_params(
            reference["selector.importance_net.0.weight"],
            reference["selector.importance_net.0.bias"],
        ),
        "conv_score": _conv_params(
            reference["selector.importance_net.2.weight"],
            reference["selector.importance_net.2.bias"],
        ),
    }
    return {"params": params}


@pytest.fixture(scope="module")
def patching_variables(reference):
    params = {
        f"projections_{i}": _conv_params(
            reference[f"patching.projections.{i}.weight"],
            reference[f"patching.projections.{i}.bias"],
        )
        for i in range(len(PATCH_SIZES))
    }
    return {"params": params}


@pytest.fixture(scope="module")
def selector_outputs(selector_variables, images):
    selector = AdaptivePatchSelector(patch_sizes=PATCH_SIZES, thresholds=THRESHOLDS)
    patch_sizes, importance = selector.apply(selector_variables, images)
    return np.asarray(patch_sizes), np.asarray(importance)


@pytest.fixture(scope="module")
def patching_outputs(patching_variables, images):
    patching = MultiResolutionPatching(patch_sizes=PATCH_SIZES, embed_dim=EMBED_DIM)
    tokens = patching.apply(patching_variables, images)
    return {size: np.asarray(value) for size, value in tokens.items()}


def _tree_shapes(tree) -> dict:
    return {
        module: {name: tuple(value.shape) for name, value in leaves.items()}
        for module, leaves in tree["params"].items()
    }


def test_fixture_covers_all_sizes(reference):
    sizes = reference["patch_sizes"]
    for size in PATCH_SIZES:
        assert (sizes == size).any(), f"no pixel of the fixture has patch size {size}"
    assert set(np.unique(sizes).tolist()) == set(PATCH_SIZES)


def test_converted_params_match_init(selector_variables, patching_variables, images):
    selector = AdaptivePatchSelector(patch_sizes=PATCH_SIZES, thresholds=THRESHOLDS)
    patching = MultiResolutionPatching(patch_sizes=PATCH_SIZES, embed_dim=EMBED_DIM)
    key = jax.random.PRNGKey(0)
    selector_init = selector.init(key, images)
    patching_init = patching.init(key, images)
    assert _tree_shapes(selector_variables) == _tree_shapes(selector_init)
    assert _tree_shapes(patching_variables) == _tree_shapes(patching_init)


def test_selector_output_shapes(selector_outputs):
    patch_sizes, importance = selector_outputs
    assert importance.shape == (2, 64, 64, 1)
    assert patch_sizes.shape == (2, 64, 64, 1)


def test_selector_importance_matches(reference, selector_outputs):
    _, importance = selector_outputs
    expected = reference["importance"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(importance, expected, rtol=0, atol=IMPORTANCE_ATOL)


def test_selector_patch_sizes_match(reference, selector_outputs):
    patch_sizes, _ = selector_outputs
    expected = reference["patch_sizes"].transpose(0, 2, 3, 1)
    mismatched = int((patch_sizes != expected).sum())
    assert mismatched == 0, f"{mismatched} of {expected.size} pixels get a different patch size"


def test_thresholds_on_reference_importance(reference, selector_variables):
    # Thresholding alone, fed the reference importance, must reproduce the reference sizes.
    selector = AdaptivePatchSelector(patch_sizes=PATCH_SIZES, thresholds=THRESHOLDS)
    importance = jnp.asarray(reference["importance"].transpose(0, 2, 3, 1))
    patch_sizes = selector.apply(
        selector_variables, importance, method=AdaptivePatchSelector.select_patch_sizes
    )
    expected = reference["patch_sizes"].transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.asarray(patch_sizes), expected)


def test_patching_output_shapes(patching_outputs):
    assert sorted(patching_outputs) == list(PATCH_SIZES)
    for size in PATCH_SIZES:
        patches = (64 // size) ** 2
        assert patching_outputs[size].shape == (2, patches, EMBED_DIM), f"patch size {size}"


@pytest.mark.parametrize("size", PATCH_SIZES)
def test_patching_tokens_match(reference, patching_outputs, size):
    expected = reference[f"tokens_{size}"]
    np.testing.assert_allclose(
        patching_outputs[size], expected, rtol=0, atol=TOKENS_ATOL, err_msg=f"patch size {size}"
    )
