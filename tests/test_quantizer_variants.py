"""Tests for vqvae.quantizer_variants: FSQ, residual VQ and the Gumbel quantizer, each against an
independent reference (numpy's mixed radix, the plain quantizer, torch.distributions)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vqvae.config import QuantizerConfig
from vqvae.quantizer_variants import (FiniteScalarQuantizer, GumbelQuantizer, ResidualVectorQuantizer, gumbel_softmax,
                                      uniform_kl)
from vqvae.quantizers import EMAVectorQuantizer, Quantized, VectorQuantizer, build_quantizer

# --- FSQ ------------------------------------------------------------------------------------------------


def preimages(fsq):
    """Inputs z (K, D) whose bounded values are exactly each code's integers: atanh of the inverse bound."""
    values = fsq.embeddings.double() * fsq.half_width.double()  # (K, D) integers
    return torch.atanh((values + fsq.offset.double()) / fsq.half_range.double()) - fsq.shift.double()


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (3, 4), (2,), (7, 6, 2)])
def test_fsq_codes_round_trip_and_every_code_is_reached(levels):
    fsq = FiniteScalarQuantizer(levels)
    K = math.prod(levels)
    assert fsq.codebook_size == K and fsq.code_dim == len(levels) and fsq.embeddings.shape == (K, len(levels))
    codes = torch.arange(K).view(1, K)  # as a (B, T) grid
    vectors = fsq.lookup(codes)  # (1, D, K)
    assert torch.equal(fsq.codes_of(vectors), codes)  # code -> vector -> code
    # every code is reached by the forward pass, and its z_q is exactly the code's vector
    q = fsq(preimages(fsq).float().t()[None])  # (1, D, K)
    assert torch.equal(q.codes, codes)
    assert torch.equal(q.z_q, vectors)
    assert float(q.stats["usage"]) == 1.0 and len(torch.unique(fsq.embeddings, dim=0)) == K


def test_fsq_matches_a_mixed_radix_reference():
    levels = (8, 5, 3)
    fsq = FiniteScalarQuantizer(levels)
    z = torch.randn(4, 3, 6, 5, generator=torch.Generator().manual_seed(0)) * 2
    q = fsq(z)
    # reference: bound each dim by hand, round, shift to 0..L-1, numpy's ravel (first dim fastest)
    digits = []
    for i, L in enumerate(levels):
        half = (L - 1) * (1 + 1e-3) / 2
        offset = 0.5 if L % 2 == 0 else 0.0
        b = np.tanh(z[:, i].double().numpy() + np.arctanh(offset / half)) * half - offset
        digits.append(np.round(b).astype(np.int64) + L // 2)
        assert digits[-1].min() >= 0 and digits[-1].max() <= L - 1
        # z_q is the rounded value over floor(L / 2), in [-1, 1]
        assert np.allclose(q.z_q[:, i].numpy(), (digits[-1] - L // 2) / (L // 2))
    expected = np.ravel_multi_index(digits, levels, order="F")
    assert np.array_equal(q.codes.numpy(), expected)
    assert q.codes.shape == (4, 6, 5) and float(q.loss) == 0.0


def test_fsq_gradient_is_that_of_the_bound():
    fsq = FiniteScalarQuantizer((8, 5))
    z = torch.randn(2, 2, 3, 3, requires_grad=True)
    fsq(z).z_q.sum().backward()
    zd = z.detach().movedim(1, -1)
    half = torch.tensor([3.5 * 1.001, 2 * 1.001])
    shift = torch.atanh(torch.tensor([0.5, 0.0]) / half)
    expected = (1 - torch.tanh(zd + shift) ** 2) * half / torch.tensor([4.0, 2.0])
    assert torch.allclose(z.grad.movedim(1, -1), expected, rtol=1e-5)
    assert (z.grad.abs() > 0).all()


def test_fsq_channels_last_state_and_config():
    fsq, last = FiniteScalarQuantizer((4, 3)), FiniteScalarQuantizer((4, 3), channels_last=True)
    z = torch.randn(2, 2, 7)
    a, b = fsq(z), last(z.movedim(1, -1))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.z_q, b.z_q.movedim(-1, 1))
    assert torch.equal(last.lookup(a.codes), b.z_q)
    assert fsq.state_dict() == {}  # everything derives from the levels
    built = build_quantizer(QuantizerConfig(kind="fsq", levels=(4, 3), code_dim=2, codebook_size=12))
    assert isinstance(built, FiniteScalarQuantizer) and built.levels == (4, 3)
    with pytest.raises(ValueError, match=r"\(B, D, \*S\).*D = 2"):
        fsq(torch.randn(2, 3, 5))


def test_fsq_under_autocast_and_double():
    fsq = FiniteScalarQuantizer((8, 5, 5, 5))
    z = torch.randn(3, 4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = fsq(z)
    assert torch.equal(q.codes, fsq(z).codes)
    q64 = fsq.double()(z.double())
    assert q64.z_q.dtype == torch.float64 and torch.equal(q64.codes, q.codes)


# --- residual VQ ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ema", [True, False])
def test_one_stage_rvq_is_exactly_the_plain_quantizer(ema):
    torch.manual_seed(0)
    plain = (EMAVectorQuantizer if ema else VectorQuantizer)(16, 4, commitment_weight=0.3, dead_code_steps=2).train()
    rvq = ResidualVectorQuantizer(1, 16, 4, commitment_weight=0.3, ema=ema, dead_code_steps=2).train()
    rvq.stages[0].load_state_dict(plain.state_dict())  # same initial codebook
    for step in range(3):
        z = torch.randn(2, 4, 5, 6) + step
        z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
        upstream = torch.randn(z.shape)
        torch.manual_seed(step)  # dead-code restarts draw from the global generator: the same draws for both
        a = plain(z1)
        torch.manual_seed(step)
        b = rvq(z2)
        assert b.codes.shape == (2, 1, 5, 6) and torch.equal(b.codes[:, 0], a.codes)
        assert torch.equal(b.z_q, a.z_q) and torch.equal(b.loss, a.loss)
        assert all(torch.equal(a.stats[k], b.stats[k]) for k in a.stats)
        params_a = [z1] + ([] if ema else [plain.codebook])
        params_b = [z2] + ([] if ema else [rvq.stages[0].codebook])
        grads_a = torch.autograd.grad(a.loss + (a.z_q * upstream).sum(), params_a)
        grads_b = torch.autograd.grad(b.loss + (b.z_q * upstream).sum(), params_b)
        for ga, gb in zip(grads_a, grads_b):
            assert torch.allclose(ga, gb, rtol=1e-6, atol=1e-7)
        assert torch.equal(rvq.stages[0].embeddings, plain.embeddings)  # the same training-time updates


def clustered(n=600, dim=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, dim, generator=gen) * 3
    return centres[torch.randint(12, (n,), generator=gen)] + torch.randn(n, dim, generator=gen)  # (N, D)


def test_rvq_residual_shrinks_with_every_stage_on_data():
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(4, 8, 4, kmeans_init=True, kmeans_iters=20).train()
    z = clustered().t()[None]  # (1, D, N)
    rvq(z)  # k-means initialisation of each stage on the residual it sees
    rvq.eval()
    codes = rvq(z).codes  # (1, Q, N)
    errors = [float(z.pow(2).mean())] + [float((z - rvq.lookup(codes[:, :s])).pow(2).mean()) for s in range(1, 5)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.2 * errors[1]


def test_rvq_first_stages_are_the_quantizer_of_those_stages():
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(3, 16, 4, kmeans_init=True).train()
    z = clustered(dim=4).t().reshape(1, 4, 20, 30)
    rvq(z)
    rvq.eval()
    full = rvq(z)
    assert full.codes.shape == (1, 3, 20, 30)
    assert torch.equal(rvq.lookup(full.codes), full.z_q)  # decode-from-codes gives forward's z_q exactly
    for s in (1, 2):
        short = ResidualVectorQuantizer(s, 16, 4).eval()
        for i in range(s):
            short.stages[i].load_state_dict(rvq.stages[i].state_dict())
        q = short(z)
        assert torch.equal(q.codes, full.codes[:, :s])
        assert torch.equal(rvq.lookup(full.codes[:, :s]), q.z_q)
    with pytest.raises(ValueError, match=r"1 <= Q' <= 3"):
        rvq.lookup(torch.zeros(1, 4, 2, 2, dtype=torch.long))


def test_rvq_gradient_goes_straight_through_and_channels_last_agrees():
    torch.manual_seed(0)
    first = ResidualVectorQuantizer(2, 8, 3).eval()
    last = ResidualVectorQuantizer(2, 8, 3, channels_last=True).eval()
    last.load_state_dict(first.state_dict())
    z = torch.randn(2, 3, 9, requires_grad=True)
    q = first(z)
    (grad,) = torch.autograd.grad(q.z_q.sum(), z)
    assert torch.equal(grad, torch.ones_like(z))
    b = last(z.detach().movedim(1, -1))
    assert torch.equal(b.codes, q.codes) and torch.equal(b.z_q, q.z_q.detach().movedim(1, -1))
    built = build_quantizer(QuantizerConfig(kind="rvq", stages=3, codebook_size=8, code_dim=3))
    assert isinstance(built, ResidualVectorQuantizer) and built.num_stages == 3
    assert all(isinstance(s, EMAVectorQuantizer) for s in built.stages)


# --- Gumbel ----------------------------------------------------------------------------------------------

def test_uniform_kl_equals_the_closed_form():
    logits = torch.randn(3, 5, 4, 7, dtype=torch.float64) * 3  # (B, *S, K)
    q = torch.distributions.Categorical(logits=logits)
    uniform = torch.distributions.Categorical(logits=torch.zeros_like(logits))
    assert torch.allclose(uniform_kl(logits), torch.distributions.kl_divergence(q, uniform), rtol=1e-10)
    f64 = dict(dtype=torch.float64)
    assert torch.allclose(uniform_kl(torch.zeros(2, 7, **f64)), torch.zeros(2, **f64), atol=1e-14)  # uniform: 0
    one_hot = torch.tensor([[1e4, 0, 0, 0]], **f64)
    assert torch.allclose(uniform_kl(one_hot), torch.tensor([math.log(4)], **f64))  # one-hot: log K


def test_gumbel_quantizer_loss_is_the_weighted_kl():
    gq = GumbelQuantizer(6, 3, kl_weight=0.7).train()
    logits = torch.randn(2, 6, 4, 5, requires_grad=True)  # (B, K, H, W)
    q = gq(logits)
    reference = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=logits.movedim(1, -1)),
                                                  torch.distributions.Categorical(logits=torch.zeros(2, 4, 5, 6)))
    assert torch.allclose(q.stats["kl"], reference.mean(), rtol=1e-5)
    assert torch.allclose(q.loss, 0.7 * reference.mean(), rtol=1e-5)
    assert q.z_q.shape == (2, 3, 4, 5) and q.codes.shape == (2, 4, 5)
    g_logits, g_codebook = torch.autograd.grad(q.loss + q.z_q.sum(), [logits, gq.codebook])
    assert g_logits.abs().sum() > 0 and g_codebook.abs().sum() > 0


def test_gumbel_softmax_tends_to_the_argmax_one_hot():
    logits = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    one_hot = F.one_hot(logits.argmax(-1), 8).float()
    gaps = [float((gumbel_softmax(logits, t, torch.zeros_like(logits)) - one_hot).abs().max())
            for t in (1.0, 0.1, 0.01, 1e-4)]
    assert all(b < a for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 1e-6


def test_gumbel_quantizer_at_low_temperature_gives_the_argmax_codes():
    torch.manual_seed(0)
    gq = GumbelQuantizer(8, 4, temperature=1e-4).train()
    logits = torch.randn(3, 8, 5, 5)
    torch.manual_seed(1)
    q = gq(logits)
    torch.manual_seed(1)  # the same Gumbel noise, drawn by hand
    noisy = logits.movedim(1, -1) - torch.empty(3, 5, 5, 8).exponential_().log()
    assert torch.equal(q.codes, noisy.argmax(-1))  # training: the argmax of the perturbed logits
    assert torch.allclose(q.z_q, gq.lookup(q.codes), atol=1e-5)  # and z_q is (almost) that one code
    gq.eval()
    q = gq(logits)  # inference: the argmax of the logits themselves, exactly one code
    assert torch.equal(q.codes, logits.argmax(1)) and torch.equal(q.z_q, gq.lookup(q.codes))


def test_gumbel_samples_follow_the_softmax():
    torch.manual_seed(0)
    gq = GumbelQuantizer(4, 2, temperature=0.5).train()
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).view(1, 4, 1).expand(1, 4, 40000)  # one distribution, many draws
    freq = torch.bincount(gq(logits).codes.view(-1), minlength=4).float() / 40000
    assert torch.allclose(freq, torch.softmax(logits[0, :, 0], 0), atol=0.01)  # Gumbel-max: exact samples


def test_gumbel_channels_last_and_config():
    gq = GumbelQuantizer(6, 3).eval()
    last = GumbelQuantizer(6, 3, channels_last=True).eval()
    last.load_state_dict(gq.state_dict())
    logits = torch.randn(2, 6, 7)
    a, b = gq(logits), last(logits.movedim(1, -1))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.z_q, b.z_q.movedim(-1, 1))
    with pytest.raises(ValueError, match=r"\(B, K, \*S\).*K = 6"):
        gq(torch.randn(2, 3, 7))
    built = build_quantizer(QuantizerConfig(kind="gumbel", codebook_size=6, code_dim=3, temperature=0.5))
    assert isinstance(built, GumbelQuantizer) and built.temperature == 0.5


@pytest.mark.parametrize("make", [lambda: FiniteScalarQuantizer((4, 4)), lambda: ResidualVectorQuantizer(2, 16, 2),
                                  lambda: GumbelQuantizer(16, 2)])
def test_every_variant_returns_a_quantized_that_unpacks(make):
    quantizer = make().eval()
    channels = 16 if isinstance(quantizer, GumbelQuantizer) else 2
    out = quantizer(torch.randn(2, channels, 3, 4))
    z_q, codes, loss = out
    assert isinstance(out, Quantized) and z_q.shape == (2, 2, 3, 4) and loss.dim() == 0
    assert {"perplexity", "usage"} <= set(out.stats) and all(not v.requires_grad for v in out.stats.values())
    assert torch.equal(quantizer.lookup(codes), z_q.detach()) if not isinstance(quantizer, GumbelQuantizer) else True
