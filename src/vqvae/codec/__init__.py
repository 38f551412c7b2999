"""The `.vqz` codec: images -> VQ-VAE codes -> entropy-coded bytes under the learned prior, and back.

    data, stats = compress(model, integer_prior, images)   # images: (C, H, W) floats in [0, 1], any sizes
    header = read_header(data)                             # what a file holds and which prior it needs
    images = decompress(model, prior, data)                # (C, H, W) each, at its size, decoded one by one
    codes = decompress_codes(model, prior, data)           # (h, w) int64 code grids, without the decoder

Two coders. "range": constriction's range coder, each code under the prior's probability given the
codes before it, driven step by step. "huffman": a static canonical Huffman code built from
training-set code counts (the baseline; the prior is not used).

`compress` writes format version 2: the range coder's frequencies come from an integer prior
(`vqvae.integer_priors.IntegerPrior`), exact on every machine, and the header records its `format_id`
(`header.integer_model`). Version-1 files, coded with a float prior, still decode with that float
prior (`header.version == 1`). Residual-VQ models write version 3, which records the stages coded
(`compress(..., stages=s)`: the first s stages, an operating point; `header.stages`). FSQ and dVAE
models write version 2 like the VQ-VAE. docs/format.md has the byte layout.

The package, one concept a module:
    container.py  the bytes: header fields, varints, CRC32 (fingerprints: `pretrained.fingerprint`)
    entropy.py    frequency sources (integer prior; float prior through `quantize_logits`), the layout
                  of sequences and tiles, the range coder they drive
    huffman.py    the canonical Huffman code (and why not constriction's)
    api.py        compress / decompress on top; the only two calls into the autoencoder
"""

from .api import compress, decode_image, decompress, decompress_codes, encode_image
from ..pretrained import fingerprint
from .container import MAGIC, VERSION, VERSIONS, Header, read_header
from .entropy import CHUNK, PRECISION, quantize_logits

__all__ = [
    "CHUNK", "MAGIC", "PRECISION", "VERSION", "VERSIONS", "Header",
    "compress", "decode_image", "decompress", "decompress_codes", "encode_image", "fingerprint",
    "quantize_logits", "read_header",
]
