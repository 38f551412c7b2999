"""The VQ-VAE: encoder, vector quantizer, decoder; saved as `config.json` + `model.safetensors`.

Key: B batch, C image channels, D code dim, K codebook size, S input spatial shape ((H, W) or (T,)),
S' = ceil(S / downsample) the code grid.

Inputs are in [0, 1] (data.py scales them) and may have any size: the model pads them at the bottom and
right by repeating the edge up to a multiple of `downsample`, and crops outputs back. This is the only
place that pads. `encode` returns an `Encoded` that remembers the input size, so
`model.decode(model.encode(x))` has x's shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import pretrained
from .config import ModelConfig, from_dict, to_dict
from .errors import RunError
from .nets import Decoder, Encoder
from .quantizers import Quantized, build_quantizer


@dataclass
class Output:
    """x_hat (B, C, *S) reconstruction; loss scalar to minimise; metrics detached scalar tensors;
    codes (B, *S') int64."""

    x_hat: torch.Tensor
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    codes: torch.Tensor


@dataclass
class Encoded:
    """Code grids and the spatial size of the inputs they encode.

    codes: (B, *S') int64 indices into the codebook. size: S, the inputs' (H, W) (or (T,)): `decode`
    crops its output to it.
    """

    codes: torch.Tensor
    size: tuple[int, ...]


def pad_to_multiple(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Pad (B, C, *S) at the end of each spatial dim by repeating the edge so each size is a multiple of
    `factor` -> (B, C, *ceil(S / factor) * factor)."""
    pads = [-s % factor for s in x.shape[2:]]
    if not any(pads):
        return x
    return F.pad(x, [p for pad in reversed(pads) for p in (0, pad)], mode="replicate")


def crop(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """(B, C, *S_padded) -> (B, C, *size): drop what `pad_to_multiple` added."""
    return x[(..., *(slice(0, s) for s in size))]


class VQVAE(nn.Module):
    """x -> z_e = encoder(x) -> z_q = nearest codes -> x_hat = decoder(z_q)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        q = cfg.quantizer
        args = (cfg.dims, cfg.in_channels, cfg.hidden, cfg.res_hidden, cfg.res_blocks, cfg.downsample, q.code_dim)
        self.encoder = Encoder(*args, kernel=cfg.encoder_kernel)
        self.quantizer = build_quantizer(q)
        self.decoder = Decoder(*args)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def code_shape(self, size: tuple[int, ...]) -> tuple[int, ...]:
        """The code grid S' of an input of spatial size S: ceil(S / downsample) per dim."""
        return tuple(-(-int(s) // self.cfg.downsample) for s in size)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != self.cfg.dims + 2 or x.shape[1] != self.cfg.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected input (B, {self.cfg.in_channels}, {'T' if self.cfg.dims == 1 else 'H, W'}), "
                             f"got {shape}")
        if any(s < 1 for s in x.shape[2:]) or x.shape[0] < 1:
            raise ValueError(f"expected a non-empty input, got shape {tuple(x.shape)}")

    def quantize(self, x: torch.Tensor) -> Quantized:
        """x (B, C, *S), any S -> the quantizer's output on the padded input's code grid (B, D, *S')."""
        self._check_input(x)
        return self.quantizer(self.encoder(pad_to_multiple(x, self.cfg.downsample) - 0.5))  # z_e (B, D, *S')

    def forward(self, x: torch.Tensor) -> Output:
        """Reconstruction MSE + quantizer loss; metrics: mse, vq_loss, perplexity, usage, commitment."""
        q = self.quantize(x)
        x_hat = crop(self.decoder(q.z_q) + 0.5, x.shape[2:])  # (B, C, *S)
        mse = F.mse_loss(x_hat, x)
        metrics = {"mse": mse.detach(), "vq_loss": q.loss.detach(), **q.stats}
        return Output(x_hat, mse + q.loss, metrics, q.codes)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> Encoded:
        """x (B, C, *S) in [0, 1], any S -> Encoded(codes (B, *S') int64, size S)."""
        return Encoded(self.quantize(x).codes, tuple(int(s) for s in x.shape[2:]))

    @torch.no_grad()
    def decode(self, codes: Encoded | torch.Tensor, size: tuple[int, ...] | None = None) -> torch.Tensor:
        """Codes -> images (B, C, *S) in [0, 1] (clamped, no gradient).

        codes: an `Encoded` (output cropped to its size) or a (B, *S') integer tensor (output of size
        `size` if given, else S' * downsample). For gradients, use `decoder` on `quantizer` outputs.
        """
        if isinstance(codes, Encoded):
            codes, size = codes.codes, size or codes.size
        K = self.cfg.quantizer.codebook_size
        if codes.dim() != self.cfg.dims + 1 or codes.dtype.is_floating_point:
            raise ValueError(f"expected integer codes (B, {'T' if self.cfg.dims == 1 else 'H, W'}), "
                             f"got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= K):
            raise ValueError(f"codes must be in 0..{K - 1}, got values in {int(codes.min())}..{int(codes.max())}")
        e = self.quantizer.embeddings[codes.long().to(self.device)]  # (B, *S', D)
        x_hat = self.decoder(torch.movedim(e, -1, 1)) + 0.5  # (B, C, *S' * downsample)
        if size is not None:
            if self.code_shape(size) != tuple(codes.shape[1:]):
                raise ValueError(f"size {tuple(size)} does not fit codes of shape {tuple(codes.shape[1:])} "
                                 f"(downsample {self.cfg.downsample})")
            x_hat = crop(x_hat, size)
        return x_hat.clamp(0, 1)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)): (B, C, *S) in [0, 1], the input's size."""
        return self.decode(self.encode(x))

    def save_pretrained(self, directory: str | Path, extra: dict | None = None) -> None:
        """Write `config.json` (model config plus `extra` keys) and `model.safetensors`, atomically."""
        pretrained.save(self, directory, {**(extra or {}), "model": to_dict(self.cfg)})

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "VQVAE":
        """Rebuild from `config.json` and load `model.safetensors` (never unpickles); in eval mode."""
        config = pretrained.read_config(directory, "a run directory written by `vqvae train`", "model")
        try:
            cfg = from_dict(ModelConfig, config["model"])
        except (KeyError, TypeError):
            raise RunError(f"{Path(directory) / pretrained.CONFIG_NAME}: not a vqvae model config "
                           "(no 'model' section)") from None
        return pretrained.load_weights(cls(cfg), directory, device)
