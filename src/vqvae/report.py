"""Pictures of a run: image grids (reconstructions, samples).

Images are float tensors (B, C, H, W) in [0, 1].
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .data import save_image


def grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, scale: int = 1) -> torch.Tensor:
    """Tile (B, C, H, W) into one (C, rows * (H + pad) + pad, nrow * (W + pad) + pad) image, white gaps.

    `scale` enlarges each pixel (nearest neighbour), so 28x28 digits stay readable.
    """
    if scale > 1:
        images = images.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    B, C, H, W = images.shape
    nrow = nrow or math.ceil(math.sqrt(B))
    rows = math.ceil(B / nrow)
    out = torch.ones(C, rows * (H + pad) + pad, nrow * (W + pad) + pad)
    for i in range(B):
        r, c = divmod(i, nrow)
        top, left = pad + r * (H + pad), pad + c * (W + pad)
        out[:, top:top + H, left:left + W] = images[i].clamp(0, 1)
    return out


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> None:
    save_image(grid(images.detach().cpu().float(), nrow, scale=scale), path)


def save_comparison(originals: torch.Tensor, reconstructions: torch.Tensor, path: str | Path,
                    nrow: int = 8, scale: int = 2) -> None:
    """Originals in the upper rows, their reconstructions in the same places below."""
    n = originals.shape[0]
    rows = math.ceil(n / nrow)
    pad_count = rows * nrow - n
    filler = torch.ones(pad_count, *originals.shape[1:])
    both = torch.cat([originals.cpu(), filler, reconstructions.cpu(), filler])
    save_grid(both, path, nrow=nrow, scale=scale)
