"""How long a tick of the module's threshold slider takes, on real MRML (slicer-core), as a Markdown table.

A map of the size of a clinical 3D scan (256x256x200 and 176x256x256 voxels of
1 mm): zero outside a head-shaped searched region, as the post-processed maps
of the shipped models are, smooth noise inside it that the calibrated threshold
of flair-lgg (0.00568) cuts into many small parts, and a bright "tumour". The
Logic re-thresholds its segmentation as the panel does:

- before: every tick thresholded the whole map, dropped the small parts (a
  26-connected labelling) and labelled the mask again for the summary (the Logic
  at eeda459, reproduced with the engine's remove_small_components);
- tick: ``AutoDDPMLogic.previewThreshold`` (the map compared with the threshold
  inside the searched region's box, the box written into the segment);
- at rest: ``AutoDDPMLogic.setThreshold`` once the slider rests (one labelling
  drops the small parts and counts them: the command line's mask);
- range: ``slider_settings`` when a result is selected (the map's box found, a
  percentile of its values).

    python Testing/slicer_module/slider_speed.py [--output Resources/Benchmark/speed/slider.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import standins  # noqa: E402

standins.install()
sys.path.insert(0, str(ROOT / "AutoDDPM"))

import slicer  # noqa: E402
from scene_helpers import new_scene  # noqa: E402
from scipy import ndimage  # noqa: E402

from AutoDDPM import AutoDDPMLogic  # noqa: E402
from AutoDDPMLib.detection.map_filters import remove_small_components  # noqa: E402
from AutoDDPMLib.provenance import git_commit  # noqa: E402
from AutoDDPMLib.slicer_bridge.results import (  # noqa: E402
    ANOMALY_MAP_REFERENCE,
    MIN_COMPONENT_ATTRIBUTE,
    prepare_segmentation,
    set_segment_mask,
    summarize,
    volume_array,
)
from AutoDDPMLib.slicer_bridge.thresholding import map_box, slider_settings  # noqa: E402

CALIBRATED = 0.005680643  # flair-lgg's post-processed threshold
MIN_COMPONENT_MM3 = 30.0  # flair-lgg's smallest kept part
SHAPES = [(200, 256, 256), (256, 256, 176)]  # [slices, rows, columns]
TICKS = 15  # a drag from half to twice the calibrated threshold


def make_map(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A post-processed-like map: zero outside a head-shaped region, noisy inside, a bright blob for a tumour."""
    rng = np.random.default_rng(seed)
    k, j, i = np.ogrid[:shape[0], :shape[1], :shape[2]]
    centre = [n / 2 for n in shape]
    radii = [0.4 * n for n in shape]
    inside = sum(((axis - c) / r) ** 2 for axis, c, r in zip((k, j, i), centre, radii)) < 1
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 1.5)
    values = np.abs(noise) * (CALIBRATED / np.percentile(np.abs(noise), 98))  # 2% above the threshold
    tumour = sum(((axis - c - 0.15 * n) / 18.0) ** 2 for axis, c, n in zip((k, j, i), centre, shape)) < 1
    values[tumour] += 4 * CALIBRATED
    return np.where(inside, values, 0).astype(np.float32)


def milliseconds(action, *args) -> float:
    started = time.perf_counter()
    action(*args)
    return 1000.0 * (time.perf_counter() - started)


def measure(shape: tuple[int, int, int]) -> list[tuple[str, str, list[float]]]:
    """Rows (what, detail, times in ms) for a map of ``shape``."""
    scene = new_scene()
    anomaly = make_map(shape)
    mapNode = slicer.util.addVolumeFromArray(anomaly, name="anomaly map")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "anomaly")
    prepare_segmentation(segmentation, mapNode, mapNode)
    segmentation.SetAttribute(MIN_COMPONENT_ATTRIBUTE, repr(MIN_COMPONENT_MM3))
    assert segmentation.GetNodeReference(ANOMALY_MAP_REFERENCE) is mapNode
    spacing = mapNode.GetSpacing()
    thresholds = list(np.geomspace(0.5 * CALIBRATED, 2 * CALIBRATED, TICKS))
    logic = AutoDDPMLogic()

    def before(threshold: float) -> None:
        values = volume_array(mapNode)
        mask = remove_small_components(np.asarray(values) > threshold, list(spacing), MIN_COMPONENT_MM3)
        set_segment_mask(segmentation, mask, mapNode)
        summarize(mask, spacing, threshold)

    rows = []
    before(CALIBRATED)  # warm-up: imports, first allocations
    rows.append(("before", "whole map thresholded, parts dropped and counted at each tick",
                 [milliseconds(before, t) for t in thresholds]))
    first = milliseconds(logic.previewThreshold, segmentation, CALIBRATED)
    rows.append(("tick", "threshold in the searched region's box",
                 [milliseconds(logic.previewThreshold, segmentation, t) for t in thresholds]))
    rows.append(("tick, new map", "the first tick on a map also finds its box", [first]))
    rows.append(("at rest", "small parts dropped and counted, once",
                 [milliseconds(logic.setThreshold, segmentation, t) for t in thresholds[::3]]))
    rows.append(("range", "slider range when a result is selected",
                 [milliseconds(lambda: slider_settings(map_box(volume_array(mapNode)), CALIBRATED, CALIBRATED))
                  for _ in range(3)]))
    summary = logic.setThreshold(segmentation, CALIBRATED)
    rows.append(("(map)", f"{summary.components} parts, {summary.volume_ml:.1f} mL at the calibrated threshold; "
                          f"box {'x'.join(str(s.stop - s.start) for s in logic.mapBox(mapNode).box)}", []))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args()
    lines = [
        "# Threshold slider speed",
        "",
        f"- Command: `python Testing/slicer_module/slider_speed.py{' --output ' + str(args.output) if args.output else ''}`",
        f"- Commit: `{git_commit() or '?'}`",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other work, slicer-core MRML, "
        f"numpy {np.__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Map: 1 mm voxels, zero outside a head-shaped region; {TICKS} ticks from 0.5x to 2x the calibrated "
        f"threshold {CALIBRATED:.3g}, parts under {MIN_COMPONENT_MM3:g} mm^3 dropped (flair-lgg's settings)",
        "",
        "| map (slices x rows x columns) | step | what it does | median ms | max ms | runs |",
        "|---|---|---|---|---|---|",
    ]
    for shape in SHAPES:
        for what, detail, times in measure(shape):
            size = "x".join(str(n) for n in shape)
            if times:
                lines.append(f"| {size} | {what} | {detail} | {statistics.median(times):.0f} | {max(times):.0f} | {len(times)} |")
            else:
                lines.append(f"| {size} | {what} | {detail} | | | |")
    lines += ["", "Headless: in Slicer the slice views then redraw the segment's outline, which this does not time. "
              "A tick must stay under 100 ms on a 256x256x200 map (issue 19)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
