"""Pure functions of tensors: PSNR, SSIM, codebook usage and perplexity, bits.

Images are float tensors (B, C, H, W) in [0, 1]; codes are int64 tensors of any shape.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image (B,), peak 1, both clamped to [0, 1]."""
    mse = (x.clamp(0, 1) - y.clamp(0, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _gaussian_window(size: int, sigma: float, dtype, device) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image (B,) with a Gaussian window (Wang et al. 2004), data range 1.

    The window shrinks to the image size for tiny images; the mean runs over valid positions only
    (no padding), as `skimage.metrics.structural_similarity(gaussian_weights=True)` does.
    """
    x, y = x.clamp(0, 1).double(), y.clamp(0, 1).double()
    B, C, H, W = x.shape
    window = min(window, H, W)
    g = _gaussian_window(window, sigma, x.dtype, x.device)
    kernel = (g[:, None] * g[None, :]).expand(C, 1, window, window)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=C)

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(x), blur(y)
    n = window * window
    unbias = n / (n - 1) if n > 1 else 1.0  # sample covariance, as skimage
    var_x = (blur(x * x) - mu_x**2) * unbias
    var_y = (blur(y * y) - mu_y**2) * unbias
    cov = (blur(x * y) - mu_x * mu_y) * unbias
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1).float()


def code_histogram(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Counts of each code (K,) as int64."""
    return torch.bincount(codes.reshape(-1), minlength=codebook_size)


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of the empirical code distribution: the effective number of codes in use."""
    p = counts.double() / counts.sum().clamp_min(1)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum()
    return float(torch.exp(entropy))


def codes_used(counts: torch.Tensor) -> float:
    """Fraction of the codebook used at least once."""
    return float((counts > 0).double().mean())


def bits(nats: float | torch.Tensor) -> float:
    return float(nats) / math.log(2)


@torch.no_grad()
def evaluate_autoencoder(model, images: torch.Tensor, batch_size: int = 250) -> dict:
    """Held-out figures of an autoencoder on images (B, C, H, W) in [0, 1], sizes a multiple of downsample.

    psnr and ssim are means over images; mse is per pixel; perplexity and codes_used describe the code
    histogram of the whole split.
    """
    model.eval()
    device = next(model.parameters()).device
    K = model.cfg.quantizer.codebook_size
    counts = torch.zeros(K, dtype=torch.long)
    psnrs, ssims, mses = [], [], []
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device)
        codes = model.encode(x)
        x_hat = model.decode(codes).clamp(0, 1)
        counts += code_histogram(codes.cpu(), K)
        psnrs.append(psnr(x_hat, x).cpu())
        ssims.append(ssim(x_hat, x).cpu())
        mses.append((x_hat - x).pow(2).flatten(1).mean(1).cpu())
    return {
        "psnr": float(torch.cat(psnrs).mean()),
        "ssim": float(torch.cat(ssims).mean()),
        "mse": float(torch.cat(mses).mean()),
        "perplexity": perplexity(counts),
        "codes_used": codes_used(counts),
        "images": int(images.shape[0]),
    }
