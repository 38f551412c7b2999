"""What a run on sound produces: held-out clips, sampled speech (WAV files and a spectrogram picture), and
the compression table next to FLAC, 8 kHz mu-law and Opus.

Key: B clips, T samples. Clips are float32 (1, T) tensors in [0, 1] (files.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig, QuantizerConfig
from . import baselines
from .files import from_unit, save_wav, to_unit
from .spectral import log_mel_distance, save_spectrogram, snr

# The 1-D VQ-VAE of the speech demo: 6 strided convolutions, 16 kHz -> 250 codes/s, K = 512.
SPEECH_MODEL = ModelConfig(in_channels=1, hidden=32, res_hidden=16, res_blocks=2, downsample=64, dims=1,
                           encoder_kernel=3, quantizer=QuantizerConfig(codebook_size=512, code_dim=16))


def held_out_clips(uri: str, limit: int | None = None) -> tuple[list[torch.Tensor], list[int] | None]:
    """The held-out clips of a sound dataset as (1, n) tensors in [0, 1], and their digits (None for
    `wav:`). For `speech` each clip is the speech alone, without the zero padding of the training set."""
    from ..data import load_dataset
    from .speech import SPECS, speech_set

    if uri in SPECS:
        speech = speech_set(SPECS[uri])
        rows = np.flatnonzero(speech.held_out)[:limit]
        clips = [to_unit(speech.pcm[i, :max(int(speech.lengths[i]), 1)].astype(np.float32) / 32768)[None]
                 for i in rows]
        return clips, [int(speech.digits[i]) for i in rows]
    test = load_dataset(uri).test[:limit]
    return list(test), None


def save_audio_samples(clips: torch.Tensor, output: str | Path) -> list[Path]:
    """Clips (B, 1, T) in [0, 1] -> OUTPUT.png (their spectrograms, one above the other) and
    OUTPUT-000.wav, OUTPUT-001.wav, ... next to it; returns the paths written."""
    output = Path(output)
    stem = output.with_suffix("")
    written = []
    for i, clip in enumerate(clips):
        path = stem.parent / f"{stem.name}-{i:03d}.wav"
        save_wav(clip, path)
        written.append(path)
    png = output if output.suffix else output.with_suffix(".png")
    save_spectrogram([from_unit(c.reshape(-1)) for c in clips], png)
    return [png, *written]


def save_audio_comparison(clips: torch.Tensor, reconstructions: torch.Tensor, path: str | Path) -> Path:
    """Spectrograms of clips (B, 1, T) in [0, 1], each above its reconstruction, in one picture."""
    waves = [from_unit(c.reshape(-1)) for pair in zip(clips, reconstructions) for c in pair]
    save_spectrogram(waves, path)
    return Path(path)


def sample_targets(output: str | Path, n: int) -> list[Path]:
    """The files `save_audio_samples` would write for n clips (to check before writing)."""
    output = Path(output)
    stem = output.with_suffix("")
    return [output if output.suffix else output.with_suffix(".png"),
            *[stem.parent / f"{stem.name}-{i:03d}.wav" for i in range(n)]]


def _quality(reference: np.ndarray, decoded: np.ndarray, score=None) -> dict:
    figures = {"snr_db": snr(reference, decoded), "log_mel_db": log_mel_distance(reference, decoded)}
    return {**figures, **(score(reference, decoded) if score is not None else {})}


def codec_rows(run, clips: list[torch.Tensor], opus_kbps: tuple[float, ...] = (6, 8, 12, 16),
               score=None) -> list[dict]:
    """One row per codec: name, bytes (mean per clip), snr_db and log_mel_db (means over clips), for the
    run's .vqz files (one file per clip: header, payload and CRC), FLAC, 8 kHz mu-law and Opus at each of
    `opus_kbps` (when opus-tools is installed). `score(reference, decoded) -> {name: value}` adds figures
    (means over clips)."""
    waves = [from_unit(c.reshape(-1)) for c in clips]
    codecs = {"vqvae (.vqz)": None, "FLAC": baselines.flac, "mu-law 8 kHz": baselines.mulaw_8k}
    if baselines.opus_available():
        for kbps in opus_kbps:
            codecs[f"Opus {kbps:g} kbps"] = lambda w, k=kbps: baselines.opus(w, k)
    rows = []
    for name, codec in codecs.items():
        sizes, figures = [], []
        for clip, wave in zip(clips, waves):
            if codec is None:
                data, _ = run.compress([clip])
                size, decoded = len(data), from_unit(run.decompress(data)[0].reshape(-1))
            else:
                size, decoded = codec(wave)
            sizes.append(size)
            figures.append(_quality(wave, decoded, score))
        rows.append({"codec": name, "bytes": float(np.mean(sizes)),
                     **{k: float(np.mean([f[k] for f in figures if np.isfinite(f[k])] or [np.inf]))
                        for k in figures[0]}})
    return rows


def audio_compression_table(run, limit: int = 100) -> dict:
    """The run's held-out clips (the first `limit`): {codec: "bytes B, SNR x dB, log-mel y dB"} with the raw
    16-bit size, for the CLI's table."""
    clips, _ = held_out_clips(run.data_uri, limit)
    table = {"clips": len(clips), "raw 16-bit PCM (bytes)": float(np.mean([2 * c.shape[-1] for c in clips]))}
    for row in codec_rows(run, clips, opus_kbps=(6,)):
        table[row["codec"]] = (f"{row['bytes']:.0f} B, SNR {row['snr_db']:.1f} dB, "
                               f"log-mel {row['log_mel_db']:.2f} dB")
    return table
