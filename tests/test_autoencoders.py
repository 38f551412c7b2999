import json

import pytest
import torch

from vqvae.autoencoders import VQVAE
from vqvae.config import ModelConfig, QuantizerConfig
from vqvae.errors import ConfigError, RunError
from vqvae.metrics import psnr, ssim


def tiny(dims=2, kind="ema", downsample=4, channels=1):
    q = QuantizerConfig(codebook_size=16, code_dim=4, kind=kind, kmeans_init=False, dead_code_steps=0)
    return ModelConfig(in_channels=channels, hidden=8, res_hidden=4, res_blocks=1, downsample=downsample,
                       dims=dims, quantizer=q)


@pytest.mark.parametrize("downsample", [1, 2, 4, 8])
def test_shapes_2d(downsample):
    model = VQVAE(tiny(downsample=downsample, channels=3))
    x = torch.rand(2, 3, 16, 24)
    out = model(x)
    assert out.x_hat.shape == x.shape
    assert out.codes.shape == (2, 16 // downsample, 24 // downsample)
    assert model.encode(x).shape == out.codes.shape
    assert model.decode(out.codes).shape == x.shape


def test_shapes_1d():
    model = VQVAE(tiny(dims=1))
    x = torch.rand(2, 1, 64)
    out = model(x)
    assert out.x_hat.shape == x.shape and out.codes.shape == (2, 16)


def test_bad_input_sizes_are_named():
    model = VQVAE(tiny())
    with pytest.raises(ValueError, match="multiple of downsample=4"):
        model(torch.rand(1, 1, 30, 28))
    with pytest.raises(ValueError, match="expected input"):
        model(torch.rand(1, 3, 28, 28))


def test_decode_of_encode_equals_forward_reconstruction():
    torch.manual_seed(0)
    model = VQVAE(tiny()).eval()
    x = torch.rand(3, 1, 28, 28)
    out = model(x)
    assert torch.allclose(model.decode(model.encode(x)), out.x_hat, atol=1e-6)


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
    assert torch.equal(model.encode(x), loaded.encode(x))
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


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="downsample must be a power of 2"):
        ModelConfig(downsample=3)
    with pytest.raises(ConfigError, match="codebook_size"):
        QuantizerConfig(codebook_size=1)
    with pytest.raises(ConfigError, match="quantizer kind"):
        QuantizerConfig(kind="gumbel")


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


def test_psnr_and_ssim_reference_values():
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = (x + 0.1).clamp(0, 1)
    mse = (x - y).pow(2).flatten(1).mean(1)
    assert torch.allclose(psnr(x, y), -10 * torch.log10(mse))
    assert torch.allclose(ssim(x, x), torch.ones(2))
    from skimage.metrics import structural_similarity

    for i in range(2):
        reference = structural_similarity(x[i, 0].double().numpy(), y[i, 0].double().numpy(), data_range=1.0,
                                          gaussian_weights=True, sigma=1.5, use_sample_covariance=True, win_size=7)
        assert abs(float(ssim(x[i:i + 1], y[i:i + 1])) - reference) < 2e-3
