import csv
import json

import pytest
import torch
from rich.console import Console

from vqvae.cli import main
from vqvae.config import TrainConfig
from vqvae.errors import ConfigError
from vqvae.logs import CSVSink, metric_sinks
from vqvae.train import Trainer


def _toy_trainer(out_dir, steps, sinks, **cfg):
    """A one-weight model fitted to a constant: a Trainer that logs in milliseconds."""
    model = torch.nn.Linear(1, 1)

    def loss_fn(m, x):
        loss = (m(x) - 1).pow(2).mean()
        return loss, {"mse": loss.detach(), "scale": m.weight.detach().sum()}

    cfg = TrainConfig(data="toy", steps=steps, batch_size=4, log_every=2, checkpoint_every=4, warmup_steps=0, **cfg)
    return Trainer(model, cfg, out_dir, lambda g: torch.randn(4, 1, generator=g), loss_fn,
                   lambda d: None, show_progress=False, console=Console(quiet=True), sinks=sinks)


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_csv_rows_are_the_jsonl_records_and_follow_a_resume(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    _toy_trainer(tmp_path, 6, metric_sinks(["csv"], metrics)).fit()
    records = _jsonl(metrics)
    assert [r["step"] for r in records] == [2, 4, 6]
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [{k: float(v) for k, v in row.items()} for row in rows] == \
        [{k: float(v) for k, v in r.items()} for r in records]  # repr round-trips floats exactly

    # a run killed after logging step 7 past its checkpoint (step 6): resuming cuts metrics.jsonl back to
    # the checkpoint, and the CSV follows (no step 7, no duplicate steps)
    with open(metrics, "a") as f:
        f.write(json.dumps({**records[-1], "step": 7}) + "\n")
    CSVSink(metrics).rebuild()
    trainer = _toy_trainer(tmp_path, 10, metric_sinks(["csv"], metrics))
    trainer.resume()
    trainer.fit()
    with open(tmp_path / "metrics.csv", newline="") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f)]
    assert steps == [r["step"] for r in _jsonl(metrics)] == [2, 4, 6, 8, 10]


def test_csv_rebuilds_when_a_new_key_appears(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    sink = CSVSink(metrics)
    for record in ({"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25, "psnr": 20.0}):
        with open(metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        sink(record)
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"step": "1", "loss": "0.5", "psnr": ""}, {"step": "2", "loss": "0.25", "psnr": "20.0"}]


def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="the `log` extra (tensorboard) is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = tmp_path / "metrics.jsonl"
    _toy_trainer(tmp_path, 6, metric_sinks(["tensorboard"], metrics, "train")).fit()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    records = _jsonl(metrics)
    for key in ("loss", "mse", "scale", "lr"):
        scalars = events.Scalars(f"train/{key}")
        assert [s.step for s in scalars] == [r["step"] for r in records]
        # event files store float32
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in records], rel=1e-6)


def test_unknown_log_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--log must be one of csv, tensorboard, got 'wandb'"):
        metric_sinks(["csv,wandb"], tmp_path / "metrics.jsonl")
    assert main(["train", "--log", "wandb", "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()


def test_tensorboard_missing_is_one_line(tmp_path, monkeypatch):
    import sys

    from vqvae.errors import VQVAEError

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(VQVAEError, match=r"--log tensorboard needs the tensorboard package: pip install 'vqvae\[log\]'"):
        metric_sinks(["tensorboard"], tmp_path / "metrics.jsonl")
