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
    Image.new("RGB", (8, 9)).save(mixed / "b.png")  # mixed sizes without --image-size
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
    for command in ("train", "eval", "reconstruct", "encode", "decode", "demo", "compare"):
        code, out, _ = run(capsys, command, "--help")
        assert code == 0 and "Usage" in out


def test_subprocess_sigterm_then_resume(tmp_path):
    """A real process: killed mid-run it leaves a checkpoint; --resume finishes the same run."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "vqvae.cli", "train", "--data", "digits", "--downsample", "2", "--out", str(out),
           "--steps", "100000", "--checkpoint-every", "20", "--log-every", "10", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # the first checkpoint comes after the signal handler is installed; on a loaded machine (a kernel build,
    # other jobs) it can take minutes, so wait for it rather than for a fixed time
    deadline = time.time() + 600
    while not (out / "train_state.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    if not (out / "train_state.pt").exists():
        proc.kill()
        pytest.fail(f"no checkpoint after 600 s (exit code {proc.poll()}): {proc.communicate()[1][-2000:]}")
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
    code, _, _ = run(capsys, "sample", prior_run, "-n", "3", "--label", "4", "-o", tmp_path / "g.png", "--seed", "1",
                     "--guidance", "3")
    assert code == 0 and Image.open(tmp_path / "g.png").size == Image.open(tmp_path / "a.png").size
    code, _, err = run(capsys, "sample", prior_run, "--guidance", "-1", "-o", tmp_path / "d.png")
    assert code == 2 and "guidance >= 0" in err and err.strip().count("\n") == 0


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
                 "prior/model.safetensors", "codes/train.npy", "report.html"):
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


# -- nothing lost by ordinary mistakes ------------------------------------------------------------------------


def _one_line_error(code, err, needle):
    assert code == 2, err
    assert needle in err, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err


def test_demo_replaces_only_a_run_or_an_empty_directory(tmp_path, capsys, monkeypatch):
    thesis = tmp_path / "p"
    thesis.mkdir()
    (thesis / "thesis.txt").write_text("four years")
    code, _, err = run(capsys, "demo", "--out", thesis, "--steps", "20", "--prior-steps", "5")
    _one_line_error(code, err, "holds files that are not part of a vqvae run (thesis.txt)")
    assert (thesis / "thesis.txt").read_text() == "four years" and sorted(os.listdir(thesis)) == ["thesis.txt"]
    monkeypatch.chdir(thesis)
    code, _, err = run(capsys, "demo", "--out", ".", "--force", "--steps", "20", "--prior-steps", "5")
    _one_line_error(code, err, "is or contains the current directory")
    assert sorted(os.listdir(thesis)) == ["thesis.txt"]
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, "demo", "--out", tmp_path / "file")
    _one_line_error(code, err, "exists and is not a directory")


def test_outputs_never_collide_and_every_target_is_checked_first(run_dir, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    rng = np.random.default_rng(1)
    for folder in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / folder / "x.png")
    pair = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"]
    code, _, err = run(capsys, "reconstruct", run_dir, *pair, "-o", tmp_path / "out")
    _one_line_error(code, err, "a/x.png and ")
    assert not (tmp_path / "out").exists()

    code, _, err = run(capsys, "encode", run_dir, *pair, "-o", tmp_path / "codes.npz")
    assert code == 0, err
    code, _, err = run(capsys, "decode", run_dir, tmp_path / "codes.npz", "-o", tmp_path / "dec")
    assert code == 0, err  # names stored in the file cannot be changed by the user: made unique
    assert sorted(os.listdir(tmp_path / "dec")) == ["x-2.png", "x.png"]
    code, _, err = run(capsys, "decode", run_dir, tmp_path / "codes.npz", "-o", tmp_path / "dec")
    _one_line_error(code, err, "x.png: exists; pass --force to replace it")
    code, _, err = run(capsys, "encode", run_dir, pair[0], "-o", tmp_path / "codes.npz")
    _one_line_error(code, err, "codes.npz: exists; pass --force to replace it")
    code, _, err = run(capsys, "encode", run_dir, pair[0], "-o", tmp_path / "codes.npz", "--force")
    assert code == 0, err


def test_compress_and_decompress_refuse_to_overwrite(prior_run, images, tmp_path, capsys):
    out = tmp_path / "out.vqz"
    out.write_bytes(b"an earlier file")
    (tmp_path / "out.vqz.tmp").write_text("someone else's")
    code, _, err = run(capsys, "compress", prior_run, *images, "-o", out)
    _one_line_error(code, err, "out.vqz: exists; pass --force to replace it")
    assert out.read_bytes() == b"an earlier file"
    code, _, err = run(capsys, "compress", prior_run, *images, "-o", out, "--force")
    assert code == 0, err
    assert out.read_bytes()[:3] == b"VQZ" and (tmp_path / "out.vqz.tmp").read_text() == "someone else's"
    (tmp_path / "dec" / "00001.png").mkdir(parents=True)  # a directory where the second image goes
    code, _, err = run(capsys, "decompress", prior_run, out, "-o", tmp_path / "dec")
    _one_line_error(code, err, "00001.png: is a directory")
    assert sorted(os.listdir(tmp_path / "dec")) == ["00001.png"]  # not even the first image was written
    (tmp_path / "plain").write_text("x")
    code, _, err = run(capsys, "decompress", prior_run, out, "-o", tmp_path / "plain" / "dec")
    _one_line_error(code, err, "plain is a file")
    code, _, err = run(capsys, "sample", prior_run, "-n", "2", "-o", out)
    _one_line_error(code, err, "out.vqz: exists")


def test_paths_are_printed_as_they_are_not_as_markup(run_dir, tmp_path, capsys):
    code, _, err = run(capsys, "reconstruct", run_dir, tmp_path / "scan [draft].png", "-o", tmp_path / "x.png")
    _one_line_error(code, err, "scan [draft].png: no such file")
    source = tmp_path / "in[b]" / "scan [draft].png"
    source.parent.mkdir()
    Image.new("L", (28, 28)).save(source)
    target = tmp_path / "o[" / "]x.png"  # a path holding "[/]" once printed
    code, _, err = run(capsys, "reconstruct", run_dir, source, "-o", target)
    assert code == 0, err
    assert target.is_file() and f"wrote {target}" in err


def test_empty_damaged_or_impossible_inputs_are_one_line(run_dir, tmp_path, capsys):
    import shutil
    import torch

    def copy(name):
        path = tmp_path / name
        shutil.copytree(run_dir, path)
        return path

    r = copy("empty_state")
    (r / "train_state.pt").write_bytes(b"")  # used to end in a silent exit 130 (EOFError -> Abort)
    code, _, err = run(capsys, "train", "--out", r, "--resume")
    _one_line_error(code, err, "train_state.pt: not a training state written by vqvae (empty file)")
    r = copy("cut_state")
    (r / "train_state.pt").write_bytes((run_dir / "train_state.pt").read_bytes()[:300])
    code, _, err = run(capsys, "train", "--out", r, "--resume")
    _one_line_error(code, err, "train_state.pt: not a training state")
    r = copy("list_config")
    (r / "config.json").write_text("[]")
    code, _, err = run(capsys, "train", "--out", r, "--resume")
    _one_line_error(code, err, "config.json: not a vqvae run config (a JSON list, expected an object)")
    r = copy("no_train")
    config = json.loads((r / "config.json").read_text())
    del config["train"]
    (r / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "train", "--out", r, "--resume")
    _one_line_error(code, err, "config.json: no 'train' section")
    config["model"]["hidden"] = 10**9
    (r / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "eval", r)
    _one_line_error(code, err, "hidden must be at most 2048")

    np.save(tmp_path / "flat.npy", np.zeros((20, 0, 8), np.uint8))
    code, _, err = run(capsys, "train", "--data", f"npy:{tmp_path / 'flat.npy'}", "--out", tmp_path / "flat", *TINY)
    _one_line_error(code, err, "flat.npy: expected shape")
    assert not (tmp_path / "flat").exists()  # no untrained run directory left behind
    np.save(tmp_path / "plain.npy", np.zeros((7, 7), np.int64))
    code, _, err = run(capsys, "decode", run_dir, tmp_path / "plain.npy", "-o", tmp_path / "d")
    _one_line_error(code, err, "plain.npy: not a codes file")
    if not torch.cuda.is_available():
        code, _, err = run(capsys, "train", "--data", "digits", "--device", "cuda", "--out", tmp_path / "gpu", *TINY)
        _one_line_error(code, err, "device 'cuda': no CUDA GPU is usable here")
        assert not (tmp_path / "gpu").exists()
    (tmp_path / "ro").write_text("a file")
    code, _, err = run(capsys, "reconstruct", run_dir, run_dir / "recon.png", "-o", tmp_path / "ro" / "x.png")
    _one_line_error(code, err, "ro is a file")


def test_empty_code_caches_are_one_line_or_made_again(prior_run, tmp_path, capsys):
    import shutil

    r = tmp_path / "run"
    shutil.copytree(prior_run, r)
    (r / "codes" / "train.npy").write_bytes(b"")
    code, _, err = run(capsys, "compress", r, r / "recon.png", "-o", tmp_path / "x.vqz", "--coder", "huffman")
    _one_line_error(code, err, "train.npy: not a readable .npy array")
    old_prior = (r / "prior" / "model.safetensors").read_bytes()
    code, _, err = run(capsys, "prior", r, "--force", "--steps", "2", *PRIOR_TINY, "--width", "9")
    _one_line_error(code, err, "n_embd must be a positive multiple of n_head=2")
    assert (r / "prior" / "model.safetensors").read_bytes() == old_prior  # --force deleted nothing
    code, _, err = run(capsys, "prior", r, "--force", "--steps", "2", *PRIOR_TINY)
    assert code == 0, err  # the emptied cache is made again
    assert np.load(r / "codes" / "train.npy").shape == (4500, 7, 7)


def test_refusals_name_the_file_not_its_position(prior_run, tmp_path, capsys):
    wide = tmp_path / "wide.png"
    Image.new("L", (100_000, 1)).save(wide)
    code, _, err = run(capsys, "compress", prior_run, wide, "-o", tmp_path / "w.vqz")
    _one_line_error(code, err, f"{wide} is 1x100000")
    assert "image 0" not in err
    bomb = tmp_path / "bomb.png"
    Image.new("L", (9000, 9000)).save(bomb, optimize=True)
    code, _, err = run(capsys, "reconstruct", prior_run, bomb, "-o", tmp_path / "b.png")
    _one_line_error(code, err, "bomb.png: 9000x9000 is 81,000,000 pixels, more than the limit of 16,777,216")
    small = tmp_path / "small.png"
    Image.new("L", (30, 30)).save(small)
    code, _, err = run(capsys, "reconstruct", prior_run, small, "-o", tmp_path / "s.png", "--max-pixels", "899")
    _one_line_error(code, err, "small.png: 30x30 is 900 pixels, more than the limit of 899")


def test_threads_option_sets_torch_threads(tmp_path, capsys, monkeypatch):
    import torch

    from vqvae import devices

    before = torch.get_num_threads()
    try:  # set before any command runs (this one then fails fast: no such run)
        code, _, _ = run(capsys, "--threads", "2", "eval", tmp_path / "none")
        assert code == 2 and torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(devices, "usable_cpus", lambda: 2)
        monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 3.0, 3.0))  # a busy 2-core machine
        code, _, _ = run(capsys, "eval", tmp_path / "none")
        assert code == 2 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_an_unexpected_end_of_file_is_an_error_not_a_silent_interrupt(run_dir, capsys, monkeypatch):
    """click turns EOFError into Abort (exit 130, nothing said, as for Ctrl-C); whatever file ends early,
    the command says so in one line and exits with 2."""
    def cut_short(*args, **kwargs):
        raise EOFError("Ran out of input")

    monkeypatch.setattr("vqvae.evaluate_run", cut_short)
    code, _, err = run(capsys, "eval", run_dir)
    assert code == 2  # not 130, click's silent Abort
    _one_line_error(code, err, "a file ended early (Ran out of input)")


def test_decompress_refuses_files_over_the_pixel_cap_before_decoding(prior_run, images, tmp_path, capsys):
    assert run(capsys, "compress", prior_run, *images, "-o", tmp_path / "all.vqz")[0] == 0
    code, _, err = run(capsys, "decompress", prior_run, tmp_path / "all.vqz", "-o", tmp_path / "out",
                       "--max-pixels", "1000")
    assert code == 2 and "more than 1,000" in err and not (tmp_path / "out").exists()


def test_the_cli_uses_only_the_public_api():
    """cli.py parses and calls: it imports `vqvae` and names from its public API, nothing internal."""
    import ast

    import vqvae
    from vqvae import cli

    tree = ast.parse(open(cli.__file__).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vqvae") or \
                isinstance(node, ast.ImportFrom) and node.level > 0:
            assert node.module == "vqvae" and node.level == 0, ast.unparse(node)
            assert {alias.name for alias in node.names} <= set(vqvae.__all__), ast.unparse(node)
        if isinstance(node, ast.Import):
            assert all(a.name == "vqvae" or not a.name.startswith("vqvae") for a in node.names), ast.unparse(node)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "vqvae":
            assert node.attr in vqvae.__all__ or node.attr == "__version__", f"vqvae.{node.attr}"


# -- the model family ---------------------------------------------------------------------------------------


def _train_tiny(tmp_path, name, *options):
    path = tmp_path / name
    assert main(["train", "--data", "mnist", "--steps", "6", "--out", str(path), "--log-every", "3", *TINY,
                 *options]) == 0
    return path


def test_family_train_eval_and_codes(tmp_path, images, capsys):
    vae = _train_tiny(tmp_path, "vae", "--model", "vae")
    rvq = _train_tiny(tmp_path, "rvq", "--quantizer", "rvq", "--stages", "2")
    fsq = _train_tiny(tmp_path, "fsq", "--quantizer", "fsq", "--levels", "4,3")
    dvae = _train_tiny(tmp_path, "dvae", "--model", "dvae", "--temperature-end", "0.5")
    two = _train_tiny(tmp_path, "vqvae2", "--model", "vqvae2")
    capsys.readouterr()
    configs = {p.name: json.loads((p / "config.json").read_text())["model"] for p in (vae, rvq, fsq, dvae, two)}
    assert configs["vae"]["model"] == "vae" and configs["rvq"]["quantizer"]["stages"] == 2
    assert configs["fsq"]["quantizer"]["codebook_size"] == 12 and configs["fsq"]["quantizer"]["code_dim"] == 2
    assert configs["dvae"]["quantizer"]["kind"] == "gumbel" and configs["dvae"]["quantizer"]["temperature_end"] == 0.5
    # the dVAE followed its schedule: the last logged temperature is the mean over steps 4..6 of 6, which
    # start at progress 3/6, 4/6, 5/6
    from vqvae.autoencoders import gumbel_schedule
    from vqvae.config import QuantizerConfig

    q = QuantizerConfig(kind="gumbel", temperature_end=0.5)
    last = json.loads((dvae / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["temperature"] == pytest.approx(sum(gumbel_schedule(q, p / 6)[0] for p in (3, 4, 5)) / 3)

    code, out, _ = run(capsys, "eval", vae, "--json")
    figures = json.loads(out)
    assert code == 0 and "elbo_bits_per_dim" in figures and "perplexity" not in figures
    code, out, _ = run(capsys, "eval", two, "--json")
    assert code == 0 and {"top_perplexity", "uniform_bits_per_dim"} <= set(json.loads(out))

    # continuous latents: refused in one line; reconstruct works
    code, _, err = run(capsys, "encode", vae, *images, "-o", tmp_path / "c.npz")
    assert code == 2 and vae.name in err and err.strip().count("\n") == 0
    code, _, _ = run(capsys, "reconstruct", vae, images[1], "-o", tmp_path / "vae.png")
    assert code == 0 and Image.open(tmp_path / "vae.png").size == (31, 29)

    # decode(encode(x)) is reconstruct(x), residual VQ's stage axis kept, the VQ-VAE-2's top grid beside
    for model_run in (rvq, fsq, dvae, two):
        code, _, _ = run(capsys, "encode", model_run, *images, "-o", tmp_path / f"{model_run.name}.npz")
        assert code == 0
        with np.load(tmp_path / f"{model_run.name}.npz", allow_pickle=False) as f:
            assert f["codes_1"].shape == ((2, 8, 8) if model_run is rvq else (8, 8))
            assert ("top_1" in f) == (model_run is two) and (model_run is not two or f["top_1"].shape == (4, 4))
        for command, source, target in (("decode", tmp_path / f"{model_run.name}.npz", "dec"),
                                        ("reconstruct", None, "rec")):
            args = [source] if source else images
            assert run(capsys, command, model_run, *args, "-o", tmp_path / model_run.name / target)[0] == 0
        for path in images:
            assert np.array_equal(np.asarray(Image.open(tmp_path / model_run.name / "dec" / path.name)),
                                  np.asarray(Image.open(tmp_path / model_run.name / "rec" / path.name)))


def test_vqvae2_prior_sample_and_compress(tmp_path, images, capsys):
    """A VQ-VAE-2 run: its prior models the top grid then the bottom one; samples decode; a .vqz of digit-sized
    images decodes to their reconstructions; another size is refused in one line."""
    two = _train_tiny(tmp_path, "vqvae2", "--model", "vqvae2")
    capsys.readouterr()
    code, out, _ = run(capsys, "prior", two, "--steps", "10", "--json", *PRIOR_TINY)
    assert code == 0
    figures = json.loads(out)
    assert figures["latents_per_image"] == 16 + 49 and 0 < figures["nll_bits_per_latent"] < 6
    assert figures["integer_bits_per_latent"] == pytest.approx(figures["nll_bits_per_latent"], abs=0.05)
    config = json.loads((two / "prior" / "config.json").read_text())
    assert config["grid"] == [65] and config["levels"] == [[4, 4], [7, 7]]
    assert np.load(two / "codes" / "test.npy").shape == (500, 65)
    code, _, _ = run(capsys, "sample", two, "-n", "10", "-o", tmp_path / "s.png", "--seed", "1")
    assert code == 0 and Image.open(tmp_path / "s.png").size == (58 + 2, 10 * 58 + 2)
    code, out, _ = run(capsys, "eval", two, "--json", "--class-samples", "0")
    assert code == 0 and 0 < json.loads(out)["bits_per_dim"] < 8
    digits = images[:1] + [tmp_path / "d1.png"]
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (27, 26), dtype=np.uint8)).save(digits[1])
    assert run(capsys, "compress", two, *digits, "-o", tmp_path / "two.vqz")[0] == 0
    assert run(capsys, "decompress", two, tmp_path / "two.vqz", "-o", tmp_path / "dec")[0] == 0
    assert run(capsys, "reconstruct", two, *digits, "-o", tmp_path / "rec")[0] == 0
    for i, path in enumerate(digits):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "dec" / f"{i:05d}.png")),
                              np.asarray(Image.open(tmp_path / "rec" / path.name)))
    code, _, err = run(capsys, "compress", two, images[1], "-o", tmp_path / "big.vqz")
    assert code == 2 and "code grids" in err and err.strip().count("\n") == 0


def test_family_options_are_checked(tmp_path, capsys):
    cases = [(["--model", "gan"], "model"), (["--model", "dvae", "--quantizer", "ema"], "gumbel"),
             (["--quantizer", "fsq", "--levels", "8,x"], "--levels"), (["--quantizer", "rvq", "--stages", "0"], "stages")]
    for options, needle in cases:
        code, _, err = run(capsys, "train", "--out", tmp_path / "r", *TINY, *options)
        assert code == 2 and needle in err and err.strip().count("\n") == 0, err
