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


SSIM_TRUNCATE = 3.5  # scikit-image's Gaussian truncation: radius int(3.5 * 1.5 + 0.5) = 5, an 11-tap window


def _gaussian_taps(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter's normalised 1-D Gaussian, truncate 3.5: (2r+1,), r = int(3.5 sigma + 0.5)."""
    radius = int(SSIM_TRUNCATE * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    g = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return g / g.sum()


def _symmetric_index(n: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices that extend 0..n-1 by `radius` on both sides by half-sample reflection (d c b a | a b c d | d c b a),
    repeated when radius > n: scipy.ndimage's mode 'reflect'. (2*radius + n,) int64."""
    i = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(i < n, i, 2 * n - 1 - i)


def ssim(x: torch.Tensor, y: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image (B,) of images (B, C, H, W), data range 1 (both clamped to [0, 1]).

    The standard definition (Wang et al. 2004): Gaussian-weighted local means, variances and covariance
    (population, not sample, covariance), sigma 1.5 truncated at 3.5 sigma (an 11x11 window), K1 = 0.01,
    K2 = 0.03; the SSIM map is averaged over the positions at least (w-1)/2 from every border, w = 11, and
    over channels. This is `skimage.metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1.0, channel_axis=0)` per image.
    Images smaller than the window (e.g. 8x8 digits) are not refused: w becomes the largest odd size
    <= min(H, W), the same Gaussian filters the image extended by half-sample reflection, and the result
    equals scikit-image's with `win_size=w` (which alone would raise for the default window).
    Computed in float64 (float32 on MPS, which lacks float64); returned as float32.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim takes two image batches of the same shape (B, C, H, W), got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    x, y = x.clamp(0, 1).to(dtype), y.clamp(0, 1).to(dtype)
    B, C, H, W = x.shape
    g = _gaussian_taps(sigma, dtype, x.device)
    r = (len(g) - 1) // 2
    side = min(H, W)
    window = min(2 * r + 1, side if side % 2 else side - 1)  # w: odd, at most the image
    crop = (window - 1) // 2

    stats = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (B, 5C, H, W)
    stats = stats[:, :, _symmetric_index(H, r, x.device)][..., _symmetric_index(W, r, x.device)]
    stats = F.conv2d(stats, g.view(1, 1, -1, 1).expand(5 * C, 1, -1, 1), groups=5 * C)  # separable Gaussian:
    stats = F.conv2d(stats, g.view(1, 1, 1, -1).expand(5 * C, 1, 1, -1), groups=5 * C)  # (B, 5C, H, W)
    stats = stats[:, :, crop:H - crop, crop:W - crop]
    mu_x, mu_y, xx, yy, xy = stats.chunk(5, dim=1)  # each (B, C, H', W')
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y

    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1).float()


def code_histogram(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Counts of each code (K,) as int64."""
    return torch.bincount(codes.reshape(-1), minlength=codebook_size)


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the empirical code distribution of (K,) counts: the effective number of codes in
    use, a 0-d float64 tensor on the counts' device (no host sync: the quantizer reports it every step)."""
    p = counts.double() / counts.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum())


def codes_used(counts: torch.Tensor) -> float:
    """Fraction of the codebook used at least once."""
    return float((counts > 0).double().mean())


def discretized_gaussian_nll_bits(x: torch.Tensor, mean: torch.Tensor, log_scale: float | torch.Tensor) -> torch.Tensor:
    """-log2 P(x | mean, scale) per image (B,) for 8-bit pixels x = k/255, k in 0..255 (x is clamped to [0, 1]
    and rounded to the nearest k/255); mean any real (B, ...) of x's shape, scale = exp(log_scale).

    P(k) = Phi(((k + 1/2)/255 - mean) / scale) - Phi(((k - 1/2)/255 - mean) / scale), with the first bin's
    lower edge at -inf and the last bin's upper edge at +inf, so the 256 probabilities sum to 1 for every
    mean and scale (PixelCNN++ style). Computed in float64 from log Phi, on the side of the mean where the
    bin lies, so that bins far in either tail keep their exact (tiny) probability instead of rounding to 0.
    """
    k = (x.double().clamp(0, 1) * 255).round()
    mean, scale = mean.double(), torch.as_tensor(log_scale, dtype=torch.float64, device=k.device).exp()
    inf = torch.full_like(k, math.inf)
    lo = torch.where(k == 0, -inf, ((k - 0.5) / 255 - mean) / scale)  # standardised bin edges
    hi = torch.where(k == 255, inf, ((k + 0.5) / 255 - mean) / scale)

    def log_mass(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """log(Phi(b) - Phi(a)) for a < b, accurate where Phi(b) is small (the bin below the mean)."""
        log_b = torch.special.log_ndtr(b)
        return log_b + torch.log(-torch.expm1(torch.special.log_ndtr(a) - log_b))

    # above the mean, Phi(b) - Phi(a) = Phi(-a) - Phi(-b): mirror the bin into the lower tail
    log_p = torch.where(k / 255 > mean, log_mass(-hi, -lo), log_mass(lo, hi))
    return -(log_p / math.log(2)).flatten(1).sum(1)


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
