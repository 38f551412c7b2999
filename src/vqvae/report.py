"""Pictures of a run: image grids of reconstructions and of samples from the prior.

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


@torch.no_grad()
def save_reconstructions(model, images: torch.Tensor, path: str | Path, n: int = 32) -> Path:
    """`n` images spread over `images` (so a split sorted by class shows every class) in the upper rows,
    their reconstructions below."""
    x = images[torch.linspace(0, len(images) - 1, min(n, len(images))).long()]
    if x.dim() == 3:  # sound (B, 1, T): spectrograms, each clip above its reconstruction
        from .audio.pipeline import save_audio_comparison

        return save_audio_comparison(x[:6], model.reconstruct(x[:6].to(model.device)).cpu(), path)
    save_comparison(x, model.reconstruct(x.to(model.device)).cpu(), path)
    return Path(path)


@torch.no_grad()
def sample_images(model, prior, n: int, label: int | None = None, temperature: float = 1.0,
                  top_k: int | None = None, seed: int = 0, guidance: float = 1.0) -> tuple[torch.Tensor, int | None]:
    """Draw code grids from `prior` and decode them -> (images (B, C, H, W) in [0, 1], images per row).

    A class-conditional prior without `label` gives ceil(n / classes) samples of every class, one row
    per class (the second value); with `label`, n samples of that class. `guidance` (class-conditional
    priors): see `Prior.sample`. Raises ConfigError for bad values.
    """
    from .errors import ConfigError

    classes = prior.cfg.num_classes
    if n < 1 or temperature < 0 or (top_k is not None and top_k < 1) or not guidance >= 0:
        raise ConfigError(f"need n >= 1, temperature >= 0, top_k >= 1 and guidance >= 0; got {n}, {temperature}, "
                          f"{top_k}, {guidance}")
    if guidance != 1 and not classes:
        raise ConfigError("guidance needs a class-conditional prior; this prior has no classes")
    if label is not None and not 0 <= label < max(classes, 1):
        raise ConfigError(f"label must be in 0..{classes - 1} for this prior, got {label}" if classes else
                          "a label needs a class-conditional prior; this prior has no classes")
    nrow, cond = None, None
    if classes and label is None:
        nrow = math.ceil(n / classes)
        cond = torch.arange(classes, device=prior.device).repeat_interleave(nrow)
    elif classes:
        cond = torch.full((n,), label, device=prior.device)
    generator = torch.Generator(device=prior.device).manual_seed(seed)
    codes = prior.sample(len(cond) if cond is not None else n, cond, temperature, top_k, generator,
                         guidance).to(model.device)
    if prior.cfg.levels:  # VQ-VAE-2: the sampled sequence holds the top grid, then the bottom one
        codes = model.from_sequence(codes, prior.cfg.levels)
    return model.decode(codes).cpu(), nrow
