"""Sequence packing on the host: several images' tokens share one fixed-length row.

Bucketing (``sequence.Bucketer``) pads every image to a bucket length, one image per row.
Packing, as in NaViT, instead places the token sequences of several images one after
another in a row of ``pack_length`` tokens, with at most ``max_images_per_row`` images per
row, so less of each row is padding. The encoder
keeps the images apart with ``segment_ids`` (see ``AdaptiveViT``).

A packed batch of R rows, row length L and E = ``max_images_per_row`` image slots per row
has static shapes given (R, L, E):

  image:        (R * E, H, W, C), slot e of row r at index ``r * E + e``. Empty slots
                hold zeros.
  patch_index:  (R, L) int32, the flat patch index (see ``selection.level_offsets``) of
                each token within its own image. Padding entries are 0.
  segment_ids:  (R, L) int32, 0 for padding and ``e + 1`` for a token of slot e. The
                segment id therefore also names the image that a token is gathered from.
  other keys:   (R, E, ...), one entry per slot, for example ``label`` (R, E) and
                ``weight`` (R, E) float32. Empty slots hold zeros and weight 0.

The model returns logits (R, E, num_classes), so ``logits.reshape(-1, num_classes)``,
``label.reshape(-1)`` and ``weight.reshape(-1)`` line up with the stacked images.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

IMAGE_KEY = "image"


def _validate_layout(rows: int, pack_length: int, max_images_per_row: int) -> None:
    for name, value in (
        ("rows", rows),
        ("pack_length", pack_length),
        ("max_images_per_row", max_images_per_row),
    ):
        if value < 1:
            raise ValueError(f"{name}={value} is invalid; give a value of at least 1.")


def check_fits(num_tokens: int, pack_length: int) -> None:
    """Raise ValueError unless an image of ``num_tokens`` tokens fits in one row."""
    if num_tokens < 1:
        raise ValueError(
            f"An image has {num_tokens} tokens, but a tiling places at least one patch. "
            "Pass the image's flat tiling mask, with one True entry per patch."
        )
    if num_tokens > pack_length:
        raise ValueError(
            f"An image of {num_tokens} tokens does not fit in pack_length={pack_length}; "
            f"set pack_length to at least {num_tokens}, or to the token count of the "
            "all-smallest tiling so that every image fits."
        )


def _first_fitting_row(
    used: Sequence[int], counts: Sequence[int], num_tokens: int, pack_length: int,
    max_images_per_row: int,
) -> int | None:
    """Return the first row with room for ``num_tokens`` more tokens and one more image."""
    for row, (length, images) in enumerate(zip(used, counts)):
        if length + num_tokens <= pack_length and images < max_images_per_row:
            return row
    return None


def first_fit(
    token_counts: Sequence[int], pack_length: int, max_images_per_row: int
) -> list[list[int]]:
    """Assign images to rows by first fit, in input order.

    Each image goes to the first row, in the order rows were opened, that still has room
    for its tokens and has fewer than ``max_images_per_row`` images. An image that fits no
    row opens a new one. Returns the image indices of each row in placement order.
    """
    _validate_layout(1, pack_length, max_images_per_row)
    rows: list[list[int]] = []
    used: list[int] = []
    for index, count in enumerate(token_counts):
        count = int(count)
        check_fits(count, pack_length)
        row = _first_fitting_row(used, [len(r) for r in rows], count, pack_length,
                                 max_images_per_row)
        if row is None:
            rows.append([index])
            used.append(count)
        else:
            rows[row].append(index)
            used[row] += count
    return rows


def build_packed_batch(
    packed_rows: Sequence[Sequence[tuple[dict[str, np.ndarray], np.ndarray]]],
    rows: int,
    pack_length: int,
    max_images_per_row: int,
) -> dict[str, np.ndarray]:
    """Lay out rows of (example, flat_mask) pairs as one packed batch (see module doc).

    ``packed_rows`` may hold fewer than ``rows`` rows and rows with fewer than
    ``max_images_per_row`` images; the missing rows and slots are padding with weight 0.
    Every example must have an ``image`` and the same keys, shapes and dtypes. An example
    without ``weight`` gets weight 1.
    """
    _validate_layout(rows, pack_length, max_images_per_row)
    if len(packed_rows) > rows:
        raise ValueError(f"Got {len(packed_rows)} rows for a batch of rows={rows}.")
    examples = [example for row in packed_rows for example, _ in row]
    if not examples:
        raise ValueError("Cannot build a packed batch without any example.")

    template = {key: np.asarray(value) for key, value in examples[0].items()}
    if IMAGE_KEY not in template:
        raise ValueError(f"Examples have keys {sorted(template)}; an {IMAGE_KEY!r} key is required.")
    template.setdefault("weight", np.float32(1.0))
    slots = max_images_per_row

    batch = {
        key: np.zeros((rows, slots, *value.shape), value.dtype)
        for key, value in template.items()
        if key != IMAGE_KEY
    }
    image = np.zeros((rows * slots, *template[IMAGE_KEY].shape), template[IMAGE_KEY].dtype)
    patch_index = np.zeros((rows, pack_length), np.int32)
    segment_ids = np.zeros((rows, pack_length), np.int32)

    for r, row in enumerate(packed_rows):
        if len(row) > slots:
            raise ValueError(
                f"Row {r} has {len(row)} images, more than max_images_per_row={slots}."
            )
        start = 0
        for e, (example, flat_mask) in enumerate(row):
            index = np.flatnonzero(flat_mask).astype(np.int32)
            end = start + index.shape[0]
            if end > pack_length:
                raise ValueError(
                    f"Row {r} needs {end} tokens, more than pack_length={pack_length}."
                )
            patch_index[r, start:end] = index
            segment_ids[r, start:end] = e + 1
            start = end

            image[r * slots + e] = example[IMAGE_KEY]
            batch["weight"][r, e] = example.get("weight", 1.0)
            for key in batch:
                if key != "weight":
                    batch[key][r, e] = example[key]

    batch[IMAGE_KEY] = image
    batch["patch_index"] = patch_index
    batch["segment_ids"] = segment_ids
    return batch


class Packer:
    """Pack examples into batches of ``rows`` rows by first fit, streaming.

    The packer keeps one batch open. ``add`` places an image in the first open row that
    has room for it, or opens a new row. It returns the open batch, and starts a new one
    with the image, when the image fits no row and all ``rows`` rows are open. It also
    returns the batch as soon as every row is full, meaning that the row contains
    ``max_images_per_row`` images or exactly ``pack_length`` tokens. ``flush`` returns the
    last, partly filled batch, whose missing rows and slots have weight 0, so evaluation
    counts every real example exactly once.
    """

    def __init__(self, rows: int, pack_length: int, max_images_per_row: int):
        _validate_layout(rows, pack_length, max_images_per_row)
        self.rows = rows
        self.pack_length = pack_length
        self.max_images_per_row = max_images_per_row
        self._open: list[list[tuple[dict[str, np.ndarray], np.ndarray]]] = []
        self._used: list[int] = []

    def add(self, example: dict[str, np.ndarray], flat_mask: np.ndarray) -> dict | None:
        """Place one image; return a packed batch when one is complete, else None.

        ``flat_mask`` is the image's flat tiling mask, as ``sequence.pad_tokens`` takes.
        """
        flat_mask = np.asarray(flat_mask, bool)
        num_tokens = int(flat_mask.sum())
        check_fits(num_tokens, self.pack_length)
        row = _first_fitting_row(
            self._used, [len(r) for r in self._open], num_tokens, self.pack_length,
            self.max_images_per_row,
        )
        if row is None and len(self._open) == self.rows:
            batch = self._take_batch()
            self._open_row(example, flat_mask, num_tokens)
            # The new batch, if already full (rows=1), is returned by the next add or flush.
            return batch
        if row is None:
            self._open_row(example, flat_mask, num_tokens)
        else:
            self._open[row].append((example, flat_mask))
            self._used[row] += num_tokens
        if self._batch_is_full():
            return self._take_batch()
        return None

    def flush(self) -> Iterator[dict[str, np.ndarray]]:
        """Yield the open batch, if any, padded with weight-0 rows and slots."""
        if self._open:
            yield self._take_batch()

    def _open_row(self, example: dict[str, np.ndarray], flat_mask: np.ndarray, num_tokens: int) -> None:
        self._open.append([(example, flat_mask)])
        self._used.append(num_tokens)

    def _batch_is_full(self) -> bool:
        if len(self._open) < self.rows:
            return False
        for images, used in zip(self._open, self._used):
            if len(images) < self.max_images_per_row and used < self.pack_length:
                return False
        return True

    def _take_batch(self) -> dict[str, np.ndarray]:
        batch = build_packed_batch(self._open, self.rows, self.pack_length, self.max_images_per_row)
        self._open = []
        self._used = []
        return batch


def padding_fraction(batch: dict[str, np.ndarray]) -> float:
    """Return the fraction of token positions that hold no token of a weighted image.

    Takes a packed batch (``segment_ids``, ``weight`` (rows, slots)) or a bucketed batch
    (``token_mask``, optional ``weight`` (rows,)). A position counts as padding when it
    is padding in the row, or belongs to an image of weight 0 such as a flush filler.
    """
    if "segment_ids" in batch:
        segment_ids = np.asarray(batch["segment_ids"])
        weight = np.asarray(batch["weight"])
        slot = np.maximum(segment_ids - 1, 0)
        slot_weight = np.take_along_axis(weight, slot, axis=1)
        real = (segment_ids > 0) & (slot_weight > 0)
    elif "token_mask" in batch:
        token_mask = np.asarray(batch["token_mask"], bool)
        weight = np.asarray(batch.get("weight", np.ones(token_mask.shape[:1], np.float32)))
        real = token_mask & (weight[:, None] > 0)
    else:
        raise ValueError(
            f"Batch has keys {sorted(batch)}; padding_fraction needs 'segment_ids' (packed) "
            "or 'token_mask' (bucketed)."
        )
    return float(1.0 - real.mean())
