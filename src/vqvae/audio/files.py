"""Sound as the models see it, and sound files: the one place waveforms are scaled.

Key: N clips, C file channels, T samples.

A waveform w in [-1, 1] (16-bit PCM / 32768) is given to the models as x = (w + 1) / 2 in [0, 1], the
range data.py gives images, as float32 (N, 1, T) at SAMPLE_RATE. Files are read through `soundfile`
(WAV, FLAC, OGG, ... at any rate, mono or stereo: channels are averaged) and resampled to SAMPLE_RATE;
files are written as 16-bit PCM WAV.

`wav:PATH` (`load_wav_folder`): every .wav/.flac file directly in PATH, sorted by name, cut into clips of
`CLIP_SAMPLES` (the last one of a file zero-padded). The held-out split is the clips of every tenth file
(file index % 10 == 9) when there are at least 10 files; with fewer, the held-out split is the training
clips themselves.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .speech import CLIP_SAMPLES, SAMPLE_RATE, resample

AUDIO_SUFFIXES = (".wav", ".flac")
MAX_SECONDS = 3600.0  # a longer input file is refused before it is read


def _soundfile():
    try:
        import soundfile
    except ImportError:
        raise DataError("sound files need soundfile: pip install 'vqvae[audio]'") from None
    return soundfile


def to_unit(wave: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Waveform in [-1, 1] -> float32 in [0, 1] (the models' range), same shape."""
    return ((torch.as_tensor(np.asarray(wave) if not isinstance(wave, torch.Tensor) else wave,
                             dtype=torch.float32) + 1) / 2).clamp(0, 1)


def from_unit(x: torch.Tensor) -> np.ndarray:
    """float [0, 1] (any shape) -> waveform float32 in [-1, 1]."""
    return (x.detach().float().cpu().clamp(0, 1) * 2 - 1).numpy()


def to_pcm16(wave: np.ndarray) -> np.ndarray:
    """Waveform in [-1, 1] -> int16, rounded and clipped."""
    return np.clip(np.round(np.asarray(wave, dtype=np.float64) * 32768), -32768, 32767).astype(np.int16)


def read_audio(path: str | Path, rate: int = SAMPLE_RATE) -> np.ndarray:
    """A sound file as a mono float32 waveform (n,) in [-1, 1] at `rate`. An unreadable, empty or
    over-long file is a one-line `DataError` naming it."""
    sf, path = _soundfile(), Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: {'is a directory' if path.is_dir() else 'no such file'}, expected a sound file")
    try:
        info = sf.info(str(path))
        if info.frames / max(info.samplerate, 1) > MAX_SECONDS:
            raise DataError(f"{path}: {info.frames / info.samplerate:.0f} s of sound, more than the "
                            f"{MAX_SECONDS:.0f} s allowed")
        data, file_rate = sf.read(str(path), dtype="float32", always_2d=True)  # (n, C)
    except DataError:
        raise
    except (RuntimeError, ValueError, TypeError, OSError) as e:  # soundfile.LibsndfileError is a RuntimeError
        reason = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: not a readable sound file (expected WAV or FLAC): {reason}") from None
    if data.shape[0] == 0:
        raise DataError(f"{path}: holds no samples")
    if not np.isfinite(data).all():
        raise DataError(f"{path}: holds NaN or infinite samples")
    mono = data.mean(axis=1)
    return np.clip(resample(mono, file_rate, rate), -1, 1).astype(np.float32)


def load_audio(paths: list[str | Path], rate: int = SAMPLE_RATE) -> list[torch.Tensor]:
    """Sound files as float32 (1, n) tensors in [0, 1] at `rate` (the models' input, any length)."""
    return [to_unit(read_audio(p, rate))[None] for p in paths]


def save_wav(x: torch.Tensor | np.ndarray, path: str | Path, rate: int = SAMPLE_RATE) -> None:
    """Write a clip (1, n) or (n,) in [0, 1] (the models' range) as 16-bit mono WAV, atomically."""
    from ..data import write_bytes

    sf = _soundfile()
    wave = from_unit(torch.as_tensor(x)).reshape(-1)
    buffer = io.BytesIO()
    sf.write(buffer, to_pcm16(wave), rate, format="WAV", subtype="PCM_16")
    write_bytes(path, buffer.getvalue())


def is_audio_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in AUDIO_SUFFIXES


def clips_of(wave: np.ndarray, length: int = CLIP_SAMPLES) -> np.ndarray:
    """A waveform (n,) -> float32 (ceil(n / length), length), the last clip zero-padded."""
    count = -(-len(wave) // length)
    out = np.zeros((count, length), dtype=np.float32)
    out.reshape(-1)[:len(wave)] = wave
    return out


def load_wav_folder(path: Path, uri: str):
    """The `wav:PATH` dataset (see the module docstring) as a `data.Dataset` of (N, 1, CLIP_SAMPLES)."""
    from ..data import Dataset

    if not path.is_dir():
        raise DataError(f"{uri}: no such directory")
    files = sorted(p for p in path.iterdir() if p.is_file() and is_audio_file(p))
    if not files:
        raise DataError(f"{uri}: no .wav/.flac files in this directory")
    clips = [clips_of(read_audio(f)) for f in files]
    held_out = np.concatenate([np.full(len(c), i % 10 == 9) for i, c in enumerate(clips)])
    x = to_unit(np.concatenate(clips))[:, None]  # (N, 1, T)
    if len(files) < 10:
        return Dataset(x, x.clone(), None, None, 0, uri)
    mask = torch.from_numpy(held_out)
    return Dataset(x[~mask], x[mask], None, None, 0, uri)


def load_speech(uri: str):
    """The `speech` dataset (`speech.SPECS[uri]`) as a `data.Dataset` of (N, 1, CLIP_SAMPLES), labelled by
    digit; held-out speakers never occur in training."""
    from ..data import Dataset
    from .speech import SPECS, speech_set

    if uri not in SPECS:
        raise DataError(f"unknown speech set {uri!r}; expected one of: {', '.join(SPECS)}")
    speech = speech_set(SPECS[uri])
    x = to_unit(speech.pcm.astype(np.float32) / 32768)[:, None]  # (N, 1, T)
    digits, held_out = torch.from_numpy(speech.digits), torch.from_numpy(speech.held_out)
    return Dataset(x[~held_out], x[held_out], digits[~held_out], digits[held_out], 10, uri)
