"""One training loop for autoencoders and priors: optimizer, schedule, checkpoints, resume, metrics, progress.

A run directory holds `model.safetensors` (weights, loadable alone), `train_state.pt` (optimizer, step,
elapsed time, RNG: only for `--resume`, loaded with `weights_only=True`) and `metrics.jsonl`. Both
checkpoint files are written to temp names and renamed, so a run killed at any moment resumes from its
last checkpoint. Ctrl-C and SIGTERM save a checkpoint before exiting.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .autoencoders import VQVAE
from .config import ModelConfig, TrainConfig, from_dict, to_dict, write_json
from .data import load_dataset
from .errors import RunError
from .evaluate import encode_dataset, evaluate_autoencoder, integer_prior_figures, likelihood, prior_figures
from .pretrained import fingerprint
from .run import Run

STATE_NAME, METRICS_NAME = Run.STATE, Run.METRICS


class Stopped(Exception):
    """Training was interrupted (Ctrl-C or SIGTERM) after a checkpoint was written."""

    def __init__(self, step: int):
        super().__init__(f"stopped at step {step}; checkpoint saved, continue with --resume")
        self.step = step


def pick_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda if available, else mps, else cpu; otherwise the named device."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def lr_factor(progress: float, warmup_fraction: float, min_ratio: float) -> float:
    """Linear warmup then cosine decay to `min_ratio`, as a function of progress in [0, 1]."""
    if progress < warmup_fraction:
        return max(progress / warmup_fraction, 1e-3)
    t = (progress - warmup_fraction) / max(1 - warmup_fraction, 1e-9)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


@dataclass
class Trainer:
    """Minimises `loss_fn(model, batch) -> (loss, metrics)` over `next_batch(generator) -> batch`.

    `save(dir)` writes the model's weights (e.g. `model.save_pretrained`); `fmt(metrics)` renders the
    progress bar's live figures. Stops at `cfg.steps` or after `cfg.max_seconds`, whichever is first.
    """

    model: torch.nn.Module
    cfg: TrainConfig
    out_dir: Path
    next_batch: Callable[[torch.Generator], object]
    loss_fn: Callable[[torch.nn.Module, object], tuple[torch.Tensor, dict]]
    save: Callable[[Path], None]
    fmt: Callable[[dict], str] = lambda m: f"loss {m.get('loss', float('nan')):.4f}"
    console: Console = field(default_factory=lambda: Console(stderr=True))
    show_progress: bool = True
    name: str = "train"
    step: int = 0
    elapsed: float = 0.0

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr)
        self.generator = torch.Generator().manual_seed(self.cfg.seed)

    # -- checkpoints -------------------------------------------------------------------------------
    def checkpoint(self) -> None:
        self.save(self.out_dir)
        state = {"optimizer": self.optimizer.state_dict(), "step": self.step, "elapsed": self.elapsed,
                 "torch_rng": torch.get_rng_state(), "batch_rng": self.generator.get_state()}
        tmp = self.out_dir / (STATE_NAME + ".tmp")
        torch.save(state, tmp)
        tmp.replace(self.out_dir / STATE_NAME)

    def resume(self) -> None:
        """Restore optimizer, step, elapsed time and RNG from the run's `train_state.pt`."""
        path = self.out_dir / STATE_NAME
        if not path.is_file():
            raise RunError(f"{path}: missing; nothing to resume (train without --resume to start afresh)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.elapsed = int(state["step"]), float(state["elapsed"])
        torch.set_rng_state(state["torch_rng"])
        self.generator.set_state(state["batch_rng"])
        self._truncate_metrics()

    def _truncate_metrics(self) -> None:
        """Drop logged lines past the checkpoint's step, so a resumed log has no duplicate steps."""
        path = self.out_dir / METRICS_NAME
        if path.is_file():
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= self.step]
            path.write_text("".join(ln + "\n" for ln in keep))

    def progress_fraction(self) -> float:
        by_steps = self.step / self.cfg.steps
        by_time = self.elapsed / self.cfg.max_seconds if self.cfg.max_seconds > 0 else 0.0
        return min(max(by_steps, by_time), 1.0)

    # -- the loop ----------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the loop to checkpoint and stop at the end of the current step (what Ctrl-C and SIGTERM do)."""
        self._stop_requested = True

    def _on_signal(self, signum, frame) -> None:
        if self._stop_requested:  # a second Ctrl-C: stop now, the last checkpoint stands
            raise KeyboardInterrupt
        self.request_stop()
        self.console.print("stopping after this step (again to abort without saving)...")

    def fit(self) -> dict:
        """Train to the budget; returns the last logged metrics. Raises `Stopped` on Ctrl-C / SIGTERM.

        A stop request is honoured between steps, so the checkpoint it writes is a consistent state
        from which `resume` continues exactly as if never stopped.
        """
        cfg, model = self.cfg, self.model
        warmup = min(cfg.warmup_steps / cfg.steps, 0.5)
        self._stop_requested = False
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        running: dict[str, float] = {}  # sums of the metrics since the last logged step
        count = 0
        last: dict = {}
        columns = [TextColumn(f"[bold]{self.name}"), BarColumn(), TextColumn("step {task.fields[step]}"),
                   TextColumn("{task.fields[live]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        try:
            with open(self.out_dir / METRICS_NAME, "a") as log, \
                    Progress(*columns, console=self.console, disable=not self.show_progress) as bar:
                task = bar.add_task(self.name, total=1000, completed=1000 * self.progress_fraction(),
                                    step=self.step, live="")
                model.train()
                while self.progress_fraction() < 1.0:
                    t0 = time.perf_counter()
                    for group in self.optimizer.param_groups:
                        group["lr"] = cfg.lr * lr_factor(self.progress_fraction(), warmup, cfg.lr_min_ratio)
                    loss, metrics = self.loss_fn(model, self.next_batch(self.generator))
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                    self.step += 1
                    self.elapsed += time.perf_counter() - t0
                    for k, v in {"loss": loss.detach(), **metrics}.items():
                        running[k] = running.get(k, 0.0) + float(v)
                    count += 1
                    if self.step % cfg.log_every == 0 or self.progress_fraction() >= 1.0 or self._stop_requested:
                        last = {k: v / count for k, v in running.items()}
                        running.clear()
                        count = 0
                        record = {"step": self.step, "time": round(self.elapsed, 3),
                                  "lr": self.optimizer.param_groups[0]["lr"], **last}
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                        bar.update(task, live=self.fmt(last))
                    bar.update(task, completed=1000 * self.progress_fraction(), step=self.step)
                    if self._stop_requested:
                        self.checkpoint()
                        raise Stopped(self.step)
                    if self.step % cfg.checkpoint_every == 0:
                        self.checkpoint()
                self.checkpoint()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        model.eval()
        return last


# -- autoencoders --------------------------------------------------------------------------------------
def train_autoencoder(model_cfg: ModelConfig, train_cfg: TrainConfig, out_dir: str | Path, resume: bool = False,
                      show_progress: bool = True, console: Console | None = None) -> dict:
    """Train a VQ-VAE on `train_cfg.data` into run directory `out_dir`; returns held-out metrics.

    With `resume`, the model, optimizer and budget continue from the run's last checkpoint (the run's own
    `config.json` wins over the arguments, so a resumed run is the same run).
    """
    out_dir = Path(out_dir)
    if resume:
        saved = Run(out_dir).config
        model_cfg = from_dict(ModelConfig, saved["model"])
        train_cfg = from_dict(TrainConfig, saved["train"])
    elif (out_dir / STATE_NAME).exists():
        raise RunError(f"{out_dir}: already holds a run; pass --resume to continue it or choose another --out")
    torch.manual_seed(train_cfg.seed)
    device = pick_device(train_cfg.device)
    data = load_dataset(train_cfg.data, seed=train_cfg.seed)
    train_x = data.train  # (N, C, H, W); the model pads sizes that are not a multiple of its downsampling
    if data.channels != model_cfg.in_channels:
        model_cfg = replace(model_cfg, in_channels=data.channels)
    if device.type == "cpu":  # the quantizer's C++ kernel: compiled on first use (~30 s), then cached
        from .nearest import build_kernel

        with (console or Console(stderr=True)).status("building the quantizer's CPU kernel (first use only)"):
            build_kernel()
    model = VQVAE(model_cfg).to(device)
    extra = {"train": to_dict(train_cfg),
             "data": {"uri": data.uri, "channels": data.channels, "image_size": list(data.image_size),
                      "num_classes": data.num_classes}}
    if resume:
        model = VQVAE.from_pretrained(out_dir, device=device)
    train_x = train_x.to(device)

    def next_batch(gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(train_x.shape[0], (train_cfg.batch_size,), generator=gen)
        return train_x[idx.to(device)]

    def loss_fn(m, x):
        out = m(x)
        return out.loss, out.metrics

    def fmt(m: dict) -> str:
        psnr = 10 * math.log10(1 / max(m["mse"], 1e-10))
        return f"loss {m['loss']:.4f}  PSNR {psnr:5.2f} dB  perplexity {m['perplexity']:6.1f}"

    trainer = Trainer(model, train_cfg, out_dir, next_batch, loss_fn, lambda d: model.save_pretrained(d, extra),
                      fmt=fmt, show_progress=show_progress, console=console or Console(stderr=True))
    if resume:
        trainer.resume()
    else:
        (out_dir / METRICS_NAME).unlink(missing_ok=True)
        model.save_pretrained(out_dir, extra)
    trainer.fit()
    return evaluate_autoencoder(model, data.test)


# -- priors ---------------------------------------------------------------------------------------------


def shifted(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate (B, C, H, W) by (dy, dx) pixels, filling with the edge values (no wrap-around)."""
    if dy == 0 and dx == 0:
        return images
    H, W = images.shape[2:]
    padded = torch.nn.functional.pad(images, (abs(dx), abs(dx), abs(dy), abs(dy)), mode="replicate")
    top, left = abs(dy) - dy, abs(dx) - dx
    return padded[:, :, top:top + H, left:left + W]


def cached_codes(run: Run, model: VQVAE, shifts: int = 0) -> dict[str, torch.Tensor | None]:
    """The run's train and held-out code grids (and labels), encoded once and cached under RUN/codes/.

    `shifts` > 0 adds copies of the training images translated by up to that many pixels (a 3x3 or
    larger neighbourhood of offsets) to the prior's training codes: the same digits at other positions,
    a cheap way to give a small dataset's prior more sequences. The cache is keyed by the model's
    weights and the shift setting, so retraining the autoencoder never reuses stale codes.
    """
    key = {"model": fingerprint(model).hex(), "shifts": shifts}
    cached = run.read_codes(key)
    if cached is not None:
        return cached
    data = run.dataset()
    offsets = [(dy, dx) for dy in range(-shifts, shifts + 1) for dx in range(-shifts, shifts + 1)]
    offsets.sort(key=lambda o: (o != (0, 0), o))  # the unshifted images first
    train = torch.cat([encode_dataset(model, shifted(data.train, dy, dx)) for dy, dx in offsets])
    train_labels = None if data.train_labels is None else data.train_labels.repeat(len(offsets))
    arrays = {"train": train, "test": encode_dataset(model, data.test),
              "train_labels": train_labels, "test_labels": data.test_labels}
    run.write_codes(arrays, key)
    return arrays


def train_prior(run: str | Path, prior_cfg_overrides: dict, train_cfg: TrainConfig, shifts: int = 1,
                resume: bool = False, force: bool = False, show_progress: bool = True,
                console: Console | None = None) -> dict:
    """Fit an autoregressive prior to the run's codes into RUN/prior/, and its integer model (what the range
    coder uses) into RUN/prior/integer/; returns held-out figures.

    Class-conditional when the dataset has labels. Figures: nll_bits_per_latent, integer_bits_per_latent,
    uniform_bits_per_latent (log2 K), nll_bits_per_image, bits_per_dim, plus the prior config.
    """
    from .priors import Prior, PriorConfig, build_prior

    run = Run(run)
    device = pick_device(train_cfg.device)
    model = run.model(device)
    codes = cached_codes(run, model, shifts)
    out_dir = run.prior_dir
    num_classes = run.num_classes
    if force and not resume and out_dir.exists():  # only once the codes it will be trained on exist
        shutil.rmtree(out_dir)
    if resume:
        prior = Prior.from_pretrained(out_dir, device=device)
        train_cfg = from_dict(TrainConfig, json.loads((out_dir / "train.json").read_text()))
    else:
        if (out_dir / STATE_NAME).exists():
            raise RunError(f"{out_dir}: already holds a prior; pass --resume to continue it or --force to replace it")
        cfg = PriorConfig(codebook_size=model.cfg.quantizer.codebook_size, grid=tuple(codes["train"].shape[1:]),
                          num_classes=num_classes, **prior_cfg_overrides)
        torch.manual_seed(train_cfg.seed)
        prior = build_prior(cfg).to(device)
    train_codes = codes["train"].long().to(device)
    train_labels = codes["train_labels"].to(device) if prior.cfg.num_classes else None

    def next_batch(gen: torch.Generator):
        idx = torch.randint(train_codes.shape[0], (train_cfg.batch_size,), generator=gen).to(device)
        return train_codes[idx], None if train_labels is None else train_labels[idx]

    def loss_fn(p, batch):
        loss = p.loss(*batch)
        return loss, {"bits_per_latent": loss.detach() / math.log(2)}

    def save(directory: Path) -> None:
        prior.save_pretrained(directory)
        write_json(directory / "train.json", to_dict(train_cfg))

    trainer = Trainer(prior, train_cfg, out_dir, next_batch, loss_fn, save, name="prior",
                      fmt=lambda m: f"train {m['bits_per_latent']:.3f} bits/latent",
                      show_progress=show_progress, console=console or Console(stderr=True))
    if resume:
        trainer.resume()
    else:
        (out_dir / METRICS_NAME).unlink(missing_ok=True)
    trainer.fit()
    integer = run.quantize_prior()  # the integer model the range coder uses, calibrated on these codes
    figures = prior_figures(prior, codes)
    figures.update(integer_prior_figures(integer, codes["test"]))
    data = run.dataset()
    figures.update(likelihood(model, prior, data.train, data.test))
    return figures
