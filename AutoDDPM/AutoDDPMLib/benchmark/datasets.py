"""The benchmark's evaluation sets: slices on the model grid with their truth.

Everything is evaluated on the model grid, with slices prepared exactly as
inference prepares them (the card's intensity percentiles and signal test,
``slices.to_model_grid``); ground-truth masks go through the same
``to_model_grid`` and are thresholded at 0.5.

Datasets (under the data root, ``../shared/data`` of the repository by default):

* ``lgg``: LGG FLAIR validation patients (``lgg_flair/val``), whole volumes: every
  slice with signal, with and without tumour; expert masks.
* ``lgg-synth``: lesion-free LGG validation slices with synthetic lesions
  (:mod:`lesions`), one per size bin per slice, plus the clean slices.
* ``ixi``: IXI T1 validation slices (``ixi_t1_midaxial/val``) with synthetic
  lesions, one per size bin per slice, plus the clean slices.
* ``lgg-dev``: the tumour slices of every 8th LGG training patient
  (``lgg_flair/train``). Training only ever sees lesion-free slices, so these
  tumours are unseen: a development set for choosing a recipe without looking
  at the validation patients. Never a default; its lesion-free slices are left
  out (their healthy tissue was trained on).
* ``lgg-dev-stripped``: lgg-dev as a skull-stripping pipeline would deliver it:
  each volume set to 0 outside the brain region the engine computes (the card's
  ``brain_erosion_mm``, 12 mm without one) before the card's preprocessing. The
  truth is lgg-dev's, tumour voxels stripped away included. Never a default.
* ``lgg-dev-scanner``: lgg-dev's slices with scanner-like intensity changes after
  the preprocessing (gamma, intensity scale, smooth bias field; the training
  augmentation's transforms at fixed strengths), one draw per patient from the
  benchmark's seed. Never a default.
* ``ixi-dev``: every 8th IXI T1 training slice with synthetic lesions, as ``ixi``:
  the T1 development set. The lesions are new to the model but the tissue around
  them is not, so it flatters; for comparing recipes only. Never a default.

By default the datasets follow the model card's modality (FLAIR: lgg and
lgg-synth; T1: ixi; otherwise all three): a model is benchmarked on the
contrast it was trained for. The baselines' thresholds come from separate
healthy calibration slices (:func:`calibration_slices`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import AutoDDPMError

DATASETS = ("lgg", "lgg-synth", "ixi", "lgg-dev", "ixi-dev", "lgg-dev-stripped", "lgg-dev-scanner")
DEV_STRIDE = 8  # the development sets: every 8th training patient (lgg-dev: 10 of 80) or subject (ixi-dev: 58 of 461)
# lgg-dev-scanner's changes: a gamma up to exp(+-0.3), an intensity scale up to exp(+-0.15), a bias field up to
# exp(+-0.3); as strong as the augmentation that docs/TRAINING.md suggests, so it measures what training covered.
SCANNER_GAMMA, SCANNER_CONTRAST, SCANNER_BIAS_FIELD = 0.3, 0.15, 0.3


@dataclass
class EvalSet:
    """Cases on the model grid: inputs, truth, the healthy image when known, grouping."""

    name: str
    x: Any  # torch.Tensor [C, 1, N, N] in [0, 1]
    truth: np.ndarray  # bool [C, N, N]
    healthy: Optional[np.ndarray]  # float32 [C, N, N] or None
    volumes: list[str]  # volume (LGG) or case id per case
    bins: list[str]  # size bin per case
    description: str = ""
    per_volume: bool = False  # whether ``volumes`` are real volumes (timing per volume)

    def __len__(self) -> int:
        return len(self.volumes)

    @property
    def foreground(self) -> np.ndarray:
        from ..volumes.slices import FOREGROUND_LEVEL

        return self.x[:, 0].numpy() > FOREGROUND_LEVEL

    def groups(self) -> list[np.ndarray]:
        """Case indices per volume (per_volume) or one group of all cases."""
        if not self.per_volume:
            return [np.arange(len(self))]
        ids = np.asarray(self.volumes)
        return [np.flatnonzero(ids == v) for v in dict.fromkeys(self.volumes)]


def scanner_changed(grid, seed: int):
    """Slices [S, 1, N, N] of one patient with one draw of scanner-like intensity changes (seeded)."""
    import torch

    from ..training.acquisition_augmentation import random_bias_field, random_contrast, random_gamma

    generator = torch.Generator().manual_seed(seed)
    # The slices as the channels of one sample: the transforms draw per sample, so the patient gets one draw.
    x = grid.transpose(0, 1)
    x = random_bias_field(x, generator, SCANNER_BIAS_FIELD)
    x = random_gamma(x, generator, SCANNER_GAMMA)
    return random_contrast(x, generator, SCANNER_CONTRAST).transpose(0, 1).contiguous()


def _volume_slices(image_path: Path, mask_path: Optional[Path], card, strip_erosion_mm: Optional[float] = None):
    """All slices with signal of a volume on the model grid, and the mask on the same grid (> 0.5); with
    ``strip_erosion_mm``, of the volume stripped to its brain region first."""
    from ..volumes.head_region import skull_stripped
    from ..volumes.slices import AxialStack, has_signal, intensity_window, normalize, to_model_grid
    from ..volumes.volume_io import read_volume

    percentiles, min_fraction = card.intensity_percentiles, card.min_foreground_fraction
    stack = AxialStack.from_image(read_volume(image_path))
    array = stack.array
    if strip_erosion_mm is not None:
        array = skull_stripped(array, stack.spacing, percentiles, strip_erosion_mm)
    slices01 = normalize(array, intensity_window(array, percentiles))
    keep = np.array([has_signal(s, min_fraction) for s in slices01], dtype=bool)
    if not keep.any():
        return None, None, keep
    grid, _ = to_model_grid(slices01[keep], stack.pixel_spacing, card.image_size)
    if mask_path is None:
        truth = np.zeros((int(keep.sum()), card.image_size, card.image_size), dtype=bool)
    else:
        mask = AxialStack.from_image(read_volume(mask_path)).array
        if mask.shape != stack.array.shape:
            raise AutoDDPMError(f"mask {mask_path} has shape {mask.shape}, its image {image_path} {stack.array.shape}")
        mask_grid, _ = to_model_grid((mask[keep] > 0).astype(np.float32), stack.pixel_spacing, card.image_size)
        truth = mask_grid[:, 0].numpy() > 0.5
    return grid, truth, keep


def load_lgg(folder: Path, card, max_volumes: Optional[int], name: str = "lgg", stride: int = 1,
             lesion_only: bool = False, strip_erosion_mm: Optional[float] = None,
             scanner_seed: Optional[int] = None) -> EvalSet:
    """LGG FLAIR patients (every ``stride``-th): every slice with signal, tumour and tumour-free (or tumour only);
    skull-stripped with ``strip_erosion_mm``, with scanner-like changes seeded by ``scanner_seed``."""
    import torch

    from ..training.training_data import find_training_images
    from .metrics import size_bin

    pairs = [p for p in find_training_images(folder) if p[1] is not None][::stride]
    if max_volumes:
        pairs = pairs[:max_volumes]
    xs, truths, volumes = [], [], []
    for index, (image, mask) in enumerate(pairs):
        grid, truth, _ = _volume_slices(image, mask, card, strip_erosion_mm)
        if grid is not None and lesion_only:
            keep = truth.any(axis=(1, 2))
            grid, truth = (grid[torch.as_tensor(keep)], truth[keep]) if keep.any() else (None, None)
        if grid is None:
            continue
        if scanner_seed is not None:
            grid = scanner_changed(grid, scanner_seed * 1000 + index)
        patient = image.name.split("_flair")[0] if "_flair" in image.name else image.name.split(".")[0]
        xs.append(grid)
        truths.append(truth)
        volumes += [patient] * len(grid)
    if not xs:
        raise AutoDDPMError(f"no image/mask pairs with signal in {folder}")
    truth = np.concatenate(truths)
    n = card.image_size
    which = f"every {stride}th patient" if stride > 1 else "patients"
    slices = f"their {len(volumes)} tumour slices" if lesion_only else f"all {len(volumes)} slices with signal"
    changes = ""
    if strip_erosion_mm is not None:
        changes += f", skull-stripped to the brain region (head eroded {strip_erosion_mm:g} mm)"
    if scanner_seed is not None:
        changes += (f", scanner-like intensity changes per patient (gamma exp(+-{SCANNER_GAMMA:g}), scale "
                    f"exp(+-{SCANNER_CONTRAST:g}), bias field exp(+-{SCANNER_BIAS_FIELD:g}), seed {scanner_seed})")
    return EvalSet(
        name=name,
        x=torch.cat(xs),
        truth=truth,
        healthy=None,
        volumes=volumes,
        bins=[size_bin(int(t.sum()), n) for t in truth],
        description=f"LGG FLAIR ({folder}): {len(pairs)} {which}, {slices}, expert masks{changes}",
        per_volume=True,
    )


def load_lgg_dev(train_folder: Path, card, max_volumes: Optional[int] = None) -> EvalSet:
    """The development set: the tumour slices of every DEV_STRIDE-th training patient (training saw none)."""
    return load_lgg(train_folder, card, max_volumes, name="lgg-dev", stride=DEV_STRIDE, lesion_only=True)


def load_lgg_dev_stripped(train_folder: Path, card, max_volumes: Optional[int] = None) -> EvalSet:
    """lgg-dev skull-stripped to the brain region the engine computes with this card."""
    from ..volumes.head_region import strip_erosion_mm

    return load_lgg(train_folder, card, max_volumes, name="lgg-dev-stripped", stride=DEV_STRIDE, lesion_only=True,
                    strip_erosion_mm=strip_erosion_mm(card.postprocessing))


def load_lgg_dev_scanner(train_folder: Path, card, max_volumes: Optional[int] = None, seed: int = 0) -> EvalSet:
    """lgg-dev with seeded scanner-like intensity changes, one draw per patient."""
    return load_lgg(train_folder, card, max_volumes, name="lgg-dev-scanner", stride=DEV_STRIDE, lesion_only=True,
                    scanner_seed=seed)


def _png_slice(path: Path, card):
    grid, _, _ = _volume_slices(path, None, card)
    return None if grid is None else grid[0, 0].numpy()


def synthetic_set(name: str, healthy_slices: list[np.ndarray], ids: list[str], seed: int, source: str) -> EvalSet:
    """Each healthy slice once clean and once with a synthetic lesion per size bin."""
    import torch

    from .lesions import add_lesion
    from .metrics import LESION_FREE, SIZE_BIN_NAMES

    xs, truths, healthies, volumes, bins = [], [], [], [], []
    for i, (image, case) in enumerate(zip(healthy_slices, ids)):
        xs.append(image)
        truths.append(np.zeros(image.shape, dtype=bool))
        healthies.append(image)
        volumes.append(f"{case}:clean")
        bins.append(LESION_FREE)
        for b, bin_name in enumerate(SIZE_BIN_NAMES):
            try:
                lesioned, mask = add_lesion(image, bin_name, seed=np.random.default_rng([seed, i, b]))
            except ValueError as error:
                print(f"[benchmark] {case}: no {bin_name} lesion ({error})", file=sys.stderr)
                continue
            xs.append(lesioned)
            truths.append(mask)
            healthies.append(image)
            volumes.append(f"{case}:{bin_name}")
            bins.append(bin_name)
    x = torch.from_numpy(np.stack(xs)).float()[:, None]
    return EvalSet(
        name=name,
        x=x,
        truth=np.stack(truths),
        healthy=np.stack(healthies).astype(np.float32),
        volumes=volumes,
        bins=bins,
        description=f"{source}: {len(healthy_slices)} healthy slices, each clean and with one synthetic lesion per size bin (seed {seed})",
    )


def load_ixi(folder: Path, card, max_images: Optional[int], seed: int, name: str = "ixi", stride: int = 1) -> EvalSet:
    """Every ``stride``-th IXI slice of ``folder`` (at most ``max_images``), with synthetic lesions."""
    pngs = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() == ".png")[::stride]
    if max_images:
        pngs = pngs[:max_images]
    images, ids = [], []
    for p in pngs:
        s = _png_slice(p, card)
        if s is not None:
            images.append(s)
            ids.append(p.stem)
    if not images:
        raise AutoDDPMError(f"no PNG slices with signal in {folder}")
    source = f"IXI T1 ({folder}{f', every {stride}th subject' if stride > 1 else ''})"
    return synthetic_set(name, images, ids, seed, source)


def load_ixi_dev(train_folder: Path, card, max_images: Optional[int] = None, seed: int = 0) -> EvalSet:
    """The T1 development set: synthetic lesions on every DEV_STRIDE-th training slice.

    Unlike lgg-dev's tumours, the healthy tissue around these lesions was trained on,
    so the set flatters a model; it serves to compare recipes, not to report.
    """
    return load_ixi(train_folder, card, max_images, seed, name="ixi-dev", stride=DEV_STRIDE)


def spread(n_total: int, n: Optional[int]) -> np.ndarray:
    """``n`` indices spread evenly over ``range(n_total)`` (all without ``n``)."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    if n <= 0:
        return np.zeros(0, dtype=int)
    return np.unique(np.round(np.linspace(0, n_total - 1, n)).astype(int))


def load_lgg_synthetic(folder: Path, card, max_images: Optional[int], seed: int) -> EvalSet:
    """Lesion-free slices of the LGG validation patients, nearest the volume's middle, with synthetic lesions.

    Mid-volume sections show brain with room for a large lesion; the lowest
    sections (orbits, skull base) would put lesions into the face.
    """
    from ..training.training_data import find_training_images

    candidates, ids = [], []
    for image, mask in find_training_images(folder):
        grid, truth, _ = _volume_slices(image, mask, card)
        if grid is None:
            continue
        free = np.flatnonzero(~truth.reshape(len(truth), -1).any(axis=1))
        middle = (len(grid) - 1) / 2
        for k in sorted(free, key=lambda i: abs(i - middle))[:4]:
            candidates.append(grid[k, 0].numpy())
            ids.append(f"{image.name.split('_flair')[0]}#{k}")
    if not candidates:
        raise AutoDDPMError(f"no lesion-free slices with signal in {folder}")
    pick = spread(len(candidates), max_images or 40)
    return synthetic_set(
        "lgg-synth", [candidates[i] for i in pick], [ids[i] for i in pick], seed, f"LGG FLAIR lesion-free slices ({folder})"
    )


def calibration_slices(family: str, root: Path, card, count: int):
    """Healthy slices for the baselines' thresholds, disjoint from every evaluated case.

    The card's own calibration data when it records folders that exist (family
    ``"card"``), else the training split of the dataset's family.
    """
    import torch

    from ..training.training_data import find_training_images, healthy_slices

    percentiles, min_fraction = card.intensity_percentiles, card.min_foreground_fraction
    if family == "card":
        sources = [Path(d) for d in card.data["thresholds"]["calibration"]["data"]]
        pairs = [pair for source in sources for pair in find_training_images(source)]
        where = ", ".join(str(d) for d in sources) + " (the card's calibration data)"
    else:
        folder = root / ("lgg_flair/train" if family == "lgg" else "ixi_t1_midaxial/train")
        if not folder.is_dir():
            raise AutoDDPMError(f"calibration data {folder} does not exist (the benchmark calibrates baselines on the training split)")
        pairs = find_training_images(folder)
        where = str(folder)

    def load(files: int):
        chosen = [pairs[i] for i in spread(len(pairs), files)]
        per_file = [healthy_slices(img, mask, card.image_size, percentiles, min_fraction) for img, mask in chosen]
        return torch.cat([s for s in per_file if len(s)]), len(chosen)

    # A volume gives many slices, so a quarter as many volumes will do; a 2D file (IXI) gives one.
    slices, files = load(max(8, count // 4))
    if len(slices) < count and files < len(pairs):
        slices, files = load(count)
    return slices[torch.as_tensor(spread(len(slices), count))], f"{files} files of {where}"


def calibration_family(card, dataset_name: str) -> str:
    calibration = card.data.get("thresholds", {}).get("calibration", {})
    data = calibration.get("data") if card.data.get("thresholds", {}).get("calibrated") else None
    if isinstance(data, list) and data and all(Path(d).exists() for d in data):
        return "card"
    return "ixi" if dataset_name.startswith("ixi") else "lgg"


def default_datasets(card) -> list[str]:
    modality = str(card.data.get("modality", "")).lower()
    if "flair" in modality:
        return ["lgg", "lgg-synth"]
    if "t1" in modality:
        return ["ixi"]
    return ["lgg", "lgg-synth", "ixi"]  # the three evaluation sets; a development set is never a default


DATASET_FOLDERS = {
    "lgg": lambda root: root / "lgg_flair" / "val",
    "lgg-synth": lambda root: root / "lgg_flair" / "val",
    "ixi": lambda root: root / "ixi_t1_midaxial" / "val",
    "lgg-dev": lambda root: root / "lgg_flair" / "train",
    "ixi-dev": lambda root: root / "ixi_t1_midaxial" / "train",
    "lgg-dev-stripped": lambda root: root / "lgg_flair" / "train",
    "lgg-dev-scanner": lambda root: root / "lgg_flair" / "train",
}


def calibrated_on(card, folder: Path) -> Optional[str]:
    """The card's calibration source that is, contains or lies inside ``folder`` (None if none)."""
    thresholds = card.data.get("thresholds", {})
    data = thresholds.get("calibration", {}).get("data", []) if thresholds.get("calibrated") else []
    target = Path(folder).resolve()
    for source in data if isinstance(data, list) else []:
        path = Path(source).resolve()
        if path == target or target in path.parents or path in target.parents:
            return str(source)
    return None


def load_dataset(name: str, root: Path, card, sizes: dict, seed: int) -> EvalSet:
    if name not in DATASET_FOLDERS:
        raise AutoDDPMError(f"unknown dataset '{name}': choose from {', '.join(DATASETS)}")
    folder = DATASET_FOLDERS[name](root)
    if name == "lgg":
        return load_lgg(folder, card, sizes["max_volumes"])
    if name == "lgg-synth":
        return load_lgg_synthetic(folder, card, sizes["max_images"], seed)
    if name == "ixi":
        return load_ixi(folder, card, sizes["max_images"], seed)
    if name == "lgg-dev":
        return load_lgg_dev(folder, card, sizes["max_volumes"])
    if name == "lgg-dev-stripped":
        return load_lgg_dev_stripped(folder, card, sizes["max_volumes"])
    if name == "lgg-dev-scanner":
        return load_lgg_dev_scanner(folder, card, sizes["max_volumes"], seed)
    return load_ixi_dev(folder, card, sizes["max_images"], seed)


def load_with_provenance(name: str, root: Path, card, sizes: dict, seed: int) -> tuple[EvalSet, str, Optional[str]]:
    """A dataset's cases, the family of healthy slices that calibrates its baselines, and the card's overlap with it."""
    evalset = load_dataset(name, root, card, sizes, seed)
    return evalset, calibration_family(card, name), calibrated_on(card, DATASET_FOLDERS[name](root))
