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


def discretized_gaussian_nll_bits(x: torch.Tensor, mean: torch.Tensor, log_scale: float | torch.Tensor) -> torch.Tensor:
    """-log2 P(x | mean, scale) per image (B,) for 8-bit pixels x = k/255, k in 0..255.

    P(k) = Phi((k + 1/2)/255 - mean) / scale) - Phi((k - 1/2)/255 - mean) / scale), with the first and
    last bins extended to -inf and +inf so that the 256 probabilities sum to 1 (PixelCNN++ style).
    """
    x = (x.double() * 255).round() / 255
    mean, scale = mean.double(), torch.as_tensor(log_scale, dtype=torch.float64).exp()
    half = 0.5 / 255
    normal = torch.distributions.Normal(torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64))
    upper = torch.where(x >= 1 - 1e-9, torch.ones_like(x), normal.cdf((x + half - mean) / scale))
    lower = torch.where(x <= 1e-9, torch.zeros_like(x), normal.cdf((x - half - mean) / scale))
    # log of a difference of CDFs: far in a tail both round to 1 (or 0); use the mirrored tail there.
    mirrored_upper = normal.cdf(-(x - half - mean) / scale)
    mirrored_lower = torch.where(x >= 1 - 1e-9, torch.zeros_like(x), normal.cdf(-(x + half - mean) / scale))
    p = torch.where((x - mean) > 0, mirrored_upper - mirrored_lower, upper - lower)
    return -torch.log2(p.clamp_min(1e-300)).flatten(1).sum(1)


def fit_log_scale(x: torch.Tensor, mean: torch.Tensor, steps: int = 60) -> float:
    """The log scale minimising the discretized-Gaussian NLL of x given mean: golden-section search."""
    rmse = float((x - mean).pow(2).mean().sqrt().clamp_min(1e-4))
    lo, hi = math.log(rmse) - 3, math.log(rmse) + 2
    ratio = (math.sqrt(5) - 1) / 2

    def cost(s: float) -> float:
        return float(discretized_gaussian_nll_bits(x, mean, s).sum())

    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = cost(a), cost(b)
    for _ in range(steps):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = cost(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = cost(b)
    return (lo + hi) / 2


def bits_per_dim(prior_bits_per_image: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor, log_scale: float) -> torch.Tensor:
    """Upper bound on -log2 p(x) per pixel dimension (B,), as the VQ-VAE paper reports likelihoods.

    -log2 p(x) <= -log2 p(z) - log2 p(x | z) for the encoder's code grid z (p(x) sums p(z) p(x|z) over
    all z), so  bits/dim = (prior bits of z + discretized-Gaussian bits of x given decoder(z)) / (C*H*W).
    """
    dims = x[0].numel()
    return (prior_bits_per_image.double() + discretized_gaussian_nll_bits(x, x_hat, log_scale)) / dims
