import numpy as np
import pytest

from adaptive_jax import sequence


def test_default_buckets_end_at_max_tokens():
    buckets = sequence.default_buckets(4, 64, 4)
    assert buckets == (24, 40, 56, 64)
    assert sequence.default_buckets(4, 64, 1) == (64,)


def test_choose_bucket_picks_smallest_fit():
    buckets = (24, 40, 64)
    assert sequence.choose_bucket(1, buckets) == 24
    assert sequence.choose_bucket(24, buckets) == 24
    assert sequence.choose_bucket(25, buckets) == 40
    assert sequence.choose_bucket(64, buckets) == 64
    with pytest.raises(ValueError, match="exceed the largest bucket"):
        sequence.choose_bucket(65, buckets)


def test_validate_buckets_requires_full_length():
    with pytest.raises(ValueError, match="add a bucket of at least 64"):
        sequence.validate_buckets((16, 32), 64)
    assert sequence.validate_buckets((64, 16), 64) == (16, 64)


def test_pad_tokens_masks_padding():
    flat = np.zeros(10, bool)
    flat[[1, 4, 7]] = True
    index, mask = sequence.pad_tokens(flat, 5)
    np.testing.assert_array_equal(index, [1, 4, 7, 0, 0])
    np.testing.assert_array_equal(mask, [True, True, True, False, False])
    with pytest.raises(ValueError, match="do not fit"):
        sequence.pad_tokens(flat, 2)


def test_bucketer_groups_by_bucket_and_flushes():
    bucketer = sequence.Bucketer((2, 4), batch_size=2)
    examples = []
    for i, count in enumerate([1, 3, 2, 4, 1]):
        flat = np.zeros(6, bool)
        flat[:count] = True
        batch = bucketer.add({"label": np.int32(i), "weight": np.float32(1)}, flat)
        examples.append(batch)
    full = [b for b in examples if b is not None]
    assert len(full) == 2
    assert full[0]["patch_index"].shape == (2, 2)
    np.testing.assert_array_equal(full[0]["label"], [0, 2])
    np.testing.assert_array_equal(full[1]["label"], [1, 3])
    rest = list(bucketer.flush())
    assert len(rest) == 1
    np.testing.assert_array_equal(rest[0]["label"], [4, 4])
    np.testing.assert_array_equal(rest[0]["weight"], [1.0, 0.0])
    assert list(bucketer.flush()) == []


def _mask(count: int, size: int = 8) -> np.ndarray:
    flat = np.zeros(size, bool)
    flat[size - count:] = True
    return flat


def test_sorted_batches_group_similar_lengths():
    counts = [7, 1, 5, 2, 8, 3, 6]
    examples = [{"label": np.int32(i), "weight": np.float32(1)} for i in range(len(counts))]
    masks = np.stack([_mask(count) for count in counts])
    batches = sequence.sorted_batches(examples, masks, buckets=(2, 4, 6, 8), batch_size=3)

    # Sorted counts 1 | 2, 3, 5 | 6, 7, 8 cost 3 * (2 + 6 + 8) = 48 positions. Cutting
    # 1, 2, 3 | 5, 6, 7 | 8 instead would cost 3 * (4 + 8 + 8) = 60.
    assert [b["patch_index"].shape for b in batches] == [(3, 2), (3, 6), (3, 8)]
    np.testing.assert_array_equal(batches[0]["label"], [1, 1, 1])
    np.testing.assert_array_equal(batches[0]["weight"], [1, 0, 0])
    np.testing.assert_array_equal(batches[1]["label"], [3, 5, 2])
    np.testing.assert_array_equal(batches[2]["label"], [6, 0, 4])
    for batch in batches[1:]:
        np.testing.assert_array_equal(batch["weight"], [1, 1, 1])
    # Each row contains its own example's tokens, in flat order, then padding.
    for batch in batches:
        for row in range(3):
            n = counts[batch["label"][row]]
            assert batch["token_mask"][row].sum() == n
            np.testing.assert_array_equal(batch["patch_index"][row, :n], np.arange(8 - n, 8))
            np.testing.assert_array_equal(batch["patch_index"][row, n:], 0)


def _positions(batches):
    return sum(batch["patch_index"].size for batch in batches)


def test_sorted_batches_short_image_alone():
    # One short image and four long ones, batches of 4: the short one gets its own
    # small batch rather than padding the long ones' batch.
    masks = np.stack([_mask(count, 16) for count in (2, 16, 16, 16, 16)])
    batches = sequence.sorted_batches([{}] * 5, masks, buckets=(8, 16), batch_size=4)

    assert [b["patch_index"].shape for b in batches] == [(4, 8), (4, 16)]
    assert _positions(batches) == 96


def test_sorted_batches_never_pad_more_than_bucketing():
    rng = np.random.default_rng(0)
    buckets = (4, 8, 12, 16)
    for trial in range(20):
        counts = rng.integers(1, 17, size=rng.integers(1, 30))
        masks = np.stack([_mask(int(count), 16) for count in counts])
        examples = [{"weight": np.float32(1)}] * len(counts)
        batch_size = int(rng.integers(1, 6))
        bucketer = sequence.Bucketer(buckets, batch_size)
        bucketed = [b for ex, m in zip(examples, masks) if (b := bucketer.add(ex, m)) is not None]
        bucketed.extend(bucketer.flush())

        arranged = sequence.sorted_batches(examples, masks, buckets, batch_size)

        assert _positions(arranged) <= _positions(bucketed), f"trial {trial}"
        assert sum(float(b["weight"].sum()) for b in arranged) == len(counts)


def test_sorted_batches_reject_bad_input():
    masks = np.stack([_mask(2), _mask(3)])
    with pytest.raises(ValueError, match="2 examples but 1 tiling masks"):
        sequence.sorted_batches([{}, {}], masks[:1], (8,), 2)
    with pytest.raises(ValueError, match="batch_size=0 is invalid"):
        sequence.sorted_batches([{}, {}], masks, (8,), 0)
    with pytest.raises(ValueError, match="exceed the largest bucket"):
        sequence.sorted_batches([{}, {}], masks, (2,), 2)


def test_pad_batch_adds_zero_weight_rows():
    batch = {"label": np.array([3, 5]), "image": np.ones((2, 4, 4, 3), np.uint8)}
    padded = sequence.pad_batch(batch, 4)
    np.testing.assert_array_equal(padded["label"], [3, 5, 3, 3])
    np.testing.assert_array_equal(padded["weight"], [1, 1, 0, 0])
    assert padded["image"].shape == (4, 4, 4, 3)
