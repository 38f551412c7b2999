"""Format compatibility: `.vqz` files written by the version-1 and version-2 writers decode to the same codes and
pixels.

The files, the model and the priors are in tests/fixtures (made by tests/fixtures/make_fixtures.py,
whose docstring explains why their decoding does not depend on the machine's float rounding; the
tests below check those reasons on the machine they run on).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vqvae.autoencoders import VQVAE
from vqvae.codec import PRECISION, decompress, decompress_codes, entropy, fingerprint, huffman, read_header
from vqvae.codec.api import latent_shape
from vqvae.codec.container import Header, counts_fingerprint, seal
from vqvae.data import to_uint8
from vqvae.errors import CodecError
from vqvae.priors import load_prior

FIXTURES = Path(__file__).parent / "fixtures"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
NAMES = sorted(MANIFEST["fixtures"])


@pytest.fixture(scope="module")
def model():
    return VQVAE.from_pretrained(FIXTURES / "model")


def load(name):
    """-> (entry, data, prior or None, counts or None, expected codes, expected pixels)."""
    entry = MANIFEST["fixtures"][name]
    data = (FIXTURES / f"{name}.vqz").read_bytes()
    prior = load_prior(FIXTURES / entry["prior"]) if entry["prior"] else None
    counts = torch.from_numpy(np.load(FIXTURES / entry["counts"])) if entry["counts"] else None
    arrays = np.load(FIXTURES / f"{name}.npz")
    n = len(entry["shapes"])
    codes, pixels = [arrays[f"codes_{i}"] for i in range(n)], [arrays[f"pixels_{i}"] for i in range(n)]
    return entry, data, prior, counts, codes, pixels


def recording(module, method):
    """Wrap module.<method> so each call's (args, result) is appended to the returned list."""
    calls, original = [], getattr(module, method)

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append((args, out))
        return out

    setattr(module, method, wrapper)
    return calls


def test_manifest_lists_every_file():
    on_disk = sorted(p.stem for p in FIXTURES.glob("*.vqz"))
    assert on_disk == NAMES and len(NAMES) == 5
    coders = [MANIFEST["fixtures"][n]["coder"] for n in NAMES]
    assert coders.count("range") == 3 and coders.count("huffman") == 2


@pytest.mark.parametrize("name", NAMES)
def test_header_of_each_fixture(model, name):
    entry, data, prior, counts, _, _ = load(name)
    header = read_header(data)
    assert header.version == 1 and header.integer_model == 0
    assert header.coder == entry["coder"] and len(data) == entry["bytes"]
    assert header.shapes == tuple(tuple(s) for s in entry["shapes"])
    assert header.labels == (None if entry["labels"] is None else tuple(entry["labels"]))
    assert header.model_fingerprint == fingerprint(model)
    if prior is not None:
        assert header.prior_fingerprint == fingerprint(prior)


@pytest.mark.parametrize("name", NAMES)
def test_fixture_decodes_to_its_codes_and_pixels(model, name):
    _, data, prior, counts, codes, pixels = load(name)
    decoded = decompress_codes(model, prior, data, code_counts=counts)
    assert len(decoded) == len(codes) and all(np.array_equal(a.numpy(), b) for a, b in zip(decoded, codes))
    images = decompress(model, prior, data, code_counts=counts)
    assert len(images) == len(codes)
    for image, expected in zip(images, pixels):
        assert image.dtype == torch.float32 and np.array_equal(to_uint8(image), expected)  # 8-bit pixels


def rebuild(model, entry, prior, counts, codes, version: int) -> bytes:
    """The file the writer makes from these codes: header, payload and CRC (the labels as stored)."""
    flat = np.concatenate([c.reshape(-1) for c in codes]).astype(np.int64)
    shapes = tuple(tuple(s) for s in entry["shapes"])
    if prior is None:
        payload, _ = huffman.encode(counts.numpy(), flat)
        second = counts_fingerprint(counts.numpy())
    else:
        source = entropy.frequency_source(prior)  # float prior (version 1) or integer prior (version 2)
        layout = entropy.make_layout([latent_shape(s, model.cfg.downsample) for s in shapes], source.hw)
        labels = None if entry["labels"] is None else np.array(entry["labels"])
        with torch.no_grad():
            payload, _ = entropy.range_encode(source, layout, labels, flat)
        second = fingerprint(prior)
    labels = None if entry["labels"] is None else tuple(entry["labels"])
    return seal(Header(entry["coder"], fingerprint(model), second, shapes, labels, version,
                       entry.get("integer_model", 0)), payload)


@pytest.mark.parametrize("name", NAMES)
def test_fixture_bytes_are_rebuilt_from_its_codes(model, name):
    """The writer side: the same codes give the same bytes, header, payload and CRC (version 1)."""
    entry, data, prior, counts, codes, _ = load(name)
    assert rebuild(model, entry, prior, counts, codes, version=1) == data


@pytest.mark.parametrize("name", NAMES)
def test_fixture_decoder_is_exact(model, name):
    """The decoder's float32 output equals a float64 run: no rounding, so pixels cannot depend on it."""
    *_, codes, _ = load(name)
    double = VQVAE.from_pretrained(FIXTURES / "model").double()
    with torch.no_grad():
        for c in codes:
            c = torch.from_numpy(c)[None]
            assert torch.equal(model.decode(c).double(), double.decode(c))


@pytest.mark.parametrize("name", [n for n in NAMES if MANIFEST["fixtures"][n]["coder"] == "range"])
def test_range_fixture_probabilities_are_far_from_rounding(name):
    """What the range decoder sees cannot change with float rounding: the prior's logits are exact
    (float32 steps equal a float64 full pass) and no frequency floor(p * (2**24 - K)) is within
    MARGIN of flipping, where another libm's exp changes p * (2**24 - K) by < 1e-8."""
    entry, data, prior, _, codes, _ = load(name)
    K = prior.cfg.codebook_size
    steps = recording(prior, "step")
    decompress(VQVAE.from_pretrained(FIXTURES / "model"), prior, data)
    logits = torch.cat([out[0] for _, out in steps]).double().numpy()  # (steps * B, K)
    assert len(logits) >= prior.seq_len

    free = (1 << PRECISION) - K
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scaled = p * free
    distance = np.abs(scaled - np.round(scaled))
    flat = (logits == logits[:, :1]).all(1)  # equal logits: p = 1/K exactly (K a power of two), no rounding
    assert K & (K - 1) == 0 and (scaled[flat] == free // K).all()
    assert (distance[~flat] >= MANIFEST["margin"]).all()

    grids = [torch.from_numpy(c) for c in codes if c.shape == tuple(prior.cfg.grid)]
    grids = torch.stack(grids)
    labels = entry["labels"]
    cond = None if labels is None else torch.tensor([y for y, c in zip(labels, codes) if c.shape == grids.shape[1:]])
    with torch.no_grad():
        single = prior.logits(grids, cond)
        double = load_prior(FIXTURES / entry["prior"]).double().logits(grids, cond)
        assert torch.equal(single.double(), double)
        state, prev = prior.start(len(grids), cond), None  # step by step: the same values
        for t in range(prior.seq_len):
            step_logits, state = prior.step(state, prev)
            assert torch.equal(step_logits, single.flatten(2)[:, :, t])
            prev = grids.flatten(1)[:, t]


def test_version_1_files_need_their_float_prior(model):
    _, data, prior, _, _, _ = load("range_labels")
    from vqvae.integer_priors import IntegerPrior

    iprior = IntegerPrior.from_prior(prior, torch.randint(0, 16, (64, 7, 7)), torch.randint(0, 3, (64,)))
    for wrong, what in ((None, "None"), (iprior, "IntegerPixelCNNPrior")):
        with pytest.raises(CodecError, match=f"version-1 .vqz file was range-coded with a float prior.*got {what}"):
            decompress(model, wrong, data)
    with pytest.raises(CodecError, match="another prior"):
        decompress(model, load_prior(FIXTURES / "prior_bias"), data)


def test_version_1_decoding_mismatch_is_an_error_not_a_wrong_image(model, monkeypatch):
    # What a decoder on another machine could see: logits off by a few ulps (here 1e-6).
    _, data, prior, _, _, _ = load("range_labels")
    original = entropy.quantize_logits
    g = torch.Generator().manual_seed(0)
    monkeypatch.setattr(entropy, "quantize_logits", lambda x: original(x + 1e-6 * torch.randn(x.shape, generator=g)))
    with pytest.raises(CodecError, match="do not account"):
        decompress(model, prior, data)


# --- version 2: integer priors (tests/fixtures/make_fixtures_v2.py) --------------------------------------

V2 = FIXTURES / "v2"
MANIFEST_V2 = json.loads((V2 / "manifest.json").read_text())
NAMES_V2 = sorted(MANIFEST_V2["fixtures"])


def load_v2(name):
    from vqvae.integer_priors import load_integer_prior

    entry = MANIFEST_V2["fixtures"][name]
    data = (V2 / f"{name}.vqz").read_bytes()
    prior = load_integer_prior(V2 / entry["prior"]) if entry["prior"] else None
    counts = torch.from_numpy(np.load(V2 / entry["counts"])) if entry["counts"] else None
    arrays = np.load(V2 / f"{name}.npz")
    n = len(entry["shapes"])
    return entry, data, prior, counts, [arrays[f"codes_{i}"] for i in range(n)], [arrays[f"pixels_{i}"] for i in range(n)]


def test_v2_manifest_lists_every_file():
    assert sorted(p.stem for p in V2.glob("*.vqz")) == NAMES_V2 and len(NAMES_V2) == 3


@pytest.mark.parametrize("name", NAMES_V2)
def test_v2_fixture_decodes_to_its_codes_and_pixels(model, name):
    entry, data, prior, counts, codes, pixels = load_v2(name)
    header = read_header(data)
    assert header.version == 2 and header.coder == entry["coder"] and len(data) == entry["bytes"]
    assert header.integer_model == entry["integer_model"] == (prior.format_id if prior is not None else 0)
    assert header.labels == (None if entry["labels"] is None else tuple(entry["labels"]))
    decoded = decompress_codes(model, prior, data, code_counts=counts)
    assert len(decoded) == len(codes) and all(np.array_equal(a.numpy(), b) for a, b in zip(decoded, codes))
    images = decompress(model, prior, data, code_counts=counts)
    assert all(np.array_equal(to_uint8(image), expected) for image, expected in zip(images, pixels))


@pytest.mark.parametrize("name", NAMES_V2)
def test_v2_fixture_bytes_are_rebuilt_from_its_codes(model, name):
    """The writer side of version 2: the same codes give the same bytes."""
    entry, data, prior, counts, codes, _ = load_v2(name)
    assert rebuild(model, entry, prior, counts, codes, version=2) == data
