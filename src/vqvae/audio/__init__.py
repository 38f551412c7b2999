"""Sound: the `speech` dataset (spoken digits from eSpeak NG), sound files and the `wav:PATH` dataset,
the spectral loss and figures of the 1-D models. Needs the `audio` extra (soundfile, espeakng-loader,
scipy, platformdirs), imported on use.

Clips are float32 (N, 1, T) in [0, 1] at SAMPLE_RATE (16 kHz), the waveform w as (w + 1) / 2.
"""

from .files import from_unit, is_audio_file, load_audio, read_audio, save_wav, to_pcm16, to_unit
from .spectral import log_mel, log_mel_distance, save_spectrogram, snr, stft_loss, stft_magnitude
from .speech import CLIP_SAMPLES, DIGITS, SAMPLE_RATE, SPECS, SpeechSet, SpeechSpec, speech_set, synthesize

__all__ = ["from_unit", "is_audio_file", "load_audio", "read_audio", "save_wav", "to_pcm16", "to_unit",
           "log_mel", "log_mel_distance", "save_spectrogram", "snr", "stft_loss", "stft_magnitude",
           "CLIP_SAMPLES", "DIGITS", "SAMPLE_RATE", "SPECS", "SpeechSet", "SpeechSpec", "speech_set", "synthesize"]
