"""Tests of the inference throughput benchmark on a few generated images."""

import datetime
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from experiments import throughput

RESOLUTION = 64
# Patch sizes 8, 16 and 32 on 64-px images: 64 tokens uniform, 4 at the coarsest.
TINY = ["--variant", "Ti/8", "--resolution", str(RESOLUTION), "--encoder-sizes", "32,1,2,64"]
UNIFORM_TOKENS = (RESOLUTION // 8) ** 2
HIDDEN, DEPTH, MLP = 32, 1, 64
MACHINE_KEYS = ("platform", "processor", "cpu_count", "memory_gib", "jax_version", "device_kind")


def _write_images(root: pathlib.Path) -> pathlib.Path:
    """Write six PNGs in two class folders: flat, noisy and half-flat content."""
    rng = np.random.default_rng(0)
    flat = np.full((72, 96, 3), 120, np.uint8)
    noise = rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)
    half = flat[:, :80].copy()
    half[:, 40:] = rng.integers(0, 256, (72, 40, 3), dtype=np.uint8)
    contents = {
        "class_a/flat.png": flat,
        "class_a/noise.png": noise,
        "class_a/half.png": half,
        "class_b/flat_dark.png": flat // 3,
        "class_b/noise_2.png": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "class_b/gradient.png": np.broadcast_to(
            np.linspace(0, 255, 80, dtype=np.uint8)[None, :, None], (64, 80, 3)
        ).copy(),
    }
    for name, pixels in contents.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    (root / "class_a" / "notes.txt").write_text("not an image")
    return root


def _layer_flops(tokens: int) -> int:
    return 2 * tokens * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * MLP) + 4 * tokens * tokens * HIDDEN


def _run(tmp_path: pathlib.Path, *extra: str) -> tuple[dict, list[str]]:
    images = _write_images(tmp_path / "images")
    out = tmp_path / "result.json"
    argv = [
        "--images", str(images), *TINY, "--batch-size", "2", "--repeats", "1",
        "--warmup", "1", "--out", str(out), *extra,
    ]
    throughput.main(argv)
    return json.loads(out.read_text()), argv


def _check_common(result: dict, argv: list[str]) -> None:
    for key in throughput.RESULT_KEYS:
        assert key in result, f"missing key {key}"
    assert result["adaptive_img_per_s"] > 0
    assert result["uniform_img_per_s"] > 0
    assert result["speedup"] > 0
    assert result["speedup"] == pytest.approx(
        result["adaptive_img_per_s"] / result["uniform_img_per_s"]
    )
    assert len(result["round_speedups"]) == result["settings"]["repeats"]
    assert all(ratio > 0 for ratio in result["round_speedups"])
    assert result["tokens_per_image"]["uniform"] == UNIFORM_TOKENS
    assert 4 <= result["tokens_per_image"]["adaptive"] <= UNIFORM_TOKENS
    assert 0 <= result["padding_fraction"] < 1
    assert result["compiled_programs"] >= 1
    assert result["compiled_programs"] == len(result["settings"]["adaptive_batch_shapes"])
    assert result["compiled_programs_source"] == "XLA compile events"
    assert result["compilations_during_timing"] == {}
    assert result["ideal_speedup"] > 0
    assert result["efficiency"] == pytest.approx(result["speedup"] / result["ideal_speedup"])
    assert 0 < result["selection_fraction"] < 1
    for key in MACHINE_KEYS:
        assert key in result["machine"], f"missing machine key {key}"
    assert result["machine"]["cpu_count"] >= 1
    assert result["command"].endswith(" ".join(argv[-2:]))
    assert "-m experiments.throughput --images" in result["command"]
    assert datetime.datetime.fromisoformat(result["date"]).tzinfo is not None
    assert result["settings"]["num_images"] == 6


def test_bucketed_run_reports_every_key(tmp_path):
    result, argv = _run(tmp_path)

    _check_common(result, argv)
    # Flat images keep coarse patches and noise does not, so the tilings differ.
    assert result["tokens_per_image"]["adaptive"] < UNIFORM_TOKENS
    assert result["compiled_programs"] <= len(result["settings"]["buckets"])
    assert result["compiled_programs_uniform"] == 1
    assert result["settings"]["thresholds"] == [5.75, 4.0]
    assert result["settings"]["bins"] == 512


def test_sorted_run_fills_batches_by_length(tmp_path):
    result, argv = _run(tmp_path, "--sequence", "sort", "--num-buckets", "8")

    _check_common(result, argv)
    assert result["settings"]["sequence"] == "sort"
    # Six images in batches of two: three full batches, no filler rows.
    assert result["settings"]["adaptive_batches"] == 3
    assert result["compiled_programs"] <= len(result["settings"]["buckets"])
    bucketed, _ = _run(tmp_path / "bucket", "--num-buckets", "8")
    assert result["tokens_per_image"] == bucketed["tokens_per_image"]
    assert result["padding_fraction"] <= bucketed["padding_fraction"]


def test_packed_run_compiles_once(tmp_path):
    result, argv = _run(tmp_path, "--sequence", "pack", "--max-images-per-row", "3")

    _check_common(result, argv)
    assert result["compiled_programs"] == 1
    assert result["settings"]["pack_length"] == UNIFORM_TOKENS


def test_all_smallest_matches_flops_by_hand(tmp_path):
    result, argv = _run(tmp_path, "--all-smallest")

    _check_common(result, argv)
    assert result["tokens_per_image"]["adaptive"] == UNIFORM_TOKENS
    assert result["padding_fraction"] == 0
    assert result["compiled_programs"] == 1
    # Six images in batches of two fill every batch. No token uses a coarse patch size,
    # so the adaptive model skips those projections and costs what the uniform one does.
    assert result["ideal_speedup"] == pytest.approx(1.0)
    assert result["ideal_speedup_without_padding"] == pytest.approx(1.0)


def test_flops_count_the_levels_each_batch_uses():
    setup = throughput.Setup(
        variant="Ti/8", image_size=(RESOLUTION, RESOLUTION), patch_sizes=(8, 16, 32),
        hidden_size=HIDDEN,
        depth=DEPTH, num_heads=2, mlp_dim=MLP, thresholds=(0.0, 0.0), scorer="entropy",
        bins=64,
    )
    fine = np.arange(4, dtype=np.int32)[None]  # level-0 patches only
    # Flat indices: 0-63 are 8-px patches, 64-79 16-px and 80-83 32-px ones.
    mixed = np.array([[0, 1, 81, 82]], np.int32)
    image = np.zeros((1, RESOLUTION, RESOLUTION, 3), np.uint8)
    flops = throughput.count_flops(
        [{"image": image, "patch_index": fine}, {"image": image, "patch_index": mixed}], setup
    )
    embedding = 2 * RESOLUTION * RESOLUTION * 3 * HIDDEN
    assert flops["patch_embedding"] == (1 + 2) * embedding
    assert flops["encoder"] == 2 * DEPTH * _layer_flops(4)


def test_load_image_center_crops_longer_side(tmp_path):
    pixels = np.zeros((64, 192, 3), np.uint8)
    pixels[:, :64, 0] = 255
    pixels[:, 64:128, 1] = 255
    pixels[:, 128:, 2] = 255
    path = tmp_path / "wide.png"
    Image.fromarray(pixels).save(path)

    image = throughput.load_image(path, 32)

    assert image.shape == (32, 32, 3)
    assert image.dtype == np.uint8
    assert image[16, 16].tolist() == [0, 255, 0]


def test_find_images_skips_other_files(tmp_path):
    root = _write_images(tmp_path / "images")

    paths = throughput.find_images(root)

    assert len(paths) == 6
    assert all(path.suffix == ".png" for path in paths)


@pytest.mark.parametrize("extra", [
    ["--variant", "X/16"],
    ["--patch-sizes", "16,32,64"],
    ["--thresholds", "5.0"],
    ["--scorer", "laplacian"],
    ["--all-smallest", "--scorer", "entropy"],
    ["--warmup", "0"],
    ["--resolution", "60"],
])
def test_invalid_arguments_exit(tmp_path, extra):
    root = _write_images(tmp_path / "images")

    with pytest.raises(SystemExit):
        throughput.main(["--images", str(root), *TINY, *extra])


def test_empty_folder_exits(tmp_path):
    with pytest.raises(SystemExit):
        throughput.main(["--images", str(tmp_path), *TINY])


@pytest.mark.parametrize("patch, resolution, expected", [
    (16, 384, (16, 32, 64)),
    (16, 224, (16, 32)),
    (16, 208, (16,)),
    (8, 64, (8, 16, 32)),
])
def test_default_patch_sizes_divide_resolution(patch, resolution, expected):
    assert throughput.default_patch_sizes(patch, resolution) == expected


def test_warm_up_inputs_one_per_shape():
    a = {"image": np.zeros((2, 8, 8, 3)), "patch_index": np.zeros((2, 4), np.int32)}
    b = {"image": np.ones((2, 8, 8, 3)), "patch_index": np.zeros((2, 4), np.int32)}
    c = {"image": np.zeros((2, 8, 8, 3)), "patch_index": np.zeros((2, 6), np.int32)}

    chosen = throughput.one_per_shape([a, b, c])

    assert len(chosen) == 2
    assert chosen[0] is a
    assert chosen[1] is c
    assert len(throughput.one_per_shape([np.zeros((3, 2)), np.zeros((3, 2)), np.zeros((1, 2))])) == 2
