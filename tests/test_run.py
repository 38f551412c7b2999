import json

import numpy as np
import pytest
import torch

from vqvae.autoencoders import VQVAE
from vqvae.errors import ConfigError, RunError
from vqvae.priors import Prior
from vqvae.run import Run


def test_layout_and_loaders(tiny_run):
    run = Run(tiny_run)
    assert run.exists() and run.has_prior() and run.has_integer_prior()  # `train_prior` makes both
    assert run.data_uri == "mnist" and run.num_classes == 10
    assert isinstance(run.model(), VQVAE) and isinstance(run.prior(), Prior)
    assert run.model() is run.model()  # read once per Run object
    assert run.prior().cfg.grid == (7, 7) and run.prior().cfg.num_classes == 10
    assert len(run.dataset().test) == 500
    assert len(run.dataset("digits").test) == 1797 // 10  # another dataset's held-out split


def test_code_counts_are_the_training_codes_histogram(tiny_run):
    run = Run(tiny_run)
    counts = run.code_counts()
    train = np.load(run.codes_dir / "train.npy")
    assert counts.shape == (16,) and counts.dtype == torch.int64
    assert int(counts.sum()) == train.size
    assert torch.equal(counts, torch.bincount(torch.from_numpy(train.astype(np.int64)).flatten(), minlength=16))


def test_code_cache_is_keyed(tmp_path):
    run = Run(tmp_path)
    arrays = {"train": torch.arange(6, dtype=torch.int16).view(2, 3), "test": torch.zeros(1, 3, dtype=torch.int16),
              "train_labels": None, "test_labels": None}
    run.write_codes(arrays, {"model": "ab", "shifts": 0})
    back = run.read_codes({"model": "ab", "shifts": 0})
    assert isinstance(back["train"], np.memmap) and not back["train"].flags.writeable  # read from disk as needed
    assert np.array_equal(back["train"], arrays["train"].numpy()) and back["train_labels"] is None
    assert run.read_codes({"model": "cd", "shifts": 0}) is None  # other weights: encode again
    (run.codes_dir / "train.npy").write_bytes(b"")  # a damaged cache is not an error, only a miss
    assert run.read_codes({"model": "ab", "shifts": 0}) is None


@pytest.mark.parametrize("coder", ["range", "huffman"])
def test_compress_decompress(tiny_run, coder):
    run = Run(tiny_run)
    images = [run.dataset().test[0], torch.rand(1, 25, 30)]
    data, stats = run.compress(images, coder)
    assert stats["num_images"] == 2 and stats["bytes"] == len(data)
    decoded = run.decompress(data)
    model = run.model()
    for x, y in zip(images, decoded):
        assert y.shape == x.shape
        expected = model.reconstruct(x[None])[0]
        assert torch.equal((y * 255).round(), (expected * 255).round())  # what the user gets: 8-bit pixels


def test_errors_name_the_file_and_the_command(tmp_path, tiny_run):
    with pytest.raises(RunError, match="config.json: missing"):
        Run(tmp_path / "nothing").model()
    with pytest.raises(RunError, match="config.json: missing"):
        Run(tmp_path / "nothing").data_uri
    bare = tmp_path / "bare"
    VQVAE.from_pretrained(tiny_run).save_pretrained(bare, {"data": {"uri": "mnist"}})
    with pytest.raises(RunError, match="vqvae prior"):
        Run(bare).prior()
    with pytest.raises(RunError, match="train.npy: missing"):
        Run(bare).code_counts()
    with pytest.raises(ConfigError, match="coder"):
        Run(tiny_run).compress([torch.rand(1, 8, 8)], coder="zip")
    (bare / "config.json").write_text(json.dumps({"model": json.loads((bare / "config.json").read_text())["model"]}))
    with pytest.raises(RunError, match="no data section"):
        Run(bare).data_uri


def test_integer_prior_is_made_once_for_a_run_without_one(tiny_run, tmp_path):
    import shutil

    from vqvae.integer_priors import IntegerPrior

    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    shutil.rmtree(copy / "prior" / "integer")  # a prior trained before integer models existed
    run = Run(copy)
    assert not run.has_integer_prior()
    made = run.integer_prior()
    assert isinstance(made, IntegerPrior) and run.has_integer_prior()
    codes = torch.from_numpy(np.load(copy / "codes" / "test.npy")[:4].astype(np.int64))
    original = Run(tiny_run).integer_prior()
    labels = torch.zeros(4, dtype=torch.long)
    assert torch.equal(made.frequencies(codes, labels), original.frequencies(codes, labels))  # same calibration
    (copy / "codes" / "train.npy").unlink()
    shutil.rmtree(copy / "prior" / "integer")
    with pytest.raises(RunError, match="train.npy: missing"):
        Run(copy).integer_prior()


def test_codes_written_in_chunks_equal_the_codes_in_memory(tmp_path):
    """A cache filled chunk by chunk (`CodeChunks`) reads back equal to the whole array, and a write killed
    part way (an exception, or SIGKILL in another process) leaves a cache that is never used."""
    import os
    import signal
    import subprocess
    import sys

    from vqvae.run import CodeChunks

    run = Run(tmp_path)
    codes = torch.randint(0, 16, (23, 3, 4), dtype=torch.int16)
    key = {"model": "ab", "shifts": 0}
    chunks = CodeChunks(23, (codes[i:i + 5] for i in range(0, 23, 5)))
    run.write_codes({"train": chunks, "test": codes[:2], "train_labels": torch.arange(23), "test_labels": None}, key)
    back = run.read_codes(key)
    assert back["train"].dtype == np.int16 and np.array_equal(back["train"], codes.numpy())
    assert np.array_equal(back["train_labels"], np.arange(23)) and back["test_labels"] is None
    assert not list(run.codes_dir.glob(".*.tmp"))

    def failing():
        yield codes[:5]
        raise KeyboardInterrupt  # the process stops in the middle of the cache

    with pytest.raises(KeyboardInterrupt):
        run.write_codes({"train": CodeChunks(23, failing()), "test": codes[:2]}, key)
    assert run.read_codes(key) is None and not list(run.codes_dir.glob(".*.tmp"))
    with pytest.raises(ValueError, match="22 code grids written, 23 announced"):
        run.write_codes({"train": CodeChunks(23, [codes[:22]]), "test": codes[:2]}, key)
    assert run.read_codes(key) is None

    killed = (f"import os, signal, torch\nfrom vqvae.run import Run, CodeChunks\n"
              f"def chunks():\n    yield torch.zeros(5, 3, 4, dtype=torch.int16)\n"
              f"    os.kill(os.getpid(), signal.SIGKILL)\n"
              f"Run({str(tmp_path)!r}).write_codes({{'train': CodeChunks(23, chunks()), 'test': None}}, {key!r})\n")
    run.write_codes({"train": codes, "test": codes[:2]}, key)
    assert run.read_codes(key) is not None
    done = subprocess.run([sys.executable, "-c", killed], env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert list(run.codes_dir.glob(".train.npy.*.tmp"))  # what the kill left: a temp file, no meta.json
    assert run.read_codes(key) is None
    run.write_codes({"train": codes, "test": codes[:2]}, key)  # the next write clears it away
    assert run.read_codes(key) is not None and not list(run.codes_dir.glob(".*.tmp"))


def test_cached_codes_equal_encoding_in_memory(tiny_run, tmp_path):
    """The prior's training codes, encoded in chunks of 100 images (four shift offsets of 9, so chunks
    cross offsets' ends) into a memory-mapped cache, equal encoding each shifted copy whole."""
    import shutil

    from vqvae.evaluate import encode_dataset
    from vqvae.prior_training import cached_codes, shifted

    shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("codes"))
    run = Run(tmp_path / "run")
    model = run.model()
    data = run.dataset()
    data.train, data.train_labels = data.train[:250], data.train_labels[:250]
    run.dataset = lambda uri=None: data  # a smaller training split: a faster test
    codes = cached_codes(run, model, shifts=1, chunk=100)
    expected = torch.cat([encode_dataset(model, shifted(data.train, dy, dx))
                          for dy, dx in [(0, 0), (-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]])
    assert isinstance(codes["train"], np.memmap) and codes["train"].shape == (9 * 250, 7, 7)
    assert np.array_equal(codes["train"], expected.numpy())
    assert np.array_equal(codes["train_labels"], data.train_labels.repeat(9).numpy())
    assert np.array_equal(codes["test"], encode_dataset(model, data.test).numpy())
    again = cached_codes(run, model, shifts=1)  # read from the cache, not encoded again
    assert np.array_equal(again["train"], codes["train"])


def test_the_integer_prior_is_made_under_the_run_lock(tiny_run, tmp_path):
    """Another process holding the run (training it) means the integer prior is not written meanwhile."""
    import shutil

    shutil.copytree(tiny_run, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "prior" / "integer")
    held = []
    original = Run.quantize_prior

    def spy(self):
        from vqvae.run import _held

        held.append(str(self.path.resolve()) in _held)
        return original(self)

    Run.quantize_prior = spy
    try:
        Run(tmp_path / "run").integer_prior()
    finally:
        Run.quantize_prior = original
    assert held == [True]


# -- the lock ------------------------------------------------------------------------------------------------


def test_a_second_process_is_refused_and_kill_9_releases_the_lock(tmp_path):
    """Two processes never write one run: the second gets a one-line error naming the first's pid and
    command; a holder killed with SIGKILL leaves its lock file but not its lock."""
    import os
    import subprocess
    import sys

    from vqvae.config import ModelConfig, QuantizerConfig, TrainConfig
    from vqvae.train import train_autoencoder

    path = tmp_path / "run"
    holder_code = (f"import time\nfrom vqvae.run import Run\nwith Run({str(path)!r}).lock('vqvae train', create=True):\n"
                   "    print('held', flush=True)\n    time.sleep(300)\n")
    holder = subprocess.Popen([sys.executable, "-c", holder_code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert holder.stdout.readline().strip() == "held"
        message = rf"{path}: in use by process {holder.pid} \(vqvae train\) \(lock {path / '.lock'}\)"
        with pytest.raises(RunError, match=message):
            with Run(path).lock("vqvae prior"):
                pass
        tiny = ModelConfig(hidden=8, res_hidden=4, res_blocks=1, downsample=2,
                           quantizer=QuantizerConfig(codebook_size=16, code_dim=4))
        with pytest.raises(RunError, match=message):  # a second `train` into the same --out, or a --resume
            train_autoencoder(tiny, TrainConfig(data="digits", steps=2), path, show_progress=False)
        assert sorted(p.name for p in path.iterdir()) == [".lock"]  # it wrote nothing
    finally:
        holder.kill()
        holder.wait()
    assert (path / ".lock").exists()
    with Run(path).lock("test") as run:
        with run.lock("nested"):  # one process may take its own lock again
            pass
        assert f"process {os.getpid()} (test)" in (path / ".lock").read_text()
    assert not (path / ".lock").exists()


def test_lock_needs_the_directory_unless_asked_to_create_it(tmp_path):
    with pytest.raises(RunError, match="no such directory"):
        with Run(tmp_path / "missing").lock():
            pass
    assert not (tmp_path / "missing").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="not a directory"):
        with Run(tmp_path / "file").lock(create=True):
            pass


# -- replacing a directory -----------------------------------------------------------------------------------


def test_clear_replaces_a_run_but_refuses_other_files(tmp_path, monkeypatch):
    run = tmp_path / "run"
    for name in ("config.json", "model.safetensors", "train_state.pt", "metrics.jsonl", "recon.png",
                 ".model.safetensors.k2j3.tmp", "train_state.pt.tmp"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    for name in ("codes/train.npy", "prior/model.safetensors"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    assert Run(run).foreign_entries() == []
    Run(run).clear()
    assert list(run.iterdir()) == []

    thesis = tmp_path / "p"
    thesis.mkdir()
    (thesis / "thesis.txt").write_text("four years")
    (thesis / "config.json").write_text("{}")
    with pytest.raises(RunError, match=r"p: holds files that are not part of a vqvae run \(thesis.txt\)"):
        Run(thesis).clear()
    assert (thesis / "thesis.txt").read_text() == "four years"
    monkeypatch.chdir(thesis)
    with pytest.raises(RunError, match="current directory"):
        Run(".").clear(force=True)
    with pytest.raises(RunError, match="current directory"):
        Run(tmp_path).clear(force=True)
    monkeypatch.chdir(tmp_path)
    Run(thesis).clear(force=True)
    assert list(thesis.iterdir()) == []
    Run(tmp_path / "missing").clear()  # nothing to replace


# -- damaged files ------------------------------------------------------------------------------------------


def _copy_model(tiny_run, path):
    path.mkdir()
    for name in ("config.json", "model.safetensors"):
        (path / name).write_bytes((tiny_run / name).read_bytes())
    return json.loads((path / "config.json").read_text())


@pytest.mark.parametrize("edit,needle", [
    (lambda c: [], "a JSON list, expected an object"),
    (lambda c: {**c, "model": {**c["model"], "hidden": 1.5}}, "hidden must be an integer, got 1.5"),
    (lambda c: {**c, "model": {**c["model"], "hidden": 10**9}}, "hidden must be at most 2048"),
    (lambda c: {**c, "model": {**c["model"], "quantizer": [16]}}, "QuantizerConfig must be a JSON object"),
    (lambda c: {**c, "model": {**c["model"], "res_blocks": "2"}}, "res_blocks must be an integer"),
    (lambda c: {k: v for k, v in c.items() if k != "model"}, "no 'model' section"),
])
def test_a_damaged_config_is_one_line_naming_it(tiny_run, tmp_path, edit, needle):
    config = _copy_model(tiny_run, tmp_path / "run")
    (tmp_path / "run" / "config.json").write_text(json.dumps(edit(config)))
    with pytest.raises(RunError) as error:
        Run(tmp_path / "run").model()
    assert needle in str(error.value) and "config.json" in str(error.value) and "\n" not in str(error.value)


def test_a_damaged_data_section_is_one_line(tiny_run, tmp_path):
    config = _copy_model(tiny_run, tmp_path / "run")
    for data, needle in [(None, "no data section"), ([], "no data section"),
                         ({"uri": "mnist", "num_classes": 1.5}, "num_classes must be an integer")]:
        (tmp_path / "run" / "config.json").write_text(json.dumps({**config, "data": data}))
        run = Run(tmp_path / "run")
        with pytest.raises(RunError, match=needle):
            run.data_uri if data is None or data == [] else run.num_classes


def test_a_damaged_code_cache_is_made_again_not_trained_on(tmp_path):
    from vqvae.config import write_json

    run = Run(tmp_path)
    good = {"train": torch.zeros(4, 2, 2, dtype=torch.int16), "test": torch.ones(2, 2, 2, dtype=torch.int16),
            "train_labels": torch.arange(4), "test_labels": torch.arange(2)}
    key = {"model": "ab", "shifts": 0}
    run.write_codes(good, key)
    assert run.read_codes(key) is not None
    bad = {
        "empty train": {"train": np.zeros((0, 2, 2), np.int16)},
        "float codes": {"train": np.zeros((4, 2, 2), np.float32)},
        "negative": {"test": -np.ones((2, 2, 2), np.int16)},
        "labels of another length": {"train_labels": np.arange(3)},
        "one dimension": {"test": np.zeros(5, np.int16)},
    }
    for name, arrays in bad.items():
        run.write_codes(good, key)
        for split, value in arrays.items():
            np.save(run.codes_dir / f"{split}.npy", value)
        write_json(run.codes_dir / "meta.json", key)
        assert run.read_codes(key) is None, name
    run.write_codes(good, key)
    with open(run.codes_dir / "train.npy", "wb") as f:  # a header that claims 10^12 elements
        np.lib.format.write_array_header_1_0(f, {"descr": "<i2", "fortran_order": False, "shape": (10**12,)})
    assert run.read_codes(key) is None


def test_code_counts_of_an_empty_or_damaged_file_are_one_line(tiny_run, tmp_path):
    import shutil

    shutil.copytree(tiny_run, tmp_path / "run")
    run = Run(tmp_path / "run")
    for content in (b"", b"\x93NUMPY garbage"):
        (run.codes_dir / "train.npy").write_bytes(content)
        with pytest.raises(RunError, match=r"train.npy: not a readable .npy array.*vqvae prior .* --force"):
            run.code_counts()
    np.save(run.codes_dir / "train.npy", np.zeros((0, 7, 7), np.int16))
    with pytest.raises(RunError, match="not code grids"):
        run.code_counts()


def test_code_counts_refuse_codes_of_other_weights(tiny_run, tmp_path):
    """Training resumed after the prior changes the weights: the cached codes are not the model's any more."""
    import json
    import shutil

    shutil.copytree(tiny_run, tmp_path / "run")
    run = Run(tmp_path / "run")
    assert run.code_counts().sum() > 0
    meta = run.codes_dir / "meta.json"
    key = json.loads(meta.read_text())
    meta.write_text(json.dumps({**key, "model": "0000" if key["model"] != "0000" else "0001"}))
    with pytest.raises(RunError, match="not those of the run's model.*vqvae prior .* --force"):
        Run(tmp_path / "run").code_counts()
    meta.unlink()
    with pytest.raises(RunError, match="not those of the run's model"):
        Run(tmp_path / "run").code_counts()
