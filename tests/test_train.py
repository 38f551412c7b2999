import json

import pytest
import torch

from vqvae import devices
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


# -- checkpoints under kill -9, resume checks -------------------------------------------------------------

TINY_ARGS = ["--data", "digits", "--downsample", "2", "--hidden", "8", "--res-hidden", "4", "--res-blocks", "1",
             "--codebook-size", "16", "--code-dim", "4", "--batch-size", "16", "--dead-code-steps", "5",
             "--steps", "60", "--checkpoint-every", "8", "--log-every", "4"]


def _train_cmd(out, resume=False):
    import sys

    base = [sys.executable, "-m", "vqvae.cli", "--threads", "1", "train", "--out", str(out)]
    return base + (["--resume"] if resume else TINY_ARGS)


def _logged_steps(path):
    steps = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:  # a line being written
            pass
    return steps


def test_kill_9_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    """Real processes, one thread each: killed with SIGKILL between the two files of a checkpoint (a test
    hook makes the process kill itself there) and at random moments, then resumed, a run ends with exactly
    the weights of a run never interrupted, and its log has each step once."""
    import os
    import random
    import signal
    import subprocess
    import time

    from safetensors.torch import load_file

    from vqvae.train import KILL_IN_CHECKPOINT_ENV, read_state

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(KILL_IN_CHECKPOINT_ENV, None)
    straight, out = tmp_path / "straight", tmp_path / "killed"
    done = subprocess.run(_train_cmd(straight), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr

    # between the files: the weights of step 16 are written, the checkpoint of step 16 is not
    died = subprocess.run(_train_cmd(out), env={**env, KILL_IN_CHECKPOINT_ENV: "16"}, capture_output=True,
                          timeout=600)
    assert died.returncode == -signal.SIGKILL
    assert read_state(out / "train_state.pt")["step"] == 8
    assert max(_logged_steps(out / "metrics.jsonl")) == 16  # model.safetensors holds step 16's weights

    rng = random.Random(0)
    for _ in range(2):  # at random moments: while starting, training, checkpointing or evaluating
        proc = subprocess.Popen(_train_cmd(out, resume=True), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        target = rng.randrange(read_state(out / "train_state.pt")["step"] + 1, 61)
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline and max(_logged_steps(out / "metrics.jsonl"),
                                                                     default=0) < target:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)

    done = subprocess.run(_train_cmd(out, resume=True), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    expected, got = load_file(str(straight / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    steps = _logged_steps(out / "metrics.jsonl")
    assert steps == sorted(set(steps)) == _logged_steps(straight / "metrics.jsonl")


def _tiny_run(path, hidden=8, steps=12):
    cfg = TrainConfig(data="digits", steps=steps, batch_size=16, log_every=2, checkpoint_every=4)
    model = ModelConfig(hidden=hidden, res_hidden=4, res_blocks=1, downsample=2,
                        quantizer=QuantizerConfig(codebook_size=16, code_dim=4))
    train_autoencoder(model, cfg, path, show_progress=False)
    return path


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    return _tiny_run(base / "a"), _tiny_run(base / "b"), _tiny_run(base / "wide", hidden=16)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the hand-made pickles below
def test_resume_refuses_bad_or_foreign_states_and_leaves_the_log_alone(two_runs, tmp_path):
    import os
    import pickle
    import shutil

    a, b, wide = two_runs
    marker = tmp_path / "code-ran"

    class Crafted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state = (a / "train_state.pt").read_bytes()
    buffer = __import__("io").BytesIO()
    torch.save(Crafted(), buffer)
    states = {
        "empty": (b"", "empty file"),
        "cut": (state[:len(state) // 2], "not a training state"),
        "crafted": (buffer.getvalue(), "not a training state"),
        "pickle": (pickle.dumps([1, 2]), "not a training state"),
        "no keys": (_saved({"step": 3}), "no valid 'optimizer'"),
        "list": (_saved([1, 2]), "expected a dict"),
        "identity": (_saved({**torch.load(a / "train_state.pt", weights_only=True), "identity": 5}), "'identity'"),
        "another run": ((b / "train_state.pt").read_bytes(), "belongs to another run"),
        "another model": ((wide / "train_state.pt").read_bytes(), "belongs to another run"),
    }
    for name, (content, needle) in states.items():
        run = tmp_path / name
        shutil.copytree(a, run)
        (run / "train_state.pt").write_bytes(content)
        log = (run / "metrics.jsonl").read_bytes()
        with pytest.raises(RunError) as error:
            train_autoencoder(TINY, TrainConfig(), run, resume=True, show_progress=False)
        assert needle in str(error.value) and "train_state.pt" in str(error.value), (name, error.value)
        assert "\n" not in str(error.value)
        assert (run / "metrics.jsonl").read_bytes() == log, name
    assert not marker.exists()


def _saved(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_a_state_of_another_model_shape_is_refused_even_without_run_ids(two_runs, tmp_path):
    """Runs from before run ids: the weights' and the optimizer's shapes still have to fit."""
    import shutil

    a, _, wide = two_runs
    run = tmp_path / "a"
    shutil.copytree(a, run)
    state = torch.load(wide / "train_state.pt", weights_only=True)
    for saved in (state, {k: v for k, v in state.items() if k != "model"}):
        saved = {**saved, "identity": "{}"}
        (run / "train_state.pt").write_bytes(_saved(saved))
        with pytest.raises(RunError, match="does not fit this run's model"):
            train_autoencoder(TINY, TrainConfig(), run, resume=True, show_progress=False)


def test_a_cut_last_log_line_does_not_stop_a_resume(two_runs, tmp_path):
    import shutil

    run = tmp_path / "a"
    shutil.copytree(two_runs[0], run)
    with open(run / "metrics.jsonl", "a") as log:
        log.write('{"step": 13, "lo')  # what a kill in the middle of a write leaves
    config = json.loads((run / "config.json").read_text())
    config["train"]["steps"] = 16
    (run / "config.json").write_text(json.dumps(config))
    train_autoencoder(TINY, TrainConfig(), run, resume=True, show_progress=False)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10, 12, 14, 16]


def test_progress_in_a_pipe_is_plain_lines(tmp_path):
    """Not a terminal (a pipe, a CI log): a line per tenth of the budget, not one bar at the end."""
    import io

    from rich.console import Console

    buffer = io.StringIO()
    trainer = make_trainer(tmp_path, steps=30)
    trainer.console, trainer.show_progress = Console(file=buffer, width=200), True
    trainer.fit()
    lines = [line for line in buffer.getvalue().splitlines() if line.strip()]
    steps = [int(line.split("step ")[1].split("/")[0]) for line in lines]
    assert steps == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30], buffer.getvalue()
    assert lines[-1].startswith("train step 30/30 (100%)  loss ")
    assert "left" in lines[0] and "\x1b" not in buffer.getvalue()


def test_threads_leave_the_busy_cores_alone(monkeypatch):
    import os

    monkeypatch.setattr(devices, "usable_cpus", lambda: 2)
    for load, threads in [(2.6, 1), (1.2, 1), (0.6, 1), (0.3, 2), (0.0, 2)]:
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert devices.pick_threads() == threads, load
    monkeypatch.setattr(devices, "usable_cpus", lambda: 16)
    monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    assert devices.pick_threads() == 11
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(devices, "usable_cpus", lambda: 2)
        monkeypatch.setattr(os, "getloadavg", lambda: (2.5, 2.0, 2.0))
        assert devices.set_threads() == 1 == torch.get_num_threads()  # busy 2-core machine: 1 thread
        assert devices.set_threads(2) == 2 == torch.get_num_threads()  # asked for: as asked
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        assert devices.set_threads() == 2  # the user's OMP_NUM_THREADS stands
    finally:
        torch.set_num_threads(before)


def test_a_device_that_is_not_here_is_one_line(tmp_path):
    from vqvae.errors import ConfigError
    from vqvae.devices import pick_device

    assert pick_device("cpu").type == "cpu"
    for name in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(ConfigError, match="device must be"):
            pick_device(name)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="'cuda': no CUDA GPU is usable here"):
            train_autoencoder(TINY, TrainConfig(data="digits", device="cuda"), tmp_path / "r", show_progress=False)
        assert not (tmp_path / "r").exists()  # refused before the run directory is made


def test_the_kernel_cache_is_keyed_by_source_and_environment(monkeypatch, tmp_path):
    """Environments (or versions of the source) never share, rebuild or wait on one another's build."""
    import sys

    import torch.utils.cpp_extension as cpp_extension

    from vqvae import nearest

    names = []
    monkeypatch.setattr(cpp_extension, "load", lambda name, **kw: names.append(name) or object())
    monkeypatch.setattr(nearest, "_kernel", None)
    nearest.build_kernel()
    assert names == [nearest.kernel_name()] and names[0].startswith("vqvae_quantizer_")
    monkeypatch.setattr(sys, "prefix", "/another/venv")
    other_env = nearest.kernel_name()
    source = tmp_path / "quantizer.cpp"
    source.write_text(nearest.KERNEL_SOURCE.read_text() + "\n// changed\n")
    monkeypatch.setattr(nearest, "KERNEL_SOURCE", source)
    assert len({names[0], other_env, nearest.kernel_name()}) == 3
