import numpy as np
import pytest
from PIL import Image

from adaptive_jax.config import default_config
from adaptive_jax.data import InputPipeline, load_source


def _config(**overrides):
    config = default_config()
    config.image_size = (16, 16)
    config.patch_sizes = (4, 8, 16)
    config.selection.thresholds = (2.0, 3.0)
    config.batch_size = 4
    config.eval_batch_size = 4
    config.selection_chunk = 8
    config.shuffle_buffer = 16
    for key, value in overrides.items():
        config[key] = value
    return config


def _write_folder(root, modes):
    """Write a train/test image folder of two classes with one image per PIL mode."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i, mode in enumerate(modes):
                channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
                pixels = rng.integers(0, 256, (20, 28, channels), dtype=np.uint8)
                image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)
                image.save(folder / f"{i}.png")
    return root


def test_digits_source_splits():
    train = load_source("digits", "train")
    test = load_source("digits", "test")
    assert train.num_examples == 1497
    assert test.num_examples == 300
    assert train.num_classes == 10
    example = next(iter(test.dataset.as_numpy_iterator()))
    assert example["image"].shape == (8, 8, 1)
    assert example["image"].dtype == np.uint8
    assert example["image"].max() <= 255


def test_digits_split_shared_between_processes():
    parts = [load_source("digits", "test", process_index=i, process_count=3) for i in range(3)]
    assert sum(p.num_examples for p in parts) == 300


def test_eval_counts_every_example_once():
    pipeline = InputPipeline(_config(dataset="digits", image_size=(32, 32), eval_batch_size=64,
                                     selection_chunk=50))
    batches = list(pipeline.eval_batches())
    assert {b["image"].shape[0] for b in batches} == {64}
    assert sum(float(b["weight"].sum()) for b in batches) == 300
    labels = np.concatenate([b["label"][b["weight"] > 0] for b in batches])
    assert np.bincount(labels, minlength=10).sum() == 300
    for batch in batches:
        counts = batch["token_mask"].sum(axis=1)
        assert counts.max() <= batch["patch_index"].shape[1]
        assert batch["patch_index"].shape[1] in pipeline.buckets


def test_uniform_eval_pads_last_batch():
    pipeline = InputPipeline(_config(dataset="digits", patch_sizes=(4,), eval_batch_size=128))
    batches = list(pipeline.eval_batches())
    assert len(batches) == 3
    assert "patch_index" not in batches[0]
    np.testing.assert_array_equal(batches[-1]["weight"][:44], np.ones(44))
    assert float(batches[-1]["weight"].sum()) == 44


def test_train_batches_have_one_bucket_each():
    pipeline = InputPipeline(_config(dataset="digits", image_size=(32, 32)))
    iterator = pipeline.train_batches(seed=0)
    for _ in range(5):
        batch = next(iterator)
        assert batch["image"].shape == (4, 32, 32, 3)
        assert batch["token_mask"].shape == batch["patch_index"].shape
        assert batch["token_mask"].any(axis=1).all()


def test_imagefolder_grayscale_rgba_and_resize(tmp_path):
    root = _write_folder(tmp_path / "images", ["L", "RGB", "RGBA"])
    pipeline = InputPipeline(_config(dataset=f"imagefolder:{root}"))
    assert pipeline.num_classes == 2
    batches = list(pipeline.eval_batches())
    images = np.concatenate([b["image"][b["weight"] > 0] for b in batches])
    assert images.shape == (6, 16, 16, 3)
    # A grayscale image has three equal channels.
    gray = [img for img in images if (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()]
    assert len(gray) == 2


def test_missing_imagefolder_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_source(f"imagefolder:{tmp_path / 'absent'}", "train")


def test_missing_split_rejected(tmp_path):
    root = _write_folder(tmp_path / "images", ["RGB"])
    with pytest.raises(ValueError, match="Split 'validation' not found"):
        load_source(f"imagefolder:{root}", "validation")


def test_unknown_tfds_name_rejected():
    with pytest.raises(ValueError, match="not found in tensorflow-datasets"):
        load_source("no_such_dataset_xyz", "train")


def test_unprepared_tfds_dataset_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build mnist"):
        load_source("mnist", "train", data_dir=str(tmp_path))


def test_corrupt_image_named_in_error(tmp_path):
    root = _write_folder(tmp_path / "images", ["RGB"])
    bad = root / "test" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff this is not a JPEG")
    pipeline = InputPipeline(_config(dataset=f"imagefolder:{root}"))
    with pytest.raises(ValueError, match="broken.jpg"):
        list(pipeline.eval_batches())


def test_sixteen_bit_and_small_images(tmp_path):
    import tensorflow as tf

    root = tmp_path / "images"
    gradient = (np.arange(40 * 40).reshape(40, 40, 1) * 40).astype(np.uint16)
    for split in ("train", "test"):
        folder = root / split / "a"
        folder.mkdir(parents=True)
        tf.io.write_file(str(folder / "deep.png"), tf.io.encode_png(tf.constant(gradient)))
        # Smaller than the largest patch and not square: resized up to cover 16x16.
        tf.io.write_file(str(folder / "tiny.png"), tf.io.encode_png(tf.fill((6, 10, 3), tf.constant(200, tf.uint8))))
    pipeline = InputPipeline(_config(dataset=f"imagefolder:{root}"))
    images = np.concatenate([b["image"][b["weight"] > 0] for b in pipeline.eval_batches()])
    assert images.shape == (2, 16, 16, 3)
    brightest = max(int(img.max()) for img in images)
    # 16-bit values are scaled to 8 bits (65535 -> 255), not clipped or wrapped.
    assert 200 <= brightest <= 255
    assert any((img == 200).all() for img in images)


@pytest.mark.parametrize("rule,expected", [("crop", (16, 16)), ("pad", (32, 32))])
def test_fit_image_size_rules(rule, expected):
    config = _config(dataset="digits", image_size=(24, 24), fit_image_size=rule)
    pipeline = InputPipeline(config)
    batch = next(iter(pipeline.eval_batches()))
    assert batch["image"].shape[1:3] == expected
    if rule == "pad":
        assert (batch["image"][:, 24:, :, :] == 0).all()


def test_fit_image_size_reject_names_sizes():
    from adaptive_jax.config import validate_config

    with pytest.raises(ValueError, match="use an image size of 16 or 32"):
        validate_config(_config(dataset="digits", image_size=(24, 24)))


def test_train_batches_repeat_for_seed():
    config = _config(dataset="digits", image_size=(32, 32), augment=True)

    def first_images(seed, count=3):
        iterator = InputPipeline(config).train_batches(seed=seed)
        return np.stack([next(iterator)["image"] for _ in range(count)])

    first = first_images(0)
    np.testing.assert_array_equal(first, first_images(0))
    assert not np.array_equal(first, first_images(1))
