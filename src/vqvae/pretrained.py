"""The `save_pretrained` / `from_pretrained` file convention shared by models and priors.

A directory holds `config.json` (everything needed to rebuild the module) and `model.safetensors` (its
weights). Each is written under a unique temp name and renamed into place (`config.write_atomically`);
loading never unpickles code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .config import write_atomically, write_json
from .errors import RunError

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def save(module: nn.Module, directory: str | Path, config: dict) -> None:
    """Write `config` as config.json and the module's state dict as model.safetensors, atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    data = safetensors_bytes(state, metadata={"format": "pt"})
    write_atomically(directory / WEIGHTS_NAME, lambda f: f.write(data))
    write_json(directory / CONFIG_NAME, config)


def read_config(directory: str | Path, what: str, kind: str) -> dict:
    """config.json of a saved directory, after checking that both files exist.

    `what` says what the directory should have been ("a run directory written by ..."), `kind` what the
    config describes ("model", "prior"): both go into the one-line errors.
    """
    directory = Path(directory)
    for path in (directory / CONFIG_NAME, directory / WEIGHTS_NAME):
        if not path.is_file():
            raise RunError(f"{path}: missing; expected {what}")
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
    except ValueError as e:
        raise RunError(f"{directory / CONFIG_NAME}: not a vqvae {kind} config (invalid JSON: {e})") from None
    except OSError as e:
        raise RunError(f"{directory / CONFIG_NAME}: unreadable ({e.strerror})") from None
    if not isinstance(config, dict):
        raise RunError(f"{directory / CONFIG_NAME}: not a vqvae {kind} config (a JSON {type(config).__name__}, "
                       "expected an object)")
    return config


def load_weights(module: nn.Module, directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load model.safetensors into `module`; returns it on `device` in eval mode."""
    weights = Path(directory) / WEIGHTS_NAME
    try:
        module.load_state_dict(load_file(str(weights), device=str(device)))
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise RunError(f"{weights}: cannot load weights ({str(e).splitlines()[0]})") from None
    return module.to(device).eval()


def fingerprint(module: nn.Module, nbytes: int = 2) -> bytes:
    """First `nbytes` of a sha256 over the state dict: per entry (sorted by name) the name, dtype and
    shape, then the tensor's raw bytes. Same weights -> same bytes, whatever the device."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()[:nbytes]
