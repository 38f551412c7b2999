import json
import math

import pytest
import torch

from vqvae.autoencoders import DVAE, VQVAE, crop, gumbel_schedule, pad_to_multiple
from vqvae.config import ModelConfig, QuantizerConfig
from vqvae.errors import ConfigError, RunError


def tiny(dims=2, kind="ema", downsample=4, channels=1):
    q = QuantizerConfig(codebook_size=16, code_dim=4, kind=kind, kmeans_init=False, dead_code_steps=0)
    return ModelConfig(in_channels=channels, hidden=8, res_hidden=4, res_blocks=1, downsample=downsample,
                       dims=dims, quantizer=q)


@pytest.mark.parametrize("downsample", [1, 2, 4, 8])
def test_shapes_2d(downsample):
    model = VQVAE(tiny(downsample=downsample, channels=3)).eval()  # eval: forward leaves the codebook alone
    x = torch.rand(2, 3, 16, 24)
    out = model(x)
    assert out.x_hat.shape == x.shape
    assert out.codes.shape == (2, 16 // downsample, 24 // downsample)
    encoded = model.encode(x)
    assert torch.equal(encoded.codes, out.codes) and encoded.size == (16, 24)
    assert model.decode(encoded).shape == x.shape and model.decode(out.codes).shape == x.shape


def test_shapes_1d():
    model = VQVAE(tiny(dims=1))
    x = torch.rand(2, 1, 64)
    out = model(x)
    assert out.x_hat.shape == x.shape and out.codes.shape == (2, 16)


@pytest.mark.parametrize("h,w,factor", [(29, 31, 4), (28, 28, 4), (1, 5, 8), (32, 17, 2), (7, 9, 1)])
def test_pad_to_multiple_and_crop(h, w, factor):
    x = torch.rand(2, 3, h, w)
    padded = pad_to_multiple(x, factor)
    ph, pw = padded.shape[2] - h, padded.shape[3] - w
    assert padded.shape[2] % factor == 0 and padded.shape[3] % factor == 0 and 0 <= ph < factor and 0 <= pw < factor
    assert torch.equal(padded[:, :, :h, :w], x)
    # edge replicate: padded rows/columns repeat the last real row/column
    assert torch.equal(padded[:, :, h:, :w], x[:, :, -1:, :].expand(-1, -1, ph, -1))
    assert torch.equal(padded[:, :, :h, w:], x[:, :, :, -1:].expand(-1, -1, -1, pw))
    assert torch.equal(crop(padded, (h, w)), x)


@pytest.mark.parametrize("dims,size", [(2, (29, 31)), (2, (1, 5)), (2, (25, 25)), (1, (61,))])
def test_any_input_size_round_trips_to_its_size(dims, size):
    """The model pads internally: the codes of an odd-sized input are those of its edge-padded copy,
    and decode crops back to the input's size."""
    torch.manual_seed(0)
    model = VQVAE(tiny(dims=dims)).eval()
    x = torch.rand(2, 1, *size)
    encoded = model.encode(x)
    assert encoded.size == size and encoded.codes.shape == (2, *model.code_shape(size))
    padded = pad_to_multiple(x, 4)
    assert torch.equal(encoded.codes, model.encode(padded).codes)
    x_hat = model.decode(encoded)
    assert x_hat.shape == x.shape and not x_hat.requires_grad and 0 <= float(x_hat.min()) <= float(x_hat.max()) <= 1
    assert torch.equal(x_hat, crop(model.decode(encoded.codes), size))
    assert torch.equal(model.decode(encoded.codes, size), x_hat)
    out = model(x)  # training forward also takes any size
    assert out.x_hat.shape == x.shape


def test_bad_inputs_are_named():
    model = VQVAE(tiny())
    with pytest.raises(ValueError, match="expected input"):
        model(torch.rand(1, 3, 28, 28))
    with pytest.raises(ValueError, match="expected input"):
        model.encode(torch.rand(1, 28, 28))
    with pytest.raises(ValueError, match=r"codes must be in 0\.\.15"):
        model.decode(torch.full((1, 7, 7), 16))
    with pytest.raises(ValueError, match="does not fit"):
        model.decode(torch.zeros(1, 7, 7, dtype=torch.long), (40, 28))


def test_decode_of_encode_equals_forward_reconstruction():
    torch.manual_seed(0)
    model = VQVAE(tiny()).eval()
    x = torch.rand(3, 1, 28, 28)
    out = model(x)
    assert torch.allclose(model.decode(model.encode(x)), out.x_hat.clamp(0, 1), atol=1e-6)


@pytest.mark.parametrize("kind", ["vq", "ema"])
def test_save_load_identical_outputs(tmp_path, kind):
    torch.manual_seed(0)
    model = VQVAE(tiny(kind=kind))
    model.train()
    model(torch.rand(8, 1, 28, 28))  # moves EMA buffers
    model.eval()
    model.save_pretrained(tmp_path, extra={"data": {"uri": "mnist"}})
    loaded = VQVAE.from_pretrained(tmp_path)
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(model.encode(x).codes, loaded.encode(x).codes)
    assert torch.equal(model(x).x_hat, loaded(x).x_hat)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["data"]["uri"] == "mnist" and config["model"]["quantizer"]["kind"] == kind
    assert not list(tmp_path.glob("*.tmp"))


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(RunError, match="config.json: missing"):
        VQVAE.from_pretrained(tmp_path)
    VQVAE(tiny()).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(RunError, match="cannot load weights"):
        VQVAE.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model": {"hidden": 8, "colour": "blue"}}))
    with pytest.raises(ConfigError, match="colour"):
        VQVAE.from_pretrained(tmp_path)


def test_short_training_lowers_the_loss():
    torch.manual_seed(0)
    model = VQVAE(tiny(kind="ema"))
    x = torch.zeros(16, 1, 16, 16)
    x[:8, :, 4:12, 4:12] = 1.0  # two kinds of image: blank, and a centred square
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        out = model(x)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
    assert sum(losses[-10:]) / 10 < 0.3 * sum(losses[:10]) / 10


# --- other quantizers in the VQ-VAE, and the dVAE --------------------------------------------------------

def variant(kind, **quantizer):
    q = QuantizerConfig(**{"codebook_size": 16, "code_dim": 4, "kind": kind, "kmeans_init": False,
                           "dead_code_steps": 0, **quantizer})
    return ModelConfig(hidden=8, res_hidden=4, res_blocks=1, quantizer=q, model="dvae" if kind == "gumbel" else "vqvae")


@pytest.mark.parametrize("kind,extra", [("fsq", dict(levels=(4, 4), code_dim=2)), ("rvq", dict(stages=3)),
                                        ("gumbel", {})])
def test_decode_of_encode_equals_forward_for_every_quantizer(kind, extra):
    torch.manual_seed(0)
    model = VQVAE(variant(kind, **extra)).eval() if kind != "gumbel" else DVAE(variant(kind)).eval()
    x = torch.rand(3, 1, 29, 27)
    out, encoded = model(x), model.encode(x)
    assert torch.equal(encoded.codes, out.codes)
    assert torch.allclose(model.decode(encoded), out.x_hat.clamp(0, 1), atol=1e-6)


def test_residual_vq_decodes_from_the_first_stages_and_each_stage_helps():
    torch.manual_seed(0)
    model = VQVAE(variant("rvq", stages=3, kmeans_init=True))
    x = torch.zeros(16, 1, 16, 16)
    x[:8, :, 4:12, 4:12] = 1.0
    x[::3] = torch.rand(6, 1, 16, 16)  # some texture, so that one stage does not suffice
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        out = model(x)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    model.eval()
    encoded = model.encode(x)
    assert encoded.codes.shape == (16, 3, 4, 4)
    errors = []
    for s in (1, 2, 3):
        x_hat = model.decode(encoded.codes[:, :s], (16, 16))
        assert torch.allclose(x_hat, (model.decoder(model.quantizer.lookup(encoded.codes[:, :s])) + 0.5).clamp(0, 1))
        errors.append(float((x_hat - x).pow(2).mean()))
    assert errors[0] > errors[1] > errors[2], errors
    with pytest.raises(ValueError, match=r"expected integer codes \(B, Q, H, W\)"):
        model.decode(encoded.codes[:, 0])
    with pytest.raises(ValueError, match="codes have 4 stages, the quantizer 1 to 3"):
        model.decode(torch.zeros(1, 4, 4, 4, dtype=torch.long))


def test_gumbel_schedule_by_hand():
    q = QuantizerConfig(kind="gumbel", temperature=1.0, temperature_end=1 / 16, kl_weight=0.5, kl_warmup=0.2)
    assert gumbel_schedule(q, 0.0) == (1.0, 0.0)
    t, w = gumbel_schedule(q, 0.5)
    assert math.isclose(t, (1 + 1 / 16) / 2) and w == 0.5  # half way down the cosine; the KL weight at its top
    t, w = gumbel_schedule(q, 0.1)
    assert math.isclose(w, 0.25) and math.isclose(t, 1 / 16 + (15 / 16) * 0.5 * (1 + math.cos(0.1 * math.pi)))
    assert gumbel_schedule(q, 1.0) == (1 / 16, 0.5) and gumbel_schedule(q, 7.0) == (1 / 16, 0.5)
    assert gumbel_schedule(QuantizerConfig(kl_weight=0.3, kl_warmup=0.0), 0.0)[1] == 0.3


def test_dvae_follows_its_schedule_and_encodes_hard_codes():
    torch.manual_seed(0)
    cfg = variant("gumbel", kl_weight=0.4, kl_warmup=0.5)
    model = DVAE(cfg).train()
    assert model.quantizer.temperature == 1.0 and model.quantizer.kl_weight == 0.0  # progress 0
    model.set_progress(0.25)
    t, w = gumbel_schedule(cfg.quantizer, 0.25)
    assert model.quantizer.temperature == t and math.isclose(model.quantizer.kl_weight, w / 16)  # per input dim
    x = torch.rand(2, 1, 28, 28)
    out = model(x)
    assert math.isclose(float(out.metrics["kl_weight"]), w, rel_tol=1e-6)
    assert math.isclose(float(out.metrics["temperature"]), t, rel_tol=1e-6)
    assert math.isclose(float(out.loss.detach()), float(out.metrics["mse"] + w / 16 * out.metrics["kl"]), rel_tol=1e-5)
    logits = model.encoder(x - 0.5)  # (B, K, 7, 7)
    assert logits.shape == (2, 16, 7, 7)
    assert torch.equal(model.encode(x).codes, logits.argmax(1))  # hard codes, also in training mode
    assert model.training and model.quantizer.training  # and the mode is left as it was
