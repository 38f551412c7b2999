"""Tests for vqvae.models: every member of the family on the same footing (shapes, a short run lowers the
loss, save/load gives identical outputs), rebuilt from its config; old configs load as the VQ-VAE."""

import json
from pathlib import Path

import pytest
import torch

from vqvae.autoencoders import DVAE, VQVAE, Autoencoder
from vqvae.config import ModelConfig, QuantizerConfig, to_dict
from vqvae.continuous import AE, VAE
from vqvae.errors import RunError
from vqvae.hierarchical import VQVAE2
from vqvae.models import MODEL_CLASSES, build_model, load_model

QUANTIZERS = {
    "vq": dict(kind="vq"),
    "ema": dict(kind="ema"),
    "fsq": dict(kind="fsq", levels=(4, 4), code_dim=2, codebook_size=16),
    "rvq": dict(kind="rvq", stages=3),
    "gumbel": dict(kind="gumbel"),
}
VARIANTS = [("vqvae", "vq", VQVAE), ("vqvae", "ema", VQVAE), ("vqvae", "fsq", VQVAE), ("vqvae", "rvq", VQVAE),
            ("dvae", "gumbel", DVAE), ("vqvae2", "ema", VQVAE2), ("ae", "ema", AE), ("vae", "ema", VAE)]
IDS = [f"{m}-{k}" for m, k, _ in VARIANTS]


def tiny(model, kind, dims=2):
    q = QuantizerConfig(**{"codebook_size": 16, "code_dim": 4, "kmeans_init": False, "dead_code_steps": 0,
                           **QUANTIZERS[kind]})
    return ModelConfig(hidden=8, res_hidden=4, res_blocks=1, dims=dims, quantizer=q, model=model)


def code_shapes(codes):
    if codes is None:
        return None
    return tuple(tuple(c.shape) for c in codes) if isinstance(codes, tuple) else tuple(codes.shape)


@pytest.mark.parametrize("model,kind,cls", VARIANTS, ids=IDS)
@pytest.mark.parametrize("dims,size", [(2, (28, 28)), (2, (17, 9)), (1, (40,))])
def test_shapes(model, kind, cls, dims, size):
    torch.manual_seed(0)
    net = build_model(tiny(model, kind, dims))
    assert type(net) is cls and isinstance(net, Autoencoder) and net.discrete == (model not in ("ae", "vae"))
    x = torch.rand(2, 1, *size)
    out = net(x)
    assert out.x_hat.shape == x.shape and out.loss.dim() == 0 and "mse" in out.metrics
    assert all(not v.requires_grad and v.dim() == 0 for v in out.metrics.values())
    grid = net.code_shape(size)
    expected = {"vqvae": (2, *grid), "dvae": (2, *grid), "ae": None, "vae": None,
                "vqvae2": ((2, *(-(-g // 2) for g in grid)), (2, *grid))}[model]
    if kind == "rvq":
        expected = (2, 3, *grid)
    assert code_shapes(out.codes) == expected
    net.eval()
    assert net.reconstruct(x).shape == x.shape


@pytest.mark.parametrize("model,kind,cls", VARIANTS, ids=IDS)
def test_short_training_lowers_the_loss(model, kind, cls):
    torch.manual_seed(0)
    net = build_model(tiny(model, kind))
    x = torch.zeros(16, 1, 16, 16)
    x[:8, :, 4:12, 4:12] = 1.0  # two kinds of image: blank, and a centred square
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses, mses = [], []
    steps = 120
    for step in range(steps):
        net.set_progress(step / steps)
        out = net(x)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
        mses.append(float(out.metrics["mse"]))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    assert sum(mses[-10:]) < 0.5 * sum(mses[:10])  # and the reconstructions improve with it


@pytest.mark.parametrize("model,kind,cls", VARIANTS, ids=IDS)
def test_save_load_gives_identical_outputs(tmp_path, model, kind, cls):
    torch.manual_seed(0)
    net = build_model(tiny(model, kind))
    net.train()
    net(torch.rand(8, 1, 28, 28)).loss.backward()  # moves EMA buffers
    net.eval()
    net.save_pretrained(tmp_path, extra={"data": {"uri": "mnist"}})
    torch.manual_seed(1)  # a different random initialisation before the weights are loaded
    loaded = load_model(tmp_path)
    assert type(loaded) is cls and loaded.cfg == net.cfg and not loaded.training
    x = torch.rand(4, 1, 28, 28)
    a, b = net(x), loaded(x)
    assert torch.equal(a.x_hat, b.x_hat) and torch.equal(a.loss, b.loss)
    if model != "ae" and model != "vae":
        assert code_shapes(a.codes) == code_shapes(b.codes)
        for ca, cb in zip(*(c if isinstance(c, tuple) else (c,) for c in (a.codes, b.codes))):
            assert torch.equal(ca, cb)
    assert torch.equal(net.reconstruct(x), loaded.reconstruct(x))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["model"] == model and config["data"]["uri"] == "mnist"
    assert cls.from_pretrained(tmp_path).cfg == net.cfg  # each class loads its own kind


def test_a_class_refuses_another_kind_of_model(tmp_path):
    VAE(tiny("vae", "ema")).save_pretrained(tmp_path / "vae")
    with pytest.raises(RunError, match=r"holds a 'vae' model, not a VQVAE; load it with vqvae.models.load_model"):
        VQVAE.from_pretrained(tmp_path / "vae")
    VQVAE2(tiny("vqvae2", "ema")).save_pretrained(tmp_path / "vqvae2")
    with pytest.raises(RunError, match="holds a 'vqvae2' model"):
        VQVAE.from_pretrained(tmp_path / "vqvae2")
    # a dVAE is a VQ-VAE with another quantizer: code grids, encode and decode alike
    DVAE(tiny("dvae", "gumbel")).save_pretrained(tmp_path / "dvae")
    assert type(VQVAE.from_pretrained(tmp_path / "dvae")) is DVAE


FIXTURE_MODEL = Path(__file__).parent / "fixtures" / "model"  # written before the family existed


def test_an_old_run_loads_as_the_vqvae_it_was():
    """A config.json and weights written before the family existed (no `model`, no levels/stages/...
    fields) rebuild the same VQ-VAE through every loader, with its weights under their old names."""
    old = json.loads((FIXTURE_MODEL / "config.json").read_text())["model"]
    assert "model" not in old and "levels" not in old["quantizer"]
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    results = []
    for loader in (load_model, VQVAE.from_pretrained, Autoencoder.from_pretrained):
        loaded = loader(FIXTURE_MODEL)  # load_state_dict is strict: every saved name is a parameter here
        assert type(loaded) is VQVAE and loaded.cfg.model == "vqvae" and loaded.cfg.quantizer.kind == "ema"
        assert loaded.cfg == ModelConfig(**{**old, "quantizer": QuantizerConfig(**old["quantizer"])})
        results.append(loaded.encode(x).codes)
    assert all(torch.equal(r, results[0]) for r in results)


def test_every_model_name_has_a_class_and_the_registry_matches_the_config():
    from vqvae.config import MODEL_KINDS

    assert set(MODEL_CLASSES) == set(MODEL_KINDS)
    for name, cls in MODEL_CLASSES.items():
        kind = "gumbel" if name == "dvae" else "ema"
        assert type(build_model(tiny(name, kind))) is cls
        assert to_dict(tiny(name, kind))["model"] == name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model,kind,cls", VARIANTS, ids=IDS)
def test_every_variant_runs_on_cuda(model, kind, cls):
    torch.manual_seed(0)
    net = build_model(tiny(model, kind)).cuda()
    x = torch.rand(4, 1, 29, 27, device="cuda")
    net(x).loss.backward()
    net.eval()
    x_hat = net.reconstruct(x)
    assert x_hat.device == x.device and x_hat.shape == x.shape and torch.isfinite(x_hat).all()
    if model == "vae":  # a CPU generator draws reproducibly for a CUDA model
        a = net.elbo_bits_per_dim(x, generator=torch.Generator().manual_seed(0))
        assert torch.equal(a, net.elbo_bits_per_dim(x, generator=torch.Generator().manual_seed(0)))
        assert net.sample(2, (28, 28), generator=torch.Generator().manual_seed(0)).is_cuda
