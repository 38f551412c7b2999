"""Tests for vqvae.compare: the family trained side by side at a tiny budget, its table and files."""

import json
import math

import pytest
from PIL import Image
from rich.console import Console

from vqvae.autoencoders import VQVAE
from vqvae.cli import main
from vqvae.compare import (COLUMNS, MODEL_VARIANTS, compare_models, comparison_markdown, comparison_table,
                           variant_config, write_comparison)
from vqvae.config import ModelConfig, QuantizerConfig, TrainConfig
from vqvae.continuous import VAE
from vqvae.errors import ConfigError, RunError
from vqvae.run import Run

TINY = ModelConfig(hidden=8, res_hidden=4, res_blocks=1, quantizer=QuantizerConfig(codebook_size=16, code_dim=4))
QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    rows = compare_models("mnist", ["vae", "vqvae", "rvq"], out, steps=10, base=TINY,
                          train=TrainConfig(batch_size=16, log_every=5), console=QUIET, show_progress=False)
    return out, rows


def test_every_variant_is_a_valid_config_on_the_base():
    for name, (model, fields) in MODEL_VARIANTS.items():
        cfg = variant_config(name, TINY)
        assert cfg.model == model and cfg.hidden == TINY.hidden
        assert all(getattr(cfg.quantizer, k) == v for k, v in fields.items())
    assert variant_config("fsq").quantizer.codebook_size == math.prod(MODEL_VARIANTS["fsq"][1]["levels"])
    with pytest.raises(ConfigError, match="unknown model 'gan'"):
        variant_config("gan")


def test_rows_hold_each_models_figures(compared):
    out, rows = compared
    assert [r["model"] for r in rows] == ["vae", "vqvae", "rvq"]
    vae, vq, rvq = rows
    # the VAE: an ELBO and no codes; discrete models: codes and uniform-prior bits; a prior only on one grid
    assert {"elbo_bits_per_dim", "kl_bits_per_dim"} <= set(vae) and "perplexity" not in vae
    assert {"uniform_bits_per_dim", "perplexity", "codes_used"} <= set(vq) and "vqz_bits_per_image" not in vq
    assert "uniform_bits_per_dim" in rvq and "perplexity" in rvq
    assert vae["elbo_bits_per_dim"] == pytest.approx(vae["kl_bits_per_dim"] + vae["nll_bits_per_dim"])
    # the uniform prior's bits are a floor of the bound: 49 positions x log2 16, twice with 2 stages
    assert vq["uniform_bits_per_dim"] > 49 * 4 / 784 and rvq["uniform_bits_per_dim"] > 2 * 49 * 4 / 784
    assert all(r["train_seconds"] > 0 for r in rows)
    assert isinstance(Run(out / "vae").model(), VAE) and isinstance(Run(out / "rvq").model(), VQVAE)
    assert Run(out / "rvq").model().cfg.quantizer.stages == 2


def test_a_prior_gives_learned_bits_and_vqz_files_to_models_with_codes(tmp_path):
    # 8x8 digits: 2x2 code grids (a 1x1 top grid for the VQ-VAE-2), so the priors and the codec are quick
    rows = compare_models("digits", ["vqvae", "rvq", "vqvae2", "ae"], tmp_path, steps=10, prior_steps=5, base=TINY,
                          train=TrainConfig(batch_size=16, log_every=5), console=QUIET, show_progress=False)
    learned = {"bits_per_dim", "nll_bits_per_latent", "integer_bits_per_latent", "vqz_bits_per_image"}
    for row in rows[:3]:
        assert learned <= set(row) and Run(tmp_path / row["model"]).has_prior()
    assert not learned & set(rows[3]) and not Run(tmp_path / "ae").has_prior()  # continuous latents: no prior
    # a .vqz file of the held-out split: its payload near the prior's bits per image, and far below the
    # uniform prior's positions x log2 16 bits per image plus the whole file's header spread over 180 images
    for row, positions in zip(rows, (4, 2 * 4, 1 + 4)):
        assert 0 < row["vqz_bits_per_image"] < positions * 4 + 8


def test_outputs_agree_with_the_rows(compared, tmp_path):
    _, rows = compared
    paths = write_comparison(rows, tmp_path, {"steps": 10})
    saved = json.loads(paths[0].read_text())
    assert saved["settings"] == {"steps": 10} and [r["model"] for r in saved["rows"]] == ["vae", "vqvae", "rvq"]
    lines = paths[1].read_text().splitlines()
    assert len(lines) == 2 + len(rows) and all(line.count("|") == len(COLUMNS) + 1 for line in lines)
    cells = dict(zip([h for _, h, _ in COLUMNS], [c.strip() for c in lines[2].strip("|").split("|")]))
    assert cells["model"] == "vae" and cells["uniform-prior bits/dim"] == "" and cells["ELBO bits/dim"] != ""
    assert float(cells["PSNR dB"]) == pytest.approx(rows[0]["psnr"], abs=0.005)
    with Image.open(paths[2]) as image:
        assert image.format == "PNG" and image.size[1] > 2 * len(rows) * 18
    assert comparison_table(rows).row_count == len(rows)
    assert comparison_markdown(rows) == paths[1].read_text()


def test_refusals_come_before_any_training(compared, tmp_path):
    out, _ = compared
    with pytest.raises(RunError, match="already holds a run"):
        compare_models("mnist", ["vqvae"], out, steps=1, base=TINY, console=QUIET, show_progress=False)
    with pytest.raises(ConfigError, match="unknown model"):
        compare_models("mnist", ["vqvae", "gan"], tmp_path, steps=1, base=TINY, console=QUIET)
    with pytest.raises(ConfigError, match="distinct"):
        compare_models("mnist", ["ae", "ae"], tmp_path, steps=1, base=TINY, console=QUIET)
    assert not any(tmp_path.iterdir())


def test_the_command_writes_the_table(tmp_path, capsys):
    code = main(["compare", "--steps", "2", "--models", "ae,dvae", "--out", str(tmp_path), "--batch-size", "8"])
    captured = capsys.readouterr()
    assert code == 0 and "dvae" in captured.out and "compare.png" in captured.err
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["ae", "dvae"] and "psnr" in rows[0] and "perplexity" in rows[1]
