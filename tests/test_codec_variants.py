"""The codec for every discrete member of the family: residual VQ (stages, operating points), FSQ, dVAE,
VQ-VAE-2 (top and bottom grids as one sequence)."""

import pytest
import torch

from codec_support import blobs, same_pixels
from vqvae.autoencoders import DVAE, VQVAE
from vqvae.codec import compress, decompress, decompress_codes, read_header
from vqvae.codec.container import STAGES_VERSION, VERSION
from vqvae.config import ModelConfig, PriorConfig, QuantizerConfig
from vqvae.errors import CodecError
from vqvae.hierarchical import VQVAE2
from vqvae.integer_priors import IntegerPrior
from vqvae.priors import TransformerPrior

K, STAGES = 16, 3
VARIANTS = {
    "rvq": dict(kind="rvq", stages=STAGES, codebook_size=K, code_dim=4),
    "fsq": dict(kind="fsq", levels=(4, 4), code_dim=2, codebook_size=K),
    "gumbel": dict(kind="gumbel", codebook_size=K, code_dim=4),
}


def tiny_variant(kind, seed=0):
    """A tiny model of a variant after one training-mode pass (k-means-initialised codebooks use many codes)."""
    torch.manual_seed(seed)
    q = QuantizerConfig(kmeans_init=True, dead_code_steps=0, **VARIANTS[kind])
    cfg = ModelConfig(hidden=8, res_hidden=4, res_blocks=1, quantizer=q, model="dvae" if kind == "gumbel" else "vqvae")
    model = (DVAE if kind == "gumbel" else VQVAE)(cfg)
    with torch.no_grad():
        model.train()(torch.stack(blobs(16)))
    return model.eval()


def tiny_iprior(stages=0, seed=1):
    torch.manual_seed(seed)
    prior = TransformerPrior(PriorConfig(codebook_size=K, grid=(7, 7), stages=stages, n_layer=1, n_head=2, n_embd=16))
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, K, (128, *prior.code_shape), generator=g)
    return IntegerPrior.from_prior(prior.eval(), codes)


@pytest.fixture(scope="module")
def rvq():
    return tiny_variant("rvq"), tiny_iprior(STAGES)


IMAGES = blobs(2) + blobs(1, size=(30, 17), seed=3)  # one tile each, and a grid of 2 x 1 tiles with filler


@pytest.mark.parametrize("stages", [None, 1, 2, 3])
def test_residual_vq_files_decode_to_the_first_stages_reconstruction(one_thread, rvq, stages):
    model, iprior = rvq
    data, stats = compress(model, iprior, IMAGES, stages=stages)
    s = stages or STAGES
    header = read_header(data)
    assert (header.version, header.stages, stats["stages"]) == (STAGES_VERSION, s, s)
    decoded_codes, images = decompress_codes(model, iprior, data), decompress(model, iprior, data)
    for x, codes, coded, y in zip(IMAGES, decoded_codes, stats["codes"], images):
        with torch.no_grad():
            all_stages = model.encode(x[None]).codes[0]  # (Q, h, w), independent of the codec
            reference = model.decode(all_stages[None, :s], x.shape[1:])[0]  # the s-stage reconstruction
        assert torch.equal(codes, all_stages[:s]) and torch.equal(coded, all_stages[:s])
        assert y.shape == x.shape and same_pixels(y, reference)


def test_more_stages_cost_more_bits_and_fewer_stages_are_a_prefix(one_thread, rvq):
    model, iprior = rvq
    stats = [compress(model, iprior, IMAGES, stages=s)[1] for s in range(1, STAGES + 1)]
    bits = [st["cross_entropy_bits"] for st in stats]
    assert bits[0] < bits[1] < bits[2]
    # the first s stages' bits are the same whichever file holds them: one prior, a prefix of its sequence
    codes = torch.stack([c for c in stats[-1]["codes"][:2]])  # (2, S, 7, 7): the two 28x28 images
    per_position = iprior.frequencies(codes).gather(-1, codes.flatten(1)[..., None])[..., 0]  # (2, S * 49)
    one_stage = compress(model, iprior, IMAGES[:2], stages=1)[1]["cross_entropy_bits"]
    assert one_stage == pytest.approx(float((24 - torch.log2(per_position[:, :49].double())).sum()), rel=1e-12)


def test_residual_vq_huffman_round_trips(one_thread, rvq):
    model, _ = rvq
    counts = torch.ones(K, dtype=torch.long)
    data, stats = compress(model, None, IMAGES, coder="huffman", code_counts=counts, stages=2)
    assert read_header(data).stages == 2
    for coded, codes in zip(stats["codes"], decompress_codes(model, None, data, code_counts=counts)):
        assert torch.equal(coded, codes) and codes.shape[0] == 2


@pytest.mark.parametrize("kind", ["fsq", "gumbel"])
def test_single_grid_variants_round_trip(one_thread, kind):
    model, iprior = tiny_variant(kind), tiny_iprior()
    data, stats = compress(model, iprior, IMAGES)
    header = read_header(data)
    assert (header.version, header.stages) == (VERSION, 0)
    for x, coded, codes, y in zip(IMAGES, stats["codes"], decompress_codes(model, iprior, data),
                                  decompress(model, iprior, data)):
        with torch.no_grad():
            encoded = model.encode(x[None])
            reference = model.decode(encoded)[0]
        assert torch.equal(codes, encoded.codes[0]) and torch.equal(coded, codes)
        assert same_pixels(y, reference)


def test_stage_errors(one_thread, rvq):
    model, iprior = rvq
    for bad in (0, STAGES + 1, 1.5, True):
        with pytest.raises(CodecError, match="stages must be an integer in 1..3"):
            compress(model, iprior, IMAGES[:1], stages=bad)
    with pytest.raises(CodecError, match="no stages"):
        compress(tiny_variant("fsq"), tiny_iprior(), IMAGES[:1], stages=1)
    with pytest.raises(CodecError, match="prior models 0 residual-VQ stages, the model's codes have 3"):
        compress(model, tiny_iprior(), IMAGES[:1])
    data, _ = compress(model, iprior, IMAGES[:1], stages=2)
    with pytest.raises(CodecError, match="another model"):  # a model without stages: never a wrong image
        decompress(tiny_variant("fsq"), iprior, data)


def tiny_vqvae2(kind="ema", **quantizer):
    torch.manual_seed(0)
    q = QuantizerConfig(codebook_size=K, code_dim=4, kind=kind, kmeans_init=True, dead_code_steps=0, **quantizer)
    model = VQVAE2(ModelConfig(hidden=8, res_hidden=4, res_blocks=1, quantizer=q, model="vqvae2"))
    with torch.no_grad():
        model.train()(torch.stack(blobs(16)))
    return model.eval()


def tiny_levels_iprior(levels=((4, 4), (7, 7)), num_classes=0, seed=1):
    torch.manual_seed(seed)
    cfg = PriorConfig(codebook_size=K, grid=(sum(h * w for h, w in levels),), levels=levels, num_classes=num_classes,
                      n_layer=1, n_head=2, n_embd=16)
    prior = TransformerPrior(cfg).eval()
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, K, (128, *prior.code_shape), generator=g)
    cond = torch.randint(0, num_classes, (128,), generator=g) if num_classes else None
    return IntegerPrior.from_prior(prior, codes, cond)


@pytest.mark.parametrize("num_classes", [0, 3])
def test_vqvae2_files_hold_both_grids_and_decode_to_the_reconstruction(one_thread, num_classes):
    model, iprior = tiny_vqvae2(), tiny_levels_iprior(num_classes=num_classes)
    images = blobs(3) + blobs(1, size=(27, 25), seed=4)  # 27x25 has the 28x28 grids: 7x7 bottom, 4x4 top
    data, stats = compress(model, iprior, images)
    assert read_header(data).version == VERSION
    for x, coded, codes, y in zip(images, stats["codes"], decompress_codes(model, iprior, data),
                                  decompress(model, iprior, data)):
        with torch.no_grad():
            encoded = model.encode(x[None])  # independent of the codec
            reference = model.decode(encoded)[0]
        expected = torch.cat([encoded.top[0].flatten(), encoded.bottom[0].flatten()])  # top first
        assert torch.equal(codes, expected) and torch.equal(coded, expected)
        assert y.shape == x.shape and same_pixels(y, reference)
    # the bits are those of the integer prior over the whole sequence, top then bottom
    if not num_classes:
        seq = torch.stack(stats["codes"])  # (4, 65)
        freq = iprior.frequencies(seq).gather(-1, seq[..., None])[..., 0]
        assert stats["cross_entropy_bits"] == pytest.approx(float((24 - torch.log2(freq.double())).sum()), rel=1e-12)


def test_vqvae2_files_refuse_other_grids_and_priors(one_thread):
    model, iprior = tiny_vqvae2(), tiny_levels_iprior()
    with pytest.raises(CodecError, match=r"image 0 is 32x32: its code grids \(\(4, 4\), \(8, 8\)\)"):
        compress(model, iprior, blobs(1, size=(32, 32)))
    with pytest.raises(CodecError, match="VQ-VAE-2 needs a prior over its top and bottom codes"):
        compress(model, tiny_iprior(), IMAGES[:1])
    with pytest.raises(CodecError, match="prior models a VQ-VAE-2's two code grids"):
        compress(tiny_variant("fsq"), iprior, IMAGES[:1])
    rvq2 = tiny_vqvae2("rvq", stages=2)
    with pytest.raises(CodecError, match="with residual-VQ quantizers"):
        compress(rvq2, iprior, IMAGES[:1])
