import math

import pytest
import torch

from vqvae.evaluate import (compression_table, encode_dataset, evaluate_autoencoder, evaluate_run, likelihood,
                            prior_figures)
from vqvae.metrics import psnr
from vqvae.priors import prior_bits
from vqvae.run import Run


def test_evaluate_autoencoder_matches_a_direct_computation(tiny_run):
    model = Run(tiny_run).model()
    images = torch.rand(7, 1, 30, 26)  # any size, and a batch size that does not divide the count
    figures = evaluate_autoencoder(model, images, batch_size=3)
    x_hat = model.reconstruct(images)
    assert figures["images"] == 7
    assert figures["psnr"] == pytest.approx(float(psnr(x_hat, images).mean()), rel=1e-6)
    assert figures["mse"] == pytest.approx(float((x_hat - images).pow(2).mean()), rel=1e-5)
    codes = model.encode(images).codes
    assert figures["codes_used"] == pytest.approx(len(codes.unique()) / 16)


def test_encode_dataset_is_batch_independent(tiny_run):
    model = Run(tiny_run).model()
    images = Run(tiny_run).dataset().test[:23]
    a, b = encode_dataset(model, images, batch_size=5), encode_dataset(model, images, batch_size=23)
    assert a.dtype == torch.int16 and a.shape == (23, 7, 7) and torch.equal(a, b)


def test_prior_figures_and_likelihood(tiny_run):
    run = Run(tiny_run)
    model, prior, data = run.model(), run.prior(), run.dataset()
    codes = encode_dataset(model, data.test)
    figures = prior_figures(prior, {"test": codes})
    assert figures["nll_bits_per_latent"] == pytest.approx(float(prior_bits(prior, codes).mean()) / 49)
    assert figures["uniform_bits_per_latent"] == 4.0
    bpd = likelihood(model, prior, data.train[:200], data.test)
    # the bound adds pixel bits to the code bits: at least the code bits per pixel
    assert bpd["bits_per_dim"] > figures["nll_bits_per_image"] / 784


def test_evaluate_run_has_every_figure(tiny_run):
    figures = evaluate_run(Run(tiny_run))
    assert {"psnr", "ssim", "mse", "perplexity", "codes_used", "nll_bits_per_latent", "integer_bits_per_latent",
            "bits_per_dim"} <= set(figures)
    # the integer model (what the range coder pays) stays within 2% of the float prior
    assert figures["integer_bits_per_latent"] == pytest.approx(figures["nll_bits_per_latent"], rel=0.02)
    other = evaluate_run(Run(tiny_run), "digits")  # 8x8 digits: another code grid, so no prior figures
    assert other["images"] == 1797 // 10 and "bits_per_dim" not in other


def test_compression_table(tiny_run, tmp_path):
    table = compression_table(Run(tiny_run), 20.0, write=tmp_path / "all.vqz", single_files=3)
    assert (tmp_path / "all.vqz").is_file()
    per_image = table[".vqz, one file of 500 (payload bytes/image)"]
    assert 0 < per_image < 49 * math.log2(16) / 8 * 1.5  # near or below the uniform code cost
    assert table["PNG (lossless)"] > per_image
