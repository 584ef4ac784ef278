"""Tests on real images; they skip with a message where the data folder is absent."""

import numpy as np
from PIL import Image

from adaptive_jax import scoring, selection, train
from adaptive_jax.profiling import count_compilations
from configs import cifar10
from tests.conftest import CIFAR10_DIR, IMAGENET_SAMPLES_DIR, require_dir
from tests.test_train import _lines, _tiny


def test_cifar10_training_steps(tmp_path):
    root = require_dir(CIFAR10_DIR)
    config = _tiny(cifar10.get_config(), dataset=f"imagefolder:{root}", total_steps=6,
                   eval_every=6, shuffle_buffer=1000, eval_batch_size=500)
    with count_compilations() as counts:
        metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
    # At most one program per bucket, (24, 40, 56, 64) for 32x32 images and sizes 4, 8, 16,
    # however varied the images' token counts.
    assert 1 <= counts["train_step"] <= 4
    assert 1 <= counts["eval_step"] <= 4
    assert metrics["eval_examples"] == 10_000
    assert 10 < metrics["eval_tokens_per_image"] < 64
    losses = [l["train_loss"] for l in _lines(str(tmp_path / "run")) if "train_loss" in l]
    assert len(losses) == 3
    assert all(np.isfinite(losses))


def test_imagenet_photos_tile_with_apt_thresholds():
    root = require_dir(IMAGENET_SAMPLES_DIR)
    paths = sorted(root.iterdir())[:8]
    images = []
    for path in paths:
        image = Image.open(path).convert("RGB").resize((384, 384), Image.BILINEAR)
        images.append(np.asarray(image))
    images = np.stack(images)
    sizes = (16, 32, 64)
    scores = scoring.entropy_scores(images, sizes, bins=512)
    masks = selection.threshold_tiling(scores, (5.75, 4.0))
    counts = np.asarray(selection.token_counts(masks))
    cover = sum(
        np.kron(np.asarray(m), np.ones((s, s), np.int32)) for m, s in zip(masks, sizes)
    )
    assert cover.min() == 1
    assert cover.max() == 1
    # 576 tokens is the uniform 16-px grid; real photos have flat regions to merge.
    assert counts.max() <= 576
    assert counts.mean() < 576

