"""The synthetic lesion generator: seeded, inside the head, at the requested size bin."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from AutoDDPMLib.benchmark.lesions import add_lesion, head_foreground
from AutoDDPMLib.benchmark.metrics import size_bin


def healthy_slice(n: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n]
    head = ((yy - n / 2) / (n * 0.42)) ** 2 + ((xx - n / 2) / (n * 0.36)) ** 2 < 1
    texture = ndimage.gaussian_filter(rng.standard_normal((n, n)), 1.5)
    return np.where(head, 0.45 + 0.05 * texture / texture.std(), 0.0).astype(np.float32)


def test_same_seed_same_lesion():
    image = healthy_slice()
    a, mask_a = add_lesion(image, "medium", seed=7)
    b, mask_b = add_lesion(image, "medium", seed=7)
    c, _ = add_lesion(image, "medium", seed=8)
    assert np.array_equal(a, b) and np.array_equal(mask_a, mask_b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.float32 and mask_a.dtype == bool


@pytest.mark.parametrize("n", [32, 64, 128])
@pytest.mark.parametrize("bin_name", ["small", "medium", "large"])
def test_size_bin_respected_and_lesion_inside_the_head(n, bin_name):
    image = healthy_slice(n)
    foreground = head_foreground(image)
    for seed in range(4):
        out, mask = add_lesion(image, bin_name, seed=seed)
        assert size_bin(int(mask.sum()), n) == bin_name
        assert not (mask & ~foreground).any()
        assert out.min() >= 0.0 and out.max() <= 1.0
        # Far from the lesion the slice is untouched.
        far = ~ndimage.binary_dilation(mask, iterations=5)
        assert np.abs(out - image)[far].max() < 1e-3


def test_polarity_and_shape():
    image = healthy_slice()
    bright, mask = add_lesion(image, "large", seed=3, polarity="hyper", shape="blob")
    assert bright[mask].mean() > image[mask].mean() + 0.1
    dark, mask = add_lesion(image, "large", seed=3, polarity="hypo", shape="ellipse")
    assert dark[mask].mean() < image[mask].mean() - 0.1
    # texture: the lesion is not a flat fill
    assert dark[mask].std() > 0.005


def test_errors():
    with pytest.raises(ValueError):
        add_lesion(healthy_slice(), "huge")
    with pytest.raises(ValueError):
        add_lesion(np.zeros((32, 32), np.float32), "small")
    with pytest.raises(ValueError):
        add_lesion(np.zeros((32, 16), np.float32), "small")
