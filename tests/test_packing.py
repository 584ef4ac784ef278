import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptive_jax import packing, scoring, selection, sequence
from adaptive_jax.models import AdaptiveViT

IMAGE = (32, 48)
SIZES = (4, 8, 16)
SMALL = dict(hidden_size=32, depth=2, num_heads=4, mlp_dim=64)
NUM_PATCHES = int(selection.level_offsets(IMAGE, SIZES)[-1])
MAX_TOKENS = (IMAGE[0] // SIZES[0]) * (IMAGE[1] // SIZES[0])


def _model(**kwargs):
    return AdaptiveViT(num_classes=7, image_size=IMAGE, patch_sizes=SIZES, **{**SMALL, **kwargs})


def _init(model, seed=0):
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, *IMAGE, 3)))["params"]
    # Zero-initialised heads, class tokens and size embeddings would hide mistakes in
    # pooling and gathering, so randomise them.
    params["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(seed + 1), params["head"]["kernel"].shape)
    if "cls" in params:
        params["cls"] = jax.random.normal(jax.random.PRNGKey(seed + 3), params["cls"].shape)
    for name in params["embedding"]:
        if name.startswith("size_embedding") or name.startswith("aggregate"):
            params["embedding"][name] = jax.tree_util.tree_map(
                lambda x: jax.random.normal(jax.random.PRNGKey(seed + 2), x.shape) * 0.1,
                params["embedding"][name],
            )
    return params


def _images_and_masks(n=8, seed=0):
    """Return random images and mixed-size flat tiling masks with varied token counts."""
    images = jax.random.normal(jax.random.PRNGKey(seed), (n, *IMAGE, 3))
    scores = scoring.laplacian_scores(jnp.abs(images) * 60.0, SIZES)
    thresholds = (float(jnp.median(scores[1])), float(jnp.median(scores[2])))
    flat = selection.flatten_masks(selection.threshold_tiling(scores, thresholds))
    return np.asarray(images), np.asarray(flat)


def _flat_mask(num_tokens, size=NUM_PATCHES, offset=0):
    flat = np.zeros(size, bool)
    flat[offset:offset + num_tokens] = True
    return flat


def _example(image, label):
    return {"image": image, "label": np.int32(label), "weight": np.float32(1.0)}


def _pack_all(images, flat_masks, rows, pack_length, max_images_per_row):
    packer = packing.Packer(rows, pack_length, max_images_per_row)
    batches = []
    for i, (image, flat) in enumerate(zip(images, flat_masks)):
        batch = packer.add(_example(image, i), flat)
        if batch is not None:
            batches.append(batch)
    batches.extend(packer.flush())
    return batches


def _bucketed_logits(model, params, images, flat_masks):
    """Return logits of the one-image-per-row path, one bucket of MAX_TOKENS."""
    pairs = [sequence.pad_tokens(flat, MAX_TOKENS) for flat in flat_masks]
    index = jnp.asarray(np.stack([p[0] for p in pairs]))
    mask = jnp.asarray(np.stack([p[1] for p in pairs]))
    return np.asarray(model.apply({"params": params}, jnp.asarray(images), index, mask))


def _packed_logits(model, params, batch):
    return np.asarray(model.apply(
        {"params": params},
        jnp.asarray(batch["image"]),
        jnp.asarray(batch["patch_index"]),
        segment_ids=jnp.asarray(batch["segment_ids"]),
    ))


def test_first_fit_hand_example():
    assert packing.first_fit([5, 3, 4, 2, 6], 8, 2) == [[0, 1], [2, 3], [4]]
    assert packing.first_fit([2, 2, 2, 2], 8, 3) == [[0, 1, 2], [3]]
    assert packing.first_fit([8, 1, 7], 8, 4) == [[0], [1, 2]]


def test_first_fit_respects_limits():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 21, size=200).tolist()
    pack_length, max_images = 24, 3
    rows = packing.first_fit(counts, pack_length, max_images)

    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(len(counts)))
    for row in rows:
        assert sum(counts[i] for i in row) <= pack_length
        assert len(row) <= max_images
        assert row == sorted(row)

    # First fit: no earlier row had room for the image when it was placed.
    row_of = {i: k for k, row in enumerate(rows) for i in row}
    for i, k in row_of.items():
        for j in range(k):
            before = [m for m in rows[j] if m < i]
            if len(before) < max_images:
                assert sum(counts[m] for m in before) + counts[i] > pack_length, (i, j)


def test_packer_places_every_image_once():
    rng = np.random.default_rng(1)
    counts = rng.integers(1, 40, size=23)
    images = rng.normal(size=(len(counts), 4, 6, 3)).astype(np.float32)
    flat_masks = [_flat_mask(int(c), offset=int(rng.integers(0, NUM_PATCHES - c))) for c in counts]
    rows, pack_length, max_images = 3, 48, 4
    batches = _pack_all(images, flat_masks, rows, pack_length, max_images)

    seen = []
    for batch in batches:
        assert batch["image"].shape == (rows * max_images, 4, 6, 3)
        assert batch["patch_index"].shape == (rows, pack_length)
        assert batch["segment_ids"].shape == (rows, pack_length)
        assert batch["label"].shape == (rows, max_images)
        assert batch["weight"].shape == (rows, max_images)
        assert batch["patch_index"].dtype == np.int32
        assert batch["segment_ids"].dtype == np.int32
        for r in range(rows):
            for e in range(max_images):
                if batch["weight"][r, e] == 0:
                    assert not (batch["segment_ids"][r] == e + 1).any()
                    continue
                label = int(batch["label"][r, e])
                seen.append(label)
                in_segment = batch["segment_ids"][r] == e + 1
                np.testing.assert_array_equal(
                    batch["patch_index"][r][in_segment], np.flatnonzero(flat_masks[label])
                )
                np.testing.assert_array_equal(batch["image"][r * max_images + e], images[label])
    assert sorted(seen) == list(range(len(counts)))
    assert len(batches) > 1


def test_packer_segments_are_contiguous():
    packer = packing.Packer(rows=1, pack_length=10, max_images_per_row=3)
    assert packer.add(_example(np.zeros((2, 2, 3)), 0), _flat_mask(4)) is None
    assert packer.add(_example(np.zeros((2, 2, 3)), 1), _flat_mask(3, offset=5)) is None
    batch = packer.add(_example(np.zeros((2, 2, 3)), 2), _flat_mask(2))
    assert batch is not None, "a row with max_images_per_row images is full"
    np.testing.assert_array_equal(batch["segment_ids"][0], [1, 1, 1, 1, 2, 2, 2, 3, 3, 0])
    np.testing.assert_array_equal(batch["patch_index"][0], [0, 1, 2, 3, 5, 6, 7, 0, 1, 0])
    np.testing.assert_array_equal(batch["label"][0], [0, 1, 2])


def test_packer_emits_when_image_fits_no_row():
    packer = packing.Packer(rows=2, pack_length=10, max_images_per_row=2)
    image = np.zeros((2, 2, 3))
    assert packer.add(_example(image, 0), _flat_mask(7)) is None
    assert packer.add(_example(image, 1), _flat_mask(6)) is None
    batch = packer.add(_example(image, 2), _flat_mask(5))
    assert batch is not None
    np.testing.assert_array_equal(batch["label"], [[0, 0], [1, 0]])
    np.testing.assert_array_equal(batch["weight"], [[1, 0], [1, 0]])
    rest = list(packer.flush())
    assert len(rest) == 1
    np.testing.assert_array_equal(rest[0]["label"], [[2, 0], [0, 0]])


def test_flush_gives_zero_weight_slots():
    packer = packing.Packer(rows=2, pack_length=16, max_images_per_row=2)
    images = np.arange(3 * 2 * 2 * 3, dtype=np.float32).reshape(3, 2, 2, 3) + 1.0
    for i, count in enumerate([5, 4, 6]):
        assert packer.add(_example(images[i], i + 1), _flat_mask(count)) is None
    batches = list(packer.flush())

    assert len(batches) == 1
    batch = batches[0]
    np.testing.assert_array_equal(batch["weight"], [[1, 1], [1, 0]])
    np.testing.assert_array_equal(batch["label"], [[1, 2], [3, 0]])
    assert not batch["image"][3].any()
    assert not (batch["segment_ids"][1] == 2).any()
    assert (batch["segment_ids"][1] == 1).sum() == 6
    assert list(packer.flush()) == []


def test_flush_pads_missing_rows():
    packer = packing.Packer(rows=3, pack_length=8, max_images_per_row=2)
    packer.add(_example(np.ones((2, 2, 3)), 4), _flat_mask(3))
    batch = next(packer.flush())
    np.testing.assert_array_equal(batch["weight"], [[1, 0], [0, 0], [0, 0]])
    assert not batch["segment_ids"][1:].any()
    assert batch["image"].shape == (6, 2, 2, 3)


def test_too_long_image_rejected():
    packer = packing.Packer(rows=2, pack_length=8, max_images_per_row=2)
    with pytest.raises(ValueError, match=r"9 tokens does not fit in pack_length=8.*at least 9"):
        packer.add(_example(np.zeros((2, 2, 3)), 0), _flat_mask(9))
    with pytest.raises(ValueError, match="pack_length=8"):
        packing.first_fit([3, 9], 8, 2)
    with pytest.raises(ValueError, match="at least one patch"):
        packer.add(_example(np.zeros((2, 2, 3)), 0), _flat_mask(0))


def test_invalid_layout_rejected():
    with pytest.raises(ValueError, match="max_images_per_row=0"):
        packing.Packer(rows=2, pack_length=8, max_images_per_row=0)
    with pytest.raises(ValueError, match="rows=0"):
        packing.Packer(rows=0, pack_length=8, max_images_per_row=2)


def _brute_force_fill(counts, capacity, max_images):
    """Return best_fill's expected subset by trying every subset."""
    best = ()
    best_key = (0, 0, ())
    for size in range(1, max_images + 1):
        for subset in itertools.combinations(range(len(counts)), size):
            total = sum(counts[i] for i in subset)
            if total > capacity:
                continue
            # Largest sum, then fewest images, then the lowest indices from the highest down.
            key = (total, -size, tuple(-i for i in reversed(subset)))
            if key > best_key:
                best, best_key = subset, key
    return list(best)


def test_best_fill_hand_example():
    assert packing.best_fill([5, 3, 4, 2, 6], 8, 2) == [0, 1]
    assert packing.best_fill([8, 1, 7], 8, 3) == [0]
    assert packing.best_fill([1, 7], 8, 3) == [0, 1]
    assert packing.best_fill([3], 2, 1) == []
    assert packing.best_fill([2, 2], 8, 0) == []
    assert packing.best_fill([], 8, 2) == []


def test_best_fill_matches_brute_force():
    rng = np.random.default_rng(7)
    for _ in range(200):
        counts = rng.integers(1, 12, size=int(rng.integers(0, 9))).tolist()
        capacity = int(rng.integers(0, 30))
        max_images = int(rng.integers(0, 5))
        chosen = packing.best_fill(counts, capacity, max_images)
        expected = _brute_force_fill(counts, capacity, max_images)
        assert chosen == expected, (counts, capacity, max_images)


def test_best_fill_rejects_bad_counts():
    with pytest.raises(ValueError, match="Token count 0 is invalid"):
        packing.best_fill([3, 0], 8, 2)
    with pytest.raises(ValueError, match="capacity=-1 or max_images=2 is invalid"):
        packing.best_fill([3], -1, 2)


def _pack_with_lookahead(counts, rows, pack_length, max_images, lookahead):
    """Pack one image per count; return (batches from add, batches from flush, adds seen)."""
    packer = packing.Packer(rows, pack_length, max_images, lookahead=lookahead)
    added, flushed, batches_before_add = [], [], []
    for i, count in enumerate(counts):
        batches_before_add.append(len(added))
        batch = packer.add(_example(np.full((2, 2, 3), i, np.float32), i), _flat_mask(int(count)))
        if batch is not None:
            added.append(batch)
    flushed.extend(packer.flush())
    assert list(packer.flush()) == []
    return added, flushed, batches_before_add


def test_lookahead_hand_example():
    packer = packing.Packer(rows=1, pack_length=10, max_images_per_row=3, lookahead=3)
    assert packer.add(_example(np.zeros((2, 2, 3)), 0), _flat_mask(6)) is None
    assert packer.add(_example(np.zeros((2, 2, 3)), 1), _flat_mask(5)) is None
    batch = packer.add(_example(np.zeros((2, 2, 3)), 2), _flat_mask(4))

    assert batch is not None, "lookahead=3 packs a batch once three images are pending"
    # The oldest image (6 tokens) starts the row, and the 4-token image fills it exactly.
    np.testing.assert_array_equal(batch["label"], [[0, 2, 0]])
    np.testing.assert_array_equal(batch["weight"], [[1, 1, 0]])
    np.testing.assert_array_equal(batch["segment_ids"][0], [1] * 6 + [2] * 4)
    rest = list(packer.flush())
    assert len(rest) == 1
    np.testing.assert_array_equal(rest[0]["label"], [[1, 0, 0]])
    np.testing.assert_array_equal(rest[0]["weight"], [[1, 0, 0]])


def test_lookahead_places_every_image_once():
    rng = np.random.default_rng(3)
    counts = rng.integers(1, 21, size=157)
    rows, pack_length, max_images, lookahead = 3, 32, 4, 30
    added, flushed, batches_before_add = _pack_with_lookahead(
        counts, rows, pack_length, max_images, lookahead
    )

    batch_of = {}
    for index, batch in enumerate(added + flushed):
        assert batch["image"].shape == (rows * max_images, 2, 2, 3)
        assert batch["segment_ids"].shape == (rows, pack_length)
        assert batch["label"].shape == (rows, max_images)
        for r in range(rows):
            segments = batch["segment_ids"][r]
            real = int((segments > 0).sum())
            # Segments are contiguous from the start of the row, in slot order.
            np.testing.assert_array_equal(segments[:real], np.sort(segments[:real]))
            assert not segments[real:].any()
            for e in np.flatnonzero(batch["weight"][r]):
                label = int(batch["label"][r, e])
                assert label not in batch_of, f"image {label} placed twice"
                batch_of[label] = index
                assert (segments == e + 1).sum() == counts[label]
                assert (batch["image"][r * max_images + e] == label).all()
    assert sorted(batch_of) == list(range(len(counts)))
    assert len(added) > 3

    # Each batch takes the rows oldest pending images, which bounds the wait.
    max_wait = math.ceil(lookahead / rows)
    for label in range(len(counts)):
        if batch_of[label] < len(added):
            assert batch_of[label] - batches_before_add[label] < max_wait, label


def test_lookahead_leaves_less_padding_than_first_fit():
    rng = np.random.default_rng(5)
    counts = rng.integers(2, 20, size=600)
    rows, pack_length, max_images = 4, 40, 4

    def padding(lookahead):
        added, _, _ = _pack_with_lookahead(counts, rows, pack_length, max_images, lookahead)
        return float(np.mean([packing.padding_fraction(batch) for batch in added]))

    first_fit = padding(0)
    lookahead = padding(4 * rows * max_images)
    assert first_fit > 0.1
    assert lookahead < 0.03
    assert lookahead < first_fit / 4


def test_lookahead_flush_yields_every_pending_batch():
    added, flushed, _ = _pack_with_lookahead([3, 2, 4], 1, 4, 1, lookahead=5)
    assert added == []
    assert len(flushed) == 3
    assert [int(batch["label"][0, 0]) for batch in flushed] == [0, 1, 2]


def test_lookahead_too_small_rejected():
    with pytest.raises(ValueError, match="lookahead=3 is less than the 4 image slots"):
        packing.Packer(rows=2, pack_length=8, max_images_per_row=2, lookahead=3)
    with pytest.raises(ValueError, match="lookahead=-1"):
        packing.Packer(rows=2, pack_length=8, max_images_per_row=2, lookahead=-1)


def test_padding_fraction_packed_and_bucketed():
    packer = packing.Packer(rows=1, pack_length=8, max_images_per_row=2)
    packer.add(_example(np.zeros((2, 2, 3)), 0), _flat_mask(3))
    batch = packer.add(_example(np.zeros((2, 2, 3)), 1), _flat_mask(2))
    assert batch is not None, "a row with max_images_per_row images is full"
    assert packing.padding_fraction(batch) == pytest.approx(3 / 8)

    batch["weight"][0, 1] = 0.0
    assert packing.padding_fraction(batch) == pytest.approx(5 / 8)

    bucketed = {
        "token_mask": np.array([[True, True, False, False], [True, False, False, False]]),
        "weight": np.array([1.0, 0.0], np.float32),
    }
    assert packing.padding_fraction(bucketed) == pytest.approx(6 / 8)
    with pytest.raises(ValueError, match="segment_ids"):
        packing.padding_fraction({"label": np.zeros(2)})


@pytest.mark.parametrize("pool", ["gap", "cls"])
@pytest.mark.parametrize("embed_mode", ["separate", "resize"])
def test_packed_logits_match_bucketed(pool, embed_mode):
    model = _model(pool=pool, embed_mode=embed_mode)
    params = _init(model)
    images, flat_masks = _images_and_masks()
    counts = flat_masks.sum(axis=1)
    assert len(set(counts.tolist())) > 3, "images should have different token counts"
    expected = _bucketed_logits(model, params, images, flat_masks)
    assert np.abs(expected).max() > 1e-3

    batches = _pack_all(images, flat_masks, rows=2, pack_length=MAX_TOKENS, max_images_per_row=3)
    shared_rows = sum(int((b["weight"] > 0).sum(axis=1).max() > 1) for b in batches)
    assert shared_rows > 0, "some row should hold more than one image"

    compared = 0
    for batch in batches:
        logits = _packed_logits(model, params, batch)
        assert logits.shape == (2, 3, 7)
        for r, e in zip(*np.nonzero(batch["weight"])):
            label = int(batch["label"][r, e])
            np.testing.assert_allclose(logits[r, e], expected[label], atol=1e-5, rtol=1e-5)
            compared += 1
    assert compared == len(images)


def test_padding_values_do_not_change_packed_logits():
    model = _model()
    params = _init(model)
    images, flat_masks = _images_and_masks(n=5, seed=2)
    batch = _pack_all(images, flat_masks, rows=3, pack_length=MAX_TOKENS, max_images_per_row=3)[0]
    assert (batch["weight"] == 0).any(), "the batch should have empty slots"
    real = batch["weight"] > 0
    base = _packed_logits(model, params, batch)

    padding = batch["segment_ids"] == 0
    assert padding.any()
    junk_index = np.random.default_rng(3).integers(0, NUM_PATCHES, size=padding.shape)
    junk_images = np.random.default_rng(4).normal(size=batch["image"].shape).astype(np.float32)
    empty_slots = (batch["weight"] == 0).reshape(-1)
    changed = {
        **batch,
        "patch_index": np.where(padding, junk_index, batch["patch_index"]).astype(np.int32),
        "image": np.where(empty_slots[:, None, None, None], junk_images, batch["image"]),
    }
    np.testing.assert_allclose(_packed_logits(model, params, changed)[real], base[real], atol=1e-5, rtol=1e-5)


def test_row_length_and_layout_do_not_change_logits():
    model = _model()
    params = _init(model)
    images, flat_masks = _images_and_masks(n=6, seed=1)

    def logits_by_label(rows, pack_length, max_images_per_row, order):
        batches = _pack_all(images[order], flat_masks[order], rows, pack_length, max_images_per_row)
        result = {}
        for batch in batches:
            logits = _packed_logits(model, params, batch)
            for r, e in zip(*np.nonzero(batch["weight"])):
                result[int(order[batch["label"][r, e]])] = logits[r, e]
        return result

    forward = np.arange(len(images))
    base = logits_by_label(2, MAX_TOKENS, 3, forward)
    variants = {
        "longer rows": logits_by_label(2, MAX_TOKENS + 40, 4, forward),
        "reversed order": logits_by_label(3, MAX_TOKENS, 2, forward[::-1]),
    }
    for name, other in variants.items():
        assert sorted(other) == sorted(base), name
        for label in base:
            np.testing.assert_allclose(other[label], base[label], atol=1e-5, rtol=1e-5, err_msg=name)


def test_packed_forward_under_jit():
    model = _model(pool="cls")
    params = _init(model)
    images, flat_masks = _images_and_masks(n=4, seed=5)
    batch = _pack_all(images, flat_masks, rows=2, pack_length=MAX_TOKENS, max_images_per_row=2)[0]
    apply = jax.jit(lambda p, x, i, s: model.apply({"params": p}, x, i, segment_ids=s))
    jitted = apply(params, batch["image"], batch["patch_index"], batch["segment_ids"])
    np.testing.assert_allclose(jitted, _packed_logits(model, params, batch), atol=1e-5, rtol=1e-5)


def test_packed_call_rejects_bad_inputs():
    model = _model()
    params = _init(model)
    images = jnp.zeros((4, *IMAGE, 3))
    index = jnp.zeros((2, 8), jnp.int32)
    segments = jnp.ones((2, 8), jnp.int32)
    with pytest.raises(ValueError, match="both token_mask and segment_ids"):
        model.apply({"params": params}, images, index, jnp.ones((2, 8), bool), segment_ids=segments)
    with pytest.raises(ValueError, match="requires patch_index"):
        model.apply({"params": params}, images, segment_ids=segments)
    with pytest.raises(ValueError, match="3 images cannot fill 2 packed rows"):
        model.apply({"params": params}, images[:3], index, segment_ids=segments)
    with pytest.raises(ValueError, match="same"):
        model.apply({"params": params}, images, index[:, :4], segment_ids=segments)
