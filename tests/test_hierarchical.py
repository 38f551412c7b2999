"""Tests for vqvae.hierarchical: the VQ-VAE-2's two code grids, their round trip and their checks."""

import pytest
import torch

from vqvae.autoencoders import pad_to_multiple
from vqvae.config import ModelConfig, QuantizerConfig
from vqvae.hierarchical import VQVAE2, Encoded2


def tiny(dims=2, kind="ema", **quantizer):
    q = QuantizerConfig(**{"codebook_size": 16, "code_dim": 4, "kind": kind, "kmeans_init": False,
                           "dead_code_steps": 0, **quantizer})
    return ModelConfig(hidden=8, res_hidden=4, res_blocks=1, dims=dims, quantizer=q, model="vqvae2")


@pytest.mark.parametrize("dims,size,bottom,top", [(2, (28, 28), (7, 7), (4, 4)), (2, (32, 32), (8, 8), (4, 4)),
                                                   (2, (29, 13), (8, 4), (4, 2)), (2, (1, 5), (1, 2), (1, 1)),
                                                   (1, (61,), (16,), (8,))])
def test_shapes_of_both_grids(dims, size, bottom, top):
    torch.manual_seed(0)
    model = VQVAE2(tiny(dims)).eval()
    x = torch.rand(2, 1, *size)
    out = model(x)
    assert out.x_hat.shape == x.shape
    top_codes, bottom_codes = out.codes
    assert top_codes.shape == (2, *top) and bottom_codes.shape == (2, *bottom)
    assert model.code_shape(size) == bottom and model.top_shape(size) == top
    encoded = model.encode(x)
    assert isinstance(encoded, Encoded2) and encoded.size == size
    assert torch.equal(encoded.top, top_codes) and torch.equal(encoded.bottom, bottom_codes)
    assert {"top_perplexity", "perplexity", "mse", "vq_loss"} <= set(out.metrics)


@pytest.mark.parametrize("kind", ["ema", "fsq", "rvq"])
def test_decode_of_encode_is_the_forward_reconstruction(kind):
    torch.manual_seed(0)
    extra = {"fsq": {"levels": (4, 4), "code_dim": 2, "codebook_size": 16}, "rvq": {"stages": 2}}.get(kind, {})
    cfg = tiny(kind=kind, **extra)
    model = VQVAE2(cfg).eval()
    x = torch.rand(3, 1, 29, 27)
    out, encoded = model(x), model.encode(x)
    x_hat = model.decode(encoded)
    assert x_hat.shape == x.shape and not x_hat.requires_grad
    assert torch.allclose(x_hat, out.x_hat.clamp(0, 1), atol=1e-6)
    assert torch.equal(model.decode((encoded.top, encoded.bottom), (29, 27)), x_hat)
    # the codes of an odd-sized input are those of its edge-padded copy
    padded = model.encode(pad_to_multiple(x, 4))
    assert torch.equal(padded.top, encoded.top) and torch.equal(padded.bottom, encoded.bottom)


def test_bottom_codes_depend_on_the_top():
    """The bottom grid is conditioned on the top one: the same encoder features with another top code
    give other bottom latents."""
    torch.manual_seed(0)
    model = VQVAE2(tiny()).eval()
    x = torch.rand(2, 1, 28, 28)
    h = model.encoder(x - 0.5)
    top = model.top_quantizer(model.top_encoder(h))
    z_bottom = model.bottom_in(torch.cat([h, model.top_to_bottom(top.z_q, (7, 7))], 1))
    assert torch.equal(model.quantizer(z_bottom).codes, model.encode(x).bottom)
    other_top = model.top_quantizer.lookup((top.codes + 1) % 16)
    other = model.bottom_in(torch.cat([h, model.top_to_bottom(other_top, (7, 7))], 1))
    assert not torch.allclose(z_bottom, other)


def test_mismatched_grids_and_codes_are_refused():
    model = VQVAE2(tiny()).eval()
    top, bottom = torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 7, 7, dtype=torch.long)
    assert model.decode((top, bottom)).shape == (1, 1, 28, 28)
    with pytest.raises(ValueError, match=r"top codes \(1, 3, 4\) do not fit bottom codes \(1, 7, 7\)"):
        model.decode((torch.zeros(1, 3, 4, dtype=torch.long), bottom))
    with pytest.raises(ValueError, match=r"codes must be in 0\.\.15"):
        model.decode((top + 16, bottom))
    with pytest.raises(ValueError, match="does not fit"):
        model.decode((top, bottom), (40, 28))
    with pytest.raises(ValueError, match="expected input"):
        model(torch.rand(1, 3, 28, 28))


def tiny_levels_prior(levels=((4, 4), (7, 7)), K=16, seed=0):
    from vqvae.config import PriorConfig
    from vqvae.priors import TransformerPrior

    torch.manual_seed(seed)
    L = sum(h * w for h, w in levels)
    return TransformerPrior(PriorConfig(codebook_size=K, grid=(L,), levels=levels, n_layer=2, n_head=2,
                                        n_embd=16)).eval()


def test_the_prior_sees_the_top_before_the_bottom():
    """p(top) * p(bottom | top): the top positions' logits never depend on bottom codes, the bottom ones do
    depend on the top codes."""
    prior = tiny_levels_prior()
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (4, 65), generator=g)
    other_bottom, other_top = codes.clone(), codes.clone()
    other_bottom[:, 16:] = torch.randint(0, 16, (4, 49), generator=g)
    other_top[:, :16] = (codes[:, :16] + 1) % 16
    with torch.no_grad():
        base, b, t = (prior.logits(c) for c in (codes, other_bottom, other_top))  # (B, K, 65)
    assert torch.equal(base[..., :16], b[..., :16])
    assert not torch.allclose(base[..., 16:], t[..., 16:])


def test_sampling_draws_the_top_grid_first_and_decodes_both():
    from vqvae.report import sample_images

    torch.manual_seed(0)
    model, prior = VQVAE2(tiny()).eval(), tiny_levels_prior()
    seen = []
    decode = model.decode
    model.decode = lambda codes, *a: seen.append(codes) or decode(codes, *a)
    images, _ = sample_images(model, prior, 3, seed=5)
    drawn = prior.sample(3, generator=torch.Generator().manual_seed(5))  # (3, 65), drawn position by position
    (encoded,) = seen
    assert isinstance(encoded, Encoded2) and encoded.size == (28, 28)
    assert torch.equal(encoded.top, drawn[:, :16].view(3, 4, 4))  # the first 16 draws are the top grid
    assert torch.equal(encoded.bottom, drawn[:, 16:].view(3, 7, 7))
    assert images.shape == (3, 1, 28, 28) and torch.equal(images, decode(encoded))
    # the top grid is a prefix: drawing only the top positions gives the same top codes
    state, prev, top = prior.start(3), None, []
    g = torch.Generator().manual_seed(5)
    from vqvae.priors import sample_from_logits

    for _ in range(16):
        logits, state = prior.step(state, prev)
        prev = sample_from_logits(logits, generator=g)
        top.append(prev)
    assert torch.equal(torch.stack(top, 1), drawn[:, :16])


def test_sequence_round_trip_and_checks():
    model = VQVAE2(tiny()).eval()
    x = torch.rand(2, 1, 29, 27)
    encoded = model.encode(x)
    seq = model.sequence(encoded)
    assert seq.shape == (2, 16 + 56) and model.levels((29, 27)) == ((4, 4), (8, 7))
    back = model.from_sequence(seq, model.levels((29, 27)), (29, 27))
    assert torch.equal(back.top, encoded.top) and torch.equal(back.bottom, encoded.bottom) and back.size == (29, 27)
    with pytest.raises(ValueError, match=r"\(B, 65\)"):
        model.from_sequence(seq, ((4, 4), (7, 7)))
    with pytest.raises(ValueError, match="residual-VQ"):
        VQVAE2(tiny(kind="rvq", stages=2)).eval().sequence(encoded)
