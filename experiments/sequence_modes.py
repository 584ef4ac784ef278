"""Training throughput with bucketed against packed sequences, on real images.

For each image source and each sequence mode, the benchmark scores and tiles real images
on the host CPU with ``HostSelector``, as the input pipeline does. It arranges the
tilings into batches and times jitted train steps (``train.train_step``, state donated)
of an adaptive ViT:

  bucket: ``sequence.Bucketer`` with ``sequence.default_buckets(coarsest, uniform, 4)``.
          Each image is padded to the smallest bucket that fits it, and a batch contains
          ``--batch-size`` images of one bucket. One program compiles per bucket.
  pack:   ``packing.Packer`` with a lookahead. Rows hold ``pack_length`` tokens and at
          most ``max_images_per_row`` images, and a batch has
          ``batch_size // max_images_per_row`` rows, so it has as many image slots as a
          bucketed batch. One program compiles.

Sources (``SOURCES``):

  cifar10:          DIR/train/<class>/<image> at 32x32, patch sizes 4, 8 and 16, 64-bin
                    entropy, thresholds (4.0, 4.4) and the encoder of configs/cifar10.py
                    (hidden 128, depth 4, 4 heads, MLP 256).
  imagenet-samples: a flat folder of photos, shorter side resized to 384 px and center
                    cropped, patch sizes 16, 32 and 64, 512-bin entropy, thresholds
                    (5.75, 4.0), encoder hidden 192, depth 4, 3 heads, MLP 384.

Pack settings. On 4000 random CIFAR-10 training images the cifar10 rule gives 38.1
tokens per image on average (4 to 64), and on the 500 photos of imagenet-samples the
384-px rule gives 463 (144 to 576). Both sources use 4 images per row, with
``pack_length`` 148 for cifar10 and 1728 (3 times 576) for imagenet-samples, just below
4 times the mean, so rows are limited by tokens rather than by image slots. Where
``pack_length`` exceeds ``max_images_per_row`` times the mean, rows of 4 images hold
fewer tokens than ``pack_length`` on average, so a long run keeps at least
``1 - 4 * mean / pack_length`` padding (4.7 % for 160 tokens on cifar10). In a host-only
replay of those token counts, ``packing.Packer`` with these settings and a lookahead of
4 batches left 0.2 % (cifar10) and 0.9 % (imagenet-samples) padding in steady state.

Packed rows use dense attention with a block-diagonal mask, so a row costs attention
FLOPs quadratic in ``pack_length`` even where its images are short. Bucketing instead
pays for the padding up to each bucket. The images per second show which costs more.

Timing. Both arrangers first emit ``--burn-in-batches`` batches that are not trained,
so that their pending images resemble those of a long run. In the replay above, the
first 40 packed cifar10 batches held images of 37.0 tokens on average against 38.1 in
the stream. Rows of exactly 4 images and 148 tokens took the smaller images first, while
the larger ones piled up among the pending images. From the 60th batch on, every window
of 20 packed batches was within about 1 % of the stream, and every window of 20
bucketed batches within 5 %.

All batches are then built and copied to the device before timing. Warm-up runs one
step on the first batch of each distinct shape, so the timed steps compile nothing. The
modes of a source then take turns in blocks of ``TIMING_BLOCK_STEPS`` timed steps, so
that other load on the machine affects them about equally. ``images_per_sec`` divides the real
images of the timed steps by their wall time. Parameters start from a random
initialisation, and labels of a flat folder are file indices, since the timed
computation depends on neither.

Example:

  python -m experiments.sequence_modes --cifar10 /data/cifar10 \\
      --imagenet-samples /data/imagenet-samples --out sequence_modes.json
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import logging
import pathlib
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adaptive_jax import config as config_lib
from adaptive_jax import packing, profiling, selection, sequence, train
from adaptive_jax.data.pipeline import HostSelector
from experiments import reporting
from experiments.throughput import describe_machine, find_images, load_image

logger = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]

MODES = ("bucket", "pack")
NUM_BUCKETS = 4
# Timed steps that one mode runs before the next mode takes its turn.
TIMING_BLOCK_STEPS = 5
# Head size for a flat folder, whose labels are file indices modulo this count.
FLAT_NUM_CLASSES = 1000
RESULT_KEYS = (
    "padding_fraction",
    "compiled_programs",
    "images_per_sec",
    "tokens_per_image",
    "steps",
    "settings",
)


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """Tiling rule, encoder and packed layout of one image source."""

    name: str
    # "classes" for ROOT/train/<class>/<image>, "flat" for a folder of photos.
    layout: str
    resolution: int
    patch_sizes: tuple[int, ...]
    bins: int
    thresholds: tuple[float, ...]
    hidden_size: int
    depth: int
    num_heads: int
    mlp_dim: int
    # Tokens per packed row, see the module doc.
    pack_length: int
    max_images_per_row: int
    default_batch_size: int
    # Images scored and tiled together by one HostSelector call.
    selection_chunk: int

    def grid_tokens(self) -> tuple[int, int]:
        """Return the (all-smallest, all-largest) token counts of one image."""
        size = (self.resolution, self.resolution)
        grids = selection.grid_shapes(size, self.patch_sizes)
        return grids[0][0] * grids[0][1], grids[-1][0] * grids[-1][1]


SOURCES = {
    "cifar10": SourceSpec(
        name="cifar10", layout="classes", resolution=32, patch_sizes=(4, 8, 16), bins=64,
        thresholds=(4.0, 4.4), hidden_size=128, depth=4, num_heads=4, mlp_dim=256,
        pack_length=148, max_images_per_row=4, default_batch_size=128,
        selection_chunk=256,
    ),
    "imagenet-samples": SourceSpec(
        name="imagenet-samples", layout="flat", resolution=384, patch_sizes=(16, 32, 64),
        bins=512, thresholds=(5.75, 4.0), hidden_size=192, depth=4, num_heads=3,
        mlp_dim=384, pack_length=1728, max_images_per_row=4, default_batch_size=16,
        selection_chunk=32,
    ),
}


def parse_int_list(text: str) -> tuple[int, ...]:
    """Parse a comma-separated list of integers such as '32,1,2,64'."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers, for example '32,1,2,64'."
        ) from error


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser of the benchmark."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.sequence_modes",
        description=(
            "Time jitted train steps of an adaptive ViT on bucketed and on packed batches "
            "of real images, and report padding, compiled programs and images per second."
        ),
    )

    parser.add_argument(
        "--cifar10", type=pathlib.Path, default=None,
        help="CIFAR-10 image folder with train/<class>/<image> (32x32 JPEG or PNG files)",
    )
    parser.add_argument(
        "--imagenet-samples", type=pathlib.Path, default=None,
        help="flat folder of JPEG or PNG photos, read recursively",
    )

    parser.add_argument(
        "--steps", type=int, default=30,
        help="timed train steps per source and mode, after the warm-up (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None,
        help="images per bucketed batch for every source. Packed batches get batch_size // "
        "max_images_per_row rows (default: 128 for cifar10, 16 for imagenet-samples)",
    )

    parser.add_argument(
        "--lookahead-batches", type=int, default=4,
        help="pending images the packer chooses rows from, in batches of image slots. 0 "
        "places images by first fit as they arrive (default: %(default)s)",
    )
    parser.add_argument(
        "--burn-in-batches", type=int, default=60,
        help="batches that each arranger emits before the ones trained, left untrained "
        "(default: %(default)s)",
    )

    parser.add_argument(
        "--seed", type=int, default=0, help="image order and parameter seed (default: 0)",
    )
    parser.add_argument(
        "--out", type=pathlib.Path, default=None,
        help="write the JSON result to this file (default: print it to stdout)",
    )

    # Encoder sizes HIDDEN,DEPTH,HEADS,MLP that replace every source's, for fast tests.
    parser.add_argument("--encoder-sizes", type=parse_int_list, default=None,
                        help=argparse.SUPPRESS)
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the first invalid flag."""
    if args.cifar10 is None and args.imagenet_samples is None:
        raise ValueError("No source given. Pass --cifar10 DIR, --imagenet-samples DIR or both.")
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps} is invalid. Give at least 1.")
    for flag, value in (("--lookahead-batches", args.lookahead_batches),
                        ("--burn-in-batches", args.burn_in_batches)):
        if value < 0:
            raise ValueError(f"{flag} {value} is invalid. Give 0 or more.")
    if args.batch_size is not None:
        slots = max(spec.max_images_per_row for spec in SOURCES.values())
        if args.batch_size < slots:
            raise ValueError(
                f"--batch-size {args.batch_size} is less than the {slots} images of one "
                f"packed row. Give at least {slots}."
            )
    if args.encoder_sizes is not None:
        if len(args.encoder_sizes) != 4:
            raise ValueError("--encoder-sizes takes four integers: HIDDEN,DEPTH,HEADS,MLP.")
        hidden, _, heads, _ = args.encoder_sizes
        if heads < 1 or hidden % heads:
            raise ValueError(f"Hidden size {hidden} is not divisible by {heads} attention heads.")


def list_images(spec: SourceSpec, root: pathlib.Path) -> tuple[list[pathlib.Path], np.ndarray, int]:
    """Return the image paths of a source, their int32 labels and the number of classes."""
    if spec.layout == "flat":
        paths = find_images(root)
        labels = np.arange(len(paths), dtype=np.int32) % FLAT_NUM_CLASSES
        return paths, labels, FLAT_NUM_CLASSES

    train_dir = root / "train"
    class_dirs = []
    if train_dir.is_dir():
        class_dirs = sorted(path for path in train_dir.iterdir() if path.is_dir())
    if not class_dirs:
        raise ValueError(
            f"--{spec.name} {root} has no class folders under train/. Expected "
            f"{root}/train/<class>/<image>."
        )
    paths: list[pathlib.Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        class_paths = find_images(class_dir)
        paths.extend(class_paths)
        labels.extend([label] * len(class_paths))
    return paths, np.asarray(labels, np.int32), len(class_dirs)


class ImageStream:
    """Decoded images of one source in a seeded random order, reshuffled every pass.

    Images are decoded on first use and kept in memory, so every mode of a source reads
    the same images in the same order and decodes them once.
    """

    def __init__(self, paths: Sequence[pathlib.Path], labels: np.ndarray, resolution: int,
                 seed: int):
        self.paths = list(paths)
        self.labels = labels
        self.resolution = resolution
        self.seed = seed
        self._cache: dict[int, np.ndarray] = {}

    def _order(self) -> Iterator[int]:
        rng = np.random.default_rng(self.seed)
        while True:
            yield from rng.permutation(len(self.paths)).tolist()

    def _image(self, index: int) -> np.ndarray:
        if index not in self._cache:
            self._cache[index] = load_image(self.paths[index], self.resolution)
        return self._cache[index]

    def chunks(self, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (images, labels) chunks of ``size`` forever, from the start of the order.

        Images are uint8 (size, resolution, resolution, 3) and labels int32 (size,).
        """
        order = self._order()
        while True:
            indices = [next(order) for _ in range(size)]
            images = np.stack([self._image(index) for index in indices])
            yield images, self.labels[indices]


def make_config(spec: SourceSpec, args: argparse.Namespace,
                total_steps: int) -> ml_collections.ConfigDict:
    """Return the config that ``HostSelector``, ``create_model`` and ``create_optimizer`` read."""
    config = config_lib.default_config()
    config.image_size = (spec.resolution, spec.resolution)
    config.patch_sizes = spec.patch_sizes
    config.selection.scorer = "entropy"
    config.selection.mode = "threshold"
    config.selection.bins = spec.bins
    config.selection.thresholds = spec.thresholds
    hidden, depth, heads, mlp = args.encoder_sizes or (
        spec.hidden_size, spec.depth, spec.num_heads, spec.mlp_dim
    )
    config.model.hidden_size = hidden
    config.model.depth = depth
    config.model.num_heads = heads
    config.model.mlp_dim = mlp
    config.total_steps = total_steps
    return config


def make_arranger(
    mode: str, spec: SourceSpec, batch_size: int, lookahead_batches: int
) -> tuple[sequence.Bucketer | packing.Packer, dict[str, Any]]:
    """Return a fresh Bucketer or Packer for ``mode`` and the layout settings it uses."""
    uniform, coarsest = spec.grid_tokens()
    if mode == "bucket":
        buckets = sequence.default_buckets(coarsest, uniform, NUM_BUCKETS)
        return sequence.Bucketer(buckets, batch_size), {"buckets": list(buckets)}
    per_row = spec.max_images_per_row
    rows = batch_size // per_row
    pack_length = spec.pack_length
    lookahead = lookahead_batches * rows * per_row
    packer = packing.Packer(rows, pack_length, per_row, lookahead=lookahead)
    return packer, {
        "pack_length": pack_length,
        "max_images_per_row": per_row,
        "rows": rows,
        "image_slots": rows * per_row,
        "lookahead_images": lookahead,
        "packer": "best fill with lookahead" if lookahead else "first fit",
    }


def arrange_batches(
    stream: ImageStream, selector: HostSelector, arranger: sequence.Bucketer | packing.Packer,
    num_batches: int, chunk: int,
) -> tuple[list[Batch], float]:
    """Tile streamed images and arrange them until ``num_batches`` batches are complete.

    Returns the batches and the seconds spent in the arranger's ``add`` calls. Unfinished
    batches are left unflushed, as in training.
    """
    batches: list[Batch] = []
    arrange_seconds = 0.0
    for images, labels in stream.chunks(chunk):
        flat_masks = selector(images)
        for image, label, flat_mask in zip(images, labels, flat_masks):
            start = time.perf_counter()
            batch = arranger.add(
                {"image": image, "label": label, "weight": np.float32(1.0)}, flat_mask
            )
            arrange_seconds += time.perf_counter() - start
            if batch is None:
                continue
            batches.append(batch)
            if len(batches) == num_batches:
                return batches, arrange_seconds
    raise AssertionError("ImageStream.chunks never ends")


def batch_shape(batch: Batch) -> tuple:
    """Return the (key, shape, dtype) signature that decides which program a batch runs."""
    return tuple(sorted((key, value.shape, str(value.dtype)) for key, value in batch.items()))


def warmup_batches(batches: Sequence[Batch]) -> list[Batch]:
    """Return the first batch of each distinct shape, in order of first appearance."""
    seen: dict[tuple, Batch] = {}
    for batch in batches:
        seen.setdefault(batch_shape(batch), batch)
    return list(seen.values())


def count_tokens(batches: Sequence[Batch]) -> tuple[int, int, int]:
    """Return (real tokens, all token positions, real images) over ``batches``.

    A real token belongs to an image of weight above 0, so flush fillers and empty
    packed slots count as padding, as in ``packing.padding_fraction``.
    """
    real_tokens = 0
    positions = 0
    real_images = 0
    for batch in batches:
        size = batch["patch_index"].size
        real_tokens += round((1.0 - packing.padding_fraction(batch)) * size)
        positions += size
        real_images += int((batch["weight"] > 0).sum())
    return real_tokens, positions, real_images


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The model, optimizer and initial train state that every mode of a source starts from."""

    config: ml_collections.ConfigDict
    model: Any
    tx: Any
    initial_state: train.TrainState

    @classmethod
    def create(cls, spec: SourceSpec, args: argparse.Namespace, num_classes: int) -> Trainer:
        # The schedule only sets learning rates. It covers the warm-up, at most one step
        # per bucket, and the timed steps.
        config = make_config(spec, args, total_steps=args.steps + NUM_BUCKETS)
        model = train.create_model(config, num_classes)
        tx = train.create_optimizer(config)
        # One compiled program instead of one per operation of an eager initialisation.
        init = jax.jit(functools.partial(train.init_state, config=config, model=model, tx=tx))
        return cls(config, model, tx, init(jax.random.PRNGKey(args.seed)))

    def fresh_state(self) -> train.TrainState:
        """Return a copy of the initial state, which a donating step may consume."""
        return jax.tree_util.tree_map(jnp.copy, self.initial_state)


class CaseRun:
    """One (source, mode) pair: its batches, its train state and its timings.

    ``warmup_batches`` and ``timed_batches`` stay on the host for counting tokens, and
    copies on the device feed the steps. Compilations are counted per call of
    ``warm_up`` and ``run_block``, because the jitted steps of all modes are named
    ``train_step`` and one counter could not tell them apart.
    """

    def __init__(self, mode: str, trainer: Trainer, warmup: Sequence[Batch],
                 timed: Sequence[Batch], layout: dict[str, Any], arrange_ms_per_batch: float):
        self.mode = mode
        self.layout = layout
        self.arrange_ms_per_batch = arrange_ms_per_batch
        self.warmup_batches = list(warmup)
        self.timed_batches = list(timed)
        self.train_fn = jax.jit(
            functools.partial(train.train_step, model=trainer.model, tx=trainer.tx,
                              label_smoothing=0.0),
            donate_argnums=(0,),
        )
        self.state = trainer.fresh_state()
        self.warmup = jax.device_put(self.warmup_batches)
        self.timed = jax.device_put(self.timed_batches)
        self.compiles: collections.Counter = collections.Counter()
        self.timed_compiles: collections.Counter = collections.Counter()
        self.seconds = 0.0
        self.metrics: dict[str, jax.Array] = {}

    def _run(self, batches: Sequence[dict[str, jax.Array]]) -> collections.Counter:
        """Run one step per batch, wait for the last, and return the compilations."""
        with profiling.count_compilations() as compiles:
            for batch in batches:
                self.state, self.metrics = self.train_fn(self.state, batch)
            jax.block_until_ready((self.state, self.metrics))
        self.compiles.update(compiles)
        return compiles

    def warm_up(self) -> None:
        """Run the untimed steps, one per distinct batch shape."""
        self._run(self.warmup)

    def run_block(self, start: int, stop: int) -> None:
        """Run and time the timed steps ``start`` to ``stop`` (exclusive)."""
        begin = time.perf_counter()
        compiles = self._run(self.timed[start:stop])
        self.seconds += time.perf_counter() - begin
        self.timed_compiles.update(compiles)


def prepare_case(
    args: argparse.Namespace, spec: SourceSpec, mode: str, stream: ImageStream,
    selector: HostSelector, trainer: Trainer,
) -> CaseRun:
    """Arrange the batches of one mode and run its warm-up steps."""
    batch_size = args.batch_size or spec.default_batch_size
    arranger, layout = make_arranger(mode, spec, batch_size, args.lookahead_batches)
    num_batches = args.burn_in_batches + args.steps
    batches, arrange_seconds = arrange_batches(
        stream, selector, arranger, num_batches, spec.selection_chunk
    )
    timed = batches[args.burn_in_batches:]
    warmup = warmup_batches(timed)
    logger.info("%s %s: %d warm-up and %d timed steps", spec.name, mode, len(warmup),
                len(timed))
    run = CaseRun(mode, trainer, warmup, timed, {**layout, "batch_size": batch_size},
                  arrange_ms_per_batch=1000.0 * arrange_seconds / num_batches)
    run.warm_up()
    return run


def time_interleaved(runs: Sequence[CaseRun], steps: int) -> None:
    """Time every run's steps in alternating blocks of ``TIMING_BLOCK_STEPS``.

    The runs take turns block by block, and the first run of each round alternates, so
    that a change in machine load during the benchmark affects all modes about equally.
    """
    for round_index, start in enumerate(range(0, steps, TIMING_BLOCK_STEPS)):
        stop = min(start + TIMING_BLOCK_STEPS, steps)
        order = runs if round_index % 2 == 0 else runs[::-1]
        for run in order:
            run.run_block(start, stop)


def describe_case(
    args: argparse.Namespace, spec: SourceSpec, root: pathlib.Path, stream: ImageStream,
    trainer: Trainer, run: CaseRun,
) -> dict[str, Any]:
    """Return the JSON result of one timed (source, mode) pair."""
    if run.timed_compiles:
        logger.warning("%s %s compiled %s while timed, so its rate includes compilation.",
                       spec.name, run.mode, dict(run.timed_compiles))
    config = trainer.config
    warmup, timed = run.warmup_batches, run.timed_batches
    run_tokens, run_positions, run_images = count_tokens([*warmup, *timed])
    timed_tokens, timed_positions, timed_images = count_tokens(timed)
    return {
        # Over every step run, warm-up included.
        "padding_fraction": 1.0 - run_tokens / run_positions,
        "compiled_programs": run.compiles["train_step"],
        "compilations_during_timing": dict(run.timed_compiles),
        "images_per_sec": timed_images / run.seconds,
        # Real tokens trained per second, which depends less on the mix of images.
        "tokens_per_sec": timed_tokens / run.seconds,
        "tokens_per_image": run_tokens / run_images,
        "steps": len(timed),
        "warmup_steps": len(warmup),
        "timed_seconds": run.seconds,
        "images_per_step": timed_images / len(timed),
        # Sequence positions the encoder runs per real image, padding included.
        "token_positions_per_image": timed_positions / timed_images,
        # Host time of the Bucketer or Packer alone, tiling excluded, burn-in included.
        "arrange_ms_per_batch": run.arrange_ms_per_batch,
        "final_train_loss": float(run.metrics["train_loss"]),
        "settings": {
            "images": str(root),
            "num_source_images": len(stream.paths),
            "num_classes": trainer.model.num_classes,
            "image_size": [spec.resolution, spec.resolution],
            "patch_sizes": list(spec.patch_sizes),
            "scorer": "entropy",
            "bins": spec.bins,
            "thresholds": list(spec.thresholds),
            "encoder": {"hidden_size": config.model.hidden_size, "depth": config.model.depth,
                        "num_heads": config.model.num_heads, "mlp_dim": config.model.mlp_dim,
                        "pool": config.model.pool, "embed_mode": config.model.embed_mode},
            "sequence": run.mode,
            **run.layout,
            "burn_in_batches": args.burn_in_batches,
            "timing_block_steps": TIMING_BLOCK_STEPS,
            "selection_chunk": spec.selection_chunk,
            "optimizer": f"train.create_optimizer: AdamW, peak learning rate "
                         f"{config.learning_rate}, weight decay {config.weight_decay}",
            "dtype": "float32",
            "seed": args.seed,
        },
    }


def run_source(
    args: argparse.Namespace, spec: SourceSpec, root: pathlib.Path,
    images: tuple[list[pathlib.Path], np.ndarray, int],
) -> dict[str, Any]:
    """Run every mode on one source and return the results by mode.

    ``images`` is the (paths, labels, number of classes) that ``list_images`` returns.
    Every mode is arranged and warmed up before any is timed.
    """
    paths, labels, num_classes = images
    logger.info("%s: %d images at %d px", spec.name, len(paths), spec.resolution)
    stream = ImageStream(paths, labels, spec.resolution, args.seed)
    trainer = Trainer.create(spec, args, num_classes)
    selector = HostSelector(trainer.config, seed=args.seed)
    runs = [prepare_case(args, spec, mode, stream, selector, trainer) for mode in MODES]
    time_interleaved(runs, args.steps)
    return {run.mode: describe_case(args, spec, root, stream, trainer, run) for run in runs}


def format_summary(results: dict[str, dict[str, Any]]) -> str:
    """Return one human-readable line per (source, mode)."""
    lines = []
    for source, by_mode in results.items():
        for mode, result in by_mode.items():
            lines.append(
                f"{source:17s} {mode:6s} {result['images_per_sec']:9.1f} img/s, "
                f"{100 * result['padding_fraction']:5.1f}% padding, "
                f"{result['tokens_per_image']:6.1f} tokens/image, "
                f"{result['token_positions_per_image']:6.1f} positions/image, "
                f"{result['compiled_programs']} programs, {result['steps']} steps"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark with command-line arguments ``argv`` and return the result."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    roots = {
        name: root for name, root in (
            ("cifar10", args.cifar10), ("imagenet-samples", args.imagenet_samples),
        ) if root is not None
    }
    images = {}
    try:
        validate_args(args)
        for name, root in roots.items():
            if not root.is_dir():
                raise ValueError(f"--{name} {root} is not a folder.")
            images[name] = list_images(SOURCES[name], root)
    except ValueError as error:
        parser.error(str(error))

    results = {
        name: run_source(args, SOURCES[name], root, images[name])
        for name, root in roots.items()
    }

    output = {
        "results": results,
        "machine": describe_machine(),
        "command": reporting.command_line("experiments.sequence_modes", argv),
        "date": reporting.utc_now(),
    }
    reporting.write_report(output, args.out, logger)
    print(format_summary(results))
    return output


if __name__ == "__main__":
    # force: an imported library has already attached a handler to the root logger.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        force=True)
    main()
