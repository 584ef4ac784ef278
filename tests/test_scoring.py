import numpy as np
import pytest

from adaptive_jax import scoring


def _numpy_entropy(gray_patch: np.ndarray, bins: int) -> float:
    counts, _ = np.histogram(gray_patch, bins=bins, range=(0, 255))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def test_grayscale_uses_luma_weights():
    image = np.zeros((1, 2, 2, 3), np.uint8)
    image[0, 0, 0] = (255, 0, 0)
    image[0, 0, 1] = (0, 255, 0)
    image[0, 1, 0] = (0, 0, 255)
    gray = np.asarray(scoring.grayscale(image))
    np.testing.assert_allclose(gray[0, 0, 0], 0.2989 * 255, rtol=1e-6)
    np.testing.assert_allclose(gray[0, 0, 1], 0.5870 * 255, rtol=1e-6)
    np.testing.assert_allclose(gray[0, 1, 0], 0.1140 * 255, rtol=1e-6)
    assert gray[0, 1, 1] == 0


def test_grayscale_rejects_rgba():
    with pytest.raises(ValueError, match="4"):
        scoring.grayscale(np.zeros((1, 4, 4, 4), np.uint8))


@pytest.mark.parametrize("bins", [16, 512])
def test_entropy_matches_numpy_histogram(bins):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 16, 16, 1)).astype(np.uint8)
    images[1, :8, :8] = 7  # one flat 8-px patch
    sizes = (4, 8, 16)
    scores = scoring.entropy_scores(images, sizes, bins)
    for level, size in enumerate(sizes):
        assert scores[level].shape == (2, 16 // size, 16 // size)
        for b in range(2):
            for r in range(16 // size):
                for c in range(16 // size):
                    patch = images[b, r * size:(r + 1) * size, c * size:(c + 1) * size, 0]
                    expected = _numpy_entropy(patch.astype(np.float64), bins)
                    np.testing.assert_allclose(scores[level][b, r, c], expected, atol=1e-5)


def test_entropy_of_flat_and_two_level_patch():
    image = np.zeros((1, 8, 8, 1), np.uint8)
    image[0, :, 4:] = 200  # left half 0, right half 200: exactly 1 bit over the 8-px patch
    scores = scoring.entropy_scores(image, (4, 8), bins=256)
    np.testing.assert_allclose(scores[0][0], 0.0, atol=1e-7)
    np.testing.assert_allclose(scores[1][0, 0, 0], 1.0, atol=1e-6)


def test_laplacian_zero_on_flat_positive_on_edge():
    image = np.full((1, 8, 8, 3), 90, np.uint8)
    flat = scoring.laplacian_scores(image, (4, 8))
    assert float(np.abs(flat[0]).max()) == 0.0
    image[0, :, 6:] = 250
    edged = scoring.laplacian_scores(image, (4, 8))
    assert float(edged[0][0, 0, 0]) == 0.0  # far from the edge
    assert float(edged[0][0, 0, 1]) > 0.0
    assert float(edged[1][0, 0, 0]) > 0.0


def test_constant_scores_are_infinite():
    scores = scoring.constant_scores(np.zeros((3, 16, 32, 3)), (8, 16))
    assert [s.shape for s in scores] == [(3, 2, 4), (3, 1, 2)]
    assert all(np.isinf(np.asarray(s)).all() for s in scores)
