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
        return np.full((height, width, 3), 40 + 30 * seed % 200, np.uint8)
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


def test_benchmark_reports_both_sources(tmp_path):
    cifar10 = _write_cifar10(tmp_path / "cifar10")
    photos = _write_photos(tmp_path / "photos")
    out = tmp_path / "result.json"
    argv = [
        "--cifar10", str(cifar10), "--imagenet-samples", str(photos), "--steps", "2",
        "--batch-size", "4", "--burn-in-batches", "1", "--lookahead-batches", "2",
        *TINY_ENCODER, "--out", str(out),
    ]

    returned = sequence_modes.main(argv)
    result = json.loads(out.read_text())

    assert result == json.loads(json.dumps(returned))
    assert sorted(result["results"]) == ["cifar10", "imagenet-samples"]
    for source, by_mode in result["results"].items():
        spec = sequence_modes.SOURCES[source]
        uniform, coarsest = spec.grid_tokens()
        assert sorted(by_mode) == ["bucket", "pack"], source
        for mode, case in by_mode.items():
            name = f"{source} {mode}"
            for key in sequence_modes.RESULT_KEYS:
                assert key in case, f"{name}: missing key {key}"
            assert 0 <= case["padding_fraction"] < 1, name
            assert case["compiled_programs"] >= 1, name
            assert case["compiled_programs"] == case["warmup_steps"], name
            assert case["compilations_during_timing"] == {}, name
            assert case["images_per_sec"] > 0, name
            assert coarsest <= case["tokens_per_image"] <= uniform, name
            assert case["steps"] == 2, name
            assert np.isfinite(case["final_train_loss"]), name
            settings = case["settings"]
            assert settings["patch_sizes"] == list(spec.patch_sizes), name
            assert settings["thresholds"] == list(spec.thresholds), name
            assert settings["bins"] == spec.bins, name
            assert settings["encoder"]["hidden_size"] == 32, name
            assert settings["batch_size"] == 4, name

        assert by_mode["pack"]["compiled_programs"] == 1, source
        assert by_mode["pack"]["settings"]["rows"] == 4 // spec.max_images_per_row
        assert by_mode["pack"]["settings"]["pack_length"] == spec.pack_length
        assert by_mode["pack"]["settings"]["lookahead_images"] == 2 * 4
        assert by_mode["bucket"]["compiled_programs"] <= len(by_mode["bucket"]["settings"]["buckets"])
        assert by_mode["bucket"]["settings"]["buckets"][-1] == uniform

    assert result["results"]["cifar10"]["bucket"]["settings"]["num_classes"] == 2
    assert result["results"]["imagenet-samples"]["bucket"]["settings"]["num_source_images"] == 6
    for key in MACHINE_KEYS:
        assert key in result["machine"], f"missing machine key {key}"
    assert "-m experiments.sequence_modes --cifar10" in result["command"]
    assert result["command"].endswith(" ".join(argv[-2:]))
    assert datetime.datetime.fromisoformat(result["date"]).tzinfo is not None


def test_cifar10_settings_match_config():
    spec = importlib.util.spec_from_file_location("cifar10_config", REPO_ROOT / "configs" / "cifar10.py")
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


@pytest.mark.parametrize("extra", [
    [],
    ["--steps", "0"],
    ["--batch-size", "2"],
    ["--burn-in-batches", "-1"],
    ["--encoder-sizes", "30,1,4,64"],
])
def test_invalid_arguments_exit(tmp_path, extra):
    argv = [*extra]
    if extra:
        argv += ["--cifar10", str(_write_cifar10(tmp_path / "cifar10"))]

    with pytest.raises(SystemExit):
        sequence_modes.main(argv)


def test_missing_train_folder_exits(tmp_path):
    with pytest.raises(SystemExit):
        sequence_modes.main(["--cifar10", str(tmp_path)])
