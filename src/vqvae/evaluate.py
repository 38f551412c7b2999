"""What a trained run is worth: reconstruction figures, bits per dimension, the compression table, the
reconstruction grid, and whether a class-conditional prior's samples read as their class (a small
classifier trained on the training images reads them). Functions a Python user calls; `vqvae eval`,
`train`, `prior` and `demo` print them.

Images are float tensors (N, C, H, W) in [0, 1] of any size (the model pads and crops); code grids are
integer tensors (N, *S').
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .errors import ConfigError, RunError
from .metrics import bits_per_dim, code_histogram, codes_used, fit_log_scale, perplexity, psnr, ssim
from .nets import eval_mode


@torch.no_grad()
def encode_dataset(model, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Images (N, C, H, W) -> int16 code grids (N, *S') ((N, Q, *S') with residual VQ; a VQ-VAE-2's
    (N, L), its `sequence`: top grid then bottom grid), in batches on the model's device. Models without
    integer codes (AE, VAE) are a `RunError`."""
    if not model.discrete:
        raise RunError(f"a {model.cfg.model!r} model has continuous latents, not integer codes")
    two_level = hasattr(model, "levels")  # VQ-VAE-2
    if two_level and model.code_stages:
        raise RunError("a 'vqvae2' model with residual-VQ quantizers has several codes per position of two grids; "
                       "priors and .vqz files take its vq, ema or fsq variants")
    with eval_mode(model):
        grids = []
        for i in range(0, len(images), batch_size):
            encoded = model.encode(images[i:i + batch_size].to(model.device))
            grids.append((model.sequence(encoded) if two_level else encoded.codes).cpu())
    return torch.cat(grids).to(torch.int16)


@torch.no_grad()
def reconstruct_dataset(model, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """decode(encode(x)) of images (N, C, H, W) -> (N, C, H, W) in [0, 1] on the CPU, in batches."""
    with eval_mode(model):
        return torch.cat([model.reconstruct(images[i:i + batch_size].to(model.device)).cpu()
                          for i in range(0, len(images), batch_size)])


def code_grids(model, encoded) -> dict[str, list[torch.Tensor]]:
    """The integer code grids of `model.encode`'s output, by codebook: {"": [grid, ...]} for one codebook,
    one grid per residual-VQ stage ((B, *S') each), and {"": bottom grids, "top_": top grids} for the
    VQ-VAE-2 (the prefix is that of the figures' keys)."""
    if hasattr(encoded, "top"):  # Encoded2
        return {"": _stages(model.quantizer, encoded.bottom), "top_": _stages(model.top_quantizer, encoded.top)}
    return {"": _stages(model.quantizer, encoded.codes)}


def _stages(quantizer, codes: torch.Tensor) -> list[torch.Tensor]:
    """(B, *S') -> [codes]; residual VQ's (B, Q, *S') -> Q grids (B, *S')."""
    return list(codes.unbind(1)) if hasattr(quantizer, "num_stages") else [codes]


def _bits_per_position(quantizer) -> float:
    """log2 K bits per code position under the uniform prior (residual VQ: log2 K for each of its stages)."""
    return math.log2(quantizer.codebook_size) * getattr(quantizer, "num_stages", 1)


def uniform_bits_per_image(model, size: tuple[int, ...]) -> float:
    """Bits of the codes of one image of spatial size `size` under the uniform prior: log2 K per code, over
    every grid (the VQ-VAE-2's top grid too). The paper's constant KL of a VQ-VAE without a learned prior."""
    bits = math.prod(model.code_shape(size)) * _bits_per_position(model.quantizer)
    if hasattr(model, "top_quantizer"):  # VQ-VAE-2
        bits += math.prod(model.top_shape(size)) * _bits_per_position(model.top_quantizer)
    return bits


@torch.no_grad()
def evaluate_autoencoder(model, images: torch.Tensor, batch_size: int = 250,
                         train_images: torch.Tensor | None = None) -> dict:
    """Held-out figures of any model of the family (models.py) on images (N, C, H, W) in [0, 1].

    psnr and ssim are means over images; mse is per pixel. Models with codes add perplexity and
    codes_used of the code histogram of the whole split (with residual VQ, means over the stages; the
    VQ-VAE-2 adds top_perplexity and top_codes_used for its top grid). With `train_images` (whose first
    1,000 fit the decoder's noise scale), bits per dimension (upper bounds on -log2 p(x) per 8-bit
    dimension, `bits_figures`): uniform_bits_per_dim for models with codes, elbo_bits_per_dim (with
    kl_bits_per_dim and nll_bits_per_dim) for the VAE; none for the AE, which has no likelihood.
    """
    counts: dict[str, list[torch.Tensor]] = {}
    psnrs, ssims, mses = [], [], []
    with eval_mode(model):
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(model.device)
            encoded = model.encode(x)
            x_hat = model.decode(encoded)
            if model.discrete:
                for prefix, grids in code_grids(model, encoded).items():
                    K = (model.top_quantizer if prefix else model.quantizer).codebook_size
                    hists = [code_histogram(g.cpu(), K) for g in grids]
                    counts[prefix] = hists if prefix not in counts else [a + b for a, b in zip(counts[prefix], hists)]
            psnrs.append(psnr(x_hat, x).cpu())
            if x.dim() == 4:  # images; sound (B, 1, T) has no SSIM
                ssims.append(ssim(x_hat, x).cpu())
            mses.append((x_hat - x).pow(2).flatten(1).mean(1).cpu())
    figures = {
        "psnr": float(torch.cat(psnrs).mean()),
        "ssim": float(torch.cat(ssims).mean()) if ssims else float("nan"),
        "mse": float(torch.cat(mses).mean()),
    }
    for prefix, hists in counts.items():
        figures[f"{prefix}perplexity"] = sum(float(perplexity(h)) for h in hists) / len(hists)
        figures[f"{prefix}codes_used"] = sum(codes_used(h) for h in hists) / len(hists)
    figures["images"] = int(images.shape[0])
    if train_images is not None:
        figures.update(bits_figures(model, train_images, images))
    return figures


@torch.no_grad()
def bits_figures(model, train_images: torch.Tensor, test_images: torch.Tensor, vae_samples: int = 4,
                 seed: int = 0) -> dict:
    """Bits per dimension of the test images (N, C, H, W), means over images, for the table that sets the
    family side by side (the VQ-VAE paper's bits/dim), each an upper bound on -log2 p(x) / (C H W):

    - models with codes: uniform_bits_per_dim = (codes' bits under the uniform prior, log2 K each, +
      discretized-Gaussian bits of x given the decoded codes) / dims, the decoder's log scale fitted on
      (up to 1,000) training images as `likelihood` does (decoder_log_scale);
    - the VAE: elbo_bits_per_dim = nll_bits_per_dim + kl_bits_per_dim, the negative ELBO with the same
      discretized Gaussian at the model's learned log scale, over `vae_samples` draws of z (seeded by
      `seed`); kl_bits_per_dim is KL(q(z|x) || N(0, I)) / (ln 2 * dims), in closed form;
    - the AE: {} (no likelihood).
    Images of every size the model takes; all test images must share one size (one batch per 250).
    """
    from .continuous import VAE, gaussian_kl

    dims = test_images[0].numel()
    if isinstance(model, VAE):
        generator = torch.Generator(device=model.device).manual_seed(seed)
        kl, elbo = [], []
        with eval_mode(model):
            for start in range(0, len(test_images), 250):
                x = test_images[start:start + 250].to(model.device)
                mean, logvar = model.posterior(x)
                kl.append((gaussian_kl(mean, logvar).double() / math.log(2) / dims).cpu())
                elbo.append(model.elbo_bits_per_dim(x, samples=vae_samples, generator=generator).cpu())
        kl_bpd, elbo_bpd = float(torch.cat(kl).mean()), float(torch.cat(elbo).mean())
        return {"elbo_bits_per_dim": elbo_bpd, "kl_bits_per_dim": kl_bpd, "nll_bits_per_dim": elbo_bpd - kl_bpd,
                "decoder_log_scale": float(model.log_scale)}
    if not model.discrete:
        return {}
    train = train_images[:1000]
    log_scale = fit_log_scale(train, reconstruct_dataset(model, train))
    prior_bits = torch.full((len(test_images),), uniform_bits_per_image(model, tuple(test_images.shape[2:])),
                            dtype=torch.float64)
    bpd = bits_per_dim(prior_bits, test_images, reconstruct_dataset(model, test_images), log_scale)
    return {"uniform_bits_per_dim": float(bpd.mean()), "decoder_log_scale": log_scale}


def prior_figures(prior, codes: dict) -> dict:
    """Held-out bits of the codes under `prior` next to the uniform prior's log2 K bits per latent.

    codes: {"test": (N, *grid) code grids, ...} as `prior_training.cached_codes` returns. For a class-conditional
    prior the bits are of the marginal over classes (the label is not part of the data).
    """
    from .priors import prior_bits

    nll = float(prior_bits(prior, codes["test"]).mean())
    L = prior.seq_len
    return {"nll_bits_per_latent": nll / L, "nll_bits_per_image": nll,
            "uniform_bits_per_latent": math.log2(prior.cfg.codebook_size), "latents_per_image": L,
            "arch": prior.cfg.arch, "class_conditional": bool(prior.cfg.num_classes)}


FIT_VALUES = 2_000_000  # values the decoder's noise scale is fitted on (62 float64 passes over them)


def likelihood(model, prior, train_images: torch.Tensor, test_images: torch.Tensor) -> dict:
    """bits_per_dim of the test images: prior bits of their codes + discretized-Gaussian pixel bits, per
    dimension (an upper bound on -log2 p(x), as the VQ-VAE paper reports); the decoder's noise scale is
    fitted on up to 1,000 training images and 2M values (28x28 digits: 1,000; 0.8 s clips of sound: 156).
    See `metrics.bits_per_dim`."""
    from .priors import prior_bits

    dims = max(1, math.prod(train_images.shape[1:]))
    train = train_images[:max(1, min(1000, FIT_VALUES // dims))]
    log_scale = fit_log_scale(train, reconstruct_dataset(model, train))
    z = encode_dataset(model, test_images)
    bpd = bits_per_dim(prior_bits(prior, z), test_images, reconstruct_dataset(model, test_images), log_scale)
    return {"bits_per_dim": float(bpd.mean()), "decoder_log_scale": log_scale}


SKIP_CLASS_BITS = 24  # classes this many bits above an image's best one: together < 1e-6 bits of its marginal


def integer_prior_figures(integer_prior, codes: torch.Tensor, prior=None) -> dict:
    """Held-out bits per latent under the integer prior (what the range coder pays), marginal over classes
    for a class-conditional prior: -log2 (1/Y) sum_y 2^-bits(z | y).

    With `prior`, the float prior the integer one was made from, a class whose float bits for an image are
    more than SKIP_CLASS_BITS above that image's best class is left out of its sum: each such term is below
    2^-23.9 of the best one's (the float and integer bits differ by far less than 0.1 bit), so an image's
    figure moves by less than (Y - 1) 2^-23.9 / ln 2, under 1e-6 bits for 10 classes. The integer model,
    the slow one, then scores about 4 of 10 classes per digit instead of all (measured on MNIST runs)."""
    from .priors import class_bits, marginal_bits

    z = torch.as_tensor(codes).long()
    Y = integer_prior.cfg.num_classes
    if Y:
        if prior is not None:
            float_bits = class_bits(prior, z)  # (Y, N)
            needed = float_bits <= float_bits.min(0).values + SKIP_CLASS_BITS
        else:
            needed = torch.ones(Y, len(z), dtype=torch.bool)
        per_class = torch.full((Y, len(z)), math.inf, dtype=torch.float64)  # (Y, N) bits
        for y in range(Y):
            rows = needed[y].nonzero()[:, 0]
            if len(rows):
                per_class[y, rows] = integer_prior.bits(z[rows], torch.full((len(rows),), y, dtype=torch.long))
        bits = marginal_bits(per_class)
    else:
        bits = integer_prior.bits(z)
    return {"integer_bits_per_latent": float(bits.mean()) / integer_prior.seq_len}


def evaluate_run(run, data: str | None = None, samples_per_class: int = 20, class_temperature: float = 1.0,
                 class_guidance: float = 1.0) -> dict:
    """Every figure of a run on its held-out split (or on the held-out split of dataset URI `data`):
    evaluate_autoencoder's (bits per dimension included, the decoder's scale fitted on the same dataset's
    training split), and with a prior its held-out bits per latent (float and integer models) and
    bits_per_dim. Images of another channel count are converted (gray <-> RGB) as `reconstruct` does.

    A class-conditional prior whose classes are the dataset's also gets `class_sample_figures` with
    `samples_per_class` samples of each class (0: none of these figures), drawn at `class_temperature` and
    `class_guidance` (`Prior.sample`; both recorded in the figures)."""
    from .data import to_channels

    if samples_per_class < 0:
        raise ConfigError(f"samples_per_class must be >= 0, got {samples_per_class}")
    model, dataset = run.model(), run.dataset(data)
    channels = model.cfg.in_channels
    # The figures fit on at most 1,000 training images: a streamed dataset decodes only those.
    train, dataset.test = to_channels(dataset.train_rows(0, 1000), channels), to_channels(dataset.test, channels)
    figures = evaluate_autoencoder(model, dataset.test, train_images=train)
    if run.has_prior() and model.discrete:
        prior = run.prior()
        codes = encode_dataset(model, dataset.test)
        if tuple(codes.shape[1:]) == tuple(prior.code_shape):  # residual VQ: (S, *grid); VQ-VAE-2: (L,)
            figures.update({k: v for k, v in prior_figures(prior, {"test": codes}).items()
                            if k in ("nll_bits_per_latent", "uniform_bits_per_latent")})
            if run.has_integer_prior():
                figures.update(integer_prior_figures(run.integer_prior(), codes, prior))
            figures.update(likelihood(model, prior, train, dataset.test))
            classes = prior.cfg.num_classes
            if samples_per_class and classes and dataset.num_classes == classes and dataset.test_labels is not None:
                dataset.train = to_channels(dataset.train, channels)  # the classifier learns from all of it
                figures.update(class_sample_figures(model, prior, dataset, samples_per_class, class_temperature,
                                                    guidance=class_guidance))
    return figures


# -- class-conditional samples read by a classifier --------------------------------------------------------

def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int = 400,
                     batch_size: int = 64, seed: int = 0) -> torch.nn.Module:
    """A small CNN fitted to training images (N, C, H, W) in [0, 1] with int64 labels (N,) in
    0..num_classes-1: `steps` Adam steps on batches drawn with `seed` (the weights' initialisation too, the
    global random state untouched), so the same inputs give the same classifier. Returns it in eval mode on
    the images' device; it maps images (B, C, H, W) of any size to logits (B, num_classes)."""
    from torch import nn

    device, C = images.device, images.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Conv2d(C, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * 16, num_classes)).to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        i = torch.randint(len(images), (batch_size,), generator=generator).to(device)
        loss = torch.nn.functional.cross_entropy(net(images[i]), labels[i].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


@torch.no_grad()
def class_accuracy(classifier, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                   batch_size: int = 500) -> tuple[float, list[float]]:
    """The share of images (N, C, H, W) whose argmax logit is their label (N,), and that share within each
    class 0..num_classes-1 (nan for a class without images)."""
    device = next(classifier.parameters()).device
    predicted = torch.cat([classifier(images[i:i + batch_size].to(device)).argmax(1).cpu()
                           for i in range(0, len(images), batch_size)])
    labels = labels.cpu().long()
    right = (predicted == labels).double()
    per_class = [float(right[labels == y].mean()) if bool((labels == y).any()) else float("nan")
                 for y in range(num_classes)]
    return float(right.mean()), per_class


def class_sample_figures(model, prior, dataset, samples_per_class: int = 20, temperature: float = 1.0,
                         seed: int = 0, guidance: float = 1.0) -> dict:
    """Do a class-conditional prior's samples read as their class? A classifier (`train_classifier`) fitted
    to dataset.train's images and labels (in the model's channels) reads `samples_per_class` decoded prior
    samples of each class (`report.sample_images` at `temperature` and `guidance`, seeded by `seed`) and the held-out
    images: sample_class_accuracy, real_class_accuracy, their ratio sample_class_ratio (1: samples read as
    well as real digits), the worst class's ratio sample_class_ratio_min, and per class lists (4 decimals)
    sample_class_accuracy_per_class and real_class_accuracy_per_class."""
    from .report import sample_images

    Y = prior.cfg.num_classes
    classifier = train_classifier(dataset.train.to(model.device), dataset.train_labels, Y, seed=seed)
    with eval_mode(model), torch.no_grad():
        samples, per_row = sample_images(model, prior, samples_per_class * Y, temperature=temperature, seed=seed,
                                         guidance=guidance)
    sample_labels = torch.arange(Y).repeat_interleave(per_row)
    sample_acc, sample_per_class = class_accuracy(classifier, samples, sample_labels, Y)
    real_acc, real_per_class = class_accuracy(classifier, dataset.test, dataset.test_labels, Y)
    ratios = [a / r for a, r in zip(sample_per_class, real_per_class) if r > 0]
    return {"sample_class_accuracy": sample_acc, "real_class_accuracy": real_acc,
            "sample_class_ratio": sample_acc / real_acc if real_acc else float("nan"),
            "sample_class_ratio_min": min(ratios) if ratios else float("nan"),
            "class_samples": samples_per_class * Y, "class_temperature": temperature, "class_guidance": guidance,
            "sample_class_accuracy_per_class": [round(a, 4) for a in sample_per_class],
            "real_class_accuracy_per_class": [round(a, 4) for a in real_per_class]}


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
