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

``Packer`` places images as they arrive by first fit. Given a ``lookahead``, it instead
keeps that many images pending and fills each row with the subset of them that leaves the
least padding (``best_fill``).
"""

from __future__ import annotations

import collections
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


def best_fill(token_counts: Sequence[int], capacity: int, max_images: int) -> list[int]:
    """Choose the images that fill a row of ``capacity`` tokens best.

    Returns the indices, in increasing order, of at most ``max_images`` entries of
    ``token_counts`` whose sum is the largest that does not exceed ``capacity``. Among
    subsets with that sum it takes one with the fewest images, and among those it prefers
    lower indices, so callers that list older images first place them first.

    This is a 0/1 knapsack with a cardinality limit, solved exactly by dynamic
    programming over reachable sums. Python integers serve as bit sets of sums, so the
    cost is about ``len(token_counts) * max_images`` shifts of ``capacity + 1`` bits.
    """
    if capacity < 0 or max_images < 0:
        raise ValueError(
            f"capacity={capacity} or max_images={max_images} is invalid; give values of at "
            "least 0."
        )
    counts = [int(count) for count in token_counts]
    for count in counts:
        if count < 1:
            raise ValueError(
                f"Token count {count} is invalid; every image has at least 1 token."
            )
    sums_mask = (1 << (capacity + 1)) - 1
    # Bit s of reachable[k] is set when some k of the images seen so far sum to s tokens.
    reachable = [1] + [0] * max_images
    history = [reachable]
    for count in counts:
        extended = list(reachable)
        for k in range(1, max_images + 1):
            extended[k] |= (reachable[k - 1] << count) & sums_mask
        reachable = extended
        history.append(reachable)

    best_k, best_sum = 0, 0
    for k in range(1, max_images + 1):
        total = reachable[k].bit_length() - 1
        if total > best_sum:
            best_k, best_sum = k, total

    # Walk back from the last image, leaving an image out whenever the remaining sum is
    # reachable without it, so the lowest indices are kept.
    chosen = []
    k, total = best_k, best_sum
    for index in range(len(counts), 0, -1):
        if k == 0:
            break
        if (history[index - 1][k] >> total) & 1:
            continue
        chosen.append(index - 1)
        total -= counts[index - 1]
        k -= 1
    return chosen[::-1]


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
    """Pack examples into batches of ``rows`` rows, streaming.

    With ``lookahead=0`` (the default) the packer places each image by first fit and keeps
    one batch open. ``add`` places an image in the first open row that has room for it,
    or opens a new row. It returns the open batch, and starts a new one with the image,
    when the image fits no row and all ``rows`` rows are open. It also returns the batch
    as soon as every row is full, meaning that the row contains ``max_images_per_row``
    images or exactly ``pack_length`` tokens.

    With ``lookahead=N`` the packer holds up to N images. When N images are pending,
    ``add`` packs one batch from them and returns it. Each row starts with the oldest
    pending image, and ``best_fill`` adds the pending images that leave the least padding
    in that row. The rest stay pending for later batches. Because every batch takes the
    ``rows`` oldest pending images, an image waits for at most ``ceil(N / rows)`` batches.
    N must be at least ``rows * max_images_per_row``, the slots of one batch, so a batch
    can fill all of them.

    ``flush`` returns the remaining images in batches whose missing rows and slots have
    weight 0: one batch with ``lookahead=0``, as many as needed otherwise. Every image
    added is placed in exactly one batch, so evaluation counts every real example once.
    """

    def __init__(
        self, rows: int, pack_length: int, max_images_per_row: int, *, lookahead: int = 0
    ):
        _validate_layout(rows, pack_length, max_images_per_row)
        if lookahead < 0:
            raise ValueError(f"lookahead={lookahead} is invalid; give 0 or more images.")
        if 0 < lookahead < rows * max_images_per_row:
            raise ValueError(
                f"lookahead={lookahead} is less than the {rows * max_images_per_row} image "
                f"slots of a batch (rows={rows} * max_images_per_row={max_images_per_row}). "
                "Give 0 for first fit, or at least one batch of slots; a few batches leave "
                "less padding."
            )
        self.rows = rows
        self.pack_length = pack_length
        self.max_images_per_row = max_images_per_row
        self.lookahead = lookahead
        self._open: list[list[tuple[dict[str, np.ndarray], np.ndarray]]] = []
        self._used: list[int] = []
        # Pending images for lookahead packing, oldest first: (example, flat_mask, tokens).
        self._pending: collections.deque[tuple[dict[str, np.ndarray], np.ndarray, int]] = (
            collections.deque()
        )

    def add(self, example: dict[str, np.ndarray], flat_mask: np.ndarray) -> dict | None:
        """Place one image; return a packed batch when one is complete, else None.

        ``flat_mask`` is the image's flat tiling mask, as ``sequence.pad_tokens`` takes.
        """
        flat_mask = np.asarray(flat_mask, bool)
        num_tokens = int(flat_mask.sum())
        check_fits(num_tokens, self.pack_length)
        if self.lookahead:
            self._pending.append((example, flat_mask, num_tokens))
            if len(self._pending) >= self.lookahead:
                return self._pack_pending()
            return None

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
        """Yield the remaining images in batches padded with weight-0 rows and slots."""
        while self._pending:
            yield self._pack_pending()
        if self._open:
            yield self._take_batch()

    def _pack_pending(self) -> dict[str, np.ndarray]:
        """Pack one batch from the pending images, each row filled by ``best_fill``."""
        packed_rows = []
        while self._pending and len(packed_rows) < self.rows:
            oldest, oldest_mask, oldest_tokens = self._pending.popleft()
            candidates = list(self._pending)
            chosen = best_fill(
                [tokens for _, _, tokens in candidates],
                self.pack_length - oldest_tokens,
                self.max_images_per_row - 1,
            )
            row = [(oldest, oldest_mask)]
            row.extend((candidates[i][0], candidates[i][1]) for i in chosen)
            packed_rows.append(row)
            chosen_set = set(chosen)
            self._pending = collections.deque(
                item for i, item in enumerate(candidates) if i not in chosen_set
            )
        return build_packed_batch(
            packed_rows, self.rows, self.pack_length, self.max_images_per_row
        )

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
