"""Spectra of sound: the multi-resolution STFT loss the 1-D models train with, and the figures that judge
audio (SNR, log-mel spectral distance, a spectrogram picture).

Key: B batch, T samples, F frequency bins (n_fft // 2 + 1), N frames, M mel bands.

Inputs of the loss are the models' [0, 1] clips (B, 1, T) (files.py); it looks at the waveform 2x - 1.
Spectra are taken without centring (frame i covers samples [i hop, i hop + n_fft)), with a periodic Hann
window, which is what `stft_magnitude` and its brute-force check in the tests compute.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .speech import SAMPLE_RATE

RESOLUTIONS = ((1024, 256), (512, 128), (256, 64))  # (n_fft, hop): ~64, 32 and 16 ms windows at 16 kHz
EPS = 1e-5  # magnitudes floored here before the log: about -100 dB of a full-scale window
TRAIN_CROP = 4096  # samples of each clip a training step sees (0.256 s: 64 codes at 1/64)


def training_crop(x: torch.Tensor, length: int = TRAIN_CROP) -> torch.Tensor:
    """A random `length`-sample window of each clip (B, C, T) -> (B, C, length), offsets drawn from torch's
    global generator (which checkpoints save: a resumed run draws the same crops); unchanged if T <= length."""
    B, C, T = x.shape
    if T <= length:
        return x
    start = torch.randint(0, T - length + 1, (B, 1, 1)).to(x.device)
    index = start + torch.arange(length, device=x.device)  # (B, 1, length)
    return x.gather(2, index.expand(B, C, length))


def stft_magnitude(wave: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """|STFT| of waveforms (B, T) -> (B, F, N), Hann window of n_fft, frames [i hop, i hop + n_fft)."""
    window = torch.hann_window(n_fft, dtype=wave.dtype, device=wave.device)
    spec = torch.stft(wave, n_fft, hop, window=window, center=False, return_complex=True)  # (B, F, N)
    return spec.abs().clamp_min(EPS)


def stft_loss(x_hat: torch.Tensor, x: torch.Tensor, resolutions=RESOLUTIONS) -> torch.Tensor:
    """Multi-resolution STFT loss of clips (B, 1, T) in [0, 1]: the mean over `resolutions` of spectral
    convergence |S - S_hat|_F / |S|_F (norms over the batch) plus the mean |log S - log S_hat| (Yamamoto et
    al., Parallel WaveGAN).
    Clips shorter than a resolution's window skip it (all of them: 0)."""
    wave, wave_hat = (x.flatten(1) * 2 - 1).float(), (x_hat.flatten(1) * 2 - 1).float()  # (B, T)
    losses = []
    for n_fft, hop in resolutions:
        if wave.shape[1] < n_fft:
            continue
        s, s_hat = stft_magnitude(wave, n_fft, hop), stft_magnitude(wave_hat, n_fft, hop)
        # over the whole batch: a silent clip alone would divide by nearly zero
        convergence = torch.linalg.vector_norm(s - s_hat) / torch.linalg.vector_norm(s)
        losses.append(convergence + (s.log() - s_hat.log()).abs().mean())
    return torch.stack(losses).mean() if losses else x_hat.sum() * 0


# -- figures (numpy, float64) ----------------------------------------------------------------------------
def mel_filterbank(n_fft: int = 1024, bands: int = 80, rate: int = SAMPLE_RATE, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
    """Triangular filters (M, F) on the HTK mel scale (mel = 2595 log10(1 + f / 700)), peak 1."""
    fmax = rate / 2 if fmax is None else fmax
    mel = lambda f: 2595 * np.log10(1 + np.asarray(f) / 700)  # noqa: E731
    hz = lambda m: 700 * (10 ** (np.asarray(m) / 2595) - 1)  # noqa: E731
    edges = hz(np.linspace(mel(fmin), mel(fmax), bands + 2))  # (M + 2,)
    freqs = np.linspace(0, rate / 2, n_fft // 2 + 1)  # (F,)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising, falling = (freqs - lower) / (centre - lower), (upper - freqs) / (upper - centre)
    return np.maximum(0, np.minimum(rising, falling))


def log_mel(wave: np.ndarray, n_fft: int = 1024, hop: int = 256, bands: int = 80,
            rate: int = SAMPLE_RATE) -> np.ndarray:
    """Waveform (T,) in [-1, 1] -> log10 mel power (M, N) in dB (10 log10(power + 1e-10))."""
    wave = np.asarray(wave, dtype=np.float64)
    if len(wave) < n_fft:
        wave = np.pad(wave, (0, n_fft - len(wave)))
    frames = np.lib.stride_tricks.sliding_window_view(wave, n_fft)[::hop]  # (N, n_fft)
    window = np.hanning(n_fft + 1)[:-1]  # periodic Hann
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2  # (N, F)
    return 10 * np.log10(mel_filterbank(n_fft, bands, rate) @ power.T + 1e-10)  # (M, N)


def log_mel_distance(reference: np.ndarray, test: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    """Mean over frames of the RMS difference (dB) between log-mel spectra of two waveforms in [-1, 1];
    the shorter one is zero-padded to the other's length. Frames where both are silent count as equal
    (each log-mel is floored at 80 dB below the reference's loudest band)."""
    n = max(len(reference), len(test))
    a, b = (np.pad(np.asarray(w, np.float64), (0, n - len(w))) for w in (reference, test))
    A, B = log_mel(a, rate=rate), log_mel(b, rate=rate)
    floor = A.max() - 80
    A, B = np.maximum(A, floor), np.maximum(B, floor)
    return float(np.sqrt(((A - B) ** 2).mean(axis=0)).mean())


def snr(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-noise ratio in dB: 10 log10(|x|^2 / |x - y|^2) (the shorter one zero-padded)."""
    n = max(len(reference), len(test))
    a, b = (np.pad(np.asarray(w, np.float64), (0, n - len(w))) for w in (reference, test))
    noise = ((a - b) ** 2).sum()
    return float("inf") if noise == 0 else float(10 * np.log10((a ** 2).sum() / noise))


def save_spectrogram(waves: list[np.ndarray], path: str | Path, rate: int = SAMPLE_RATE) -> None:
    """A picture of the log-mel spectrograms of waveforms (each in [-1, 1]), one above the other, low
    frequencies at the bottom, 80 dB of range from black to white; written atomically (format from the
    suffix, e.g. .png)."""
    from PIL import Image

    from ..data import _write

    rows = []
    for wave in waves:
        spec = log_mel(wave, hop=128, rate=rate)[::-1]  # (M, N), high bands on top
        top = spec.max()
        rows.append(np.clip((spec - (top - 80)) / 80, 0, 1))
        rows.append(np.ones((2, spec.shape[1])))  # a white line between clips
    width = max(r.shape[1] for r in rows)
    image = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]))) for r in rows[:-1]])
    img = Image.fromarray((image * 255).round().astype(np.uint8)).resize((width * 3, image.shape[0] * 2))
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    _write(path, lambda f: img.save(f, format=fmt))
