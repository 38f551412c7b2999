"""Fixtures shared by the test files: a tiny trained run (model + prior) on the bundled MNIST digits."""

import pytest
from rich.console import Console

from vqvae.config import ModelConfig, QuantizerConfig, TrainConfig
from vqvae.prior_training import train_prior
from vqvae.train import train_autoencoder

pytest_plugins = ["codec_support"]  # the codec tests' fixtures

TINY_MODEL = ModelConfig(hidden=8, res_hidden=4, res_blocks=1,
                         quantizer=QuantizerConfig(codebook_size=16, code_dim=4))
TINY_PRIOR = dict(n_layer=1, n_embd=16, n_head=2)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """runs/NAME of a 40-step VQ-VAE (K = 16, 7x7 codes) with a 30-step class-conditional prior."""
    path = tmp_path_factory.mktemp("tiny_run")
    quiet = Console(quiet=True)
    train_autoencoder(TINY_MODEL, TrainConfig(data="mnist", steps=40, batch_size=16, log_every=10), path,
                      show_progress=False, console=quiet)
    train_prior(path, TINY_PRIOR, TrainConfig(data="codes", steps=30, batch_size=16, warmup_steps=5), shifts=0,
                show_progress=False, console=quiet)
    return path


@pytest.fixture(scope="session")
def tiny_vqvae2_run(tmp_path_factory):
    """runs/NAME of a 10-step VQ-VAE-2 (K = 16, 4x4 top and 7x7 bottom codes) with a 10-step prior."""
    from dataclasses import replace

    path = tmp_path_factory.mktemp("tiny_vqvae2")
    quiet = Console(quiet=True)
    train_autoencoder(replace(TINY_MODEL, model="vqvae2"), TrainConfig(data="mnist", steps=10, batch_size=16,
                                                                       log_every=5), path,
                      show_progress=False, console=quiet)
    train_prior(path, TINY_PRIOR, TrainConfig(data="codes", steps=10, batch_size=16, warmup_steps=2), shifts=0,
                show_progress=False, console=quiet)
    return path
