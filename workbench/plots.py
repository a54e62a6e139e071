"""Paper-style figures: one look for every plot, each function returns a matplotlib Figure.

>>> from PIL import Image
>>> from workbench.plots import image_grid
>>> fig = image_grid([[Image.new("RGB", (32, 32))] * 3] * 2, ["row a", "row b"], ["x", "y", "z"])
>>> len(fig.axes)
6
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from PIL import Image

STYLE = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "font.family": "DejaVu Sans",
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02,
}


def image_grid(images: Sequence[Sequence[Image.Image]], row_labels: Sequence[str] = (),
               col_labels: Sequence[str] = (), cell: float = 0.62) -> Figure:
    """A labelled grid: ``images[r][c]`` at row ``r``, column ``c``; ``cell`` inches per image."""
    rows, cols = len(images), max(len(r) for r in images)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(rows, cols, figsize=(cols * cell + 1.1, rows * cell + 0.35), squeeze=False)
        for r in range(rows):
            for c in range(cols):
                ax = axes[r][c]
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if c < len(images[r]):
                    ax.imshow(images[r][c], interpolation="nearest")
                if c == 0 and r < len(row_labels):
                    ax.set_ylabel(row_labels[r], rotation=0, ha="right", va="center")
                if r == 0 and c < len(col_labels):
                    ax.set_title(col_labels[c], fontsize=7)
        fig.subplots_adjust(wspace=0.04, hspace=0.04)
    return fig


#: Okabe-Ito, a colour-blind-safe palette.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")


def accuracy_bars(before: dict[str, float], after: dict[str, float], title: str = "") -> Figure:
    """Oracle accuracy per concept before and after an edit, as paired bars."""
    import numpy as np

    keys = list(before)
    x = np.arange(len(keys))
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(max(3.3, 0.28 * len(keys) + 0.8), 2.0))
        ax.bar(x - 0.2, [before[k] for k in keys], 0.4, label="before", color=PALETTE[0])
        ax.bar(x + 0.2, [after[k] for k in keys], 0.4, label="after", color=PALETTE[1])
        ax.set_xticks(x, keys, rotation=60, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("oracle accuracy")
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(frameon=False, ncols=2, loc="lower left", bbox_to_anchor=(0, 1.0))
        if title:
            ax.set_title(title, loc="right")
    return fig


def save(fig: Figure, path: str | Path) -> Path:
    """Save ``fig`` by the path's suffix: ``.pdf``, ``.svg`` or ``.png`` (300 dpi)."""
    path = Path(path)
    if path.suffix.lower() not in (".pdf", ".svg", ".png"):
        raise ValueError(f"cannot save a figure as {path.suffix!r}: use .pdf, .svg or .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    with plt.rc_context(STYLE):
        fig.savefig(path, dpi=300)
    return path
