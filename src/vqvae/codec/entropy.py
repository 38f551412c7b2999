"""Range coding of code grids under an autoregressive model: integer frequencies, layout, coder.

Key: B sequences coded together, K codebook size, gh gw the prior's grid, L = gh * gw positions,
S sequences in a file, N codes in a file (all images' latent grids, concatenated).

    source = FloatPriorFrequencies(prior)                  # where each position's frequencies come from
    layout = make_layout(latent_shapes, source.hw)         # which code each sequence position holds
    payload, bits = range_encode(source, layout, labels, flat)
    flat = range_decode(source, layout, labels, payload)

A range decoder recovers a code only if it sees *exactly* the integer frequencies the encoder used. The
driver (`drive`) asks a frequency source for them position by position, on both sides identically, and
does not care how the source computes them:
- `IntegerPriorFrequencies` (format version 2): an integer prior's `step` computes them in exact integer
  arithmetic, the same on every machine, whatever the batch.
- `FloatPriorFrequencies` (version 1, read for compatibility): a float prior's `step` and
  `quantize_logits`. The logits depend on the batch composition and on float rounding (thread count,
  CPU, device), so both sides must group sequences the same way (`CHUNK` consecutive sequences per
  batch, part of the format) and run on the same kind of machine with the same thread count.
Both group sequences by `CHUNK`, which also bounds the memory a batch takes.

Latent grids other than the prior's grid are cut into tiles of the prior's grid (raster order, each tile
one sequence); positions of a tile that fall outside the latent grid (filler) are not coded: both sides
feed the prior the code of the nearest position inside (edge replication), which always lies earlier in
the same tile. A 28x28 image with a 7x7 prior at downsample 4 is exactly one tile.

Residual-VQ codes (s stages coded of the prior's S): an image's codes are (s, h, w), flat in that order;
a tile's sequence is its s grids one after the other (the prior's stage-major order), s * gh * gw
positions, the first s * L of the prior's S * L: a prefix, so fewer stages than the prior models need no
other prior. Filler copies the nearest position inside the grid at the same stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import constriction
import numpy as np
import torch
from torch import Tensor

from .. import integer_priors
from ..errors import CodecError
from ..integer_priors import IntegerPrior
from ..priors import Prior

PRECISION = 24  # integer frequencies of a position sum to 2**24: constriction's range-coder precision
assert integer_priors.PRECISION == PRECISION
CHUNK = 128  # sequences per prior batch: part of the format, since a float prior's logits depend on it


# ------------------------------------------------------------------------------------------------
# Frequencies
# ------------------------------------------------------------------------------------------------


def quantize_logits(logits: Tensor) -> np.ndarray:
    """Logits (B, K) -> integer frequencies (B, K) int64, each >= 1, each row summing to 2**PRECISION.

    The one function that turns a float prior's output into what the range coder sees, on both sides:
    softmax in float64, floor(p * (2**PRECISION - K)), the remainder to the most probable code, + 1 each.
    """
    x = logits.detach().to("cpu", torch.float64).numpy()  # float32 -> float64 is exact
    if not np.isfinite(x).all():
        raise CodecError("the prior produced non-finite logits (NaN or inf): its weights cannot code")
    free = (1 << PRECISION) - x.shape[1]
    p = np.exp(x - x.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    freqs = np.floor(p * free).astype(np.int64)
    freqs[np.arange(len(freqs)), freqs.argmax(axis=1)] += free - freqs.sum(axis=1)
    return freqs + 1


class FrequencySource(Protocol):
    """Where the range coder's frequencies come from, one position at a time, for a batch of sequences.

    seq_len: L positions per sequence; hw: (gh, gw) the grid a sequence covers.
    start(batch, cond) -> state, cond (B,) int64 labels or None;
    step(state, prev) -> (freqs (B, K) int64, each >= 1, rows summing to 2**PRECISION; state),
    prev (B,) int64 the codes of the previous position (None at position 0).
    """

    seq_len: int
    hw: tuple[int, int]

    def start(self, batch: int, cond: np.ndarray | None): ...

    def step(self, state, prev: np.ndarray | None) -> tuple[np.ndarray, object]: ...


class FloatPriorFrequencies:
    """Frequencies of a float prior (`Prior.start` / `Prior.step`) through `quantize_logits`."""

    def __init__(self, prior: Prior):
        self.prior, self.seq_len, self.hw = prior, prior.seq_len, prior.hw

    def start(self, batch: int, cond: np.ndarray | None):
        return self.prior.start(batch, None if cond is None else torch.as_tensor(cond, device=self.prior.device))

    def step(self, state, prev: np.ndarray | None) -> tuple[np.ndarray, object]:
        prev = None if prev is None else torch.from_numpy(prev).to(self.prior.device)
        logits, state = self.prior.step(state, prev)  # (B, K)
        return quantize_logits(logits), state


class IntegerPriorFrequencies:
    """Frequencies of an integer prior (`IntegerPrior.start` / `.step`), exact on every machine; checked
    (shape, >= 1, rows summing to 2**PRECISION) before the coder trusts them."""

    def __init__(self, prior: IntegerPrior):
        self.prior, self.seq_len, self.hw = prior, prior.seq_len, prior.hw

    def start(self, batch: int, cond: np.ndarray | None):
        return self.prior.start(batch, None if cond is None else torch.as_tensor(cond, device=self.prior.device))

    def step(self, state, prev: np.ndarray | None) -> tuple[np.ndarray, object]:
        prev = None if prev is None else torch.from_numpy(prev).to(self.prior.device)
        freqs, state = self.prior.step(state, prev)  # (B, K) int64
        freqs = freqs.cpu().numpy()
        K = self.prior.cfg.codebook_size
        if (freqs.dtype != np.int64 or freqs.shape != (len(freqs), K) or (freqs < 1).any()
                or (freqs.sum(axis=1) != 1 << PRECISION).any()):
            raise CodecError(f"the integer prior produced invalid frequencies ({freqs.dtype} {freqs.shape}; "
                             f"expected int64 (B, {K}), each >= 1, rows summing to 2**{PRECISION})")
        return freqs, state


def frequency_source(prior: Prior | IntegerPrior) -> FrequencySource:
    """The source for a prior: integer priors give their frequencies, float priors go through
    `quantize_logits`."""
    return IntegerPriorFrequencies(prior) if isinstance(prior, IntegerPrior) else FloatPriorFrequencies(prior)


# ------------------------------------------------------------------------------------------------
# Layout: which code each position of each sequence holds
# ------------------------------------------------------------------------------------------------


@dataclass
class Layout:
    """Every sequence coded (one tile of one image's latent grid) and where its codes live.

    The latents of all images are concatenated into one flat array (image after image, raster order).
    index (S, L): the flat position whose code the sequence holds at each of its L positions (L = s * gh
    * gw with s stages: the prefix of the prior's sequence that is coded);
    coded (S, L): True inside the latent grid (entropy-coded), False for filler (a copy of index);
    owner (S,): the image of each sequence; total: N, the number of codes.
    """

    index: np.ndarray
    coded: np.ndarray
    owner: np.ndarray
    total: int


def make_layout(latent_shapes: list[tuple[int, int]], grid: tuple[int, int], stages: int = 1) -> Layout:
    """The tiles of each (h, w) latent grid, in file order then raster order of tiles; with `stages` s,
    each image holds s grids (s, h, w) and each tile sequence their s tiles, stage after stage."""
    gh, gw = grid
    rows, cols = np.arange(gh)[None, :, None], np.arange(gw)[None, None, :]  # (1, gh, 1), (1, 1, gw)
    stage = np.arange(stages)[:, None, None]  # (s, 1, 1)
    index, coded, owner, offset = [], [], [], 0
    for image, (h, w) in enumerate(latent_shapes):
        for top in range(0, h, gh):
            for left in range(0, w, gw):
                r, c = top + rows, left + cols  # this tile's positions in the grid
                # filler copies the nearest position inside the grid: same row/column or earlier, same tile
                # and stage
                at = offset + stage * h * w + np.minimum(r, h - 1) * w + np.minimum(c, w - 1)  # (s, gh, gw)
                index.append(at.reshape(-1))
                coded.append(np.broadcast_to((r < h) & (c < w), at.shape).reshape(-1))
                owner.append(image)
        offset += stages * h * w
    return Layout(np.stack(index), np.stack(coded), np.array(owner, dtype=np.int64), offset)


# ------------------------------------------------------------------------------------------------
# The driver and the range coder
# ------------------------------------------------------------------------------------------------


def drive(source: FrequencySource, layout: Layout, labels: np.ndarray | None, flat: np.ndarray,
          code_position: Callable[[np.ndarray, np.ndarray], None]) -> None:
    """Run the source step by step over all sequences, CHUNK at a time, identically on both sides.

    At each position, `code_position(freqs (n, K) int64, targets (n,))` gets the frequencies of the n
    sequences whose position is coded and must leave their codes in flat[targets] (the encoder reads
    them, the decoder decodes into them); then every sequence is fed its code at that position.
    """
    for start in range(0, len(layout.index), CHUNK):
        index, coded = layout.index[start : start + CHUNK], layout.coded[start : start + CHUNK]  # (B, L)
        cond = None if labels is None else labels[layout.owner[start : start + CHUNK]]
        state, prev = source.start(len(index), cond), None
        for t in range(index.shape[1]):  # the sequence's positions: a prefix of the source's with fewer stages
            freqs, state = source.step(state, prev)  # (B, K) int64
            rows = coded[:, t]
            if rows.any():
                code_position(freqs[rows], index[rows, t])
            prev = flat[index[:, t]]  # (B,) filler: copied, decoded earlier


def best_labels(source: FrequencySource, layout: Layout, flat: np.ndarray, num_images: int,
                num_classes: int) -> np.ndarray:
    """For each image, the class under which the source gives its codes the fewest bits -> (N,) int64
    (the lowest class among equals). Every class runs step by step over the same sequences in one batch
    of about CHUNK sequences; the bits are those of the integer frequencies the coder would use. Costs
    about num_classes times the coding itself."""
    bits = np.zeros((num_images, num_classes))
    group = max(1, CHUNK // num_classes)
    for start in range(0, len(layout.index), group):
        index, coded = layout.index[start : start + group], layout.coded[start : start + group]  # (b, L)
        cond = np.repeat(np.arange(num_classes), len(index))  # (Y * b,) class-major: each class, all b
        state, prev, total = source.start(len(cond), cond), None, np.zeros(len(cond))
        for t in range(index.shape[1]):
            freqs, state = source.step(state, prev)  # (Y * b, K)
            codes = np.tile(flat[index[:, t]], num_classes)  # (Y * b,)
            cost = PRECISION - np.log2(freqs[np.arange(len(codes)), codes])
            total += np.where(np.tile(coded[:, t], num_classes), cost, 0.0)
            prev = codes
        np.add.at(bits, (np.tile(layout.owner[start : start + group], num_classes), cond), total)
    return bits.argmin(axis=1)


@torch.no_grad()
def best_labels_full_pass(prior: Prior, layout: Layout, flat: np.ndarray, num_images: int) -> np.ndarray:
    """`best_labels` under a float prior's full `logits` pass, one per class: much faster than stepping an
    integer prior, and as good a choice (the label is stored in the file, so it need not be bit-exact)."""
    if prior.cfg.num_classes < 1 or len(prior.cfg.grid) not in (1, 2):
        raise CodecError("the label prior must be a class-conditional prior over 1-D or 2-D grids")
    Y, device = prior.cfg.num_classes, prior.device
    bits = np.zeros((num_images, Y))
    for start in range(0, len(layout.index), CHUNK):
        index = layout.index[start : start + CHUNK]  # (b, L)
        # stages the file does not code are zeros: the prior is causal, they change no coded position
        padded = np.zeros((len(index), prior.seq_len), dtype=np.int64)
        padded[:, : index.shape[1]] = flat[index]
        grids = torch.from_numpy(padded).to(device).view(len(index), *prior.code_shape)  # (b, [S,] gh, gw)
        mask = np.zeros(padded.shape, dtype=bool)
        mask[:, : index.shape[1]] = layout.coded[start : start + CHUNK]
        coded = torch.from_numpy(mask).to(device)  # (b, S * L)
        for label in range(Y):
            cond = torch.full((len(index),), label, dtype=torch.long, device=device)
            nll = torch.nn.functional.cross_entropy(prior.logits(grids, cond).float(), grids, reduction="none")
            cost = (nll.flatten(1) * coded).sum(1).double().cpu().numpy()  # (b,) nats of the coded positions
            np.add.at(bits[:, label], layout.owner[start : start + CHUNK], cost)
    return bits.argmin(axis=1)


def range_encode(source: FrequencySource, layout: Layout, labels: np.ndarray | None,
                 flat: np.ndarray) -> tuple[bytes, float]:
    """flat (N,) int64 codes -> (payload: constriction's uint32 words little-endian, information in bits)."""
    encoder = constriction.stream.queue.RangeEncoder()
    family = constriction.stream.model.Categorical(perfect=False)
    bits = 0.0

    def encode(freqs: np.ndarray, targets: np.ndarray) -> None:
        nonlocal bits
        symbols = flat[targets]
        # constriction's lazy categorical model maps weights w to cdf floor(cumsum(w) * (2**24 - K) / sum(w))
        # + index: with w = freqs - 1 (integers summing to 2**24 - K) that is exactly cumsum(freqs), so
        # the coder uses our integers, not a float approximation of them.
        encoder.encode(symbols.astype(np.int32), family, (freqs - 1).astype(np.float64))
        bits += float(np.sum(PRECISION - np.log2(freqs[np.arange(len(symbols)), symbols])))

    drive(source, layout, labels, flat, encode)
    return encoder.get_compressed().astype("<u4").tobytes(), bits


def range_decode(source: FrequencySource, layout: Layout, labels: np.ndarray | None, payload: bytes) -> np.ndarray:
    """payload -> flat (N,) int64 codes; CodecError unless the payload is exactly their encoding."""
    if len(payload) % 4:
        raise CodecError(f"corrupted .vqz payload: {len(payload)} bytes is not a whole number of 4-byte words")
    words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
    decoder = constriction.stream.queue.RangeDecoder(words)
    family = constriction.stream.model.Categorical(perfect=False)
    check = constriction.stream.queue.RangeEncoder()  # re-encodes what is decoded, to compare with the payload
    flat = np.zeros(layout.total, dtype=np.int64)

    def decode(freqs: np.ndarray, targets: np.ndarray) -> None:
        weights = (freqs - 1).astype(np.float64)
        try:
            symbols = decoder.decode(family, weights)
        except Exception as e:  # constriction reports bad data with its own exception types
            raise CodecError(f"corrupted .vqz payload: the range decoder failed ({str(e).splitlines()[0]})") from None
        check.encode(symbols, family, weights)
        flat[targets] = symbols

    drive(source, layout, labels, flat, decode)
    # The range coder cannot tell where its data ends. The payload must be exactly the encoding of the
    # decoded codes: this rejects leftover or missing words and most decodes that went astray.
    if not np.array_equal(check.get_compressed(), words):
        raise CodecError("corrupted .vqz payload: the decoded codes do not account for it exactly (damaged data, "
                         "or prior probabilities that differ from the encoder's: another device or library version?)")
    return flat
