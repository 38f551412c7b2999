"""Tests for codec/entropy.py: identical integer frequencies on both sides and across machines, the
range coder using exactly them."""

import hashlib
import math

import constriction
import numpy as np
import pytest
import torch

from vqvae import codec
from vqvae.codec import compress, decompress, decompress_codes, entropy, quantize_logits
from vqvae.errors import CodecError

from codec_support import K, blobs, tiny_iprior, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures: codec_support.py


# --- fixed-point probabilities -----------------------------------------------------------------


def test_encoder_and_decoder_see_identical_integer_probabilities(model, monkeypatch):
    prior = tiny_iprior(num_classes=3)
    original, seen = entropy.drive, []

    def recording(source, layout, labels, flat, code_position):
        def record(freqs, targets):
            seen[-1].append((freqs.copy(), targets.copy()))
            code_position(freqs, targets)
        original(source, layout, labels, flat, record)

    monkeypatch.setattr(entropy, "drive", recording)
    images = blobs(5) + [torch.rand(1, 29, 31)]  # 5 + 4 tiles: one chunk of 9 sequences, 49 steps
    seen.append([])
    data, _ = compress(model, prior, images)
    seen.append([])
    decompress(model, prior, data)
    assert len(seen) == 2
    seen = {"compress": seen[0], "decompress": seen[1]}
    assert len(seen["compress"]) == len(seen["decompress"]) == 49
    for (a, targets_a), (b, targets_b) in zip(seen["compress"], seen["decompress"]):
        assert a.dtype == b.dtype == np.int64 and np.array_equal(a, b) and np.array_equal(targets_a, targets_b)
        assert (a >= 1).all() and (a.sum(1) == 1 << codec.PRECISION).all()


def _frequency_digests(monkeypatch, run):
    """Run `run()` and return {flat index of the code coded: sha256 of its row of integer frequencies} for
    every frequency row the range coder saw."""
    original, seen = entropy.drive, {}

    def recording(source, layout, labels, flat, code_position):
        def record(freqs, targets):
            for row, target in zip(freqs, targets):
                seen[int(target)] = hashlib.sha256(row.tobytes()).hexdigest()
            code_position(freqs, targets)
        original(source, layout, labels, flat, record)

    monkeypatch.setattr(entropy, "drive", recording)
    run()
    monkeypatch.setattr(entropy, "drive", original)
    return seen


def test_frequencies_are_identical_across_threads_kernel_onednn_and_batching(monkeypatch):
    """The issue's cross-checks in one process: every frequency row the coder sees (keyed by the code it
    codes) hashes the same when the file is written on 1 thread with the quantizer's C++ kernel, read on 2
    threads with the kernel off and oneDNN disabled, and when each image is compressed in a file of its own
    (other batch composition) instead of one file of 150."""
    from vqvae import nearest

    model = tiny_model()
    prior = tiny_iprior(num_classes=3)
    images = blobs(150, seed=41)  # 150 sequences: two chunks of the driver, the second partly filled
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        holder = {}
        written = _frequency_digests(monkeypatch, lambda: holder.update(
            zip(("data", "stats"), compress(model, prior, images))))
        torch.set_num_threads(2)
        monkeypatch.setattr(nearest, "USE_KERNEL", False)
        with torch.backends.mkldnn.flags(enabled=False):
            read = _frequency_digests(monkeypatch, lambda: holder.update(
                codes=decompress_codes(model, prior, holder["data"])))
        torch.set_num_threads(1)
        monkeypatch.setattr(nearest, "USE_KERNEL", True)  # the encoder's float search as when it wrote the file
        labels = holder["stats"]["labels"]
        alone = {}
        for i, x in enumerate(images):  # one file each: the sequence is alone in its batch
            digests = _frequency_digests(monkeypatch, lambda: compress(model, prior, [x], labels=[labels[i]]))
            alone.update({49 * i + target: digest for target, digest in digests.items()})
    finally:
        torch.set_num_threads(threads)
    assert len(written) == 150 * 49
    assert read == written and alone == written
    assert all(torch.equal(a, b) for a, b in zip(holder["codes"], holder["stats"]["codes"]))


def test_quantize_logits_is_exact_and_deterministic():
    g = torch.Generator().manual_seed(0)
    for logits in (torch.randn(64, 512, generator=g) * 5, torch.zeros(3, 7),
                   torch.tensor([[1e4, -1e4, 0.0, 30.0]]), torch.randn(2, 65536, generator=g)):
        freqs = quantize_logits(logits)
        assert np.array_equal(freqs, quantize_logits(logits.clone()))  # identical, not merely close
        assert freqs.dtype == np.int64 and (freqs >= 1).all() and (freqs.sum(1) == 1 << codec.PRECISION).all()
        p = torch.softmax(logits.double(), 1).numpy()
        assert np.abs(freqs / 2.0 ** codec.PRECISION - p).max() <= (logits.shape[1] + 1) / 2.0 ** codec.PRECISION
    with pytest.raises(CodecError, match="non-finite"):
        quantize_logits(torch.tensor([[0.0, float("nan")]]))


def test_range_coder_uses_exactly_the_integer_frequencies():
    # Rare codes make any deviation visible: a frequency of 3 costs 24 - log2(3) bits, 2 or 4 would
    # cost a whole bit more or less. Coding n of them must cost that, plus at most the final words.
    family = constriction.stream.model.Categorical(perfect=False)
    for f in (1, 3, 5, 1000):
        freqs = np.full((2000, K), 1, dtype=np.int64)
        freqs[:, 0] = (1 << codec.PRECISION) - (K - 1) - f + 1
        freqs[:, 7] = f
        encoder = constriction.stream.queue.RangeEncoder()
        encoder.encode(np.full(2000, 7, dtype=np.int32), family, (freqs - 1).astype(np.float64))
        expected = 2000 * (codec.PRECISION - math.log2(f))
        assert expected <= encoder.num_bits() <= expected + 64


def test_prior_decoding_mismatch_is_an_error_not_a_wrong_image(model, prior, monkeypatch):
    # What a decoder with other frequencies would see: 1/256 of the top code's mass moved to the code after it.
    data, _ = compress(model, prior, blobs(2))
    original = entropy.IntegerPriorFrequencies.step

    def step(self, state, prev):
        freqs, state = original(self, state, prev)
        rows, top = np.arange(len(freqs)), freqs.argmax(1)
        moved = freqs[rows, top] // 256
        freqs[rows, top] -= moved
        freqs[rows, (top + 1) % K] += moved
        return freqs, state

    monkeypatch.setattr(entropy.IntegerPriorFrequencies, "step", step)
    with pytest.raises(CodecError, match="do not account"):
        decompress(model, prior, data)


def test_integer_frequencies_are_checked(model, prior, monkeypatch):
    data, _ = compress(model, prior, blobs(1))
    original = prior.step
    for bad in (lambda f: f + 1, lambda f: f.float(), lambda f: f[:, :-1]):
        monkeypatch.setattr(prior, "step", lambda state, prev, bad=bad: (bad(original(state, prev)[0]), state))
        with pytest.raises(CodecError, match="invalid frequencies"):
            decompress(model, prior, data)
