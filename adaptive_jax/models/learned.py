"""An adaptive ViT whose patch sizes come from a learned importance net, trained end to end.

The importance net is the conv net of ``selection.AdaptivePatchSelector``. Its per-pixel
importance, averaged over a patch, is read as the probability of splitting that patch.
Budget tiling then splits the most important patches until each image has exactly
``budget`` tokens, so the whole model runs on the device with a static shape.

Gradient estimator: the tiling itself is discrete. Each token's embedding is multiplied
by ``exp(log_p - stop_gradient(log_p))``, where ``log_p`` is the log-probability of the
decisions that produced the token (its ancestors were split, and it was kept whole).
The factor equals 1, so the forward pass is unchanged, while its gradient
``d loss / d log_p = <token, d loss / d token>`` tells the importance net whether the
loss wants that token emphasised (raise the probability of the path that created it) or
not. It is a straight-through estimator on the decision log-probabilities; the budget
holds the token count fixed, so no extra budget loss term is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from adaptive_jax import selection
from adaptive_jax.models.vit import AdaptiveViT

_EPS = 1e-6


def _mean_pool(x: jax.Array, factor: int) -> jax.Array:
    b, h, w = x.shape
    return x.reshape(b, h // factor, factor, w // factor, factor).mean(axis=(2, 4))


def _upsample2(x: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def token_log_probs(split_prob: Sequence[jax.Array]) -> jax.Array:
    """Return, per patch in flat token order, the log-probability of the path to it.

    ``split_prob`` has one grid per level, level 0 first (its values are unused, since a
    smallest patch is never split). A patch of level k is produced when each ancestor is
    split and it is not.
    """
    levels = len(split_prob)
    b = split_prob[0].shape[0]
    log_split = [jnp.log(jnp.clip(p, _EPS, 1.0)) for p in split_prob]
    log_keep = [jnp.log(jnp.clip(1.0 - p, _EPS, 1.0)) for p in split_prob]
    ancestors = [None] * levels
    ancestors[levels - 1] = jnp.zeros_like(split_prob[levels - 1])
    for k in range(levels - 2, -1, -1):
        ancestors[k] = _upsample2(ancestors[k + 1] + log_split[k + 1])
    per_level = [
        ancestors[k] + (log_keep[k] if k > 0 else 0.0) for k in range(levels)
    ]
    return jnp.concatenate([lp.reshape(b, -1) for lp in per_level], axis=1)


class LearnedSelectionViT(nn.Module):
    """Importance net + exact-budget tiling + ``AdaptiveViT``, trained together."""

    num_classes: int
    image_size: Sequence[int]
    patch_sizes: Sequence[int]
    budget: int
    hidden_size: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_dim: int = 768
    pool: str = "gap"
    embed_mode: str = "separate"
    dropout_rate: float = 0.0
    selector_channels: int = 64
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        sizes = tuple(self.patch_sizes)
        selection.validate_budget(self.budget, self.image_size, sizes)
        self.selector = selection.AdaptivePatchSelector(
            patch_sizes=sizes,
            thresholds=(0.5,) * (len(sizes) - 1),
            hidden_channels=self.selector_channels,
        )
        self.vit = AdaptiveViT(
            num_classes=self.num_classes,
            image_size=self.image_size,
            patch_sizes=sizes,
            hidden_size=self.hidden_size,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            pool=self.pool,
            embed_mode=self.embed_mode,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
        )

    def select(self, images: jax.Array, budget: int | None = None):
        """Return (patch_index, token_scale, split_prob) for normalised NHWC images."""
        budget = self.budget if budget is None else budget
        importance = self.selector.compute_importance(images)[..., 0]
        split_prob = [_mean_pool(importance, s) for s in self.patch_sizes]
        masks = selection.budget_tiling(split_prob, budget)
        flat = selection.flatten_masks(masks)
        patch_index = jax.vmap(lambda m: jnp.nonzero(m, size=budget, fill_value=0)[0])(flat)
        log_p = jnp.take_along_axis(token_log_probs(split_prob), patch_index, axis=1)
        token_scale = jnp.exp(log_p - jax.lax.stop_gradient(log_p))
        return patch_index.astype(jnp.int32), token_scale, split_prob

    def __call__(self, images: jax.Array, *, budget: int | None = None, train: bool = False) -> jax.Array:
        """Return logits; ``budget`` overrides the trained token budget at evaluation."""
        patch_index, token_scale, _ = self.select(images, budget)
        return self.vit(images, patch_index, None, token_scale, train=train)
