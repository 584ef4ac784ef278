"""Patch-size selection: quadtree tilings over patch sizes ``p_min * 2**k``.

A tiling is stored as one boolean mask per level, level 0 (the smallest patch) first; the
mask of level ``k`` has shape (batch, height // size_k, width // size_k) and is True where a
patch of that size is placed. Shapes are static, so tilings pass through ``jit``. In a valid
tiling every pixel belongs to exactly one patch, and the token count of an image is the
number of True entries over all its masks.

Tokens are addressed by a flat index into the concatenation of all level grids, each grid
flattened in row-major order, level 0 first (see ``level_offsets``).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

MAX_LEVELS = 4


def validate_patch_sizes(patch_sizes: Sequence[int], image_size: Sequence[int]) -> None:
    """Raise ValueError unless the patch sizes form a quadtree that tiles the image.

    The sizes must be ``p_min * 2**k`` for k = 0, 1, ..., at most four of them, and both
    image sides must be multiples of the largest size.
    """
    sizes = [int(s) for s in patch_sizes]
    if not 1 <= len(sizes) <= MAX_LEVELS:
        raise ValueError(
            f"patch_sizes={tuple(sizes)} has {len(sizes)} sizes; give 1 to {MAX_LEVELS}."
        )
    if sizes[0] < 1:
        raise ValueError(f"patch_sizes={tuple(sizes)}: the smallest size must be positive.")
    expected = [sizes[0] * 2**k for k in range(len(sizes))]
    if sizes != expected:
        raise ValueError(
            f"patch_sizes={tuple(sizes)} is not a quadtree; each size must double the one "
            f"before it, for example {tuple(expected)}."
        )
    largest = sizes[-1]
    for name, side in zip(("height", "width"), image_size):
        if side % largest:
            below = (side // largest) * largest
            above = below + largest
            nearest = f"{below} or {above}" if below > 0 else f"{above}"
            raise ValueError(
                f"Image {name} {side} is not a multiple of the largest patch size {largest} "
                f"(patch_sizes={tuple(sizes)}); use an image size of {nearest}, or change "
                "patch_sizes."
            )


def grid_shapes(
    image_size: Sequence[int], patch_sizes: Sequence[int]
) -> list[tuple[int, int]]:
    """Return the (rows, columns) of each level's patch grid."""
    h, w = image_size
    return [(h // s, w // s) for s in patch_sizes]


def level_offsets(image_size: Sequence[int], patch_sizes: Sequence[int]) -> np.ndarray:
    """Return the start of each level in the flat token index, plus the total at the end."""
    sizes = [gh * gw for gh, gw in grid_shapes(image_size, patch_sizes)]
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def _upsample2(mask: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(mask, 2, axis=1), 2, axis=2)


def quadtree_tiling(keep_coarse: Sequence[jax.Array], base_shape: Sequence[int]) -> list[jax.Array]:
    """Build a tiling top-down from per-level "keep this patch whole" decisions.

    Args:
      keep_coarse: for levels 1 .. L-1 (not level 0), boolean arrays of shape
        (batch, rows_k, cols_k). A patch of level k is placed where it is True and no
        coarser patch already covers it; otherwise the region is split into four.
      base_shape: (batch, rows_0, cols_0), the shape of the level-0 grid.

    Returns:
      masks for levels 0 .. L-1; every level-0 cell not covered by a coarser patch gets
      a smallest patch, so the result is always a valid tiling.
    """
    masks = [None] * (len(keep_coarse) + 1)
    covered = None
    for k in range(len(keep_coarse), 0, -1):
        keep = keep_coarse[k - 1]
        placed = keep if covered is None else keep & ~covered
        masks[k] = placed
        covered = placed if covered is None else covered | placed
        covered = _upsample2(covered)
    masks[0] = jnp.ones(base_shape, bool) if covered is None else ~covered
    return masks


def threshold_tiling(
    scores: Sequence[jax.Array], thresholds: Sequence[float]
) -> list[jax.Array]:
    """Keep a patch of level k >= 1 whole where its score is below ``thresholds[k - 1]``.

    ``scores`` has one grid per level, level 0 first (level 0's grid is only read for its
    shape). With patch sizes (16, 32, 64) and entropy scores, APT's published setting
    is ``thresholds=(5.75, 4.0)``: a 32-px patch is kept below 5.75 bits, a 64-px patch
    below 4.0 bits.
    """
    if len(thresholds) != len(scores) - 1:
        raise ValueError(
            f"Got {len(thresholds)} thresholds for {len(scores)} patch sizes; give one "
            f"threshold per patch size except the smallest ({len(scores) - 1})."
        )
    keep = [scores[k] < thresholds[k - 1] for k in range(1, len(scores))]
    return quadtree_tiling(keep, scores[0].shape)


def _splits_for_budget(budget: int, coarsest: int, finest: int, context: str) -> int:
    """Return how many splits turn ``coarsest`` tokens into ``budget``, or raise ValueError."""
    splits, remainder = divmod(int(budget) - coarsest, 3)
    if budget < coarsest or budget > finest or remainder:
        below = max(coarsest, coarsest + 3 * min(splits, (finest - coarsest) // 3))
        above = min(finest, below + 3)
        options = f"{below}" if below == above or budget < coarsest else f"{below} or {above}"
        raise ValueError(
            f"budget={budget} tokens cannot be tiled with {context}: budgets run from "
            f"{coarsest} to {finest} in steps of 3. Use {options}."
        )
    return splits


def validate_budget(budget: int, image_size: Sequence[int], patch_sizes: Sequence[int]) -> int:
    """Return the number of splits that gives exactly ``budget`` tokens, or raise ValueError.

    Starting from the coarsest grid of ``n`` patches, each split of a patch adds three
    tokens, so the reachable budgets are ``n, n + 3, ...`` up to the smallest-size grid.
    """
    grids = grid_shapes(image_size, patch_sizes)
    context = f"patch_sizes={tuple(patch_sizes)} on {tuple(image_size)} images"
    return _splits_for_budget(
        budget, grids[-1][0] * grids[-1][1], grids[0][0] * grids[0][1], context
    )


def budget_tiling(scores: Sequence[jax.Array], budget: int) -> list[jax.Array]:
    """Split the highest-scoring patches until every image has exactly ``budget`` tokens.

    Starts from the coarsest grid and splits patches in order of priority, where a
    patch's priority is the minimum of its score and its ancestors' priorities, so a
    patch is never split before its parent. Ties go to the coarser patch, then to the
    earlier one in row-major order (``jax.lax.top_k`` prefers lower indices). The output
    shape is static, so this runs under ``jit`` on the device.

    ``scores`` has one grid per level, level 0 first; level 0's grid is only read for its
    shape.
    """
    levels = len(scores)
    b = scores[0].shape[0]
    image_cells = scores[0].shape[1:]
    if levels == 1:
        return [jnp.ones(scores[0].shape, bool)]
    coarsest = scores[-1].shape[1] * scores[-1].shape[2]
    finest = image_cells[0] * image_cells[1]
    splits = _splits_for_budget(budget, coarsest, finest, f"{levels} levels")

    priority = [None] * levels
    priority[levels - 1] = scores[levels - 1]
    for k in range(levels - 2, 0, -1):
        priority[k] = jnp.minimum(scores[k], _upsample2(priority[k + 1]))
    # Coarsest level first, so ties resolve in favour of parents.
    order = list(range(levels - 1, 0, -1))
    flat_priority = jnp.concatenate([priority[k].reshape(b, -1) for k in order], axis=1)
    split_flat = jnp.zeros(flat_priority.shape, bool)
    if splits > 0:
        _, chosen = jax.lax.top_k(flat_priority.astype(jnp.float32), splits)
        split_flat = jax.vmap(lambda row, idx: row.at[idx].set(True))(split_flat, chosen)

    split = [None] * levels
    start = 0
    for k in order:
        shape = priority[k].shape
        size = shape[1] * shape[2]
        split[k] = split_flat[:, start:start + size].reshape(shape)
        start += size

    masks = [None] * levels
    masks[levels - 1] = ~split[levels - 1]
    for k in range(levels - 2, 0, -1):
        masks[k] = _upsample2(split[k + 1]) & ~split[k]
    masks[0] = _upsample2(split[1])
    return masks


def flatten_masks(masks: Sequence[jax.Array]) -> jax.Array:
    """Concatenate per-level masks into (batch, total_patches) in flat token order."""
    b = masks[0].shape[0]
    return jnp.concatenate([m.reshape(b, -1) for m in masks], axis=1)


def token_counts(masks: Sequence[jax.Array]) -> jax.Array:
    """Return the number of tokens of each image in a tiling."""
    return sum(m.reshape(m.shape[0], -1).sum(axis=1) for m in masks)


def token_geometry(
    index: np.ndarray, image_size: Sequence[int], patch_sizes: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map flat token indices to the (row, column, size) of each patch in pixels."""
    index = np.asarray(index)
    offsets = level_offsets(image_size, patch_sizes)
    level = np.searchsorted(offsets, index, side="right") - 1
    local = index - offsets[level]
    cols = np.asarray([gw for _, gw in grid_shapes(image_size, patch_sizes)])[level]
    size = np.asarray(patch_sizes)[level]
    return (local // cols) * size, (local % cols) * size, size


class AdaptivePatchSelector(nn.Module):
    """Content-importance selector: a small conv net scores pixels, thresholds pick sizes.

    Semantics: ``importance = sigmoid(conv1x1(relu(conv3x3(image))))`` with 64 hidden
    channels and "same" padding; a pixel gets the smallest size where its importance
    exceeds ``thresholds[0]``, the next size where it exceeds ``thresholds[1]`` but not
    ``thresholds[0]``, and so on, and the largest size where it does not exceed the last
    threshold. The defaults are sizes (8, 16, 32) and thresholds (0.7, 0.5).

    Images are NHWC. ``__call__`` returns the per-pixel map as (patch_sizes, importance),
    both (batch, height, width, 1). ``tiling`` turns the same decisions into a quadtree:
    a patch of level k is kept whole when no pixel in it asks for a smaller size, so no
    pixel gets a patch larger than its per-pixel size.
    """

    patch_sizes: Sequence[int] = (8, 16, 32)
    thresholds: Sequence[float] = (0.7, 0.5)
    hidden_channels: int = 64

    def setup(self):
        if len(self.thresholds) != len(self.patch_sizes) - 1:
            raise ValueError(
                f"AdaptivePatchSelector got {len(self.thresholds)} thresholds for "
                f"{len(self.patch_sizes)} patch sizes; give one fewer threshold than sizes."
            )
        self.hidden = nn.Conv(self.hidden_channels, (3, 3), padding=1, name="conv_hidden")
        self.score = nn.Conv(1, (1, 1), name="conv_score")

    def compute_importance(self, images: jax.Array) -> jax.Array:
        """Return sigmoid importance in (0, 1), shape (batch, height, width, 1)."""
        x = nn.relu(self.hidden(images))
        return nn.sigmoid(self.score(x))

    def select_patch_sizes(
        self, importance: jax.Array, thresholds: Sequence[float] | None = None
    ) -> jax.Array:
        """Map importance to a patch size per pixel (float, as the importance map)."""
        thresholds = self.thresholds if thresholds is None else thresholds
        sizes = jnp.full_like(importance, float(self.patch_sizes[-1]))
        # Walk from the coarsest threshold down so the finer decision wins.
        for k in range(len(thresholds) - 1, -1, -1):
            sizes = jnp.where(importance > thresholds[k], float(self.patch_sizes[k]), sizes)
        return sizes

    def tiling(
        self, images: jax.Array, thresholds: Sequence[float] | None = None
    ) -> tuple[list[jax.Array], jax.Array]:
        """Return (masks, importance): the quadtree tiling and the importance map."""
        thresholds = self.thresholds if thresholds is None else thresholds
        importance = self.compute_importance(images)
        b, h, w, _ = importance.shape
        keep = []
        for k, size in enumerate(self.patch_sizes[1:], start=1):
            peak = importance[..., 0].reshape(b, h // size, size, w // size, size).max(axis=(2, 4))
            keep.append(peak <= thresholds[k - 1])
        p = self.patch_sizes[0]
        return quadtree_tiling(keep, (b, h // p, w // p)), importance

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        importance = self.compute_importance(images)
        return self.select_patch_sizes(importance), importance
