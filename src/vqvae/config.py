"""Frozen configuration dataclasses: everything needed to rebuild a model, validated once.

`to_dict` / `from_dict` round-trip through plain JSON values; unknown keys and values out of range
raise `ConfigError` with a message naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable

from .errors import ConfigError

# Upper bounds on sizes: far above what this project trains, low enough that a config.json with an absurd
# value is refused with a message instead of failing to allocate (4x4 convolutions of 2048 channels
# already hold 270 MB of weights).
MAX_CHANNELS = 2048
MAX_RES_BLOCKS = 32
MAX_DOWNSAMPLE = 256
MAX_CODEBOOK_SIZE = 65536
MAX_PRIOR_LAYERS, MAX_PRIOR_WIDTH, MAX_GRID_SIDE, MAX_CLASSES = 64, 4096, 4096, 65536
MAX_BATCH = 65536
MAX_STAGES = 64  # residual-VQ stages


def _check(cond: bool, name: str, allowed: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")


def _integers(cfg: Any, *names: str) -> None:
    """Each named field must be an integer (not a bool, not 1.5); numpy integers become plain ints."""
    for name in names:
        value = getattr(cfg, name)
        _check(isinstance(value, numbers.Integral) and not isinstance(value, bool), name, "an integer", value)
        object.__setattr__(cfg, name, int(value))


def _reals(cfg: Any, *names: str) -> None:
    """Each named field must be a finite number (not a bool, not a string); it becomes a plain float."""
    for name in names:
        value = getattr(cfg, name)
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        _check(ok, name, "a finite number", value)
        object.__setattr__(cfg, name, float(value))


def _typed(cfg: Any, kind: type, allowed: str, *names: str) -> None:
    for name in names:
        _check(isinstance(getattr(cfg, name), kind), name, allowed, getattr(cfg, name))


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
        _integers(self, "codebook_size", "code_dim", "kmeans_iters", "dead_code_steps", "stages")
        _reals(self, "commitment_weight", "ema_decay", "ema_eps", "temperature", "temperature_end", "kl_weight",
               "kl_warmup")
        _typed(self, bool, "true or false", "kmeans_init")
        _check(self.codebook_size >= 2, "codebook_size", "at least 2", self.codebook_size)
        _check(self.codebook_size <= MAX_CODEBOOK_SIZE, "codebook_size", f"at most {MAX_CODEBOOK_SIZE}",
               self.codebook_size)
        _check(self.code_dim >= 1, "code_dim", "at least 1", self.code_dim)
        _check(self.code_dim <= MAX_CHANNELS, "code_dim", f"at most {MAX_CHANNELS}", self.code_dim)
        _check(self.commitment_weight >= 0, "commitment_weight", ">= 0", self.commitment_weight)
        _check(self.kind in QUANTIZER_KINDS, "quantizer kind", "'vq', 'ema', 'fsq', 'rvq' or 'gumbel'", self.kind)
        _check(0 < self.ema_decay < 1, "ema_decay", "in (0, 1)", self.ema_decay)
        _check(self.ema_eps > 0, "ema_eps", "> 0", self.ema_eps)
        _check(self.kmeans_iters >= 0, "kmeans_iters", ">= 0", self.kmeans_iters)
        _check(self.dead_code_steps >= 0, "dead_code_steps", ">= 0 (0 disables)", self.dead_code_steps)
        ok = isinstance(self.levels, (tuple, list)) and 1 <= len(self.levels) <= MAX_CHANNELS and all(
            isinstance(n, numbers.Integral) and not isinstance(n, bool) and 2 <= n <= MAX_CODEBOOK_SIZE
            for n in self.levels)
        _check(ok, "levels", "a list of integers >= 2, e.g. [8, 5, 5, 5]", self.levels)
        object.__setattr__(self, "levels", tuple(int(n) for n in self.levels))  # JSON gives a list
        _check(1 <= self.stages <= MAX_STAGES, "stages", f"in 1..{MAX_STAGES}", self.stages)
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
        _integers(self, "in_channels", "hidden", "res_hidden", "res_blocks", "downsample", "dims", "encoder_kernel")
        _typed(self, QuantizerConfig, "a QuantizerConfig", "quantizer")
        for name in ("in_channels", "hidden", "res_hidden"):
            _check(getattr(self, name) >= 1, name, "at least 1", getattr(self, name))
            _check(getattr(self, name) <= MAX_CHANNELS, name, f"at most {MAX_CHANNELS}", getattr(self, name))
        _check(self.res_blocks >= 0, "res_blocks", ">= 0", self.res_blocks)
        _check(self.res_blocks <= MAX_RES_BLOCKS, "res_blocks", f"at most {MAX_RES_BLOCKS}", self.res_blocks)
        ok = self.downsample >= 1 and (self.downsample & (self.downsample - 1)) == 0
        _check(ok, "downsample", "a power of 2 (1, 2, 4, 8, ...)", self.downsample)
        _check(self.downsample <= MAX_DOWNSAMPLE, "downsample", f"at most {MAX_DOWNSAMPLE}", self.downsample)
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
    `stages` (transformer only): 0 for one code grid per image, codes (B, *grid); S >= 1 for the S stages
    of a residual VQ, codes (B, S, *grid), modelled stage after stage (priors.py says why).
    `levels` (transformer only): the grids of a VQ-VAE-2's codes, top first, e.g. ((4, 4), (7, 7)); then
    `grid` is (L,), L the positions of all levels, and the codes (B, L) are the top grid in raster order
    followed by the bottom grid: one causal sequence, so the prior is p(top) * p(bottom | top). () for
    any other model.
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
    stages: int = 0
    levels: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        _check(self.arch in ("transformer", "pixelcnn"), "arch", "'transformer' or 'pixelcnn'", self.arch)
        for name in ("codebook_size", "num_classes", "n_layer", "n_head", "n_embd", "stages"):
            value = getattr(self, name)
            _check(isinstance(value, numbers.Integral) and not isinstance(value, bool), name, "an integer", value)
            object.__setattr__(self, name, int(value))  # plain ints: numpy's would not go to JSON
        _check(self.codebook_size >= 2, "codebook_size", "at least 2", self.codebook_size)
        _check(self.codebook_size <= MAX_CODEBOOK_SIZE, "codebook_size", f"at most {MAX_CODEBOOK_SIZE}",
               self.codebook_size)
        ok = isinstance(self.grid, (tuple, list)) and len(self.grid) in (1, 2) and all(
            isinstance(g, numbers.Integral) and not isinstance(g, bool) and g >= 1 for g in self.grid)
        _check(ok, "grid", "1 or 2 positive integer sizes, e.g. [7, 7] or [32]", self.grid)
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        _check(max(self.grid) <= MAX_GRID_SIDE, "grid", f"sizes of at most {MAX_GRID_SIDE}", self.grid)
        _check(self.num_classes >= 0, "num_classes", ">= 0", self.num_classes)
        _check(self.num_classes <= MAX_CLASSES, "num_classes", f"at most {MAX_CLASSES}", self.num_classes)
        _check(self.n_layer >= 1, "n_layer", "at least 1", self.n_layer)
        _check(self.n_layer <= MAX_PRIOR_LAYERS, "n_layer", f"at most {MAX_PRIOR_LAYERS}", self.n_layer)
        _check(self.n_head >= 1, "n_head", "at least 1", self.n_head)
        _check(self.n_embd >= 1 and self.n_embd % self.n_head == 0, "n_embd",
               f"a positive multiple of n_head={self.n_head}", self.n_embd)
        _check(self.n_embd <= MAX_PRIOR_WIDTH, "n_embd", f"at most {MAX_PRIOR_WIDTH}", self.n_embd)
        _check(isinstance(self.dropout, numbers.Real) and 0 <= self.dropout < 1, "dropout", "in [0, 1)", self.dropout)
        _check(isinstance(self.dilated, bool), "dilated", "true or false", self.dilated)
        _check(0 <= self.stages <= MAX_STAGES, "stages", f"in 0..{MAX_STAGES}", self.stages)
        _check(self.stages == 0 or self.arch == "transformer", "stages", "0 for a pixelcnn prior (stages need "
               "the transformer)", self.stages)
        ok = isinstance(self.levels, (tuple, list)) and all(
            isinstance(level, (tuple, list)) and len(level) in (1, 2) and all(
                isinstance(g, numbers.Integral) and not isinstance(g, bool) and g >= 1 for g in level)
            for level in self.levels)
        _check(ok, "levels", "grids of 1 or 2 positive integer sizes, top first, e.g. [[4, 4], [7, 7]]", self.levels)
        object.__setattr__(self, "levels", tuple(tuple(int(g) for g in level) for level in self.levels))
        if self.levels:
            _check(len(self.levels) >= 2 and self.arch == "transformer" and self.stages == 0, "levels",
                   "two or more grids, for a transformer prior without stages", self.levels)
            positions = sum(math.prod(level) for level in self.levels)
            _check(self.grid == (positions,), "grid", f"[{positions}]: the positions of all levels, one sequence",
                   self.grid)


PRECISIONS = ("fp32", "bf16", "fp16")


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
    precision: str = "fp32"  # fp32, bf16 or fp16 (autocast for the nets; the quantizer stays fp32)
    eval_every: int = 0  # held-out figures, best checkpoint and overfit warning every this many steps (0: never)
    image_size: int = 0  # S > 0: S x S crops of folder:/shards: images (photos: the crop size); 0: whole images
    skip_bad_files: bool = False  # folder:/shards: warn about broken files and train on the others
    workers: int = 2  # DataLoader worker processes decoding folder:/shards: images (0: the training process)

    def __post_init__(self) -> None:
        _integers(self, "steps", "batch_size", "warmup_steps", "seed", "log_every", "checkpoint_every",
                  "image_size", "workers")
        _typed(self, bool, "true or false", "skip_bad_files")
        _check(0 <= self.image_size <= 65536, "image_size", "in 0..65536 (0: whole images)", self.image_size)
        _check(0 <= self.workers <= 256, "workers", "in 0..256", self.workers)
        _reals(self, "max_seconds", "lr", "lr_min_ratio")
        _typed(self, str, "a string", "data", "device", "precision")
        _check(self.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}", self.precision)
        _check(self.steps >= 1, "steps", "at least 1", self.steps)
        _check(self.max_seconds >= 0, "max_seconds", ">= 0 (0: no limit)", self.max_seconds)
        _check(self.batch_size >= 1, "batch_size", "at least 1", self.batch_size)
        _check(self.batch_size <= MAX_BATCH, "batch_size", f"at most {MAX_BATCH}", self.batch_size)
        _check(self.lr > 0, "lr", "> 0", self.lr)
        _check(0 <= self.lr_min_ratio <= 1, "lr_min_ratio", "in [0, 1]", self.lr_min_ratio)
        _check(self.warmup_steps >= 0, "warmup_steps", ">= 0", self.warmup_steps)
        _check(self.log_every >= 1, "log_every", "at least 1", self.log_every)
        _check(self.checkpoint_every >= 1, "checkpoint_every", "at least 1", self.checkpoint_every)
        _integers(self, "eval_every")
        _check(self.eval_every >= 0, "eval_every", ">= 0 (0: no held-out evaluation)", self.eval_every)


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
    """Write JSON atomically (see `write_atomically`)."""
    text = (json.dumps(obj, indent=2) + "\n").encode()
    write_atomically(path, lambda f: f.write(text))


def write_atomically(path: str | Path, write: Callable[[IO[bytes]], object]) -> None:
    """Create or replace the file `path` with what `write(file)` writes, all or nothing.

    `write` fills a temporary file with a unique name (`.NAME.XXXXXXXX.tmp`) in the same directory, which
    is then renamed over `path`: a reader, or a process killed at any moment, sees the old file or the new
    one, never a part, and concurrent writers never share a temp file. The file gets the usual permissions
    (0666 less the umask), not the 0600 of a private temp file. The directory must exist.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask, read without changing it where /proc tells it (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, then put it back
    os.umask(mask)
    return mask
