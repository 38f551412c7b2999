"""compress / decompress: images -> VQ-VAE codes -> a `.vqz` file, and back.

Key: C H W one image's channels and size, h w its latent grid, K codebook size, N codes in a file.

The model is called in two functions only, `encode_image` and `decode_image`; the rest checks
arguments, builds the header and hands the codes to a coder (entropy.py, huffman.py).

A VQ-VAE-2 (`VQVAE2`) codes each image as one sequence of L codes, its top grid then its bottom grid in
raster order (`VQVAE2.sequence`), which its prior (`PriorConfig.levels`) models whole: an image must have
the grids the prior was trained on (the training image size, or any size with the same grids).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..autoencoders import VQVAE
from ..errors import CodecError
from ..hierarchical import VQVAE2
from ..integer_priors import FORMAT_IDS, IntegerPrior
from ..nets import eval_mode
from ..pretrained import fingerprint
from ..priors import Prior
from . import entropy, huffman
from .container import (CODERS, CRC_BYTES, MAX_IMAGES, MAX_INTEGER_MODEL, MAX_PIXELS, MAX_SIDE, STAGES_VERSION,
                        VERSION, Header, counts_fingerprint, parse, seal)

# ------------------------------------------------------------------------------------------------
# The autoencoder
# ------------------------------------------------------------------------------------------------


def encode_image(model: VQVAE | VQVAE2, x: Tensor, stages: int = 0) -> Tensor:
    """One image (C, H, W) in [0, 1], any size -> its codes (h, w) int64 on the CPU (a batch of one);
    with residual VQ, those of the first `stages` stages (s, h, w); a VQ-VAE-2's sequence (L,)."""
    encoded = model.encode(x.to(model.device, torch.float32)[None])
    if isinstance(model, VQVAE2):
        return model.sequence(encoded)[0].cpu()
    codes = encoded.codes[0].cpu()
    return codes[:stages] if stages else codes


def decode_image(model: VQVAE | VQVAE2, codes: Tensor, size: tuple[int, int]) -> Tensor:
    """Codes (h, w) (residual VQ: (s, h, w), the first s stages; VQ-VAE-2: (L,)) -> the image (C, H, W) in
    [0, 1] at size (H, W), on the model's device (a batch of one)."""
    codes = codes[None].to(model.device)
    if isinstance(model, VQVAE2):
        return model.decode(model.from_sequence(codes, model.levels(size), size))[0]
    return model.decode(codes, size)[0]


def latent_shape(shape: tuple[int, ...], factor: int) -> tuple[int, ...]:
    """The latent grid (h, w) of a (C, H, W) image: the format's ceil(H / f) x ceil(W / f); (ceil(T / f),)
    of a (C, T) sequence."""
    return tuple(-(-s // factor) for s in shape[1:])


def code_shape(model: VQVAE | VQVAE2, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The codes of one (C, H, W) image (or (C, T) sequence) as the coder sees them: its latent grid,
    or a VQ-VAE-2's sequence (L,) of both grids."""
    if isinstance(model, VQVAE2):
        return (sum(math.prod(level) for level in model.levels(shape[1:])),)
    return latent_shape(shape, model.cfg.downsample)


def _rows(shape: tuple[int, ...]) -> tuple[int, int]:
    """A latent grid as the coder's (h, w): a sequence of T' codes is one row (1, T'), as the priors see it."""
    return (1, shape[0]) if len(shape) == 1 else shape


# ------------------------------------------------------------------------------------------------
# Checks at the boundary
# ------------------------------------------------------------------------------------------------


def _check_model(model: VQVAE | VQVAE2) -> None:
    if not isinstance(model, (VQVAE, VQVAE2)) or (isinstance(model, VQVAE2) and model.code_stages):
        raise CodecError(f".vqz files hold integer codes (VQVAE with vq, ema, fsq or rvq quantizers, DVAE, VQVAE2 "
                         f"with vq, ema or fsq), not those of a {type(model).__name__}"
                         + (" with residual-VQ quantizers" if isinstance(model, VQVAE2) else ""))
    if model.cfg.dims not in (1, 2):
        raise CodecError(f".vqz files hold images or sequences: the model must be 2-D or 1-D, got dims={model.cfg.dims}")


def _what(prior) -> str:
    return "None" if prior is None else type(prior).__name__


def _model_name(format_id: int) -> str:
    known = FORMAT_IDS.get(format_id)
    return f"integer model {format_id}" + (f", {known.__name__}" if known is not None else ", unknown to this vqvae")


def _check_prior(model: VQVAE, prior: Prior | IntegerPrior) -> None:
    K = model.cfg.quantizer.codebook_size
    if prior.cfg.codebook_size != K:
        raise CodecError(f"the prior models {prior.cfg.codebook_size} codes but the model's codebook has {K}")
    if isinstance(model, VQVAE2) != bool(prior.cfg.levels):
        raise CodecError("a VQ-VAE-2 needs a prior over its top and bottom codes (PriorConfig.levels)"
                         if prior.cfg.levels == () else "the prior models a VQ-VAE-2's two code grids, the model "
                         "has one")
    if not prior.cfg.levels and len(prior.cfg.grid) != model.cfg.dims:
        raise CodecError(f"a {model.cfg.dims}-D model needs a prior over {model.cfg.dims}-D code grids, "
                         f"got grid={prior.cfg.grid}")
    if prior.cfg.stages != model.code_stages:
        raise CodecError(f"the prior models {prior.cfg.stages} residual-VQ stages, the model's codes have "
                         f"{model.code_stages}")


def _check_levels(model: VQVAE | VQVAE2, prior, shapes: list[tuple[int, ...]]) -> None:
    """A VQ-VAE-2's images must have the grids its prior models (one sequence, no tiling)."""
    if not isinstance(model, VQVAE2) or prior is None:
        return
    for i, shape in enumerate(shapes):
        levels = model.levels(shape[1:])
        if levels != prior.cfg.levels:
            raise CodecError(f"image {i} is {'x'.join(map(str, shape[1:]))}: its code grids {levels} (top, bottom) "
                             f"are not the prior's {prior.cfg.levels}; a VQ-VAE-2's .vqz holds images of the "
                             f"size its prior was trained on")


def _check_stages(model: VQVAE, stages: int | None) -> int:
    """The stages to code: all of the model's by default; 0 for a model without stages."""
    Q = model.code_stages
    if stages is None:
        return Q
    if Q == 0:
        raise CodecError(f"stages apply to residual-VQ models only; this model's codes have no stages, got {stages}")
    if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= Q:
        raise CodecError(f"stages must be an integer in 1..{Q} (the model's residual-VQ stages), got {stages!r}")
    return stages


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
    C, dims = model.cfg.in_channels, model.cfg.dims
    if not isinstance(images, (list, tuple)) or not images:
        raise CodecError("nothing to compress: expected a non-empty list of (C, H, W) image tensors")
    if len(images) > MAX_IMAGES:
        raise CodecError(f"at most {MAX_IMAGES} images fit in one .vqz file, got {len(images)}")
    shapes = []
    for i, x in enumerate(images):
        if not isinstance(x, Tensor) or x.ndim != dims + 1 or not x.dtype.is_floating_point:
            what = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise CodecError(f"image {i}: expected a float {'(C, T)' if dims == 1 else '(C, H, W)'} tensor in [0, 1], "
                             f"got {what}")
        if x.shape[0] != C:
            raise CodecError(f"image {i} has {x.shape[0]} channels, the model takes {C}")
        if dims == 1 and not 1 <= x.shape[1] <= MAX_PIXELS:
            raise CodecError(f"image {i} has {x.shape[1]} samples; a sequence holds 1..{MAX_PIXELS}")
        if dims == 2 and not (1 <= x.shape[1] <= MAX_SIDE and 1 <= x.shape[2] <= MAX_SIDE):
            raise CodecError(f"image {i} is {x.shape[1]}x{x.shape[2]}; sides must be 1..{MAX_SIDE}")
        shapes.append(tuple(int(s) for s in x.shape))
    if sum(math.prod(s) for s in shapes) > MAX_PIXELS:
        raise CodecError(f"at most {MAX_PIXELS} pixels fit in one .vqz file")
    return shapes


def _check_range_prior(model: VQVAE, prior, header: Header) -> None:
    """The prior a range-coded file needs: the float prior for version 1, the integer prior that the
    header names for version 2."""
    if header.version == 1:
        if not isinstance(prior, Prior):
            raise CodecError(f"this version-1 .vqz file was range-coded with a float prior: decompress it with "
                             f"that prior (load_prior), got {_what(prior)}")
    elif not isinstance(prior, IntegerPrior):
        raise CodecError(f"this .vqz file was range-coded with an integer prior ({_model_name(header.integer_model)}):"
                         f" decompress it with that integer prior (load_integer_prior), got {_what(prior)}")
    elif prior.format_id != header.integer_model:
        raise CodecError(f"this .vqz file was range-coded with {_model_name(header.integer_model)}, "
                         f"the given prior is {_model_name(prior.format_id)}")
    _check_prior(model, prior)


def _check_integer_prior(model: VQVAE, prior) -> None:
    if isinstance(prior, Prior):
        raise CodecError(f"new .vqz files are range-coded with an integer prior (IntegerPrior.from_prior), "
                         f"whose frequencies are the same on every machine; got the float {type(prior).__name__}")
    if not isinstance(prior, IntegerPrior):
        raise CodecError(f"the range coder needs the integer prior (vqvae.integer_priors), got {_what(prior)}")
    if not 1 <= prior.format_id <= MAX_INTEGER_MODEL:
        raise CodecError(f"{type(prior).__name__} has format_id {prior.format_id}; .vqz headers hold 1..15")
    _check_prior(model, prior)


def _check_labels(labels, prior, coder: str, n: int) -> np.ndarray | None:
    """Given labels -> (N,) int64; only for a class-conditional prior's range coder."""
    if labels is None:
        return None
    num_classes = prior.cfg.num_classes if coder == "range" and prior is not None else 0
    if num_classes == 0:
        raise CodecError("labels are stored only for a class-conditional prior's range coder; pass labels=None")
    array = np.asarray(labels)
    ok = array.shape == (n,) and np.issubdtype(array.dtype, np.integer)
    if not ok or not ((0 <= array) & (array < num_classes)).all():
        values = f" in {array.min()}..{array.max()}" if ok else ""
        raise CodecError(f"labels must be {n} integers in 0..{num_classes - 1} (one per image), "
                         f"got {array.dtype} {array.shape}{values}")
    return array.astype(np.int64)


# ------------------------------------------------------------------------------------------------
# compress / decompress
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def compress(model: VQVAE, prior: IntegerPrior | None, images: list[Tensor], coder: str = "range",
             code_counts: Tensor | None = None, labels=None, label_prior: Prior | None = None,
             stages: int | None = None) -> tuple[bytes, dict]:
    """Compress images into the bytes of one `.vqz` file (format version 2; 3 for residual-VQ codes).

    images: float (C, H, W) tensors in [0, 1], any sizes, C = model.cfg.in_channels; each is encoded on
    its own (batch of one). coder "range" codes with `prior`, an integer prior (`IntegerPrior`: the same
    frequencies on every machine; a float prior is refused); for a class-conditional prior each image
    gets the class in `labels` ((N,) integers), or if None the class that gives it the fewest bits, stored
    in the file: under `label_prior` (the float prior the integer one was made from: one full pass per
    class, a fraction of the coding time) if given, else under the integer prior itself (about
    num_classes times the coding time). The choice only needs to be good, not reproducible. coder "huffman" uses `code_counts`
    ((K,) training-set code frequencies; the prior may be None). Returns (data, stats) with stats: bytes,
    header_bytes, payload_bytes, crc_bytes, num_images, bits_per_image (whole file), cross_entropy_bits
    (sum of -log2 p(code) under the exact integer probabilities the coder uses: the integer prior's,
    or the smoothed code counts), overhead (bytes - cross_entropy_bits / 8), payload_overhead (the
    same for the payload alone), coder, labels (list or None), stages and codes (list of (h, w) int64
    code grids; (s, h, w) with residual VQ).

    stages (residual-VQ models only): code the first s stages of each position (default: all), an
    operating point of the model, recorded in the header; `decompress` decodes with those s stages. The
    prior models all stages (`prior.cfg.stages` = the model's): the first s are a prefix of its sequence.
    """
    if coder not in CODERS:
        raise CodecError(f"unknown coder {coder!r}; expected one of {', '.join(CODERS)}")
    _check_model(model)
    shapes = _check_images(model, images)
    stages = _check_stages(model, stages)
    if coder == "range":
        _check_integer_prior(model, prior)
    else:
        counts = _check_counts(model, code_counts)
    labels = _check_labels(labels, prior, coder, len(images))
    _check_levels(model, prior if coder == "range" else None, shapes)
    with eval_mode(model, prior):
        codes = [encode_image(model, x, stages) for x in images]  # (h, w) each, ([s,] h, w) with stages
        for i, (c, shape) in enumerate(zip(codes, shapes)):
            expected = (stages,) * bool(stages) + code_shape(model, shape)
            assert tuple(c.shape) == expected, (i, tuple(c.shape), shape)
        flat = np.concatenate([c.reshape(-1).numpy() for c in codes]).astype(np.int64)  # (N,)
        if coder == "range":
            source = entropy.IntegerPriorFrequencies(prior)
            layout = entropy.make_layout([_rows(code_shape(model, shape)) for shape in shapes], source.hw,
                                         max(stages, 1))
            if prior.cfg.num_classes > 0 and labels is None and label_prior is not None:
                labels = entropy.best_labels_full_pass(label_prior, layout, flat, len(images))
            elif prior.cfg.num_classes > 0 and labels is None:
                labels = entropy.best_labels(source, layout, flat, len(images), prior.cfg.num_classes)
            payload, bits = entropy.range_encode(source, layout, labels, flat)
            second_fingerprint = fingerprint(prior)
        else:
            payload, bits = huffman.encode(counts, flat)
            second_fingerprint = counts_fingerprint(counts)
    header = Header(coder, fingerprint(model), second_fingerprint, tuple(shapes),
                    None if labels is None else tuple(int(label) for label in labels),
                    STAGES_VERSION if stages else VERSION, prior.format_id if coder == "range" else 0, stages)
    data = seal(header, payload)
    stats = {
        "bytes": len(data),
        "header_bytes": len(data) - len(payload) - CRC_BYTES,
        "payload_bytes": len(payload),
        "crc_bytes": CRC_BYTES,
        "num_images": len(images),
        "bits_per_image": 8 * len(data) / len(images),
        "cross_entropy_bits": bits,
        "overhead": len(data) - bits / 8,
        "payload_overhead": len(payload) - bits / 8,
        "coder": coder,
        "labels": None if header.labels is None else list(header.labels),
        "stages": stages,
        "codes": codes,
    }
    return data, stats


@torch.no_grad()
def decompress_codes(model: VQVAE, prior: IntegerPrior | Prior | None, data: bytes,
                     code_counts: Tensor | None = None) -> list[Tensor]:
    """The code grids of a `.vqz` file's images: (h, w) int64 on the CPU ((s, h, w), the stages coded, for
    residual-VQ files), what `compress` coded.

    Same arguments and checks as `decompress`, without running the autoencoder's decoder.
    """
    return _decode_codes(model, prior, data, code_counts)[1]


def _check_payload_length(header: Header, payload: bytes, num_codes: int, K: int) -> None:
    """Refuse, before running the prior, a payload too short to hold `num_codes` range-coded codes.

    A code's frequency is at most 2**PRECISION - (K - 1) (every other code gets at least 1), so each
    costs at least -log2(1 - (K - 1) / 2**PRECISION) bits, and the coder's output is whole 32-bit words,
    at least one. A crafted header claiming a huge image over a few bytes is refused at once.
    """
    least_bits = num_codes * -math.log2(1 - (K - 1) / 2**entropy.PRECISION)
    least_words = max(1, math.ceil(least_bits / 32 * (1 - 1e-9)))
    if len(payload) < 4 * least_words:
        raise CodecError(f"corrupted .vqz payload: {len(payload)} bytes cannot hold the {num_codes} codes the "
                         f"header claims (at least {4 * least_words} bytes)")


def _decode_codes(model: VQVAE, prior, data: bytes, code_counts) -> tuple[Header, list[Tensor]]:
    header, payload = parse(data)
    _check_model(model)
    if header.model_fingerprint != fingerprint(model):
        raise CodecError(f"this .vqz file was made with another model (fingerprint "
                         f"{header.model_fingerprint.hex()}, the given model's is {fingerprint(model).hex()})")
    for i, shape in enumerate(header.shapes):
        if shape[0] != model.cfg.in_channels:
            raise CodecError(f"image {i} has {shape[0]} channels, the model makes {model.cfg.in_channels}")
    if len(header.shapes[0]) != model.cfg.dims + 1:
        raise CodecError(f"this .vqz file holds {'sequences' if len(header.shapes[0]) == 2 else 'images'}, the "
                         f"model is {model.cfg.dims}-D")
    if header.stages > model.code_stages:
        raise CodecError(f"this .vqz file holds {header.stages} residual-VQ stages per position, the model's codes "
                         f"have {model.code_stages}" if model.code_stages else
                         f"this .vqz file holds residual-VQ codes ({header.stages} stages), the model has no stages")
    if model.code_stages and not header.stages:
        raise CodecError("this .vqz file holds codes of one grid per image, the model's are residual-VQ stages")
    latent_shapes = [code_shape(model, shape) for shape in header.shapes]
    rows = [_rows(shape) for shape in latent_shapes]
    per_image = max(header.stages, 1)  # code grids per image
    with eval_mode(model, prior):
        if header.coder == "range":
            _check_range_prior(model, prior, header)
            _check_levels(model, prior, list(header.shapes))
            _check_payload_length(header, payload, per_image * sum(h * w for h, w in rows),
                                  prior.cfg.codebook_size)
            if header.prior_fingerprint != fingerprint(prior):
                raise CodecError(f"this .vqz file was made with another prior (fingerprint "
                                 f"{header.prior_fingerprint.hex()}, the given prior's is {fingerprint(prior).hex()})")
            num_classes = prior.cfg.num_classes
            if (header.labels is not None) != (num_classes > 0) or any(y >= num_classes for y in header.labels or ()):
                raise CodecError(f"corrupted .vqz header: class labels {header.labels} do not fit a prior with "
                                 f"num_classes={num_classes}")
            labels = None if header.labels is None else np.array(header.labels, dtype=np.int64)
            source = entropy.frequency_source(prior)
            flat = entropy.range_decode(source, entropy.make_layout(rows, source.hw, per_image), labels, payload)
        else:
            counts = _check_counts(model, code_counts)
            if header.prior_fingerprint != counts_fingerprint(counts):
                raise CodecError(f"this .vqz file was Huffman-coded with other code counts (fingerprint "
                                 f"{header.prior_fingerprint.hex()}, the given counts' is "
                                 f"{counts_fingerprint(counts).hex()})")
            flat = huffman.decode(counts, payload, per_image * sum(h * w for h, w in rows))
    shapes = [(header.stages,) * bool(header.stages) + shape for shape in latent_shapes]  # ([s,] h, w) or ([s,] t)
    ends = np.cumsum([math.prod(shape) for shape in shapes])
    grids = [torch.from_numpy(part.reshape(shape)) for part, shape in zip(np.split(flat, ends[:-1]), shapes)]
    return header, grids


@torch.no_grad()
def decompress(model: VQVAE, prior: IntegerPrior | Prior | None, data: bytes,
               code_counts: Tensor | None = None) -> list[Tensor]:
    """The images of a `.vqz` file: (C, H, W) in [0, 1] at their original sizes, on the model's device.

    Each is decoded on its own (a batch of one), so a result never depends on the other images in the
    file. Range-coded files need their prior: the integer prior (`IntegerPrior`) whose format_id
    `read_header(data).integer_model` names for version 2, the float prior for version 1
    (`read_header(data).version`); Huffman files need `code_counts`. Raises CodecError for anything that
    is not an intact .vqz file made with this model and this prior (or these code counts).
    """
    header, grids = _decode_codes(model, prior, data, code_counts)
    with eval_mode(model):
        return [decode_image(model, codes, shape[1:]) for codes, shape in zip(grids, header.shapes)]
