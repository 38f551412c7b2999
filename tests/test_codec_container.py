"""Tests for codec/container.py: the header, fingerprints, and every kind of bad, damaged or crafted file."""

import copy
import dataclasses
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vqvae import codec
from vqvae.codec import Header, compress, container, decompress, fingerprint, read_header
from vqvae.config import PriorConfig
from vqvae.errors import CodecError
from vqvae.integer_priors import IntegerPrior
from vqvae.priors import TransformerPrior

from codec_support import K, blobs, reference, reseal, same_pixels, tiny_iprior, tiny_model, tiny_prior

pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures: codec_support.py


# --- header and fingerprints ---------------------------------------------------------------------


def test_header_round_trip_and_size(model, prior):
    images = blobs(1)
    data, stats = compress(model, prior, images)
    header = read_header(data)
    assert header == Header("range", fingerprint(model), fingerprint(prior), ((1, 28, 28),), version=2,
                            integer_model=1)
    assert header.header_bytes == stats["header_bytes"] == 13
    assert header.payload_bytes == stats["payload_bytes"] == len(data) - header.header_bytes - 4
    assert header.to_bytes() == data[: header.header_bytes]
    assert data[:4] == b"VQZ\x02" and data[8] == 0x11  # flags: one shape (0x10), integer model 1
    assert int.from_bytes(data[-4:], "little") == zlib.crc32(data[:-4])
    counts = torch.arange(K)
    huff = compress(model, None, images, coder="huffman", code_counts=counts)[0]
    assert huff[:4] == b"VQZ\x02" and huff[8] == 0x10  # entropy model 0: the Huffman code
    assert read_header(huff) == Header("huffman", fingerprint(model), container.counts_fingerprint(counts.numpy()),
                                       ((1, 28, 28),), version=2, integer_model=0)


def _header(version, coder, integer_model, fps, shapes, uniform, labels, stages):
    shapes = tuple(shapes[:1] * len(shapes)) if uniform else tuple(shapes)
    labels = None if labels is None else tuple((labels * len(shapes))[: len(shapes)])
    integer_model = integer_model if version >= 2 and coder == "range" else 0
    stages = stages if version == container.STAGES_VERSION else 0
    n = container.FINGERPRINT_BYTES
    return Header(coder, fps[:n], fps[n:], shapes, labels, version, integer_model, stages)


headers = st.builds(
    _header, st.sampled_from(container.VERSIONS), st.sampled_from(container.CODERS), st.integers(1, 15),
    st.binary(min_size=2 * container.FINGERPRINT_BYTES, max_size=2 * container.FINGERPRINT_BYTES),
    st.lists(st.tuples(st.integers(1, 4), st.integers(1, 3000), st.integers(1, 3000)), min_size=1, max_size=5),
    st.booleans(), st.none() | st.lists(st.integers(0, 1000), min_size=1, max_size=5),
    st.integers(1, container.MAX_STAGES))


@settings(max_examples=200, deadline=None)
@given(header=headers, payload=st.binary(max_size=12))
def test_any_header_round_trips(header, payload):
    body = header.to_bytes() + payload
    read = read_header(body + zlib.crc32(body).to_bytes(4, "little"))
    assert read == header and read.header_bytes == len(body) - len(payload) and read.payload_bytes == len(payload)


def test_uniform_sizes_are_stored_once(model, prior):
    one = compress(model, prior, blobs(1))[1]["header_bytes"]
    assert compress(model, prior, blobs(100))[1]["header_bytes"] == one  # the size is not repeated
    assert compress(model, prior, blobs(200))[1]["header_bytes"] == one + 1  # count 200: a 2-byte varint


def test_fingerprint():
    a, b = tiny_model(), tiny_model()
    assert len(fingerprint(a)) == container.FINGERPRINT_BYTES and len(fingerprint(a, 8)) == 8
    assert fingerprint(a) == fingerprint(b) == fingerprint(copy.deepcopy(a))
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-6
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(tiny_prior(seed=1)) != fingerprint(tiny_prior(seed=2))


# --- bad input -----------------------------------------------------------------------------------


def test_every_single_bit_flip_is_caught(model, prior, small_file):
    for i in range(len(small_file) * 8):
        bad = bytearray(small_file)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(CodecError):
            decompress(model, prior, bytes(bad))


def test_every_truncation_is_caught(model, prior, small_file):
    for n in range(len(small_file)):
        with pytest.raises(CodecError):
            decompress(model, prior, small_file[:n])


@pytest.mark.parametrize("data, match", [
    (b"", "empty"), (b"not a vqz", "not a .vqz"), (b"VQ", "truncated"),
    (b"\x89PNG\r\n\x1a\n" + bytes(20), "not a .vqz"),
    (b"VQZ\x01", "truncated"), (b"VQZ\x04" + bytes(30), "version 4"), (b"VQZ\x00" + bytes(30), "version 0"),
    ("VQZ", "expected the bytes"),
])
def test_not_a_vqz_file(model, prior, data, match):
    with pytest.raises(CodecError, match=match):
        decompress(model, prior, data)
    with pytest.raises(CodecError, match=match):
        read_header(data)


def test_newer_version_is_named(model, prior, small_file):
    bad = bytearray(small_file)
    bad[3] = max(container.VERSIONS) + 1
    with pytest.raises(CodecError, match=f"version {bad[3]}.*newer"):
        decompress(model, prior, bytes(bad))


def test_other_model_or_prior_or_counts(model, prior, small_file):
    with pytest.raises(CodecError, match="another model"):
        decompress(tiny_model(seed=9), prior, small_file)
    with pytest.raises(CodecError, match="another prior"):
        decompress(model, tiny_iprior(seed=9), small_file)
    with pytest.raises(CodecError, match="integer prior .integer model 1, IntegerTransformerPrior.*got None"):
        decompress(model, None, small_file)
    with pytest.raises(CodecError, match="integer prior .*got TransformerPrior"):
        decompress(model, tiny_prior(), small_file)
    with pytest.raises(CodecError, match="integer model 1.*the given prior is integer model 2"):
        decompress(model, tiny_iprior(arch="pixelcnn"), small_file)
    unknown = bytearray(small_file[:-4])
    unknown[8] = unknown[8] & 0xF0 | 7  # a file of an integer model this vqvae does not know
    with pytest.raises(CodecError, match="integer model 7, unknown to this vqvae"):
        decompress(model, prior, reseal(bytes(unknown)))
    counts = torch.arange(K)
    data, _ = compress(model, None, blobs(2), coder="huffman", code_counts=counts)
    with pytest.raises(CodecError, match="other code counts"):
        decompress(model, None, data, code_counts=counts + 1)
    with pytest.raises(CodecError, match="needs code_counts"):
        decompress(model, prior, data)


def test_payload_that_does_not_match_its_codes_is_caught(model, prior, small_file):
    # files with a valid CRC whose payload has a word too many, too few, or one changed
    body = small_file[:-4]
    for bad in (body + b"\x00\x00\x00\x00", body + b"\x12\x34\x56\x78", body[:-4], body[:-1],
                body[:-4] + bytes([body[-4] ^ 1]) + body[-3:]):
        with pytest.raises(CodecError, match="payload"):
            decompress(model, prior, reseal(bad))
    counts = torch.arange(K)
    data, _ = compress(model, None, blobs(2), coder="huffman", code_counts=counts)
    for bad in (data[:-4] + b"\x00", data[:-5], data[:-4] + b"\xff"):
        with pytest.raises(CodecError, match="payload"):
            decompress(model, None, reseal(bad), code_counts=counts)


def test_crafted_headers_are_caught(model, prior, small_file):
    header = read_header(small_file)
    payload = small_file[header.header_bytes : -4]
    cases = {
        "labels": dataclasses.replace(header, labels=(0,)),
        "channels": dataclasses.replace(header, shapes=((3, 28, 28),)),
    }
    for match, bad in cases.items():
        with pytest.raises(CodecError, match=match):
            decompress(model, prior, reseal(bad.to_bytes() + payload))
    raw = bytearray(header.to_bytes())
    flags = 4 + 2 * container.FINGERPRINT_BYTES  # offset of the flags byte
    raw[flags] |= 0x40  # an unknown flag
    with pytest.raises(CodecError, match="flags"):
        decompress(model, prior, reseal(bytes(raw) + payload))
    overlong = bytes(raw[:flags]) + bytes([raw[flags] & 0x3F, 0x81, 0x00])  # image count 1 as two bytes
    with pytest.raises(CodecError, match="overlong"):
        read_header(reseal(overlong + bytes(raw[flags + 2:]) + payload))


def test_a_payload_too_short_for_its_claimed_size_is_refused_before_the_prior_runs(model, prior, monkeypatch):
    """A 20-byte file claiming a 4096x4096 image: refused from its length, the prior never called."""
    header = read_header(compress(model, prior, blobs(1))[0])
    huge = dataclasses.replace(header, shapes=((1, 4096, 4096),))
    monkeypatch.setattr(type(prior), "step", lambda *a: pytest.fail("the prior ran"))
    with pytest.raises(CodecError, match="cannot hold"):
        decompress(model, prior, reseal(huge.to_bytes()))  # no payload at all
    # the bound is exact: each code costs at least -log2(1 - (K - 1) / 2**24) bits (1.3e-6 at K = 16)
    assert codec.api._check_payload_length(huge, b"\0" * 4, 1 << 20, K) is None
    with pytest.raises(CodecError, match="cannot hold"):
        codec.api._check_payload_length(huge, b"\0" * 4, 1 << 20, 512)  # 46 bits at K = 512: two words


def test_equal_shapes_have_one_encoding(model, prior):
    """Equal shapes are written once (the uniform flag); the same shapes written one by one are refused."""
    data, _ = compress(model, prior, blobs(2))
    header = read_header(data)
    raw = bytearray(header.to_bytes())
    flags = 4 + 2 * container.FINGERPRINT_BYTES
    assert raw[flags] & container.FLAG_UNIFORM
    shape = bytes(raw[flags + 2:flags + 5])  # 1, 28, 28 as one-byte varints
    spelled_out = bytes(raw[:flags]) + bytes([raw[flags] & ~container.FLAG_UNIFORM, 2]) + shape + shape
    with pytest.raises(CodecError, match="uniform"):
        read_header(reseal(spelled_out + data[header.header_bytes:-4]))


def test_bad_images_and_arguments(model, prior):
    cases = [([], "nothing to compress"), ([torch.rand(3, 28, 28)], "3 channels"), ([torch.rand(28, 28)], "float"),
             ([torch.zeros(1, 28, 28, dtype=torch.uint8)], "float"), ([torch.rand(1, 0, 5)], "sides")]
    for images, match in cases:
        with pytest.raises(CodecError, match=match):
            compress(model, prior, images)
    with pytest.raises(CodecError, match="unknown coder"):
        compress(model, prior, blobs(1), coder="zip")
    with pytest.raises(CodecError, match="needs code_counts"):
        compress(model, prior, blobs(1), coder="huffman")
    with pytest.raises(CodecError, match=r"\(16,\)"):
        compress(model, prior, blobs(1), coder="huffman", code_counts=torch.ones(15, dtype=torch.long))
    with pytest.raises(CodecError, match="integers"):
        compress(model, prior, blobs(1), coder="huffman", code_counts=torch.ones(K))
    eight = TransformerPrior(PriorConfig(codebook_size=8, grid=(7, 7), n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(CodecError, match="models 8 codes"):
        compress(model, IntegerPrior.from_prior(eight, torch.randint(0, 8, (64, 7, 7))), blobs(1))
    with pytest.raises(CodecError, match="range-coded with an integer prior .*got the float TransformerPrior"):
        compress(model, tiny_prior(), blobs(1))
    with pytest.raises(CodecError, match="needs the integer prior .*got None"):
        compress(model, None, blobs(1))


@pytest.fixture(scope="module")
def mutation_targets(model, prior):
    counts = torch.arange(K) * 3
    images = blobs(2, seed=20)
    rng_file = compress(model, prior, images)[0]
    huff_file = compress(model, None, images, coder="huffman", code_counts=counts)[0]
    expected = [reference(model, x)[1] for x in images]
    return {"range": (rng_file, None), "huffman": (huff_file, counts)}, expected


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(coder=st.sampled_from(["range", "huffman"]), ops=st.lists(mutation, min_size=1, max_size=3))
def test_random_mutations_give_codec_error_or_the_right_images(model, prior, mutation_targets, coder, ops):
    files, expected = mutation_targets
    original, counts = files[coder]
    data = bytearray(original)
    for op, pos, value in ops:
        pos = pos % (len(data) + 1)
        if op == "flip" and pos < len(data):
            data[pos] ^= 1 << value
        elif op == "set" and pos < len(data):
            data[pos] = value
        elif op == "insert":
            data.insert(pos, value)
        elif op == "delete" and pos < len(data):
            del data[pos]
        elif op == "truncate":
            del data[pos:]
    try:
        out = decompress(model, prior, bytes(data), code_counts=counts)
    except CodecError:
        assert bytes(data) != original
        return
    assert bytes(data) == original  # anything else must have raised
    assert all(same_pixels(a, b) for a, b in zip(out, expected))
