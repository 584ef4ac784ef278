import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptive_jax import scoring, selection, sequence
from adaptive_jax.models import AdaptiveViT

IMAGE = (32, 48)
SIZES = (4, 8, 16)
SMALL = dict(hidden_size=32, depth=2, num_heads=4, mlp_dim=64)


def _model(sizes=SIZES, **kwargs):
    return AdaptiveViT(num_classes=7, image_size=IMAGE, patch_sizes=sizes, **{**SMALL, **kwargs})


def _init(model, seed=0):
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, *IMAGE, 3)))["params"]
    # Zero-initialised heads give zero logits; randomise them so comparisons mean something.
    params["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(seed + 1), params["head"]["kernel"].shape)
    for name in params["embedding"]:
        if name.startswith("size_embedding") or name.startswith("aggregate"):
            params["embedding"][name] = jax.tree_util.tree_map(
                lambda x: jax.random.normal(jax.random.PRNGKey(seed + 2), x.shape) * 0.1,
                params["embedding"][name],
            )
    return params


def _images(n=3, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, *IMAGE, 3))


def _tokens(flat_masks, length):
    pairs = [sequence.pad_tokens(np.asarray(m), length) for m in flat_masks]
    return jnp.asarray(np.stack([p[0] for p in pairs])), jnp.asarray(np.stack([p[1] for p in pairs]))


def _uniform_subset(params, model_uniform):
    """Keep the adaptive parameters that the uniform model has: same names and shapes."""
    template = model_uniform.init(jax.random.PRNGKey(9), jnp.zeros((1, *IMAGE, 3)))["params"]

    def pick(tmpl, full):
        return {k: pick(v, full[k]) if isinstance(v, dict) else full[k] for k, v in tmpl.items()}

    return pick(template, params)


@pytest.mark.parametrize("pool", ["gap", "cls"])
@pytest.mark.parametrize("embed_mode", ["separate", "resize"])
def test_smallest_tiling_equals_uniform_vit(pool, embed_mode):
    adaptive = _model(pool=pool, embed_mode=embed_mode)
    uniform = _model(sizes=(SIZES[0],), pool=pool, embed_mode=embed_mode)
    params = _init(adaptive)
    images = _images()
    masks = selection.threshold_tiling(scoring.constant_scores(images, SIZES), (0.0, 0.0))
    n0 = (IMAGE[0] // 4) * (IMAGE[1] // 4)
    index, mask = _tokens(selection.flatten_masks(masks), n0)
    adaptive_logits = adaptive.apply({"params": params}, images, index, mask)
    uniform_logits = uniform.apply({"params": _uniform_subset(params, uniform)}, images)
    assert float(jnp.abs(uniform_logits).max()) > 1e-3
    np.testing.assert_allclose(adaptive_logits, uniform_logits, atol=1e-5, rtol=1e-5)


def _mixed_tokens(images):
    scores = scoring.laplacian_scores(jnp.abs(images) * 60.0, SIZES)
    thresholds = (float(jnp.median(scores[1])), float(jnp.median(scores[2])))
    flat = selection.flatten_masks(selection.threshold_tiling(scores, thresholds))
    return flat


@pytest.mark.parametrize("pool", ["gap", "cls"])
def test_padding_values_do_not_change_logits(pool):
    model = _model(pool=pool)
    params = _init(model)
    images = _images()
    flat = _mixed_tokens(images)
    counts = np.asarray(flat.sum(axis=1))
    assert len(set(counts.tolist())) > 1, "images should have different token counts"
    length = int(counts.max()) + 5
    index, mask = _tokens(flat, length)
    base = model.apply({"params": params}, images, index, mask)
    junk = jax.random.randint(jax.random.PRNGKey(3), index.shape, 0, int(selection.level_offsets(IMAGE, SIZES)[-1]))
    other_index = jnp.where(mask, index, junk)
    changed = model.apply({"params": params}, images, other_index, mask)
    np.testing.assert_allclose(base, changed, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool", ["gap", "cls"])
def test_bucket_length_does_not_change_logits(pool):
    model = _model(pool=pool)
    params = _init(model)
    images = _images(seed=4)
    flat = _mixed_tokens(images)
    shortest = int(np.asarray(flat.sum(axis=1)).max())
    logits = [
        model.apply({"params": params}, images, *_tokens(flat, length))
        for length in (shortest, shortest + 8, 96)
    ]
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(logits[0], logits[2], atol=1e-5, rtol=1e-5)


def test_each_image_independent_of_batch():
    model = _model()
    params = _init(model)
    images = _images()
    flat = _mixed_tokens(images)
    index, mask = _tokens(flat, 96)
    batch_logits = model.apply({"params": params}, images, index, mask)
    single = model.apply({"params": params}, images[1:2], index[1:2], mask[1:2])
    np.testing.assert_allclose(batch_logits[1:2], single, atol=1e-5, rtol=1e-5)


def test_parameter_tree_names():
    params = _init(_model())
    embedding = params["embedding"]
    assert set(embedding["patching"]) == {"projections_0", "projections_1", "projections_2"}
    assert embedding["patching"]["projections_2"]["kernel"].shape == (16, 16, 3, 32)
    assert embedding["pos_embedding"].shape == (8, 12, 32)
    assert {f"size_embedding_{s}" for s in SIZES} <= set(embedding)


def test_unknown_embed_mode_rejected():
    with pytest.raises(ValueError, match="embed mode"):
        _model(embed_mode="bogus").init(jax.random.PRNGKey(0), jnp.zeros((1, *IMAGE, 3)))


@pytest.mark.parametrize("embed_mode", ["separate", "resize"])
def test_unused_levels_are_skipped_without_changing_tokens(embed_mode):
    from adaptive_jax.patch_embed import MixedPatchEmbedding

    embedding = MixedPatchEmbedding(SIZES, IMAGE, 32, embed_mode)
    images = _images()
    variables = embedding.init(jax.random.PRNGKey(0), images[:1])
    variables = jax.tree_util.tree_map(
        lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(5), x.shape), variables
    )
    offsets = selection.level_offsets(IMAGE, SIZES)
    # Tokens of levels 0 and 1 only: the 16-px projection has nothing to embed.
    index = jnp.asarray(np.stack([
        np.r_[np.arange(0, 8), np.arange(offsets[1], offsets[1] + 6)],
        np.r_[np.arange(10, 20), np.arange(offsets[1] + 3, offsets[1] + 7)],
        np.r_[np.arange(40, 54)],
    ]).astype(np.int32))
    every_patch = jnp.broadcast_to(jnp.arange(int(offsets[-1]), dtype=jnp.int32), (3, int(offsets[-1])))
    reference = jnp.take_along_axis(
        embedding.apply(variables, images, every_patch), index[..., None], axis=1
    )
    tokens = embedding.apply(variables, images, index)
    np.testing.assert_allclose(tokens, reference, atol=1e-5, rtol=1e-5)

    # Each coarse level's projection sits behind a run-time condition on its use.
    jaxpr = jax.make_jaxpr(lambda v, x, i: embedding.apply(v, x, i))(variables, images, index)
    conds = [eqn for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "cond"]
    # 'resize' has two parts per coarse level: the downsampled projection and the
    # aggregating conv.
    per_level = 2 if embed_mode == "resize" else 1
    assert len(conds) == per_level * (len(SIZES) - 1)


def test_patch_projection_matches_strided_conv():
    import flax.linen as nn

    from adaptive_jax.patch_embed import PatchProjection

    grid = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 12, 32))
    projection = PatchProjection(16, 4, kernel_init=nn.initializers.normal(1.0))
    params = projection.init(jax.random.PRNGKey(1), grid)
    conv = nn.Conv(16, (4, 4), strides=(4, 4), padding="VALID")
    np.testing.assert_allclose(
        projection.apply(params, grid), conv.apply(params, grid), atol=1e-4, rtol=1e-4
    )
    # A disabled projection returns zeros of the same shape.
    skipped = projection.apply(params, grid, jnp.asarray(False))
    assert skipped.shape == (2, 2, 3, 16)
    assert not np.asarray(skipped).any()


@pytest.mark.parametrize("pool", ["gap", "cls"])
def test_batch_without_padding_skips_mask(pool):
    model = _model(pool=pool)
    params = _init(model)
    images = _images()
    # Budget tiling gives every image exactly 39 tokens, so a length of 39 has no padding.
    flat = selection.flatten_masks(
        selection.budget_tiling(scoring.laplacian_scores(jnp.abs(images) * 60.0, SIZES), 39)
    )
    unpadded = model.apply({"params": params}, images, *_tokens(flat, 39))
    padded = model.apply({"params": params}, images, *_tokens(flat, 48))
    np.testing.assert_allclose(unpadded, padded, atol=1e-5, rtol=1e-5)

    # Each block chooses at run time between masked and unmasked attention.
    index, mask = _tokens(flat, 39)
    jaxpr = jax.make_jaxpr(lambda p, x, i, m: model.apply({"params": p}, x, i, m))(
        params, images, index, mask
    )
    conds = [eqn for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "cond"]
    assert len(conds) == SMALL["depth"] + len(SIZES) - 1
