"""PNG figures: input | pseudo-healthy | anomaly map | mask, one row per case."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


@dataclass
class FigureRow:
    """One case: 2D arrays of the same shape; ``truth`` (expert or synthetic) adds its outline to the mask panel."""

    title: str
    image: np.ndarray
    pseudo_healthy: np.ndarray
    anomaly_map: np.ndarray
    mask: np.ndarray
    truth: np.ndarray | None = None


def save_overview(rows: list[FigureRow], path: str | os.PathLike, anomaly_max: float | None = None) -> None:
    """Write the rows as one PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(rows), 4, figsize=(12, 3.2 * len(rows)), squeeze=False)
    for row, ax in zip(rows, axes):
        low, high = np.percentile(row.image, [0.5, 99.5])
        vmax = anomaly_max or max(float(row.anomaly_map.max()), 1e-6)
        ax[0].imshow(row.image, cmap="gray", vmin=low, vmax=high)
        ax[0].set_ylabel(row.title, fontsize=9)
        ax[1].imshow(row.pseudo_healthy, cmap="gray", vmin=low, vmax=high)
        ax[2].imshow(row.image, cmap="gray", vmin=low, vmax=high)
        overlay = np.ma.masked_where(row.anomaly_map <= 0, row.anomaly_map)
        shown = ax[2].imshow(overlay, cmap="inferno", vmin=0, vmax=vmax, alpha=0.8)
        figure.colorbar(shown, ax=ax[2], fraction=0.046, pad=0.02)
        ax[3].imshow(row.image, cmap="gray", vmin=low, vmax=high)
        ax[3].imshow(np.ma.masked_where(row.mask == 0, row.mask), cmap="autumn", alpha=0.6, vmin=0, vmax=1)
        if row.truth is not None and row.truth.any():
            ax[3].contour(row.truth > 0, levels=[0.5], colors="cyan", linewidths=1.0)
        for a in ax:
            a.set_xticks([])
            a.set_yticks([])
    titles = ["input", "pseudo-healthy", "anomaly map", "mask" + (" (cyan: true lesion)" if any(r.truth is not None for r in rows) else "")]
    for a, title in zip(axes[0], titles):
        a.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
