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
    assert run.exists() and run.has_prior()
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
    assert torch.equal(back["train"], arrays["train"]) and back["train_labels"] is None
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
