"""Tests for vqvae.metrics against independent references: mpmath, scikit-image, hand computations."""

import math

import mpmath
import pytest
import torch
import torch.nn.functional as F

from vqvae.data import load_dataset
from vqvae.metrics import (bits_per_dim, code_histogram, codes_used, discretized_gaussian_nll_bits, fit_log_scale,
                           perplexity, psnr, ssim)


def phi(v):
    return 0.5 * (1 + math.erf(v / math.sqrt(2)))


# ------------------------------------------------------------------------ discretized Gaussian likelihood

MEANS = [-0.3, -0.05, -0.001, 0.0, 0.2, 0.37, 0.5, 1.0, 1.001, 1.05, 1.4]
LOG_SCALES = [-7.0, math.log(0.05), -3.0, 0.5]
PIXELS = (torch.arange(256).double() / 255).view(256, 1, 1, 1)  # every 8-bit value, one image each


def reference_bits(k, mean, scale):
    """-log2 P(k) with 40 significant digits: the bin's Gaussian mass, edges -inf / +inf at the ends."""
    with mpmath.workdps(40):
        lo = -mpmath.inf if k == 0 else (mpmath.mpf(k) - 0.5) / 255
        hi = mpmath.inf if k == 255 else (mpmath.mpf(k) + 0.5) / 255
        a, b = (lo - mean) / scale, (hi - mean) / scale
        # the same mass seen from the nearer tail, so that 40 digits are not lost to 1 - (1 - tiny)
        p = mpmath.ncdf(b) - mpmath.ncdf(a) if k / 255 <= mean else mpmath.ncdf(-a) - mpmath.ncdf(-b)
        return float(-mpmath.log(p, 2))


@pytest.mark.parametrize("mean", MEANS)
@pytest.mark.parametrize("log_scale", LOG_SCALES)
def test_discretized_gaussian_is_a_distribution_over_the_256_values(mean, log_scale):
    nll = discretized_gaussian_nll_bits(PIXELS, torch.full_like(PIXELS, mean), log_scale)  # (256,)
    # 256 float64 probabilities, each within a few ulps relative (log_ndtr, expm1): the sum is off by
    # at most ~256 * 1e-15; 1e-12 leaves room while any lost tail mass (>= 1e-9 here) would show.
    assert float((2.0 ** -nll).sum()) == pytest.approx(1.0, abs=1e-12)
    scale = math.exp(log_scale)
    expected = torch.tensor([reference_bits(k, mean, scale) for k in range(256)], dtype=torch.float64)
    # float64 edges and log_ndtr carry a few ulps: measured at most 4e-14 relative to max(1, -log2 P),
    # also 1,000 scales into a tail where -log2 P ~ 1e6; 1e-11 leaves a wide margin for other libms
    torch.testing.assert_close(nll, expected, rtol=1e-11, atol=1e-11)


def test_lowest_bin_takes_the_mass_below_zero_for_a_negative_mean():
    values = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)
    means = torch.tensor([-0.05, 1.05], dtype=torch.float64).view(2, 1, 1, 1)
    p = 2.0 ** -discretized_gaussian_nll_bits(values, means, math.log(0.05))
    hand = phi((0.5 / 255 + 0.05) / 0.05)  # P(k=0 | mean -0.05) = P(k=255 | mean 1.05) = 0.851
    torch.testing.assert_close(p, torch.tensor([hand, hand], dtype=torch.float64), rtol=1e-12, atol=0)


def test_discretized_gaussian_per_pixel_means_and_clamped_inputs():
    gen = torch.Generator().manual_seed(0)
    mean = torch.rand(3, 2, 4, 4, generator=gen, dtype=torch.float64) * 1.6 - 0.3
    x = torch.randint(0, 256, mean.shape, generator=gen).double() / 255
    got = discretized_gaussian_nll_bits(x, mean, -2.5)
    expected = [sum(reference_bits(round(v * 255), m, math.exp(-2.5)) for v, m in zip(xi.flatten().tolist(),
                                                                                     mi.flatten().tolist()))
                for xi, mi in zip(x, mean)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-9)
    # inputs just outside [0, 1] (float noise) count as the end bins
    half = torch.full((2, 1, 1, 1), 0.5)
    outside = discretized_gaussian_nll_bits(torch.tensor([-0.01, 1.01]).view(2, 1, 1, 1), half, -2.0)
    inside = discretized_gaussian_nll_bits(torch.tensor([0.0, 1.0]).view(2, 1, 1, 1), half, -2.0)
    assert torch.equal(outside, inside)


def test_bits_per_dim_exact_decoder_uniform_prior_hand_computed():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 1, 8, 8), generator=gen).double() / 255
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 0.0, 1.0  # both edge bins occur
    K, L, log_scale = 512, 4, -5.0
    sigma = math.exp(log_scale)
    half = 0.5 / 255 / sigma
    uniform = torch.full((3,), L * math.log2(K))
    expected = []
    for image in x:
        bits = L * math.log2(K)
        for v in image.flatten().tolist():
            k = round(v * 255)
            p = phi(half) if k in (0, 255) else phi(half) - phi(-half)
            bits -= math.log2(p)
        expected.append(bits / 64)
    got = bits_per_dim(uniform, x, x.clone(), log_scale)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-9)


def test_fit_log_scale_finds_the_noise_level():
    gen = torch.Generator().manual_seed(1)
    mean = torch.rand(20, 1, 16, 16, generator=gen) * 0.8 + 0.1
    x = ((mean + 0.05 * torch.randn(mean.shape, generator=gen)).clamp(0, 1) * 255).round() / 255
    fitted = fit_log_scale(x, mean)
    assert abs(fitted - math.log(0.05)) < 0.05
    best = discretized_gaussian_nll_bits(x, mean, fitted).sum()
    for other in (fitted - 0.2, fitted + 0.2):
        assert discretized_gaussian_nll_bits(x, mean, other).sum() > best


# ------------------------------------------------------------------------------------------ PSNR, SSIM


def skimage_ssim(a: torch.Tensor, b: torch.Tensor, **kw) -> float:
    """The reference: Wang et al.'s settings in scikit-image, on one (C, H, W) image pair."""
    from skimage.metrics import structural_similarity

    return structural_similarity(a.double().numpy(), b.double().numpy(), channel_axis=0, data_range=1.0,
                                 gaussian_weights=True, sigma=1.5, use_sample_covariance=False, **kw)


def degrade(x: torch.Tensor, seed: int) -> torch.Tensor:
    """A plausible reconstruction: blurred (3x3 box), noisy, 8-bit, clamped to [0, 1]."""
    C = x.shape[1]
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), torch.full((C, 1, 3, 3), 1 / 9), groups=C)
    noise = 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return ((0.7 * blurred + 0.3 * x + noise).clamp(0, 1) * 255).round() / 255


def test_psnr_hand_computed():
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = (x + 0.1).clamp(0, 1)
    mse = (x - y).pow(2).flatten(1).mean(1)
    assert torch.allclose(psnr(x, y), -10 * torch.log10(mse))
    assert torch.allclose(psnr(x, y + 5), psnr(x, torch.ones_like(y)))  # both clamped to [0, 1]


def test_ssim_matches_skimage_on_mnist_digits():
    """Dark backgrounds (most local means ~0) are where the constants and the window matter most."""
    x = load_dataset("mnist").test[:60]  # (60, 1, 28, 28)
    y = degrade(x, 0)
    got = ssim(y, x)
    expected = torch.tensor([skimage_ssim(a, b) for a, b in zip(y, x)], dtype=torch.float32)
    # both compute in float64; ours is returned as float32 (~6e-8 relative)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert 0.3 < float(got.mean()) < 0.95  # a real degradation, not a trivial pair
    torch.testing.assert_close(ssim(x, x), torch.ones(60), rtol=0, atol=1e-6)


def test_ssim_matches_skimage_on_rgb_photographs():
    from skimage import data as photos

    crops = [torch.tensor(photos.coffee()[40:80, 100:156]), torch.tensor(photos.astronaut()[100:148, 200:248])]
    x = torch.stack([c[:40, :48] for c in crops]).permute(0, 3, 1, 2).float() / 255  # (2, 3, 40, 48)
    y = degrade(x, 1)
    expected = torch.tensor([skimage_ssim(a, b) for a, b in zip(y, x)], dtype=torch.float32)
    torch.testing.assert_close(ssim(y, x), expected, rtol=0, atol=1e-6)
    # the channel mean: each channel alone is its own grayscale SSIM
    per_channel = torch.stack([ssim(y[:, c:c + 1], x[:, c:c + 1]) for c in range(3)]).mean(0)
    torch.testing.assert_close(ssim(y, x), per_channel, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(8, 8), (5, 9), (10, 12), (3, 3), (1, 6)])
def test_ssim_of_images_smaller_than_the_window_is_skimage_with_the_largest_odd_window(shape):
    x = load_dataset("digits").test[:5] if shape == (8, 8) else torch.rand(5, 1, *shape,
                                                                           generator=torch.Generator().manual_seed(2))
    y = degrade(x, 3)
    w = min(shape) if min(shape) % 2 else min(shape) - 1
    expected = torch.tensor([skimage_ssim(a, b, win_size=w) for a, b in zip(y, x)], dtype=torch.float32)
    torch.testing.assert_close(ssim(y, x), expected, rtol=0, atol=1e-6)


def test_ssim_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        ssim(torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 15))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        ssim(torch.rand(1, 16, 16), torch.rand(1, 16, 16))


# ---------------------------------------------------------------------------------------- code statistics


def test_perplexity_and_usage():
    counts = code_histogram(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), 8)
    assert perplexity(counts) == pytest.approx(4.0)
    assert codes_used(counts) == 0.5
