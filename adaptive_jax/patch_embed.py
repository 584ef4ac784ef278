"""Patch embeddings: one token per patch of a mixed-size tiling.

``MixedPatchEmbedding`` embeds every patch of every level, adds a positional embedding
for the patch's position and size, and gathers the patches of a tiling into a token
sequence by their flat index (see ``selection.level_offsets``). In 'separate' mode each
level's projection costs ``height * width * channels * hidden_size`` multiply-adds, the
same as the smallest-size projection, so L levels cost L times the embedding of a uniform
ViT. In 'resize' mode the coarse levels run on downsampled images and cost less. A coarse
level that no token of the batch uses is skipped at run time in both modes, so a batch
tiled entirely at the smallest size costs what the uniform ViT costs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from adaptive_jax.selection import level_offsets

EMBED_MODES = ("separate", "resize")


class PatchProjection(nn.Module):
    """Linear projection of non-overlapping size x size patches: a stride-``size`` conv.

    The parameters are those of ``nn.Conv(features, (size, size), strides=size,
    padding='VALID')``, a kernel (size, size, channels, features) and a bias. The output
    cuts the image into patches and contracts them with the kernel, which is the same sum
    as the conv. On the CPU, XLA's conv took up to 4x longer for 64-px kernels (JAX 0.10.2).
    """

    features: int
    size: int
    dtype: jnp.dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, images: jax.Array, enabled: jax.Array | None = None) -> jax.Array:
        """Return (batch, rows, cols, features) patch embeddings of NHWC ``images``.

        ``enabled`` is an optional boolean scalar. When it is False at run time the
        projection is skipped (``lax.cond``) and zeros are returned, so a batch that uses
        no patch of this size does not pay for its projection.
        """
        b, h, w, c = images.shape
        p = self.size
        kernel = self.param("kernel", self.kernel_init, (p, p, c, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))

        def project(images, kernel, bias):
            patches = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
            out = jnp.einsum(
                "bhwijc,ijcd->bhwd", patches.astype(self.dtype), kernel.astype(self.dtype)
            )
            return out + bias.astype(self.dtype)

        if enabled is None:
            return project(images, kernel, bias)

        def skip(images, kernel, bias):
            return jnp.zeros((b, h // p, w // p, self.features), jnp.result_type(self.dtype))

        return jax.lax.cond(enabled, project, skip, images, kernel, bias)


class MultiResolutionPatching(nn.Module):
    """One patch projection (a strided conv) per patch size, applied to the whole image.

    ``projections_i`` projects patches of ``patch_sizes[i]``. Calling the module returns a
    dict mapping each patch size to its tokens, (batch, patches, embed_dim), patches in
    row-major order; images are NHWC.
    """

    patch_sizes: Sequence[int] = (8, 16, 32)
    embed_dim: int = 768
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.projections = [
            PatchProjection(self.embed_dim, s, self.dtype) for s in self.patch_sizes
        ]

    def grids(
        self,
        images: jax.Array,
        sizes: Sequence[int] | None = None,
        enabled: dict[int, jax.Array] | None = None,
    ) -> dict[int, jax.Array]:
        """Return the projections of ``sizes`` (default: all) as (batch, rows, cols, dim) grids.

        ``enabled`` optionally maps a size to a boolean scalar. A size whose flag is False
        at run time is skipped, and its grid is zeros (see ``PatchProjection``).
        """
        sizes = self.patch_sizes if sizes is None else sizes
        enabled = enabled or {}
        return {
            s: self.projections[list(self.patch_sizes).index(s)](images, enabled.get(s))
            for s in sizes
        }

    def __call__(self, images: jax.Array) -> dict[int, jax.Array]:
        grids = self.grids(images)
        return {size: g.reshape(g.shape[0], -1, g.shape[-1]) for size, g in grids.items()}


def _avg_pool(grid: jax.Array, factor: int) -> jax.Array:
    """Average non-overlapping factor x factor blocks of (..., rows, cols, channels)."""
    *lead, gh, gw, d = grid.shape
    blocks = grid.reshape(*lead, gh // factor, factor, gw // factor, factor, d)
    return blocks.mean(axis=(-4, -2))


class MixedPatchEmbedding(nn.Module):
    """Embed a mixed-size tiling as one token per patch.

    Modes:
      separate: a projection of its own for each patch size.
      resize: a patch of size ``p_min * 2**k`` is area-downsampled to ``p_min`` and goes
        through the shared ``p_min`` projection; a zero-initialised strided conv over the
        full-resolution ``p_min`` embeddings of its sub-patches is added, so training
        starts from the resized embedding and can learn the lost detail back.

    The positional embedding of a patch is the mean of the learned level-0 positional
    embeddings of the cells it covers; a learned per-size embedding (zero-initialised) is
    added to every patch of that size.
    """

    patch_sizes: Sequence[int]
    image_size: Sequence[int]
    hidden_size: int
    mode: str = "separate"
    dtype: jnp.dtype = jnp.float32

    def _projection(self, size: int) -> nn.Module:
        return PatchProjection(self.hidden_size, size, self.dtype, name=f"projection_{size}")

    @nn.compact
    def __call__(self, images: jax.Array, patch_index: jax.Array | None = None) -> jax.Array:
        """Return tokens (batch, tokens, hidden_size).

        Args:
          images: normalised NHWC images of shape (batch, *image_size, channels).
          patch_index: (batch, tokens) flat patch indices of a tiling. ``None`` means every
            patch of the smallest size in row-major order, the input of a uniform ViT,
            and computes only the smallest-size projection.
        """
        if self.mode not in EMBED_MODES:
            raise ValueError(f"Unknown embed mode {self.mode!r}; choose one of {EMBED_MODES}.")
        sizes = list(self.patch_sizes)
        p_min = sizes[0]
        gh, gw = self.image_size[0] // p_min, self.image_size[1] // p_min
        pos_base = self.param(
            "pos_embedding", nn.initializers.normal(stddev=0.02), (gh, gw, self.hidden_size)
        )
        size_embeddings = [
            self.param(f"size_embedding_{s}", nn.initializers.zeros, (self.hidden_size,))
            for s in sizes
        ]
        if self.mode == "separate":
            patching = MultiResolutionPatching(sizes, self.hidden_size, self.dtype, name="patching")
            project_base = lambda x: patching.grids(x, [p_min])[p_min]  # noqa: E731
        else:
            project_base = self._projection(p_min)
            # A stride-(s / p_min) conv over the p_min embeddings, with nn.Conv's parameters.
            aggregators = {
                s: PatchProjection(
                    self.hidden_size, s // p_min, self.dtype,
                    kernel_init=nn.initializers.zeros, name=f"aggregate_{s}",
                )
                for s in sizes[1:]
            }

        # Every level is in the program when patch_index is given, and also at init so that
        # one parameter tree serves both call forms.
        levels = sizes if patch_index is not None or self.is_initializing() else [p_min]
        # A coarse level that no token of the batch uses is skipped at run time, so a
        # batch tiled at the smallest size only costs what the uniform ViT costs.
        used = {}
        if patch_index is not None and not self.is_initializing():
            offsets = level_offsets(self.image_size, sizes)
            for k, s in enumerate(sizes[1:], start=1):
                used[s] = jnp.any((patch_index >= offsets[k]) & (patch_index < offsets[k + 1]))
        base = project_base(images)
        if self.mode == "separate":
            grids = {p_min: base, **patching.grids(images, levels[1:], used)}
        else:
            grids = {p_min: base}
            for s in levels[1:]:
                factor = s // p_min
                pooled = project_base(_avg_pool(images, factor), used.get(s))
                grids[s] = pooled + aggregators[s](base, used.get(s))

        flat = []
        for s in levels:
            factor = s // p_min
            pos = _avg_pool(pos_base, factor) if factor > 1 else pos_base
            level = grids[s] + pos + size_embeddings[sizes.index(s)]
            flat.append(level.reshape(level.shape[0], -1, self.hidden_size))
        if patch_index is None:
            return flat[0]
        all_patches = jnp.concatenate(flat, axis=1)
        return jnp.take_along_axis(all_patches, patch_index[..., None].astype(jnp.int32), axis=1)
