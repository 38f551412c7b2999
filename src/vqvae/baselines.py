"""Classical image codecs through Pillow (PNG, JPEG, WebP): the rates vqvae's `.vqz` files are measured against.

Images are float tensors (B, C, H, W) in [0, 1], quantized to 8 bits before encoding, as any image file is.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from .data import to_uint8
from .metrics import psnr

FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def encode_pil(image: np.ndarray, fmt: str, quality: int | None) -> bytes:
    """One uint8 (H, W, C) image as the bytes of a `fmt` file ("png", "jpeg", "webp") at `quality`."""
    pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
    buffer = io.BytesIO()
    options = {"optimize": True} if fmt == "png" else {"quality": quality}  # Pillow's defaults otherwise
    pil.save(buffer, format=FORMATS[fmt], **options)
    return buffer.getvalue()


def rate_distortion(images: torch.Tensor, fmt: str, quality: int | None = None) -> dict:
    """Mean bits per image and mean PSNR (dB, against the 8-bit originals) of `fmt` at `quality`."""
    originals = to_uint8(images)  # (B, H, W, C)
    sizes, decoded = [], []
    for image in originals:
        data = encode_pil(image, fmt, quality)
        sizes.append(len(data))
        back = np.asarray(Image.open(io.BytesIO(data)).convert("L" if image.shape[2] == 1 else "RGB"))
        decoded.append(back.reshape(image.shape))
    reference = torch.from_numpy(originals).float() / 255
    restored = torch.from_numpy(np.stack(decoded)).float() / 255
    quality_psnr = psnr(restored.movedim(-1, 1), reference.movedim(-1, 1))
    finite = quality_psnr.clamp(max=100.0)  # lossless images: PSNR is infinite, report 100 dB
    return {"format": fmt, "quality": quality, "bits_per_image": 8 * float(np.mean(sizes)),
            "bytes_per_image": float(np.mean(sizes)), "psnr": float(finite.mean())}


def sweep(images: torch.Tensor, qualities: tuple[int, ...] = (1, 5, 10, 20, 30, 50, 70, 90)) -> list[dict]:
    """PNG once (lossless) and JPEG and WebP at each quality."""
    rows = [rate_distortion(images, "png")]
    for fmt in ("jpeg", "webp"):
        rows += [rate_distortion(images, fmt, q) for q in qualities]
    return rows


def smallest_at_psnr(rows: list[dict], fmt: str, min_psnr: float) -> dict | None:
    """The smallest-rate row of `fmt` whose PSNR is at least `min_psnr` (None if no quality reaches it)."""
    candidates = [r for r in rows if r["format"] == fmt and r["psnr"] >= min_psnr]
    return min(candidates, key=lambda r: r["bits_per_image"], default=None)
