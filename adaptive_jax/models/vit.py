"""A pre-LayerNorm ViT encoder whose attention and pooling honour a token mask."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from adaptive_jax.patch_embed import MixedPatchEmbedding
from adaptive_jax.selection import level_offsets

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
    def __call__(
        self,
        x: jax.Array,
        attention_mask: jax.Array,
        *,
        deterministic: bool,
        all_keys_real: jax.Array | None = None,
    ) -> jax.Array:
        """Apply one pre-LN attention and MLP block.

        ``all_keys_real`` is an optional boolean scalar. When it is True at run time
        (``nn.cond``), attention runs without ``attention_mask``, which then masks
        nothing, and saves the masking pass over the attention logits.
        """
        y = nn.LayerNorm(dtype=self.dtype)(x)

        def attend(block, y, mask):
            return nn.MultiHeadDotProductAttention(
                num_heads=self.num_heads,
                dtype=self.dtype,
                kernel_init=nn.initializers.xavier_uniform(),
                deterministic=deterministic,
                name="MultiHeadDotProductAttention_0",
            )(y, y, mask=mask)

        if all_keys_real is None:
            y = attend(self, y, attention_mask)
        else:
            y = nn.cond(
                all_keys_real, lambda block, y, mask: attend(block, y, None), attend,
                self, y, attention_mask,
            )
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
        segment_ids: jax.Array | None = None,
        *,
        train: bool = False,
    ) -> jax.Array:
        """Return logits (batch, num_classes), or (rows, slots, num_classes) when packed.

        Args:
          images: normalised NHWC images. For packed rows, (rows * slots, H, W, C) with
            slot e of row r at index ``r * slots + e`` (see ``adaptive_jax.packing``).
          patch_index: (batch, tokens) flat patch indices of each image's tiling, padded to
            a common length; ``None`` for the uniform smallest-size grid. For packed rows,
            (rows, tokens) indices, each into the image of the token's own segment.
          token_mask: (batch, tokens), True for real tokens, False for padding. Padding
            tokens are never attended to and never pooled, so their values and number do
            not change the logits. Not used with ``segment_ids``.
          token_scale: optional (batch, tokens) factors multiplied into the token
            embeddings; a learned selector passes factors equal to 1 that carry its
            gradient (see ``models.learned``).
          segment_ids: optional (rows, tokens) int ids of packed rows: 0 for padding and
            ``e + 1`` for a token of slot e of its row. A token attends only to tokens of
            its own segment, and each segment is pooled into its own logits, so an
            image's logits match those of the same image alone in a bucketed batch. With
            pool='cls' the model prepends one class token per slot.
        """
        if self.pool not in POOLS:
            raise ValueError(f"Unknown pool {self.pool!r}; choose one of {POOLS}.")
        embedding = MixedPatchEmbedding(
            self.patch_sizes, self.image_size, self.hidden_size, self.embed_mode, self.dtype,
            name="embedding",
        )
        if segment_ids is not None:
            return self._packed(embedding, images, patch_index, token_mask, token_scale,
                                segment_ids, train=train)

        x = embedding(images, patch_index)
        if token_scale is not None:
            x = x * token_scale[..., None].astype(x.dtype)
        b, t, _ = x.shape
        # Without a token mask every key is real, so no run-time condition is needed.
        all_keys_real = None if token_mask is None else jnp.all(token_mask)
        if token_mask is None:
            token_mask = jnp.ones((b, t), bool)

        if self.pool == "cls":
            cls = self._class_token()
            x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.hidden_size)).astype(x.dtype), x], axis=1)
            token_mask = jnp.concatenate([jnp.ones((b, 1), bool), token_mask], axis=1)

        # Key-only mask, (batch, 1 head axis, 1 query axis, keys): padded queries still see
        # real keys, so no softmax row is empty. A batch without padding skips the mask.
        attention_mask = token_mask[:, None, None, :]
        x = self._encode(x, attention_mask, train=train, all_keys_real=all_keys_real)

        if self.pool == "cls":
            pooled = x[:, 0]
        else:
            weights = token_mask[..., None].astype(x.dtype)
            pooled = (x * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)
        return self._head(pooled)

    def _packed(
        self,
        embedding: MixedPatchEmbedding,
        images: jax.Array,
        patch_index: jax.Array | None,
        token_mask: jax.Array | None,
        token_scale: jax.Array | None,
        segment_ids: jax.Array,
        *,
        train: bool,
    ) -> jax.Array:
        """Encode packed rows; return logits (rows, slots, num_classes)."""
        if patch_index is None:
            raise ValueError(
                "segment_ids requires patch_index, because packed rows have no uniform grid. "
                "Pass the packed batch's patch_index."
            )
        if token_mask is not None:
            raise ValueError(
                "Got both token_mask and segment_ids. Pass only segment_ids for packed rows, "
                "where segment id 0 marks padding."
            )
        if patch_index.shape != segment_ids.shape:
            raise ValueError(
                f"patch_index {patch_index.shape} and segment_ids {segment_ids.shape} must "
                "have the same (rows, tokens) shape."
            )
        rows = segment_ids.shape[0]
        if images.shape[0] % rows:
            raise ValueError(
                f"{images.shape[0]} images cannot fill {rows} packed rows; give rows * slots "
                "images, slot e of row r at index r * slots + e."
            )
        slots = images.shape[0] // rows

        x = gather_packed_tokens(embedding, images, patch_index, segment_ids,
                                 self.image_size, self.patch_sizes)
        if token_scale is not None:
            x = x * token_scale[..., None].astype(x.dtype)

        segment_ids = segment_ids.astype(jnp.int32)
        if self.pool == "cls":
            # Class token e carries segment id e + 1, so it attends to and is attended by
            # exactly the tokens of slot e, as the single class token of a bucketed row.
            cls = jnp.broadcast_to(self._class_token(), (rows, slots, self.hidden_size))
            x = jnp.concatenate([cls.astype(x.dtype), x], axis=1)
            slot_ids = jnp.broadcast_to(jnp.arange(1, slots + 1, dtype=jnp.int32), (rows, slots))
            segment_ids = jnp.concatenate([slot_ids, segment_ids], axis=1)

        # Image tokens attend only within their segment, so never to padding (id 0) or
        # another image. Padding tokens attend only to padding, which keeps every softmax
        # row non-empty, even in a row of padding only.
        attention_mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        x = self._encode(x, attention_mask, train=train)

        if self.pool == "cls":
            pooled = x[:, :slots]
        else:
            membership = segment_ids[..., None] == jnp.arange(1, slots + 1, dtype=jnp.int32)
            weights = membership.astype(x.dtype)
            counts = weights.sum(axis=1)[..., None]
            pooled = jnp.einsum("rts,rtd->rsd", weights, x) / jnp.maximum(counts, 1.0)
        return self._head(pooled)

    def _class_token(self) -> jax.Array:
        return self.param("cls", nn.initializers.zeros, (1, 1, self.hidden_size))

    def _encode(
        self, x: jax.Array, attention_mask: jax.Array, *, train: bool,
        all_keys_real: jax.Array | None = None,
    ) -> jax.Array:
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        for i in range(self.depth):
            x = EncoderBlock(
                self.num_heads, self.mlp_dim, self.dropout_rate, self.dtype, name=f"block_{i}"
            )(x, attention_mask, deterministic=not train, all_keys_real=all_keys_real)
        return nn.LayerNorm(dtype=self.dtype, name="encoder_norm")(x)

    def _head(self, pooled: jax.Array) -> jax.Array:
        return nn.Dense(
            self.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="head"
        )(pooled).astype(jnp.float32)


def gather_packed_tokens(
    embedding: MixedPatchEmbedding,
    images: jax.Array,
    patch_index: jax.Array,
    segment_ids: jax.Array,
    image_size: Sequence[int],
    patch_sizes: Sequence[int],
) -> jax.Array:
    """Embed every patch of every stacked image and gather the tokens of packed rows.

    Token t of row r with segment id ``e + 1`` is patch ``patch_index[r, t]`` of image
    ``r * slots + e``. Padding (segment id 0) reads slot 0 and is masked out later.
    Returns (rows, tokens, hidden_size). The gather stays within a row's own images, so
    it needs no communication when rows and images are sharded over the same batch axis.
    The embedding runs on every slot, empty ones included, at every patch size.
    """
    rows = segment_ids.shape[0]
    num_images = images.shape[0]
    slots = num_images // rows
    num_patches = int(level_offsets(image_size, patch_sizes)[-1])
    every_patch = jnp.broadcast_to(jnp.arange(num_patches, dtype=jnp.int32), (num_images, num_patches))
    tokens = embedding(images, every_patch)
    tokens = tokens.reshape(rows, slots * num_patches, tokens.shape[-1])
    slot = jnp.maximum(segment_ids.astype(jnp.int32) - 1, 0)
    flat_index = slot * num_patches + patch_index.astype(jnp.int32)
    return jnp.take_along_axis(tokens, flat_index[..., None], axis=1)
