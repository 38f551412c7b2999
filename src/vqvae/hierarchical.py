"""The hierarchical VQ-VAE (VQ-VAE-2, Razavi et al. 2019): a top code grid for the global shape and a
bottom grid, conditioned on the top, for the detail; the decoder reads both.

Key: B batch, C image channels, D code dim, F hidden features, K codebook size, S input spatial shape
((H, W) or (T,)), S' = ceil(S / downsample) the bottom grid, S'' = ceil(S' / 2) the top grid (28x28
digits at downsample 4: bottom 7x7, top 4x4).

    x ──encoder──► h (B, F, *S') ──down──► z_top (B, D, *S'') ─quantize─► top codes
                   │                                   │ z_q_top
                   └── concat(h, up(z_q_top)) ─1x1─► z_bottom (B, D, *S') ─quantize─► bottom codes
    x_hat = decoder(concat(z_q_bottom, up(z_q_top)))

Both quantizers follow the same `QuantizerConfig` (any kind but "gumbel"; with "rvq" each grid's codes
gain a stage axis). Padding and cropping are the VQ-VAE's; `encode` gives `Encoded2(top, bottom, size)`,
`decode` takes it (or the two grids and a size). A prior models `sequence(codes)`, the top grid then the
bottom one in raster order (`PriorConfig.levels`): it draws the top grid first, then the bottom
conditioned on it; `from_sequence` turns a sampled or decoded sequence back into the two grids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .autoencoders import Autoencoder, Output, crop, pad_to_multiple
from .config import ModelConfig
from .nets import Decoder, Encoder, ResidualStack, conv, conv_transpose
from .quantizers import build_quantizer


@dataclass
class Encoded2:
    """The two code grids of a VQ-VAE-2 and the spatial size S of the inputs they encode.

    top: (B, *S'') int64, bottom: (B, *S') int64 (each with a stage axis after B under residual VQ).
    """

    top: torch.Tensor
    bottom: torch.Tensor
    size: tuple[int, ...]


class Upsample2(nn.Module):
    """(B, D, *S'') -> (B, D, *S'): a stride-2 transposed conv, cropped to the finer grid's size."""

    def __init__(self, dims: int, channels_in: int, channels_out: int):
        super().__init__()
        self.conv = conv_transpose(dims, channels_in, channels_out, 4, stride=2, padding=1)

    def forward(self, z: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        return crop(self.conv(z), size)


class VQVAE2(Autoencoder):
    """Two code grids: top (S'' = ceil(S' / 2)) and bottom (S', the VQ-VAE's grid).

    `quantizer` is the bottom quantizer, `top_quantizer` the top one. forward: loss = MSE + both quantizer
    losses; metrics add the top quantizer's stats with a `top_` prefix; codes are the pair (top, bottom).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        q, D, F_ = cfg.quantizer, cfg.quantizer.code_dim, cfg.hidden
        dims = cfg.dims
        # The bottom encoder is the VQ-VAE's, emitting F features instead of D code channels.
        self.encoder = Encoder(dims, cfg.in_channels, F_, cfg.res_hidden, cfg.res_blocks, cfg.downsample, F_,
                               kernel=cfg.encoder_kernel)
        self.top_encoder = nn.Sequential(  # kernel 3, stride 2, padding 1: n -> ceil(n / 2) for any n
            conv(dims, F_, F_, 3, stride=2, padding=1), ResidualStack(dims, F_, cfg.res_hidden, cfg.res_blocks),
            conv(dims, F_, D, 1))
        self.top_quantizer = build_quantizer(q)
        self.top_to_bottom = Upsample2(dims, D, D)  # conditions the bottom latents on the top codes
        self.bottom_in = conv(dims, F_ + D, D, 1)
        self.quantizer = build_quantizer(q)
        self.top_to_decoder = Upsample2(dims, D, D)
        self.decoder = Decoder(dims, cfg.in_channels, F_, cfg.res_hidden, cfg.res_blocks, cfg.downsample, 2 * D)

    def top_shape(self, size: tuple[int, ...]) -> tuple[int, ...]:
        """The top grid S'' of an input of spatial size S: ceil(ceil(S / downsample) / 2) per dim."""
        return tuple(-(-s // 2) for s in self.code_shape(size))

    def levels(self, size: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The grids (S'', S') of an input of spatial size S, top first: what a prior over this model's
        codes records as `PriorConfig.levels`."""
        return self.top_shape(size), self.code_shape(size)

    def sequence(self, codes: Encoded2) -> torch.Tensor:
        """Encoded2 -> (B, L) int64, L = |S''| + |S'|: the top grid in raster order, then the bottom grid.
        The one sequence a prior (and the codec) models: p(top) * p(bottom | top)."""
        if self.code_stages:
            raise ValueError("a VQ-VAE-2 with residual-VQ quantizers has several codes per position; its codes "
                             "form no single sequence (priors and .vqz files take vq, ema or fsq quantizers)")
        return torch.cat([codes.top.flatten(1), codes.bottom.flatten(1)], 1).long()

    def from_sequence(self, seq: torch.Tensor, levels: tuple[tuple[int, ...], ...],
                      size: tuple[int, ...] | None = None) -> Encoded2:
        """(B, L) codes in `sequence` order with `levels` = (S'', S') -> Encoded2 of size `size` (default
        S' * downsample)."""
        top, bottom = (tuple(level) for level in levels)
        L_top = math.prod(top)
        if seq.dim() != 2 or seq.size(1) != L_top + math.prod(bottom):
            raise ValueError(f"codes of levels {top} and {bottom} are (B, {L_top + math.prod(bottom)}), "
                             f"got {tuple(seq.shape)}")
        size = size or tuple(s * self.cfg.downsample for s in bottom)
        return Encoded2(seq[:, :L_top].reshape(-1, *top), seq[:, L_top:].reshape(-1, *bottom), tuple(size))

    def quantize2(self, x: torch.Tensor):
        """x (B, C, *S), any S -> (top Quantized (B, D, *S''), bottom Quantized (B, D, *S'))."""
        self._check_input(x)
        h = self.encoder(pad_to_multiple(x, self.cfg.downsample) - 0.5)  # (B, F, *S')
        top = self.top_quantizer(self.top_encoder(h))  # z_e (B, D, *S'')
        grid = tuple(h.shape[2:])
        bottom = self.quantizer(self.bottom_in(torch.cat([h, self.top_to_bottom(top.z_q, grid)], 1)))
        return top, bottom

    def quantize(self, x: torch.Tensor):
        """The bottom quantizer's output (B, D, *S') (use `quantize2` for both grids)."""
        return self.quantize2(x)[1]

    def _decode_latents(self, z_q_top: torch.Tensor, z_q_bottom: torch.Tensor) -> torch.Tensor:
        """(B, D, *S''), (B, D, *S') -> decoder output + 1/2 (B, C, *S' * downsample), not clamped."""
        up = self.top_to_decoder(z_q_top, tuple(z_q_bottom.shape[2:]))  # (B, D, *S')
        return self.decoder(torch.cat([z_q_bottom, up], 1)) + 0.5

    def forward(self, x: torch.Tensor) -> Output:
        top, bottom = self.quantize2(x)
        x_hat = crop(self._decode_latents(top.z_q, bottom.z_q), x.shape[2:])  # (B, C, *S)
        mse = F.mse_loss(x_hat, x)
        metrics = {"mse": mse.detach(), "vq_loss": (top.loss + bottom.loss).detach(), **bottom.stats,
                   **{f"top_{k}": v for k, v in top.stats.items()}}
        return Output(x_hat, mse + top.loss + bottom.loss, metrics, (top.codes, bottom.codes))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> Encoded2:
        """x (B, C, *S) in [0, 1], any S -> Encoded2(top (B, *S''), bottom (B, *S'), size S)."""
        top, bottom = self.quantize2(x)
        return Encoded2(top.codes, bottom.codes, tuple(int(s) for s in x.shape[2:]))

    @torch.no_grad()
    def decode(self, codes: Encoded2 | tuple[torch.Tensor, torch.Tensor],
               size: tuple[int, ...] | None = None) -> torch.Tensor:
        """Encoded2 (or the pair (top, bottom)) -> images (B, C, *S) in [0, 1] (clamped, no gradient),
        cropped to the Encoded2's size or `size`, else S' * downsample. The top grid must be the bottom's
        halved (rounding up)."""
        if isinstance(codes, Encoded2):
            top, bottom, size = codes.top, codes.bottom, size or codes.size
        else:
            top, bottom = codes
        self.check_codes(top, self.top_quantizer)
        self.check_codes(bottom)
        d = self.cfg.dims
        expected = tuple(-(-s // 2) for s in bottom.shape[-d:])
        if tuple(top.shape[-d:]) != expected or top.shape[0] != bottom.shape[0]:
            raise ValueError(f"top codes {tuple(top.shape)} do not fit bottom codes {tuple(bottom.shape)} "
                             f"(top grid {expected} expected)")
        z_top = self.top_quantizer.lookup(top.long().to(self.device))
        z_bottom = self.quantizer.lookup(bottom.long().to(self.device))
        x_hat = self._decode_latents(z_top, z_bottom)
        if size is not None:
            self._check_size(size, bottom.shape[-d:])
            x_hat = crop(x_hat, size)
        return x_hat.clamp(0, 1)
