"""A run directory as one object: the only code that knows where a run keeps what.

    runs/NAME/
      config.json  model.safetensors       the autoencoder (ModelConfig + data and train sections)
      train_state.pt  metrics.jsonl        resume state and the training log
      recon.png  samples.png  heldout.vqz  pictures and files the commands write
      codes/{train,test}[_labels].npy      cached int16 code grids (meta.json says of which weights)
      prior/                               the learned prior (config.json, model.safetensors, train.json, ...)
      prior/integer/                       its integer model, which drives the range coder

    run = Run("runs/demo")
    model, prior = run.model(), run.prior()
    data, stats = run.compress(images)          # the bytes of a .vqz file
    images = run.decompress(data)

Every missing or malformed piece raises a `RunError` whose one line names the file and the command that
makes it.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from . import pretrained
from .errors import RunError

CODE_SPLITS = ("train", "test", "train_labels", "test_labels")


class Run:
    """The run directory at `path` (written by `vqvae train`, completed by `vqvae prior`)."""

    STATE, METRICS = "train_state.pt", "metrics.jsonl"
    RECON, SAMPLES, HELDOUT = "recon.png", "samples.png", "heldout.vqz"

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

    def exists(self) -> bool:
        """True when the directory holds a trained model (config.json and model.safetensors)."""
        return all((self.path / name).is_file() for name in (pretrained.CONFIG_NAME, pretrained.WEIGHTS_NAME))

    def has_prior(self) -> bool:
        return (self.prior_dir / pretrained.WEIGHTS_NAME).is_file()

    def has_integer_prior(self) -> bool:
        return (self.integer_prior_dir / pretrained.WEIGHTS_NAME).is_file()

    # -- the autoencoder and its data ---------------------------------------------------------------
    @cached_property
    def config(self) -> dict:
        """The whole config.json: model, data and train sections."""
        return pretrained.read_config(self.path, "a run directory written by `vqvae train`", "run")

    @property
    def data_uri(self) -> str:
        try:
            return str(self.config["data"]["uri"])
        except (KeyError, TypeError):
            raise RunError(f"{self.path / pretrained.CONFIG_NAME}: no data section; expected a run directory "
                           "written by `vqvae train`") from None

    @property
    def num_classes(self) -> int:
        return int(self.config.get("data", {}).get("num_classes", 0))

    def model(self, device: str | torch.device = "cpu"):
        """The trained VQVAE, in eval mode on `device` (read once per Run object)."""
        from .autoencoders import VQVAE

        return self._load("model", device, lambda: VQVAE.from_pretrained(self.path, device))

    def dataset(self, uri: str | None = None):
        """The run's dataset (train and held-out splits), or the dataset `uri` names instead."""
        from .data import load_dataset

        return load_dataset(uri or self.data_uri)

    # -- the prior ---------------------------------------------------------------------------------
    def prior(self, device: str | torch.device = "cpu"):
        """The learned (float) prior, in eval mode: what sampling and likelihoods use."""
        from .priors import load_prior

        if not self.has_prior():
            raise RunError(f"{self.prior_dir}: no prior; train one with `vqvae prior {self.path}` first")
        return self._load("prior", device, lambda: load_prior(self.prior_dir, device))

    def integer_prior(self, device: str | torch.device = "cpu"):
        """The prior's integer model: what the range coder uses (same frequencies on every machine).
        `vqvae prior` makes it; for a run whose prior predates integer models it is made here, once."""
        from .integer_priors import load_integer_prior

        if not self.has_integer_prior():
            self.quantize_prior()
        return self._load("integer_prior", device, lambda: load_integer_prior(self.integer_prior_dir, device))

    def quantize_prior(self):
        """Make the integer model of the run's prior, calibrated on the cached training codes, and save it
        under prior/integer/ -> the IntegerPrior."""
        from .integer_priors import IntegerPrior

        prior = self.prior()
        arrays = {}
        for name in ("train", "train_labels"):
            path = self.codes_dir / f"{name}.npy"
            try:
                arrays[name] = torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))
            except (OSError, ValueError, EOFError):
                if name == "train" or prior.cfg.num_classes:
                    raise RunError(f"{path}: missing or unreadable; rerun `vqvae prior {self.path} --force`") from None
        codes = arrays["train"]
        if tuple(codes.shape[1:]) != prior.cfg.grid:
            raise RunError(f"{self.codes_dir / 'train.npy'}: code grids of shape {tuple(codes.shape[1:])}, the prior "
                           f"models {prior.cfg.grid}; rerun `vqvae prior {self.path} --force`")
        labels = arrays.get("train_labels") if prior.cfg.num_classes else None
        integer = IntegerPrior.from_prior(prior, codes, labels)
        integer.save_pretrained(self.integer_prior_dir)
        self._loaded.pop(("integer_prior", str(torch.device("cpu"))), None)
        return integer

    # -- cached codes --------------------------------------------------------------------------------
    def read_codes(self, key: dict) -> dict[str, torch.Tensor | None] | None:
        """The cached code grids if they were made under `key` (model fingerprint, settings), else None."""
        meta = self.codes_dir / "meta.json"
        try:
            if json.loads(meta.read_text()) != key:
                return None
            return {name: torch.from_numpy(np.load(self.codes_dir / f"{name}.npy"))
                    if (self.codes_dir / f"{name}.npy").is_file() else None for name in CODE_SPLITS}
        except (OSError, ValueError, EOFError):  # missing, partial or unreadable cache: make it again
            return None

    def write_codes(self, arrays: dict[str, torch.Tensor | None], key: dict) -> None:
        """Cache code grids (int16) and labels; meta.json, written last, says they are complete."""
        from .config import write_json

        self.codes_dir.mkdir(parents=True, exist_ok=True)
        (self.codes_dir / "meta.json").unlink(missing_ok=True)
        for name, value in arrays.items():
            if value is not None:
                tmp = self.codes_dir / f"{name}.tmp.npy"
                np.save(tmp, value.numpy())
                tmp.replace(self.codes_dir / f"{name}.npy")
        write_json(self.codes_dir / "meta.json", key)

    def code_counts(self) -> torch.Tensor:
        """How often each code occurs in the cached training codes: (K,) int64 (the Huffman coder's table)."""
        path = self.codes_dir / "train.npy"
        if not path.is_file():
            raise RunError(f"{path}: missing; `vqvae prior {self.path}` writes the training codes the Huffman "
                           "code needs")
        try:
            codes = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise RunError(f"{path}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                           f"rerun `vqvae prior {self.path} --force`") from None
        K = int(self.config["model"]["quantizer"]["codebook_size"])
        if codes.size == 0 or not np.issubdtype(codes.dtype, np.integer) or codes.min() < 0 or codes.max() >= K:
            raise RunError(f"{path}: not code grids with values in 0..{K - 1}; rerun `vqvae prior {self.path} --force`")
        return torch.bincount(torch.from_numpy(codes.astype(np.int64)).flatten(), minlength=K)

    # -- compression ---------------------------------------------------------------------------------
    def compress(self, images: list[torch.Tensor], coder: str = "range") -> tuple[bytes, dict]:
        """Images (C, H, W) in [0, 1], any sizes -> (bytes of one .vqz file, stats); see `codec.compress`."""
        from . import codec
        from .errors import ConfigError

        if coder not in ("range", "huffman"):
            raise ConfigError(f"coder must be 'range' or 'huffman', got {coder!r}")
        model = self.model()
        if coder == "range":  # labels (class-conditional priors) are chosen with the float prior: faster
            return codec.compress(model, self.integer_prior(), images, label_prior=self.prior())
        return codec.compress(model, None, images, coder="huffman", code_counts=self.code_counts())

    def decompress(self, data: bytes) -> list[torch.Tensor]:
        """The images of a .vqz file made with this run, at their sizes; the file says which prior it needs."""
        from . import codec

        header = codec.read_header(data)
        model = self.model()
        if header.coder == "huffman":
            return codec.decompress(model, None, data, code_counts=self.code_counts())
        prior = self.prior() if header.version == 1 else self.integer_prior()  # version 1: float priors
        return codec.decompress(model, prior, data)
