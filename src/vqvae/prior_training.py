"""Training a prior over a run's codes: the code cache (`cached_codes`, with shifted copies of the training
images), the objective DistributedDataParallel wraps (`PriorObjective`) and `train_prior`, which runs the
shared `train.Trainer` loop and writes RUN/prior/ (and its integer model, RUN/prior/integer/).

Codes are whatever `evaluate.encode_dataset` gives: (N, *S') grids, (N, Q, *S') residual-VQ stages, or a
VQ-VAE-2's (N, L) sequence of its top then bottom grid; the prior's config follows from them
(`PriorConfig.grid`, `stages`, `levels`).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from .autoencoders import VQVAE
from .config import TrainConfig, from_dict, to_dict, write_json
from .devices import barrier, init_distributed, pick_device, world
from .errors import ConfigError, RunError
from .evaluate import encode_dataset, integer_prior_figures, likelihood, prior_figures
from .heldout import prior_heldout, save_weights
from .logs import metric_sinks
from .pretrained import fingerprint
from .run import CodeChunks, Run
from .train import METRICS_NAME, STATE_NAME, Trainer, _first_line, holding_run_lock


def _read_train_json(path: Path) -> TrainConfig:
    try:
        return from_dict(TrainConfig, json.loads(path.read_text()))
    except OSError as e:
        raise RunError(f"{path}: {e.strerror}; expected the prior's training settings") from None
    except (ValueError, ConfigError) as e:
        raise RunError(f"{path}: not the prior's training settings ({_first_line(e)})") from None


def shifted(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate (B, C, H, W) by (dy, dx) pixels, filling with the edge values (no wrap-around)."""
    if dy == 0 and dx == 0:
        return images
    H, W = images.shape[2:]
    padded = torch.nn.functional.pad(images, (abs(dx), abs(dx), abs(dy), abs(dy)), mode="replicate")
    top, left = abs(dy) - dy, abs(dx) - dx
    return padded[:, :, top:top + H, left:left + W]


def codes_key(model: VQVAE, shifts: int) -> dict:
    """What the cached codes depend on: the model's weights (fingerprint) and the shift setting."""
    return {"model": fingerprint(model).hex(), "shifts": shifts}


def cached_codes(run: Run, model: VQVAE, shifts: int = 0, chunk: int = 500) -> dict[str, np.ndarray | None]:
    """The run's train and held-out code grids (and labels), encoded once and cached under RUN/codes/, as
    read-only memory-mapped arrays (`Run.read_codes`): a prior trains on code sets larger than memory.

    `shifts` > 0 adds copies of the training images translated by up to that many pixels (a 3x3 or
    larger neighbourhood of offsets) to the prior's training codes: the same digits at other positions,
    a cheap way to give a small dataset's prior more sequences. The training codes are encoded `chunk`
    images at a time and written as they come (`CodeChunks`). The cache is keyed by the model's weights
    and the shift setting, so retraining the autoencoder never reuses stale codes. Several processes:
    rank 0 encodes and writes, the others wait and read its cache.
    """
    key = codes_key(model, shifts)
    rank, _ = world()
    cached = run.read_codes(key) if rank == 0 else None
    if rank == 0 and cached is None:
        data = run.dataset()
        offsets = [(dy, dx) for dy in range(-shifts, shifts + 1) for dx in range(-shifts, shifts + 1)]
        offsets.sort(key=lambda o: (o != (0, 0), o))  # the unshifted images first

        def chunks():
            for dy, dx in offsets:
                for start in range(0, data.num_train, chunk):  # a streamed dataset decodes a chunk at a time
                    yield encode_dataset(model, shifted(data.train_rows(start, start + chunk), dy, dx)).numpy()

        train_labels = None if data.train_labels is None else data.train_labels.repeat(len(offsets))
        run.write_codes({"train": CodeChunks(len(offsets) * data.num_train, chunks()),
                         "test": encode_dataset(model, data.test), "train_labels": train_labels,
                         "test_labels": data.test_labels}, key)
    barrier()  # rank 0's cache is whole before the others read it
    cached = cached or run.read_codes(key)
    if cached is None:
        raise RunError(f"{run.codes_dir}: the code cache was not written whole; rerun `vqvae prior {run.path}`")
    return cached


class PriorObjective(torch.nn.Module):
    """A prior's training loss as a module's `forward`, which DistributedDataParallel wraps (it hooks
    `forward` only): (codes (B, *S') int64, labels (B,) or None) -> mean nats per latent."""

    def __init__(self, prior: torch.nn.Module):
        super().__init__()
        self.prior = prior

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.prior.loss(codes, labels)


@holding_run_lock("vqvae prior")
def train_prior(run: str | Path, prior_cfg_overrides: dict, train_cfg: TrainConfig, shifts: int = 1,
                resume: bool = False, force: bool = False, show_progress: bool = True,
                console: Console | None = None, log: tuple[str, ...] = ()) -> dict:
    """Fit an autoregressive prior to the run's codes into RUN/prior/, and its integer model (what the range
    coder uses) into RUN/prior/integer/; returns held-out figures.

    Class-conditional when the dataset has labels. Figures: nll_bits_per_latent, integer_bits_per_latent,
    uniform_bits_per_latent (log2 K), nll_bits_per_image, bits_per_dim, plus the prior config (and with
    `eval_every`, the best held-out evaluation and any overfit warning). With `force`, an existing prior
    is deleted only once the new one's codes and config are known to be good. The run directory is locked
    meanwhile. The training codes stay memory-mapped: each step reads its batch's grids. `log`: metric
    sinks besides metrics.jsonl, as for autoencoders.

    Several processes (`torchrun --nproc-per-node N -m vqvae prior RUN`): DistributedDataParallel as for
    the autoencoder (each rank its B/N slice of the global batch); rank 0 writes the code cache, the prior
    directory, the log, the checkpoints and the integer prior, and alone returns figures (others: {}).
    """
    from .priors import Prior, PriorConfig, build_prior

    run = Run(run)
    device = init_distributed(pick_device(train_cfg.device))
    rank, _ = world()
    sinks = metric_sinks(log, run.prior_dir / METRICS_NAME, "prior") if rank == 0 else []
    model = run.model(device)
    codes = cached_codes(run, model, shifts)
    out_dir = run.prior_dir
    num_classes = run.num_classes
    if resume:
        prior = Prior.from_pretrained(out_dir, device=device)
        train_cfg = _read_train_json(out_dir / "train.json")
    else:
        if (out_dir / STATE_NAME).exists() and not force:
            raise RunError(f"{out_dir}: already holds a prior; pass --resume to continue it or --force to replace it")
        stages = model.code_stages  # residual VQ: codes (N, S, *grid), all S stages in one prior
        # VQ-VAE-2: codes (N, L), the top grid then the bottom one, as one sequence
        levels = model.levels(tuple(run.dataset().test.shape[2:])) if hasattr(model, "levels") else ()
        if levels and prior_cfg_overrides.get("arch", "transformer") != "transformer":
            raise ConfigError("a 'vqvae2' model's prior is a transformer over its top then bottom codes "
                              "(--arch transformer)")
        cfg = PriorConfig(codebook_size=model.cfg.quantizer.codebook_size,
                          grid=tuple(codes["train"].shape[1 + bool(stages):]), stages=stages, levels=levels,
                          num_classes=num_classes, **prior_cfg_overrides)
        torch.manual_seed(train_cfg.seed)
        prior = build_prior(cfg).to(device)
        barrier()  # every rank has checked the old prior before rank 0 deletes it
        if rank == 0 and out_dir.exists():  # only now that the codes and the config of its replacement are good
            shutil.rmtree(out_dir)
        barrier()
    train_codes = codes["train"]  # (N, *S') memory-mapped int16
    train_labels = codes["train_labels"] if prior.cfg.num_classes else None

    def next_batch(gen: torch.Generator):
        idx = torch.randint(len(train_codes), (train_cfg.batch_size,), generator=gen).numpy()
        z = torch.from_numpy(np.asarray(train_codes[idx], dtype=np.int64)).to(device)
        return z, None if train_labels is None else torch.from_numpy(np.asarray(train_labels[idx], np.int64)).to(device)

    def loss_fn(objective, batch):
        loss = objective(*batch)
        return loss, {"bits_per_latent": loss.detach() / math.log(2)}

    def save(directory: Path) -> None:
        prior.save_pretrained(directory)
        write_json(directory / "train.json", to_dict(train_cfg))

    heldout = None
    if train_cfg.eval_every:
        heldout = prior_heldout(prior, (train_codes, codes["train_labels"]), (codes["test"], codes["test_labels"]),
                                lambda: save_weights(prior, run.best_path(prior=True)))
    trainer = Trainer(prior, train_cfg, out_dir, next_batch, loss_fn, save, name="prior",
                      fmt=lambda m: f"train {m['bits_per_latent']:.3f} bits/latent",
                      show_progress=show_progress, console=console or Console(stderr=True),
                      identity={"codes": codes_key(model, shifts)}, objective=PriorObjective(prior), heldout=heldout,
                      sinks=sinks)
    if resume:
        trainer.resume()
    elif rank == 0:
        (out_dir / METRICS_NAME).unlink(missing_ok=True)
    barrier()
    trainer.fit()
    if rank != 0:
        return {}
    integer = run.quantize_prior()  # the integer model the range coder uses, calibrated on these codes
    test = {"test": torch.from_numpy(np.asarray(codes["test"], dtype=np.int64))}  # the held-out split, in memory
    figures = prior_figures(prior, test)
    figures.update(integer_prior_figures(integer, test["test"], prior))
    data = run.dataset()
    figures.update(likelihood(model, prior, data.train_rows(0, 1000), data.test))  # it fits on <= 1,000
    if heldout is not None:
        figures.update(heldout.summary())
    return figures
