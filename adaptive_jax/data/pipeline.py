"""Input pipeline: decode and augment in tf.data, select patches on the host, bucket.

Batches are dicts of NumPy arrays, local to this process:
  image (b, h, w, 3) uint8, label (b,) int32, weight (b,) float32 (0 for padding rows),
  and, where tilings are made on the host, patch_index (b, t) int32 and token_mask (b, t)
  bool, where t is the batch's bucket length. In pack mode the layout is that of
  ``adaptive_jax.packing``: rows of segment ids, with label and weight per image slot.

Scoring and tiling run here, on the host CPU under ``jit``, as APT computes entropy in its
data loader: token counts are known before the device step, so each batch can be bucketed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf

from adaptive_jax import packing, scoring, selection, sequence
from adaptive_jax.config import model_image_size
from adaptive_jax.data.sources import Source, describe_decode_error, load_source

AUTOTUNE = tf.data.AUTOTUNE
CROP_PADDING = 4  # pixels of reflected border before the random crop


def to_rgb_uint8(image: tf.Tensor) -> tf.Tensor:
    """Convert a decoded image to 3-channel uint8.

    Grayscale is repeated over three channels, the alpha channel of RGBA is dropped, and
    16-bit images are scaled to 8 bits.
    """
    if image.dtype == tf.uint16:
        image = tf.cast(image // 257, tf.uint8)
    elif image.dtype != tf.uint8:
        raise ValueError(f"Unsupported image dtype {image.dtype}; expected uint8 or uint16.")
    channels = image.shape[-1]
    if channels == 1:
        image = tf.image.grayscale_to_rgb(image)
    elif channels == 4:
        image = image[..., :3]
    elif channels not in (3, None):
        raise ValueError(f"Unsupported image with {channels} channels; expected 1, 3 or 4.")
    return image


def resize_and_center_crop(image: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """Resize so the image covers ``size`` with its aspect ratio kept, then center-crop."""
    if image.shape[0] == size[0] and image.shape[1] == size[1]:
        return image
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)
    scale = tf.maximum(size[0] / h, size[1] / w)
    new_h = tf.cast(tf.math.ceil(h * scale), tf.int32)
    new_w = tf.cast(tf.math.ceil(w * scale), tf.int32)
    resized = tf.image.resize(image, (new_h, new_w), method="bilinear", antialias=True)
    resized = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
    return tf.image.resize_with_crop_or_pad(resized, size[0], size[1])


def random_crop_flip(image: tf.Tensor, size: tuple[int, int], seed: tf.Tensor) -> tf.Tensor:
    """Return a random crop of the reflect-padded image, flipped left to right half the time.

    ``seed`` is a shape-[2] integer tensor. The stateless ops make the result depend on
    the image and the seed alone, not on the order in which a parallel map runs.
    """
    p = CROP_PADDING
    padded = tf.pad(image, [[p, p], [p, p], [0, 0]], mode="REFLECT")
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    cropped = tf.image.stateless_random_crop(padded, (size[0], size[1], 3), seed=crop_seed)
    return tf.image.stateless_random_flip_left_right(cropped, seed=flip_seed)


class HostSelector:
    """Score and tile batches of uint8 images on the host CPU with a configured rule.

    ``thresholds`` and ``budget`` default to ``config.selection``; evaluation passes the
    values of ``config.eval_selection`` to trade accuracy for tokens without retraining.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        seed: int = 0,
        thresholds: tuple[float, ...] | None = None,
        budget: int | None = None,
    ):
        self.patch_sizes = tuple(config.patch_sizes)
        self.scorer = config.selection.scorer
        self.mode = config.selection.mode
        self.thresholds = tuple(config.selection.thresholds if thresholds is None else thresholds)
        self.budget = int(config.selection.budget if budget is None else budget)
        self.bins = config.selection.bins
        # A CPU device of this process: the host, even when the model runs on accelerators.
        self._device = jax.local_devices(backend="cpu")[0]
        self._rng = jax.random.PRNGKey(seed)
        self._calls = 0
        self._select = jax.jit(self._flat_masks)

    def _flat_masks(self, images: jax.Array, rng: jax.Array) -> jax.Array:
        if self.scorer == "entropy":
            scores = scoring.entropy_scores(images, self.patch_sizes, self.bins)
        elif self.scorer == "laplacian":
            scores = scoring.laplacian_scores(images, self.patch_sizes)
        elif self.scorer == "constant":
            scores = scoring.constant_scores(images, self.patch_sizes)
        elif self.scorer == "random":
            scores = scoring.random_scores(rng, images, self.patch_sizes)
        else:
            raise ValueError(
                f"selection.scorer={self.scorer!r} cannot run on the host; choose one of "
                f"{scoring.SCORERS}."
            )
        if self.mode == "budget":
            masks = selection.budget_tiling(scores, self.budget)
        else:
            masks = selection.threshold_tiling(scores, self.thresholds)
        return selection.flatten_masks(masks)

    def buckets(self, config: ml_collections.ConfigDict, image_size) -> tuple[int, ...]:
        """Return the sequence lengths this rule's tilings are padded to."""
        if self.mode == "budget":
            return (self.budget,)
        grid = selection.grid_shapes(image_size, self.patch_sizes)
        max_tokens = grid[0][0] * grid[0][1]
        if config.sequence.buckets:
            return sequence.validate_buckets(config.sequence.buckets, max_tokens)
        min_tokens = grid[-1][0] * grid[-1][1]
        return sequence.default_buckets(min_tokens, max_tokens, config.sequence.num_buckets)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Return flat tiling masks (n, total_patches) for uint8 images (n, h, w, 3)."""
        with jax.default_device(self._device):
            rng = jax.random.fold_in(jax.device_put(self._rng, self._device), self._calls)
            images = jax.device_put(images, self._device)
            masks = np.asarray(self._select(images, rng))
        self._calls += 1
        return masks


class InputPipeline:
    """Train and eval batch iterators for one process, built once per run.

    Decoded images are cached in memory when ``config.cache`` is set, so repeated
    evaluations decode the eval split only once.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        *,
        process_index: int = 0,
        process_count: int = 1,
    ):
        self.config = config
        self.resize_size = tuple(config.image_size)
        self.image_size = model_image_size(config)
        # Scoring and tiling run here unless the model selects patches itself (learned
        # scorer) or there is a single patch size (uniform ViT).
        self.host_selection = len(config.patch_sizes) > 1 and config.selection.scorer != "learned"
        self.process_index = process_index
        self.process_count = process_count
        for key in ("batch_size", "eval_batch_size"):
            if config[key] % process_count:
                raise ValueError(
                    f"{key}={config[key]} is not divisible by the {process_count} processes; "
                    f"use a multiple of {process_count}."
                )
        self.local_batch_size = config.batch_size // process_count
        self.local_eval_batch_size = config.eval_batch_size // process_count
        kwargs = dict(
            data_dir=config.data_dir,
            download=config.download,
            process_index=process_index,
            process_count=process_count,
        )
        self.train_source = load_source(config.dataset, config.train_split, **kwargs)
        self.eval_source = load_source(config.dataset, config.eval_split, **kwargs)
        self.num_classes = self.train_source.num_classes
        if self.host_selection:
            seed = config.seed + process_index
            self.selector = HostSelector(config, seed=seed)
            self.eval_selector = HostSelector(
                config, seed=seed, thresholds=config.eval_selection.thresholds,
                budget=config.eval_selection.budget,
            )
            self.buckets = self.selector.buckets(config, self.image_size)
            grid = selection.grid_shapes(self.image_size, config.patch_sizes)
            self.pack_length = config.sequence.pack_length or grid[0][0] * grid[0][1]
            self.eval_buckets = self.eval_selector.buckets(config, self.image_size)
        self._eval_ds = self._decoded(self.eval_source, cache=config.cache)
        self._train_ds = self._decoded(self.train_source, cache=config.cache)

    def describe_selection(self) -> str:
        """Return a one-line summary of where and how patches are selected."""
        sel = self.config.selection
        if len(self.config.patch_sizes) == 1:
            return f"uniform patch size {self.config.patch_sizes[0]}"
        if not self.host_selection:
            return f"learned selector on the device, budget {sel.budget} tokens"
        rule = f"budget {sel.budget}" if sel.mode == "budget" else f"thresholds {tuple(sel.thresholds)}"
        if self.config.sequence.mode == "pack":
            seq = (f"packed rows of {self.pack_length} tokens, at most "
                   f"{self.config.sequence.max_images_per_row} images per row")
        else:
            seq = f"buckets {self.buckets}"
        return f"{sel.scorer} scores on the host, {rule}, {seq}"

    def _decoded(self, source: Source, cache: bool) -> tf.data.Dataset:
        size = self.image_size
        resize_size = self.resize_size
        pad = self.config.fit_image_size == "pad"

        def decode(example):
            image = resize_and_center_crop(to_rgb_uint8(example["image"]), resize_size)
            if size != resize_size:
                if pad:
                    image = tf.image.pad_to_bounding_box(image, 0, 0, size[0], size[1])
                else:
                    image = tf.image.resize_with_crop_or_pad(image, size[0], size[1])
            image = tf.ensure_shape(image, (size[0], size[1], 3))
            return {"image": image, "label": tf.cast(example["label"], tf.int32)}

        ds = source.dataset.map(decode, num_parallel_calls=AUTOTUNE)
        return ds.cache() if cache else ds

    def _assemble(
        self, chunks: Iterator[dict[str, np.ndarray]], batch_size: int, finite: bool,
        selector: HostSelector | None = None, buckets: tuple[int, ...] = (),
    ) -> Iterator[dict[str, np.ndarray]]:
        """Attach tilings to image chunks and regroup them into bucketed batches."""
        if selector is None:
            for chunk in chunks:
                n = chunk["label"].shape[0]
                batch = {**chunk, "weight": np.ones((n,), np.float32)}
                yield sequence.pad_batch(batch, batch_size) if finite else batch
            return
        if self.config.sequence.mode == "pack":
            per_row = self.config.sequence.max_images_per_row
            bucketer = packing.Packer(
                batch_size // per_row, self.pack_length, per_row,
                lookahead=self.config.sequence.pack_lookahead_batches * batch_size,
            )
        else:
            bucketer = sequence.Bucketer(buckets, batch_size)
        for chunk in chunks:
            masks = selector(chunk["image"])
            for i in range(chunk["label"].shape[0]):
                example = {"image": chunk["image"][i], "label": chunk["label"][i],
                           "weight": np.float32(1.0)}
                batch = bucketer.add(example, masks[i])
                if batch is not None:
                    yield batch
        if finite:
            yield from bucketer.flush()

    def train_batches(self, seed: int) -> Iterator[dict[str, np.ndarray]]:
        """Yield shuffled, augmented training batches forever.

        ``seed`` sets the shuffle order and augmentation; a resumed run passes a seed
        derived from its start step so it does not replay the first batches.
        """
        size = self.image_size
        ds = self._train_ds.repeat().shuffle(self.config.shuffle_buffer, seed=seed)
        if self.config.augment:
            # One seed pair per example from a seeded stream, so a rerun with the same
            # seed draws the same crops and flips.
            example_seeds = tf.data.Dataset.random(seed=seed).batch(2)
            ds = tf.data.Dataset.zip((ds, example_seeds)).map(
                lambda ex, pair: {**ex, "image": random_crop_flip(ex["image"], size, pair)},
                num_parallel_calls=AUTOTUNE,
            )
        chunk = self.config.selection_chunk if self.host_selection else self.local_batch_size
        ds = ds.batch(chunk, drop_remainder=True).prefetch(AUTOTUNE)
        chunks = self._checked(ds.as_numpy_iterator(), self.config.train_split)
        if not self.host_selection:
            return self._assemble(chunks, self.local_batch_size, finite=False)
        return self._assemble(chunks, self.local_batch_size, False, self.selector, self.buckets)

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """Yield every eval example once; short batches are padded with weight-0 rows."""
        chunk = self.config.selection_chunk if self.host_selection else self.local_eval_batch_size
        ds = self._eval_ds.batch(chunk).prefetch(AUTOTUNE)
        chunks = self._checked(ds.as_numpy_iterator(), self.config.eval_split)
        if not self.host_selection:
            return self._assemble(chunks, self.local_eval_batch_size, finite=True)
        return self._assemble(
            chunks, self.local_eval_batch_size, True, self.eval_selector, self.eval_buckets
        )

    def _checked(self, chunks: Iterator, split: str) -> Iterator:
        """Re-raise a decoding failure as a ValueError that names the unreadable files."""
        try:
            yield from chunks
        except tf.errors.InvalidArgumentError as error:
            raise ValueError(describe_decode_error(self.config.dataset, split, error)) from error


def prefetch(iterator: Iterator, size: int = 2, transform: Callable | None = None) -> Iterator:
    """Run ``iterator`` (and ``transform`` on each item) in a background thread.

    Exceptions raised by the iterator are re-raised in the consumer.
    """
    items: queue.Queue = queue.Queue(maxsize=size)
    done = object()

    def produce():
        try:
            for item in iterator:
                items.put(transform(item) if transform else item)
        except BaseException as error:  # handed to the consumer, which re-raises it
            items.put(error)
            return
        items.put(done)

    threading.Thread(target=produce, daemon=True).start()
    while True:
        item = items.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
