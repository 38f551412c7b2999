"""Tests for vqvae.pretrained: the config.json + model.safetensors convention, read defensively, written
atomically with the usual permissions."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from vqvae import pretrained
from vqvae.errors import RunError


def test_save_then_load_round_trip_leaves_only_the_two_files(tmp_path):
    module = torch.nn.Linear(3, 2)
    old = os.umask(0o027)
    try:
        pretrained.save(module, tmp_path / "m", {"kind": "linear"})
    finally:
        os.umask(old)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "m" / name).stat().st_mode & 0o777 == 0o640, name  # the umask's, not 0600
    assert torch.equal(load_file(str(tmp_path / "m" / "model.safetensors"))["weight"], module.weight.detach())
    back = pretrained.load_weights(torch.nn.Linear(3, 2), tmp_path / "m")
    assert torch.equal(back.weight, module.weight) and not back.training
    assert pretrained.read_config(tmp_path / "m", "a test directory", "test") == {"kind": "linear"}


@pytest.mark.parametrize("text,needle", [
    ("[]", "a JSON list, expected an object"), ("3", "a JSON int, expected an object"),
    ('"model"', "a JSON str, expected an object"), ("{", "invalid JSON"), ("\xff\xfe", "invalid JSON"),
])
def test_a_config_that_is_not_an_object_is_one_line(tmp_path, text, needle):
    pretrained.save(torch.nn.Linear(1, 1), tmp_path, {})
    (tmp_path / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(RunError) as error:
        pretrained.read_config(tmp_path, "a test directory", "test")
    assert str(error.value).startswith(f"{tmp_path / 'config.json'}: not a vqvae test config")
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_missing_and_damaged_weights_are_one_line(tmp_path):
    with pytest.raises(RunError, match="config.json: missing; expected a test directory"):
        pretrained.read_config(tmp_path, "a test directory", "test")
    pretrained.save(torch.nn.Linear(2, 2), tmp_path, {})
    for content in (b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage", (tmp_path / "model.safetensors").read_bytes()[:50]):
        (tmp_path / "model.safetensors").write_bytes(content)
        with pytest.raises(RunError, match="model.safetensors: cannot load weights"):
            pretrained.load_weights(torch.nn.Linear(2, 2), tmp_path)
    pretrained.save(torch.nn.Linear(2, 3), tmp_path, {})
    with pytest.raises(RunError, match="model.safetensors: cannot load weights"):  # another shape
        pretrained.load_weights(torch.nn.Linear(2, 2), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {}
