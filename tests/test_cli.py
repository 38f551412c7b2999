import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from vqvae.cli import main

TINY = ["--hidden", "8", "--res-hidden", "4", "--res-blocks", "1", "--codebook-size", "16", "--code-dim", "4",
        "--batch-size", "16"]


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    assert main(["train", "--data", "mnist", "--steps", "40", "--out", str(path), "--log-every", "10", *TINY]) == 0
    return path


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(28, 28), (29, 31), (12, 7)]):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_train_writes_the_run(run_dir):
    for name in ("config.json", "model.safetensors", "metrics.jsonl", "recon.png", "train_state.pt"):
        assert (run_dir / name).is_file()
    recon = Image.open(run_dir / "recon.png")
    assert recon.size[0] > 28 * 4 and recon.size[1] > 28 * 4


def test_eval_json(run_dir, capsys):
    code, out, _ = run(capsys, "eval", run_dir, "--json")
    assert code == 0
    figures = json.loads(out)
    assert {"psnr", "ssim", "mse", "perplexity", "codes_used"} <= set(figures)
    assert figures["images"] == 500 and 0 < figures["codes_used"] <= 1
    assert figures["psnr"] == pytest.approx(-10 * np.log10(figures["mse"]), abs=3)  # mean of logs vs log of mean


def test_reconstruct_keeps_input_sizes(run_dir, images, tmp_path, capsys):
    code, _, _ = run(capsys, "reconstruct", run_dir, *images, "-o", tmp_path / "out")
    assert code == 0
    for path in images:
        assert Image.open(tmp_path / "out" / path.name).size == Image.open(path).size
    code, _, _ = run(capsys, "reconstruct", run_dir, images[1], "-o", tmp_path / "one.png")
    assert code == 0 and Image.open(tmp_path / "one.png").size == (31, 29)


def test_encode_decode_round_trip(run_dir, images, tmp_path, capsys):
    code, _, _ = run(capsys, "encode", run_dir, *images, "-o", tmp_path / "codes.npz")
    assert code == 0
    with np.load(tmp_path / "codes.npz", allow_pickle=False) as f:
        assert f["codes_0"].shape == (7, 7) and f["codes_1"].shape == (8, 8)
        assert f["codes_0"].max() < 16
    code, _, _ = run(capsys, "decode", run_dir, tmp_path / "codes.npz", "-o", tmp_path / "dec")
    assert code == 0
    run(capsys, "reconstruct", run_dir, *images, "-o", tmp_path / "rec")
    for path in images:
        decoded = np.asarray(Image.open(tmp_path / "dec" / path.name))
        assert decoded.shape == np.asarray(Image.open(path)).shape
        assert np.array_equal(decoded, np.asarray(Image.open(tmp_path / "rec" / path.name)))


def test_bad_inputs_exit_2_with_one_line(run_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text.png").write_text("hello")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("L", (8, 8)).save(mixed / "a.png")
    Image.new("RGB", (8, 8)).save(mixed / "b.png")
    np.save(tmp_path / "rank2.npy", np.zeros((4, 4)))
    cases = [
        (["train", "--data", f"folder:{tmp_path / 'empty'}", "--out", tmp_path / "r1"], "empty"),
        (["train", "--data", f"folder:{tmp_path / 'missing'}", "--out", tmp_path / "r2"], "missing"),
        (["train", "--data", f"folder:{mixed}", "--out", tmp_path / "r3"], "mixed"),
        (["train", "--data", f"npy:{tmp_path / 'rank2.npy'}", "--out", tmp_path / "r4"], "rank2.npy"),
        (["train", "--data", "imagenet", "--out", tmp_path / "r5"], "imagenet"),
        (["train", "--downsample", "3", "--out", tmp_path / "r6"], "downsample"),
        (["reconstruct", run_dir, tmp_path / "text.png", "-o", tmp_path / "x.png"], "text.png"),
        (["reconstruct", run_dir, tmp_path / "nope.png", "-o", tmp_path / "x.png"], "nope.png"),
        (["eval", tmp_path / "not-a-run"], "not-a-run"),
        (["decode", run_dir, tmp_path / "text.png", "-o", tmp_path / "d"], "text.png"),
        (["train", "--out", run_dir, *TINY], "already holds a run"),
    ]
    for args, needle in cases:
        code, out, err = run(capsys, *args)
        assert code == 2, (args, out, err)
        assert needle in err and err.strip().count("\n") == 0 and "Traceback" not in err, err


def test_every_command_has_help(capsys):
    for command in ("train", "eval", "reconstruct", "encode", "decode", "demo"):
        code, out, _ = run(capsys, command, "--help")
        assert code == 0 and "Usage" in out


def test_subprocess_sigterm_then_resume(tmp_path):
    """A real process: killed mid-run it leaves a checkpoint; --resume finishes the same run."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "vqvae.cli", "train", "--data", "digits", "--downsample", "2", "--out", str(out),
           "--steps", "100000", "--checkpoint-every", "20", "--log-every", "10", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (out / "train_state.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    stopped_at = steps[-1]
    assert stopped_at >= 20
    # resume with a budget: override the step count through the saved config
    config = json.loads((out / "config.json").read_text())
    config["train"]["steps"] = stopped_at + 30
    (out / "config.json").write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "-m", "vqvae.cli", "train", "--out", str(out), "--resume"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == stopped_at + 30


PRIOR_TINY = ["--layers", "1", "--width", "16", "--heads", "2", "--batch-size", "16", "--shifts", "0"]


@pytest.fixture(scope="module")
def prior_run(run_dir):
    assert main(["prior", str(run_dir), "--steps", "30", *PRIOR_TINY]) == 0
    return run_dir


def test_prior_json_and_cached_codes(prior_run, capsys):
    code, out, _ = run(capsys, "prior", prior_run, "--steps", "5", "--force", "--json", *PRIOR_TINY)
    assert code == 0
    figures = json.loads(out)
    assert figures["uniform_bits_per_latent"] == pytest.approx(4.0)  # K = 16
    assert 0 < figures["nll_bits_per_latent"] < 6
    assert figures["nll_bits_per_image"] == pytest.approx(49 * figures["nll_bits_per_latent"])
    assert figures["bits_per_dim"] > 0 and figures["class_conditional"] is True
    train = np.load(prior_run / "codes" / "train.npy")
    assert train.dtype == np.int16 and train.shape == (4500, 7, 7)
    assert np.load(prior_run / "codes" / "test.npy").shape == (500, 7, 7)
    for name in ("config.json", "model.safetensors", "metrics.jsonl"):
        assert (prior_run / "prior" / name).is_file()
    code, _, err = run(capsys, "prior", prior_run, "--steps", "5", *PRIOR_TINY)
    assert code == 2 and "already holds a prior" in err


def test_eval_reports_bits_per_dim_with_a_prior(prior_run, capsys):
    code, out, _ = run(capsys, "eval", prior_run, "--json")
    figures = json.loads(out)
    assert code == 0 and 0 < figures["bits_per_dim"] < 8


def test_sample_grids(prior_run, tmp_path, capsys):
    code, _, _ = run(capsys, "sample", prior_run, "-n", "20", "-o", tmp_path / "all.png", "--seed", "1")
    assert code == 0
    # ten classes, one row each: 2 samples per row of 56-pixel (2x scaled) digits plus gaps
    assert Image.open(tmp_path / "all.png").size == (2 * 58 + 2, 10 * 58 + 2)
    code, _, _ = run(capsys, "sample", prior_run, "-n", "3", "--label", "4", "-o", tmp_path / "a.png", "--seed", "1")
    run(capsys, "sample", prior_run, "-n", "3", "--label", "4", "-o", tmp_path / "b.png", "--seed", "1")
    assert code == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    code, _, err = run(capsys, "sample", prior_run, "--label", "10", "-o", tmp_path / "c.png")
    assert code == 2 and "label must be in 0..9" in err


@pytest.mark.parametrize("coder", ["range", "huffman"])
def test_compress_decompress_round_trip(prior_run, images, tmp_path, capsys, coder):
    code, out, _ = run(capsys, "compress", prior_run, *images, "-o", tmp_path / "all.vqz", "--coder", coder, "--json")
    assert code == 0
    stats = json.loads(out)
    assert stats["bytes"] == (tmp_path / "all.vqz").stat().st_size and stats["num_images"] == 3
    code, _, _ = run(capsys, "decompress", prior_run, tmp_path / "all.vqz", "-o", tmp_path / "dec")
    assert code == 0
    run(capsys, "reconstruct", prior_run, *images, "-o", tmp_path / "rec")
    for i, path in enumerate(images):
        decoded = np.asarray(Image.open(tmp_path / "dec" / f"{i:05d}.png"))
        assert np.array_equal(decoded, np.asarray(Image.open(tmp_path / "rec" / path.name)))


def test_decompress_bad_files_exit_2(prior_run, images, tmp_path, capsys):
    run(capsys, "compress", prior_run, images[0], "-o", tmp_path / "one.vqz")
    data = (tmp_path / "one.vqz").read_bytes()
    bad = {"empty.vqz": b"", "text.vqz": b"hello, not a vqz", "cut.vqz": data[:-3],
           "flip.vqz": data[:10] + bytes([data[10] ^ 4]) + data[11:], "future.vqz": data[:3] + b"\x09" + data[4:]}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
        code, _, err = run(capsys, "decompress", prior_run, tmp_path / name, "-o", tmp_path / "x.png")
        assert code == 2 and err.strip().count("\n") == 0 and "Traceback" not in err, (name, err)
    assert not (tmp_path / "x.png").exists()


def test_demo_runs_the_whole_pipeline(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, err = run(capsys, "demo", "--out", out, "--steps", "20", "--prior-steps", "5")
    assert code == 0, err
    for name in ("config.json", "model.safetensors", "recon.png", "samples.png", "heldout.vqz",
                 "prior/model.safetensors", "codes/train.npy"):
        assert (out / name).is_file(), name
    assert "WEBP" in stdout and "PNG" in stdout and "psnr" in stdout
    assert Image.open(out / "samples.png").size[1] > Image.open(out / "samples.png").size[0]  # 10 rows of 6


def test_python_dash_m_and_version():
    import vqvae

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "vqvae", "--help"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0 and "compress" in done.stdout and "Usage" in done.stdout
    done = subprocess.run([sys.executable, "-m", "vqvae", "--version"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"vqvae {vqvae.__version__}"
    from importlib.metadata import version

    assert vqvae.__version__ == version("vqvae")


def test_eval_on_other_data(run_dir, capsys):
    code, out, _ = run(capsys, "eval", run_dir, "--data", "digits", "--json")
    assert code == 0 and json.loads(out)["images"] == 1797 // 10
    code, _, err = run(capsys, "eval", run_dir, "--data", "cifar10")
    assert code == 2 and "cifar10" in err
