import math

import pytest
import torch

from vqvae.errors import ConfigError
from vqvae.evaluate import (bits_figures, compression_table, encode_dataset, evaluate_autoencoder, evaluate_run,
                            likelihood, prior_figures, uniform_bits_per_image)
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


@pytest.fixture(scope="module")
def tiny_figures(tiny_run):
    """evaluate_run of the tiny run (class-conditional prior), 3 samples of each class."""
    return evaluate_run(Run(tiny_run), samples_per_class=3)


def test_evaluate_run_has_every_figure(tiny_run, tiny_figures):
    figures = tiny_figures
    assert {"psnr", "ssim", "mse", "perplexity", "codes_used", "nll_bits_per_latent", "integer_bits_per_latent",
            "bits_per_dim", "uniform_bits_per_dim"} <= set(figures)
    assert figures["bits_per_dim"] < figures["uniform_bits_per_dim"]  # the learned prior beats log2 K per code
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


# -- the model family ---------------------------------------------------------------------------------------

FAMILY = {  # name -> (ModelConfig.model, QuantizerConfig fields)
    "vqvae": ("vqvae", {}), "fsq": ("vqvae", dict(kind="fsq", levels=(4, 4), code_dim=2)),
    "rvq": ("vqvae", dict(kind="rvq", stages=3)), "dvae": ("dvae", dict(kind="gumbel")),
    "vqvae2": ("vqvae2", {}), "ae": ("ae", {}), "vae": ("vae", {}),
}


def family_member(name):
    from vqvae.config import ModelConfig, QuantizerConfig
    from vqvae.models import build_model

    model, fields = FAMILY[name]
    q = QuantizerConfig(**{"codebook_size": 16, "code_dim": 4, "kmeans_init": False, **fields})
    torch.manual_seed(0)
    return build_model(ModelConfig(hidden=8, res_hidden=4, res_blocks=1, quantizer=q, model=model)).eval()


@pytest.mark.parametrize("name", list(FAMILY))
def test_figures_of_every_model(name):
    model = family_member(name)
    figures = evaluate_autoencoder(model, torch.rand(6, 1, 28, 28), batch_size=4, train_images=torch.rand(5, 1, 28, 28))
    keys = {"psnr", "ssim", "mse", "images"}
    discrete = {"perplexity", "codes_used", "uniform_bits_per_dim", "decoder_log_scale"}
    expected = {"ae": keys, "vae": keys | {"elbo_bits_per_dim", "kl_bits_per_dim", "nll_bits_per_dim",
                                           "decoder_log_scale"},
                "vqvae2": keys | discrete | {"top_perplexity", "top_codes_used"}}.get(name, keys | discrete)
    assert set(figures) == expected
    if model.discrete:
        assert 1 <= figures["perplexity"] <= 16 and 0 < figures["codes_used"] <= 1


def test_uniform_bits_are_log2_k_per_code_of_every_grid():
    # 28x28 at downsample 4: a 7x7 grid (a 4x4 top grid for the VQ-VAE-2), K = 16: 4 bits per code
    expected = {"vqvae": 49 * 4, "fsq": 49 * 4, "dvae": 49 * 4, "rvq": 3 * 49 * 4, "vqvae2": (49 + 16) * 4}
    for name, bits in expected.items():
        assert uniform_bits_per_image(family_member(name), (28, 28)) == pytest.approx(bits)
    assert uniform_bits_per_image(family_member("vqvae"), (30, 26)) == pytest.approx(8 * 7 * 4)


def test_the_uniform_bound_adds_the_codes_bits_to_the_pixel_bits():
    from vqvae.metrics import discretized_gaussian_nll_bits

    model, x, train = family_member("vqvae"), torch.rand(4, 1, 28, 28), torch.rand(6, 1, 28, 28)
    figures = bits_figures(model, train, x)
    pixel_bits = discretized_gaussian_nll_bits(x, model.reconstruct(x), figures["decoder_log_scale"])
    assert figures["uniform_bits_per_dim"] == pytest.approx(float((pixel_bits + 49 * 4).mean()) / 784, rel=1e-9)


def test_vae_kl_figure_is_the_closed_form_on_a_hand_example(monkeypatch):
    model = family_member("vae")
    x = torch.rand(3, 1, 28, 28)
    # posterior N(0.5, 2) at each of the D x 7 x 7 = 196 latents:
    # KL = 1/2 (mean^2 + var - 1 - log var) = 1/2 (0.25 + 2 - 1 - ln 2) nats per latent
    mean, logvar = torch.full((3, 4, 7, 7), 0.5), torch.full((3, 4, 7, 7), math.log(2))
    monkeypatch.setattr(model, "posterior", lambda images: (mean, logvar))
    figures = bits_figures(model, x, x)
    kl_nats = 196 * 0.5 * (0.25 + 2 - 1 - math.log(2))
    # the model's KL is a float32 sum of 196 terms: exact to float32's relative precision (~1e-7 per term)
    assert figures["kl_bits_per_dim"] == pytest.approx(kl_nats / math.log(2) / 784, rel=1e-6)
    assert figures["elbo_bits_per_dim"] == pytest.approx(figures["nll_bits_per_dim"] + figures["kl_bits_per_dim"])
    # the ELBO is VAE.elbo_bits_per_dim's, draws seeded the same way
    generator = torch.Generator().manual_seed(0)
    direct = model.elbo_bits_per_dim(x, samples=4, generator=generator)
    assert figures["elbo_bits_per_dim"] == pytest.approx(float(direct.mean()), rel=1e-9)


def test_encode_dataset_refuses_models_without_codes():
    from vqvae.errors import RunError

    for name in ("ae", "vae"):
        with pytest.raises(RunError, match="continuous latents"):
            encode_dataset(family_member(name), torch.rand(2, 1, 28, 28))
    assert encode_dataset(family_member("rvq"), torch.rand(2, 1, 28, 28)).shape == (2, 3, 7, 7)
    # a VQ-VAE-2's codes are one sequence: the top grid, then the bottom one
    two, x = family_member("vqvae2"), torch.rand(2, 1, 28, 28)
    encoded = two.encode(x)
    expected = torch.cat([encoded.top.flatten(1), encoded.bottom.flatten(1)], 1)
    assert torch.equal(encode_dataset(two, x).long(), expected) and expected.shape == (2, 16 + 49)


# -- residual VQ and class-conditional samples ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_rvq_run(tmp_path_factory):
    """A 20-step residual-VQ run (3 stages of 7x7 codes) with a 10-step staged prior, on 400 unlabeled
    digits (40 held out: the integer prior's figures stay cheap)."""
    from dataclasses import replace

    import numpy as np
    from rich.console import Console

    from conftest import TINY_MODEL, TINY_PRIOR
    from vqvae.config import TrainConfig
    from vqvae.data import load_dataset
    from vqvae.prior_training import train_prior
    from vqvae.train import train_autoencoder

    path, quiet = tmp_path_factory.mktemp("tiny_rvq"), Console(quiet=True)
    digits = path / "digits.npy"
    np.save(digits, (load_dataset("mnist").train[:400, 0] * 255).round().to(torch.uint8).numpy())
    cfg = replace(TINY_MODEL, quantizer=replace(TINY_MODEL.quantizer, kind="rvq", stages=3))
    train_autoencoder(cfg, TrainConfig(data=f"npy:{digits}", steps=20, batch_size=16, log_every=10), path / "run",
                      show_progress=False, console=quiet)
    train_prior(path / "run", TINY_PRIOR, TrainConfig(data="codes", steps=10, batch_size=16, warmup_steps=2),
                shifts=0, show_progress=False, console=quiet)
    return path / "run"


def test_evaluate_run_gives_a_staged_prior_its_figures(tiny_rvq_run):
    run = Run(tiny_rvq_run)
    prior = run.prior()
    assert prior.cfg.stages == 3 and prior.code_shape == (3, 7, 7)
    figures = evaluate_run(run)
    assert {"nll_bits_per_latent", "uniform_bits_per_latent", "integer_bits_per_latent", "bits_per_dim"} <= set(figures)
    assert "sample_class_accuracy" not in figures  # an unconditional prior: no class figures
    codes = encode_dataset(run.model(), run.dataset().test)
    # bits per latent: the prior's bits of the test codes over all S * L = 147 latents of an image
    assert figures["nll_bits_per_latent"] == pytest.approx(float(prior_bits(prior, codes.long()).mean()) / 147)


def test_class_sample_figures_of_a_conditional_prior(tiny_run, tiny_figures):
    from vqvae.evaluate import class_accuracy, train_classifier

    run, figures = Run(tiny_run), tiny_figures
    keys = ("sample_class_accuracy", "real_class_accuracy", "sample_class_ratio")
    assert all(k in figures for k in keys) and figures["class_samples"] == 30
    assert 0 <= figures["sample_class_accuracy"] <= 1 and 0 <= figures["real_class_accuracy"] <= 1
    assert figures["sample_class_ratio"] == pytest.approx(figures["sample_class_accuracy"]
                                                          / figures["real_class_accuracy"])
    per_class = figures["sample_class_accuracy_per_class"]
    assert len(per_class) == 10 and all(a in (0, 0.3333, 0.6667, 1) for a in per_class)  # k of 3, 4 decimals
    # 3 samples of every class: the overall accuracy is the mean of the per-class ones
    assert figures["sample_class_accuracy"] == pytest.approx(sum(per_class) / 10, abs=1e-4)
    real = figures["real_class_accuracy_per_class"]
    worst = min(a / r for a, r in zip(per_class, real) if r)
    assert figures["sample_class_ratio_min"] == pytest.approx(worst, abs=1e-3)
    assert (figures["class_temperature"], figures["class_guidance"]) == (1.0, 1.0)
    # the real accuracy is the share of held-out digits whose argmax is their label, counted here
    data = run.dataset()
    classifier = train_classifier(data.train, data.train_labels, 10)  # same seed: the same classifier
    right = int((classifier(data.test).argmax(1) == data.test_labels).sum())
    assert figures["real_class_accuracy"] == right / len(data.test)
    assert figures["real_class_accuracy_per_class"][3] == pytest.approx(
        int(((classifier(data.test).argmax(1) == 3) & (data.test_labels == 3)).sum()) / int((data.test_labels == 3).sum()),
        abs=1e-4)
    with pytest.raises(ConfigError, match="samples_per_class"):
        evaluate_run(run, samples_per_class=-1)
    assert class_accuracy(classifier, data.test[:4], data.test_labels[:4], 10)[0] in {0, 0.25, 0.5, 0.75, 1}


def test_class_accuracy_counts_by_hand():
    from vqvae.evaluate import class_accuracy

    class Lookup(torch.nn.Module):  # predicts the class written in the image's first pixel
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 3).float()

    predicted, labels = torch.tensor([0, 1, 2, 2, 1, 0]), torch.tensor([0, 1, 1, 2, 2, 0])
    images = predicted.float().view(6, 1, 1, 1).expand(6, 1, 2, 2)
    overall, per_class = class_accuracy(Lookup(), images, labels, 3, batch_size=4)
    assert overall == 4 / 6 and per_class == [1.0, 0.5, 0.5]


def test_integer_figures_skip_only_classes_that_cannot_matter(tiny_run):
    """With the float prior, the integer model scores only the classes within SKIP_CLASS_BITS of an image's
    best one; the marginal bits are those of scoring every class."""
    from vqvae.evaluate import integer_prior_figures

    run = Run(tiny_run)
    iprior, prior = run.integer_prior(), run.prior()
    codes = encode_dataset(run.model(), run.dataset().test[:60])
    scored = []
    bits = iprior.bits
    iprior.bits = lambda z, cond=None: scored.append(len(z)) or bits(z, cond)
    try:
        every = integer_prior_figures(iprior, codes)["integer_bits_per_latent"]
        assert sum(scored) == 10 * 60
        scored.clear()
        pruned = integer_prior_figures(iprior, codes, prior)["integer_bits_per_latent"]
    finally:
        del iprior.bits
    assert pruned == pytest.approx(every, rel=0, abs=1e-6 / 49)  # < 1e-6 bits per image of 49 latents
    assert 60 <= sum(scored) <= 10 * 60  # every image keeps at least its best class
