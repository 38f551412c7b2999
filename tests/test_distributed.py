"""Training on several processes (torch.distributed, gloo on CPU): the quantizer's collectives and the
trainer's batch split, checked against one process on the whole batch.

Each test starts its own processes (one per rank, with torchrun's environment variables and a free
port) and gives them a timeout, so a hang (a rank waiting on a collective another skipped) fails the
test instead of stalling the suite.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vqvae.config import ModelConfig, QuantizerConfig, TrainConfig
from vqvae.train import train_autoencoder

SRC = str(Path(__file__).resolve().parents[1] / "src")
TIMEOUT = 240  # seconds for a whole multi-process run (a hang fails here)

# Run by every rank: train, then write this rank's weights (unwrapped) and how many codes were (re)set.
WORKER = r"""
import json, sys, torch
from rich.console import Console
from vqvae import quantizers
from vqvae.config import ModelConfig, QuantizerConfig, TrainConfig, from_dict
from vqvae.devices import world
from vqvae.train import Trainer, train_autoencoder

args = json.loads(sys.argv[1])
resets = []
set_codes = quantizers.EMAVectorQuantizer._set_codes
def counting(self, index, vectors):
    resets.append(int(index.numel()))
    return set_codes(self, index, vectors)
quantizers.EMAVectorQuantizer._set_codes = counting
fit = Trainer.fit
def fit_and_dump(self):
    result = fit(self)
    rank = world()[0]
    torch.save(self.model.state_dict(), f"{args['dump']}/rank{rank}.pt")
    with open(f"{args['dump']}/rank{rank}.json", "w") as f:
        json.dump({"resets": resets}, f)
    return result
Trainer.fit = fit_and_dump
model = from_dict(ModelConfig, args["model"])
train = from_dict(TrainConfig, args["train"])
train_autoencoder(model, train, args["out"], show_progress=False, console=Console(quiet=True))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(processes: int, model: ModelConfig, train: TrainConfig, out: Path, dump: Path) -> None:
    """Train in `processes` processes (ranks 0..N-1 of one gloo group); fail on error or timeout."""
    from vqvae.config import to_dict

    dump.mkdir(parents=True, exist_ok=True)
    args = json.dumps({"model": to_dict(model), "train": to_dict(train), "out": str(out), "dump": str(dump)})
    spawn_ranks(processes, WORKER, args)


def spawn_ranks(processes: int, worker: str, args: str) -> None:
    """Run the Python code `worker` (argv[1]: `args`) as ranks 0..N-1 of one gloo group; fail on error or
    timeout."""
    port = free_port()
    procs = []
    for rank in range(processes):
        env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes)}
        procs.append(subprocess.Popen([sys.executable, "-c", worker, args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{processes} processes did not finish in {TIMEOUT} s (a hang in a collective?)")
    for rank, (p, output) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{output[-3000:]}"


# K = 16 codes, restarted after 2 unused steps: with k-means init on the first batch, some codes go
# unused at once, so restarts happen within the first few steps.
MODEL = ModelConfig(hidden=8, res_hidden=4, res_blocks=1, downsample=2,
                    quantizer=QuantizerConfig(kind="ema", codebook_size=16, code_dim=4, kmeans_init=True,
                                              dead_code_steps=2))


def test_two_processes_at_half_batch_match_one_process(tmp_path):
    """1 process at global batch 16 and 2 processes at 8 each: the same weights and codebook after 6
    steps, with k-means init, EMA and restarts inside them.

    Tolerance: the two differ only in how float32 sums are grouped (gradients and EMA sums reduced over
    two halves, then all-reduced), each rounding at ~1e-7 relative; 6 Adam steps at lr 2e-3 move weights
    by ~1e-2, so 1e-4 absolute is far above rounding and far below any real difference (a wrong share of
    the batch, a restart from another vector, a missed EMA term change weights at the 1e-3 level or more).
    """
    cfg = TrainConfig(data="digits", steps=6, batch_size=16, log_every=2, checkpoint_every=100, lr=2e-3,
                      warmup_steps=0, device="cpu")
    run_ranks(1, MODEL, cfg, tmp_path / "one", tmp_path / "one_dump")
    run_ranks(2, MODEL, cfg, tmp_path / "two", tmp_path / "two_dump")
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert set(one) == set(two) and not any(k.startswith("module.") for k in two)
    resets = json.loads((tmp_path / "one_dump" / "rank0.json").read_text())["resets"]
    assert resets[0] == 16 and len(resets) >= 2, f"no restart in these steps: {resets}"  # k-means, then restarts
    for rank in range(2):  # the same codes (re)set on every rank
        assert json.loads((tmp_path / "two_dump" / f"rank{rank}.json").read_text())["resets"] == resets
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-4, rtol=0, msg=lambda m: f"{key}: {m}")
    codebook = [k for k in one if k.endswith("codebook")]
    assert codebook and one[codebook[0]].dtype == torch.float32


def test_three_processes_keep_identical_codebooks_through_restarts(tmp_path):
    """3 ranks, codes restarted after 1 unused step (restarts at most steps, decided from all ranks'
    counts): every rank ends with the same codebook and EMA statistics, bit for bit (they are computed
    from the same all-reduced values), and no rank hangs."""
    model = ModelConfig(hidden=8, res_hidden=4, res_blocks=1, downsample=2,
                        quantizer=QuantizerConfig(kind="ema", codebook_size=32, code_dim=4, kmeans_init=True,
                                                  dead_code_steps=1))
    cfg = TrainConfig(data="digits", steps=5, batch_size=6, log_every=1, checkpoint_every=2, device="cpu")
    run_ranks(3, model, cfg, tmp_path / "run", tmp_path / "dump")
    states = [torch.load(tmp_path / "dump" / f"rank{r}.pt", weights_only=True) for r in range(3)]
    resets = [json.loads((tmp_path / "dump" / f"rank{r}.json").read_text())["resets"] for r in range(3)]
    assert len(resets[0]) >= 3 and resets[0] == resets[1] == resets[2]
    for key in states[0]:
        if "quantizer" in key:
            assert torch.equal(states[0][key], states[1][key]) and torch.equal(states[0][key], states[2][key]), key
    saved = load_file(tmp_path / "run" / "model.safetensors")  # rank 0's, unwrapped
    for key, value in saved.items():
        assert torch.equal(value, states[0][key]), key
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]  # one log, written once (rank 0)


def test_bf16_training_lowers_the_loss_and_keeps_the_codebook_fp32(tmp_path):
    cfg = TrainConfig(data="digits", steps=60, batch_size=32, log_every=10, checkpoint_every=100, lr=3e-3,
                      device="cpu", precision="bf16")
    train_autoencoder(MODEL, cfg, tmp_path, show_progress=False)
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["mse"] < 0.7 * log[0]["mse"]
    weights = load_file(tmp_path / "model.safetensors")
    for key in ("quantizer.codebook", "quantizer.cluster_size", "quantizer.embed_sum"):
        assert weights[key].dtype == torch.float32
    assert json.loads((tmp_path / "config.json").read_text())["train"]["precision"] == "bf16"


def test_fp16_on_cpu_is_refused_in_one_line(tmp_path):
    from vqvae.errors import ConfigError

    cfg = TrainConfig(data="digits", steps=2, batch_size=8, device="cpu", precision="fp16")
    with pytest.raises(ConfigError, match="^precision fp16 needs a CUDA device"):
        train_autoencoder(MODEL, cfg, tmp_path, show_progress=False)


# Run by every rank: train a prior on the run's codes; rank 0 alone gets figures (it writes them out).
PRIOR_WORKER = r"""
import json, sys
from rich.console import Console
from vqvae.config import TrainConfig, from_dict
from vqvae.prior_training import train_prior
args = json.loads(sys.argv[1])
figures = train_prior(args["run"], args["prior"], from_dict(TrainConfig, args["train"]), shifts=0,
                      show_progress=False, console=Console(quiet=True))
from vqvae.devices import world
with open(f"{args['run']}/figures{world()[0]}.json", "w") as f:
    json.dump(figures, f)
"""


def test_a_prior_on_two_processes_at_half_batch_matches_one_process(tiny_run, tmp_path):
    """`train_prior` under torchrun: 1 process at global batch 16 and 2 at 8 each reach the same prior
    after 6 steps (to 1e-4, as for the autoencoder: only the grouping of float32 sums differs), with the
    code cache written by rank 0 while rank 1 waits, one log, held-out rows, a best checkpoint and the
    integer prior written once, and no hang."""
    import shutil

    import numpy as np

    from vqvae.config import to_dict

    cfg = TrainConfig(data="codes", steps=6, batch_size=16, log_every=2, checkpoint_every=4, eval_every=3, lr=2e-3,
                      warmup_steps=0, device="cpu")
    runs = {}
    for processes in (1, 2):
        run = runs[processes] = tmp_path / f"run{processes}"
        shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("prior", "codes"))  # codes made afresh
        args = json.dumps({"run": str(run), "prior": {"n_layer": 1, "n_embd": 16, "n_head": 2},
                           "train": to_dict(cfg)})
        spawn_ranks(processes, PRIOR_WORKER, args)
    one, two = (load_file(runs[n] / "prior" / "model.safetensors") for n in (1, 2))
    assert set(one) == set(two) and not any(k.startswith(("module.", "prior.")) for k in two)
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-4, rtol=0, msg=lambda m: f"{key}: {m}")
    assert np.array_equal(np.load(runs[2] / "codes" / "train.npy"), np.load(runs[1] / "codes" / "train.npy"))
    log = [json.loads(line) for line in (runs[2] / "prior" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], bool(r.get("heldout"))) for r in log] == [
        (2, False), (3, True), (4, False), (6, False), (6, True)]
    assert (runs[2] / "prior" / "model.best.safetensors").is_file() and (runs[2] / "prior" / "integer").is_dir()
    figures = [json.loads((runs[2] / f"figures{r}.json").read_text()) for r in range(2)]
    assert figures[0]["best_step"] in (3, 6) and figures[1] == {}
