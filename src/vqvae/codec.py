"""The `.vqz` container: images -> VQ-VAE codes -> entropy-coded bytes under the learned prior, and back.

Key: B sequences coded together, K codebook size, gh gw the prior's grid, L = gh * gw positions,
h w one image's latent grid, C H W one image's channels and size, f the model's downsample factor.

    data, stats = compress(model, prior, images)      # images: (C, H, W) floats in [0, 1], any sizes
    images = decompress(model, prior, data)           # unpad(model.decode(codes)).clamp(0, 1), one by one
    header = read_header(data)                        # what a file holds, without decoding it

Two coders. "range": constriction's range coder, each code under the prior's probability given the
codes before it, driven step by step through `Prior.start` / `Prior.step`. "huffman": a static canonical
Huffman code built from training-set code counts (the baseline; the prior is not used).

Why the encoder and the decoder compute probabilities the same way, step by step, in fixed point:
a range decoder recovers a code only if it sees *exactly* the probabilities the encoder used. Logits of
a batched full pass and of the cached step-by-step pass differ in the last bits, and float probabilities
differ between runs and devices: CompressAI #279/#309 and encodec #95 decoded garbage that way. So both
sides run the same `step` calls with the same batch composition (`CHUNK` sequences in a fixed order) and
turn logits into integer frequencies with one function, `quantize_logits`, before the coder sees them.

Latent grids other than the prior's grid are cut into tiles of the prior's grid (raster order, each tile
coded on its own); positions of a tile that fall outside the latent grid are not coded: both sides fill
them with the code of the nearest position inside (edge replication, as `pad_to_multiple` does for
pixels), which always lies earlier in the same tile. A 28x28 image with a 7x7 prior is exactly one tile.

The byte layout is in docs/format.md.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import zlib
from dataclasses import dataclass, field

import constriction
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .autoencoders import VQVAE
from .errors import CodecError
from .nets import eval_mode
from .priors import Prior

__all__ = [
    "CHUNK", "MAGIC", "PRECISION", "VERSION", "Header",
    "compress", "decompress", "fingerprint", "quantize_logits", "read_header",
]

MAGIC = b"VQZ"
VERSION = 1
FINGERPRINT_BYTES = 2  # with the payload check below, enough to refuse another model's file
CRC_BYTES = 4
PRECISION = 24  # integer frequencies of a position sum to 2**24: constriction's range-coder precision
CHUNK = 128  # sequences per prior batch: part of the format, since logits depend on the batch size
CODERS = ("range", "huffman")
FLAG_UNIFORM, FLAG_LABELS, CODER_MASK = 0x10, 0x20, 0x0F  # flags byte: coder id in the low bits
MAX_IMAGES, MAX_SIDE, MAX_PIXELS, MAX_LABEL = 1 << 20, 1 << 16, 1 << 28, 1 << 16
MIN_FILE_BYTES = len(MAGIC) + 1 + 2 * FINGERPRINT_BYTES + 1 + 1 + 3 + CRC_BYTES  # empty payload: 17


# ------------------------------------------------------------------------------------------------
# Header
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    """What a `.vqz` file holds besides the payload (docs/format.md has the byte layout).

    coder: "range" or "huffman". model_fingerprint: `fingerprint(model)`. prior_fingerprint:
    `fingerprint(prior)` for the range coder, a fingerprint of the code counts for Huffman.
    shapes: (C, H, W) of each image, in file order. labels: the class each image was coded with
    (class-conditional priors), else None. header_bytes / payload_bytes: sizes in the file read.
    """

    coder: str
    model_fingerprint: bytes
    prior_fingerprint: bytes
    shapes: tuple[tuple[int, int, int], ...]
    labels: tuple[int, ...] | None = None
    version: int = VERSION
    header_bytes: int = field(default=0, compare=False)
    payload_bytes: int = field(default=0, compare=False)

    @property
    def num_images(self) -> int:
        return len(self.shapes)

    def to_bytes(self) -> bytes:
        """The header's bytes: magic, version, fingerprints, flags, count, shapes, labels."""
        assert self.coder in CODERS and self.shapes, (self.coder, self.shapes)
        assert len(self.model_fingerprint) == len(self.prior_fingerprint) == FINGERPRINT_BYTES
        assert self.labels is None or len(self.labels) == len(self.shapes)
        uniform = len(set(self.shapes)) == 1
        flags = CODERS.index(self.coder) | (FLAG_UNIFORM if uniform else 0)
        flags |= 0 if self.labels is None else FLAG_LABELS
        out = bytearray(MAGIC + bytes([self.version]) + self.model_fingerprint + self.prior_fingerprint)
        out.append(flags)
        _put_varint(out, len(self.shapes))
        for shape in self.shapes[:1] if uniform else self.shapes:
            for value in shape:
                _put_varint(out, value)
        for label in self.labels or ():
            _put_varint(out, label)
        return bytes(out)


def _put_varint(out: bytearray, value: int) -> None:
    """Append `value` >= 0 as an unsigned LEB128 varint (7 bits a byte, low bits first)."""
    assert value >= 0, value
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


class _Reader:
    """Reads header fields from the bytes before the CRC; every overrun or bad value is a CodecError."""

    def __init__(self, data: bytes, pos: int):
        self.data, self.pos = data, pos

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise CodecError(f"corrupted .vqz header: it ends inside the {what}")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def varint(self, what: str, low: int, high: int) -> int:
        value = 0
        for i in range(10):
            byte = self.take(1, what)[0]
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                if byte == 0 and i > 0:  # one value, one encoding: no redundant zero bytes
                    raise CodecError(f"corrupted .vqz header: overlong varint in the {what}")
                break
        else:
            raise CodecError(f"corrupted .vqz header: varint longer than 10 bytes in the {what}")
        if not low <= value <= high:
            raise CodecError(f"corrupted .vqz header: {what} is {value}, expected {low}..{high}")
        return value


def _parse(data: bytes) -> tuple[Header, bytes]:
    """Check magic, version, length and CRC (in that order), then parse the header -> (header, payload)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"expected the bytes of a .vqz file, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise CodecError("empty data: not a .vqz file")
    if len(data) < len(MAGIC) + 1 and MAGIC.startswith(data[: len(MAGIC)]):
        raise CodecError(f"truncated .vqz file: {len(data)} bytes, a .vqz file has at least {MIN_FILE_BYTES}")
    if data[: len(MAGIC)] != MAGIC:
        raise CodecError(f"not a .vqz file: it starts with {data[:4]!r}, expected {MAGIC!r}")
    version = data[len(MAGIC)]
    if version != VERSION:
        newer = " (made by a newer vqvae: upgrade to read it)" if version > VERSION else ""
        raise CodecError(f"unsupported .vqz version {version}{newer}; this vqvae reads version {VERSION}")
    if len(data) < MIN_FILE_BYTES:
        raise CodecError(f"truncated .vqz file: {len(data)} bytes, a .vqz file has at least {MIN_FILE_BYTES}")
    body, stored = data[:-CRC_BYTES], int.from_bytes(data[-CRC_BYTES:], "little")
    if zlib.crc32(body) != stored:
        raise CodecError("corrupted or truncated .vqz file: CRC32 mismatch")

    reader = _Reader(body, len(MAGIC) + 1)
    model_fp = reader.take(FINGERPRINT_BYTES, "model fingerprint")
    prior_fp = reader.take(FINGERPRINT_BYTES, "prior fingerprint")
    flags = reader.take(1, "flags")[0]
    if flags & ~(CODER_MASK | FLAG_UNIFORM | FLAG_LABELS) or (flags & CODER_MASK) >= len(CODERS):
        raise CodecError(f"corrupted .vqz header: unknown flags 0x{flags:02x}")
    n = reader.varint("image count", 1, MAX_IMAGES)
    shapes = []
    for i in range(1 if flags & FLAG_UNIFORM else n):
        names = ("channels", "height", "width")
        shapes.append(tuple(reader.varint(f"image {i} {name}", 1, MAX_SIDE) for name in names))
    if flags & FLAG_UNIFORM:
        shapes = shapes * n
    if sum(math.prod(s) for s in shapes) > MAX_PIXELS:
        raise CodecError(f"corrupted .vqz header: more than {MAX_PIXELS} pixels in all")
    labels = tuple(reader.varint(f"image {i} label", 0, MAX_LABEL) for i in range(n)) if flags & FLAG_LABELS else None
    header = Header(CODERS[flags & CODER_MASK], model_fp, prior_fp, tuple(shapes), labels, version,
                    header_bytes=reader.pos, payload_bytes=len(body) - reader.pos)
    return header, body[reader.pos :]


def read_header(data: bytes) -> Header:
    """The header of a `.vqz` file after checking magic, version and CRC; raises CodecError otherwise."""
    return _parse(data)[0]


# ------------------------------------------------------------------------------------------------
# Fingerprints, fixed-point probabilities, tiling
# ------------------------------------------------------------------------------------------------


def fingerprint(module: nn.Module, nbytes: int = FINGERPRINT_BYTES) -> bytes:
    """First `nbytes` of a sha256 over the state dict: per entry (sorted by name) the name, dtype and
    shape, then the tensor's raw bytes. Same weights -> same bytes, whatever the device."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()[:nbytes]


def _counts_fingerprint(counts: np.ndarray) -> bytes:
    return hashlib.sha256(b"code_counts\0" + counts.astype("<i8").tobytes()).digest()[:FINGERPRINT_BYTES]


def quantize_logits(logits: Tensor) -> np.ndarray:
    """Logits (B, K) -> integer frequencies (B, K) int64, each >= 1, each row summing to 2**PRECISION.

    The one function that turns the prior's output into what the range coder sees, on both sides:
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


@dataclass
class _Layout:
    """Every sequence the prior codes (one tile of one image's latent grid) and where its codes live.

    The latents of all images are concatenated into one flat array (image after image, raster order).
    index (S, L): the flat position whose code the sequence holds at each of its L positions;
    coded (S, L): True inside the latent grid (entropy-coded), False for filler (a copy of index);
    owner (S,): the image of each sequence.
    """

    index: np.ndarray
    coded: np.ndarray
    owner: np.ndarray
    total: int


def _layout(latent_shapes: list[tuple[int, int]], grid: tuple[int, int]) -> _Layout:
    gh, gw = grid
    rows, cols = np.arange(gh)[:, None], np.arange(gw)[None, :]
    index, coded, owner, offset = [], [], [], 0
    for image, (h, w) in enumerate(latent_shapes):
        for top in range(0, h, gh):
            for left in range(0, w, gw):
                r, c = top + rows, left + cols  # (gh, 1), (1, gw): this tile's positions in the grid
                # filler copies the nearest position inside the grid: same row/column or earlier, same tile
                index.append((offset + np.minimum(r, h - 1) * w + np.minimum(c, w - 1)).reshape(-1))
                coded.append(((r < h) & (c < w)).reshape(-1))
                owner.append(image)
        offset += h * w
    return _Layout(np.stack(index), np.stack(coded), np.array(owner, dtype=np.int64), offset)


def _drive_prior(prior: Prior, layout: _Layout, labels: np.ndarray | None, flat: np.ndarray, code_position) -> None:
    """Run the prior step by step over all sequences, CHUNK at a time, identically on both sides.

    At each position, `code_position(freqs (n, K) int64, targets (n,))` gets the frequencies of the n
    sequences whose position is coded and must leave their codes in flat[targets] (the encoder reads
    them, the decoder decodes into them); then every sequence is fed its code at that position.
    """
    device = prior.device
    for start in range(0, len(layout.index), CHUNK):
        index, coded = layout.index[start : start + CHUNK], layout.coded[start : start + CHUNK]  # (B, L)
        cond = None if labels is None else torch.as_tensor(labels[layout.owner[start : start + CHUNK]], device=device)
        state, prev = prior.start(len(index), cond), None
        for t in range(prior.seq_len):
            logits, state = prior.step(state, prev)  # (B, K)
            freqs = quantize_logits(logits)  # (B, K) int64
            rows = coded[:, t]
            if rows.any():
                code_position(freqs[rows], index[rows, t])
            prev = torch.from_numpy(flat[index[:, t]]).to(device)  # (B,) filler: copied, decoded earlier


@torch.no_grad()
def _best_labels(prior: Prior, layout: _Layout, flat: np.ndarray, num_images: int) -> np.ndarray:
    """For each image, the class whose prior gives its codes the fewest bits -> (N,) int64.

    Scored with full `logits` passes: the choice only needs to be good, not bit-exact, since the label
    is stored in the file and coding itself runs step by step.
    """
    device, grid = prior.device, prior.hw
    bits = np.zeros((num_images, prior.cfg.num_classes))
    for start in range(0, len(layout.index), CHUNK):
        codes = torch.from_numpy(flat[layout.index[start : start + CHUNK]]).to(device).view(-1, *grid)  # (B, gh, gw)
        coded = torch.from_numpy(layout.coded[start : start + CHUNK]).to(device)  # (B, L)
        owner = layout.owner[start : start + CHUNK]
        for label in range(prior.cfg.num_classes):
            cond = torch.full((len(codes),), label, dtype=torch.long, device=device)
            logits = prior.logits(codes, cond)  # (B, K, gh, gw)
            nll = F.cross_entropy(logits.float(), codes, reduction="none").flatten(1)  # (B, L) nats
            np.add.at(bits[:, label], owner, (nll * coded).sum(1).double().cpu().numpy())
    return bits.argmin(axis=1)


# ------------------------------------------------------------------------------------------------
# Coders
# ------------------------------------------------------------------------------------------------


def _range_encode(prior: Prior, layout: _Layout, labels: np.ndarray | None, flat: np.ndarray) -> tuple[bytes, float]:
    """-> (payload: constriction's uint32 words little-endian, information content in bits)."""
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

    _drive_prior(prior, layout, labels, flat, encode)
    return encoder.get_compressed().astype("<u4").tobytes(), bits


def _range_decode(prior: Prior, layout: _Layout, labels: np.ndarray | None, payload: bytes) -> np.ndarray:
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

    _drive_prior(prior, layout, labels, flat, decode)
    # The range coder cannot tell where its data ends. The payload must be exactly the encoding of the
    # decoded codes: this rejects leftover or missing words and most decodes that went astray.
    if not np.array_equal(check.get_compressed(), words):
        raise CodecError("corrupted .vqz payload: the decoded codes do not account for it exactly (damaged data, "
                         "or prior probabilities that differ from the encoder's: another device or library version?)")
    return flat


def _huffman_code(counts: np.ndarray) -> list[str]:
    """Canonical Huffman codewords ('0'/'1' strings) for weights counts + 1; integer-only, deterministic.

    Code lengths from merging the two lightest subtrees (ties: lowest node id first), then codewords
    assigned in order of (length, code), so only the lengths define the code.
    """
    weights = [int(c) + 1 for c in counts]
    heap = [(w, node) for node, w in enumerate(weights)]
    heapq.heapify(heap)
    parent = [0] * (2 * len(weights) - 1)
    next_node = len(weights)
    while len(heap) > 1:
        (w1, a), (w2, b) = heapq.heappop(heap), heapq.heappop(heap)
        parent[a] = parent[b] = next_node
        heapq.heappush(heap, (w1 + w2, next_node))
        next_node += 1
    depth = [0] * next_node
    for node in range(next_node - 2, -1, -1):  # parents have larger ids than their children
        depth[node] = depth[parent[node]] + 1
    codewords, code, prev_len = [""] * len(weights), 0, 0
    for symbol in sorted(range(len(weights)), key=lambda s: (depth[s], s)):
        code <<= depth[symbol] - prev_len
        prev_len = depth[symbol]
        codewords[symbol] = format(code, f"0{prev_len}b")
        code += 1
    return codewords


def _huffman_encode(counts: np.ndarray, flat: np.ndarray) -> tuple[bytes, float]:
    """-> (payload: the codewords' bits, most significant first, zero-padded to a byte; bits under the
    smoothed frequencies)."""
    codewords = _huffman_code(counts)
    bitstring = "".join(codewords[s] for s in flat.tolist())
    bitstring += "0" * (-len(bitstring) % 8)
    payload = int(bitstring, 2).to_bytes(len(bitstring) // 8, "big") if bitstring else b""
    weights = counts.astype(np.float64) + 1
    return payload, float(np.sum(np.log2(weights.sum()) - np.log2(weights[flat])))


def _huffman_decode(counts: np.ndarray, payload: bytes, total: int) -> np.ndarray:
    table = {word: symbol for symbol, word in enumerate(_huffman_code(counts))}
    bitstring = format(int.from_bytes(payload, "big"), f"0{8 * len(payload)}b") if payload else ""
    flat, pos = np.empty(total, dtype=np.int64), 0
    for i in range(total):
        end = pos + 1
        while (symbol := table.get(bitstring[pos:end])) is None:  # a complete prefix code: ends by max length
            if end >= len(bitstring):
                raise CodecError("corrupted .vqz payload: the Huffman data ends before the last code")
            end += 1
        flat[i], pos = symbol, end
    if len(bitstring) - pos >= 8 or "1" in bitstring[pos:]:
        raise CodecError(f"corrupted .vqz payload: {len(bitstring) - pos} bits left after the last code")
    return flat


# ------------------------------------------------------------------------------------------------
# compress / decompress
# ------------------------------------------------------------------------------------------------


def _check_model(model: VQVAE) -> None:
    if model.cfg.dims != 2:
        raise CodecError(f".vqz files hold images: the model must be 2-D (dims=2), got dims={model.cfg.dims}")


def _check_prior(model: VQVAE, prior: Prior | None) -> None:
    if not isinstance(prior, Prior):
        raise CodecError("the range coder needs the prior (a TransformerPrior or PixelCNNPrior), got None")
    K = model.cfg.quantizer.codebook_size
    if prior.cfg.codebook_size != K:
        raise CodecError(f"the prior models {prior.cfg.codebook_size} codes but the model's codebook has {K}")
    if len(prior.cfg.grid) != 2:
        raise CodecError(f"images need a prior over 2-D code grids, got grid={prior.cfg.grid}")


def _check_counts(model: VQVAE, code_counts) -> np.ndarray:
    K = model.cfg.quantizer.codebook_size
    if code_counts is None:
        raise CodecError(f"the Huffman coder needs code_counts: ({K},) integer code frequencies of the training set")
    counts = torch.as_tensor(code_counts).detach().cpu()
    if counts.dtype.is_floating_point or counts.dtype.is_complex or counts.dtype == torch.bool:
        raise CodecError(f"code_counts must be integers, got {counts.dtype}")
    if tuple(counts.shape) != (K,) or bool((counts < 0).any()):
        raise CodecError(f"code_counts must be ({K},) non-negative integers, got shape {tuple(counts.shape)}")
    return counts.numpy().astype(np.int64)


def _check_images(model: VQVAE, images: list[Tensor]) -> list[tuple[int, int, int]]:
    C = model.cfg.in_channels
    if not isinstance(images, (list, tuple)) or not images:
        raise CodecError("nothing to compress: expected a non-empty list of (C, H, W) image tensors")
    if len(images) > MAX_IMAGES:
        raise CodecError(f"at most {MAX_IMAGES} images fit in one .vqz file, got {len(images)}")
    shapes = []
    for i, x in enumerate(images):
        if not isinstance(x, Tensor) or x.ndim != 3 or not x.dtype.is_floating_point:
            what = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise CodecError(f"image {i}: expected a float (C, H, W) tensor in [0, 1], got {what}")
        if x.shape[0] != C:
            raise CodecError(f"image {i} has {x.shape[0]} channels, the model takes {C}")
        if not (1 <= x.shape[1] <= MAX_SIDE and 1 <= x.shape[2] <= MAX_SIDE):
            raise CodecError(f"image {i} is {x.shape[1]}x{x.shape[2]}; sides must be 1..{MAX_SIDE}")
        shapes.append(tuple(int(s) for s in x.shape))
    if sum(math.prod(s) for s in shapes) > MAX_PIXELS:
        raise CodecError(f"at most {MAX_PIXELS} pixels fit in one .vqz file")
    return shapes


def _latent_shape(shape: tuple[int, int, int], factor: int) -> tuple[int, int]:
    return (-(-shape[1] // factor), -(-shape[2] // factor))  # padded to a multiple of factor, then divided


@torch.no_grad()
def compress(model: VQVAE, prior: Prior | None, images: list[Tensor], coder: str = "range",
             code_counts: Tensor | None = None) -> tuple[bytes, dict]:
    """Compress images into the bytes of one `.vqz` file.

    images: float (C, H, W) tensors in [0, 1], any sizes, C = model.cfg.in_channels; each is padded to a
    multiple of the downsample factor and encoded on its own (batch of one). coder "range" codes with
    `prior`; for a class-conditional prior each image gets the class that gives it the fewest bits,
    stored in the file. coder "huffman" uses `code_counts` ((K,) training-set code frequencies; the
    prior may be None). Returns (data, stats) with stats: bytes, header_bytes, payload_bytes, crc_bytes,
    num_images, bits_per_image (whole file), cross_entropy_bits (sum of -log2 p(code) under the exact
    integer probabilities the coder uses: the prior's quantized ones, or the smoothed code counts),
    overhead (bytes - cross_entropy_bits / 8), payload_overhead (the same for the payload alone), coder,
    labels (list or None) and codes (list of (h, w) int64 code grids).
    """
    if coder not in CODERS:
        raise CodecError(f"unknown coder {coder!r}; expected one of {', '.join(CODERS)}")
    _check_model(model)
    shapes = _check_images(model, images)
    if coder == "range":
        _check_prior(model, prior)
    else:
        counts = _check_counts(model, code_counts)
    factor, device = model.cfg.downsample, next(model.parameters()).device
    with eval_mode(model, prior):
        codes = []
        for x in images:
            codes.append(model.encode(x.to(device, torch.float32)[None]).codes[0].cpu())  # (h, w)
        flat = np.concatenate([c.reshape(-1).numpy() for c in codes]).astype(np.int64)
        labels = None
        if coder == "range":
            layout = _layout([tuple(c.shape) for c in codes], prior.hw)
            if prior.cfg.num_classes > 0:
                labels = _best_labels(prior, layout, flat, len(images))
            payload, bits = _range_encode(prior, layout, labels, flat)
            second_fingerprint = fingerprint(prior)
        else:
            payload, bits = _huffman_encode(counts, flat)
            second_fingerprint = _counts_fingerprint(counts)
        header = Header(coder, fingerprint(model), second_fingerprint, tuple(shapes),
                        None if labels is None else tuple(int(label) for label in labels))
    body = header.to_bytes() + payload
    data = body + zlib.crc32(body).to_bytes(CRC_BYTES, "little")
    stats = {
        "bytes": len(data),
        "header_bytes": len(body) - len(payload),
        "payload_bytes": len(payload),
        "crc_bytes": CRC_BYTES,
        "num_images": len(images),
        "bits_per_image": 8 * len(data) / len(images),
        "cross_entropy_bits": bits,
        "overhead": len(data) - bits / 8,
        "payload_overhead": len(payload) - bits / 8,
        "coder": coder,
        "labels": None if header.labels is None else list(header.labels),
        "codes": codes,
    }
    return data, stats


@torch.no_grad()
def decompress(model: VQVAE, prior: Prior | None, data: bytes, code_counts: Tensor | None = None) -> list[Tensor]:
    """The images of a `.vqz` file: (C, H, W) at their original sizes, on the model's device.

    Each equals unpad(model.decode(codes[None]))[0].clamp(0, 1) of the codes `compress` stored (decoded
    one image at a time, so a result never depends on the other images in the file). `prior` is needed
    for range-coded files, `code_counts` for Huffman ones. Raises CodecError for anything that is not an
    intact .vqz file made with this model and this prior (or these code counts).
    """
    header, payload = _parse(data)
    _check_model(model)
    with eval_mode(model, prior):
        if header.model_fingerprint != fingerprint(model):
            raise CodecError(f"this .vqz file was made with another model (fingerprint "
                             f"{header.model_fingerprint.hex()}, the given model's is {fingerprint(model).hex()})")
        for i, shape in enumerate(header.shapes):
            if shape[0] != model.cfg.in_channels:
                raise CodecError(f"image {i} has {shape[0]} channels, the model makes {model.cfg.in_channels}")
        factor = model.cfg.downsample
        latent_shapes = [_latent_shape(shape, factor) for shape in header.shapes]
        if header.coder == "range":
            _check_prior(model, prior)
            if header.prior_fingerprint != fingerprint(prior):
                raise CodecError(f"this .vqz file was made with another prior (fingerprint "
                                 f"{header.prior_fingerprint.hex()}, the given prior's is {fingerprint(prior).hex()})")
            num_classes = prior.cfg.num_classes
            if (header.labels is not None) != (num_classes > 0) or any(y >= num_classes for y in header.labels or ()):
                raise CodecError(f"corrupted .vqz header: class labels {header.labels} do not fit a prior with "
                                 f"num_classes={num_classes}")
            labels = None if header.labels is None else np.array(header.labels, dtype=np.int64)
            flat = _range_decode(prior, _layout(latent_shapes, prior.hw), labels, payload)
        else:
            counts = _check_counts(model, code_counts)
            if header.prior_fingerprint != _counts_fingerprint(counts):
                raise CodecError(f"this .vqz file was Huffman-coded with other code counts (fingerprint "
                                 f"{header.prior_fingerprint.hex()}, the given counts' is "
                                 f"{_counts_fingerprint(counts).hex()})")
            flat = _huffman_decode(counts, payload, sum(h * w for h, w in latent_shapes))
        device, images, offset = next(model.parameters()).device, [], 0
        for (_, H, W), (h, w) in zip(header.shapes, latent_shapes):
            codes = torch.from_numpy(flat[offset : offset + h * w].reshape(1, h, w)).to(device)
            offset += h * w
            images.append(model.decode(codes, (H, W))[0])
    return images
