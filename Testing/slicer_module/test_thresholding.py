"""The slider's thresholding (slicer_bridge.thresholding) against the engine's own mask, and the slider's range."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from AutoDDPMLib.detection.map_filters import remove_small_components
from AutoDDPMLib.slicer_bridge.results import summarize
from AutoDDPMLib.slicer_bridge.thresholding import (
    map_box,
    preview_mask,
    settled_mask,
    slider_settings,
    threshold_for_run,
)


def head_like_map(seed: int, shape=(12, 40, 36)) -> np.ndarray:
    """Smooth noise inside an ellipsoid that leaves a margin of zeros, as a post-processed map is outside the brain."""
    rng = np.random.default_rng(seed)
    k, j, i = np.ogrid[:shape[0], :shape[1], :shape[2]]
    inside = ((k - 6) / 5.0) ** 2 + ((j - 22) / 14.0) ** 2 + ((i - 15) / 11.0) ** 2 < 1
    noise = ndimage.gaussian_filter(rng.random(shape), 1.2)
    return np.where(inside, np.abs(noise - 0.5) * 0.1, 0).astype(np.float32)


def full(region, box_mask: np.ndarray, shape) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[region.box] = box_mask
    return mask


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("min_mm3", [0.0, 4.0, 30.0])
def test_the_settled_mask_is_the_engines_mask_and_its_summary(seed, min_mm3) -> None:
    anomaly = head_like_map(seed)
    spacing = (2.0, 1.0, 0.9)
    region = map_box(anomaly)
    assert region.start != (0, 0, 0) and region.values.size < anomaly.size  # the margin is left out
    for threshold in np.quantile(anomaly[anomaly > 0], [0.2, 0.6, 0.9, 0.99]).tolist() + [0.0, float(anomaly.max())]:
        box_mask, summary = settled_mask(region, spacing, threshold, min_mm3)
        engine = remove_small_components(anomaly > threshold, list(spacing), min_mm3)
        np.testing.assert_array_equal(full(region, box_mask, anomaly.shape), engine)
        assert summary == summarize(engine, spacing, threshold)
        np.testing.assert_array_equal(full(region, preview_mask(region, threshold), anomaly.shape), anomaly > threshold)


def test_a_map_without_positive_voxels_has_an_empty_box() -> None:
    region = map_box(np.zeros((3, 4, 5), np.float32))
    assert region.values.size == 0
    mask, summary = settled_mask(region, (1, 1, 1), 0.0, 10.0)
    assert mask.size == 0 and summary.voxels == summary.components == 0


@pytest.mark.parametrize("calibrated, decimals, shown", [(0.005680643, 5, 0.00568), (0.05, 4, 0.05), (0.3, 3, 0.3),
                                                         (2.5, 2, 2.5)])
def test_the_slider_shows_the_calibrated_threshold_with_three_digits(calibrated, decimals, shown) -> None:
    anomaly = head_like_map(0)
    anomaly *= 10 * calibrated / anomaly.max()  # the calibrated threshold well inside the map's values
    settings = slider_settings(map_box(anomaly), calibrated, calibrated)
    assert settings.decimals == decimals and settings.single_step == pytest.approx(10.0 ** -decimals)
    assert round(calibrated, settings.decimals) == pytest.approx(shown)
    # From 0 to a high percentile of the map, never past its maximum (plus a step): the useful range fills it.
    assert settings.minimum == 0 and 2 * calibrated <= settings.maximum <= anomaly.max() + settings.single_step
    assert settings.single_step <= settings.page_step < settings.maximum


def test_the_slider_range_holds_the_threshold_it_shows() -> None:
    anomaly = head_like_map(0)
    settings = slider_settings(map_box(anomaly), 0.005, current=0.9)
    assert settings.maximum >= 0.9
    without_map = slider_settings(None, 0.005, current=0.005)
    assert without_map.maximum == pytest.approx(0.05 + 1e-5) and without_map.decimals == 5


def test_a_run_is_given_no_threshold_while_the_slider_holds_a_calibrated_one() -> None:
    """None lets the engine pick the card's threshold, or its threshold for a skull-stripped input; a threshold the
    user chose is given as chosen (the engine then uses it for every input)."""
    with_skull, stripped = 0.00568123, 0.0071234
    calibrated = (with_skull, stripped)
    assert threshold_for_run(with_skull, calibrated) is None
    assert threshold_for_run(stripped, calibrated) is None  # shown after a run on a stripped input
    # The slider, moved away and back, holds the calibrated threshold as it shows it.
    slider = slider_settings(None, with_skull, with_skull)
    assert threshold_for_run(round(with_skull, slider.decimals), calibrated) is None
    assert threshold_for_run(round(stripped, slider.decimals), calibrated) is None
    # One step away is the user's choice.
    for chosen in (round(with_skull + slider.single_step, slider.decimals), 0.0, 2 * stripped):
        assert threshold_for_run(chosen, calibrated) == chosen
    assert threshold_for_run(0.0, (0.0,)) is None  # a card calibrated to 0
    with pytest.raises(ValueError, match="finite number >= 0"):
        threshold_for_run(-0.1, calibrated)
