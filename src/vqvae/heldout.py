"""Held-out figures during training: every `TrainConfig.eval_every` steps, the best checkpoint, and a
warning when held-out and training figures part.

Every N steps the trainer measures one figure (lower is better) on a fixed held-out subset and on a fixed
training subset of the same size, both in eval mode: the autoencoder's MSE per pixel (with PSNR,
perplexity and the share of codes used), the prior's bits per latent (given the label for a
class-conditional prior). The held-out figure picks the best checkpoint; the pair decides the warning.

The warning rule: held-out > (1 + margin) x training at `PATIENCE` consecutive evaluations. Two in a row,
so one noisy evaluation does not fire it; the margin is per figure, well above the gap of a healthy run
and well below that of the case that asked for it (a prior trained on a folder of 200 photo crops:
1.5 bits per latent on its training codes, 7.9 held out, 5.3x):
- prior bits per latent, margin 0.25. Healthy: `vqvae prior RUN --steps 800 --eval-every 200` on the
  MNIST run below gave held-out/training ratios of 0.94 to 0.97 at its four evaluations.
- autoencoder MSE, margin 1.0 (held-out MSE twice the training MSE, 3 dB of PSNR). Healthy: `vqvae
  train --data mnist --steps 1500 --eval-every 250` gave ratios of 0.97 to 1.01 at its six evaluations;
  a longer-trained MNIST prototype scored about 1.8 dB (a 1.5x ratio) better on training digits than on
  held-out ones, which must not fire either.

B batch, N items in a subset, C H W image, S' code grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .metrics import code_histogram, codes_used, perplexity, psnr
from .nets import eval_mode

EVAL_SIZE = 500  # items in each fixed subset (the first of the split): the whole MNIST held-out split
PATIENCE = 2  # consecutive evaluations over the margin before the warning fires
MARGIN = {"mse": 1.0, "bits_per_latent": 0.25}


@dataclass
class HeldOut:
    """What the trainer evaluates and remembers. `evaluate()` -> figures holding `figure` (held out) and
    `"train_" + figure` (on the training subset); `save_best()` writes the best checkpoint; `fmt(figures)`
    renders the progress line's part. The remembered state (`state()` / `load_state`) goes into each
    checkpoint, so a resumed run keeps the same best and the same warning."""

    evaluate: Callable[[], dict]
    figure: str
    save_best: Callable[[], None]
    fmt: Callable[[dict], str]
    margin: float = 0.0
    best: float = math.inf
    best_step: int = 0
    streak: int = 0
    warning: str = ""

    def __post_init__(self) -> None:
        self.margin = self.margin or MARGIN[self.figure]

    def check(self, step: int, figures: dict) -> tuple[bool, str]:
        """Take one evaluation: -> (is it the best so far, the warning if it fires now, else "")."""
        held, train = figures[self.figure], figures["train_" + self.figure]
        is_best = held < self.best
        if is_best:
            self.best, self.best_step = held, step
        self.streak = self.streak + 1 if held > (1 + self.margin) * train else 0
        if self.streak >= PATIENCE and not self.warning:
            self.warning = (f"held-out and training figures part: {self.figure} {held:.4g} held out against "
                            f"{train:.4g} on training data at step {step} ({held / max(train, 1e-12):.2f}x, "
                            f"over {1 + self.margin:.2f}x at {PATIENCE} evaluations in a row): the model "
                            f"overfits; the best held-out checkpoint is step {self.best_step}'s")
            return is_best, self.warning
        return is_best, ""

    def state(self) -> dict:
        return {"best": self.best if math.isfinite(self.best) else None, "best_step": self.best_step,
                "streak": self.streak, "warning": self.warning}

    def load_state(self, state: dict) -> None:
        best = state.get("best")
        self.best = math.inf if best is None else float(best)
        self.best_step, self.streak = int(state.get("best_step", 0)), int(state.get("streak", 0))
        self.warning = str(state.get("warning", ""))

    def summary(self) -> dict:
        """What the final figures carry: the best evaluation and the warning, if any."""
        out = {} if not math.isfinite(self.best) else {f"best_heldout_{self.figure}": self.best,
                                                       "best_step": self.best_step}
        return {**out, **({"overfit_warning": self.warning} if self.warning else {})}


def save_weights(module: torch.nn.Module, path: str | Path) -> None:
    """The module's state dict as a safetensors file, written atomically (the best checkpoint)."""
    from safetensors.torch import save as safetensors_bytes

    from .config import write_atomically

    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    data = safetensors_bytes(state, metadata={"format": "pt"})
    write_atomically(path, lambda f: f.write(data))


# -- the autoencoder ---------------------------------------------------------------------------------------
@torch.no_grad()
def autoencoder_figures(model, images: torch.Tensor, batch_size: int = 250) -> dict:
    """mse (per pixel), psnr (mean over images), perplexity and codes_used of images (N, C, H, W) in [0, 1]."""
    K = model.cfg.quantizer.codebook_size
    counts = torch.zeros(K, dtype=torch.long)
    psnrs, mses = [], []
    with eval_mode(model):
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(model.device)
            encoded = model.encode(x)
            x_hat = model.decode(encoded)  # (B, C, H, W)
            counts += code_histogram(encoded.codes.cpu(), K)
            psnrs.append(psnr(x_hat, x).float().cpu())
            mses.append((x_hat - x).pow(2).flatten(1).mean(1).float().cpu())
    return {"mse": float(torch.cat(mses).mean()), "psnr": float(torch.cat(psnrs).mean()),
            "perplexity": float(perplexity(counts)), "codes_used": codes_used(counts)}


def autoencoder_heldout(model, train_images: torch.Tensor, test_images: torch.Tensor,
                        save_best: Callable[[], None]) -> HeldOut:
    """Held-out MSE, PSNR and code usage of the first `EVAL_SIZE` held-out images, next to the MSE of the
    first `EVAL_SIZE` training images."""
    train, test = train_images[:EVAL_SIZE], test_images[:EVAL_SIZE]

    def evaluate() -> dict:
        return {**autoencoder_figures(model, test), "train_mse": autoencoder_figures(model, train)["mse"]}

    def fmt(m: dict) -> str:
        return f"held-out PSNR {m['psnr']:5.2f} dB"

    return HeldOut(evaluate, "mse", save_best, fmt)


# -- the prior -------------------------------------------------------------------------------------------
@torch.no_grad()
def prior_bits_per_latent(prior, codes, labels=None, batch_size: int = 250) -> float:
    """Mean bits per latent of code grids (N, *S') (any integer arrays) under `prior`, given the labels (N,)
    for a class-conditional prior."""
    total, count = 0.0, 0
    with eval_mode(prior):
        for start in range(0, len(codes), batch_size):
            z = torch.as_tensor(codes[start:start + batch_size]).to(prior.device, torch.long)
            y = None if labels is None else torch.as_tensor(labels[start:start + batch_size]).to(prior.device,
                                                                                               torch.long)
            total += float(prior.loss(z, y)) * len(z)
            count += len(z)
    return total / count / math.log(2)


def prior_heldout(prior, train: tuple, test: tuple, save_best: Callable[[], None]) -> HeldOut:
    """Held-out bits per latent of the first `EVAL_SIZE` held-out code grids, next to the first `EVAL_SIZE`
    training grids'. train, test: (codes (N, *S'), labels (N,) or None), labels used when the prior is
    class-conditional."""
    def head(a):  # the first EVAL_SIZE items of an array (a memory map too) or tensor, in memory as int64
        if a is None:
            return None
        a = a[:EVAL_SIZE]
        return a.long().cpu() if isinstance(a, torch.Tensor) else torch.from_numpy(np.array(a, dtype=np.int64))

    conditional = bool(prior.cfg.num_classes)
    subsets = [(head(codes), head(labels) if conditional else None) for codes, labels in (train, test)]

    def evaluate() -> dict:
        return {"bits_per_latent": prior_bits_per_latent(prior, *subsets[1]),
                "train_bits_per_latent": prior_bits_per_latent(prior, *subsets[0])}

    def fmt(m: dict) -> str:
        return f"held-out {m['bits_per_latent']:.3f} bits/latent"

    return HeldOut(evaluate, "bits_per_latent", save_best, fmt)
