"""Dataset sources: tfds by name, image folders, and scikit-learn's digits offline.

Every source returns a ``tf.data.Dataset`` of {'image': uint8 (h, w, c), 'label': int64}
restricted to this process's share of the split, plus the split's size and class count.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

IMAGEFOLDER_PREFIX = "imagefolder:"
DIGITS = "digits"
# The digits set has no official split; a fixed permutation keeps 1,497 images for
# training and 300 for testing.
DIGITS_TEST_SIZE = 300


@dataclasses.dataclass(frozen=True)
class Source:
    dataset: tf.data.Dataset
    num_examples: int  # examples in this process's share
    num_classes: int


def _process_slice(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """Return the [start, stop) of this process's contiguous, near-equal share."""
    start = num_examples * process_index // process_count
    stop = num_examples * (process_index + 1) // process_count
    return start, stop


def _digits(split: str, process_index: int, process_count: int) -> Source:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    test, train = order[:DIGITS_TEST_SIZE], order[DIGITS_TEST_SIZE:]
    if split not in ("train", "test"):
        raise ValueError(f"Split {split!r} not found in 'digits'; use 'train' or 'test'.")
    chosen = train if split == "train" else test
    start, stop = _process_slice(len(chosen), process_index, process_count)
    chosen = chosen[start:stop]
    # Pixel values are 0..16; scale to 0..255 and add a channel axis.
    images = np.round(digits.images[chosen] * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target[chosen].astype(np.int64)
    ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
    return Source(ds, len(chosen), 10)


def _imagefolder(spec: str, split: str, process_index: int, process_count: int) -> Source:
    root = os.path.expanduser(spec[len(IMAGEFOLDER_PREFIX):])
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"Image folder {root!r} (from dataset={spec!r}) not found; give a folder laid out "
            "as PATH/<split>/<class>/<image>."
        )
    builder = tfds.folder_dataset.ImageFolder(root)
    splits = builder.info.splits
    if split not in splits:
        raise ValueError(
            f"Split {split!r} not found in image folder {root!r}; it has {sorted(splits)}. "
            "Set config.train_split or config.eval_split."
        )
    num_examples = splits[split].num_examples
    start, stop = _process_slice(num_examples, process_index, process_count)
    ds = builder.as_dataset(split=split, shuffle_files=False)
    ds = ds.skip(start).take(stop - start)
    ds = ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})
    return Source(ds, stop - start, builder.info.features["label"].num_classes)


def find_unreadable_images(root: str, split: str) -> list[str]:
    """Return the files under ``root/split`` that TensorFlow cannot decode as images."""
    unreadable = []
    split_dir = os.path.join(root, split)
    for folder, _, names in sorted(os.walk(split_dir)):
        for name in sorted(names):
            path = os.path.join(folder, name)
            try:
                tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
            except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
                unreadable.append(path)
    return unreadable


def describe_decode_error(dataset: str, split: str, error: Exception) -> str:
    """Build the message for an image that failed to decode, naming the file if possible."""
    message = f"An image in dataset={dataset!r}, split {split!r} could not be decoded ({error.message})."
    if dataset.startswith(IMAGEFOLDER_PREFIX):
        root = os.path.expanduser(dataset[len(IMAGEFOLDER_PREFIX):])
        bad = find_unreadable_images(root, split)
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            message += f" Unreadable files: {shown}. Remove or replace them."
    else:
        message += " Rebuild the dataset with `tfds build`."
    return message


def _tfds(name: str, split: str, data_dir: str | None, download: bool,
          process_index: int, process_count: int) -> Source:
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(
            f"Dataset {name!r} not found in tensorflow-datasets. Use a tfds name such as "
            "'cifar10', 'imagefolder:PATH' for a folder of images, or 'digits' to run "
            "offline."
        ) from error
    if download:
        builder.download_and_prepare()
    elif not builder.is_prepared():
        raise FileNotFoundError(
            f"Dataset {name!r} is not prepared in data_dir={builder.data_dir_root!r}. Run "
            f"`tfds build {name} --data_dir=DIR` and set config.data_dir=DIR, or set "
            "config.download=True."
        )
    if split not in builder.info.splits:
        raise ValueError(
            f"Split {split!r} not found in {name!r}; it has {sorted(builder.info.splits)}."
        )
    # even_splits gives each process a near-equal share; with one process it is the split.
    process_split = tfds.even_splits(split, n=process_count)[process_index]
    num_examples = builder.info.splits[process_split].num_examples
    ds = builder.as_dataset(split=process_split, shuffle_files=False)
    ds = ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})
    return Source(ds, num_examples, builder.info.features["label"].num_classes)


def load_source(
    dataset: str,
    split: str,
    *,
    data_dir: str | None = None,
    download: bool = False,
    process_index: int = 0,
    process_count: int = 1,
) -> Source:
    """Open this process's share of ``split`` of ``dataset``."""
    if dataset == DIGITS:
        return _digits(split, process_index, process_count)
    if dataset.startswith(IMAGEFOLDER_PREFIX):
        return _imagefolder(dataset, split, process_index, process_count)
    return _tfds(dataset, split, data_dir, download, process_index, process_count)
