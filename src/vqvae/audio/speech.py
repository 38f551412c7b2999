"""The `speech` dataset: spoken digits "zero" to "nine" synthesized with eSpeak NG, generated once and cached.

Key: N clips, T samples per clip (SAMPLE_RATE * CLIP_SECONDS).

eSpeak NG comes with the `espeakng-loader` wheel (the library and its voices), driven through ctypes in
synchronous mode: a callback collects 16-bit PCM at 22,050 Hz, resampled to 16 kHz (scipy's polyphase
`resample_poly`, 160/441). A speaker is a voice (an English accent) with a variant (a voice quality);
each speaker says every digit `takes` times at a speed and pitch drawn from the clip's own seed.

eSpeak NG keeps state from one utterance to the next (oscillator phases, random generators), so the same
request gives slightly different samples each time. Each clip is therefore synthesized in a forked child
of a process that initialised the library and never spoke: every clip starts from the same state, with
the library's and libc's random seeds set to the clip's seed. The set is then identical on every run, which
the content hash stored next to the cache checks (`SpeechSet.content_hash`).

The cache lives in $VQVAE_CACHE_DIR, else the user's cache directory (platformdirs), as
speech-<key>.npz where <key> is a hash of the spec, the synthesis code's version and the eSpeak NG data.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import os
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError

SAMPLE_RATE = 16_000  # the model's rate
ESPEAK_RATE = 22_050
CLIP_SECONDS = 0.8
CLIP_SAMPLES = int(SAMPLE_RATE * CLIP_SECONDS)  # T = 12,800: 200 codes at 1/64
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOICES = ("en", "en-US", "en-GB-x-rp", "en-GB-scotland", "en-029", "en-US-nyc", "en-GB-x-gbclan",
          "en-GB-x-gbcwmd")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
SYNTH_VERSION = 1  # bump when synthesis or resampling changes: it is part of the cache key
CACHE_ENV = "VQVAE_CACHE_DIR"
_SILENCE = 64  # |sample| below this (int16) at the ends of a clip is trimmed


@dataclass(frozen=True)
class SpeechSpec:
    """Which clips make the set: every (voice, variant) speaker says every digit `takes` times, at a speed
    in `speeds` words/min and a pitch in `pitches` (0..100) drawn from the clip's seed. Speakers whose index
    (voice-major order) is `held_out_every - 1` mod `held_out_every` form the held-out split."""

    voices: tuple[str, ...] = VOICES
    variants: tuple[str, ...] = VARIANTS
    takes: int = 3
    speeds: tuple[int, int] = (120, 200)
    pitches: tuple[int, int] = (25, 75)
    held_out_every: int = 8
    seed: int = 0

    def speakers(self) -> list[str]:
        return [f"{voice}+{variant}" for voice in self.voices for variant in self.variants]

    def clips(self) -> list[dict]:
        """One dict per clip: speaker, digit, speed, pitch, seed, held_out (in a fixed order)."""
        clips = []
        for s, speaker in enumerate(self.speakers()):
            for take in range(self.takes):
                for digit in range(len(DIGITS)):
                    seed = _seed(self.seed, speaker, digit, take)
                    rng = np.random.default_rng(seed)
                    clips.append({"speaker": speaker, "speaker_index": s, "digit": digit,
                                  "speed": int(rng.integers(self.speeds[0], self.speeds[1] + 1)),
                                  "pitch": int(rng.integers(self.pitches[0], self.pitches[1] + 1)),
                                  "seed": seed, "held_out": s % self.held_out_every == self.held_out_every - 1})
        return clips


SPECS = {"speech": SpeechSpec(),  # 96 speakers, 2,880 clips (12 speakers, 360 clips held out)
         "speech:tiny": SpeechSpec(voices=("en-US", "en-GB-x-rp"), variants=("m1", "f2"), takes=1, held_out_every=4)}


def _seed(base: int, speaker: str, digit: int, take: int) -> int:
    digest = hashlib.sha256(f"{base}/{speaker}/{digit}/{take}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass
class SpeechSet:
    """Clips as int16 PCM (N, T) at SAMPLE_RATE (silence-trimmed, zero-padded or cut to T), with
    `lengths` (N,) of the speech before padding, `digits` (N,), `speakers` (N,) speaker indices into
    `speaker_names`, `held_out` (N,) bool."""

    pcm: np.ndarray
    lengths: np.ndarray
    digits: np.ndarray
    speakers: np.ndarray
    held_out: np.ndarray
    speaker_names: list[str]

    def content_hash(self) -> str:
        """sha256 of the samples and labels: equal sets have equal hashes."""
        h = hashlib.sha256()
        for array in (self.pcm, self.lengths, self.digits, self.speakers, self.held_out):
            h.update(np.ascontiguousarray(array).tobytes())
        h.update("\n".join(self.speaker_names).encode())
        return h.hexdigest()


# -- eSpeak NG through ctypes ----------------------------------------------------------------------------
class _Espeak:
    """The library, initialised once in this process (synchronous output, our PCM callback); it never
    speaks in this process: `synthesize` forks a child for each clip."""

    _CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
    AUDIO_OUTPUT_SYNCHRONOUS, POS_CHARACTER, CHARS_UTF8 = 2, 1, 1
    RATE, PITCH = 1, 3  # espeak_PARAMETER

    def __init__(self):
        try:
            import espeakng_loader
        except ImportError:
            raise DataError("the 'speech' dataset needs espeakng-loader: pip install 'vqvae[audio]'") from None
        if not hasattr(os, "fork"):
            raise DataError("the 'speech' dataset is synthesized in forked processes: it needs Linux or macOS")
        self.data_path = espeakng_loader.get_data_path()
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self.lib, self.libc = lib, ctypes.CDLL(None)
        self.chunks: list[bytes] = []
        self.callback = self._CALLBACK(self._collect)  # kept alive as long as the library may call it
        rate = lib.espeak_Initialize(self.AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path.encode(), 0)
        if rate != ESPEAK_RATE:
            raise DataError(f"eSpeak NG at {self.data_path}: sample rate {rate}, expected {ESPEAK_RATE}")
        lib.espeak_SetSynthCallback(self.callback)

    def _collect(self, wav, n: int, events) -> int:
        if n > 0 and wav:
            self.chunks.append(ctypes.string_at(wav, 2 * n))
        return 0  # 0: go on

    def _speak(self, text: str, voice: str, speed: int, pitch: int, seed: int) -> bytes:
        """In the child: the clip's int16 PCM bytes at ESPEAK_RATE."""
        lib = self.lib
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise DataError(f"eSpeak NG has no voice {voice!r}")
        lib.espeak_SetParameter(self.RATE, speed, 0)
        lib.espeak_SetParameter(self.PITCH, pitch, 0)
        lib.espeak_ng_SetRandSeed(seed)
        self.libc.srand(seed)
        data = text.encode()
        lib.espeak_Synth(data, len(data) + 1, 0, self.POS_CHARACTER, 0, self.CHARS_UTF8, None, None)
        lib.espeak_Synchronize()
        return b"".join(self.chunks)

    def synthesize(self, text: str, voice: str, speed: int, pitch: int, seed: int) -> np.ndarray:
        """int16 (n,) at ESPEAK_RATE, from a forked child: the same arguments give the same samples."""
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: speak, send, leave without running any of the parent's exit handlers
            status = 0
            try:
                os.close(read_end)
                with os.fdopen(write_end, "wb") as pipe:
                    pipe.write(self._speak(text, voice, speed, pitch, seed))
            except BaseException:
                status = 1
            os._exit(status)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise DataError(f"eSpeak NG failed on {text!r} with voice {voice!r}")
        return np.frombuffer(data, dtype=np.int16)


_ESPEAK: _Espeak | None = None


def _espeak() -> _Espeak:
    global _ESPEAK
    if _ESPEAK is None:
        _ESPEAK = _Espeak()
    return _ESPEAK


def resample(x: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """float (n,) or (n, C) at `rate` -> float64 at `target` (scipy's polyphase filter)."""
    from math import gcd

    from scipy.signal import resample_poly

    if rate == target:
        return np.asarray(x, dtype=np.float64)
    g = gcd(rate, target)
    return resample_poly(np.asarray(x, dtype=np.float64), target // g, rate // g, axis=0)


def _trim(pcm: np.ndarray) -> np.ndarray:
    """Drop the near-silent samples at both ends (eSpeak NG pads each utterance with silence)."""
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) >= _SILENCE)
    return pcm[loud[0]:loud[-1] + 1] if len(loud) else pcm[:0]


def synthesize_clip(clip: dict) -> np.ndarray:
    """One clip of `SpeechSpec.clips` -> int16 (n,) at SAMPLE_RATE, trimmed of silence (n may exceed T)."""
    pcm = _espeak().synthesize(DIGITS[clip["digit"]], clip["speaker"], clip["speed"], clip["pitch"], clip["seed"])
    x = resample(pcm.astype(np.float64), ESPEAK_RATE)
    return _trim(np.clip(np.round(x), -32768, 32767).astype(np.int16))


def synthesize(spec: SpeechSpec) -> SpeechSet:
    """Every clip of `spec`, in order (no cache; `speech_set` caches)."""
    clips = spec.clips()
    pcm = np.zeros((len(clips), CLIP_SAMPLES), dtype=np.int16)  # (N, T)
    lengths = np.zeros(len(clips), dtype=np.int64)
    for i, clip in enumerate(clips):
        x = synthesize_clip(clip)[:CLIP_SAMPLES]
        pcm[i, :len(x)] = x
        lengths[i] = len(x)
    return SpeechSet(pcm, lengths, np.array([c["digit"] for c in clips], dtype=np.int64),
                     np.array([c["speaker_index"] for c in clips], dtype=np.int64),
                     np.array([c["held_out"] for c in clips], dtype=bool), spec.speakers())


def cache_dir() -> Path:
    """$VQVAE_CACHE_DIR if set, else the user's cache directory for vqvae."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    try:
        import platformdirs
    except ImportError:
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vqvae"
    return Path(platformdirs.user_cache_dir("vqvae"))


def cache_key(spec: SpeechSpec) -> str:
    """What the set depends on: the spec, SYNTH_VERSION and the version of eSpeak NG's data."""
    import importlib.metadata

    try:
        espeak = importlib.metadata.version("espeakng-loader")
    except importlib.metadata.PackageNotFoundError:
        espeak = "unknown"
    text = json.dumps({"spec": asdict(spec), "synth": SYNTH_VERSION, "rate": SAMPLE_RATE, "T": CLIP_SAMPLES,
                       "espeakng-loader": espeak}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def speech_set(spec: SpeechSpec = SpeechSpec(), quiet: bool = True) -> SpeechSet:
    """The clips of `spec`, synthesized on first use and read from the cache afterwards.

    The cache file stores the content hash of the set; a file whose contents do not match it is
    synthesized again (a half-written or damaged file never loads).
    """
    from ..config import write_atomically

    path = cache_dir() / f"speech-{cache_key(spec)}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                cached = SpeechSet(f["pcm"], f["lengths"], f["digits"], f["speakers"], f["held_out"],
                                   [str(s) for s in f["speaker_names"]])
                expected = str(f["content_hash"])
            if cached.content_hash() == expected:
                return cached
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # synthesized again below
    start = time.perf_counter()
    speech = synthesize(spec)
    if not quiet:
        print(f"synthesized {len(speech.pcm):,} clips in {time.perf_counter() - start:.1f} s -> {path}")
    buffer = io.BytesIO()
    np.savez(buffer, pcm=speech.pcm, lengths=speech.lengths, digits=speech.digits, speakers=speech.speakers,
             held_out=speech.held_out, speaker_names=np.array(speech.speaker_names),
             content_hash=np.array(speech.content_hash()))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda f: f.write(buffer.getvalue()))
    except OSError as e:
        raise DataError(f"{path}: cannot write the speech cache ({e.strerror}); set {CACHE_ENV} to a writable "
                        "directory") from None
    return speech
