"""Tests of the bucketing-against-packing training benchmark on generated images."""

import datetime
import importlib.util
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from experiments import sequence_modes
from tests.conftest import REPO_ROOT

TINY_ENCODER = ["--encoder-sizes", "32,1,2,64"]
MACHINE_KEYS = ("platform", "processor", "cpu_count", "jax_version", "device_kind")


def _pixels(kind: str, shape: tuple[int, int], seed: int) -> np.ndarray:
    """Return uint8 RGB pixels: flat, noisy, half noisy or a horizontal gradient."""
    rng = np.random.default_rng(seed)
    height, width = shape
    if kind == "flat":
        return np.full((height, width, 3), 40 + (30 * seed) % 200, np.uint8)
    if kind == "noise":
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    if kind == "half":
        pixels = np.full((height, width, 3), 120, np.uint8)
        pixels[:, width // 2:] = rng.integers(0, 256, (height, width - width // 2, 3))
        return pixels
    ramp = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None]
    return np.broadcast_to(ramp, (height, width, 3)).copy()


KINDS = ("flat", "noise", "half", "gradient")


def _write_cifar10(root: pathlib.Path) -> pathlib.Path:
    """Write 32x32 PNGs as ROOT/train/<class>/<image>, two classes of four images."""
    for label, name in enumerate(("cat", "dog")):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for index, kind in enumerate(KINDS):
            pixels = _pixels(kind, (32, 32), seed=4 * label + index)
            Image.fromarray(pixels).save(folder / f"{kind}.png")
    return root


def _write_photos(root: pathlib.Path) -> pathlib.Path:
    """Write six photos of different sizes and content into a flat folder."""
    root.mkdir(parents=True)
    shapes = [(96, 128), (128, 96), (100, 100), (80, 120), (120, 90), (96, 96)]
    for index, shape in enumerate(shapes):
        pixels = _pixels(KINDS[index % len(KINDS)], shape, seed=index)
        Image.fromarray(pixels).save(root / f"photo_{index}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_benchmark_reports_every_key(tmp_path):
    cifar10 = _write_cifar10(tmp_path / "cifar10")
    out = tmp_path / "result.json"
    argv = [
        "--cifar10", str(cifar10), "--steps", "2", "--batch-size", "4",
        "--burn-in-batches", "1", "--lookahead-batches", "2", *TINY_ENCODER, "--out", str(out),
    ]

    returned = sequence_modes.main(argv)
    result = json.loads(out.read_text())

    assert result == json.loads(json.dumps(returned))
    assert list(result["results"]) == ["cifar10"]
    by_mode = result["results"]["cifar10"]
    spec = sequence_modes.SOURCES["cifar10"]
    uniform, coarsest = spec.grid_tokens()
    assert sorted(by_mode) == ["bucket", "pack"]
    for mode, case in by_mode.items():
        for key in sequence_modes.RESULT_KEYS:
            assert key in case, f"{mode}: missing key {key}"
        assert 0 <= case["padding_fraction"] < 1, mode
        assert case["compiled_programs"] >= 1, mode
        assert case["compiled_programs"] == case["warmup_steps"], mode
        assert case["compilations_during_timing"] == {}, mode
        assert case["images_per_sec"] > 0, mode
        assert coarsest <= case["tokens_per_image"] <= uniform, mode
        assert case["steps"] == 2, mode
        assert np.isfinite(case["final_train_loss"]), mode
        settings = case["settings"]
        assert settings["patch_sizes"] == [4, 8, 16], mode
        assert settings["thresholds"] == [4.0, 4.4], mode
        assert settings["bins"] == 64, mode
        assert settings["encoder"]["hidden_size"] == 32, mode
        assert settings["batch_size"] == 4, mode
        assert settings["num_classes"] == 2, mode
        assert settings["num_source_images"] == 8, mode

    assert by_mode["pack"]["compiled_programs"] == 1
    assert by_mode["pack"]["settings"]["rows"] == 4 // spec.max_images_per_row
    assert by_mode["pack"]["settings"]["pack_length"] == spec.pack_length
    assert by_mode["pack"]["settings"]["lookahead_images"] == 2 * 4
    assert by_mode["bucket"]["compiled_programs"] <= len(by_mode["bucket"]["settings"]["buckets"])
    assert by_mode["bucket"]["settings"]["buckets"][-1] == uniform

    for key in MACHINE_KEYS:
        assert key in result["machine"], f"missing machine key {key}"
    assert "-m experiments.sequence_modes --cifar10" in result["command"]
    assert result["command"].endswith(" ".join(argv[-2:]))
    assert datetime.datetime.fromisoformat(result["date"]).tzinfo is not None


def test_list_images_flat_folder(tmp_path):
    photos = _write_photos(tmp_path / "photos")

    paths, labels, num_classes = sequence_modes.list_images(
        sequence_modes.SOURCES["imagenet-samples"], photos
    )

    assert [path.name for path in paths] == [f"photo_{i}.png" for i in range(6)]
    np.testing.assert_array_equal(labels, np.arange(6))
    assert labels.dtype == np.int32
    assert num_classes == sequence_modes.FLAT_NUM_CLASSES


def test_list_images_class_folders(tmp_path):
    cifar10 = _write_cifar10(tmp_path / "cifar10")

    paths, labels, num_classes = sequence_modes.list_images(
        sequence_modes.SOURCES["cifar10"], cifar10
    )

    assert num_classes == 2
    assert len(paths) == 8
    for path, label in zip(paths, labels):
        assert path.parent.name == ("cat", "dog")[label]


def test_image_stream_repeats_order(tmp_path):
    photos = _write_photos(tmp_path / "photos")
    paths, labels, _ = sequence_modes.list_images(
        sequence_modes.SOURCES["imagenet-samples"], photos
    )
    stream = sequence_modes.ImageStream(paths, labels, 64, seed=3)

    first = stream.chunks(4)
    images, chunk_labels = next(first)
    _, next_labels = next(first)
    again, again_labels = next(stream.chunks(4))

    assert images.shape == (4, 64, 64, 3)
    assert images.dtype == np.uint8
    np.testing.assert_array_equal(again, images)
    np.testing.assert_array_equal(again_labels, chunk_labels)
    # Eight images from six: the second pass starts within the second chunk.
    seen = np.concatenate([chunk_labels, next_labels])
    assert sorted(set(seen.tolist())) == list(range(6))


def test_warmup_batches_one_per_shape():
    small = {"patch_index": np.zeros((2, 8), np.int32)}
    large = {"patch_index": np.zeros((2, 16), np.int32)}

    warmup = sequence_modes.warmup_batches([small, large, dict(small), large])

    assert [batch["patch_index"].shape for batch in warmup] == [(2, 8), (2, 16)]


def test_cifar10_settings_match_config():
    path = REPO_ROOT / "configs" / "cifar10.py"
    spec = importlib.util.spec_from_file_location("cifar10_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    source = sequence_modes.SOURCES["cifar10"]

    assert source.patch_sizes == tuple(config.patch_sizes)
    assert source.bins == config.selection.bins
    assert source.thresholds == tuple(config.selection.thresholds)
    assert (source.resolution, source.resolution) == tuple(config.image_size)
    assert source.hidden_size == config.model.hidden_size
    assert source.depth == config.model.depth
    assert source.num_heads == config.model.num_heads
    assert source.mlp_dim == config.model.mlp_dim


@pytest.mark.parametrize("extra, message", [
    ([], "No source given"),
    (["--steps", "0"], "--steps 0 is invalid"),
    (["--batch-size", "2"], "--batch-size 2 is less than the 4 images"),
    (["--burn-in-batches", "-1"], "--burn-in-batches -1 is invalid"),
    (["--lookahead-batches", "-1"], "--lookahead-batches -1 is invalid"),
    (["--encoder-sizes", "30,1,4,64"], "30 is not divisible by 4"),
])
def test_invalid_arguments_exit(tmp_path, capsys, extra, message):
    argv = [*extra]
    if extra:
        argv += ["--cifar10", str(_write_cifar10(tmp_path / "cifar10"))]

    with pytest.raises(SystemExit):
        sequence_modes.main(argv)
    assert message in capsys.readouterr().err


def test_missing_train_folder_exits(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sequence_modes.main(["--cifar10", str(tmp_path)])
    assert "has no class folders under train/" in capsys.readouterr().err
