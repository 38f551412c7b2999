"""The audio package: the speech set (deterministic, cached, held-out speakers apart), sound files and the
wav: dataset, the STFT loss against a brute-force DFT, the figures against hand computations."""

import numpy as np
import pytest
import torch

pytest.importorskip("soundfile", reason="the audio tests need the audio extra: pip install 'vqvae[audio]'")
pytest.importorskip("espeakng_loader", reason="the audio tests need the audio extra: pip install 'vqvae[audio]'")

import soundfile  # noqa: E402

from vqvae.audio import files, spectral, speech  # noqa: E402
from vqvae.data import load_dataset  # noqa: E402
from vqvae.errors import DataError  # noqa: E402

TINY = speech.SPECS["speech:tiny"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh speech cache for this module's tests ($VQVAE_CACHE_DIR)."""
    path = tmp_path_factory.mktemp("speech_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(speech.CACHE_ENV, str(path))
        yield path


def test_speech_is_identical_on_every_synthesis(cache):
    first = speech.synthesize(TINY)
    cached = speech.speech_set(TINY)  # synthesized again, then written
    again = speech.speech_set(TINY)  # read back
    assert first.content_hash() == cached.content_hash() == again.content_hash()
    assert np.array_equal(first.pcm, again.pcm)
    assert len(list(cache.glob("speech-*.npz"))) == 1
    assert (first.lengths > 1000).all() and np.abs(first.pcm).max() > 3000  # speech, not silence
    for i, length in enumerate(first.lengths):  # padded with zeros after the speech
        assert not first.pcm[i, length:].any()


def test_speech_clips_are_labelled_and_held_out_speakers_never_train(cache):
    s = speech.speech_set(TINY)
    assert len(s.pcm) == len(TINY.speakers()) * 10 * TINY.takes
    train_speakers, test_speakers = set(s.speakers[~s.held_out]), set(s.speakers[s.held_out])
    assert test_speakers and train_speakers and not train_speakers & test_speakers
    for speaker in set(s.speakers):  # every speaker says every digit
        assert sorted(s.digits[s.speakers == speaker]) == sorted(list(range(10)) * TINY.takes)
    data = load_dataset("speech:tiny")
    assert data.train.shape == (int((~s.held_out).sum()), 1, speech.CLIP_SAMPLES)
    assert data.num_classes == 10 and data.test_labels.tolist() == s.digits[s.held_out].tolist()
    assert 0 <= data.train.min() and data.train.max() <= 1
    # the models' range maps back to the cached 16-bit samples exactly
    assert np.array_equal(files.to_pcm16(files.from_unit(data.test[:, 0])), s.pcm[s.held_out])


def test_the_full_spec_holds_2000_clips_and_held_out_speakers():
    clips = speech.SPECS["speech"].clips()
    assert len(clips) >= 2000
    held = {c["speaker"] for c in clips if c["held_out"]}
    assert held and held.isdisjoint(c["speaker"] for c in clips if not c["held_out"])
    assert len({(c["speed"], c["pitch"]) for c in clips}) > 500  # speed and pitch vary


def test_a_damaged_cache_is_synthesized_again(cache):
    good = speech.speech_set(TINY).content_hash()
    path = next(cache.glob("speech-*.npz"))
    path.write_bytes(path.read_bytes()[:1000])
    assert speech.speech_set(TINY).content_hash() == good
    assert path.stat().st_size > 1000


def _sine(freq, rate, seconds, channels=1):
    t = np.arange(int(rate * seconds)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def test_sound_files_at_any_rate_are_resampled_to_16k_mono(tmp_path):
    soundfile.write(tmp_path / "a.wav", _sine(440, 44100, 0.5, channels=2), 44100, subtype="PCM_16")
    soundfile.write(tmp_path / "b.flac", _sine(1000, 8000, 0.25), 8000)
    a, b = files.read_audio(tmp_path / "a.wav"), files.read_audio(tmp_path / "b.flac")
    assert len(a) == 8000 and len(b) == 4000
    for wave, freq in ((a, 440), (b, 1000)):  # the tone's frequency survives the resampling
        spectrum = np.abs(np.fft.rfft(wave))
        assert abs(np.argmax(spectrum) * 16000 / len(wave) - freq) <= 2
    data = load_dataset(f"wav:{tmp_path}")
    assert data.train.shape == (1 + 1, 1, speech.CLIP_SAMPLES)  # one clip per file (shorter than a clip)


def test_save_wav_round_trips_16_bit_samples(tmp_path):
    pcm = np.random.default_rng(0).integers(-32768, 32768, 500).astype(np.int16)
    x = files.to_unit(pcm.astype(np.float32) / 32768)
    files.save_wav(x[None], tmp_path / "x.wav")
    back, rate = soundfile.read(tmp_path / "x.wav", dtype="int16")
    assert rate == 16000 and np.array_equal(back, pcm)


def test_bad_sound_files_are_named(tmp_path):
    soundfile.write(tmp_path / "good.wav", _sine(440, 16000, 0.1), 16000)
    (tmp_path / "broken.wav").write_bytes(b"RIFF0000WAVEnot really")
    with pytest.raises(DataError, match="broken.wav: not a readable sound file"):
        load_dataset(f"wav:{tmp_path}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .wav/.flac files"):
        load_dataset(f"wav:{tmp_path / 'empty'}")
    with pytest.raises(DataError, match="no such file"):
        files.read_audio(tmp_path / "missing.wav")


def test_stft_magnitude_matches_a_brute_force_dft():
    rng = np.random.default_rng(1)
    wave = rng.standard_normal((2, 1000))
    n_fft, hop = 64, 24
    got = spectral.stft_magnitude(torch.tensor(wave), n_fft, hop).numpy()  # (B, F, N)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    k = np.arange(n_fft // 2 + 1)[:, None]
    basis = np.exp(-2j * np.pi * k * np.arange(n_fft)[None] / n_fft)  # (F, n_fft)
    frames = (1000 - n_fft) // hop + 1
    for b in range(2):
        for i in range(frames):
            expected = np.abs(basis @ (wave[b, i * hop:i * hop + n_fft] * window))
            np.testing.assert_allclose(got[b, :, i], np.maximum(expected, spectral.EPS), rtol=1e-9, atol=1e-9)
    assert got.shape == (2, n_fft // 2 + 1, frames)


def test_stft_loss_is_zero_only_for_equal_clips_and_has_gradients():
    x = torch.rand(2, 1, 4096)
    assert float(spectral.stft_loss(x, x)) == 0.0
    x_hat = (x + 0.01 * torch.randn_like(x)).requires_grad_()
    loss = spectral.stft_loss(x_hat, x)
    loss.backward()
    assert float(loss.detach()) > 0 and x_hat.grad.abs().sum() > 0
    # by hand for one resolution: spectral convergence + mean log distance
    s = spectral.stft_magnitude(x.flatten(1) * 2 - 1, 256, 64)
    s_hat = spectral.stft_magnitude(x_hat.detach().flatten(1) * 2 - 1, 256, 64)
    by_hand = float((s - s_hat).norm() / s.norm() + (s.log() - s_hat.log()).abs().mean())
    assert float(spectral.stft_loss(x_hat.detach(), x, resolutions=((256, 64),))) == pytest.approx(by_hand, rel=1e-5)


def test_snr_and_log_mel_distance_by_hand():
    x = _sine(300, 16000, 0.5)
    assert spectral.snr(x, 0.9 * x) == pytest.approx(20.0)  # noise 0.1 x: 10 log10(1 / 0.01)
    assert spectral.log_mel_distance(x, x) == 0.0
    # white noise fills every band well above the floor: scaling by 2 raises each by 10 log10(4) dB
    noise = 0.1 * np.random.default_rng(2).standard_normal(8000)
    assert spectral.log_mel_distance(noise, 2 * noise) == pytest.approx(10 * np.log10(4), rel=1e-6)
    bank = spectral.mel_filterbank(1024, 80)
    assert bank.shape == (80, 513) and bank.max() <= 1 and (bank.max(axis=1) > 0.5).all()


def test_spectrogram_picture(tmp_path):
    from PIL import Image

    spectral.save_spectrogram([_sine(300, 16000, 0.5), _sine(2000, 16000, 0.25)], tmp_path / "s.png")
    with Image.open(tmp_path / "s.png") as img:
        assert img.mode == "L" and img.size[1] == (80 * 2 + 2) * 2


def test_training_crops_are_windows_of_each_clip():
    x = torch.arange(3 * 2 * 100, dtype=torch.float32).view(3, 2, 100)
    crops = spectral.training_crop(x, 30)
    assert crops.shape == (3, 2, 30)
    for b in range(3):
        start = int(crops[b, 0, 0]) - 200 * b
        assert torch.equal(crops[b], x[b, :, start:start + 30])
    assert spectral.training_crop(x, 100) is x


# -- the 1-D pipeline: a tiny run on speech:tiny ----------------------------------------------------------
TINY_AUDIO = dict(hidden=8, res_hidden=4, res_blocks=1, downsample=64, dims=1, encoder_kernel=3)


@pytest.fixture(scope="module")
def audio_run(cache, tmp_path_factory):
    """A 20-step 1-D VQ-VAE (K = 16) on speech:tiny with a 10-step digit-conditional prior."""
    from rich.console import Console

    from vqvae.config import ModelConfig, QuantizerConfig, TrainConfig
    from vqvae.prior_training import train_prior
    from vqvae.train import train_autoencoder

    path = tmp_path_factory.mktemp("audio_run")
    quiet = Console(quiet=True)
    model_cfg = ModelConfig(**{**TINY_AUDIO, "dims": 2}, quantizer=QuantizerConfig(codebook_size=16, code_dim=4))
    figures = train_autoencoder(model_cfg, TrainConfig(data="speech:tiny", steps=20, batch_size=4, log_every=5),
                                path, show_progress=False, console=quiet)
    train_prior(path, dict(n_layer=1, n_embd=16, n_head=2), TrainConfig(data="codes", steps=10, batch_size=8,
                                                                        warmup_steps=2),
                shifts=0, show_progress=False, console=quiet)
    return path, figures


def test_sound_trains_the_1d_model_with_the_stft_loss(audio_run):
    import json

    from vqvae.run import Run

    path, figures = audio_run
    model = Run(path).model()
    assert model.cfg.dims == 1  # taken from the data, whatever the config said
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["stft"] > 0 for r in records) and figures["images"] == 10
    x = load_dataset("speech:tiny").test[:2]
    codes = model.encode(x).codes
    assert codes.shape == (2, speech.CLIP_SAMPLES // 64)  # 1/64 of the sample rate: 250 codes/s
    assert model.decode(codes).shape == x.shape


def test_vqz_files_of_sound_round_trip_the_codes(audio_run):
    from vqvae.codec import api, container
    from vqvae.run import Run

    run = Run(audio_run[0])
    clips = [files.to_unit(np.sin(np.arange(n) / 7.0) * 0.3)[None] for n in (1000, 4097)]
    data, stats = run.compress(clips)
    header = container.read_header(data)
    assert header.shapes == ((1, 1000), (1, 4097))  # (C, T): a 1-D sequence in the container
    model = run.model()
    expected = [model.encode(c[None]).codes[0] for c in clips]
    decoded = api.decompress_codes(model, run.integer_prior(), data)
    assert all(torch.equal(a, b) for a, b in zip(expected, decoded))
    out = run.decompress(data)
    assert [tuple(x.shape) for x in out] == [(1, 1000), (1, 4097)]
    assert torch.equal(out[0], model.decode(expected[0][None], (1000,))[0])


def test_cli_sound_commands(audio_run, tmp_path):
    from vqvae.cli import main

    path = str(audio_run[0])
    soundfile.write(tmp_path / "a.wav", _sine(300, 22050, 0.3, channels=2), 22050)
    assert main(["sample", path, "-n", "10", "-o", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").is_file() and len(list(tmp_path.glob("s-*.wav"))) == 10
    assert main(["reconstruct", path, str(tmp_path / "a.wav"), "-o", str(tmp_path / "r.wav")]) == 0
    assert soundfile.info(str(tmp_path / "r.wav")).frames == int(0.3 * 16000)
    assert main(["encode", path, str(tmp_path / "a.wav"), "-o", str(tmp_path / "c.npz")]) == 0
    assert main(["decode", path, str(tmp_path / "c.npz"), "-o", str(tmp_path / "d")]) == 0
    assert soundfile.info(str(tmp_path / "d" / "a.wav")).frames == int(0.3 * 16000)
    assert main(["compress", path, str(tmp_path / "a.wav"), "-o", str(tmp_path / "a.vqz")]) == 0
    assert main(["decompress", path, str(tmp_path / "a.vqz"), "-o", str(tmp_path / "back.wav")]) == 0
    back, rate = soundfile.read(tmp_path / "back.wav")
    assert rate == 16000 and len(back) == int(0.3 * 16000)
    (tmp_path / "bad.wav").write_bytes(b"not a sound")
    assert main(["compress", path, str(tmp_path / "bad.wav"), "-o", str(tmp_path / "b.vqz")]) == 2
    assert not (tmp_path / "b.vqz").exists()


def test_audio_compression_table_names_every_codec(audio_run):
    from vqvae.audio.pipeline import audio_compression_table
    from vqvae.run import Run

    table = audio_compression_table(Run(audio_run[0]), limit=3)
    assert table["clips"] == 3
    assert {"vqvae (.vqz)", "FLAC", "mu-law 8 kHz"} <= set(table)
