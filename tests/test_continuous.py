"""Tests for vqvae.continuous: the AE and the Gaussian VAE (KL and ELBO against independent references)."""

import math

import pytest
import torch

from vqvae.autoencoders import crop, pad_to_multiple
from vqvae.config import ModelConfig, QuantizerConfig
from vqvae.continuous import AE, VAE, Latents, discretized_nll_bits, gaussian_kl
from vqvae.metrics import discretized_gaussian_nll_bits


def tiny(model="vae", dims=2, channels=1, downsample=4):
    return ModelConfig(in_channels=channels, hidden=8, res_hidden=4, res_blocks=1, downsample=downsample, dims=dims,
                       quantizer=QuantizerConfig(code_dim=3), model=model)


def test_gaussian_kl_equals_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)
    logvar = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    assert torch.allclose(gaussian_kl(mean, logvar), expected, rtol=1e-12)
    assert torch.equal(gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2))  # q = p


def test_differentiable_nll_equals_the_metric_and_keeps_gradients_finite():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 1, 6, 6), generator=gen).double() / 255
    x[0, 0, 0] = 0.0
    x[0, 0, 1] = 1.0  # both open-ended bins
    for spread, log_scale in ((0.3, -2.0), (3.0, -6.0), (0.01, 2.0)):  # far tails, tiny and huge scales
        mean = (0.5 + spread * torch.randn(x.shape, generator=gen, dtype=torch.float64)).requires_grad_()
        s = torch.tensor(log_scale, dtype=torch.float64, requires_grad=True)
        bits = discretized_nll_bits(x, mean, s)
        assert torch.allclose(bits, discretized_gaussian_nll_bits(x, mean.detach(), log_scale), rtol=1e-9)
        g_mean, g_scale = torch.autograd.grad(bits.sum(), [mean, s])
        assert torch.isfinite(g_mean).all() and torch.isfinite(g_scale)
        # the gradient is the derivative: a central difference in the log scale agrees
        h = 1e-6
        numeric = (discretized_gaussian_nll_bits(x, mean.detach(), log_scale + h).sum()
                   - discretized_gaussian_nll_bits(x, mean.detach(), log_scale - h).sum()) / (2 * h)
        assert math.isclose(float(g_scale), float(numeric), rel_tol=1e-4, abs_tol=1e-4)


@pytest.mark.parametrize("cls,model", [(AE, "ae"), (VAE, "vae")])
@pytest.mark.parametrize("dims,size", [(2, (28, 28)), (2, (29, 31)), (2, (1, 5)), (1, (61,))])
def test_shapes_and_any_input_size(cls, model, dims, size):
    torch.manual_seed(0)
    net = cls(tiny(model, dims=dims)).eval()
    x = torch.rand(2, 1, *size)
    out = net(x)
    assert out.x_hat.shape == x.shape and out.codes is None and out.loss.dim() == 0
    latents = net.encode(x)
    assert isinstance(latents, Latents) and latents.size == size
    assert latents.z.shape == (2, 3, *net.code_shape(size)) and latents.z.dtype == torch.float32
    x_hat = net.decode(latents)
    assert x_hat.shape == x.shape and 0 <= float(x_hat.min()) <= float(x_hat.max()) <= 1
    # eval mode: decode(encode(x)) is forward's reconstruction (the VAE's posterior mean), clamped
    assert torch.allclose(x_hat, out.x_hat.clamp(0, 1), atol=1e-6)
    # the codes of an odd-sized input are those of its edge-padded copy; decode crops back
    assert torch.equal(latents.z, net.encode(pad_to_multiple(x, 4)).z)
    assert torch.equal(net.decode(latents.z, size), x_hat)
    assert torch.equal(crop(net.decode(latents.z), size), x_hat)


def test_bad_latents_and_sizes_are_named():
    net = AE(tiny("ae"))
    with pytest.raises(ValueError, match="expected input"):
        net(torch.rand(1, 3, 28, 28))
    with pytest.raises(ValueError, match=r"expected float latents \(B, 3, H, W\)"):
        net.decode(torch.zeros(1, 7, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="does not fit"):
        net.decode(torch.zeros(1, 3, 7, 7), (40, 28))


def test_vae_loss_is_the_negative_elbo_in_bits_per_dim():
    """Eval mode (z = the posterior mean): loss = (discretized-Gaussian bits + KL / ln 2) / dims, computed
    here with the float64 metric and torch.distributions."""
    torch.manual_seed(0)
    vae = VAE(tiny()).eval()
    x = torch.rand(3, 1, 12, 12)
    with torch.no_grad():
        out = vae(x)
        mean, logvar = vae.posterior(x)
    q = torch.distributions.Normal(mean.double(), (0.5 * logvar.double()).exp())
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    with torch.no_grad():
        x_hat = crop(vae.decoder(mean) + 0.5, (12, 12))
    nll = discretized_gaussian_nll_bits(x, x_hat, float(vae.log_scale.detach()))
    expected = ((nll + kl / math.log(2)) / 144).mean()
    assert math.isclose(float(out.loss), float(expected), rel_tol=1e-5)
    assert math.isclose(float(out.metrics["kl_bits_per_dim"]), float((kl / math.log(2)).mean() / 144), rel_tol=1e-5)
    assert set(out.metrics) == {"mse", "nll_bits_per_dim", "kl_bits_per_dim", "log_scale"}


def test_vae_elbo_bits_per_dim_by_hand():
    torch.manual_seed(0)
    vae = VAE(tiny()).eval()
    x = torch.rand(2, 1, 8, 8)
    got = vae.elbo_bits_per_dim(x, samples=3, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)  # the same three draws, by hand
    mean, logvar = vae.posterior(x)
    nll = sum(discretized_gaussian_nll_bits(
        x, crop(vae.decoder(mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=gen)) + 0.5, (8, 8)),
        float(vae.log_scale.detach())) for _ in range(3)) / 3
    expected = (nll + gaussian_kl(mean, logvar).double() / math.log(2)) / 64
    assert got.shape == (2,) and got.dtype == torch.float64
    assert torch.allclose(got, expected, rtol=1e-6)
    # another decoder scale (e.g. one fitted on training images) changes only the likelihood term
    other = vae.elbo_bits_per_dim(x, samples=3, log_scale=-3.0, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(other, got)


def test_vae_samples_from_the_prior():
    torch.manual_seed(0)
    vae = VAE(tiny()).eval()
    images = vae.sample(5, (28, 28), generator=torch.Generator().manual_seed(1))
    assert images.shape == (5, 1, 28, 28) and 0 <= float(images.min()) <= float(images.max()) <= 1
    again = vae.sample(5, (28, 28), generator=torch.Generator().manual_seed(1))
    z = torch.randn(5, 3, 7, 7, generator=torch.Generator().manual_seed(1))
    assert torch.equal(images, again) and torch.equal(images, vae.decode(z, (28, 28)))


def test_vae_training_samples_the_posterior():
    torch.manual_seed(0)
    vae = VAE(tiny()).train()
    x = torch.rand(2, 1, 8, 8)
    a, b = vae(x), vae(x)
    assert not torch.equal(a.x_hat, b.x_hat)  # reparameterised draws
    vae.eval()
    assert torch.equal(vae(x).x_hat, vae(x).x_hat)
