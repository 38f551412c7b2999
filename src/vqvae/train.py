"""One training loop for autoencoders and priors: optimizer, schedule, checkpoints, resume, metrics, progress;
and `train_autoencoder` (`prior_training.train_prior` runs the same loop for priors).

A run directory holds `model.safetensors` (weights, loadable alone), `train_state.pt` (the weights again,
optimizer, step, elapsed time, RNG: only for `--resume`, loaded with `weights_only=True`) and
`metrics.jsonl`. A checkpoint is the one file `train_state.pt`, replaced atomically, so a run killed at any
moment (kill -9 included, even between the weights file and the state file) resumes from one consistent
checkpoint and ends with the same weights as a run never stopped. Ctrl-C and SIGTERM save a checkpoint
before exiting. The process that trains holds the run directory's lock (`Run.lock`).

On a terminal, progress is a live bar; in a pipe or a CI log, plain lines at a modest rate.

Several processes (`torchrun --nproc-per-node N -m vqvae train ...`): `init_distributed` joins the process
group torchrun describes (gloo on CPU, NCCL on CUDA); the model is wrapped in DistributedDataParallel; every
rank draws the same global batch from the seed and trains on its slice (rank r: rows [r B/N, (r+1) B/N)), so
N processes at B/N each see the images one process sees at B. Rank 0 alone shows progress, writes the log
and the checkpoints (others wait at a barrier); logged figures are means over ranks; checkpoints hold the
unwrapped model's weights (no `module.` prefixes).

`precision` "bf16" or "fp16" runs the loss under autocast (the quantizer turns it off for its own fp32
arithmetic); "fp16" adds a gradient scaler and needs CUDA.

`eval_every` N > 0: every N steps and at the end, rank 0 measures held-out figures (`heldout.HeldOut`),
logs them in metrics.jsonl as a row marked `"heldout": true`, shows them in the progress line, keeps the
best weights in `model.best.safetensors` beside `model.safetensors` and warns once when held-out and
training figures part. Evaluation runs in eval mode with the RNG state restored after it, so a run with
evaluations trains exactly as one without.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import threading
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .config import ModelConfig, TrainConfig, to_dict, write_atomically
from .data import load_dataset
from .devices import AUTOCAST, barrier, batch_share, init_distributed, pick_device, world
from .errors import ConfigError, RunError
from .logs import metric_sinks
from .evaluate import evaluate_autoencoder
from .heldout import EVAL_SIZE, HeldOut, autoencoder_heldout, save_weights
from .models import build_model
from .run import Run

STATE_NAME, METRICS_NAME = Run.STATE, Run.METRICS
# Test-only: at the checkpoint of this step, the process kills itself (SIGKILL) after writing the weights
# and before writing train_state.pt, the moment a kill -9 would mix two checkpoints if they were two files.
KILL_IN_CHECKPOINT_ENV = "VQVAE_TEST_KILL_IN_CHECKPOINT"


class Stopped(Exception):
    """Training was interrupted (Ctrl-C or SIGTERM) after a checkpoint was written."""

    def __init__(self, step: int):
        super().__init__(f"stopped at step {step}; checkpoint saved, continue with --resume")
        self.step = step


def lr_factor(progress: float, warmup_fraction: float, min_ratio: float) -> float:
    """Linear warmup then cosine decay to `min_ratio`, as a function of progress in [0, 1]."""
    if progress < warmup_fraction:
        return max(progress / warmup_fraction, 1e-3)
    t = (progress - warmup_fraction) / max(1 - warmup_fraction, 1e-9)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


# -- the training state file -------------------------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


def read_state(path: str | Path) -> dict:
    """A checkpoint written by `Trainer.checkpoint`, checked: a dict with the optimizer's state, step,
    elapsed time, both RNG states, and (from this version on) the weights under "model". An empty, cut,
    crafted (`weights_only=True`: no code runs) or foreign file is a one-line `RunError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: missing; nothing to resume (train without --resume to start afresh)")
    bad = f"{path}: not a training state written by vqvae"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # empty: EOFError; cut: RuntimeError; crafted: UnpicklingError
        raise RunError(f"{bad} ({'empty file' if path.stat().st_size == 0 else _first_line(e)})") from None
    if not isinstance(state, dict):
        raise RunError(f"{bad} (a {type(state).__name__}, expected a dict)")
    expected = {"optimizer": dict, "step": int, "elapsed": (int, float), "torch_rng": torch.Tensor,
                "batch_rng": torch.Tensor}
    for key, kind in expected.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise RunError(f"{bad} (no valid {key!r} entry)")
    try:  # the held-out evaluations' memory (best figure, warning; absent before --eval-every)
        heldout = json.loads(state.get("heldout", "{}"))
    except (TypeError, ValueError):
        heldout = None
    if not isinstance(heldout, dict):
        raise RunError(f"{bad} (its 'heldout' entry is not a JSON object)")
    state = {**state, "heldout": heldout}
    weights = state.get("model", {})
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise RunError(f"{bad} (its 'model' entry is not a dict of tensors)")
    if state["step"] < 0 or not math.isfinite(state["elapsed"]):
        raise RunError(f"{bad} (step {state['step']}, elapsed {state['elapsed']})")
    try:  # which run wrote it (a JSON object; absent before runs had ids)
        identity = json.loads(state.get("identity", "{}"))
    except (TypeError, ValueError):
        identity = None
    if not isinstance(identity, dict):
        raise RunError(f"{bad} (its 'identity' entry is not a JSON object)")
    return {**state, "identity": identity}


def _checkpoint_hook(step: int) -> None:
    if os.environ.get(KILL_IN_CHECKPOINT_ENV) == str(step):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


class _Lines:
    """Progress as plain lines, for pipes and CI logs where a live bar would show only at the end: a line
    each time another tenth of the budget is done or `every` seconds have passed, and at the end."""

    def __init__(self, console: Console, name: str, total_steps: int, fraction: float, every: float = 30.0):
        self.console, self.name, self.total, self.every = console, name, total_steps, every
        self.start, self.start_fraction = time.monotonic(), fraction
        self.last, self.next_fraction = self.start, math.floor(fraction * 10 + 1) / 10

    def update(self, step: int, fraction: float, live: str) -> None:
        now = time.monotonic()
        if fraction < min(self.next_fraction, 1.0) and now - self.last < self.every:
            return
        self.last, self.next_fraction = now, math.floor(fraction * 10 + 1) / 10
        spent = now - self.start
        done = fraction - self.start_fraction
        left = f", {_hms(spent / done * (1 - fraction))} left" if 0 < done and fraction < 1 else ""
        self.console.print(f"{self.name} step {step}/{self.total} ({100 * fraction:.0f}%)  {live}  "
                           f"{_hms(spent)} elapsed{left}", markup=False, highlight=False, soft_wrap=True)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclass
class Trainer:
    """Minimises `loss_fn(model, batch) -> (loss, metrics)` over `next_batch(generator) -> batch`.

    `save(dir)` writes the model's weights (e.g. `model.save_pretrained`); `fmt(metrics)` renders the
    progress bar's live figures. Stops at `cfg.steps` or after `cfg.max_seconds`, whichever is first.
    `identity` (plain JSON values) is stored in each checkpoint; `resume` refuses a checkpoint whose
    identity differs (another run's train_state.pt). `objective`: the module `loss_fn` receives and
    DistributedDataParallel wraps when it is not `model` itself (it must hold `model`'s parameters; the
    checkpoints hold `model`'s). `heldout`: what `cfg.eval_every` evaluates (see the module docstring).
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
    identity: dict = field(default_factory=dict)
    objective: torch.nn.Module | None = None
    heldout: HeldOut | None = None
    sinks: list = field(default_factory=list)  # callables given each logged record too (`logs.metric_sinks`)
    step: int = 0
    elapsed: float = 0.0

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr)
        self.generator = torch.Generator().manual_seed(self.cfg.seed)
        self.rank, self.world_size = world()
        self.device = next(self.model.parameters()).device
        if self.cfg.batch_size % self.world_size:
            raise ConfigError(f"batch_size {self.cfg.batch_size} is the global batch: it must be a multiple of "
                              f"the {self.world_size} processes")
        if self.cfg.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError(f"precision fp16 needs a CUDA device (here {self.device.type}); use bf16 or fp32")
        self.scaler = torch.amp.GradScaler("cuda") if self.cfg.precision == "fp16" else None
        self.train_model = self.objective if self.objective is not None else self.model
        if self.world_size > 1:  # buffers (EMA codebooks) are kept equal by the quantizer, not broadcast
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.train_model, device_ids=ids, broadcast_buffers=False)
        if self.rank != 0:
            self.show_progress = False

    # -- checkpoints -------------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Write the weights for users (`save`), then the checkpoint: train_state.pt, one file holding the
        weights again with the optimizer, step, elapsed time and RNG, renamed into place. `resume` reads
        only that file, so a kill between the two writes leaves the last checkpoint whole. Several
        processes: rank 0 writes, the others wait for it."""
        if self.rank == 0:
            self._write_checkpoint()
        barrier()

    def _write_checkpoint(self) -> None:
        self.save(self.out_dir)
        _checkpoint_hook(self.step)
        state = {"model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                 "optimizer": self.optimizer.state_dict(), "step": self.step, "elapsed": self.elapsed,
                 "torch_rng": torch.get_rng_state(), "batch_rng": self.generator.get_state(),
                 "identity": json.dumps(self.identity, sort_keys=True),
                 **({"heldout": json.dumps(self.heldout.state())} if self.heldout is not None else {})}
        write_atomically(self.out_dir / STATE_NAME, lambda f: torch.save(state, f))

    def resume(self) -> None:
        """Restore weights, optimizer, step, elapsed time and RNG from the run's `train_state.pt`.

        Everything is checked before anything changes on disk: an unreadable, foreign or mismatched
        checkpoint is a `RunError` and leaves metrics.jsonl as it was.
        """
        path = self.out_dir / STATE_NAME
        state = read_state(path)
        saved = state["identity"]
        for key in sorted(set(saved) & set(self.identity)):
            if saved[key] != self.identity[key]:
                raise RunError(f"{path}: belongs to another run ({key} {saved[key]!r}, here {self.identity[key]!r}); "
                               "train without --resume to start afresh")
        try:
            if state.get("model"):  # checkpoints from before weights were kept here: model.safetensors holds them
                self.model.load_state_dict(state["model"])
            self._check_optimizer_state(state["optimizer"])
            self.optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
            self.generator.set_state(state["batch_rng"])
            if self.heldout is not None:
                self.heldout.load_state(state["heldout"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise RunError(f"{path}: does not fit this run's model ({_first_line(e)}); it belongs to another "
                           "run") from None
        self.step, self.elapsed = state["step"], float(state["elapsed"])
        if self.rank == 0:
            self._truncate_metrics()
        barrier()

    def _check_optimizer_state(self, saved: dict) -> None:
        """Raise ValueError unless `saved` (an optimizer state dict) has this optimizer's groups and, for each
        parameter, state tensors of its shape (Adam would otherwise fail, or broadcast, at the first step)."""
        groups = self.optimizer.param_groups
        saved_groups = saved["param_groups"]
        if len(saved_groups) != len(groups) or any(len(a["params"]) != len(b["params"])
                                                   for a, b in zip(saved_groups, groups)):
            raise ValueError("another number of parameters")
        params = dict(zip([i for g in saved_groups for i in g["params"]], [p for g in groups for p in g["params"]]))
        for i, entries in saved["state"].items():
            for name, value in entries.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[i].shape:
                    raise ValueError(f"optimizer {name} of shape {tuple(value.shape)} for a parameter of shape "
                                     f"{tuple(params[i].shape)}")

    def _truncate_metrics(self) -> None:
        """Drop logged lines past the checkpoint's step, so a resumed log has no duplicate steps, and lines
        that do not parse (a kill can cut the last one short). Rewritten atomically."""
        path = self.out_dir / METRICS_NAME
        if not path.is_file():
            return
        keep = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= self.step:
                keep.append(line + "\n")
        text = "".join(keep).encode()
        write_atomically(path, lambda f: f.write(text))

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

    def _progress(self):
        """(context manager, update(step, fraction, live)): a live bar on a terminal, plain lines elsewhere."""
        import contextlib

        if not self.show_progress:
            return contextlib.nullcontext(), lambda step, fraction, live: None
        if not (self.console.is_terminal or self.console.is_jupyter):
            lines = _Lines(self.console, self.name, self.cfg.steps, self.progress_fraction())
            return contextlib.nullcontext(), lines.update
        columns = [TextColumn(f"[bold]{self.name}"), BarColumn(), TextColumn("step {task.fields[step]}"),
                   TextColumn("{task.fields[live]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        bar = Progress(*columns, console=self.console)
        task = bar.add_task(self.name, total=1000, completed=1000 * self.progress_fraction(), step=self.step, live="")

        def update(step: int, fraction: float, live: str) -> None:
            bar.update(task, completed=1000 * fraction, step=step, live=live)

        return bar, update

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
        live, heldout_live = "", ""
        display, show = self._progress()
        dtype = AUTOCAST[cfg.precision]
        try:
            with (open(self.out_dir / METRICS_NAME, "a") if self.rank == 0 else nullcontext()) as log, display:
                model.train()
                while self.progress_fraction() < 1.0:
                    t0 = time.perf_counter()
                    for group in self.optimizer.param_groups:
                        group["lr"] = cfg.lr * lr_factor(self.progress_fraction(), warmup, cfg.lr_min_ratio)
                    batch = batch_share(self.next_batch(self.generator), self.rank, self.world_size)
                    with torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext():
                        loss, metrics = self.loss_fn(self.train_model, batch)
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.scaler is not None:
                        self.scaler.scale(loss).backward()
                        self.scaler.step(self.optimizer)
                        self.scaler.update()
                    else:
                        loss.backward()
                        self.optimizer.step()
                    self.step += 1
                    self.elapsed += time.perf_counter() - t0
                    self._agree()
                    for k, v in {"loss": loss.detach(), **metrics}.items():
                        running[k] = running.get(k, 0.0) + float(v)
                    count += 1
                    if self.step % cfg.log_every == 0 or self.progress_fraction() >= 1.0 or self._stop_requested:
                        last = self._mean_over_ranks({k: v / count for k, v in running.items()})
                        running.clear()
                        count = 0
                        record = {"step": self.step, "time": round(self.elapsed, 3),
                                  "lr": self.optimizer.param_groups[0]["lr"], **last}
                        if log is not None:
                            log.write(json.dumps(record) + "\n")
                            log.flush()
                            for sink in self.sinks:
                                sink(record)
                        live = self.fmt(last)
                    if self._evaluation_due():
                        heldout_live = self._evaluate(log) if self.rank == 0 else ""
                    show(self.step, self.progress_fraction(), f"{live}  {heldout_live}" if heldout_live else live)
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

    def _evaluation_due(self) -> bool:
        every = self.cfg.eval_every
        return self.heldout is not None and every > 0 and (self.step % every == 0 or self.progress_fraction() >= 1.0)

    def _evaluate(self, log) -> str:
        """Rank 0: held-out figures now -> the log (a row marked "heldout"), the best checkpoint, the
        warning (printed once); returns the progress line's part. The RNG state is left as it was."""
        cuda = self.device.type == "cuda"
        index = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if cuda else 0
        with torch.random.fork_rng(devices=[index] if cuda else []):
            figures = self.heldout.evaluate()
        is_best, warning = self.heldout.check(self.step, figures)
        if is_best:
            self.heldout.save_best()
        record = {"step": self.step, "heldout": True, **figures, "best": is_best,
                  **({"overfit_warning": warning} if warning else {})}
        log.write(json.dumps(record) + "\n")
        log.flush()
        if warning:
            self.console.print(f"[yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True)
        return self.heldout.fmt(figures)

    def _agree(self) -> None:
        """Several processes: every rank takes the largest elapsed time and stops if any rank was asked to,
        so all ranks end the loop at the same step (a rank that stopped alone would hang the others)."""
        if self.world_size == 1:
            return
        flags = torch.tensor([float(self._stop_requested), self.elapsed], dtype=torch.float64, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self._stop_requested, self.elapsed = bool(flags[0] > 0), float(flags[1])

    def _mean_over_ranks(self, metrics: dict) -> dict:
        """Logged figures as means over ranks (each rank's are means over its equal share of the batch)."""
        if self.world_size == 1 or not metrics:
            return metrics
        values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        return dict(zip(metrics, (values / self.world_size).tolist()))


def holding_run_lock(owner: str):
    """Decorator: the function's first argument is a run directory, held (`Run.lock`) while it runs, by
    rank 0 alone under torchrun (the other ranks write nothing)."""
    def wrap(fn):
        @functools.wraps(fn)
        def locked(run, *args, **kwargs):
            if world()[0] != 0 or os.environ.get("RANK", "0") != "0":
                return fn(run, *args, **kwargs)
            with Run(run).lock(owner):
                return fn(run, *args, **kwargs)
        return locked
    return wrap


# -- autoencoders --------------------------------------------------------------------------------------
def train_autoencoder(model_cfg: ModelConfig, train_cfg: TrainConfig, out_dir: str | Path, resume: bool = False,
                      show_progress: bool = True, console: Console | None = None, log: tuple[str, ...] = ()) -> dict:
    """Train the model `model_cfg.model` names (models.py) on `train_cfg.data` into run directory `out_dir`;
    returns held-out metrics (`evaluate_autoencoder`). `log`: metric sinks besides metrics.jsonl
    (`logs.metric_sinks`: "csv", "tensorboard").

    With `resume`, the model, optimizer and budget continue from the run's last checkpoint (the run's own
    `config.json` wins over the arguments, so a resumed run is the same run). The device and the dataset
    are checked before anything is written; the run directory is locked while training.
    """
    out_dir = Path(out_dir)
    run = Run(out_dir)
    console = console or Console(stderr=True)
    sinks = metric_sinks(log, run.metrics_path)  # called on rank 0 alone, by the Trainer
    if resume:
        model_cfg, train_cfg = run.section("model", ModelConfig), run.section("train", TrainConfig)
    device = init_distributed(pick_device(train_cfg.device))
    rank, _ = world()
    data = load_dataset(train_cfg.data, seed=train_cfg.seed, image_size=train_cfg.image_size,
                        skip_bad_files=train_cfg.skip_bad_files)
    if data.channels != model_cfg.in_channels:
        model_cfg = replace(model_cfg, in_channels=data.channels)
    if len(data.image_size) != model_cfg.dims:  # sound (N, 1, T) trains the 1-D nets
        model_cfg = replace(model_cfg, dims=len(data.image_size))
    if not resume and run.state_path.exists():
        raise RunError(f"{out_dir}: already holds a run; pass --resume to continue it or choose another --out")
    barrier()  # every rank has checked before rank 0 writes anything
    with run.lock("vqvae train", create=True) if rank == 0 else nullcontext():
        run_id = run.config.get("id") if resume else uuid.uuid4().hex
        if world()[1] > 1:  # rank 0's id on every rank
            shared = [run_id]
            dist.broadcast_object_list(shared, 0)
            run_id = shared[0]
        torch.manual_seed(train_cfg.seed)
        if device.type == "cpu":  # the quantizer's C++ kernel: compiled on first use (~30 s), then cached
            from .nearest import build_kernel

            with console.status("building the quantizer's CPU kernel (first use only)") if rank == 0 else nullcontext():
                build_kernel()
        model = run.model(device) if resume else build_model(model_cfg).to(device)
        extra = {**({"id": run_id} if run_id else {}), "train": to_dict(train_cfg),
                 "data": {"uri": data.uri, "channels": data.channels, "image_size": list(data.image_size),
                          "num_classes": data.num_classes}}
        if hasattr(data, "stream"):  # folder:/shards: read from disk by DataLoader workers, this rank's rows only
            from .streaming import BatchReader

            next_batch = BatchReader(data.stream, train_cfg.batch_size, device, rank, world()[1], train_cfg.workers,
                                     train_cfg.skip_bad_files)
        else:
            train_x = data.train.to(device)  # (N, C, H, W); the model pads sizes not a multiple of its downsampling

            def next_batch(gen: torch.Generator) -> torch.Tensor:
                idx = torch.randint(train_x.shape[0], (train_cfg.batch_size,), generator=gen)
                return train_x[idx.to(device)]  # the global batch; the trainer keeps this rank's slice

        def loss_fn(m, x):
            model.set_progress(trainer.progress_fraction())  # schedules (the dVAE's temperature and KL weight)
            if model_cfg.dims == 1:  # sound: random crops, and a loss that listens (audio/spectral.py)
                from .audio.spectral import stft_loss, training_crop

                x = training_crop(x)
            out = m(x)
            if model_cfg.dims == 1:
                spectral = stft_loss(out.x_hat, x)
                return out.loss + spectral, {**out.metrics, "stft": spectral.detach()}
            return out.loss, out.metrics

        def fmt(m: dict) -> str:
            psnr = 10 * math.log10(1 / max(m["mse"], 1e-10))
            extra = {"perplexity": "perplexity {:6.1f}", "kl_bits_per_dim": "KL {:.3f} bits/dim"}
            return "  ".join([f"loss {m['loss']:.4f}  PSNR {psnr:5.2f} dB",
                              *(form.format(m[k]) for k, form in extra.items() if k in m)])

        # A streamed dataset decodes only the training images the held-out comparison needs, not all of them.
        train_sample = data.train_rows(0, EVAL_SIZE)
        heldout = autoencoder_heldout(model, train_sample, data.test, lambda: save_weights(model, run.best_path())) \
            if train_cfg.eval_every else None
        trainer = Trainer(model, train_cfg, out_dir, next_batch, loss_fn, lambda d: model.save_pretrained(d, extra),
                          fmt=fmt, show_progress=show_progress, console=console,
                          identity={"run": run_id} if run_id else {}, heldout=heldout, sinks=sinks)
        if resume:
            trainer.resume()
        elif rank == 0:
            run.metrics_path.unlink(missing_ok=True)
            model.save_pretrained(out_dir, extra)
        barrier()
        try:
            trainer.fit()
        finally:
            getattr(next_batch, "close", lambda: None)()
    # Held-out figures from rank 0 alone (the model is in eval mode: the quantizer makes no collectives).
    if rank != 0:
        return {}
    return {**evaluate_autoencoder(model, data.test), **(heldout.summary() if heldout is not None else {})}
