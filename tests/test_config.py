"""Tests for vqvae.config: validation messages, JSON round trips, refusal of unknown keys, old files."""

import dataclasses
import json
import re

import numpy as np
import pytest

from vqvae.config import ModelConfig, PriorConfig, QuantizerConfig, TrainConfig, from_dict, to_dict, write_json
from vqvae.errors import ConfigError

CONFIGS = [QuantizerConfig, ModelConfig, PriorConfig, TrainConfig]

# (config, bad keyword arguments, the field the message names, the allowed range it states)
BAD = [
    (QuantizerConfig, {"codebook_size": 1}, "codebook_size", "at least 2"),
    (QuantizerConfig, {"codebook_size": 65537}, "codebook_size", "at most 65536"),
    (QuantizerConfig, {"code_dim": 0}, "code_dim", "at least 1"),
    (QuantizerConfig, {"commitment_weight": -0.1}, "commitment_weight", ">= 0"),
    (QuantizerConfig, {"kind": "lfq"}, "quantizer kind", "'vq', 'ema', 'fsq', 'rvq' or 'gumbel'"),
    (QuantizerConfig, {"ema_decay": 1.0}, "ema_decay", "in (0, 1)"),
    (QuantizerConfig, {"ema_decay": 0.0}, "ema_decay", "in (0, 1)"),
    (QuantizerConfig, {"ema_eps": 0.0}, "ema_eps", "> 0"),
    (QuantizerConfig, {"kmeans_iters": -1}, "kmeans_iters", ">= 0"),
    (QuantizerConfig, {"dead_code_steps": -1}, "dead_code_steps", ">= 0 (0 disables)"),
    (QuantizerConfig, {"levels": (8, 1)}, "levels", "a list of integers >= 2, e.g. [8, 5, 5, 5]"),
    (QuantizerConfig, {"levels": ()}, "levels", "a list of integers >= 2, e.g. [8, 5, 5, 5]"),
    (QuantizerConfig, {"levels": 8}, "levels", "a list of integers >= 2, e.g. [8, 5, 5, 5]"),
    (QuantizerConfig, {"levels": (8.0, 5)}, "levels", "a list of integers >= 2, e.g. [8, 5, 5, 5]"),
    (QuantizerConfig, {"stages": 0}, "stages", "in 1..64"),
    (QuantizerConfig, {"temperature": 0.0}, "temperature", "> 0"),
    (QuantizerConfig, {"temperature_end": 2.0}, "temperature_end", "in (0, temperature=1.0]"),
    (QuantizerConfig, {"temperature_end": 0.0}, "temperature_end", "in (0, temperature=1.0]"),
    (QuantizerConfig, {"kl_weight": -1.0}, "kl_weight", ">= 0"),
    (QuantizerConfig, {"kl_warmup": 1.5}, "kl_warmup", "in [0, 1] (a fraction of training)"),
    (ModelConfig, {"in_channels": 0}, "in_channels", "at least 1"),
    (ModelConfig, {"hidden": 0}, "hidden", "at least 1"),
    (ModelConfig, {"res_hidden": 0}, "res_hidden", "at least 1"),
    (ModelConfig, {"res_blocks": -1}, "res_blocks", ">= 0"),
    (ModelConfig, {"downsample": 3}, "downsample", "a power of 2 (1, 2, 4, 8, ...)"),
    (ModelConfig, {"downsample": 0}, "downsample", "a power of 2 (1, 2, 4, 8, ...)"),
    (ModelConfig, {"dims": 3}, "dims", "1 (sequences) or 2 (images)"),
    (ModelConfig, {"encoder_kernel": 2}, "encoder_kernel", "1, 3 or 5"),
    (ModelConfig, {"model": "gan"}, "model", "'vqvae', 'ae', 'vae', 'dvae' or 'vqvae2'"),
    (PriorConfig, {"arch": "lstm"}, "arch", "'transformer' or 'pixelcnn'"),
    (PriorConfig, {"codebook_size": 1}, "codebook_size", "at least 2"),
    (PriorConfig, {"codebook_size": 512.0}, "codebook_size", "an integer"),
    (PriorConfig, {"grid": (7, 7, 7)}, "grid", "1 or 2 positive integer sizes, e.g. [7, 7] or [32]"),
    (PriorConfig, {"grid": (0, 7)}, "grid", "1 or 2 positive integer sizes, e.g. [7, 7] or [32]"),
    (PriorConfig, {"grid": 7}, "grid", "1 or 2 positive integer sizes, e.g. [7, 7] or [32]"),
    (PriorConfig, {"grid": "77"}, "grid", "1 or 2 positive integer sizes, e.g. [7, 7] or [32]"),
    (PriorConfig, {"grid": (7.5, 7)}, "grid", "1 or 2 positive integer sizes, e.g. [7, 7] or [32]"),
    (PriorConfig, {"num_classes": -1}, "num_classes", ">= 0"),
    (PriorConfig, {"levels": 4}, "levels", "grids of 1 or 2 positive integer sizes, top first, e.g. [[4, 4], [7, 7]]"),
    (PriorConfig, {"n_layer": 0}, "n_layer", "at least 1"),
    (PriorConfig, {"n_head": 0}, "n_head", "at least 1"),
    (PriorConfig, {"n_embd": 130}, "n_embd", "a positive multiple of n_head=4"),
    (PriorConfig, {"n_embd": 0}, "n_embd", "a positive multiple of n_head=4"),
    (PriorConfig, {"dropout": 1.0}, "dropout", "in [0, 1)"),
    (PriorConfig, {"dropout": "0.1"}, "dropout", "in [0, 1)"),
    (PriorConfig, {"dilated": 1}, "dilated", "true or false"),
    (PriorConfig, {"stages": 65}, "stages", "in 0..64"),
    (PriorConfig, {"stages": -1}, "stages", "in 0..64"),
    (TrainConfig, {"steps": 0}, "steps", "at least 1"),
    (TrainConfig, {"max_seconds": -1.0}, "max_seconds", ">= 0 (0: no limit)"),
    (TrainConfig, {"batch_size": 0}, "batch_size", "at least 1"),
    (TrainConfig, {"lr": 0.0}, "lr", "> 0"),
    (TrainConfig, {"lr_min_ratio": 1.5}, "lr_min_ratio", "in [0, 1]"),
    (TrainConfig, {"warmup_steps": -1}, "warmup_steps", ">= 0"),
    (TrainConfig, {"log_every": 0}, "log_every", "at least 1"),
    (TrainConfig, {"checkpoint_every": 0}, "checkpoint_every", "at least 1"),
    (TrainConfig, {"eval_every": -1}, "eval_every", ">= 0 (0: no held-out evaluation)"),
    (TrainConfig, {"eval_every": 2.5}, "eval_every", "an integer"),
    (TrainConfig, {"precision": "fp8"}, "precision", "one of fp32, bf16, fp16"),
    (TrainConfig, {"image_size": -1}, "image_size", "in 0..65536 (0: whole images)"),
    (TrainConfig, {"workers": 300}, "workers", "in 0..256"),
    (TrainConfig, {"skip_bad_files": 1}, "skip_bad_files", "true or false"),
]


@pytest.mark.parametrize("cls,kwargs,name,allowed", BAD, ids=[f"{c.__name__}-{list(k)[0]}" for c, k, _, _ in BAD])
def test_validation_message_names_the_field_and_the_allowed_range(cls, kwargs, name, allowed):
    (key, value), = kwargs.items()
    expected = f"{name} must be {allowed}, got {value!r}"
    with pytest.raises(ConfigError) as error:
        cls(**kwargs)
    assert str(error.value) == expected
    # the same message through from_dict, as when a config.json is read
    json_value = list(value) if isinstance(value, tuple) else value
    data = {**to_dict(cls()), key: json_value}
    if cls is ModelConfig:
        data["quantizer"] = to_dict(QuantizerConfig())
    with pytest.raises(ConfigError) as error:
        from_dict(cls, data)
    assert str(error.value) == f"{name} must be {allowed}, got {json_value!r}"


def test_every_field_has_a_check():
    """Guard for this table: each numeric or string field of each config appears in BAD (or is free)."""
    free = {"kmeans_init", "seed", "data", "device", "quantizer"}  # not range-checked here
    checked = {(cls, list(kwargs)[0]) for cls, kwargs, _, _ in BAD}
    for cls in CONFIGS:
        for f in dataclasses.fields(cls):
            assert (cls, f.name) in checked or f.name in free, f"{cls.__name__}.{f.name} has no case in BAD"


@pytest.mark.parametrize("cls,kwargs", [
    (QuantizerConfig, {"codebook_size": 2}), (QuantizerConfig, {"codebook_size": 65536}),
    (QuantizerConfig, {"commitment_weight": 0.0, "kmeans_iters": 0, "dead_code_steps": 0}),
    (ModelConfig, {"downsample": 1, "res_blocks": 0}), (ModelConfig, {"downsample": 8, "dims": 1}),
    (PriorConfig, {"grid": (1,), "codebook_size": 2, "n_head": 1, "n_embd": 1}),
    (PriorConfig, {"dropout": 0.0, "num_classes": 0, "dilated": False}),
    (TrainConfig, {"lr_min_ratio": 0.0, "warmup_steps": 0, "max_seconds": 0.0}), (TrainConfig, {"lr_min_ratio": 1.0}),
])
def test_boundary_values_are_accepted(cls, kwargs):
    cfg = cls(**kwargs)
    assert all(getattr(cfg, k) == v for k, v in kwargs.items())


NON_DEFAULT = [
    QuantizerConfig(codebook_size=64, code_dim=8, commitment_weight=0.5, kind="vq", ema_decay=0.9, ema_eps=1e-3,
                    kmeans_init=False, kmeans_iters=3, dead_code_steps=0),
    QuantizerConfig(codebook_size=12, code_dim=2, kind="fsq", levels=(4, 3)),
    QuantizerConfig(kind="rvq", stages=4),
    QuantizerConfig(kind="gumbel", temperature=2.0, temperature_end=0.5, kl_weight=0.1, kl_warmup=0.0),
    ModelConfig(in_channels=3, hidden=32, res_hidden=16, res_blocks=1, downsample=8, dims=1, encoder_kernel=3,
                quantizer=QuantizerConfig(codebook_size=16, kind="vq")),
    ModelConfig(model="dvae", quantizer=QuantizerConfig(kind="gumbel")),
    ModelConfig(model="vae"), ModelConfig(model="vqvae2", quantizer=QuantizerConfig(kind="rvq", stages=2)),
    PriorConfig(arch="pixelcnn", codebook_size=16, grid=(32,), num_classes=10, n_layer=2, n_head=1, n_embd=8,
                dropout=0.1, dilated=False),
    PriorConfig(grid=(4, 6), dilated=True),
    TrainConfig(data="digits", steps=5, max_seconds=1.5, batch_size=4, lr=1e-3, lr_min_ratio=0.5, warmup_steps=2,
                seed=3, log_every=2, checkpoint_every=3, device="cpu"),
]


@pytest.mark.parametrize("cfg", [cls() for cls in CONFIGS] + NON_DEFAULT, ids=lambda c: type(c).__name__)
def test_round_trip_through_json(cfg, tmp_path):
    data = to_dict(cfg)
    assert isinstance(data, dict) and json.loads(json.dumps(data)) == data  # plain JSON values only
    assert from_dict(type(cfg), data) == cfg
    write_json(tmp_path / "config.json", data)
    assert from_dict(type(cfg), json.loads((tmp_path / "config.json").read_text())) == cfg
    assert not list(tmp_path.glob("*.tmp"))


def test_numpy_sizes_become_plain_ints():
    cfg = PriorConfig(grid=tuple(np.zeros((2, 7, 5)).shape[1:]), codebook_size=np.int64(64), n_embd=np.int32(16))
    assert type(cfg.codebook_size) is int and type(cfg.n_embd) is int and all(type(g) is int for g in cfg.grid)
    assert json.loads(json.dumps(to_dict(cfg)))["codebook_size"] == 64


@pytest.mark.parametrize("cls", CONFIGS)
def test_unknown_keys_are_refused_and_named(cls):
    data = {**to_dict(cls()), "colour": "blue"}
    with pytest.raises(ConfigError, match=re.escape(f"unknown {cls.__name__} field(s) ['colour']; allowed: ")):
        from_dict(cls, data)


def test_unknown_key_in_the_nested_quantizer_is_refused():
    data = to_dict(ModelConfig())
    data["quantizer"]["beta"] = 0.25
    with pytest.raises(ConfigError, match=re.escape("unknown QuantizerConfig field(s) ['beta']")):
        from_dict(ModelConfig, data)


def test_not_an_object_and_wrong_types_are_config_errors():
    with pytest.raises(ConfigError, match="PriorConfig must be a JSON object, got list"):
        from_dict(PriorConfig, [1, 2])
    with pytest.raises(ConfigError, match="codebook_size must be an integer, got '512'"):
        from_dict(QuantizerConfig, {"codebook_size": "512"})
    with pytest.raises(ConfigError, match="QuantizerConfig must be a JSON object, got int"):
        from_dict(ModelConfig, {"quantizer": 3})


# What a hand-edited or hostile config.json can hold: wrong types and absurd sizes are ConfigErrors with the
# field's name, before any layer is built (hidden 1.5 used to fail inside a convolution, hidden 10^9 in an
# allocation).
WRONG = [
    (ModelConfig, "hidden", 1.5, "an integer"), (ModelConfig, "hidden", True, "an integer"),
    (ModelConfig, "hidden", "64", "an integer"), (ModelConfig, "hidden", 10**9, "at most 2048"),
    (ModelConfig, "res_hidden", 4096, "at most 2048"), (ModelConfig, "in_channels", 10**6, "at most 2048"),
    (ModelConfig, "res_blocks", 1000, "at most 32"), (ModelConfig, "downsample", 2**20, "at most 256"),
    (ModelConfig, "dims", 2.0, "an integer"), (ModelConfig, "encoder_kernel", None, "an integer"),
    (QuantizerConfig, "code_dim", 10**6, "at most 2048"), (QuantizerConfig, "codebook_size", 16.0, "an integer"),
    (QuantizerConfig, "commitment_weight", "0.25", "a finite number"),
    (QuantizerConfig, "commitment_weight", float("nan"), "a finite number"),
    (QuantizerConfig, "kmeans_init", 1, "true or false"), (QuantizerConfig, "dead_code_steps", 5.5, "an integer"),
    (QuantizerConfig, "stages", 2.5, "an integer"), (QuantizerConfig, "stages", 10**6, "in 1..64"),
    (QuantizerConfig, "temperature", "1", "a finite number"),
    (QuantizerConfig, "kl_weight", float("inf"), "a finite number"),
    (QuantizerConfig, "levels", [8, 10**6], "a list of integers >= 2, e.g. [8, 5, 5, 5]"),
    (ModelConfig, "model", 3, "'vqvae', 'ae', 'vae', 'dvae' or 'vqvae2'"),
    (PriorConfig, "n_layer", 10**6, "at most 64"), (PriorConfig, "n_embd", 2**20, "at most 4096"),
    (PriorConfig, "grid", (10**6, 7), "sizes of at most 4096"), (PriorConfig, "num_classes", 10**9, "at most 65536"),
    (PriorConfig, "codebook_size", 2**20, "at most 65536"),
    (TrainConfig, "steps", 1.5, "an integer"), (TrainConfig, "batch_size", 10**9, "at most 65536"),
    (TrainConfig, "lr", float("inf"), "a finite number"), (TrainConfig, "device", 0, "a string"),
    (TrainConfig, "data", ["mnist"], "a string"), (TrainConfig, "seed", "0", "an integer"),
]


@pytest.mark.parametrize("cls,key,value,allowed", WRONG, ids=[f"{c.__name__}-{k}-{v!r}" for c, k, v, _ in WRONG])
def test_wrong_types_and_absurd_sizes_are_refused_by_name(cls, key, value, allowed):
    data = to_dict(cls())
    data[key] = list(value) if isinstance(value, tuple) else value
    with pytest.raises(ConfigError) as error:
        from_dict(cls, data)
    assert str(error.value) == f"{key} must be {allowed}, got {value!r}"


def test_numbers_of_the_other_kind_are_converted_not_refused():
    cfg = from_dict(TrainConfig, {"lr": 1, "max_seconds": 0, "steps": np.int64(5)})
    assert type(cfg.lr) is float and type(cfg.max_seconds) is float and type(cfg.steps) is int
    assert to_dict(cfg)["lr"] == 1.0


def test_write_json_leaves_no_temp_file_and_the_usual_permissions(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_missing_fields_take_their_defaults():
    assert from_dict(QuantizerConfig, {}) == QuantizerConfig()
    assert from_dict(ModelConfig, {"hidden": 8}) == ModelConfig(hidden=8)
    assert from_dict(TrainConfig, {"steps": 3}) == TrainConfig(steps=3)


@pytest.mark.parametrize("kwargs,message", [
    (dict(kind="fsq", levels=(8, 5, 5, 5), code_dim=16, codebook_size=1000),
     "code_dim must be len(levels) = 4 for kind 'fsq', got 16"),
    (dict(kind="fsq", levels=(8, 5, 5, 5), code_dim=4, codebook_size=512),
     "codebook_size must be prod(levels) = 1000 for kind 'fsq', got 512"),
])
def test_fsq_sizes_must_follow_the_levels(kwargs, message):
    with pytest.raises(ConfigError) as error:
        QuantizerConfig(**kwargs)
    assert str(error.value) == message
    cfg = QuantizerConfig(kind="fsq", levels=[8, 5, 5, 5], code_dim=4, codebook_size=1000)
    assert cfg.levels == (8, 5, 5, 5)  # a JSON list comes back as a tuple
    assert from_dict(QuantizerConfig, to_dict(cfg)) == cfg
    QuantizerConfig(levels=(2, 2), code_dim=16)  # other kinds do not use the levels


@pytest.mark.parametrize("model,kind,message", [
    ("dvae", "ema", "quantizer kind must be 'gumbel' for model 'dvae', got 'ema'"),
    ("vqvae", "gumbel", "quantizer kind must be 'vq', 'ema', 'fsq' or 'rvq' for model 'vqvae' ('gumbel' is model "
                        "'dvae'), got 'gumbel'"),
    ("vqvae2", "gumbel", "quantizer kind must be 'vq', 'ema', 'fsq' or 'rvq' for model 'vqvae2' ('gumbel' is "
                         "model 'dvae'), got 'gumbel'"),
])
def test_the_model_and_its_quantizer_kind_must_agree(model, kind, message):
    with pytest.raises(ConfigError) as error:
        ModelConfig(model=model, quantizer=QuantizerConfig(kind=kind))
    assert str(error.value) == message
    ModelConfig(model="dvae", quantizer=QuantizerConfig(kind="gumbel"))
    for model in ("ae", "vae"):  # the continuous models use only code_dim
        ModelConfig(model=model, quantizer=QuantizerConfig(kind="rvq"))


def test_a_model_config_without_the_family_fields_is_the_vqvae_it_was():
    old = {"in_channels": 1, "hidden": 8, "res_hidden": 4, "res_blocks": 1, "downsample": 4, "dims": 2,
           "encoder_kernel": 1, "quantizer": {"codebook_size": 16, "code_dim": 4, "commitment_weight": 0.25,
                                              "kind": "vq", "ema_decay": 0.99, "ema_eps": 1e-05,
                                              "kmeans_init": True, "kmeans_iters": 10, "dead_code_steps": 0}}
    cfg = from_dict(ModelConfig, old)
    assert cfg.model == "vqvae" and cfg.quantizer.kind == "vq" and cfg.quantizer.stages == 1
    assert {k: v for k, v in to_dict(cfg).items() if k in old and k != "quantizer"} == \
        {k: v for k, v in old.items() if k != "quantizer"}


def test_prior_config_without_dilated_is_an_old_file_and_loads_undilated():
    """Priors saved before `dilated` existed were undilated PixelCNNs: their config must rebuild that."""
    old = {"arch": "pixelcnn", "codebook_size": 512, "grid": [7, 7], "num_classes": 10, "n_layer": 4,
           "n_head": 4, "n_embd": 64, "dropout": 0.0}
    assert from_dict(PriorConfig, old).dilated is False
    assert from_dict(PriorConfig, {**old, "dilated": True}).dilated is True
    assert PriorConfig().dilated is True  # a prior made now is dilated
    assert from_dict(PriorConfig, old).grid == (7, 7)  # JSON lists come back as tuples


@pytest.mark.parametrize("kwargs,needle", [
    ({"levels": ((4, 4), (7, 0))}, "levels must be grids of 1 or 2 positive integer sizes"),
    ({"levels": 4}, "levels must be grids of 1 or 2 positive integer sizes"),
    ({"levels": ((65,),)}, "levels must be two or more grids"),
    ({"levels": ((4, 4), (7, 7)), "arch": "pixelcnn"}, "levels must be two or more grids, for a transformer"),
    ({"levels": ((4, 4), (7, 7)), "grid": (7, 7)}, r"grid must be \[65\]: the positions of all levels"),
])
def test_prior_levels_are_checked(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        PriorConfig(**{"grid": (65,), **kwargs})
    cfg = PriorConfig(grid=(65,), levels=[[4, 4], [7, 7]])  # JSON lists become tuples, and round-trip
    assert cfg.levels == ((4, 4), (7, 7)) and from_dict(PriorConfig, to_dict(cfg)) == cfg
    saved_before = {k: v for k, v in to_dict(PriorConfig()).items() if k != "levels"}  # a config.json from before
    assert from_dict(PriorConfig, saved_before).levels == ()
