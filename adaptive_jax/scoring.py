"""Importance scorers: one score grid per patch level.

Every scorer takes images of shape (batch, height, width, channels) with pixel values in
[0, 255] (uint8 or float) and returns a list with one array per patch size, level 0 first,
where level ``k`` has shape (batch, height // size_k, width // size_k). A high score means
dense detail, so the tiling splits that region into smaller patches.

All scorers are pure ``jax.numpy`` functions: they run under ``jit`` on the host CPU inside
the input pipeline (so token counts are known before the device step) or on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

# ITU-R BT.601 luma weights, the grayscale conversion used by APT's entropy scorer.
LUMA_WEIGHTS = (0.2989, 0.5870, 0.1140)

SCORERS = ("entropy", "laplacian", "constant", "random")


def grayscale(images: jax.Array) -> jax.Array:
    """Convert (b, h, w, c) images in [0, 255] to (b, h, w) float32 luma in [0, 255]."""
    images = jnp.asarray(images, jnp.float32)
    channels = images.shape[-1]
    if channels == 1:
        return images[..., 0]
    if channels == 3:
        return images @ jnp.asarray(LUMA_WEIGHTS, jnp.float32)
    raise ValueError(
        f"Expected images with 1 or 3 channels, got {channels}; convert RGBA or other "
        "layouts to RGB before scoring."
    )


def _sum_pool(grid: jax.Array, factor: int) -> jax.Array:
    """Sum non-overlapping factor x factor blocks over axes 1 and 2 of (b, gh, gw, ...)."""
    b, gh, gw = grid.shape[:3]
    rest = grid.shape[3:]
    blocks = grid.reshape(b, gh // factor, factor, gw // factor, factor, *rest)
    return blocks.sum(axis=(2, 4))


def _level_factors(patch_sizes: Sequence[int]) -> list[int]:
    return [size // patch_sizes[0] for size in patch_sizes]


def cell_histograms(gray: jax.Array, cell_size: int, bins: int) -> jax.Array:
    """Histogram the grayscale values of every cell_size x cell_size cell.

    Values in [0, 255] fall into ``bins`` equal bins, as ``numpy.histogram(x, bins,
    range=(0, 255))`` would count them. Returns counts of shape (b, gh, gw, bins).
    """
    b, h, w = gray.shape
    gh, gw = h // cell_size, w // cell_size
    bin_index = jnp.clip(jnp.floor(gray * (bins / 255.0)), 0, bins - 1).astype(jnp.int32)
    # Reorder pixels so that each cell's pixels are contiguous: (b, gh, gw, cell_size**2).
    bin_index = bin_index.reshape(b, gh, cell_size, gw, cell_size).transpose(0, 1, 3, 2, 4)
    bin_index = bin_index.reshape(b, gh * gw, cell_size * cell_size)
    one_cell = jax.vmap(lambda idx: jnp.zeros((bins,), jnp.int32).at[idx].add(1))
    counts = jax.vmap(one_cell)(bin_index)
    return counts.reshape(b, gh, gw, bins)


def entropy_scores(
    images: jax.Array, patch_sizes: Sequence[int], bins: int = 512
) -> list[jax.Array]:
    """Shannon entropy in bits of each patch's grayscale histogram (APT's scorer).

    The histogram of a coarse patch is the sum of its cells' histograms, so pixels are
    counted once for all levels.
    """
    gray = grayscale(images)
    counts = cell_histograms(gray, patch_sizes[0], bins).astype(jnp.float32)
    scores = []
    for factor in _level_factors(patch_sizes):
        level_counts = _sum_pool(counts, factor) if factor > 1 else counts
        total = level_counts.sum(axis=-1, keepdims=True)
        prob = level_counts / total
        plogp = jnp.where(prob > 0, prob * jnp.log2(jnp.where(prob > 0, prob, 1.0)), 0.0)
        scores.append(-plogp.sum(axis=-1))
    return scores


def laplacian_scores(images: jax.Array, patch_sizes: Sequence[int]) -> list[jax.Array]:
    """Mean absolute 4-neighbour Laplacian of the grayscale image over each patch.

    Measures high-frequency energy in grey levels per pixel; image borders are
    edge-padded so that a flat image scores exactly zero.
    """
    gray = grayscale(images)
    padded = jnp.pad(gray, ((0, 0), (1, 1), (1, 1)), mode="edge")
    laplacian = (
        padded[:, :-2, 1:-1]
        + padded[:, 2:, 1:-1]
        + padded[:, 1:-1, :-2]
        + padded[:, 1:-1, 2:]
        - 4.0 * gray
    )
    energy = jnp.abs(laplacian)
    base = patch_sizes[0]
    cell_sums = _sum_pool(energy[..., None], base)[..., 0]
    scores = []
    for size, factor in zip(patch_sizes, _level_factors(patch_sizes)):
        level_sums = _sum_pool(cell_sums[..., None], factor)[..., 0] if factor > 1 else cell_sums
        scores.append(level_sums / float(size * size))
    return scores


def constant_scores(images: jax.Array, patch_sizes: Sequence[int]) -> list[jax.Array]:
    """Score every patch +inf, so no coarse patch is kept: the tiling of a uniform ViT."""
    b, h, w = images.shape[:3]
    return [jnp.full((b, h // s, w // s), jnp.inf, jnp.float32) for s in patch_sizes]


def random_scores(
    rng: jax.Array, images: jax.Array, patch_sizes: Sequence[int]
) -> list[jax.Array]:
    """Uniform random scores in [0, 1): a control that ignores image content."""
    b, h, w = images.shape[:3]
    keys = jax.random.split(rng, len(patch_sizes))
    return [
        jax.random.uniform(key, (b, h // s, w // s)) for key, s in zip(keys, patch_sizes)
    ]
