"""Static shapes for variable token counts: bucketing on the host.

Each image's token sequence is padded to the smallest configured bucket length that
holds it, and a batch only contains sequences of one bucket. The device step therefore
sees one shape per bucket and compiles at most ``len(buckets)`` programs.

``Bucketer`` works on a stream, as training needs. ``sorted_batches`` arranges a whole
pool at once, as offline inference can: it orders the images by token count and cuts the
sorted list into batches of similar lengths, with as few padded positions as possible.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

import numpy as np


def default_buckets(min_tokens: int, max_tokens: int, num_buckets: int) -> tuple[int, ...]:
    """Return ``num_buckets`` lengths spread evenly up to ``max_tokens``, rounded up to 8.

    The last bucket is always ``max_tokens``, the token count of an all-smallest tiling,
    so every image fits some bucket.
    """
    if num_buckets < 1:
        raise ValueError(f"num_buckets={num_buckets}; give at least 1.")
    lengths = set()
    for i in range(1, num_buckets + 1):
        length = min_tokens + (max_tokens - min_tokens) * i / num_buckets
        lengths.add(min(max_tokens, int(-(-length // 8) * 8)))
    lengths.add(max_tokens)
    return tuple(sorted(lengths))


def validate_buckets(buckets: Sequence[int], max_tokens: int) -> tuple[int, ...]:
    """Return the buckets sorted, or raise ValueError if some tiling would fit none."""
    buckets = tuple(sorted(int(b) for b in buckets))
    if not buckets or buckets[-1] < max_tokens:
        raise ValueError(
            f"sequence.buckets={buckets} cannot hold an image of {max_tokens} tokens (all "
            f"patches at the smallest size); add a bucket of at least {max_tokens}."
        )
    if buckets[0] < 1:
        raise ValueError(f"sequence.buckets={buckets} has a length below 1.")
    return buckets


def choose_bucket(num_tokens: int, buckets: Sequence[int]) -> int:
    """Return the smallest bucket length that holds ``num_tokens`` tokens."""
    i = bisect.bisect_left(buckets, num_tokens)
    if i == len(buckets):
        raise ValueError(f"{num_tokens} tokens exceed the largest bucket {buckets[-1]}.")
    return buckets[i]


def pad_tokens(flat_mask: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Turn one image's flat tiling mask into (patch_index, token_mask) of ``length``.

    Padding entries point at patch 0 and are masked out; their value never reaches an
    output because the encoder ignores masked tokens.
    """
    index = np.flatnonzero(flat_mask).astype(np.int32)
    n = index.shape[0]
    if n > length:
        raise ValueError(f"{n} tokens do not fit in a sequence of length {length}.")
    patch_index = np.zeros((length,), np.int32)
    patch_index[:n] = index
    token_mask = np.zeros((length,), bool)
    token_mask[:n] = True
    return patch_index, token_mask


class Bucketer:
    """Group examples by bucket length and emit batches of one bucket.

    ``add`` returns a full batch as soon as a bucket holds ``batch_size`` examples.
    ``flush`` pads each unfinished bucket with zero-weight copies of its first example,
    so evaluation can count every real example exactly once.
    """

    def __init__(self, buckets: Sequence[int], batch_size: int):
        self.buckets = tuple(buckets)
        self.batch_size = batch_size
        self._pending: dict[int, list[dict[str, np.ndarray]]] = {b: [] for b in self.buckets}

    def add(self, example: dict[str, np.ndarray], flat_mask: np.ndarray) -> dict | None:
        length = choose_bucket(int(flat_mask.sum()), self.buckets)
        patch_index, token_mask = pad_tokens(flat_mask, length)
        pending = self._pending[length]
        pending.append({**example, "patch_index": patch_index, "token_mask": token_mask})
        if len(pending) == self.batch_size:
            self._pending[length] = []
            return stack_examples(pending)
        return None

    def flush(self) -> Iterator[dict[str, np.ndarray]]:
        for length in self.buckets:
            pending = self._pending[length]
            self._pending[length] = []
            if pending:
                yield pad_batch(stack_examples(pending), self.batch_size)


def sorted_batches(
    examples: Sequence[dict[str, np.ndarray]],
    flat_masks: np.ndarray,
    buckets: Sequence[int],
    batch_size: int,
) -> list[dict[str, np.ndarray]]:
    """Arrange a pool of examples into batches of similar token counts.

    The examples are ordered by token count (ties keep their order) and the sorted list
    is cut into runs of at most ``batch_size``. Each run is padded to the smallest bucket
    that fits its longest image, and short runs get zero-weight rows up to
    ``batch_size``, so each batch compiles one of ``len(buckets)`` programs like a
    ``Bucketer`` batch. The cuts minimise the padded token positions (rows times bucket
    length, summed over batches), so the result never pads more than bucketing the same
    pool does. The batches keep each example's fields, so a ``label`` or an index field
    shows where a row came from.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid. Give at least 1.")
    if len(examples) != len(flat_masks):
        raise ValueError(
            f"{len(examples)} examples but {len(flat_masks)} tiling masks. Give one mask "
            "per example."
        )
    counts = np.asarray(flat_masks).sum(axis=1)
    order = np.argsort(counts, kind="stable")
    batches = []
    for start, stop in _cheapest_cuts([int(counts[i]) for i in order], buckets, batch_size):
        chosen = order[start:stop]
        length = choose_bucket(int(counts[chosen].max()), buckets)
        rows = []
        for i in chosen:
            patch_index, token_mask = pad_tokens(flat_masks[i], length)
            rows.append({**examples[i], "patch_index": patch_index, "token_mask": token_mask})
        batches.append(pad_batch(stack_examples(rows), batch_size))
    return batches


def _cheapest_cuts(
    sorted_counts: Sequence[int], buckets: Sequence[int], batch_size: int
) -> list[tuple[int, int]]:
    """Return (start, stop) runs of the sorted counts with the fewest padded positions.

    A run ending at position j costs ``batch_size * bucket(sorted_counts[j - 1])``
    whatever its length, so the cheapest arrangement of the first j counts is that cost
    plus the cheapest arrangement of the first j - k, over run lengths k up to
    ``batch_size``. Among equal costs the longest run wins, which gives fewer batches.
    """
    n = len(sorted_counts)
    best = [0] * (n + 1)
    run_length = [0] * (n + 1)
    for stop in range(1, n + 1):
        cost = batch_size * choose_bucket(sorted_counts[stop - 1], buckets)
        candidates = range(min(batch_size, stop), 0, -1)
        length = min(candidates, key=lambda k: best[stop - k])
        best[stop] = best[stop - length] + cost
        run_length[stop] = length
    runs = []
    stop = n
    while stop > 0:
        runs.append((stop - run_length[stop], stop))
        stop -= run_length[stop]
    return runs[::-1]


def pad_to_length(batch: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """Pad a bucketed batch's ``patch_index`` and ``token_mask`` to ``length`` tokens."""
    extra = length - batch["patch_index"].shape[1]
    if extra < 0:
        raise ValueError(f"Cannot pad a batch of {batch['patch_index'].shape[1]} tokens to {length}.")
    return {
        **batch,
        "patch_index": np.pad(batch["patch_index"], ((0, 0), (0, extra))),
        "token_mask": np.pad(batch["token_mask"], ((0, 0), (0, extra))),
    }


def stack_examples(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.stack([ex[key] for ex in examples]) for key in examples[0]}


def pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Pad a batch to ``batch_size`` rows by repeating row 0 with weight 0."""
    n = next(iter(batch.values())).shape[0]
    weight = batch.get("weight", np.ones((n,), np.float32))
    if n == batch_size:
        return {**batch, "weight": weight}
    extra = batch_size - n
    padded = {
        key: np.concatenate([value, np.repeat(value[:1], extra, axis=0)])
        for key, value in batch.items()
        if key != "weight"
    }
    padded["weight"] = np.concatenate([weight, np.zeros((extra,), np.float32)])
    return padded
