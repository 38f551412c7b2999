"""Convolutional building blocks, written once for 1-D (audio, (B, C, T)) and 2-D (images, (B, C, H, W)).

Key: B batch, C channels, D code dim, H W image grid, T sequence length.
The encoder downsamples by `downsample` = 2^n with n strided 4x4 (or 4-wide) convolutions, as in the
VQ-VAE paper; the decoder mirrors it with transposed convolutions.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(*modules: nn.Module | None):
    """Eval mode (no dropout, no quantizer updates) for a block; each module's mode is restored after."""
    modules = [m for m in modules if m is not None]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def conv(dims: int, *args, **kwargs) -> nn.Module:
    return (nn.Conv1d, nn.Conv2d)[dims - 1](*args, **kwargs)


def conv_transpose(dims: int, *args, **kwargs) -> nn.Module:
    return (nn.ConvTranspose1d, nn.ConvTranspose2d)[dims - 1](*args, **kwargs)


class ResidualBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))): the paper's residual block (`kernel` 3)."""

    def __init__(self, dims: int, hidden: int, res_hidden: int, kernel: int = 3):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(),
            conv(dims, hidden, res_hidden, kernel, padding=kernel // 2),
            nn.ReLU(),
            conv(dims, res_hidden, hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResidualStack(nn.Sequential):
    """`n` residual blocks followed by a ReLU."""

    def __init__(self, dims: int, hidden: int, res_hidden: int, n: int, kernel: int = 3):
        super().__init__(*[ResidualBlock(dims, hidden, res_hidden, kernel) for _ in range(n)], nn.ReLU())


class Encoder(nn.Module):
    """x (B, C, *S) -> z_e (B, D, *S/downsample).

    `kernel` is the size of the convolutions after the strided ones (3 in the paper). With 1, each code
    sees only the pixels under the strided convolutions (10 px at downsample 4) instead of the whole
    28x28 digit: blank regions then get the same few codes, which a prior predicts far better.
    """

    def __init__(self, dims: int, in_channels: int, hidden: int, res_hidden: int, res_blocks: int,
                 downsample: int, code_dim: int, kernel: int = 3):
        super().__init__()
        n_down = int(math.log2(downsample))
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(n_down):
            out = hidden if i == n_down - 1 else max(hidden // 2, 1)
            layers += [conv(dims, channels, out, 4, stride=2, padding=1), nn.ReLU()]
            channels = out
        layers += [conv(dims, channels, hidden, kernel, padding=kernel // 2),
                   ResidualStack(dims, hidden, res_hidden, res_blocks, kernel),
                   conv(dims, hidden, code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """z_q (B, D, *S') -> x_hat (B, C, *S' * upsample); mirrors `Encoder`."""

    def __init__(self, dims: int, out_channels: int, hidden: int, res_hidden: int, res_blocks: int,
                 upsample: int, code_dim: int):
        super().__init__()
        n_up = int(math.log2(upsample))
        layers: list[nn.Module] = [conv(dims, code_dim, hidden, 3, padding=1),
                                   ResidualStack(dims, hidden, res_hidden, res_blocks)]
        channels = hidden
        for i in range(n_up):
            last = i == n_up - 1
            out = out_channels if last else max(hidden // 2, 1)
            layers.append(conv_transpose(dims, channels, out, 4, stride=2, padding=1))
            if not last:
                layers.append(nn.ReLU())
            channels = out
        if n_up == 0:
            layers.append(conv(dims, hidden, out_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)
