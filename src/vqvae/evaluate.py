"""What a trained run is worth: reconstruction figures, bits per dimension, the compression table, the
reconstruction grid. Functions a Python user calls; `vqvae eval`, `train`, `prior` and `demo` print them.

Images are float tensors (N, C, H, W) in [0, 1] of any size (the model pads and crops); code grids are
integer tensors (N, *S').
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .metrics import bits_per_dim, code_histogram, codes_used, fit_log_scale, perplexity, psnr, ssim
from .nets import eval_mode


@torch.no_grad()
def encode_dataset(model, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Images (N, C, H, W) -> int16 code grids (N, *S'), in batches on the model's device."""
    with eval_mode(model):
        grids = [model.encode(images[i:i + batch_size].to(model.device)).codes.cpu()
                 for i in range(0, len(images), batch_size)]
    return torch.cat(grids).to(torch.int16)


@torch.no_grad()
def reconstruct_dataset(model, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """decode(encode(x)) of images (N, C, H, W) -> (N, C, H, W) in [0, 1] on the CPU, in batches."""
    with eval_mode(model):
        return torch.cat([model.reconstruct(images[i:i + batch_size].to(model.device)).cpu()
                          for i in range(0, len(images), batch_size)])


@torch.no_grad()
def evaluate_autoencoder(model, images: torch.Tensor, batch_size: int = 250) -> dict:
    """Held-out figures of an autoencoder on images (N, C, H, W) in [0, 1].

    psnr and ssim are means over images; mse is per pixel; perplexity and codes_used describe the code
    histogram of the whole split.
    """
    K = model.cfg.quantizer.codebook_size
    counts = torch.zeros(K, dtype=torch.long)
    psnrs, ssims, mses = [], [], []
    with eval_mode(model):
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(model.device)
            encoded = model.encode(x)
            x_hat = model.decode(encoded)
            counts += code_histogram(encoded.codes.cpu(), K)
            psnrs.append(psnr(x_hat, x).cpu())
            if x.dim() == 4:  # images; sound (B, 1, T) has no SSIM
                ssims.append(ssim(x_hat, x).cpu())
            mses.append((x_hat - x).pow(2).flatten(1).mean(1).cpu())
    return {
        "psnr": float(torch.cat(psnrs).mean()),
        "ssim": float(torch.cat(ssims).mean()) if ssims else float("nan"),
        "mse": float(torch.cat(mses).mean()),
        "perplexity": float(perplexity(counts)),
        "codes_used": codes_used(counts),
        "images": int(images.shape[0]),
    }


def prior_figures(prior, codes: dict) -> dict:
    """Held-out bits of the codes under `prior` next to the uniform prior's log2 K bits per latent.

    codes: {"test": (N, *grid) code grids, ...} as `train.cached_codes` returns. For a class-conditional
    prior the bits are of the marginal over classes (the label is not part of the data).
    """
    from .priors import prior_bits

    nll = float(prior_bits(prior, codes["test"]).mean())
    L = prior.seq_len
    return {"nll_bits_per_latent": nll / L, "nll_bits_per_image": nll,
            "uniform_bits_per_latent": math.log2(prior.cfg.codebook_size), "latents_per_image": L,
            "arch": prior.cfg.arch, "class_conditional": bool(prior.cfg.num_classes)}


def likelihood(model, prior, train_images: torch.Tensor, test_images: torch.Tensor) -> dict:
    """bits_per_dim of the test images: prior bits of their codes + discretized-Gaussian pixel bits, per
    dimension (an upper bound on -log2 p(x), as the VQ-VAE paper reports); the decoder's noise scale is
    fitted on (up to 1,000) training images. See `metrics.bits_per_dim`."""
    from .priors import prior_bits

    train = train_images[:1000]
    log_scale = fit_log_scale(train, reconstruct_dataset(model, train))
    z = encode_dataset(model, test_images)
    bpd = bits_per_dim(prior_bits(prior, z), test_images, reconstruct_dataset(model, test_images), log_scale)
    return {"bits_per_dim": float(bpd.mean()), "decoder_log_scale": log_scale}


def integer_prior_figures(integer_prior, codes: torch.Tensor) -> dict:
    """Held-out bits per latent under the integer prior (what the range coder pays), marginal over classes
    for a class-conditional prior: -log2 (1/Y) sum_y 2^-bits(z | y)."""
    z = torch.as_tensor(codes).long()
    Y = integer_prior.cfg.num_classes
    if Y:
        per_class = torch.stack([integer_prior.bits(z, torch.full((len(z),), y, dtype=torch.long))
                                 for y in range(Y)])  # (Y, N) bits
        bits = -(torch.logsumexp(-per_class * math.log(2), 0) - math.log(Y)) / math.log(2)
    else:
        bits = integer_prior.bits(z)
    return {"integer_bits_per_latent": float(bits.mean()) / integer_prior.seq_len}


def evaluate_run(run, data: str | None = None) -> dict:
    """Every figure of a run on its held-out split (or on the held-out split of dataset URI `data`):
    evaluate_autoencoder's, and with a prior its held-out bits per latent (float and integer models) and
    bits_per_dim. Images of another channel count are converted (gray <-> RGB) as `reconstruct` does."""
    from .data import to_channels

    model, dataset = run.model(), run.dataset(data)
    channels = model.cfg.in_channels
    dataset.train, dataset.test = to_channels(dataset.train, channels), to_channels(dataset.test, channels)
    figures = evaluate_autoencoder(model, dataset.test)
    if run.has_prior():
        prior = run.prior()
        codes = encode_dataset(model, dataset.test)
        if tuple(codes.shape[1:]) == prior.cfg.grid:
            figures.update({k: v for k, v in prior_figures(prior, {"test": codes}).items()
                            if k in ("nll_bits_per_latent", "uniform_bits_per_latent")})
            if run.has_integer_prior():
                figures.update(integer_prior_figures(run.integer_prior(), codes))
            figures.update(likelihood(model, prior, dataset.train, dataset.test))
    return figures


def compression_table(run, model_psnr: float, write: Path | None = None, single_files: int = 50) -> dict:
    """Bytes per held-out image: .vqz (one file of the whole split, and one file per image for the first
    `single_files`) next to PNG, and the smallest JPEG and WebP files at or above `model_psnr`.
    `write`: where to save the whole-split .vqz file."""
    from . import baselines

    test = run.dataset().test
    many, stats = run.compress(list(test))
    if write is not None:
        from .data import write_bytes

        write_bytes(write, many)
    single = [len(run.compress([x])[0]) for x in test[:single_files]]
    rows = baselines.sweep(test)
    table = {f".vqz, one file of {len(test)} (payload bytes/image)": stats["payload_bytes"] / len(test),
             f".vqz, one file per image (bytes, first {len(single)})": sum(single) / len(single),
             ".vqz PSNR (dB)": model_psnr,
             "PNG (lossless)": rows[0]["bytes_per_image"]}
    for fmt in ("jpeg", "webp"):
        best = baselines.smallest_at_psnr(rows, fmt, model_psnr)
        if best is not None:
            table[f"{fmt.upper()} q{best['quality']} ({best['psnr']:.1f} dB)"] = best["bytes_per_image"]
    return table
