"""The VQ-VAE: encoder, vector quantizer, decoder; saved as `config.json` + `model.safetensors`.

Key: B batch, C image channels, D code dim, K codebook size, S input spatial shape, S' = S / downsample.
Inputs are in [0, 1] (data.py scales them); the networks see them centred at 0.
"""

from __future__ import annotations

import json
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

from .pretrained import CONFIG_NAME, WEIGHTS_NAME  # noqa: F401 (re-exported)


@dataclass
class Output:
    """x_hat (B, C, *S) reconstruction; loss scalar to minimise; metrics detached scalar tensors."""

    x_hat: torch.Tensor
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    codes: torch.Tensor


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

    def _check_input(self, x: torch.Tensor) -> None:
        f = self.cfg.downsample
        if x.dim() != self.cfg.dims + 2 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"expected input (B, {self.cfg.in_channels}, {'*S' if self.cfg.dims == 1 else 'H, W'}), "
                             f"got {tuple(x.shape)}")
        if any(s % f for s in x.shape[2:]):
            raise ValueError(f"spatial size {tuple(x.shape[2:])} is not a multiple of downsample={f}; pad first")

    def quantize(self, x: torch.Tensor) -> Quantized:
        self._check_input(x)
        return self.quantizer(self.encoder(x - 0.5))  # z_e (B, D, *S')

    def forward(self, x: torch.Tensor) -> Output:
        """Reconstruction MSE + quantizer loss; metrics: mse, vq_loss, perplexity, usage."""
        q = self.quantize(x)
        x_hat = self.decoder(q.z_q) + 0.5  # (B, C, *S)
        mse = F.mse_loss(x_hat, x)
        metrics = {"mse": mse.detach(), "vq_loss": q.loss.detach(), **q.stats}
        return Output(x_hat, mse + q.loss, metrics, q.codes)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, *S) in [0, 1] -> codes (B, *S') int64."""
        return self.quantize(x).codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, *S') -> x_hat (B, C, *S), not clamped."""
        e = self.quantizer.embeddings[codes]  # (B, *S', D)
        return self.decoder(torch.movedim(e, -1, 1)) + 0.5

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)) clamped to [0, 1]."""
        return self.decode(self.encode(x)).clamp(0, 1)

    def save_pretrained(self, directory: str | Path, extra: dict | None = None) -> None:
        """Write `config.json` (model config plus `extra` keys) and `model.safetensors`, atomically."""
        pretrained.save(self, directory, {**(extra or {}), "model": to_dict(self.cfg)})

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "VQVAE":
        """Rebuild from `config.json` and load `model.safetensors` (never unpickles)."""
        config = pretrained.read_config(directory, "a run directory written by `vqvae train`", "model")
        try:
            cfg = from_dict(ModelConfig, config["model"])
        except KeyError as e:
            raise RunError(f"{Path(directory) / CONFIG_NAME}: not a vqvae model config (no {e} section)") from None
        return pretrained.load_weights(cls(cfg), directory, device)


def read_run_config(directory: str | Path) -> dict:
    """The whole `config.json` of a run (model, data, train sections)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise RunError(f"{path}: missing; expected a run directory written by `vqvae train`")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise RunError(f"{path}: not valid JSON ({e})") from None
