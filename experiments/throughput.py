"""Inference throughput of an adaptive-patch ViT against the uniform ViT of the same size.

The benchmark loads real photos and tiles them on the host, scoring and selecting
patches under ``jit`` on the CPU as the input pipeline does. It arranges the tilings into
bucketed or packed batches and then times two jitted eval-mode forward passes on the same
images:

  adaptive: ``AdaptiveViT`` with patch sizes (p, 2p, 4p) and each image's mixed tiling.
            Sizes that do not divide the resolution are left out by default.
  uniform:  ``AdaptiveViT`` with ``patch_sizes=(p,)`` and no ``patch_index``, a plain ViT.

Both use the encoder sizes of ``models.vit.VARIANTS``. Warm-up passes, which compile every
batch shape, are not timed. The timed passes alternate between the two models in one
process, and the JSON output reports medians. Weights are randomly initialised, which
does not change the amount of computation.

Example:

  python -m experiments.throughput --images /data/photos --variant S/16 \\
      --resolution 384 --batch-size 16 --out throughput.json
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import logging
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from adaptive_jax import packing, profiling, scoring, selection, sequence
from adaptive_jax.models.vit import VARIANTS, AdaptiveViT
from experiments import reporting

logger = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SEQUENCE_MODES = ("bucket", "sort", "pack")
# Entropy thresholds in bits for patch sizes (p, 2p, 4p), the setting that
# ``selection.threshold_tiling`` documents as APT's. A 2p patch is kept whole below 5.75
# bits and a 4p patch below 4.0 bits.
APT_THRESHOLDS = (5.75, 4.0)
# Histogram bins over grey levels 0..255, the default of APT's entropy code.
APT_ENTROPY_BINS = 512
NUM_CLASSES = 1000  # an ImageNet-1k head
RESULT_KEYS = (
    "adaptive_img_per_s",
    "uniform_img_per_s",
    "speedup",
    "tokens_per_image",
    "padding_fraction",
    "compiled_programs",
    "ideal_speedup",
    "efficiency",
    "selection_fraction",
    "machine",
    "command",
    "date",
)


@dataclasses.dataclass(frozen=True)
class Setup:
    """Resolved benchmark settings: model sizes, patch sizes and the tiling rule."""

    variant: str
    hidden_size: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_sizes: tuple[int, ...]
    image_size: tuple[int, int]
    scorer: str
    thresholds: tuple[float, ...]
    bins: int

    @property
    def uniform_tokens(self) -> int:
        """Token count of the smallest-size grid, the uniform ViT's sequence length."""
        rows, cols = selection.grid_shapes(self.image_size, self.patch_sizes)[0]
        return rows * cols

    @property
    def coarsest_tokens(self) -> int:
        """Token count of the largest-size grid, the shortest possible adaptive sequence."""
        rows, cols = selection.grid_shapes(self.image_size, self.patch_sizes)[-1]
        return rows * cols


def parse_int_list(text: str) -> tuple[int, ...]:
    """Parse a comma-separated list of integers such as '16,32,64'."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers, for example '16,32,64'."
        ) from error


def parse_float_list(text: str) -> tuple[float, ...]:
    """Parse a comma-separated list of numbers such as '5.75,4.0'."""
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers, for example '5.75,4.0'."
        ) from error


def parse_variant(text: str) -> tuple[str, int]:
    """Split a variant such as 'S/16' into its name and smallest patch size."""
    name, _, patch = text.partition("/")
    if name not in VARIANTS or not patch.isdigit() or int(patch) < 1:
        raise ValueError(
            f"--variant {text!r} is invalid. Give NAME/PATCH with NAME one of "
            f"{sorted(VARIANTS)} and PATCH the smallest patch size in pixels, for example "
            "'S/16'."
        )
    return name, int(patch)


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser of the benchmark."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.throughput",
        description=(
            "Time the forward pass of an adaptive-patch ViT and of the uniform ViT of the "
            "same variant on the same photos, interleaved in one process."
        ),
    )

    data = parser.add_argument_group("images and model")
    data.add_argument(
        "--images", required=True, type=pathlib.Path,
        help="folder of JPEG or PNG photos, read recursively (flat or with class subfolders)",
    )
    data.add_argument(
        "--num-images", type=int, default=None,
        help="use at most this many images, the first in sorted path order (default: all)",
    )
    data.add_argument(
        "--variant", default="Ti/16",
        help="ViT variant NAME/PATCH, for example Ti/16, S/16 or B/16, where PATCH is the "
        "smallest patch size in pixels (default: %(default)s)",
    )
    data.add_argument(
        "--resolution", type=int, default=384,
        help="side of the square model input in pixels, after resizing the shorter side "
        "and center cropping (default: %(default)s)",
    )
    data.add_argument(
        "--batch-size", type=int, default=16,
        help="images per batch, or rows per batch with --sequence pack (default: %(default)s)",
    )

    tiling = parser.add_argument_group("tiling")
    tiling.add_argument(
        "--patch-sizes", type=parse_int_list, default=None,
        help="comma-separated patch sizes in pixels, smallest first, each double the one "
        "before (default: p,2p,4p for the variant's p, without the sizes that do not "
        "divide --resolution)",
    )
    tiling.add_argument(
        "--scorer", choices=scoring.SCORERS, default=None,
        help="importance scorer for the tiling (default: entropy)",
    )
    tiling.add_argument(
        "--thresholds", type=parse_float_list, default=None,
        help="comma-separated thresholds, one per patch size except the smallest. A patch "
        "of size k is kept whole where its score is below threshold k-1 (default with the "
        "entropy scorer: APT's 5.75,4.0 bits, or 5.75 with two sizes)",
    )
    tiling.add_argument(
        "--bins", type=int, default=APT_ENTROPY_BINS,
        help="histogram bins over grey levels 0..255 for the entropy scorer "
        "(default: %(default)s)",
    )
    tiling.add_argument(
        "--all-smallest", action="store_true",
        help="place the smallest patch everywhere (constant scorer), the zero-reduction case",
    )

    layout = parser.add_argument_group("sequence layout")
    layout.add_argument(
        "--sequence", choices=SEQUENCE_MODES, default="bucket",
        help="'bucket' pads each image to a bucket length, one image per row, filling "
        "batches in the order the images come, as a stream would. 'sort' orders all images "
        "by token count first and cuts batches of similar length with the fewest padded "
        "positions, as offline inference over a known pool can. 'pack' places several images in one row "
        "(default: %(default)s)",
    )
    layout.add_argument(
        "--num-buckets", type=int, default=4,
        help="bucket lengths for --sequence bucket and sort, spread evenly up to the "
        "uniform token count and rounded up to multiples of 8, so lengths that round to "
        "the same value merge; one compiled program each (default: %(default)s)",
    )
    layout.add_argument(
        "--pack-length", type=int, default=None,
        help="tokens per row for --sequence pack (default: the uniform token count)",
    )
    layout.add_argument(
        "--max-images-per-row", type=int, default=4,
        help="image slots per row for --sequence pack. The patch embedding runs on every "
        "slot, empty ones included (default: %(default)s)",
    )

    timing = parser.add_argument_group("timing and output")
    timing.add_argument(
        "--repeats", type=int, default=5,
        help="timed rounds. Each round runs one selection, adaptive and uniform pass over "
        "all images (default: %(default)s)",
    )
    timing.add_argument(
        "--warmup", type=int, default=1,
        help="untimed rounds before the timed ones, at least 1 so that compilation is "
        "excluded. A warm-up round runs one batch of each shape (default: %(default)s)",
    )
    timing.add_argument("--seed", type=int, default=0, help="parameter and random-scorer seed")
    timing.add_argument(
        "--out", type=pathlib.Path, default=None,
        help="write the JSON result to this file (default: print it to stdout)",
    )

    # Encoder sizes HIDDEN,DEPTH,HEADS,MLP that replace the variant's, for fast tests.
    parser.add_argument("--encoder-sizes", type=parse_int_list, default=None,
                        help=argparse.SUPPRESS)
    return parser


def default_patch_sizes(patch: int, resolution: int) -> tuple[int, ...]:
    """Return (p, 2p, 4p) without the coarsest sizes that do not divide ``resolution``.

    For example p = 16 at 224 px gives (16, 32), because 224 is not a multiple of 64.
    """
    sizes = [patch, 2 * patch, 4 * patch]
    while len(sizes) > 1 and resolution % sizes[-1]:
        sizes.pop()
    return tuple(sizes)


def resolve_patch_sizes(args: argparse.Namespace, patch: int) -> tuple[int, ...]:
    """Return the requested or default patch sizes, or raise ValueError."""
    image_size = (args.resolution, args.resolution)
    if args.patch_sizes is None:
        patch_sizes = default_patch_sizes(patch, args.resolution)
        if len(patch_sizes) < 3:
            logger.warning(
                "Patch size %d does not divide %d px, so the tiling uses patch sizes %s.",
                4 * patch, args.resolution, patch_sizes,
            )
    else:
        patch_sizes = args.patch_sizes
        if patch_sizes[0] != patch:
            raise ValueError(
                f"--patch-sizes {patch_sizes} starts at {patch_sizes[0]}, but --variant "
                f"{args.variant} has patch size {patch}. The smallest size must match it."
            )
    selection.validate_patch_sizes(patch_sizes, image_size)
    if len(patch_sizes) < 2:
        raise ValueError(
            f"Patch sizes {patch_sizes} leave nothing to adapt. Use a resolution that is a "
            f"multiple of {2 * patch}, or give --patch-sizes with at least two sizes."
        )
    return tuple(patch_sizes)


def resolve_thresholds(args: argparse.Namespace, scorer: str, levels: int) -> tuple[float, ...]:
    """Return the requested or default thresholds for ``levels`` patch sizes."""
    thresholds = args.thresholds
    if thresholds is None:
        if scorer == "constant":
            # Constant scores are +inf, so no threshold keeps a coarse patch.
            thresholds = (0.0,) * (levels - 1)
        elif scorer == "entropy" and levels - 1 <= len(APT_THRESHOLDS):
            thresholds = APT_THRESHOLDS[:levels - 1]
        else:
            raise ValueError(
                f"No default thresholds exist for the {scorer} scorer with {levels} patch "
                f"sizes. Give --thresholds with {levels - 1} values."
            )
    if len(thresholds) != levels - 1:
        raise ValueError(
            f"--thresholds {thresholds} has {len(thresholds)} values for {levels} patch "
            f"sizes. Give {levels - 1}, one per size except the smallest."
        )
    return tuple(thresholds)


def resolve_setup(args: argparse.Namespace) -> Setup:
    """Validate the arguments and derive the model sizes and tiling rule.

    Raises ValueError naming the invalid flag.
    """
    for flag, value in (
        ("--resolution", args.resolution),
        ("--batch-size", args.batch_size),
        ("--bins", args.bins),
        ("--num-buckets", args.num_buckets),
        ("--max-images-per-row", args.max_images_per_row),
        ("--repeats", args.repeats),
        ("--warmup", args.warmup),
    ):
        if value < 1:
            raise ValueError(f"{flag} {value} is invalid. Give at least 1.")
    for flag, value in (("--num-images", args.num_images), ("--pack-length", args.pack_length)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value} is invalid. Give at least 1.")

    name, patch = parse_variant(args.variant)
    hidden, depth, heads, mlp = VARIANTS[name]
    if args.encoder_sizes is not None:
        if len(args.encoder_sizes) != 4:
            raise ValueError("--encoder-sizes takes four integers: HIDDEN,DEPTH,HEADS,MLP.")
        hidden, depth, heads, mlp = args.encoder_sizes
    if hidden % heads:
        raise ValueError(f"Hidden size {hidden} is not divisible by {heads} attention heads.")

    patch_sizes = resolve_patch_sizes(args, patch)
    if args.all_smallest and args.scorer not in (None, "constant"):
        raise ValueError(
            f"--all-smallest uses the constant scorer, but --scorer {args.scorer} was given. "
            "Drop one of them."
        )
    scorer = "constant" if args.all_smallest else args.scorer or "entropy"
    thresholds = resolve_thresholds(args, scorer, len(patch_sizes))
    return Setup(
        variant=f"{name}/{patch}", hidden_size=hidden, depth=depth, num_heads=heads,
        mlp_dim=mlp, patch_sizes=patch_sizes, image_size=(args.resolution, args.resolution),
        scorer=scorer, thresholds=thresholds, bins=args.bins,
    )


def find_images(root: pathlib.Path) -> list[pathlib.Path]:
    """Return the JPEG and PNG files under ``root``, recursively, in sorted path order."""
    if not root.is_dir():
        raise ValueError(f"--images {root} is not a folder. Give a folder of JPEG or PNG files.")
    paths = sorted(
        path for path in root.rglob("*")
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    )
    if not paths:
        raise ValueError(
            f"No JPEG or PNG files found under {root}. Expected names ending in "
            f"{', '.join(IMAGE_SUFFIXES)}."
        )
    return paths


def load_image(path: pathlib.Path, resolution: int) -> np.ndarray:
    """Decode an image to RGB, resize its shorter side to ``resolution`` and center-crop.

    Returns uint8 pixels of shape (resolution, resolution, 3). Resizing is bilinear, which
    Pillow antialiases when it shrinks an image.
    """
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except OSError as error:
        raise ValueError(f"Cannot decode {path}: {error}. Remove or replace the file.") from error
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (
        max(resolution, round(width * scale)),
        max(resolution, round(height * scale)),
    )
    image = image.resize(new_size, Image.Resampling.BILINEAR)
    left = (new_size[0] - resolution) // 2
    top = (new_size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return np.asarray(image, np.uint8)


class HostTiler:
    """Score and tile uint8 images under ``jit`` on the host CPU.

    Calling it returns the flat tiling masks (images, total_patches) as NumPy booleans, in
    the flat token order of ``selection.flatten_masks``.
    """

    def __init__(self, setup: Setup, seed: int):
        self.setup = setup
        self._device = jax.devices("cpu")[0]
        with jax.default_device(self._device):
            self._rng = jax.random.PRNGKey(seed)
        self._select = jax.jit(self._flat_masks)

    def _flat_masks(self, images: jax.Array, rng: jax.Array) -> jax.Array:
        sizes = self.setup.patch_sizes
        if self.setup.scorer == "entropy":
            scores = scoring.entropy_scores(images, sizes, self.setup.bins)
        elif self.setup.scorer == "laplacian":
            scores = scoring.laplacian_scores(images, sizes)
        elif self.setup.scorer == "constant":
            scores = scoring.constant_scores(images, sizes)
        else:
            scores = scoring.random_scores(rng, images, sizes)
        masks = selection.threshold_tiling(scores, self.setup.thresholds)
        return selection.flatten_masks(masks)

    def __call__(self, images: np.ndarray, chunk_index: int) -> np.ndarray:
        """Tile one chunk. ``chunk_index`` seeds the random scorer, so reruns repeat it."""
        with jax.default_device(self._device):
            rng = jax.random.fold_in(self._rng, chunk_index)
            images = jax.device_put(images, self._device)
            return np.asarray(self._select(images, rng))


def split_chunks(images: np.ndarray, size: int) -> list[np.ndarray]:
    """Split images into consecutive chunks of ``size``, the last one possibly shorter."""
    return [images[start:start + size] for start in range(0, images.shape[0], size)]


def bucket_batches(
    images: np.ndarray, flat_masks: np.ndarray, buckets: Sequence[int], batch_size: int
) -> list[Batch]:
    """Arrange images into bucketed batches, unfinished buckets padded with weight-0 rows."""
    bucketer = sequence.Bucketer(buckets, batch_size)
    batches = []
    for image, flat_mask in zip(images, flat_masks):
        batch = bucketer.add({"image": image, "weight": np.float32(1.0)}, flat_mask)
        if batch is not None:
            batches.append(batch)
    batches.extend(bucketer.flush())
    return batches


def packed_batches(
    images: np.ndarray, flat_masks: np.ndarray, rows: int, pack_length: int,
    max_images_per_row: int,
) -> list[Batch]:
    """Arrange images into packed batches of ``rows`` rows by first fit."""
    packer = packing.Packer(rows, pack_length, max_images_per_row)
    batches = []
    for image, flat_mask in zip(images, flat_masks):
        batch = packer.add({"image": image, "weight": np.float32(1.0)}, flat_mask)
        if batch is not None:
            batches.append(batch)
    batches.extend(packer.flush())
    return batches


def uniform_batches(images: np.ndarray, batch_size: int) -> list[Batch]:
    """Split images into batches, the last one padded with weight-0 rows to a full batch."""
    return [
        sequence.pad_batch({"image": chunk}, batch_size)
        for chunk in split_chunks(images, batch_size)
    ]


def normalize_images(images: jax.Array) -> jax.Array:
    """Map uint8 pixels to [-1, 1], as training does."""
    return images.astype(jnp.float32) * (2.0 / 255.0) - 1.0


def make_forward(
    model: AdaptiveViT, name: str
) -> Callable[[Any, dict[str, jax.Array]], jax.Array]:
    """Return the jitted eval-mode forward pass of ``model`` on a dict of batch arrays.

    The dict contains ``image`` and, for the adaptive model, ``patch_index`` with either
    ``token_mask`` (bucketed) or ``segment_ids`` (packed). ``name`` becomes the function
    name that JAX reports with each compilation.
    """

    def forward(params: Any, inputs: dict[str, jax.Array]) -> jax.Array:
        return model.apply(
            {"params": params},
            normalize_images(inputs["image"]),
            inputs.get("patch_index"),
            inputs.get("token_mask"),
            segment_ids=inputs.get("segment_ids"),
            train=False,
        )

    forward.__name__ = forward.__qualname__ = name
    return jax.jit(forward)


def to_device(batches: Sequence[Batch], keys: Sequence[str]) -> list[dict[str, jax.Array]]:
    """Copy the model inputs of each batch to the default device before timing."""
    return [{key: jax.device_put(batch[key]) for key in keys} for batch in batches]


def time_forward_pass(
    forward: Callable[[Any, dict[str, jax.Array]], jax.Array],
    params: Any,
    inputs: Sequence[dict[str, jax.Array]],
) -> float:
    """Return the seconds to run ``forward`` over every batch, waiting for all outputs."""
    start = time.perf_counter()
    outputs = [forward(params, batch) for batch in inputs]
    jax.block_until_ready(outputs)
    return time.perf_counter() - start


def time_selection_pass(tiler: HostTiler, chunks: Sequence[np.ndarray]) -> float:
    """Return the seconds to score and tile every chunk, waiting for each result."""
    start = time.perf_counter()
    for index, chunk in enumerate(chunks):
        tiler(chunk, index)
    return time.perf_counter() - start


def encoder_layer_flops(tokens: int, hidden: int, mlp: int) -> int:
    """Return the FLOPs (2 per multiply-add) of one encoder layer on one sequence.

    Counts the query, key, value and output projections (4 d^2 per token), the MLP
    (2 d m per token) and the two attention matmuls QK^T and AV (2 T^2 d). Layer norms,
    softmax and GELU are left out.
    """
    return 2 * tokens * (4 * hidden * hidden + 2 * hidden * mlp) + 2 * 2 * tokens * tokens * hidden


def patch_embedding_flops(image_size: Sequence[int], hidden: int, levels: int) -> int:
    """Return the FLOPs of the strided-convolution patch projections of one RGB image.

    Every pixel enters exactly one patch per level, so each level costs H * W * 3 * d
    multiply-adds whatever its patch size. ``MixedPatchEmbedding`` in 'separate' mode
    projects every level that some token of the batch uses, for every image of the batch.
    """
    return 2 * image_size[0] * image_size[1] * 3 * hidden * levels


def levels_used(patch_index: np.ndarray, setup: Setup) -> int:
    """Return how many patch sizes the flat indices ``patch_index`` refer to.

    The smallest size always counts: padding entries point at its patch 0.
    """
    offsets = selection.level_offsets(setup.image_size, setup.patch_sizes)
    coarse = sum(
        bool(((patch_index >= offsets[k]) & (patch_index < offsets[k + 1])).any())
        for k in range(1, len(setup.patch_sizes))
    )
    return 1 + coarse


def count_flops(
    batches: Sequence[Batch], setup: Setup, tokens: int | None = None
) -> dict[str, float]:
    """Return the encoder and patch-embedding FLOPs of running ``batches``, padding included.

    A batch's sequence length is its ``patch_index`` width, or ``tokens`` for the uniform
    model. The embedding runs once per image in the batch's image array, so filler rows
    and empty packed slots count as well. It runs the levels that a bucketed batch's
    tokens use, and every level for packed rows, which embed every patch of every slot.
    """
    encoder = 0
    embedding = 0
    for batch in batches:
        if "patch_index" in batch:
            rows, length = batch["patch_index"].shape
            if "segment_ids" in batch:
                levels = len(setup.patch_sizes)
            else:
                levels = levels_used(batch["patch_index"], setup)
        else:
            rows, length = batch["image"].shape[0], tokens
            levels = 1
        layer = encoder_layer_flops(length, setup.hidden_size, setup.mlp_dim)
        encoder += rows * setup.depth * layer
        embedding += batch["image"].shape[0] * patch_embedding_flops(
            setup.image_size, setup.hidden_size, levels
        )
    return {"encoder": float(encoder), "patch_embedding": float(embedding),
            "total": float(encoder + embedding)}


def count_padding(batches: Sequence[Batch]) -> tuple[int, int]:
    """Return (padding positions, all token positions) over the adaptive batches.

    A position is padding when it contains no token, or a token of a weight-0 filler image.
    """
    padded = 0
    positions = 0
    for batch in batches:
        size = batch["patch_index"].size
        padded += round(packing.padding_fraction(batch) * size)
        positions += size
    return padded, positions


def cpu_model_name() -> str:
    """Return the CPU model name, from /proc/cpuinfo on Linux where platform has none."""
    name = platform.processor()
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return name


def total_memory_gib() -> float | None:
    """Return the physical memory in GiB, or None where sysconf cannot report it."""
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (AttributeError, ValueError, OSError):
        return None


def describe_machine() -> dict[str, Any]:
    """Return the platform, CPU, memory, JAX version and device of this run."""
    device = jax.devices()[0]
    try:
        load_average = [round(value, 2) for value in os.getloadavg()]
    except OSError:
        load_average = None
    return {
        "platform": platform.platform(),
        "processor": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "memory_gib": total_memory_gib(),
        "python_version": platform.python_version(),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        # Load over 1, 5 and 15 minutes when the timing ended. Other work on the machine
        # slows both models.
        "load_average": load_average,
    }


def compiled_program_count(
    forward: Any, compile_events: int, inputs: Sequence[dict[str, jax.Array]]
) -> tuple[int, str]:
    """Return the number of programs ``forward`` compiled and where that number comes from.

    ``compile_events`` is the count of XLA compilations that ``profiling`` recorded for
    it. A program loaded from a persistent compilation cache records no event, so a count
    of 0 falls back to the private ``_cache_size()`` of jitted functions (present in jax
    0.10.2), and then to the number of distinct input shape signatures.
    """
    if compile_events > 0:
        return compile_events, "XLA compile events"
    cache_size = getattr(forward, "_cache_size", None)
    if callable(cache_size):
        return int(cache_size()), "jit cache size"
    signatures = {
        tuple(sorted((key, value.shape, str(value.dtype)) for key, value in batch.items()))
        for batch in inputs
    }
    return len(signatures), "distinct input shapes"


def load_images(paths: Sequence[pathlib.Path], resolution: int) -> np.ndarray:
    """Load every image as uint8 (len(paths), resolution, resolution, 3)."""
    return np.stack([load_image(path, resolution) for path in paths])


def arrange_adaptive(
    args: argparse.Namespace, setup: Setup, images: np.ndarray, flat_masks: np.ndarray
) -> tuple[list[Batch], dict[str, Any]]:
    """Arrange tiled images into the adaptive batches and describe the layout."""
    if args.sequence in ("bucket", "sort"):
        buckets = sequence.default_buckets(
            setup.coarsest_tokens, setup.uniform_tokens, args.num_buckets
        )
        if args.sequence == "bucket":
            batches = bucket_batches(images, flat_masks, buckets, args.batch_size)
        else:
            examples = [{"image": image, "weight": np.float32(1.0)} for image in images]
            batches = sequence.sorted_batches(examples, flat_masks, buckets, args.batch_size)
        return batches, {"buckets": list(buckets)}
    pack_length = args.pack_length or setup.uniform_tokens
    batches = packed_batches(
        images, flat_masks, args.batch_size, pack_length, args.max_images_per_row
    )
    return batches, {"pack_length": pack_length, "max_images_per_row": args.max_images_per_row}


def build_models(setup: Setup, seed: int) -> tuple[AdaptiveViT, Any, AdaptiveViT, Any]:
    """Return (adaptive model, its params, uniform model, its params), randomly initialised."""
    sizes = dict(
        hidden_size=setup.hidden_size, depth=setup.depth, num_heads=setup.num_heads,
        mlp_dim=setup.mlp_dim,
    )
    adaptive = AdaptiveViT(
        num_classes=NUM_CLASSES, image_size=setup.image_size, patch_sizes=setup.patch_sizes,
        **sizes,
    )
    uniform = AdaptiveViT(
        num_classes=NUM_CLASSES, image_size=setup.image_size,
        patch_sizes=(setup.patch_sizes[0],), **sizes,
    )
    dummy = jnp.zeros((1, *setup.image_size, 3), jnp.float32)
    adaptive_key, uniform_key = jax.random.split(jax.random.PRNGKey(seed))
    adaptive_params = jax.jit(adaptive.init)(adaptive_key, dummy)["params"]
    uniform_params = jax.jit(uniform.init)(uniform_key, dummy)["params"]
    return adaptive, adaptive_params, uniform, uniform_params


def one_per_shape(items: Sequence[Any]) -> list[Any]:
    """Return the first item of each distinct array-shape signature, in order."""
    seen = set()
    chosen = []
    for item in items:
        arrays = item.items() if isinstance(item, dict) else [("", item)]
        key = tuple(sorted((name, value.shape, str(value.dtype)) for name, value in arrays))
        if key not in seen:
            seen.add(key)
            chosen.append(item)
    return chosen


def run_rounds(
    args: argparse.Namespace,
    tiler: HostTiler,
    chunks: Sequence[np.ndarray],
    passes: dict[str, tuple[Callable, Any, list[dict[str, jax.Array]]]],
) -> tuple[dict[str, list[float]], collections.Counter, collections.Counter]:
    """Run warm-up rounds, then timed rounds.

    Each timed round runs one selection pass, then the adaptive and uniform forward
    passes, in an order that swaps every round so neither model always runs first. A
    warm-up round runs the same passes over one input of each shape only, which compiles
    every program without the cost of a whole pass. Returns the timed seconds of each
    pass and the XLA compilations by function name during the warm-up and the timed
    rounds.
    """
    seconds: dict[str, list[float]] = {"selection": [], "adaptive": [], "uniform": []}
    warmup_compiles: collections.Counter = collections.Counter()
    timed_compiles: collections.Counter = collections.Counter()
    for round_index in range(args.warmup + args.repeats):
        timed = round_index >= args.warmup
        order = ("adaptive", "uniform") if round_index % 2 == 0 else ("uniform", "adaptive")
        with profiling.count_compilations() as compiles:
            round_chunks = chunks if timed else one_per_shape(chunks)
            times = {"selection": time_selection_pass(tiler, round_chunks)}
            for name in order:
                forward, params, inputs = passes[name]
                round_inputs = inputs if timed else one_per_shape(inputs)
                times[name] = time_forward_pass(forward, params, round_inputs)
        label = f"round {round_index - args.warmup + 1}" if timed else "warm-up round"
        logger.info(
            "%s: selection %.3f s, adaptive %.3f s, uniform %.3f s", label,
            times["selection"], times["adaptive"], times["uniform"],
        )
        if not timed:
            warmup_compiles.update(compiles)
            continue
        if compiles:
            logger.warning("%s compiled %s, so its times include compilation.", label,
                           dict(compiles))
        timed_compiles.update(compiles)
        for name, value in times.items():
            seconds[name].append(value)
    return seconds, warmup_compiles, timed_compiles


def compare_flops(
    setup: Setup, adaptive_batches: Sequence[Batch], plain_batches: Sequence[Batch],
    flat_masks: np.ndarray,
) -> dict[str, Any]:
    """Return the ideal speedups from FLOPs and the FLOPs per image of both models.

    ``ideal_speedup`` divides the uniform model's FLOPs by the adaptive model's over the
    batches actually run, padding included. ``ideal_speedup_without_padding`` uses each
    image's own tiling ``flat_masks`` instead (its token count and the levels it uses),
    with no filler rows or empty slots.
    """
    num_images = flat_masks.shape[0]
    adaptive_flops = count_flops(adaptive_batches, setup)
    uniform_flops = count_flops(plain_batches, setup, setup.uniform_tokens)

    unpadded_adaptive = sum(
        setup.depth * encoder_layer_flops(int(mask.sum()), setup.hidden_size, setup.mlp_dim)
        + patch_embedding_flops(
            setup.image_size, setup.hidden_size, levels_used(np.flatnonzero(mask), setup)
        )
        for mask in flat_masks
    )
    unpadded_uniform = num_images * (
        setup.depth * encoder_layer_flops(setup.uniform_tokens, setup.hidden_size, setup.mlp_dim)
        + patch_embedding_flops(setup.image_size, setup.hidden_size, 1)
    )
    return {
        "ideal_speedup": uniform_flops["total"] / adaptive_flops["total"],
        "ideal_speedup_without_padding": unpadded_uniform / unpadded_adaptive,
        "flops_per_image": {
            "adaptive": {key: value / num_images for key, value in adaptive_flops.items()},
            "uniform": {key: value / num_images for key, value in uniform_flops.items()},
            "counted": "encoder projections, MLP and attention matmuls, plus patch-embedding "
            "convolutions, over the batches actually run with padding, filler rows and empty "
            "slots. Layer norms, softmax, GELU, embedding sums, gathers, pooling and the head "
            "are excluded.",
        },
    }


def describe_settings(
    args: argparse.Namespace, setup: Setup, num_images: int, layout: dict[str, Any],
    adaptive_batches: Sequence[Batch], plain_batches: Sequence[Batch],
) -> dict[str, Any]:
    """Return the resolved settings of a run for the JSON result."""
    shapes = sorted({batch["patch_index"].shape for batch in adaptive_batches})
    return {
        "images": str(args.images),
        "num_images": num_images,
        "variant": setup.variant,
        "encoder": {"hidden_size": setup.hidden_size, "depth": setup.depth,
                    "num_heads": setup.num_heads, "mlp_dim": setup.mlp_dim},
        "resolution": args.resolution,
        "patch_sizes": list(setup.patch_sizes),
        "scorer": setup.scorer,
        "thresholds": list(setup.thresholds),
        "bins": setup.bins,
        "sequence": args.sequence,
        **layout,
        "batch_size": args.batch_size,
        "adaptive_batches": len(adaptive_batches),
        # Distinct (rows, tokens) shapes of the adaptive patch_index, one program each.
        "adaptive_batch_shapes": [list(shape) for shape in shapes],
        "uniform_batches": len(plain_batches),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "dtype": "float32",
        "seed": args.seed,
    }


def run_benchmark(
    args: argparse.Namespace, setup: Setup, paths: Sequence[pathlib.Path]
) -> dict[str, Any]:
    """Load, tile and arrange the images, time both models and return the result dict."""
    logger.info("Loading %d images at %d px", len(paths), args.resolution)
    images = load_images(paths, args.resolution)
    num_images = images.shape[0]

    tiler = HostTiler(setup, args.seed)
    chunks = split_chunks(images, args.batch_size)
    flat_masks = np.concatenate([tiler(chunk, index) for index, chunk in enumerate(chunks)])
    tokens = flat_masks.sum(axis=1)

    adaptive_batches, layout = arrange_adaptive(args, setup, images, flat_masks)
    plain_batches = uniform_batches(images, args.batch_size)
    mask_key = "segment_ids" if args.sequence == "pack" else "token_mask"
    adaptive_inputs = to_device(adaptive_batches, ("image", "patch_index", mask_key))
    uniform_inputs = to_device(plain_batches, ("image",))

    adaptive, adaptive_params, uniform, uniform_params = build_models(setup, args.seed)
    adaptive_forward = make_forward(adaptive, "adaptive_forward")
    uniform_forward = make_forward(uniform, "uniform_forward")
    logger.info(
        "%d adaptive and %d uniform batches, running %d warm-up and %d timed rounds",
        len(adaptive_inputs), len(uniform_inputs), args.warmup, args.repeats,
    )
    seconds, warmup_compiles, timed_compiles = run_rounds(args, tiler, chunks, {
        "adaptive": (adaptive_forward, adaptive_params, adaptive_inputs),
        "uniform": (uniform_forward, uniform_params, uniform_inputs),
    })

    medians = {name: statistics.median(values) for name, values in seconds.items()}
    adaptive_img_per_s = num_images / medians["adaptive"]
    uniform_img_per_s = num_images / medians["uniform"]
    speedup = adaptive_img_per_s / uniform_img_per_s
    selection_per_image = medians["selection"] / num_images
    forward_per_image = medians["adaptive"] / num_images

    flops = compare_flops(setup, adaptive_batches, plain_batches, flat_masks)
    padded, positions = count_padding(adaptive_batches)
    compiles = warmup_compiles + timed_compiles
    programs, programs_source = compiled_program_count(
        adaptive_forward, compiles["adaptive_forward"], adaptive_inputs
    )
    uniform_programs, _ = compiled_program_count(
        uniform_forward, compiles["uniform_forward"], uniform_inputs
    )

    return {
        "adaptive_img_per_s": adaptive_img_per_s,
        "uniform_img_per_s": uniform_img_per_s,
        "speedup": speedup,
        # Uniform over adaptive pass time of each round; both passes of a round share the
        # machine's load, so their spread shows how precise ``speedup`` is.
        "round_speedups": [
            uniform_time / adaptive_time
            for adaptive_time, uniform_time in zip(seconds["adaptive"], seconds["uniform"])
        ],
        "tokens_per_image": {"adaptive": float(tokens.mean()), "uniform": setup.uniform_tokens},
        "padding_fraction": padded / positions,
        "compiled_programs": programs,
        "compiled_programs_source": programs_source,
        "compiled_programs_uniform": uniform_programs,
        # Compilations inside the timed rounds, by function name. The warm-up runs every
        # batch, so this stays empty unless JAX recompiles a shape it has seen.
        "compilations_during_timing": dict(timed_compiles),
        "ideal_speedup": flops["ideal_speedup"],
        "efficiency": speedup / flops["ideal_speedup"],
        "ideal_speedup_without_padding": flops["ideal_speedup_without_padding"],
        "flops_per_image": flops["flops_per_image"],
        "selection_fraction": selection_per_image / (selection_per_image + forward_per_image),
        "selection_img_per_s": num_images / medians["selection"],
        "median_pass_seconds": medians,
        "pass_seconds": seconds,
        "settings": describe_settings(args, setup, num_images, layout, adaptive_batches,
                                      plain_batches),
        "machine": describe_machine(),
    }


def format_summary(result: dict[str, Any]) -> str:
    """Return a few human-readable lines summarising a result."""
    settings = result["settings"]
    tokens = result["tokens_per_image"]
    return "\n".join([
        f"{settings['variant']} at {settings['resolution']} px, {settings['num_images']} "
        f"images, {settings['sequence']}, batch {settings['batch_size']}, median of "
        f"{settings['repeats']} rounds:",
        f"  adaptive {result['adaptive_img_per_s']:9.2f} img/s  ({tokens['adaptive']:.1f} "
        f"tokens/image, {100 * result['padding_fraction']:.1f}% padding, "
        f"compiled programs: {result['compiled_programs']})",
        f"  uniform  {result['uniform_img_per_s']:9.2f} img/s  ({tokens['uniform']} "
        "tokens/image)",
        f"  speedup {result['speedup']:.2f}x, ideal {result['ideal_speedup']:.2f}x from FLOPs, "
        f"efficiency {result['efficiency']:.2f}",
        f"  speedup per round from {min(result['round_speedups']):.2f}x to "
        f"{max(result['round_speedups']):.2f}x, median "
        f"{statistics.median(result['round_speedups']):.2f}x",
        f"  host selection: {100 * result['selection_fraction']:.1f}% of adaptive time per "
        "image",
    ])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark with command-line arguments ``argv`` and return the result."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        setup = resolve_setup(args)
        paths = find_images(args.images)
    except ValueError as error:
        parser.error(str(error))
    if args.num_images is not None:
        paths = paths[:args.num_images]

    result = run_benchmark(args, setup, paths)
    result["command"] = reporting.command_line("experiments.throughput", argv)
    result["date"] = reporting.utc_now()

    reporting.write_report(result, args.out, logger)
    print(format_summary(result))
    return result


if __name__ == "__main__":
    # force: an imported library has already attached a handler to the root logger.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        force=True)
    main()
