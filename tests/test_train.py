import json

import pytest
import torch

from vqvae.config import ModelConfig, QuantizerConfig, TrainConfig
from vqvae.errors import RunError
from vqvae.train import Stopped, Trainer, lr_factor, train_autoencoder

TINY = ModelConfig(hidden=8, res_hidden=4, res_blocks=1, downsample=2,
                   quantizer=QuantizerConfig(codebook_size=16, code_dim=4, dead_code_steps=5))


def make_trainer(tmp_path, steps=30, stop_at=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    target = torch.randn(4)
    holder = {}

    def next_batch(gen):
        return torch.randn(8, 4, generator=gen)

    def loss_fn(m, x):
        # uses the global RNG too (as dropout, k-means and code restarts do)
        noise = 0.01 * torch.randn(8, 1)
        loss = (m(x) + noise - x @ target[:, None]).pow(2).mean()
        if stop_at is not None and holder["trainer"].step + 1 == stop_at:
            holder["trainer"].request_stop()
        return loss, {}

    def save(directory):
        torch.save(model.state_dict(), directory / "weights.pt")

    cfg = TrainConfig(steps=steps, log_every=4, checkpoint_every=1000, lr=1e-2, warmup_steps=3)
    trainer = Trainer(model, cfg, tmp_path, next_batch, loss_fn, save, show_progress=False)
    holder["trainer"] = trainer
    return trainer


def test_stop_and_resume_equals_uninterrupted_run(tmp_path):
    straight = make_trainer(tmp_path / "a")
    straight.fit()
    stopped = make_trainer(tmp_path / "b", stop_at=13)
    with pytest.raises(Stopped):
        stopped.fit()
    assert stopped.step == 13
    resumed = make_trainer(tmp_path / "b")
    resumed.model.load_state_dict(torch.load(tmp_path / "b" / "weights.pt", weights_only=True))
    resumed.resume()
    assert resumed.step == 13
    resumed.fit()
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 30


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(RunError, match="nothing to resume"):
        make_trainer(tmp_path).resume()


def test_lr_schedule_warms_up_then_decays():
    assert lr_factor(0.0, 0.1, 0.05) < 0.01
    assert lr_factor(0.1, 0.1, 0.05) == pytest.approx(1.0)
    assert lr_factor(1.0, 0.1, 0.05) == pytest.approx(0.05)
    values = [lr_factor(p / 100, 0.1, 0.05) for p in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_train_autoencoder_writes_a_run_and_learns(tmp_path):
    cfg = TrainConfig(data="digits", steps=120, batch_size=32, log_every=20, checkpoint_every=50, lr=3e-3)
    figures = train_autoencoder(TINY, cfg, tmp_path, show_progress=False)
    for name in ("config.json", "model.safetensors", "train_state.pt", "metrics.jsonl"):
        assert (tmp_path / name).is_file()
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 120
    assert log[-1]["mse"] < 0.5 * log[0]["mse"]
    assert set(figures) >= {"psnr", "ssim", "mse", "perplexity", "codes_used"}
    assert 0 < figures["codes_used"] <= 1
    with pytest.raises(RunError, match="already holds a run"):
        train_autoencoder(TINY, cfg, tmp_path, show_progress=False)
