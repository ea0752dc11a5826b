"""Metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from AutoDDPMLib.benchmark import metrics


def test_dice_by_hand():
    assert metrics.dice([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.5)
    assert metrics.dice([1, 1, 0], [1, 1, 0]) == 1.0
    assert metrics.dice([0, 0], [0, 0]) == 1.0  # both empty: perfect agreement
    assert metrics.dice([1, 0], [0, 1]) == 0.0
    # score > threshold, strictly
    assert metrics.dice_at_threshold([0.5, 0.6, 0.1], [0, 1, 0], 0.5) == 1.0
    assert metrics.dice_at_threshold([0.5, 0.6, 0.1], [1, 1, 0], 0.5) == pytest.approx(2 / 3)


def test_average_precision_by_hand():
    # ranks: P (p 1, r .5), N, P (p 2/3, r 1) -> AP = .5 * 1 + .5 * 2/3
    assert metrics.average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(0.5 + 1 / 3)
    # a tie is one threshold: (0.5: tp 1, fp 1 -> p .5, r .5), (0.2: p 2/3, r 1)
    assert metrics.average_precision([0.5, 0.5, 0.2], [1, 0, 1]) == pytest.approx(0.25 + 1 / 3)
    assert metrics.average_precision([0.1, 0.9], [0, 1]) == pytest.approx(1.0)
    assert math.isnan(metrics.average_precision([0.1, 0.2], [0, 0]))


def test_oracle_dice_curve_matches_the_definition():
    rng = np.random.default_rng(0)
    truth = rng.random((4, 16, 16)) < 0.1
    scores = np.clip(0.4 * truth + 0.5 * rng.random(truth.shape), 0, 1)
    curve = metrics.dice_curve(scores, truth)
    for i in (0, 20, 47, 73, 100):
        assert curve[i] == pytest.approx(metrics.dice_at_threshold(scores, truth, metrics.ORACLE_THRESHOLDS[i]))
    best, threshold = metrics.best_dice(scores, truth)
    assert best == pytest.approx(curve.max())
    assert 0.0 <= threshold <= 1.0
    # perfectly separable scores: the oracle finds Dice 1 with a threshold in the gap
    best, threshold = metrics.best_dice([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])
    assert best == 1.0 and 0.2 <= threshold < 0.8


def test_ssim_mae_lpips():
    rng = np.random.default_rng(1)
    x = rng.random((2, 32, 32)).astype(np.float32)
    for window in ("gaussian", "uniform"):
        assert metrics.ssim(x, x, window=window) == pytest.approx(1.0, abs=1e-6)
        assert metrics.ssim(x, 1 - x, window=window) < 0.5
    # flat images: SSIM = (2ab + C1) / (a^2 + b^2 + C1) (variance terms cancel)
    a, b, c1 = 0.5, 0.6, 0.01**2
    flat = metrics.ssim(np.full((32, 32), a), np.full((32, 32), b))
    assert flat == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-6)
    assert metrics.ssim_map(x, x).shape == (2, 1, 32, 32)
    y = x.copy()
    y[:, :4] += 0.5
    region = np.zeros_like(x, dtype=bool)
    region[:, :4] = True
    assert metrics.mae(x, y) == pytest.approx(0.5 * 4 / 32, abs=1e-6)
    assert metrics.mae(x, y, region) == pytest.approx(0.5, abs=1e-6)
    assert metrics.mae(x, y, ~region) == 0.0
    t = torch.from_numpy(x)[:, None]
    assert metrics.lpips_distance(t, t) == pytest.approx(0.0, abs=1e-6)
    assert metrics.lpips_distance(t, 1 - t) > 0.01


def test_false_positive_rate_and_per_volume_dice():
    prediction = np.zeros((2, 4, 4), dtype=bool)
    foreground = np.zeros((2, 4, 4), dtype=bool)
    foreground[:, 1:3, 1:3] = True  # 4 foreground pixels per slice
    prediction[0, 1, 1] = True  # one flagged foreground pixel on slice 0
    pixels, slices = metrics.false_positive_rate(prediction, foreground)
    assert pixels == pytest.approx(1 / 8)
    assert slices == pytest.approx(0.5)
    truth = np.zeros((3, 2, 2), dtype=bool)
    truth[0, 0, 0] = truth[2, 1, 1] = True
    pred = truth.copy()
    pred[2, 0, 0] = True
    per_volume = metrics.per_volume_dice(pred, truth, ["a", "a", "b"])
    assert per_volume == {"a": 1.0, "b": pytest.approx(2 / 3)}
    assert metrics.median_iqr([1.0, 2.0, 3.0, 4.0, 5.0]) == (3.0, 2.0, 4.0)


def test_size_bins_scale_with_the_grid():
    assert metrics.size_bin(0, 128) == metrics.LESION_FREE
    assert metrics.size_bin(1, 128) == metrics.TINY  # (1, 71]: one pixel is below the smallest bin
    assert [metrics.size_bin(a, 128) for a in (2, 71, 72, 570, 571)] == ["small", "small", "medium", "medium", "large"]
    # 64 x 64: the bounds are divided by 4: (0.25, 17.75], (17.75, 142.5], > 142.5
    assert [metrics.size_bin(a, 64) for a in (1, 17, 18, 142, 143)] == ["small", "small", "medium", "medium", "large"]
    edges = metrics.size_bin_edges(64)
    assert edges[1] == ("medium", 17.75, 142.5)
