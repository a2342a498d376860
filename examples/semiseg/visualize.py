"""PNG panels of predictions and perturbations (matplotlib, Agg backend)."""
from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import torch

from .labels import colourize

Panel = Tuple[str, torch.Tensor]  # title, (H, W, 3) float in [0, 1]


def image_panel(x: torch.Tensor) -> torch.Tensor:
    """``(3, H, W)`` image -> ``(H, W, 3)`` clamped to ``[0, 1]``."""
    return x.detach().float().cpu().clamp(0, 1).permute(1, 2, 0)


def label_panel(y: torch.Tensor) -> torch.Tensor:
    return colourize(y.detach().cpu())


def mask_panel(m: torch.Tensor) -> torch.Tensor:
    return m.detach().float().cpu().reshape(m.shape[-2:])[..., None].expand(-1, -1, 3)


def save_grid(path: str, rows: Sequence[Sequence[Panel]], title: str = "", cell: float = 2.6) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r]
    ncols = max(len(r) for r in rows)
    h, w = rows[0][0][1].shape[:2]
    fig, axes = plt.subplots(len(rows), ncols, figsize=(cell * ncols * max(1.0, w / h) ** 0.5, cell * len(rows)),
                             squeeze=False)
    for r, panels in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            if c < len(panels):
                name, im = panels[c]
                ax.imshow(im.contiguous().numpy(), interpolation="nearest", vmin=0, vmax=1)
                ax.set_title(name, fontsize=8)
                ax.set_xticks([])
                ax.set_yticks([])  # keep the frame: an all-valid (white) mask stays visible
            else:
                ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def rows_from_lists(*cols: List[Panel]) -> List[List[Panel]]:
    return [list(r) for r in zip(*cols)]
