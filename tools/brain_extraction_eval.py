#!/usr/bin/env python3
"""Compare real brain extraction (deepbet, brainextractor) with the shipped eroded head region on lgg-dev.

    # 1. the brain masks, in a separate venv that holds deepbet / brainextractor (not the project's):
    python3 -m venv /work/runs/deepbet-venv
    echo /work/main/.venv/lib/python3.11/site-packages > /work/runs/deepbet-venv/lib/python3.11/site-packages/zz_main_venv.pth
    /work/runs/deepbet-venv/bin/pip install --no-deps deepbet brainextractor
    /work/runs/deepbet-venv/bin/pip install connected-components-3d fill_voids fastremap nibabel pandas numba trimesh
    # 2. the table (runs the extraction in that venv where a mask is missing, then scores here):
    python tools/brain_extraction_eval.py --data ../shared/data --cache /work/runs/pp-cache \\
        --masks /work/runs/brain-masks --extract-python /work/runs/deepbet-venv/bin/python

The development patients (lgg-dev: every 8th training patient with a mask, as
tools/postprocess_sweep.py's ``patients()``) and the validation patients are
read as the sweep tools read them, with the AutoDDPM maps of the shipped fast
schedule (9-pixel step-1 dilation) from the cache tools/mask_step_sweep.py
fills. For each brain region the card's post-processing is otherwise unchanged
(map zero outside the region, 3D median inside it, components < 1 mL dropped);
the threshold is recalibrated on the validation patients' healthy voxels (their
tumours are never scored) and the development patients are scored.

The extraction itself runs in a subprocess (``--worker``) with the separate
venv's python, which writes each mask as NIfTI next to a timing file; this
script reads the masks back through the project's reader and AxialStack, so
they land on the very voxels of the map and the truth.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path

MASK_SUFFIX = "_brain.nii.gz"


def stem(image_path: Path) -> str:
    return Path(image_path).name.replace(".nii.gz", "")


# --------------------------------------------------------------------------------------------------------------------
# worker: runs in the extraction venv; imports only nibabel, torch and the extractor


def worker(method: str, out: Path, images: list[str], bet_slice_spacing: float) -> None:
    import nibabel as nib
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    if method == "deepbet":
        import torch

        torch.set_num_threads(1)
        from deepbet import BrainExtraction

        started = time.perf_counter()
        bet = BrainExtraction(no_gpu=True)  # torch.jit.load of the two TorchScript archives inside the wheel
        print(f"deepbet models loaded in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    for image in images:
        target = out / (stem(Path(image)) + MASK_SUFFIX)
        if target.exists():
            continue
        img = nib.load(image)
        started = time.perf_counter()
        if method == "deepbet":
            _, mask, _ = bet.run(img, threshold=0.5, n_dilate=0)
            mask = nib.Nifti1Image(np.asarray(mask.dataobj).astype(np.uint8), img.affine, img.header)
        elif method == "bet":
            from brainextractor import BrainExtractor
            from scipy import ndimage

            # brainextractor works in voxel units (it takes pixdim[1] as the resolution of every axis), and LGG's
            # stacks are 20-90 thick slices under a nominal 1 mm header: a flat disc, whose estimated brain sphere
            # overruns the volume (the numba code does not check bounds and segfaults). So the slices are
            # interpolated to ~isotropic voxels (each read as ``bet_slice_spacing`` mm), a zero margin gives the
            # surface room to move, and the mask is sampled back at the original slices' centres.
            data = np.asarray(img.dataobj, dtype=np.float32)
            factor = bet_slice_spacing / float(img.header.get_zooms()[2])
            fine = ndimage.zoom(data, (1, 1, factor), order=1, grid_mode=True, mode="grid-constant")
            pad = 16
            fine = np.pad(fine, pad)
            affine = img.affine @ np.diag([1, 1, bet_slice_spacing / factor / float(img.header.get_zooms()[2]), 1])
            extractor = BrainExtractor(img=nib.Nifti1Image(fine, affine))
            with contextlib.redirect_stdout(io.StringIO()):
                extractor.run()
            region = extractor.compute_mask()[pad:-pad, pad:-pad, pad:-pad]
            centres = np.minimum(((np.arange(data.shape[2]) + 0.5) * factor).astype(int), region.shape[2] - 1)
            mask = nib.Nifti1Image(region[:, :, centres].astype(np.uint8), img.affine, img.header)
        else:
            raise ValueError(method)
        seconds = time.perf_counter() - started
        mask.header.set_data_dtype(np.uint8)
        tmp = target.with_name(target.name.replace(".nii.gz", ".tmp.nii.gz"))
        mask.to_filename(tmp)
        tmp.rename(target)
        target.with_suffix("").with_suffix(".json").write_text(json.dumps({"seconds": seconds}))
        print(f"{method} {target.name}: {seconds:.1f} s, {int(np.asarray(mask.dataobj).sum())} voxels",
              file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------------
# evaluation: runs in the project's venv


def grow(region, spacing, mm: float):
    """``region`` grown (mm > 0) or shrunk (mm < 0) in-plane by |mm| (exact Euclidean distance, as the shipped erosion)."""
    import numpy as np
    from scipy import ndimage

    if not mm:
        return region
    result = np.zeros_like(region)
    for z in range(len(region)):
        if mm < 0:
            if region[z].any():
                result[z] = ndimage.distance_transform_edt(np.pad(region[z], 1), sampling=spacing[1:])[1:-1, 1:-1] > -mm
        else:
            result[z] = ndimage.distance_transform_edt(~region[z], sampling=spacing[1:]) <= mm if region[z].any() else False
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=("deepbet", "bet"), help=argparse.SUPPRESS)
    parser.add_argument("--images", nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--model", default="flair-lgg")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--cache", type=Path, default=Path("/work/runs/pp-cache"))
    parser.add_argument("--variant", default="tau0.05-dilation9-startcard",
                        help="the cache folder of the shipped fast schedule (9-pixel step-1 dilation)")
    parser.add_argument("--masks", type=Path, default=Path("/work/runs/brain-masks"))
    parser.add_argument("--extract-python", default="/work/runs/deepbet-venv/bin/python")
    parser.add_argument("--methods", nargs="*", default=["deepbet", "bet"])
    parser.add_argument("--grow-mm", type=float, nargs="*", default=[-8.0, -4.0, 0.0, 4.0],
                        help="in-plane growth (negative: erosion) of each extracted mask")
    parser.add_argument("--bet-slice-spacing", type=float, default=5.0,
                        help="slice spacing (mm) brainextractor reads the stacks with (their headers say a nominal 1 mm)")
    parser.add_argument("--healthy-rate", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--per-patient", action="store_true", help="also each development patient's Dice per region")
    parser.add_argument("--figure", type=Path, help="a PNG of each development patient's largest tumour slice with "
                        "the truth and the unmodified regions' outlines")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.masks, args.images, args.bet_slice_spacing)
        return

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).parent))
    from postprocess_sweep import Volume, cache_files, patients

    from AutoDDPMLib.benchmark.volume_benchmark import score
    from AutoDDPMLib.detection.inference import AutoDDPM
    from AutoDDPMLib.detection.map_filters import anomaly_mask, brain_region, smooth
    from AutoDDPMLib.detection.postprocessing import PostProcessing
    from AutoDDPMLib.training.volume_calibration import calibrate_volume_threshold
    from AutoDDPMLib.volumes.slices import AxialStack
    from AutoDDPMLib.volumes.volume_io import read_volume

    split_pairs = patients(args.data)
    images = [str(image) for pairs in split_pairs.values() for image, _ in pairs]
    for method in args.methods:
        folder = args.masks / method
        missing = [i for i in images if not (folder / (stem(Path(i)) + MASK_SUFFIX)).exists()
                   and not (folder / (stem(Path(i)) + ".failed")).exists()]
        # deepbet in one process; brainextractor one volume per process, so that a crash costs one volume only
        for batch in ([missing] if method == "deepbet" else [[i] for i in missing]) if missing else []:
            done = subprocess.run(["nice", "-n", "10", args.extract_python, __file__, "--worker", method,
                                   "--masks", str(folder), "--bet-slice-spacing", str(args.bet_slice_spacing),
                                   "--images", *batch], stdout=subprocess.DEVNULL)
            if done.returncode:
                print(f"{method} failed (exit {done.returncode}) on {batch}", file=sys.stderr, flush=True)
                for i in batch:
                    if not (folder / (stem(Path(i)) + MASK_SUFFIX)).exists():
                        (folder / (stem(Path(i)) + ".failed")).write_text(str(done.returncode))

    engine = AutoDDPM(args.model, seed=0)
    card = engine.card
    settings = PostProcessing(**card.postprocessing)
    cache = args.cache / card.name / engine.schedule_name / args.variant
    volumes = {split: [Volume(image, mask, card, cache_files(cache / split, image, 1)) for image, mask in pairs]
               for split, pairs in split_pairs.items()}
    dev, val = volumes["dev"], volumes["val"]
    raw = {v.name: v.raw_map(settings.polarity) for v in dev + val}
    image_of = {v.name: image for split, pairs in split_pairs.items() for v, (image, _) in zip(volumes[split], pairs)}

    shipped = {v.name: brain_region(v.slices01, v.spacing, settings.brain_erosion_mm) for v in dev + val}

    def extracted(method: str, v) -> np.ndarray | None:
        path = args.masks / method / (stem(image_of[v.name]) + MASK_SUFFIX)
        if not path.exists():
            return None  # the extractor failed on this volume
        region = AxialStack.from_image(read_volume(path)).array > 0
        assert region.shape == v.truth.shape, (path, region.shape, v.truth.shape)
        return region

    def seconds(method: str) -> float:
        files = [args.masks / method / (stem(Path(i)) + "_brain.json") for i in images]
        return float(np.mean([json.loads(f.read_text())["seconds"] for f in files if f.exists()]))

    regions = {f"eroded head region {settings.brain_erosion_mm:g} mm (shipped)": (shipped, None)}
    for method in args.methods:
        base = {v.name: extracted(method, v) for v in dev + val}
        failed = [n for n, r in base.items() if r is None]
        label = {"deepbet": "deepbet", "bet": "brainextractor (BET)"}[method]
        if failed:
            label += f" [failed on {len(failed)}/{len(base)}: shipped region there]"
            print(f"{method} failed on {', '.join(failed)}", file=sys.stderr)
        spacing = {v.name: v.spacing for v in dev + val}
        for mm in args.grow_mm:
            name = f"{label}" + ("" if not mm else f" {'dilated' if mm > 0 else 'eroded'} {abs(mm):g} mm")
            regions[name] = ({n: shipped[n] if r is None else grow(r, spacing[n], mm) for n, r in base.items()},
                             seconds(method))
    print(f"model {card.name}, schedule {engine.schedule_name} ({args.variant}); {len(dev)} lgg-dev patients scored, "
          f"thresholds from the healthy voxels of {len(val)} validation patients at {args.healthy_rate:.0%}; "
          f"post-processing {settings.describe()} with the region replaced\n")
    print("| brain region | tumour in region (pooled / worst patient) | region volume (mL, median) | threshold | "
          "Dice (pooled) | AUPRC | median patient Dice | found (Dice > 0.1) | s / volume |")
    print("|---|---|---|---|---|---|---|---|---|")
    per_patient = {}
    for name, (region, secs) in regions.items():
        def post(v):
            result = np.where(region[v.name], raw[v.name], 0).astype(raw[v.name].dtype)
            return smooth(result, v.spacing, settings.median_mm, region[v.name]) if settings.median_mm else result

        val_maps = [post(v) for v in val]
        threshold, _ = calibrate_volume_threshold(val_maps, [v.healthy for v in val], [v.spacing for v in val],
                                                  settings, args.healthy_rate)
        dev_maps = [post(v) for v in dev]
        masks = [anomaly_mask(m, threshold, v.spacing, settings) for m, v in zip(dev_maps, dev)]
        row = score(name, dev, dev_maps, masks, threshold)
        per_patient[name] = row["per_patient_dice"]
        inside = sum(int(v.truth[region[v.name]].sum()) for v in dev) / sum(int(v.truth.sum()) for v in dev)
        worst = min(v.truth[region[v.name]].sum() / v.truth.sum() for v in dev)
        volume_ml = np.median([region[v.name].sum() * np.prod(v.spacing) / 1000 for v in dev])
        print(f"| {name} | {inside:.1%} / {worst:.0%} | {volume_ml:.0f} | {threshold:.4f} | {row['dice']:.3f} | "
              f"{row['auprc']:.3f} | {row['patient_dice_median']:.3f} | {row['found']}/{row['patients']} | "
              f"{'-' if secs is None else f'{secs:.1f}'} |", flush=True)

    if args.per_patient:
        print("\n| patient | " + " | ".join(per_patient) + " |\n|---|" + "---|" * len(per_patient))
        for v in dev:
            print(f"| {v.name} | " + " | ".join(f"{d[v.name]:.3f}" for d in per_patient.values()) + " |")
    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plain = [n for n in regions if "dilated" not in n and "eroded" not in n.replace("eroded head", "")]
        colours = ["yellow", "cyan", "magenta", "lime"]
        fig, axes = plt.subplots(2, (len(dev) + 1) // 2, figsize=(3 * ((len(dev) + 1) // 2), 6.4))
        for ax, v in zip(axes.ravel(), dev):
            z = int(np.argmax(v.truth.sum(axis=(1, 2))))
            ax.imshow(v.slices01[z], cmap="gray", vmin=0, vmax=1)
            ax.contour(v.truth[z], [0.5], colors="red", linewidths=0.8)
            for name, colour in zip(plain, colours):
                if regions[name][0][v.name][z].any():
                    ax.contour(regions[name][0][v.name][z], [0.5], colors=colour, linewidths=0.8)
            ax.set_title(f"{v.name} z={z}", fontsize=7)
            ax.axis("off")
        fig.suptitle("red: tumour; " + "; ".join(f"{c}: {n}" for n, c in zip(plain, colours)), fontsize=8)
        fig.tight_layout()
        fig.savefig(args.figure, dpi=110)


if __name__ == "__main__":
    main()
