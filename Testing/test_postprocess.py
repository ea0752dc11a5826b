"""Post-processing of the anomaly map: polarity, brain region, 3D median and small components, in mm."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import make_head_volume

from AutoDDPMLib.detection.inference import AutoDDPM
from AutoDDPMLib.detection.map_filters import (
    anomaly_mask,
    brain_region,
    head_region,
    median_kernel,
    postprocess_map,
    remove_small_components,
    smooth,
)
from AutoDDPMLib.detection.postprocessing import PostProcessing, option_settings
from AutoDDPMLib.diffusion.polarity import deviation
from AutoDDPMLib.errors import AutoDDPMError
from AutoDDPMLib.models.bundle import read_card

FLAIR_LIKE = {"polarity": "bright", "brain_erosion_mm": 4.0, "median_mm": 3.0, "min_component_mm3": 20.0}


def disc_volume(slices: int = 5, size: int = 64, radius: float = 25, hole: float = 0) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] - size / 2 + 0.5
    r = np.hypot(yy, xx)
    tissue = ((r < radius) & (r >= hole)).astype(np.float32) * 0.6
    return np.repeat(tissue[None], slices, axis=0)


def test_deviation_counts_the_chosen_direction_only() -> None:
    x, x_ph = torch.tensor([0.8, 0.2, 0.5]), torch.tensor([0.5, 0.5, 0.5])
    assert torch.allclose(deviation(x, x_ph, "both"), torch.tensor([0.3, 0.3, 0.0]))
    assert torch.allclose(deviation(x, x_ph, "bright"), torch.tensor([0.3, 0.0, 0.0]))
    assert torch.allclose(deviation(x, x_ph, "dark"), torch.tensor([0.0, 0.3, 0.0]))
    with pytest.raises(ValueError, match="unknown polarity 'up'"):
        deviation(x, x_ph, "up")


def test_settings_round_trip_and_refuse_what_they_do_not_know() -> None:
    settings = PostProcessing.from_dict(FLAIR_LIKE)
    assert settings.to_dict() == {**FLAIR_LIKE, "brain_region": "head"} and not settings.is_none
    assert PostProcessing.from_dict(settings.to_dict()) == settings
    assert PostProcessing.from_dict(None).is_none and PostProcessing.from_dict({}) == PostProcessing.none()
    assert "bright deviations" in settings.describe() and "3D median 3 mm" in settings.describe()
    with pytest.raises(AutoDDPMError, match="unknown post-processing settings in the model card: smoothing"):
        PostProcessing.from_dict({"smoothing": 3})
    with pytest.raises(AutoDDPMError, match="unknown polarity 'hyper'"):
        PostProcessing(polarity="hyper")
    with pytest.raises(AutoDDPMError, match="median_mm must be"):
        PostProcessing(median_mm=-1.0)
    with pytest.raises(AutoDDPMError, match="unknown brain region 'skull'"):
        PostProcessing(brain_region="skull")


def test_the_deepbet_option_is_the_cards_post_processing_with_deepbets_region() -> None:
    assert option_settings("card", FLAIR_LIKE) == FLAIR_LIKE and option_settings("none", FLAIR_LIKE) == {}
    deepbet = option_settings("deepbet", FLAIR_LIKE)
    assert deepbet == {**FLAIR_LIKE, "brain_region": "deepbet", "brain_erosion_mm": 0.0}
    settings = PostProcessing.for_option("deepbet", FLAIR_LIKE)
    assert settings.brain_region == "deepbet" and settings.median_mm == FLAIR_LIKE["median_mm"]
    assert "deepbet brain mask" in settings.describe() and "eroded" not in settings.describe()
    with pytest.raises(AutoDDPMError, match="this model's card has none"):
        option_settings("deepbet", {})
    with pytest.raises(AutoDDPMError, match="--postprocess must be one of card, deepbet, none"):
        option_settings("skull", FLAIR_LIKE)


def test_head_region_fills_holes_and_keeps_the_largest_region() -> None:
    head = disc_volume(hole=8)  # a ring: the hole is a ventricle, filled
    head[:, 0:3, 0:3] = 0.6  # a speck of signal in the corner: not the head
    region = head_region(head)
    assert region[:, 32, 32].all() and not region[:, 1, 1].any()


def test_brain_region_erodes_in_plane_by_millimetres() -> None:
    volume = disc_volume(radius=25)
    for pixel_mm in (1.0, 0.5):
        brain = brain_region(volume, (5.0, pixel_mm, pixel_mm), erosion_mm=10.0)
        # The disc's radius is 25 pixels: 10 mm is 10 pixels at 1 mm, 20 at 0.5 mm.
        remaining = 25 - 10 / pixel_mm
        row = brain[2, 32]
        assert abs(row.sum() / 2 - remaining) <= 1.5
        assert brain.all(axis=(1, 2)).sum() == 0 and (brain.sum(axis=(1, 2)) == brain[0].sum()).all()  # every slice alike
    assert (brain_region(volume, (1, 1, 1), 0) == head_region(volume)).all()


def test_median_kernel_spans_millimetres_and_at_least_the_neighbours() -> None:
    assert median_kernel((5.0, 1.0, 1.0), 5.0) == (3, 5, 5)
    assert median_kernel((1.0, 1.0, 1.0), 3.0) == (3, 3, 3)
    assert median_kernel((1.0, 0.5, 0.5), 5.0) == (5, 11, 11)


def test_median_removes_a_speck_and_keeps_a_blob() -> None:
    anomaly = np.zeros((5, 32, 32), np.float32)
    anomaly[2, 5, 5] = 1.0  # one voxel
    anomaly[1:4, 15:25, 15:25] = 1.0  # a 3D blob
    smoothed = smooth(anomaly, (1.0, 1.0, 1.0), 3.0)
    assert smoothed[2, 5, 5] == 0 and smoothed[2, 20, 20] == 1.0


def test_median_inside_a_region_equals_the_whole_filter_there() -> None:
    rng = np.random.default_rng(1)
    anomaly = rng.random((6, 40, 40)).astype(np.float32)
    region = np.zeros(anomaly.shape, bool)
    region[1:5, 3:20, 10:39] = True  # touches the volume's edge on one side
    anomaly[~region] = 0
    whole = smooth(anomaly, (1.0, 1.0, 1.0), 5.0)
    inside = smooth(anomaly, (1.0, 1.0, 1.0), 5.0, region)
    assert np.array_equal(inside[region], whole[region]) and (inside[~region] == 0).all()


def test_small_components_are_measured_in_cubic_millimetres() -> None:
    mask = np.zeros((4, 10, 10), bool)
    mask[1, 1, 1:6] = True  # 5 voxels
    mask[2, 6:9, 6:9] = True  # 9 voxels
    mask[3, 9, 9] = True  # touches the 9 only through a corner: 26-connected to it
    spacing = (2.0, 2.0, 2.0)  # 8 mm3 a voxel: 40 and 80 mm3
    assert remove_small_components(mask, spacing, 50.0).sum() == 10
    assert remove_small_components(mask, spacing, 30.0).sum() == 15
    assert remove_small_components(mask, spacing, 0.0) is mask


def test_postprocessed_map_is_zero_outside_the_brain_and_its_mask_drops_specks() -> None:
    slices01 = disc_volume(radius=25)
    anomaly = np.full(slices01.shape, 0.2, np.float32)
    settings = PostProcessing.from_dict(FLAIR_LIKE)
    result, brain = postprocess_map(anomaly, slices01, (1.0, 1.0, 1.0), settings)
    assert brain is not None and (result[~brain] == 0).all() and (result[brain] > 0).all()
    raw, none_brain = postprocess_map(anomaly, slices01, (1.0, 1.0, 1.0), PostProcessing.none())
    assert raw is anomaly and none_brain is None
    speck = np.zeros_like(anomaly)
    speck[2, 32, 32] = 1.0
    assert not anomaly_mask(speck, 0.5, (1.0, 1.0, 1.0), settings).any()
    assert anomaly_mask(speck, 0.5, (1.0, 1.0, 1.0), PostProcessing.none()).sum() == 1


def card_with(folder, **changes):
    card = json.loads((folder / "model.json").read_text())
    card.update(changes)
    (folder / "model.json").write_text(json.dumps(card))
    return folder


def test_engine_applies_the_cards_post_processing_and_none_gives_the_raw_map(tiny_model_with) -> None:
    calibrated = {"mask_tau": 0.05, "anomaly": 0.05, "calibrated": True, "calibration": {"schedule": "fast"}}
    model = card_with(tiny_model_with("pp"), postprocessing=FLAIR_LIKE, thresholds=calibrated)
    image = make_head_volume(shape=(6, 40, 48))
    raw = AutoDDPM(model, device="cpu", backend="torch", postprocess="none").process_volume(image)
    processed = AutoDDPM(model, device="cpu", backend="torch").process_volume(image)
    raw_map, map_ = (sitk.GetArrayFromImage(r.anomaly_map) for r in (raw, processed))
    brain = sitk.GetArrayFromImage(processed.brain_region).astype(bool)
    assert raw.brain_region is None and raw.postprocessing.startswith("none")
    assert brain.any() and (map_[~brain] == 0).all() and raw_map[~brain].max() > 0
    assert processed.brain_region.GetSpacing() == image.GetSpacing()
    # No threshold was calibrated for the post-processed map: the run says so.
    assert any("no threshold calibrated for its post-processed map" in w for w in processed.warnings)
    # A card without post-processing runs the paper's map, as before.
    plain = AutoDDPM(tiny_model_with("plain"), device="cpu", backend="torch").process_volume(image)
    assert np.array_equal(sitk.GetArrayFromImage(plain.anomaly_map), raw_map)


def test_engine_refuses_an_unknown_postprocess_choice(tiny_model) -> None:
    with pytest.raises(AutoDDPMError, match="--postprocess must be one of card, deepbet, none"):
        AutoDDPM(tiny_model, device="cpu", postprocess="median")


def test_healthy_voxels_keep_away_from_the_lesion_but_take_lesion_free_slices() -> None:
    from AutoDDPMLib.training.volume_calibration import healthy_voxels

    tissue = np.ones((5, 40, 40), bool)
    truth = np.zeros_like(tissue)
    truth[2, 18:22, 18:22] = True
    healthy = healthy_voxels(truth, tissue, (1.0, 1.0, 1.0), margin_mm=10.0)
    assert not healthy[2, 20, 25] and healthy[2, 20, 35]  # 5 and 15 mm from the lesion on its slice
    assert healthy[1].all() and healthy[3].all()  # slices without lesion count whole
    assert (healthy_voxels(np.zeros_like(tissue), tissue, (1, 1, 1)) == tissue).all()


def test_volume_threshold_flags_the_healthy_rate_after_small_components_go() -> None:
    from AutoDDPMLib.training.volume_calibration import calibrate_volume_threshold, flagged_rate

    rng = np.random.default_rng(0)
    maps = [rng.random((4, 30, 30)).astype(np.float32) for _ in range(2)]
    healthy = [np.ones(m.shape, bool) for m in maps]
    spacings = [(1.0, 1.0, 1.0)] * 2
    plain = PostProcessing(polarity="bright")
    threshold, rate = calibrate_volume_threshold(maps, healthy, spacings, plain, 0.05)
    assert rate <= 0.05 and np.isclose(threshold, np.quantile(np.concatenate([m.ravel() for m in maps]), 0.95), atol=1e-3)
    # Dropping components below 3 voxels unflags isolated noise: a lower threshold keeps the same rate, and it is the lowest.
    dropping = PostProcessing(polarity="bright", min_component_mm3=3.0)
    lower, rate = calibrate_volume_threshold(maps, healthy, spacings, dropping, 0.05)
    assert lower < threshold and rate <= 0.05
    assert flagged_rate(maps, healthy, spacings, dropping, lower - 1e-3) > 0.05


def patients_with_masks(folder, count: int = 2):
    """``count`` synthetic heads with their bright blob as the expert mask, named as LGG patients are."""
    folder.mkdir()
    for seed in range(count):
        image = make_head_volume(seed=seed)
        sitk.WriteImage(image, str(folder / f"p{seed}_flair.nii.gz"))
        mask = sitk.GetImageFromArray((sitk.GetArrayFromImage(image) > 800).astype(np.uint8))  # the blob is 900
        mask.CopyInformation(image)
        sitk.WriteImage(mask, str(folder / f"p{seed}_mask.nii.gz"))
    return folder


def test_calibrate_writes_the_post_processed_threshold_the_engine_then_uses(tiny_model_with, tmp_path) -> None:
    from AutoDDPMLib.cli import main
    from AutoDDPMLib.models.bundle import read_card

    model = card_with(tiny_model_with("pp"), postprocessing=FLAIR_LIKE)
    data = patients_with_masks(tmp_path / "volumes")
    assert main(["calibrate", str(model), "--data", str(data), "--backend", "torch"]) == 0
    card = read_card(model)
    entry = card.data["thresholds"]["postprocessed"]
    assert entry["settings"] == FLAIR_LIKE and entry["calibration"]["volumes"] == 2
    assert entry["calibration"]["flagged_healthy_voxels"] <= 0.01
    assert card.postprocessed_threshold("fast") == entry["anomaly"]
    engine = AutoDDPM(model, device="cpu", backend="torch")
    assert engine.threshold == entry["anomaly"] and engine.threshold_warning is None
    assert AutoDDPM(model, device="cpu", backend="torch", postprocess="none").threshold == card.anomaly_threshold
    # Other settings than those calibrated for: the threshold no longer counts.
    card_with(model, postprocessing=dict(FLAIR_LIKE, median_mm=7.0))
    assert read_card(model).postprocessed_threshold("fast") is None


def test_volume_benchmark_scores_each_patient_as_autoddpm_run_makes_its_map(tiny_model_with, tmp_path) -> None:
    from AutoDDPMLib.cli import main

    model = card_with(tiny_model_with("pp"), postprocessing=FLAIR_LIKE)
    data = patients_with_masks(tmp_path / "volumes")
    out = tmp_path / "bench"
    assert main(["benchmark-volumes", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--backend", "torch",
                 "--baselines", "residual-fast"]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["AutoDDPM fast", "AutoDDPM fast (raw map)", "Input intensity", "Input intensity (raw)",
                                           "Residual (coarse, fast)", "Residual (coarse, fast) (raw)"]
    # Every calibrated baseline flags at most 1% of the healthy voxels; the map outside the brain is never flagged.
    assert all(r["healthy_fpr"] <= 0.01 for r in rows[2:])
    for row in rows:
        assert sorted(row["per_patient_dice"]) == ["p0", "p1"] and row["patients"] == 2
        assert 0 <= row["dice"] <= 1 and 0 <= row["found"] <= 2
    # The bright blob is what intensity finds best: calibrated on the healthy voxels, it is found in both.
    assert rows[2]["found"] == 2 and rows[2]["healthy_fpr"] <= 0.01
    meta = json.loads((out / "meta.json").read_text())
    assert meta["postprocessing"] == {**FLAIR_LIKE, "brain_region": "head"} and meta["cases"] == 2
    report = (out / "results.md").read_text()
    assert "| p1 |" in report and "found (Dice > 0.1)" in report
    assert (out / "patient_dice.png").is_file()
    # A card without post-processing is scored by `autoddpm benchmark`, not here.
    assert main(["benchmark-volumes", "--model", str(tiny_model_with("plain")), "--data", str(data), "--output-dir",
                 str(tmp_path / "b2")]) == 2


def test_a_volume_benchmark_is_recorded_in_the_card_it_was_made_with(tiny_model_with, tmp_path, capsys, monkeypatch) -> None:
    from AutoDDPMLib.benchmark.validation_record import record_volume_validation
    from AutoDDPMLib.cli import main

    model = card_with(tiny_model_with("pp"), postprocessing=FLAIR_LIKE)
    data = patients_with_masks(tmp_path / "volumes")
    run = tmp_path / "bench"
    assert main(["benchmark-volumes", "--model", str(model), "--data", str(data), "--output-dir", str(run), "--backend", "torch"]) == 0
    autoddpm = json.loads((run / "results.json").read_text())[0]
    recorded = record_volume_validation(run, model).data["validation_volumes"]
    assert recorded["dice"] == autoddpm["dice"] and recorded["found"] == autoddpm["found"] and recorded["patients"] == 2
    assert recorded["threshold"] == read_card(model).run_threshold("fast") and recorded["benchmark"] == str(run)

    resources = tmp_path / "Resources"
    shutil.copytree(model, resources / "Models" / "pp")
    monkeypatch.setenv("AUTODDPM_RESOURCES", str(resources))
    capsys.readouterr()
    assert main(["models"]) == 0
    assert f"2 whole volumes: Dice {autoddpm['dice']:.3f}, AUPRC {autoddpm['auprc']:.3f}" in capsys.readouterr().out

    # Post-processed otherwise since the run: the run no longer says what the model does.
    card_with(model, postprocessing=dict(FLAIR_LIKE, median_mm=7.0))
    with pytest.raises(AutoDDPMError, match="other post-processing or thresholds"):
        record_volume_validation(run, model)
