"""A run directory as one object: the only code that knows where a run keeps what.

    runs/NAME/
      config.json  model.safetensors       the autoencoder (ModelConfig + data and train sections)
      model.best.safetensors               its weights at the best held-out evaluation (`--eval-every`)
      train_state.pt  metrics.jsonl        resume state and the training log
      recon.png  samples.png  heldout.vqz  pictures and files the commands write
      codes/{train,test}[_labels].npy      cached int16 code grids (meta.json says of which weights),
                                           written in chunks and read memory-mapped
      prior/                               the learned prior (config.json, model.safetensors, train.json, ...)
      prior/model.best.safetensors         the prior's weights at its best held-out evaluation
      prior/integer/                       its integer model, which drives the range coder
      .lock                                held by the process that writes the run (`Run.lock`)

    run = Run("runs/demo")
    model, prior = run.model(), run.prior()
    data, stats = run.compress(images)          # the bytes of a .vqz file
    images = run.decompress(data)

Every missing or malformed piece raises a `RunError` whose one line names the file and the command that
makes it. A process that writes a run holds its lock (`with run.lock("vqvae train"): ...`), so two
processes never write one run directory at once.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
import torch

from . import pretrained
from .errors import CodecError, ConfigError, DataError, RunError

CODE_SPLITS = ("train", "test", "train_labels", "test_labels")
_held: dict[str, int] = {}  # run directories this process holds the lock of -> nesting depth


class CodeChunks(NamedTuple):
    """`rows` code grids arriving as chunks (n_i, *S') with n_i summing to `rows`: what `Run.write_codes`
    writes to disk as they come, never holding them all."""

    rows: int
    chunks: Iterable


class Run:
    """The run directory at `path` (written by `vqvae train`, completed by `vqvae prior`)."""

    STATE, METRICS = "train_state.pt", "metrics.jsonl"
    RECON, SAMPLES, HELDOUT = "recon.png", "samples.png", "heldout.vqz"
    BEST = "model.best.safetensors"  # weights at the best held-out evaluation, beside model.safetensors
    LOCK = ".lock"
    # every name a run directory can hold: what `foreign_entries` does not count and `clear` removes
    LAYOUT = frozenset({pretrained.CONFIG_NAME, pretrained.WEIGHTS_NAME, STATE, METRICS, RECON, SAMPLES, HELDOUT,
                        BEST, "report.html", "codes", "prior", LOCK, "metrics.csv", "tensorboard"})

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._loaded: dict[tuple[str, str], torch.nn.Module] = {}  # models are read once per Run object

    def _load(self, what: str, device, load):
        key = (what, str(torch.device(device)))
        if key not in self._loaded:
            self._loaded[key] = load()
        return self._loaded[key]

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # -- layout ------------------------------------------------------------------------------------
    @property
    def prior_dir(self) -> Path:
        return self.path / "prior"

    @property
    def integer_prior_dir(self) -> Path:
        return self.prior_dir / "integer"

    @property
    def codes_dir(self) -> Path:
        return self.path / "codes"

    @property
    def state_path(self) -> Path:
        return self.path / self.STATE

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    def best_path(self, prior: bool = False) -> Path:
        """Where training keeps the weights of its best held-out evaluation: the autoencoder's, or the prior's."""
        return (self.prior_dir if prior else self.path) / self.BEST

    def exists(self) -> bool:
        """True when the directory holds a trained model (config.json and model.safetensors)."""
        return all((self.path / name).is_file() for name in (pretrained.CONFIG_NAME, pretrained.WEIGHTS_NAME))

    def has_prior(self) -> bool:
        return (self.prior_dir / pretrained.WEIGHTS_NAME).is_file()

    def has_integer_prior(self) -> bool:
        return (self.integer_prior_dir / pretrained.WEIGHTS_NAME).is_file()

    def foreign_entries(self) -> list[str]:
        """Names in the directory that are no part of a run (sorted; [] for a run, an empty or no directory).
        Temp files of interrupted writes (`.NAME.XXXX.tmp`, `NAME.tmp`) count as part of the run."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name not in self.LAYOUT and not p.name.endswith(".tmp"))

    def clear(self, force: bool = False) -> None:
        """Empty the directory for a new run, keeping the lock; refused (`RunError`) if it holds anything that
        is no part of a run, unless `force`. Never removes the current directory or one that contains it."""
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"{self.path}: exists and is not a directory")
        if not self.path.exists():
            return
        if Path.cwd().resolve().is_relative_to(self.path.resolve()):
            raise RunError(f"{self.path}: is or contains the current directory; choose another directory to replace")
        foreign = self.foreign_entries()
        if foreign and not force:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise RunError(f"{self.path}: holds files that are not part of a vqvae run ({shown}); choose another "
                           "directory, or pass --force to delete them")
        for entry in self.path.iterdir():
            if entry.name == self.LOCK:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    @contextmanager
    def lock(self, owner: str = "vqvae", create: bool = False):
        """Hold the run directory for this process while the block runs (`create`: make it if missing, else
        a missing directory is a `RunError`).

        Another process holding it is a `RunError` naming its pid and `owner` (the command it runs). The
        lock is an advisory `flock` on RUN/.lock, which the system releases when its process dies, so a
        run killed with kill -9 never leaves a lock behind; within one process the lock nests. Systems
        without `fcntl` (Windows) get no lock.
        """
        key = str(self.path.resolve())
        if key in _held:
            _held[key] += 1
            try:
                yield self
            finally:
                _held[key] -= 1
            return
        try:
            import fcntl
        except ImportError:  # no advisory locks here
            yield self
            return
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"{self.path}: exists and is not a directory")
        if not self.path.exists() and not create:
            raise RunError(f"{self.path}: no such directory; expected a run directory written by `vqvae train`")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"{self.path}: cannot create the run directory ({e.strerror})") from None
        path = self.path / self.LOCK
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise RunError(f"{path}: cannot create the run's lock file ({e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise RunError(f"{self.path}: in use by {holder} (lock {path}); wait for it to finish or use "
                               "another directory") from None
            try:  # the last holder may have removed the file between our open and flock: lock the new one
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} ({owner})\n".encode())
        _held[key] = 1
        try:
            yield self
        finally:
            del _held[key]
            try:
                os.unlink(path)  # while still holding it: a waiting process then locks a fresh file
            except OSError:
                pass
            os.close(fd)

    # -- the autoencoder and its data ---------------------------------------------------------------
    @cached_property
    def config(self) -> dict:
        """The whole config.json: model, data and train sections."""
        return pretrained.read_config(self.path, "a run directory written by `vqvae train`", "run")

    def section(self, name: str, cls: type):
        """A config section rebuilt as the dataclass `cls` (`ModelConfig` for "model", `TrainConfig` for
        "train"); a missing or invalid section is a `RunError` naming config.json."""
        from .config import from_dict

        path = self.path / pretrained.CONFIG_NAME
        if name not in self.config:
            raise RunError(f"{path}: no {name!r} section; expected a run directory written by `vqvae train`")
        try:
            return from_dict(cls, self.config[name])
        except ConfigError as e:
            raise RunError(f"{path}: bad {name!r} section ({e})") from None

    @property
    def data_uri(self) -> str:
        try:
            return str(self.config["data"]["uri"])
        except (KeyError, TypeError):
            raise RunError(f"{self.path / pretrained.CONFIG_NAME}: no data section; expected a run directory "
                           "written by `vqvae train`") from None

    @property
    def num_classes(self) -> int:
        data = self.config.get("data", {})
        value = data.get("num_classes", 0) if isinstance(data, dict) else None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65536:
            raise RunError(f"{self.path / pretrained.CONFIG_NAME}: data.num_classes must be an integer in 0..65536, "
                           f"got {value!r}")
        return value

    def model(self, device: str | torch.device = "cpu", best: bool = False):
        """The trained model, whatever its kind (models.py: VQVAE, DVAE, VQVAE2, AE, VAE), in eval mode on
        `device` (read once per Run object); `best`: with the weights of its best held-out evaluation
        (`model.best.safetensors`, kept by training with `--eval-every`)."""
        from .models import load_model

        def load():
            try:
                model = load_model(self.path, device)
            except ConfigError as e:  # a hand-edited config.json: name the file
                raise RunError(f"{self.path / pretrained.CONFIG_NAME}: bad 'model' section ({e})") from None
            return self._load_best(model, self.best_path(), device) if best else model

        return self._load("best model" if best else "model", device, load)

    @staticmethod
    def _load_best(module: torch.nn.Module, path: Path, device) -> torch.nn.Module:
        from safetensors.torch import load_file

        if not path.is_file():
            raise RunError(f"{path}: missing; training keeps a best checkpoint only with --eval-every N")
        try:
            module.load_state_dict(load_file(str(path), device=str(device)))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise RunError(f"{path}: cannot load weights ({str(e).splitlines()[0]})") from None
        return module.eval()

    def dataset(self, uri: str | None = None):
        """The run's dataset (train and held-out splits), or the dataset `uri` names instead."""
        from .config import TrainConfig
        from .data import load_dataset

        if uri is None and isinstance(self.config.get("train"), dict):  # the run's crops, its broken files skipped
            train = self.section("train", TrainConfig)
            return load_dataset(self.data_uri, image_size=train.image_size, skip_bad_files=train.skip_bad_files)
        return load_dataset(uri or self.data_uri)

    # -- the prior ---------------------------------------------------------------------------------
    def prior(self, device: str | torch.device = "cpu", best: bool = False):
        """The learned (float) prior, in eval mode: what sampling and likelihoods use; `best`: with the weights
        of its best held-out evaluation (prior/model.best.safetensors, kept with `--eval-every`)."""
        from .priors import load_prior

        if not self.has_prior():
            raise RunError(f"{self.prior_dir}: no prior; train one with `vqvae prior {self.path}` first")
        if best:
            return self._load("best prior", device, lambda: self._load_best(
                load_prior(self.prior_dir, device), self.best_path(prior=True), device))
        return self._load("prior", device, lambda: load_prior(self.prior_dir, device))

    def integer_prior(self, device: str | torch.device = "cpu"):
        """The prior's integer model: what the range coder uses (same frequencies on every machine).
        `vqvae prior` makes it; for a run whose prior predates integer models it is made here, once."""
        from .integer_priors import load_integer_prior

        if not self.has_integer_prior():
            with self.lock("vqvae (making the integer prior)"):
                if not self.has_integer_prior():
                    self.quantize_prior()
        return self._load("integer_prior", device, lambda: load_integer_prior(self.integer_prior_dir, device))

    def quantize_prior(self):
        """Make the integer model of the run's prior, calibrated on the cached training codes, and save it
        under prior/integer/ -> the IntegerPrior."""
        from .integer_priors import IntegerPrior

        prior = self.prior()
        arrays = {}
        every = None
        for name in ("train", "train_labels"):
            path = self.codes_dir / f"{name}.npy"
            try:  # memory-mapped: only the grids the calibration takes are read (from_prior's subsample)
                mapped = _open_npy(path)
                every = every or max(1, len(mapped) // 2048)
                arrays[name] = torch.from_numpy(np.array(mapped[::every], dtype=np.int64))
            except (OSError, ValueError, EOFError):
                if name == "train" or prior.cfg.num_classes:
                    raise RunError(f"{path}: missing or unreadable; rerun `vqvae prior {self.path} --force`") from None
        codes = arrays["train"]
        if tuple(codes.shape[1:]) != prior.code_shape:
            raise RunError(f"{self.codes_dir / 'train.npy'}: code grids of shape {tuple(codes.shape[1:])}, the prior "
                           f"models {prior.code_shape}; rerun `vqvae prior {self.path} --force`")
        labels = arrays.get("train_labels") if prior.cfg.num_classes else None
        integer = IntegerPrior.from_prior(prior, codes, labels)
        integer.save_pretrained(self.integer_prior_dir)
        self._loaded.pop(("integer_prior", str(torch.device("cpu"))), None)
        return integer

    # -- cached codes --------------------------------------------------------------------------------
    def read_codes(self, key: dict) -> dict[str, np.ndarray | None] | None:
        """The cached code grids if they were made under `key` (model fingerprint, settings) and are whole:
        non-empty integer grids (N, *S') with values in 0..K-1, labels (N,) matching them, as read-only
        memory-mapped arrays (a code set larger than memory stays on disk; checking the values reads it
        once). Else None (a damaged, partly written, emptied or foreign cache is made again, never
        trained on)."""
        meta = self.codes_dir / "meta.json"
        try:
            if json.loads(meta.read_text()) != key:
                return None
            arrays = {name: _open_npy(self.codes_dir / f"{name}.npy")
                      if (self.codes_dir / f"{name}.npy").is_file() else None for name in CODE_SPLITS}
        except (OSError, ValueError, EOFError):  # missing, partial or unreadable cache: make it again
            return None
        try:
            K = self.config.get("model", {}).get("quantizer", {}).get("codebook_size")
        except (RunError, AttributeError):  # no readable config.json: the values go unchecked against K
            K = None
        for split in ("train", "test"):
            grids, labels = arrays[split], arrays[f"{split}_labels"]
            if grids is None or grids.ndim < 2 or len(grids) == 0 or grids.dtype.kind not in "iu" \
                    or grids.min() < 0 or (isinstance(K, int) and grids.max() >= K) \
                    or (labels is not None and (labels.shape != grids.shape[:1] or labels.dtype.kind not in "iu")):
                return None
        return arrays

    def write_codes(self, arrays: dict[str, torch.Tensor | np.ndarray | CodeChunks | None], key: dict) -> None:
        """Cache code grids and labels: arrays as they are, `CodeChunks` as int16 grids filled chunk by
        chunk into a memory-mapped .npy (never all in memory), None as no file. Each file is written under
        a temp name and renamed into place; meta.json, removed first and written last, says they are
        complete, so a write killed at any moment leaves a cache that `read_codes` refuses."""
        from .config import write_atomically, write_json

        self.codes_dir.mkdir(parents=True, exist_ok=True)
        (self.codes_dir / "meta.json").unlink(missing_ok=True)
        for stale in self.codes_dir.glob(".*.tmp"):  # what a killed write left behind
            stale.unlink(missing_ok=True)
        for name, value in arrays.items():
            path = self.codes_dir / f"{name}.npy"
            if value is None:
                path.unlink(missing_ok=True)
            elif isinstance(value, CodeChunks):
                _write_chunks(path, value)
            else:
                array = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
                write_atomically(path, lambda f, a=array: np.save(f, a))
        write_json(self.codes_dir / "meta.json", key)

    def code_counts(self) -> torch.Tensor:
        """How often each code occurs in the cached training codes: (K,) int64 (the Huffman coder's table).
        Codes cached from other weights of the model (training resumed after the prior) are a RunError."""
        path = self.codes_dir / "train.npy"
        if not path.is_file():
            raise RunError(f"{path}: missing; `vqvae prior {self.path}` writes the training codes the Huffman "
                           "code needs")
        from .data import read_npy

        try:
            made_by = json.loads((self.codes_dir / "meta.json").read_text()).get("model")
        except (OSError, ValueError, AttributeError):
            made_by = None
        if made_by != pretrained.fingerprint(self.model()).hex():
            raise RunError(f"{self.codes_dir}: the cached codes are not those of the run's model (its weights changed, "
                           f"or the cache is incomplete); rerun `vqvae prior {self.path} --force`")

        try:
            codes = read_npy(path)
        except DataError as e:
            raise RunError(f"{e}; rerun `vqvae prior {self.path} --force`") from None
        K = self.model().cfg.quantizer.codebook_size
        if codes.size == 0 or not np.issubdtype(codes.dtype, np.integer) or codes.min() < 0 or codes.max() >= K:
            raise RunError(f"{path}: not code grids with values in 0..{K - 1}; rerun `vqvae prior {self.path} --force`")
        return torch.bincount(torch.from_numpy(codes.astype(np.int64)).flatten(), minlength=K)

    # -- compression ---------------------------------------------------------------------------------
    def compress(self, images: list[torch.Tensor], coder: str = "range", stages: int | None = None) -> tuple[bytes, dict]:
        """Images (C, H, W) in [0, 1], any sizes -> (bytes of one .vqz file, stats); see `codec.compress`.
        `stages` (residual-VQ runs): code the first s stages only (default all), an operating point."""
        from . import codec
        from .errors import ConfigError

        if coder not in ("range", "huffman"):
            raise ConfigError(f"coder must be 'range' or 'huffman', got {coder!r}")
        model = self.model()
        if coder == "range":  # labels (class-conditional priors) are chosen with the float prior: faster
            return codec.compress(model, self.integer_prior(), images, label_prior=self.prior(), stages=stages)
        return codec.compress(model, None, images, coder="huffman", code_counts=self.code_counts(), stages=stages)

    def decompress(self, data: bytes, max_pixels: int | None = None) -> list[torch.Tensor]:
        """The images of a .vqz file made with this run, at their sizes; the file says which prior it needs.
        A file whose images hold more than `max_pixels` pixels in all is refused before any decoding."""
        import math

        from . import codec

        header = codec.read_header(data)
        pixels = sum(math.prod(shape[1:]) for shape in header.shapes)
        if max_pixels is not None and pixels > max_pixels:
            raise CodecError(f"the file holds {pixels:,} pixels, more than {max_pixels:,} "
                                   "(--max-pixels raises the limit)")
        model = self.model()
        if header.coder == "huffman":
            return codec.decompress(model, None, data, code_counts=self.code_counts())
        prior = self.prior() if header.version == 1 else self.integer_prior()  # version 1: float priors
        return codec.decompress(model, prior, data)


def _open_npy(path: Path) -> np.ndarray:
    """A read-only memory map of an .npy file (nothing is read yet); a file shorter than its header says,
    or holding objects, raises ValueError."""
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _write_chunks(path: Path, codes: CodeChunks) -> None:
    """Fill `path` with the int16 grids of `codes`, chunk by chunk, through a memory-mapped temp file
    (`.NAME.XXXXXXXX.tmp`, the usual permissions) renamed into place once all `rows` are written."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        chunks = iter(codes.chunks)
        first = next(chunks, None)
        if first is None or codes.rows < 1:
            raise ValueError(f"{path}: no code grids to write")
        first = np.asarray(first)
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int16, shape=(codes.rows, *first.shape[1:]))
        filled = 0
        for chunk in itertools.chain([first], chunks):
            chunk = np.asarray(chunk)
            if chunk.shape[1:] != out.shape[1:] or filled + len(chunk) > codes.rows:
                raise ValueError(f"{path}: a chunk of shape {chunk.shape} after {filled} of {codes.rows} grids "
                                 f"of shape {out.shape[1:]}")
            out[filled:filled + len(chunk)] = chunk
            filled += len(chunk)
        if filled != codes.rows:
            raise ValueError(f"{path}: {filled} code grids written, {codes.rows} announced")
        out.flush()
        del out
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
