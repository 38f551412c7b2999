"""Tests for vqvae.nets: shapes in 1-D and 2-D, the residual identity, the encoder's receptive field, eval_mode."""

import itertools

import pytest
import torch
from torch import nn

from vqvae.nets import Decoder, Encoder, ResidualBlock, ResidualStack, eval_mode

HIDDEN, RES_HIDDEN, CODE_DIM = 8, 4, 3


def encoder(dims, downsample, kernel=3, in_channels=2, res_blocks=2, hidden=HIDDEN):
    torch.manual_seed(0)
    return Encoder(dims, in_channels, hidden, RES_HIDDEN, res_blocks, downsample, CODE_DIM, kernel)


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("downsample", [1, 2, 4, 8])
@pytest.mark.parametrize("kernel", [1, 3])
def test_encoder_and_decoder_shapes(dims, downsample, kernel):
    size = (24,) if dims == 1 else (16, 24)  # multiples of 8, not square
    x = torch.rand(2, 2, *size)
    z_e = encoder(dims, downsample, kernel)(x)
    assert z_e.shape == (2, CODE_DIM, *(s // downsample for s in size))
    decoder = Decoder(dims, 2, HIDDEN, RES_HIDDEN, 2, downsample, CODE_DIM)
    assert decoder(z_e).shape == x.shape


def test_residual_block_is_the_identity_when_its_last_conv_is_zero():
    for dims, shape in ((1, (3, HIDDEN, 10)), (2, (3, HIDDEN, 6, 5))):
        x = torch.randn(shape)
        block = ResidualBlock(dims, HIDDEN, RES_HIDDEN)
        last = block.block[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        assert torch.equal(block(x), x)  # x + 0, exactly
        stack = ResidualStack(dims, HIDDEN, RES_HIDDEN, 3)
        for b in list(stack)[:-1]:
            nn.init.zeros_(b.block[-1].weight)
            nn.init.zeros_(b.block[-1].bias)
        assert torch.equal(stack(x), torch.relu(x))  # three identities and the closing ReLU
        assert not torch.equal(ResidualBlock(dims, HIDDEN, RES_HIDDEN)(x), x)  # a live block does change x


def receptive_field(o: int, downsample: int) -> range:
    """Input positions under code `o` after log2(downsample) convolutions of width 4, stride 2, padding 1:
    o -> 2o-1 .. 2o+2 per convolution, so f*o - (f-1) .. f*o + 2(f-1): 3f-2 positions (10 at f = 4)."""
    f = downsample
    return range(f * o - (f - 1), f * o + 2 * (f - 1) + 1)


def influence(net, shape):
    """Brute force: seen[code position, pixel position] when perturbing that pixel changes z_e there.

    float64 with a 1e-12 threshold, over 4 random images: a pixel whose path is cut by inactive ReLUs
    for one image is still seen through another, and rounding cannot pass for a dependency.
    """
    net = net.double()
    x = torch.rand(4, 2, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        base = net(x)
        seen = torch.zeros(*base.shape[2:], *shape, dtype=torch.bool)
        for p in itertools.product(*map(range, shape)):
            changed = x.clone()
            changed[(slice(None), slice(None), *p)] += 0.5
            seen[(Ellipsis, *p)] = (net(changed) - base).abs().amax((0, 1)) > 1e-12
    return seen


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("downsample", [2, 4])
def test_encoder_kernel_1_codes_see_only_their_receptive_field(dims, downsample):
    shape = (32,) if dims == 1 else (16, 12)
    seen = influence(encoder(dims, downsample, kernel=1, hidden=32), shape)
    codes = [s // downsample for s in shape]
    expected = torch.zeros_like(seen)
    for o in itertools.product(*map(range, codes)):
        for p in itertools.product(*map(range, shape)):
            expected[(*o, *p)] = all(pi in receptive_field(oi, downsample) for oi, pi in zip(o, p))
    assert torch.equal(seen, expected)  # far pixels leave z_e there unchanged; every near one moves it
    # the paper's kernel 3 spreads each code over far more of the input
    wide = influence(encoder(dims, downsample, kernel=3, hidden=32), shape)
    assert bool((wide | expected).eq(wide).all()) and int(wide.sum()) > 2 * int(expected.sum())


def test_eval_mode_restores_each_module_and_skips_none():
    a, b = nn.Linear(2, 2).train(), nn.Linear(2, 2).eval()
    with eval_mode(a, None, b):
        assert not a.training and not b.training
    assert a.training and not b.training
    with pytest.raises(RuntimeError, match="inside"):
        with eval_mode(a):
            raise RuntimeError("inside")
    assert a.training
