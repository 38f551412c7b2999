"""The VQ-VAE (and the dVAE, its Gumbel-softmax sibling): encoder, quantizer, decoder; saved as
`config.json` + `model.safetensors`. `Autoencoder` is what every model of the family shares (models.py
lists them and loads any: continuous.py holds the AE and VAE, hierarchical.py the VQ-VAE-2).

Key: B batch, C image channels, D code dim, K codebook size, Q residual-VQ stages, S input spatial shape
((H, W) or (T,)), S' = ceil(S / downsample) the code grid.

Inputs are in [0, 1] (data.py scales them) and may have any size: the model pads them at the bottom and
right by repeating the edge up to a multiple of `downsample`, and crops outputs back. This is the only
place that pads. `encode` returns an `Encoded` that remembers the input size, so
`model.decode(model.encode(x))` has x's shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import pretrained
from .config import ModelConfig, QuantizerConfig, from_dict, to_dict
from .errors import RunError
from .nets import Decoder, Encoder, eval_mode
from .quantizer_variants import ResidualVectorQuantizer
from .quantizers import Quantized, build_quantizer


@dataclass
class Output:
    """x_hat (B, C, *S) reconstruction; loss scalar to minimise; metrics detached scalar tensors;
    codes (B, *S') int64 ((B, Q, *S') with residual VQ; a (top, bottom) pair for the VQ-VAE-2; None for
    the continuous AE and VAE)."""

    x_hat: torch.Tensor
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    codes: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None


@dataclass
class Encoded:
    """Code grids and the spatial size of the inputs they encode.

    codes: (B, *S') int64 indices into the codebook ((B, Q, *S') with residual VQ). size: S, the inputs'
    (H, W) (or (T,)): `decode` crops its output to it.
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


class Autoencoder(nn.Module):
    """What every model of the family shares: its `cfg` (a `ModelConfig` that rebuilds it), the input
    checks and code-grid arithmetic, `reconstruct`, `set_progress` and the saved format.

    `discrete` says whether `encode` gives integer codes (what a prior, sampling and the codec need).
    """

    cfg: ModelConfig
    discrete: bool = True

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def code_stages(self) -> int:
        """Q, the residual-VQ stages of the codes (B, Q, *S'); 0 when codes are one grid (B, *S')."""
        quantizer = getattr(self, "quantizer", None)
        return quantizer.num_stages if isinstance(quantizer, ResidualVectorQuantizer) else 0

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

    def _check_size(self, size: tuple[int, ...] | None, grid: tuple[int, ...]) -> None:
        if size is not None and self.code_shape(size) != tuple(grid):
            raise ValueError(f"size {tuple(size)} does not fit codes of shape {tuple(grid)} "
                             f"(downsample {self.cfg.downsample})")

    def check_codes(self, codes: torch.Tensor, quantizer: nn.Module | None = None) -> None:
        """ValueError unless codes is an integer (B, *S') grid ((B, Q', *S') with residual VQ) in 0..K-1 of
        `quantizer` (default: the model's)."""
        quantizer = self.quantizer if quantizer is None else quantizer
        K, stages = quantizer.codebook_size, isinstance(quantizer, ResidualVectorQuantizer)
        grid = "T" if self.cfg.dims == 1 else "H, W"
        if codes.dim() != self.cfg.dims + 1 + stages or codes.dtype.is_floating_point:
            raise ValueError(f"expected integer codes (B, {'Q, ' if stages else ''}{grid}), "
                             f"got {codes.dtype} {tuple(codes.shape)}")
        if stages and not 1 <= codes.shape[1] <= quantizer.num_stages:
            raise ValueError(f"codes have {codes.shape[1]} stages, the quantizer 1 to {quantizer.num_stages}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= K):
            raise ValueError(f"codes must be in 0..{K - 1}, got values in {int(codes.min())}..{int(codes.max())}")

    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1], told before each step; models with schedules (dVAE) follow it."""

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)): (B, C, *S) in [0, 1], the input's size."""
        return self.decode(self.encode(x))

    def save_pretrained(self, directory: str | Path, extra: dict | None = None) -> None:
        """Write `config.json` (model config plus `extra` keys) and `model.safetensors`, atomically."""
        pretrained.save(self, directory, {**(extra or {}), "model": to_dict(self.cfg)})

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "Autoencoder":
        """Rebuild from `config.json` and load `model.safetensors` (never unpickles); in eval mode.

        The config's `model` picks the class; asking a class for a model that is not one of its kind (a
        VAE from `VQVAE.from_pretrained`) is a `RunError`. `Autoencoder.from_pretrained` loads any.
        """
        from .models import MODEL_CLASSES

        config = pretrained.read_config(directory, "a run directory written by `vqvae train`", "model")
        try:
            cfg = from_dict(ModelConfig, config["model"])
        except (KeyError, TypeError):
            raise RunError(f"{Path(directory) / pretrained.CONFIG_NAME}: not a vqvae model config "
                           "(no 'model' section)") from None
        model_class = MODEL_CLASSES[cfg.model]
        if not issubclass(model_class, cls):
            raise RunError(f"{Path(directory) / pretrained.CONFIG_NAME}: holds a {cfg.model!r} model, not a "
                           f"{cls.__name__}; load it with vqvae.models.load_model")
        return pretrained.load_weights(model_class(cfg), directory, device)


class VQVAE(Autoencoder):
    """x -> z_e = encoder(x) -> z_q = nearest codes -> x_hat = decoder(z_q).

    Any quantizer kind of quantizers.py but "gumbel" (model "dvae"): with "rvq", codes are (B, Q, *S')
    and `decode` takes the codes of the first Q' <= Q stages (Q' operating points from one model).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        q = cfg.quantizer
        args = (cfg.dims, cfg.in_channels, cfg.hidden, cfg.res_hidden, cfg.res_blocks, cfg.downsample)
        self.encoder = Encoder(*args, self._encoder_channels(), kernel=cfg.encoder_kernel)
        self.quantizer = build_quantizer(q)
        self.decoder = Decoder(*args, q.code_dim)

    def _encoder_channels(self) -> int:
        return self.cfg.quantizer.code_dim

    def quantize(self, x: torch.Tensor) -> Quantized:
        """x (B, C, *S), any S -> the quantizer's output on the padded input's code grid (B, D, *S')."""
        self._check_input(x)
        return self.quantizer(self.encoder(pad_to_multiple(x, self.cfg.downsample) - 0.5))  # z_e (B, D, *S')

    def forward(self, x: torch.Tensor) -> Output:
        """Reconstruction MSE + quantizer loss; metrics: mse, vq_loss and the quantizer's stats
        (perplexity, usage, commitment, ...)."""
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

        codes: an `Encoded` (output cropped to its size) or a (B, *S') integer tensor ((B, Q', *S') with
        residual VQ) (output of size `size` if given, else S' * downsample). For gradients, use `decoder`
        on `quantizer` outputs.
        """
        if isinstance(codes, Encoded):
            codes, size = codes.codes, size or codes.size
        self.check_codes(codes)
        x_hat = self.decoder(self.quantizer.lookup(codes.long().to(self.device))) + 0.5  # (B, C, *S' * downsample)
        if size is not None:
            self._check_size(size, codes.shape[-self.cfg.dims:])
            x_hat = crop(x_hat, size)
        return x_hat.clamp(0, 1)


def gumbel_schedule(q: QuantizerConfig, progress: float) -> tuple[float, float]:
    """The dVAE's (temperature, KL weight) at training progress in [0, 1] (DALL-E's recipe, in progress
    units): the temperature falls from `q.temperature` to `q.temperature_end` along a half cosine over the
    whole run; the KL weight rises linearly from 0 to `q.kl_weight` over the first `q.kl_warmup` of it."""
    p = min(max(float(progress), 0.0), 1.0)
    temperature = q.temperature_end + (q.temperature - q.temperature_end) * 0.5 * (1 + math.cos(math.pi * p))
    ramp = 1.0 if q.kl_warmup == 0 else min(p / q.kl_warmup, 1.0)
    return temperature, q.kl_weight * ramp


class DVAE(VQVAE):
    """DALL-E's discrete VAE on the same encoder and decoder: the encoder emits logits over the K codes
    (B, K, *S'), a `GumbelQuantizer` turns them into z_q, the decoder reconstructs.

    loss = MSE per pixel + w * KL(softmax(logits) || uniform) in nats per input dimension, where
    (temperature, w) = gumbel_schedule(cfg.quantizer, progress), set by `set_progress` (the state after
    construction is that of progress 0; eval mode uses argmax codes, so the temperature does not matter
    there). `encode` always gives the hard argmax codes, also in training mode.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.set_progress(0.0)

    def _encoder_channels(self) -> int:
        return self.cfg.quantizer.codebook_size  # logits

    def set_progress(self, progress: float) -> None:
        temperature, kl_weight = gumbel_schedule(self.cfg.quantizer, progress)
        # The quantizer's KL is a mean per code position; a position covers C * downsample^dims inputs.
        dims_per_position = self.cfg.in_channels * self.cfg.downsample ** self.cfg.dims
        self.quantizer.temperature, self.quantizer.kl_weight = temperature, kl_weight / dims_per_position

    def forward(self, x: torch.Tensor) -> Output:
        """As `VQVAE.forward`; metrics add kl (nats per code position), temperature and kl_weight."""
        out = super().forward(x)
        weight = self.quantizer.kl_weight * self.cfg.in_channels * self.cfg.downsample ** self.cfg.dims
        out.metrics.update(temperature=torch.tensor(float(self.quantizer.temperature)),
                           kl_weight=torch.tensor(float(weight)))
        return out

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> Encoded:
        """x (B, C, *S) -> Encoded(hard codes argmax logits (B, *S'), size S), whatever the mode."""
        with eval_mode(self.quantizer):
            return super().encode(x)
