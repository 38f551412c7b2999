"""The codecs a sound model is compared with: FLAC (lossless, soundfile), 8 kHz mu-law (G.711's 8 bits a
sample at half the rate) and Opus (the `opusenc`/`opusdec` programs of opus-tools, when installed).

Each takes a waveform (n,) in [-1, 1] at SAMPLE_RATE and returns (bytes of its file or payload, the decoded
waveform at SAMPLE_RATE, same length).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ..errors import DataError
from .files import _soundfile, to_pcm16
from .speech import SAMPLE_RATE, resample

MU = 255


def flac(wave: np.ndarray) -> tuple[int, np.ndarray]:
    """Lossless FLAC (16-bit, soundfile's default compression): (file bytes, the 16-bit waveform)."""
    sf = _soundfile()
    pcm = to_pcm16(wave)
    buffer = io.BytesIO()
    sf.write(buffer, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    buffer.seek(0)
    decoded, _ = sf.read(buffer, dtype="int16")
    assert np.array_equal(decoded, pcm)
    return len(buffer.getvalue()), pcm.astype(np.float32) / 32768


def mulaw_8k(wave: np.ndarray) -> tuple[int, np.ndarray]:
    """Resample to 8 kHz, mu-law (mu = 255) to 8 bits a sample, expand, back to SAMPLE_RATE:
    (one byte per 8 kHz sample, no file header; the decoded waveform)."""
    low = np.clip(resample(wave, SAMPLE_RATE, 8000), -1, 1)
    code = np.round((np.sign(low) * np.log1p(MU * np.abs(low)) / np.log1p(MU) + 1) / 2 * 255)  # 0..255
    y = code / 255 * 2 - 1
    expanded = np.sign(y) * np.expm1(np.abs(y) * np.log1p(MU)) / MU
    back = resample(expanded, 8000, SAMPLE_RATE)[:len(wave)]
    return len(code), np.pad(back, (0, len(wave) - len(back))).astype(np.float32)


def opus_available() -> bool:
    return shutil.which("opusenc") is not None and shutil.which("opusdec") is not None


def opus(wave: np.ndarray, kbps: float) -> tuple[int, np.ndarray]:
    """opusenc --bitrate kbps (speech at 16 kHz), opusdec --rate 16000: (.opus file bytes, Ogg pages
    included; the decoded waveform, cut or zero-padded to the input's length)."""
    if not opus_available():
        raise DataError("opusenc/opusdec not found: install opus-tools (apt-get install opus-tools)")
    sf = _soundfile()
    with tempfile.TemporaryDirectory() as tmp:
        source, coded, decoded = Path(tmp) / "in.wav", Path(tmp) / "x.opus", Path(tmp) / "out.wav"
        sf.write(source, to_pcm16(wave), SAMPLE_RATE, subtype="PCM_16")
        subprocess.run(["opusenc", "--quiet", "--bitrate", str(kbps), str(source), str(coded)], check=True)
        subprocess.run(["opusdec", "--quiet", "--rate", str(SAMPLE_RATE), str(coded), str(decoded)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        back, rate = sf.read(decoded, dtype="float32", always_2d=True)
        size = coded.stat().st_size
    back = resample(back.mean(axis=1), rate)[:len(wave)]
    return size, np.pad(back, (0, len(wave) - len(back))).astype(np.float32)
