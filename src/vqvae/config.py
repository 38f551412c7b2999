"""Frozen configuration dataclasses: everything needed to rebuild a model, validated once.

`to_dict` / `from_dict` round-trip through plain JSON values; unknown keys and values out of range
raise `ConfigError` with a message naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError


def _check(cond: bool, name: str, allowed: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")


QUANTIZER_KINDS = ("vq", "ema", "fsq", "rvq", "gumbel")
MODEL_KINDS = ("vqvae", "ae", "vae", "dvae", "vqvae2")


@dataclass(frozen=True)
class QuantizerConfig:
    """Codebook of `codebook_size` vectors of size `code_dim` and how it is learned.

    kind: "vq" (codebook learned by the gradient of |sg[z_e]-e|^2) or "ema" (exponential moving
    averages of assigned encoder outputs, the paper's appendix). `kmeans_init` seeds the codebook by
    k-means on the first batch of encoder outputs; `dead_code_steps` > 0 re-seeds codes unused for that
    many steps from recent encoder outputs (0 disables).

    The other kinds (quantizers.py):
    - "fsq": finite scalar quantization with `levels` values per dimension and no learned codebook;
      `code_dim` must be len(levels) and `codebook_size` prod(levels) (e.g. (8, 5, 5, 5): D 4, K 1000).
    - "rvq": residual VQ, `stages` EMA quantizers (ema_*, kmeans_*, dead_code_steps apply to each) of
      `codebook_size` codes, each quantizing what the previous ones left.
    - "gumbel": the dVAE's Gumbel-softmax relaxation (only with model "dvae"): the encoder emits logits
      over the K codes; the temperature falls from `temperature` to `temperature_end` (cosine in training
      progress) and the weight of the KL to the uniform prior, in nats per input dimension next to the
      per-pixel MSE, rises linearly from 0 to `kl_weight` over the first `kl_warmup` of training.
    Fields that do not concern a kind (ema_* for "vq", levels for "ema", ...) are ignored by it.
    """

    codebook_size: int = 512
    code_dim: int = 16
    commitment_weight: float = 0.25
    kind: str = "ema"
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    kmeans_init: bool = True
    kmeans_iters: int = 10
    dead_code_steps: int = 50
    levels: tuple[int, ...] = (8, 5, 5, 5)
    stages: int = 1
    temperature: float = 1.0
    temperature_end: float = 1 / 16
    kl_weight: float = 0.05
    kl_warmup: float = 0.05

    def __post_init__(self) -> None:
        _check(self.codebook_size >= 2, "codebook_size", "at least 2", self.codebook_size)
        _check(self.codebook_size <= 65536, "codebook_size", "at most 65536", self.codebook_size)
        _check(self.code_dim >= 1, "code_dim", "at least 1", self.code_dim)
        _check(self.commitment_weight >= 0, "commitment_weight", ">= 0", self.commitment_weight)
        _check(self.kind in QUANTIZER_KINDS, "quantizer kind", "'vq', 'ema', 'fsq', 'rvq' or 'gumbel'", self.kind)
        _check(0 < self.ema_decay < 1, "ema_decay", "in (0, 1)", self.ema_decay)
        _check(self.ema_eps > 0, "ema_eps", "> 0", self.ema_eps)
        _check(self.kmeans_iters >= 0, "kmeans_iters", ">= 0", self.kmeans_iters)
        _check(self.dead_code_steps >= 0, "dead_code_steps", ">= 0 (0 disables)", self.dead_code_steps)
        ok = isinstance(self.levels, (tuple, list)) and len(self.levels) >= 1 and all(
            isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 2 for n in self.levels)
        _check(ok, "levels", "a list of integers >= 2, e.g. [8, 5, 5, 5]", self.levels)
        object.__setattr__(self, "levels", tuple(int(n) for n in self.levels))  # JSON gives a list
        _check(self.stages >= 1, "stages", "at least 1", self.stages)
        _check(self.temperature > 0, "temperature", "> 0", self.temperature)
        _check(0 < self.temperature_end <= self.temperature, "temperature_end",
               f"in (0, temperature={self.temperature}]", self.temperature_end)
        _check(self.kl_weight >= 0, "kl_weight", ">= 0", self.kl_weight)
        _check(0 <= self.kl_warmup <= 1, "kl_warmup", "in [0, 1] (a fraction of training)", self.kl_warmup)
        if self.kind == "fsq":
            _check(self.code_dim == len(self.levels), "code_dim", f"len(levels) = {len(self.levels)} for kind 'fsq'",
                   self.code_dim)
            K = math.prod(self.levels)
            _check(self.codebook_size == K, "codebook_size", f"prod(levels) = {K} for kind 'fsq'", self.codebook_size)


@dataclass(frozen=True)
class ModelConfig:
    """A VQ-VAE: conv encoder (downsampling by `downsample`), quantizer, mirrored decoder.

    `dims` is 2 for images (B, C, H, W) and 1 for sequences (B, C, T). `encoder_kernel` is the size of
    the encoder's convolutions after the strided ones: 3 as in the paper, 1 for codes that each describe
    only their own neighbourhood (a far more predictable code grid for the prior).

    `model` picks the family member built on the same encoder and decoder (models.py): "vqvae" (the
    default, any quantizer kind but "gumbel"), "ae" (a deterministic bottleneck of `quantizer.code_dim`
    channels), "vae" (a Gaussian posterior of that many channels), "dvae" (quantizer kind "gumbel"),
    "vqvae2" (a top and a bottom code grid, two quantizers of the same config). "ae" and "vae" use only
    `quantizer.code_dim`. A config saved without `model` is a VQ-VAE.
    """

    in_channels: int = 1
    hidden: int = 64
    res_hidden: int = 32
    res_blocks: int = 2
    downsample: int = 4
    dims: int = 2
    encoder_kernel: int = 1
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    model: str = "vqvae"

    def __post_init__(self) -> None:
        _check(self.in_channels >= 1, "in_channels", "at least 1", self.in_channels)
        _check(self.hidden >= 1, "hidden", "at least 1", self.hidden)
        _check(self.res_hidden >= 1, "res_hidden", "at least 1", self.res_hidden)
        _check(self.res_blocks >= 0, "res_blocks", ">= 0", self.res_blocks)
        ok = self.downsample >= 1 and (self.downsample & (self.downsample - 1)) == 0
        _check(ok, "downsample", "a power of 2 (1, 2, 4, 8, ...)", self.downsample)
        _check(self.dims in (1, 2), "dims", "1 (sequences) or 2 (images)", self.dims)
        _check(self.encoder_kernel in (1, 3, 5), "encoder_kernel", "1, 3 or 5", self.encoder_kernel)
        _check(self.model in MODEL_KINDS, "model", "'vqvae', 'ae', 'vae', 'dvae' or 'vqvae2'", self.model)
        if self.model == "dvae":
            _check(self.quantizer.kind == "gumbel", "quantizer kind", "'gumbel' for model 'dvae'", self.quantizer.kind)
        elif self.model in ("vqvae", "vqvae2"):
            allowed = f"'vq', 'ema', 'fsq' or 'rvq' for model {self.model!r} ('gumbel' is model 'dvae')"
            _check(self.quantizer.kind != "gumbel", "quantizer kind", allowed, self.quantizer.kind)


@dataclass(frozen=True)
class PriorConfig:
    """An autoregressive prior over raster-scanned code grids of shape `grid` with `codebook_size` codes.

    arch: "transformer" (decoder-only, causal attention) or "pixelcnn" (gated, masked convolutions).
    `num_classes` > 0 makes the prior class-conditional.
    `dilated` (pixelcnn only): the gated layers after the first dilate their convolutions so that each
    layer doubles how far back the prior sees, until every code sees all earlier codes of the grid;
    False is the undilated stack, whose reach grows by one code per layer (7 codes along a row with 4
    layers). A config saved without this field predates it and loads as False: that prior's architecture.
    """

    arch: str = "transformer"
    codebook_size: int = 512
    grid: tuple[int, ...] = (7, 7)
    num_classes: int = 0
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    dilated: bool = True

    def __post_init__(self) -> None:
        _check(self.arch in ("transformer", "pixelcnn"), "arch", "'transformer' or 'pixelcnn'", self.arch)
        for name in ("codebook_size", "num_classes", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            _check(isinstance(value, numbers.Integral) and not isinstance(value, bool), name, "an integer", value)
            object.__setattr__(self, name, int(value))  # plain ints: numpy's would not go to JSON
        _check(self.codebook_size >= 2, "codebook_size", "at least 2", self.codebook_size)
        ok = isinstance(self.grid, (tuple, list)) and len(self.grid) in (1, 2) and all(
            isinstance(g, numbers.Integral) and not isinstance(g, bool) and g >= 1 for g in self.grid)
        _check(ok, "grid", "1 or 2 positive integer sizes, e.g. [7, 7] or [32]", self.grid)
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        _check(self.num_classes >= 0, "num_classes", ">= 0", self.num_classes)
        _check(self.n_layer >= 1, "n_layer", "at least 1", self.n_layer)
        _check(self.n_head >= 1, "n_head", "at least 1", self.n_head)
        _check(self.n_embd >= 1 and self.n_embd % self.n_head == 0, "n_embd",
               f"a positive multiple of n_head={self.n_head}", self.n_embd)
        _check(isinstance(self.dropout, numbers.Real) and 0 <= self.dropout < 1, "dropout", "in [0, 1)", self.dropout)
        _check(isinstance(self.dilated, bool), "dilated", "true or false", self.dilated)


@dataclass(frozen=True)
class TrainConfig:
    """How an autoencoder is trained: a step budget and/or a wall-clock budget, whichever ends first."""

    data: str = "mnist"
    steps: int = 8000
    max_seconds: float = 0.0
    batch_size: int = 32
    lr: float = 2e-3
    lr_min_ratio: float = 0.05
    warmup_steps: int = 100
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    device: str = "auto"

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "steps", "at least 1", self.steps)
        _check(self.max_seconds >= 0, "max_seconds", ">= 0 (0: no limit)", self.max_seconds)
        _check(self.batch_size >= 1, "batch_size", "at least 1", self.batch_size)
        _check(self.lr > 0, "lr", "> 0", self.lr)
        _check(0 <= self.lr_min_ratio <= 1, "lr_min_ratio", "in [0, 1]", self.lr_min_ratio)
        _check(self.warmup_steps >= 0, "warmup_steps", ">= 0", self.warmup_steps)
        _check(self.log_every >= 1, "log_every", "at least 1", self.log_every)
        _check(self.checkpoint_every >= 1, "checkpoint_every", "at least 1", self.checkpoint_every)


def to_dict(cfg: Any) -> dict:
    """A dataclass config as plain JSON values (nested configs become dicts, tuples lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type, data: dict) -> Any:
    """Rebuild a config of type `cls` from `to_dict` output; unknown keys are an error, not ignored."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__} must be a JSON object, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; allowed: {sorted(names)}")
    kwargs = dict(data)
    if cls is ModelConfig and "quantizer" in kwargs:
        kwargs["quantizer"] = from_dict(QuantizerConfig, kwargs["quantizer"])
    if cls is PriorConfig:  # saved before `dilated` existed: the undilated PixelCNN it was trained as
        kwargs.setdefault("dilated", False)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"bad {cls.__name__}: {e}") from None


def write_json(path: str | Path, obj: dict) -> None:
    """Write JSON atomically: a temp file next to `path`, then rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
