"""The model family on one encoder and decoder, by name: what `ModelConfig.model` picks.

    "vqvae"   VQVAE     (autoencoders.py)  quantizer kind "vq", "ema", "fsq" or "rvq"
    "dvae"    DVAE      (autoencoders.py)  quantizer kind "gumbel"
    "vqvae2"  VQVAE2    (hierarchical.py)  two code grids, top and bottom
    "ae"      AE        (continuous.py)    deterministic bottleneck, no quantizer
    "vae"     VAE       (continuous.py)    Gaussian posterior, ELBO in bits per dimension

Every model has `cfg`, `forward(x) -> Output(x_hat, loss, metrics, codes)`, `encode`, `decode`,
`reconstruct`, `set_progress(p)` and `save_pretrained`; `discrete` says whether it has integer codes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .autoencoders import DVAE, VQVAE, Autoencoder
from .config import ModelConfig
from .continuous import AE, VAE
from .hierarchical import VQVAE2

MODEL_CLASSES: dict[str, type[Autoencoder]] = {"vqvae": VQVAE, "dvae": DVAE, "vqvae2": VQVAE2, "ae": AE, "vae": VAE}


def build_model(cfg: ModelConfig) -> Autoencoder:
    """A fresh model of the kind `cfg.model` names."""
    return MODEL_CLASSES[cfg.model](cfg)


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> Autoencoder:
    """The model saved in `directory` (config.json + model.safetensors), whatever its kind, in eval mode."""
    return Autoencoder.from_pretrained(directory, device)
