"""Shared by the codec tests: tiny models and priors, structured images, round-trip checks, and the fixtures
(registered in conftest.py: one_thread, model, prior, small_file; a test file's own fixture of the same
name takes precedence)."""

import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vqvae.autoencoders import VQVAE
from vqvae.codec import compress
from vqvae.config import ModelConfig, PriorConfig, QuantizerConfig
from vqvae.data import to_uint8
from vqvae.integer_priors import IntegerPrior
from vqvae.priors import PixelCNNPrior, TransformerPrior


K = 16


def tiny_model(seed=0, channels=1):
    """A random tiny VQ-VAE whose codebook is k-means-initialised on a batch of images (one training-mode
    forward pass), so that images use many codes, not the single nearest one of a random codebook."""
    torch.manual_seed(seed)
    q = QuantizerConfig(codebook_size=K, code_dim=4, kmeans_init=True, dead_code_steps=0)
    model = VQVAE(ModelConfig(in_channels=channels, hidden=8, res_hidden=4, res_blocks=1, downsample=4, quantizer=q))
    with torch.no_grad():
        model.train()(torch.cat([torch.rand(8, channels, 28, 28), torch.stack(blobs(8, channels=channels))]))
    return model.eval()


def tiny_prior(seed=1, num_classes=0, arch="transformer"):
    """A random float prior (what version-1 files were coded with, and what integer priors quantize)."""
    torch.manual_seed(seed)
    cfg = PriorConfig(arch=arch, codebook_size=K, grid=(7, 7), num_classes=num_classes, n_layer=1, n_head=2, n_embd=16)
    return (TransformerPrior if arch == "transformer" else PixelCNNPrior)(cfg).eval()


def integer(prior, codes=None):
    """The integer prior of a float prior, calibrated on `codes` ((N, 7, 7); random codes by default)."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, K, (256, 7, 7), generator=g) if codes is None else codes
    Y = prior.cfg.num_classes
    return IntegerPrior.from_prior(prior, codes, torch.randint(0, Y, (len(codes),), generator=g) if Y else None)


def tiny_iprior(seed=1, num_classes=0, arch="transformer"):
    """The integer prior that compresses: `tiny_prior` quantized."""
    return integer(tiny_prior(seed, num_classes, arch))


def blobs(n, size=(28, 28), seed=0, channels=1):
    """Smooth random images (bilinear upsampled 4x4 noise, squashed): structured, unlike pure noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, channels, 4, 4, generator=g) * 3 - 2
    return list(torch.sigmoid(F.interpolate(low, size=size, mode="bilinear", align_corners=False)))


def reference(model, x):
    """Independent of the codec: codes and reconstruction of one image, batch of one (as the codec does:
    float results of other batch groupings may differ in the last bit)."""
    with torch.no_grad():
        encoded = model.encode(x[None])
        return encoded.codes[0], model.decode(encoded)[0]


def reseal(body: bytes) -> bytes:
    return body + zlib.crc32(body).to_bytes(4, "little")


def same_pixels(a, b):
    """Images (C, H, W) equal as 8-bit pixels, what a user gets from a decoded file."""
    return a.shape == b.shape and np.array_equal(to_uint8(a), to_uint8(b))


def assert_round_trip(model, images, out, stats):
    assert len(out) == len(images) == len(stats["codes"])
    for x, y, codes in zip(images, out, stats["codes"]):
        ref_codes, ref_image = reference(model, x)
        assert torch.equal(codes, ref_codes)
        assert y.shape == x.shape and same_pixels(y, ref_image)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and much faster on a loaded machine (no spinning workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def prior():
    return tiny_iprior()


@pytest.fixture(scope="module")
def small_file(model, prior):
    """One 28x28 image, range-coded: the file the corruption tests mutate."""
    data, _ = compress(model, prior, blobs(1, seed=5))
    return data
