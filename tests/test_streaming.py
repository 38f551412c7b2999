"""Tests for vqvae.streaming: folder:/shards: datasets checked, split by name, cropped and read in batches
that follow the trainer's generator; shards written from a folder give back the same images."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqvae import PRESETS, ModelConfig, QuantizerConfig, write_shards
from vqvae.cli import main
from vqvae.data import load_dataset
from vqvae.devices import batch_share
from vqvae.errors import DataError
from vqvae.streaming import (BatchReader, RankRows, decode, draw_batch, held_out, list_folder, open_stream,
                             shard_paths)

TINY = ["--hidden", "8", "--res-hidden", "4", "--res-blocks", "1", "--codebook-size", "16", "--code-dim", "4",
        "--batch-size", "4", "--log-every", "5", "--workers", "0"]


def _mixed_folder(root: Path, count: int = 24, seed: int = 0) -> list[Path]:
    """`count` PNG/JPEG images of sizes 12..40 px in three sub-folders, gray, RGB, RGBA and palette."""
    rng = np.random.default_rng(seed)
    files = []
    for i in range(count):
        folder = root / ["", "a", "a/b"][i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(12, 41, 2)
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        kind = i % 4
        image = [Image.fromarray(rgb[..., 0]), Image.fromarray(rgb), Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
                 Image.fromarray(rgb[..., 0]).convert("P")][kind]
        path = folder / f"img{i:03d}.{'jpg' if kind == 1 else 'png'}"
        image.save(path)
        files.append(path)
    return files


def _broken(root: Path) -> Path:
    """A PNG cut in the middle, in a sub-folder."""
    path = root / "a" / "cut.png"
    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 20), 7, np.uint8)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue()[:60])
    return path


def _key_hash_held_out(key: str) -> bool:  # the split rule, written out independently
    return int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) % 10 == 0  # the digest's first 8 bytes


# ----------------------------------------------------------------------------------- listing and split


def test_walks_sub_folders_and_splits_by_name_not_order(tmp_path):
    files = _mixed_folder(tmp_path, 60)
    (tmp_path / ".hidden.png").write_bytes(b"skipped: hidden")
    stream = open_stream(f"folder:{tmp_path}", image_size=16)
    source = stream.source
    assert sorted(source.files) == sorted(map(str, files))
    expected_test = {f.relative_to(tmp_path).with_suffix("").as_posix() for f in files
                     if _key_hash_held_out(f.relative_to(tmp_path).with_suffix("").as_posix())}
    assert {source.keys[i] for i in stream.test} == expected_test and 0 < len(expected_test) < 60
    assert set(stream.train).isdisjoint(stream.test) and len(stream.train) + len(stream.test) == 60
    # more files, and one renamed: every other image stays in its split
    _mixed_folder(tmp_path / "z", 30, seed=1)
    files[0].rename(tmp_path / "renamed.png")
    grown = open_stream(f"folder:{tmp_path}", image_size=16)
    before = {source.keys[i]: i in stream.test for i in stream.train + stream.test}
    after = {grown.source.keys[i]: i in grown.test for i in grown.train + grown.test}
    assert all(after[k] == held for k, held in before.items() if k in after) and len(after) == 90


def test_keys_of_dotted_names_and_few_images(tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / "a.v2.png")
    source = list_folder(tmp_path)
    assert source.keys == ["a_v2"]
    stream = open_stream(f"folder:{tmp_path}")
    assert stream.train == stream.test == [0]  # fewer than 10 images: nothing to hold out


# ----------------------------------------------------------------------------------- broken files


def test_broken_file_is_named_before_training_or_skipped(tmp_path, capsys):
    files = _mixed_folder(tmp_path, 24)
    cut = _broken(tmp_path)
    with pytest.raises(DataError) as e:
        open_stream(f"folder:{tmp_path}", image_size=16)
    assert str(cut) in str(e.value) and "\n" not in str(e.value) and "--skip-bad-files" in str(e.value)
    warnings = []
    stream = open_stream(f"folder:{tmp_path}", image_size=16, skip_bad_files=True, warn=warnings.append)
    assert len(warnings) == 1 and str(cut) in warnings[0]
    used = {stream.source.files[i] for i in stream.train + stream.test}
    assert used == set(map(str, files)) and len(used) == 24  # every other file, none lost


def test_cli_exit_2_naming_the_broken_file_then_skips_it(tmp_path, capsys):
    _mixed_folder(tmp_path / "data", 12)
    cut = _broken(tmp_path / "data")
    args = ["train", "--data", f"folder:{tmp_path / 'data'}", "--out", str(tmp_path / "run"), "--image-size", "16",
            "--steps", "3", *TINY]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert str(cut) in err and err.count("\n") == 0 and not (tmp_path / "run" / "config.json").exists()
    assert main(args + ["--skip-bad-files", "--json"]) == 0
    captured = capsys.readouterr()
    assert "warning" in captured.err and str(cut) in captured.err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["image_size"] == 16 and config["train"]["skip_bad_files"] is True
    assert config["data"]["image_size"] == [16, 16] and config["data"]["channels"] == 3
    assert json.loads(captured.out.strip().splitlines()[-1])["images"] >= 1


def test_cut_jpeg_is_broken(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (tmp_path / "ok.jpg").write_bytes(buffer.getvalue())
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(DataError, match="cut.jpg"):
        open_stream(f"folder:{tmp_path}")


# ----------------------------------------------------------------------------------- decoding and crops


def test_crops_are_windows_of_the_image_and_the_centre_is_exact(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (30, 41, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG")
    data = buffer.getvalue()
    for fy, fx in [(0.0, 0.0), (0.5, 0.25), (0.999, 0.999)]:
        top, left = int(fy * (30 - 16 + 1)), int(fx * (41 - 16 + 1))
        assert np.array_equal(decode(data, "x", 3, 16, (fy, fx)), rgb[top:top + 16, left:left + 16].transpose(2, 0, 1))
    assert np.array_equal(decode(data, "x", 3, 16, None), rgb[7:23, 12:28].transpose(2, 0, 1))
    assert np.array_equal(decode(data, "x", 3, 0, None), rgb.transpose(2, 0, 1))
    # smaller than S: the shorter side resized to S, then cropped
    assert decode(data, "x", 3, 64, None).shape == (3, 64, 64)
    reference = np.asarray(Image.fromarray(rgb).resize((87, 64), Image.Resampling.BICUBIC))[:, 11:75]
    assert np.array_equal(decode(data, "x", 3, 64, None), reference.transpose(2, 0, 1))


def test_modes_become_the_datasets_channels(tmp_path):
    gray = np.arange(100, dtype=np.uint8).reshape(10, 10)
    Image.fromarray(gray).save(tmp_path / "g.png")
    Image.fromarray((gray.astype(np.uint16) * 257)).save(tmp_path / "h.png")  # 16-bit
    stream = open_stream(f"folder:{tmp_path}")
    assert stream.channels == 1
    x = stream.load([0, 1])
    assert torch.equal(x[0, 0], torch.tensor(gray / 255.0, dtype=torch.float32)) and torch.equal(x[0], x[1])
    Image.fromarray(np.dstack([gray, gray, gray, gray])).save(tmp_path / "r.png")  # RGBA: the alpha dropped
    stream = open_stream(f"folder:{tmp_path}")
    assert stream.channels == 3
    x = stream.load([0, 1, 2])
    assert torch.equal(x[0], x[2]) and torch.equal(x[0][0], x[0][2])


# ----------------------------------------------------------------------------------- batches


def _reader(tmp_path, batch, workers, seed):
    """(stream, generator, BatchReader) over 30 mixed images cropped to 12x12."""
    _mixed_folder(tmp_path, 30)
    stream = open_stream(f"folder:{tmp_path}", image_size=12)
    return stream, torch.Generator().manual_seed(seed), BatchReader(stream, batch, torch.device("cpu"), workers=workers)


def test_batches_follow_the_generator_with_and_without_workers(tmp_path):
    stream, gen, reader = _reader(tmp_path, 6, workers=2, seed=3)
    batches = [reader(gen) for _ in range(4)]
    # an independent reference: the same draws, each image decoded on its own
    ref_gen = torch.Generator().manual_seed(3)
    for batch in batches:
        positions, offsets = draw_batch(ref_gen, len(stream.train), 6)
        for row, (p, (fy, fx)) in enumerate(zip(positions.tolist(), offsets.tolist())):
            i = stream.train[p]
            image = decode(stream.source.read(i), "", 3, 12, (fy, fx))
            assert torch.equal(batch[row], torch.from_numpy(image).float() / 255)
    assert torch.equal(gen.get_state(), ref_gen.get_state())
    reader.close()


def test_resume_from_a_saved_generator_state_continues_the_sequence(tmp_path):
    stream, gen, reader = _reader(tmp_path, 4, workers=1, seed=0)
    first = [reader(gen) for _ in range(2)]
    saved = gen.get_state()
    rest = [reader(gen) for _ in range(3)]
    gen.set_state(saved)  # the same reader, sent back (its workers had run ahead)
    assert all(torch.equal(reader(gen), b) for b in rest)
    fresh, resumed = BatchReader(stream, 4, torch.device("cpu"), workers=0), torch.Generator()
    resumed.set_state(saved)  # a new process resuming from the checkpoint's state
    assert all(torch.equal(fresh(resumed), b) for b in rest)
    assert not torch.equal(first[0], rest[0])
    reader.close()


def test_each_rank_decodes_only_its_rows(tmp_path):
    _mixed_folder(tmp_path, 20)
    stream = open_stream(f"folder:{tmp_path}", image_size=12)
    whole = BatchReader(stream, 6, torch.device("cpu"), workers=0)(torch.Generator().manual_seed(1))
    parts = []
    for rank in range(3):
        share = BatchReader(stream, 6, torch.device("cpu"), rank, 3, workers=0)(torch.Generator().manual_seed(1))
        assert isinstance(share, RankRows) and share.shape == whole.shape
        parts.append(batch_share(share, rank, 3))
        with pytest.raises(IndexError):
            share[0:2] if rank else share[2:4]
    assert torch.equal(torch.cat(parts), whole)


# ----------------------------------------------------------------------------------- shards


def test_shards_round_trip_same_bytes_images_and_split(tmp_path):
    files = _mixed_folder(tmp_path / "data", 25)
    paths = write_shards(tmp_path / "data", tmp_path / "shards", per_shard=10)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    members = {}
    for path in paths:
        with tarfile.open(path) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar})
    assert {n: b for n, b in members.items()} == \
        {f.relative_to(tmp_path / "data").as_posix(): f.read_bytes() for f in files}
    folder = load_dataset(f"folder:{tmp_path / 'data'}", image_size=16)
    for uri in (f"shards:{tmp_path / 'shards'}", f"shards:{tmp_path}/shards/shard-*.tar",
                f"shards:{tmp_path}/shards/shard-{{000000..000002}}.tar"):
        shards = load_dataset(uri, image_size=16)
        assert shards.stream.source.keys == folder.stream.source.keys
        assert shards.stream.test == folder.stream.test
        assert torch.equal(shards.test, folder.test) and torch.equal(shards.train, folder.train)
    gens = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = BatchReader(folder.stream, 4, torch.device("cpu"), workers=0)(gens[0])
    b = BatchReader(load_dataset(f"shards:{tmp_path / 'shards'}", image_size=16).stream, 4, torch.device("cpu"),
                    workers=0)(gens[1])
    assert torch.equal(a, b)
    # written again: the same bytes (no time stamps)
    again = write_shards(tmp_path / "data", tmp_path / "again", per_shard=10)
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(paths, again))


def test_shards_with_class_labels_and_bad_shards(tmp_path):
    rng = np.random.default_rng(0)
    with tarfile.open(tmp_path / "s-000000.tar", "w") as tar:
        for i in range(12):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(buffer, "PNG")
            for name, data in ((f"k{i:02d}.png", buffer.getvalue()), (f"k{i:02d}.cls", str(i % 3).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    ds = load_dataset(f"shards:{tmp_path / 's-000000.tar'}")
    assert ds.num_classes == 3 and ds.channels == 1 and ds.image_size == (8, 8)
    keys = ds.stream.source.keys
    assert ds.test_labels.tolist() == [int(keys[i][1:]) % 3 for i in ds.stream.test]
    with tarfile.open(tmp_path / "z.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "s-000000.tar", "x.png")
    with pytest.raises(DataError, match="z.tar.gz") as e:
        load_dataset(f"shards:{tmp_path / 'z.tar.gz'}")
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="no .tar shards"):
        shard_paths(str(tmp_path / "missing-*.tar"))


def test_cli_shards_command(tmp_path, capsys):
    _mixed_folder(tmp_path / "data", 5)
    assert main(["shards", str(tmp_path / "data"), "-o", str(tmp_path / "out"), "--per-shard", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"shard-00000{i}.tar" for i in range(3)]
    _broken(tmp_path / "data")
    assert main(["shards", str(tmp_path / "data"), "-o", str(tmp_path / "out2")]) == 2
    assert "cut.png" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- the imagenet128 preset


def test_imagenet128_preset_is_the_papers_model():
    from vqvae import VQVAE

    p = PRESETS["imagenet128"]
    cfg = ModelConfig(in_channels=3, hidden=p["hidden"], res_hidden=p["res_hidden"], res_blocks=p["res_blocks"],
                      downsample=p["downsample"], encoder_kernel=p["encoder_kernel"],
                      quantizer=QuantizerConfig(codebook_size=p["codebook_size"], code_dim=p["code_dim"]))
    model = VQVAE(cfg).eval()
    convs = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.stride) for c in convs[:2]] == [((4, 4), (2, 2))] * 2
    assert all(c.stride == (1, 1) for c in convs[2:]) and convs[1].out_channels == 256
    with torch.no_grad():
        codes = model.encode(torch.rand(1, 3, 128, 128)).codes
    assert codes.shape == (1, 32, 32) and p["codebook_size"] == 512 and p["code_dim"] == 64


def test_preset_fills_the_options_not_given(tmp_path, capsys):
    _mixed_folder(tmp_path / "data", 4)
    args = ["train", "--preset", "imagenet128", "--data", f"folder:{tmp_path / 'data'}", "--out",
            str(tmp_path / "run"), "--steps", "1", "--image-size", "16", "--hidden", "8", "--res-hidden", "4",
            "--codebook-size", "8", "--code-dim", "4", "--batch-size", "2", "--workers", "0"]
    assert main(args) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["image_size"] == 16 and config["model"]["hidden"] == 8  # given: they win
    assert config["model"]["encoder_kernel"] == 3 and config["model"]["res_blocks"] == 2  # from the preset
    assert main(["train", "--preset", "nope", "--out", str(tmp_path / "r2")]) == 2
    assert "imagenet128" in capsys.readouterr().err


def test_held_out_rule_matches_the_written_out_one():
    keys = [f"dir/{i}" for i in range(200)]
    assert [held_out(k) for k in keys] == [_key_hash_held_out(k) for k in keys]


def test_training_resumed_after_a_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    from rich.console import Console

    from vqvae import Run, TrainConfig, train_autoencoder
    from vqvae import streaming

    _mixed_folder(tmp_path / "data", 20)
    model = ModelConfig(hidden=8, res_hidden=4, res_blocks=1, downsample=2,
                        quantizer=QuantizerConfig(codebook_size=8, code_dim=4, dead_code_steps=3))
    cfg = TrainConfig(data=f"folder:{tmp_path / 'data'}", image_size=12, steps=8, batch_size=4, checkpoint_every=4,
                      log_every=2, warmup_steps=2, workers=1)
    quiet = Console(quiet=True)
    train_autoencoder(model, cfg, tmp_path / "straight", show_progress=False, console=quiet)

    calls = {"n": 0}
    real = streaming.BatchReader.__call__

    def crash_after_the_checkpoint(self, gen):
        calls["n"] += 1
        if calls["n"] == 6:  # step 6 of 8, after the checkpoint of step 4
            raise RuntimeError("crash")
        return real(self, gen)

    monkeypatch.setattr(streaming.BatchReader, "__call__", crash_after_the_checkpoint)
    with pytest.raises(RuntimeError, match="crash"):
        train_autoencoder(model, cfg, tmp_path / "crashed", show_progress=False, console=quiet)
    monkeypatch.setattr(streaming.BatchReader, "__call__", real)
    train_autoencoder(model, cfg, tmp_path / "crashed", resume=True, show_progress=False, console=quiet)
    a, b = Run(tmp_path / "straight").model().state_dict(), Run(tmp_path / "crashed").model().state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_rows_decode_only_those_rows_and_equal_the_whole_split(tmp_path):
    _mixed_folder(tmp_path, 24)
    data = load_dataset(f"folder:{tmp_path}", image_size=16, workers=0)
    rows = data.train_rows(3, 9)
    assert data._train is None and data.num_train == len(data.stream.train)  # nothing else was decoded
    assert torch.equal(rows, data.train[3:9]) and len(rows) == 6  # .train decodes the whole split
    assert torch.equal(data.train_rows(0, 1000), data.train)  # past the end: the rows there are
