import math

import pytest
import torch

from vqvae.config import PriorConfig
from vqvae.metrics import (bits_per_dim, code_histogram, codes_used, discretized_gaussian_nll_bits, fit_log_scale,
                           perplexity)
from vqvae.priors import build_prior


def phi(v):
    return 0.5 * (1 + math.erf(v / math.sqrt(2)))


@pytest.mark.parametrize("mean", [0.0, 0.37, 1.0, 1.4])
@pytest.mark.parametrize("log_scale", [-7.0, -3.0, 0.5])
def test_discretized_gaussian_sums_to_one(mean, log_scale):
    values = (torch.arange(256).double() / 255).view(256, 1, 1, 1)
    nll = discretized_gaussian_nll_bits(values, torch.full_like(values, mean), log_scale)
    assert float((2.0 ** -nll).sum()) == pytest.approx(1.0, abs=1e-9)


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


def test_perplexity_and_usage():
    counts = code_histogram(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), 8)
    assert perplexity(counts) == pytest.approx(4.0)
    assert codes_used(counts) == 0.5
