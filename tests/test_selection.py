import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptive_jax import selection


def _coverage(masks, patch_sizes, image_size):
    """Count, per pixel, how many patches of the tiling contain it."""
    b = masks[0].shape[0]
    cover = np.zeros((b, *image_size), np.int32)
    for mask, size in zip(masks, patch_sizes):
        mask = np.asarray(mask)
        cover += np.kron(mask, np.ones((size, size), np.int32)).astype(np.int32)
    return cover


@pytest.mark.parametrize(
    "patch_sizes,image_size",
    [((4, 8), (16, 24)), ((8, 16, 32), (64, 96)), ((14, 28, 56, 112), (224, 224)), ((2,), (8, 8))],
)
def test_tiling_covers_every_pixel_once(patch_sizes, image_size):
    rng = np.random.default_rng(0)
    scores = [rng.uniform(size=(5, image_size[0] // s, image_size[1] // s)) for s in patch_sizes]
    for thresholds in ([0.0] * (len(patch_sizes) - 1), [0.5] * (len(patch_sizes) - 1), [1.1] * (len(patch_sizes) - 1)):
        masks = selection.threshold_tiling([jnp.asarray(s) for s in scores], thresholds)
        cover = _coverage(masks, patch_sizes, image_size)
        assert cover.min() == 1
        assert cover.max() == 1
        counts = np.asarray(selection.token_counts(masks))
        flat = np.asarray(selection.flatten_masks(masks))
        np.testing.assert_array_equal(counts, flat.sum(axis=1))


def test_threshold_extremes_give_uniform_tilings():
    scores = [jnp.zeros((2, 8, 8)), jnp.zeros((2, 4, 4)), jnp.zeros((2, 2, 2))]
    coarse = selection.threshold_tiling(scores, (1.0, 1.0))
    np.testing.assert_array_equal(np.asarray(selection.token_counts(coarse)), [4, 4])
    fine = selection.threshold_tiling(scores, (0.0, 0.0))
    np.testing.assert_array_equal(np.asarray(selection.token_counts(fine)), [64, 64])


def test_threshold_keeps_only_low_scores():
    # Level-1 grid 2x2: one low-score quadrant is kept as a 2-px patch, the rest split.
    scores = [jnp.zeros((1, 4, 4)), jnp.asarray([[[0.1, 0.9], [0.9, 0.9]]])]
    masks = selection.threshold_tiling(scores, (0.5,))
    np.testing.assert_array_equal(np.asarray(masks[1][0]), [[True, False], [False, False]])
    assert int(selection.token_counts(masks)[0]) == 1 + 12


def test_threshold_count_mismatch_rejected():
    with pytest.raises(ValueError, match="one threshold per patch size"):
        selection.threshold_tiling([jnp.zeros((1, 4, 4)), jnp.zeros((1, 2, 2))], (0.5, 0.5))


def test_token_geometry_of_flat_indices():
    sizes, image = (4, 8), (8, 16)
    # Level 0 has 2x4 cells (indices 0..7), level 1 has 1x2 patches (indices 8..9).
    rows, cols, size = selection.token_geometry(np.array([0, 5, 9]), image, sizes)
    np.testing.assert_array_equal(rows, [0, 4, 0])
    np.testing.assert_array_equal(cols, [0, 4, 8])
    np.testing.assert_array_equal(size, [4, 4, 8])


@pytest.mark.parametrize(
    "sizes,image,message",
    [
        ((8, 16, 32), (224, 200), "use an image size of 192 or 224"),
        ((8, 12), (48, 48), "not a quadtree"),
        ((4, 8, 16, 32, 64), (64, 64), "give 1 to 4"),
        ((16, 32), (16, 16), "use an image size of 32"),
    ],
)
def test_invalid_patch_sizes_rejected(sizes, image, message):
    with pytest.raises(ValueError, match=message):
        selection.validate_patch_sizes(sizes, image)


def test_selector_output_shapes():
    selector = selection.AdaptivePatchSelector()
    images = jnp.ones((2, 64, 96, 3))
    variables = selector.init(jax.random.PRNGKey(0), images)
    assert variables["params"]["conv_hidden"]["kernel"].shape == (3, 3, 3, 64)
    assert variables["params"]["conv_score"]["kernel"].shape == (1, 1, 64, 1)
    sizes, importance = selector.apply(variables, images)
    assert sizes.shape == (2, 64, 96, 1)
    assert importance.shape == (2, 64, 96, 1)
    assert float(importance.min()) > 0.0
    assert float(importance.max()) < 1.0


def test_selector_threshold_mapping():
    selector = selection.AdaptivePatchSelector()
    importance = jnp.asarray([0.2, 0.5, 0.500001, 0.7, 0.700001, 0.95]).reshape(1, 1, 6, 1)
    sizes = selector.apply({}, importance, method=selection.AdaptivePatchSelector.select_patch_sizes)
    np.testing.assert_array_equal(np.asarray(sizes).ravel(), [32, 32, 16, 16, 8, 8])


def test_selector_tiling_respects_pixel_sizes():
    selector = selection.AdaptivePatchSelector()
    rng = jax.random.PRNGKey(1)
    # Flat images with one noisy 12x12 block: detail in one place only.
    noise = jax.random.normal(rng, (3, 12, 12, 3)) * 3.0
    images = jnp.zeros((3, 64, 64, 3)).at[:, 20:32, 36:48].set(noise)
    variables = selector.init(rng, images)
    # Shift the score bias so that flat regions get importance sigmoid(-1) < 0.5.
    flat_logit = jax.scipy.special.logit(
        selector.apply(variables, jnp.zeros((1, 8, 8, 3)), method=selection.AdaptivePatchSelector.compute_importance)[0, 4, 4, 0]
    )
    params = variables["params"]
    params["conv_score"]["bias"] = params["conv_score"]["bias"] - flat_logit - 1.0
    variables = {"params": params}
    masks, importance = selector.apply(variables, images, method=selection.AdaptivePatchSelector.tiling)
    cover = _coverage(masks, (8, 16, 32), (64, 64))
    assert cover.min() == 1
    assert cover.max() == 1
    pixel_sizes = np.asarray(
        selector.apply({}, importance, method=selection.AdaptivePatchSelector.select_patch_sizes)
    )[..., 0]
    tiled_sizes = np.zeros_like(pixel_sizes)
    for mask, size in zip(masks, (8, 16, 32)):
        tiled_sizes += np.kron(np.asarray(mask), np.ones((size, size))) * size
    # No pixel gets a patch larger than the size its importance asks for.
    assert (tiled_sizes <= pixel_sizes).all()
    assert set(np.unique(tiled_sizes)) == {8.0, 16.0, 32.0}


@pytest.mark.parametrize(
    "patch_sizes,image_size,budget",
    [((4, 8), (16, 24), 15), ((8, 16, 32), (64, 96), 6), ((8, 16, 32), (64, 96), 45),
     ((8, 16, 32), (64, 96), 96), ((14, 28, 56, 112), (224, 224), 100)],
)
def test_budget_gives_exact_token_count(patch_sizes, image_size, budget):
    rng = np.random.default_rng(1)
    scores = [jnp.asarray(rng.uniform(size=(4, image_size[0] // s, image_size[1] // s))) for s in patch_sizes]
    masks = selection.budget_tiling(scores, budget)
    np.testing.assert_array_equal(np.asarray(selection.token_counts(masks)), [budget] * 4)
    cover = _coverage(masks, patch_sizes, image_size)
    assert cover.min() == 1
    assert cover.max() == 1


def test_budget_with_tied_scores_stays_valid():
    sizes, image = (4, 8, 16, 32), (64, 64)
    scores = [jnp.zeros((2, 64 // s, 64 // s)) for s in sizes]
    masks = selection.budget_tiling(scores, 4 + 3 * 7)
    cover = _coverage(masks, sizes, image)
    assert cover.min() == 1
    assert cover.max() == 1
    np.testing.assert_array_equal(np.asarray(selection.token_counts(masks)), [25, 25])


def test_budget_splits_highest_scores_first():
    # 2x2 coarse patches; the top-right one has the highest score and is split first.
    coarse = jnp.asarray([[[0.1, 0.9], [0.3, 0.2]]])
    scores = [jnp.zeros((1, 4, 4)), coarse]
    masks = selection.budget_tiling(scores, 7)
    np.testing.assert_array_equal(np.asarray(masks[1][0]), [[True, False], [True, True]])
    np.testing.assert_array_equal(np.asarray(masks[0][0, :2, 2:]), [[True, True], [True, True]])
    assert int(np.asarray(masks[0]).sum()) == 4


def test_budget_runs_under_jit():
    scores = [jnp.ones((2, 8, 8)), jnp.ones((2, 4, 4)), jnp.ones((2, 2, 2))]
    counts = jax.jit(lambda s: selection.token_counts(selection.budget_tiling(s, 16)))(scores)
    np.testing.assert_array_equal(np.asarray(counts), [16, 16])


@pytest.mark.parametrize("budget,message", [(17, "Use 16 or 19"), (2, "Use 4"), (70, "Use 64")])
def test_unreachable_budget_rejected(budget, message):
    with pytest.raises(ValueError, match=message):
        selection.validate_budget(budget, (32, 32), (4, 8, 16))
