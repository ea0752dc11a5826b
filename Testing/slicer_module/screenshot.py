"""Render the extension's screenshot from a real run of the module's Logic, offscreen with VTK.

The Slicer application cannot run here, so this draws what its slice views
show after Apply: the FLAIR with the anomaly map overlaid (the module's colour
table, foreground opacity 0.5) and the Anomaly segment's outline, the
pseudo-healthy volume, and the anomaly map, with the module's summary line.
Every pixel comes from the nodes the Logic created (slicer-core's MRML).

    python Testing/slicer_module/screenshot.py [--model DIR] [--output PNG]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import standins  # noqa: E402

standins.install()
sys.path.insert(0, str(ROOT / "AutoDDPM"))

import slicer  # noqa: E402
import vtk  # noqa: E402
from scene_helpers import new_scene  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from AutoDDPM import SAMPLE_NAME, AutoDDPMLogic  # noqa: E402
from AutoDDPMLib.slicer_bridge.results import read_volume, volume_array  # noqa: E402

PANEL = 420  # pixels per view
TITLE = 34
FOOTER = 40


def grey(node, slice_index: int) -> np.ndarray:
    """A slice through the node's display window/level, as Slicer's background layer shows it (RGB 0..1)."""
    display = node.GetDisplayNode()
    low = display.GetLevel() - display.GetWindow() / 2
    values = np.clip((volume_array(node)[slice_index] - low) / display.GetWindow(), 0, 1)
    return np.repeat(values[..., None], 3, axis=-1)


def coloured(node, slice_index: int) -> np.ndarray:
    """A slice through the node's colour table and window (RGBA 0..1)."""
    display = node.GetDisplayNode()
    table = display.GetColorNode().GetLookupTable()
    colours = np.array([table.GetTableValue(i) for i in range(table.GetNumberOfTableValues())])
    low = display.GetLevel() - display.GetWindow() / 2
    scaled = np.clip((volume_array(node)[slice_index] - low) / display.GetWindow(), 0, 1)
    return colours[np.round(scaled * (len(colours) - 1)).astype(int)]


def outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    return mask & ~inner


def to_screen(rgb: np.ndarray, node) -> np.ndarray:
    """Orient a [j, i] slice the way Slicer's axial view does: anterior up, patient right on the left."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    if matrix.GetElement(0, 0) > 0:  # i runs towards patient right: show it right-to-left
        rgb = rgb[:, ::-1]
    if matrix.GetElement(1, 1) > 0:  # j runs anterior: the top row is the last one
        rgb = rgb[::-1]
    return rgb


def image_actor(rgb: np.ndarray, x0: int, y0: int) -> vtk.vtkImageActor:
    height, width = rgb.shape[:2]
    zoom = PANEL / max(height, width)
    # VTK images start at the bottom row.
    data = (np.clip(rgb[::-1], 0, 1) * 255).astype(np.uint8).reshape(-1, 3)
    image = vtk.vtkImageData()
    image.SetDimensions(width, height, 1)
    image.SetSpacing(zoom, zoom, 1)
    image.SetOrigin(x0 + (PANEL - width * zoom) / 2, y0 + (PANEL - height * zoom) / 2, 0)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(data, deep=True))
    actor = vtk.vtkImageActor()
    actor.GetMapper().SetInputData(image)
    actor.InterpolateOff()
    return actor


def text_actor(text: str, x: int, y: int, size: int, colour=(1, 1, 1)) -> vtk.vtkTextActor:
    actor = vtk.vtkTextActor()
    actor.SetInput(text)
    actor.SetDisplayPosition(x, y)
    actor.GetTextProperty().SetFontSize(size)
    actor.GetTextProperty().SetColor(*colour)
    return actor


def render(panels: list[tuple[str, np.ndarray]], footer: str, output: Path) -> None:
    width, height = PANEL * len(panels), PANEL + TITLE + FOOTER
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(width, height)
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(0, 0, 0)
    window.AddRenderer(renderer)
    for index, (title, rgb) in enumerate(panels):
        renderer.AddActor(image_actor(rgb, index * PANEL, FOOTER))
        renderer.AddActor(text_actor(title, index * PANEL + 10, FOOTER + PANEL + 8, 18))
    renderer.AddActor(text_actor(footer, 10, 12, 17, (1.0, 0.85, 0.1)))
    # A pixel-exact 2D camera: one world unit per screen pixel.
    camera = renderer.GetActiveCamera()
    camera.ParallelProjectionOn()
    camera.SetParallelScale(height / 2)
    camera.SetFocalPoint(width / 2, height / 2, 0)
    camera.SetPosition(width / 2, height / 2, 1000)
    renderer.ResetCameraClippingRange()
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.Update()
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(output))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model bundle (default: the bundled default model)")
    parser.add_argument("--output", default=str(ROOT / "Resources" / "Screenshots" / "AutoDDPM-screenshot.png"))
    args = parser.parse_args()

    samples = ROOT / "Resources" / "SampleData"
    scene = new_scene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", SAMPLE_NAME)
    read_volume(volume, samples / f"{SAMPLE_NAME}.nii.gz")
    volume.CreateDefaultDisplayNodes()
    display = volume.GetDisplayNode()
    display.AutoWindowLevelOff()
    low, high = np.percentile(volume_array(volume), [1, 99.5])
    display.SetWindowLevelMinMax(low, high)
    truth = slicer.vtkMRMLScalarVolumeNode()
    read_volume(truth, samples / f"{SAMPLE_NAME}_mask.nii.gz")
    # The slice with the most tumour, as the expert outlined it.
    level = int(np.argmax((volume_array(truth) > 0).sum(axis=(1, 2))))

    logic = AutoDDPMLogic()
    result = logic.process(volume, model=args.model, schedule="fast", device="auto", seed=0)
    anomaly = coloured(result.anomalyMapVolume, level)
    segment = volume_array(result.anomalyMapVolume)[level] > result.threshold
    overlay = grey(volume, level) * (1 - 0.5 * anomaly[..., 3:]) + anomaly[..., :3] * 0.5 * anomaly[..., 3:]
    overlay[outline(segment)] = (1.0, 0.85, 0.1)
    panels = [
        ("FLAIR + anomaly map + Anomaly segment", to_screen(overlay, volume)),
        ("Pseudo-healthy", to_screen(grey(result.pseudoHealthyVolume, level), volume)),
        ("Anomaly map", to_screen(anomaly[..., :3] * anomaly[..., 3:], volume)),
    ]
    footer = f"AutoDDPM ({result.engineStart.get('model')}, {result.engineStart.get('schedule')} schedule, slice {level}): " \
             + logic.summaryText(result.summary)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    render(panels, footer, output)
    print(f"{output}: {footer}")


if __name__ == "__main__":
    main()
