"""The `.vqz` codec: images -> VQ-VAE codes -> entropy-coded bytes under the learned prior, and back.

    data, stats = compress(model, prior, images)      # images: (C, H, W) floats in [0, 1], any sizes
    images = decompress(model, prior, data)           # (C, H, W) each, at its size, decoded one by one
    codes = decompress_codes(model, prior, data)      # (h, w) int64 code grids, without the decoder
    header = read_header(data)                        # what a file holds, without decoding it

Two coders. "range": constriction's range coder, each code under the prior's probability given the
codes before it, driven step by step. "huffman": a static canonical Huffman code built from
training-set code counts (the baseline; the prior is not used).

The package, one concept a module:
    container.py  the bytes: header fields, varints, CRC32, fingerprints (docs/format.md)
    entropy.py    integer frequencies (`quantize_logits`), the layout of sequences and tiles, the range
                  coder driven by a frequency source
    huffman.py    the canonical Huffman code
    api.py        compress / decompress on top; the only two calls into the autoencoder
"""

from .api import compress, decode_image, decompress, decompress_codes, encode_image
from .container import MAGIC, VERSION, Header, fingerprint, read_header
from .entropy import CHUNK, PRECISION, quantize_logits

__all__ = [
    "CHUNK", "MAGIC", "PRECISION", "VERSION", "Header",
    "compress", "decode_image", "decompress", "decompress_codes", "encode_image", "fingerprint",
    "quantize_logits", "read_header",
]
