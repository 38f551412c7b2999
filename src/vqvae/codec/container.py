"""The `.vqz` byte container: header, varints, CRC32 (docs/format.md has the byte layout).

    data = seal(header, payload)          # header bytes + payload + CRC32 of both
    header, payload = parse(data)         # magic, version, CRC, then the header's syntax; CodecError otherwise

Nothing here knows how the payload was made: the entropy coders (entropy.py, huffman.py) fill it and
api.py checks that the file fits the model and prior it is given.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from dataclasses import dataclass, field

import numpy as np

from ..errors import CodecError

MAGIC = b"VQZ"
VERSION = 2  # the version `compress` writes for codes of one grid per image
STAGES_VERSION = 3  # ... and for residual-VQ codes: version 2 plus the number of stages coded
VERSIONS = (1, 2, 3)  # the versions `parse` reads
FINGERPRINT_BYTES = 2  # with the payload check, enough to refuse another model's file
CRC_BYTES = 4
CODERS = ("range", "huffman")  # version 1: the flags' low nibble is the index into this
# Flags byte. Low nibble, version 1: the coder (0 range, 1 Huffman); version 2: the entropy model,
# 0 for the Huffman code, else the format_id of the integer prior that drove the range coder.
FLAG_UNIFORM, FLAG_LABELS, MODEL_MASK = 0x10, 0x20, 0x0F
FLAG_SEQUENCE = 0x80  # the inputs are sequences (sound): each shape is (C, T), not (C, H, W)
MAX_INTEGER_MODEL = MODEL_MASK
MAX_IMAGES, MAX_SIDE, MAX_PIXELS, MAX_LABEL, MAX_STAGES = 1 << 20, 1 << 16, 1 << 28, 1 << 16, 64
MAX_LENGTH = MAX_PIXELS  # samples of one sequence
MIN_FILE_BYTES = len(MAGIC) + 1 + 2 * FINGERPRINT_BYTES + 1 + 1 + 3 + CRC_BYTES  # empty payload: 17


@dataclass(frozen=True)
class Header:
    """What a `.vqz` file holds besides the payload.

    coder: "range" or "huffman". model_fingerprint: `fingerprint(model)`. prior_fingerprint:
    `fingerprint(prior)` for the range coder, `counts_fingerprint(counts)` for Huffman.
    shapes: (C, H, W) of each image, in file order ((C, T) of each sequence: FLAG_SEQUENCE). labels: the class each image was coded with
    (class-conditional priors), else None. version: the format version (1: range coder driven by a
    float prior; 2: by an integer prior; 3: as 2, for residual-VQ codes). integer_model: for version-2
    and -3 range-coded files the `format_id` of the integer prior (1 integer transformer, 2 integer
    PixelCNN), else 0. stages: version 3, the residual-VQ stages coded per position (the first `stages`
    of the model's; decoded with those), else 0 (one code grid per image).
    header_bytes / payload_bytes: sizes in the file read (0 for a header built in memory).
    """

    coder: str
    model_fingerprint: bytes
    prior_fingerprint: bytes
    shapes: tuple[tuple[int, ...], ...]
    labels: tuple[int, ...] | None = None
    version: int = VERSION
    integer_model: int = 0
    stages: int = 0
    header_bytes: int = field(default=0, compare=False)
    payload_bytes: int = field(default=0, compare=False)

    @property
    def num_images(self) -> int:
        return len(self.shapes)

    def to_bytes(self) -> bytes:
        """The header's bytes: magic, version, fingerprints, flags, (version 3: stages,) count, shapes, labels."""
        assert self.coder in CODERS and self.shapes and self.version in VERSIONS, (self.coder, self.version)
        assert (self.version == STAGES_VERSION) == (self.stages > 0) and self.stages <= MAX_STAGES, self.stages
        assert len(self.model_fingerprint) == len(self.prior_fingerprint) == FINGERPRINT_BYTES
        assert self.labels is None or len(self.labels) == len(self.shapes)
        if self.version == 1:
            assert self.integer_model == 0, self.integer_model
            model = CODERS.index(self.coder)
        else:
            ranged = 1 <= self.integer_model <= MAX_INTEGER_MODEL
            assert ranged if self.coder == "range" else self.integer_model == 0, (self.coder, self.integer_model)
            model = self.integer_model
        uniform = len(set(self.shapes)) == 1
        flags = model | (FLAG_UNIFORM if uniform else 0)
        flags |= 0 if self.labels is None else FLAG_LABELS
        assert len({len(shape) for shape in self.shapes}) == 1 and len(self.shapes[0]) in (2, 3), self.shapes
        flags |= FLAG_SEQUENCE if len(self.shapes[0]) == 2 else 0
        out = bytearray(MAGIC + bytes([self.version]) + self.model_fingerprint + self.prior_fingerprint)
        out.append(flags)
        if self.stages:
            _put_varint(out, self.stages)
        _put_varint(out, len(self.shapes))
        for shape in self.shapes[:1] if uniform else self.shapes:
            for value in shape:
                _put_varint(out, value)
        for label in self.labels or ():
            _put_varint(out, label)
        return bytes(out)


def seal(header: Header, payload: bytes) -> bytes:
    """The bytes of a whole file: header, payload, then the CRC32 of both (little-endian)."""
    body = header.to_bytes() + payload
    return body + zlib.crc32(body).to_bytes(CRC_BYTES, "little")


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


def _check_version(version: int) -> None:
    if version not in VERSIONS:
        newer = " (made by a newer vqvae: upgrade to read it)" if version > max(VERSIONS) else ""
        known = ", ".join(map(str, VERSIONS[:-1])) + f" and {VERSIONS[-1]}"
        raise CodecError(f"unsupported .vqz version {version}{newer}; this vqvae reads versions {known}")


def parse(data: bytes) -> tuple[Header, bytes]:
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
    _check_version(version)
    if len(data) < MIN_FILE_BYTES:
        raise CodecError(f"truncated .vqz file: {len(data)} bytes, a .vqz file has at least {MIN_FILE_BYTES}")
    body, stored = data[:-CRC_BYTES], int.from_bytes(data[-CRC_BYTES:], "little")
    if zlib.crc32(body) != stored:
        raise CodecError("corrupted or truncated .vqz file: CRC32 mismatch")

    reader = _Reader(body, len(MAGIC) + 1)
    model_fp = reader.take(FINGERPRINT_BYTES, "model fingerprint")
    prior_fp = reader.take(FINGERPRINT_BYTES, "prior fingerprint")
    flags = reader.take(1, "flags")[0]
    model = flags & MODEL_MASK
    if flags & ~(MODEL_MASK | FLAG_UNIFORM | FLAG_LABELS | FLAG_SEQUENCE) or (version == 1 and model >= len(CODERS)):
        raise CodecError(f"corrupted .vqz header: unknown flags 0x{flags:02x}")
    if version == 1:
        coder, integer_model = CODERS[model], 0
    else:
        coder, integer_model = ("range", model) if model else ("huffman", 0)
    stages = reader.varint("stages", 1, MAX_STAGES) if version == STAGES_VERSION else 0
    n = reader.varint("image count", 1, MAX_IMAGES)
    shapes = []
    for i in range(1 if flags & FLAG_UNIFORM else n):
        names = ("channels", "length") if flags & FLAG_SEQUENCE else ("channels", "height", "width")
        shapes.append(tuple(reader.varint(f"image {i} {name}", 1, MAX_LENGTH if name == "length" else MAX_SIDE)
                            for name in names))
    if flags & FLAG_UNIFORM:
        shapes = shapes * n
    elif n > 1 and len(set(shapes)) == 1:  # one file, one encoding: equal shapes are written once
        raise CodecError("corrupted .vqz header: equal image shapes written one by one (the uniform flag is off)")
    if sum(math.prod(s) for s in shapes) > MAX_PIXELS:
        raise CodecError(f"corrupted .vqz header: more than {MAX_PIXELS} pixels in all")
    labels = tuple(reader.varint(f"image {i} label", 0, MAX_LABEL) for i in range(n)) if flags & FLAG_LABELS else None
    header = Header(coder, model_fp, prior_fp, tuple(shapes), labels, version, integer_model, stages,
                    header_bytes=reader.pos, payload_bytes=len(body) - reader.pos)
    return header, body[reader.pos :]


def read_header(data: bytes) -> Header:
    """The header of a `.vqz` file after checking magic, version and CRC; raises CodecError otherwise."""
    return parse(data)[0]


def counts_fingerprint(counts: np.ndarray) -> bytes:
    """The Huffman files' second fingerprint: sha256 of b"code_counts\\0" + the counts as int64 little-endian."""
    return hashlib.sha256(b"code_counts\0" + counts.astype("<i8").tobytes()).digest()[:FINGERPRINT_BYTES]
