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
    from vqvae.heldout import autoencoder_figures
    from vqvae.run import Run

    cfg = TrainConfig(data="digits", steps=120, batch_size=32, log_every=20, checkpoint_every=50, lr=3e-3,
                      eval_every=50)
    figures = train_autoencoder(TINY, cfg, tmp_path, show_progress=False)
    for name in ("config.json", "model.safetensors", "train_state.pt", "metrics.jsonl", "model.best.safetensors"):
        assert (tmp_path / name).is_file()
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows, heldout_rows = [r for r in log if not r.get("heldout")], [r for r in log if r.get("heldout")]
    assert train_rows[-1]["step"] == 120
    assert train_rows[-1]["mse"] < 0.5 * train_rows[0]["mse"]
    assert set(figures) >= {"psnr", "ssim", "mse", "perplexity", "codes_used", "best_step"}
    assert 0 < figures["codes_used"] <= 1
    # held-out rows at 50, 100 and the end; the best weights kept are those of the lowest held-out MSE
    assert [r["step"] for r in heldout_rows] == [50, 100, 120]
    assert set(heldout_rows[0]) >= {"mse", "psnr", "perplexity", "codes_used", "train_mse", "best"}
    best = min(heldout_rows, key=lambda r: r["mse"])
    assert figures["best_step"] == best["step"] and figures["best_heldout_mse"] == best["mse"]
    test = Run(tmp_path).dataset().test[:500]
    assert autoencoder_figures(Run(tmp_path).model(best=True), test)["mse"] == pytest.approx(best["mse"], rel=1e-5)
    assert autoencoder_figures(Run(tmp_path).model(), test)["mse"] == pytest.approx(heldout_rows[-1]["mse"], rel=1e-5)
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


def test_a_run_without_a_best_checkpoint_says_how_to_get_one(two_runs):
    from vqvae.run import Run

    with pytest.raises(RunError, match=r"model.best.safetensors: missing; .*--eval-every"):
        Run(two_runs[0]).model(best=True)


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


# -- held-out evaluation during training ------------------------------------------------------------------


def _prior_fit(tmp_path, train_codes, test_codes, steps, eval_every=20):
    """A small transformer prior fitted to `train_codes` by the Trainer with held-out evaluations ->
    (trainer, held-out rows of its log, printed output, weights at each best evaluation)."""
    import io

    from rich.console import Console

    from vqvae.config import PriorConfig
    from vqvae.heldout import prior_heldout
    from vqvae.priors import build_prior
    from vqvae.prior_training import PriorObjective

    torch.manual_seed(0)
    prior = build_prior(PriorConfig(codebook_size=16, grid=(4, 4), n_layer=2, n_embd=64, n_head=2))
    best = []
    heldout = prior_heldout(prior, (train_codes, None), (test_codes, None),
                            lambda: best.append({k: v.clone() for k, v in prior.state_dict().items()}))

    def next_batch(gen):
        return train_codes[torch.randint(len(train_codes), (16,), generator=gen)], None

    def loss_fn(objective, batch):
        return objective(*batch), {}

    printed = io.StringIO()
    cfg = TrainConfig(steps=steps, batch_size=16, lr=3e-3, warmup_steps=10, log_every=20, eval_every=eval_every,
                      checkpoint_every=1000)
    trainer = Trainer(prior, cfg, tmp_path, next_batch, loss_fn, lambda d: None, show_progress=False,
                      console=Console(file=printed, width=300), objective=PriorObjective(prior), heldout=heldout)
    trainer.fit()
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return trainer, [r for r in log if r.get("heldout")], printed.getvalue(), best


def test_the_overfit_warning_fires_on_a_prior_that_memorises_and_not_on_a_healthy_one(tmp_path):
    """Eight random grids learnt by heart: training bits fall towards 0 while held-out grids (uniform
    codes: 4 bits per latent at best) get worse, and the warning fires once, at the second evaluation in
    a row over the margin. Codes drawn i.i.d. from one skewed distribution, 4,000 of them: held-out and
    training bits stay together (both near its entropy), and nothing fires."""
    from vqvae.heldout import MARGIN

    gen = torch.Generator().manual_seed(1)
    memorised, fresh = torch.randint(16, (8, 4, 4), generator=gen), torch.randint(16, (200, 4, 4), generator=gen)
    trainer, rows, printed, best = _prior_fit(tmp_path / "overfit", memorised, fresh, steps=160)
    over = [r["bits_per_latent"] > (1 + MARGIN["bits_per_latent"]) * r["train_bits_per_latent"] for r in rows]
    first = next(i for i in range(1, len(over)) if over[i] and over[i - 1])  # the rule, from the logged figures
    assert [i for i, r in enumerate(rows) if "overfit_warning" in r] == [first]
    assert rows[-1]["train_bits_per_latent"] < 1.0 < 4.0 < rows[-1]["bits_per_latent"]
    assert printed.count("warning:") == 1 and "held-out and training figures part" in printed
    summary = trainer.heldout.summary()
    assert summary["overfit_warning"] == rows[first]["overfit_warning"]
    # the best checkpoint: the weights of the lowest held-out evaluation, written at each new best
    lowest = min(rows, key=lambda r: r["bits_per_latent"])
    assert summary["best_step"] == lowest["step"] < rows[-1]["step"] and len(best) == sum(r["best"] for r in rows)
    assert summary["best_heldout_bits_per_latent"] == lowest["bits_per_latent"]

    probs = torch.tensor([0.4, 0.2, 0.1, 0.1] + [0.2 / 12] * 12)
    draws = torch.multinomial(probs, 4500 * 16, replacement=True, generator=gen).view(4500, 4, 4)
    trainer, rows, printed, _ = _prior_fit(tmp_path / "healthy", draws[:4000], draws[4000:], steps=160)
    entropy = float(-(probs * probs.log2()).sum())
    assert all(abs(r["bits_per_latent"] - r["train_bits_per_latent"]) < 0.1 for r in rows[2:])
    assert abs(rows[-1]["bits_per_latent"] - entropy) < 0.2
    assert "overfit_warning" not in trainer.heldout.summary() and "warning" not in printed


def test_evaluations_leave_the_training_unchanged(tmp_path):
    """Evaluation runs in eval mode and gives the RNG state back: a run with evaluations every 7 steps
    ends with the weights of a run without them, bit for bit."""
    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(16, (64, 4, 4), generator=gen)
    with_eval, rows, _, _ = _prior_fit(tmp_path / "a", codes[:48], codes[48:], steps=30, eval_every=7)
    without, none, _, _ = _prior_fit(tmp_path / "b", codes[:48], codes[48:], steps=30, eval_every=0)
    assert [r["step"] for r in rows] == [7, 14, 21, 28, 30] and none == []
    for p, q in zip(with_eval.model.parameters(), without.model.parameters()):
        assert torch.equal(p, q)


# -- the prior under kill -9 ------------------------------------------------------------------------------

PRIOR_WORKER = """
import json, sys
from rich.console import Console
from vqvae.config import TrainConfig
from vqvae.prior_training import train_prior
run, resume = sys.argv[1], sys.argv[2] == "resume"
cfg = TrainConfig(data="codes", steps=40, batch_size=16, warmup_steps=5, log_every=4, checkpoint_every=8,
                  eval_every=8)
train_prior(run, dict(n_layer=1, n_embd=16, n_head=2), cfg, shifts=0, resume=resume, show_progress=False,
            console=Console(quiet=True))
"""


def test_kill_9_while_training_a_prior_then_resume_equals_an_uninterrupted_run(tiny_run, tmp_path):
    """The autoencoder's kill -9 test for `train_prior`: killed between the files of a checkpoint (the test
    hook) and at random moments of resumed runs (training, checkpoints, held-out evaluations, the integer
    prior), then resumed, the prior ends with the weights, best checkpoint, integer model and log of a run
    never interrupted."""
    import os
    import random
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    from vqvae.train import KILL_IN_CHECKPOINT_ENV, read_state

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(KILL_IN_CHECKPOINT_ENV, None)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for path in (straight, killed):
        shutil.copytree(tiny_run, path, ignore=shutil.ignore_patterns("prior"))

    def cmd(run, resume=False):
        return [sys.executable, "-c", PRIOR_WORKER, str(run), "resume" if resume else "new"]

    done = subprocess.run(cmd(straight), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    died = subprocess.run(cmd(killed), env={**env, KILL_IN_CHECKPOINT_ENV: "16"}, capture_output=True, timeout=600)
    assert died.returncode == -signal.SIGKILL
    log = killed / "prior" / "metrics.jsonl"
    assert read_state(killed / "prior" / "train_state.pt")["step"] == 8 and max(_logged_steps(log)) == 16

    rng = random.Random(0)
    for _ in range(2):
        proc = subprocess.Popen(cmd(killed, resume=True), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        target = rng.randrange(read_state(killed / "prior" / "train_state.pt")["step"] + 1, 41)
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline and max(_logged_steps(log), default=0) < target:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)

    done = subprocess.run(cmd(killed, resume=True), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    for name in ("model.safetensors", "model.best.safetensors", "integer/model.safetensors"):
        expected, got = load_file(str(straight / "prior" / name)), load_file(str(killed / "prior" / name))
        assert expected.keys() == got.keys(), name
        for key in expected:
            assert torch.equal(expected[key], got[key]), (name, key)

    def rows(run):  # the log without the (timing-dependent) seconds
        return [{k: v for k, v in json.loads(line).items() if k != "time"}
                for line in (run / "prior" / "metrics.jsonl").read_text().splitlines()]

    assert rows(killed) == rows(straight)
    assert [r["step"] for r in rows(straight) if r.get("heldout")] == [8, 16, 24, 32, 40]


def test_the_command_passes_eval_every_and_prints_the_warning_below_the_figures(monkeypatch, capsys, tmp_path):
    """`vqvae prior --eval-every N` reaches the training settings; a warning in the figures is printed
    once, below the table (in --json it stays a field)."""
    import vqvae
    from vqvae.cli import main

    seen = []

    def fake_prior(run, overrides, train_cfg, **kwargs):
        seen.append(train_cfg.eval_every)
        return {"nll_bits_per_latent": 7.9, "overfit_warning": "held-out and training figures part: 7.9 against 1.5"}

    monkeypatch.setattr(vqvae, "train_prior", fake_prior)
    assert main(["prior", str(tmp_path), "--eval-every", "25"]) == 0
    out, err = capsys.readouterr()
    assert seen == [25] and "nll_bits_per_latent" in out and "figures part" not in out
    assert err.count("warning:") == 1 and err.rstrip().endswith("7.9 against 1.5")
    assert main(["prior", str(tmp_path), "--json"]) == 0
    out, _ = capsys.readouterr()
    assert seen == [25, 0] and json.loads(out)["overfit_warning"].endswith("7.9 against 1.5")
