import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adaptive_jax import selection
from adaptive_jax.models.learned import LearnedSelectionViT, token_log_probs

IMAGE = (32, 32)
SIZES = (4, 8, 16)


def _model(budget=28):
    return LearnedSelectionViT(
        num_classes=5, image_size=IMAGE, patch_sizes=SIZES, budget=budget,
        hidden_size=32, depth=1, num_heads=2, mlp_dim=32, selector_channels=8,
    )


def _images(n=4):
    return jax.random.normal(jax.random.PRNGKey(0), (n, *IMAGE, 3))


def test_learned_selection_static_budget():
    model = _model()
    params = model.init(jax.random.PRNGKey(1), _images())["params"]
    index, scale, _ = jax.jit(
        lambda p, x: model.apply({"params": p}, x, method=LearnedSelectionViT.select)
    )(params, _images())
    assert index.shape == (4, 28)
    np.testing.assert_allclose(np.asarray(scale), 1.0, rtol=1e-6)
    total = int(selection.level_offsets(IMAGE, SIZES)[-1])
    for row in np.asarray(index):
        assert len(set(row.tolist())) == 28  # no patch twice
        assert row.max() < total
        rows, cols, size = selection.token_geometry(row, IMAGE, SIZES)
        cover = np.zeros(IMAGE, int)
        for r, c, s in zip(rows, cols, size):
            cover[r:r + s, c:c + s] += 1
        assert cover.min() == 1
        assert cover.max() == 1


def test_gradients_reach_importance_net():
    model = _model()
    images = _images()
    labels = jnp.arange(4) % 5
    params = model.init(jax.random.PRNGKey(1), images)["params"]
    params["vit"]["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(2), params["vit"]["head"]["kernel"].shape)

    def loss(p):
        logits = model.apply({"params": p}, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads = jax.grad(loss)(params)
    for name in ("conv_hidden", "conv_score"):
        norm = float(optax.global_norm(grads["selector"][name]))
        assert np.isfinite(norm)
        assert norm > 0.0, f"no gradient reaches selector/{name}"


def test_eval_budget_override():
    model = _model()
    params = model.init(jax.random.PRNGKey(1), _images())["params"]
    logits = model.apply({"params": params}, _images(), budget=16)
    assert logits.shape == (4, 5)
    with pytest.raises(ValueError, match="Use 16 or 19"):
        model.apply({"params": params}, _images(), budget=17)


def test_token_log_probs_sum_to_one():
    # Over every possible tiling of one coarse patch, path probabilities sum to 1; check
    # the simpler identity per level: keep(coarse) + sum over its children's paths.
    p = [jnp.full((1, 4, 4), 0.3), jnp.full((1, 2, 2), 0.6), jnp.full((1, 1, 1), 0.8)]
    log_p = np.asarray(token_log_probs(p))[0]
    keep_top = np.exp(log_p[-1])
    np.testing.assert_allclose(keep_top, 0.2, rtol=1e-5)  # 1 - 0.8
    level1 = np.exp(log_p[16:20])
    np.testing.assert_allclose(level1, 0.8 * 0.4, rtol=1e-5)  # split top, keep child
    level0 = np.exp(log_p[:16])
    np.testing.assert_allclose(level0, 0.8 * 0.6, rtol=1e-5)  # split top and child
