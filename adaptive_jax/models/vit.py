"""A pre-LayerNorm ViT encoder whose attention and pooling honour a token mask."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from adaptive_jax.patch_embed import MixedPatchEmbedding

# Standard ViT sizes (Dosovitskiy et al., 2021; Ti from Touvron et al., 2021):
# (hidden_size, depth, num_heads, mlp_dim).
VARIANTS = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
}

POOLS = ("gap", "cls")


def variant_settings(name: str) -> dict[str, int]:
    """Return the encoder sizes of a named variant such as 'Ti', 'S' or 'B'."""
    if name not in VARIANTS:
        raise ValueError(f"Unknown ViT variant {name!r}; choose one of {sorted(VARIANTS)}.")
    hidden, depth, heads, mlp = VARIANTS[name]
    return {"hidden_size": hidden, "depth": depth, "num_heads": heads, "mlp_dim": mlp}


class MlpBlock(nn.Module):
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        d = x.shape[-1]
        x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform())(x)
        x = nn.gelu(x)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        x = nn.Dense(d, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform())(x)
        return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class EncoderBlock(nn.Module):
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, attention_mask: jax.Array, *, deterministic: bool) -> jax.Array:
        y = nn.LayerNorm(dtype=self.dtype)(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            deterministic=deterministic,
        )(y, y, mask=attention_mask)
        x = x + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        y = nn.LayerNorm(dtype=self.dtype)(x)
        return x + MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype)(y, deterministic=deterministic)


class AdaptiveViT(nn.Module):
    """ViT classifier over mixed-size patch tokens.

    With ``patch_sizes=(p,)`` and no ``patch_index`` it is a standard ViT with patch size
    ``p``. With every region at the smallest size, the adaptive model computes exactly that
    uniform ViT, since the level-0 projection, positional embedding, encoder and head are
    the same parameters.
    """

    num_classes: int
    image_size: Sequence[int]
    patch_sizes: Sequence[int]
    hidden_size: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_dim: int = 768
    pool: str = "gap"
    embed_mode: str = "separate"
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        images: jax.Array,
        patch_index: jax.Array | None = None,
        token_mask: jax.Array | None = None,
        token_scale: jax.Array | None = None,
        *,
        train: bool = False,
    ) -> jax.Array:
        """Return logits (batch, num_classes).

        Args:
          images: normalised NHWC images.
          patch_index: (batch, tokens) flat patch indices of each image's tiling, padded to
            a common length; ``None`` for the uniform smallest-size grid.
          token_mask: (batch, tokens), True for real tokens, False for padding. Padding
            tokens are never attended to and never pooled, so their values and number do
            not change the logits.
          token_scale: optional (batch, tokens) factors multiplied into the token
            embeddings; a learned selector passes factors equal to 1 that carry its
            gradient (see ``models.learned``).
        """
        if self.pool not in POOLS:
            raise ValueError(f"Unknown pool {self.pool!r}; choose one of {POOLS}.")
        x = MixedPatchEmbedding(
            self.patch_sizes, self.image_size, self.hidden_size, self.embed_mode, self.dtype,
            name="embedding",
        )(images, patch_index)
        if token_scale is not None:
            x = x * token_scale[..., None].astype(x.dtype)
        b, t, _ = x.shape
        if token_mask is None:
            token_mask = jnp.ones((b, t), bool)

        if self.pool == "cls":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, self.hidden_size))
            x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.hidden_size)).astype(x.dtype), x], axis=1)
            token_mask = jnp.concatenate([jnp.ones((b, 1), bool), token_mask], axis=1)

        # Key-only mask, (batch, 1 head axis, 1 query axis, keys): padded queries still see
        # real keys, so no softmax row is empty.
        attention_mask = token_mask[:, None, None, :]
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        for i in range(self.depth):
            x = EncoderBlock(
                self.num_heads, self.mlp_dim, self.dropout_rate, self.dtype, name=f"block_{i}"
            )(x, attention_mask, deterministic=not train)
        x = nn.LayerNorm(dtype=self.dtype, name="encoder_norm")(x)

        if self.pool == "cls":
            pooled = x[:, 0]
        else:
            weights = token_mask[..., None].astype(x.dtype)
            pooled = (x * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)
        return nn.Dense(
            self.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="head"
        )(pooled).astype(jnp.float32)
