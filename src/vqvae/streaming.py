"""Image datasets streamed from disk: `folder:PATH` and `shards:PATH_OR_GLOB`, read by DataLoader workers.

Key: B global batch, n this process's rows (B / processes), C channels, S the `image_size`, H W an image.

Sources (`open_stream`):
  folder:PATH           every .png/.jpg/.jpeg file under PATH, sub-folders included (names starting with "."
                        are skipped, symbolic links to folders are not followed).
  shards:PATH_OR_GLOB   tar shards in webdataset's convention: `name-000000.tar`, ... holding `KEY.png` or
                        `KEY.jpg` (+ optional `KEY.cls`, an integer class). PATH may be one shard, a folder of
                        *.tar, a glob (`data/train-*.tar`) or a brace range (`train-{000000..000009}.tar`).
                        Shards are indexed once (tar headers only) and members are then read by offset.
                        `write_shards` makes shards from a folder.

Every image has a key: its path relative to the folder (or its member name in a shard) without the
extension, with dots in the file name turned into "_" (a shard member's key ends at its first dot). The
held-out split is fixed by the key alone: an image is held out when the first 8 bytes of sha256(key),
read as a big-endian integer, are 0 mod 10 (about 10%), so adding files, renaming others or listing them
in another order never moves an image between splits, and a folder and the shards written from it split
alike. With fewer than 10 images, or when one split
would be empty, the held-out split is the training images themselves.

Before training, every file is checked (`scan`): its header (format, size, pixel count against
`max_pixels`), PNG chunk checksums, and a JPEG decoded at 1/8 scale (which a cut file fails). A broken file
is a one-line `DataError` naming it, or with `skip_bad_files` a warning naming it, and the others are used.

Channels: 1 when every image is grayscale, else 3 (gray images repeated, RGBA without its alpha, palette
images expanded). Sizes: with `image_size` S, training images are random S x S crops and held-out images the
centre S x S crop, both at the file's own resolution; an image whose shorter side is below S is first
resized (bicubic) so that its shorter side is S. Without `image_size`, every image must have one size.

Batches (`BatchReader`): each call draws the global batch's image indices and crop offsets from the
trainer's generator, so the order of images is a function of the generator's state alone and `--resume`
continues the same sequence. Each process decodes only its own rows of the global batch, in `workers`
DataLoader worker processes (0: in the training process) that run a few batches ahead.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import re
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .config import write_atomically
from .data import IMAGE_SUFFIXES, MAX_PIXELS, Dataset, from_uint8
from .errors import DataError

HELD_OUT_MODULUS = 10  # held out: sha256(key)[:8] as an integer % 10 == 0
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
SHARD_IMAGE_EXTS = ("png", "jpg", "jpeg")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def held_out(key: str) -> bool:
    """Whether the image with this key is held out: the first 8 bytes of its SHA-256, big-endian, mod 10 == 0."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % HELD_OUT_MODULUS == 0


def folder_key(relative: str) -> str:
    """The key of a file at POSIX path `relative` inside a folder: no extension, dots of the name -> "_"."""
    head, _, name = relative.rpartition("/")
    stem = name.rsplit(".", 1)[0].replace(".", "_")
    return f"{head}/{stem}" if head else stem


# -- sources: where each image's bytes are --------------------------------------------------------------
@dataclass
class Source:
    """Images of a folder or of tar shards, in listing order.

    `keys[i]` names image i (see the module docstring); `files[i]` is its file (folder) or its shard with
    `spans[i]` = (offset, size) of the member's bytes; `labels` are the shards' .cls integers or None.
    """

    uri: str
    keys: list[str]
    files: list[str]
    spans: list[tuple[int, int]] | None = None
    labels: list[int] | None = None

    def read(self, i: int) -> bytes:
        if self.spans is None:
            with open(self.files[i], "rb") as f:
                return f.read()
        offset, size = self.spans[i]
        with open(self.files[i], "rb") as f:
            f.seek(offset)
            return f.read(size)

    def name(self, i: int) -> str:
        """Image i as a user finds it: its file, or `shard.tar:member`."""
        return self.files[i] if self.spans is None else f"{self.files[i]}:{self.keys[i]}"


def list_folder(path: Path) -> Source:
    """Every PNG/JPEG file under `path` (sub-folders included, hidden names skipped), sorted by path."""
    if not path.is_dir():
        raise DataError(f"folder:{path}: no such directory")
    keys, files = [], []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            file = os.path.join(root, name)
            keys.append(folder_key(Path(os.path.relpath(file, path)).as_posix()))
            files.append(file)
    if not files:
        raise DataError(f"folder:{path}: no .png/.jpg/.jpeg images in this directory or its sub-folders")
    return Source(f"folder:{path}", keys, files)


def shard_paths(pattern: str) -> list[str]:
    """The shard files a `shards:` URI names: a file, a folder of *.tar, a glob or a {000..009} range."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        found = sorted(str(p) for p in path.glob("*.tar"))
    elif path.is_file():
        found = [str(path)]
    else:
        found = []
        for expanded in _brace_range(str(path)):
            found += sorted(glob.glob(expanded)) if glob.has_magic(expanded) else \
                [expanded] if os.path.isfile(expanded) else []
    if not found:
        raise DataError(f"shards:{pattern}: no .tar shards found (expected a shard, a folder of *.tar, a glob "
                        "or name-{000000..000009}.tar)")
    return found


def _brace_range(pattern: str) -> list[str]:
    """webdataset's brace notation: "a-{000..002}.tar" -> a-000.tar, a-001.tar, a-002.tar."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not match:
        return [pattern]
    first, last = match.group(1), match.group(2)
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [p for i in range(int(first), int(last) + 1) for p in _brace_range(f"{head}{i:0{len(first)}d}{tail}")]


def list_shards(pattern: str) -> Source:
    """Every image member of the shards `pattern` names, in shard and member order, with .cls labels."""
    keys, files, spans, classes = [], [], [], {}
    for shard in shard_paths(pattern):
        try:
            with tarfile.open(shard, "r:") as tar:  # "r:": uncompressed only, so members can be read by offset
                for member in tar:
                    if not member.isfile():
                        continue
                    head, _, base = member.name.rpartition("/")
                    stem, _, ext = base.partition(".")
                    key = f"{head}/{stem}" if head else stem
                    if ext.lower() in SHARD_IMAGE_EXTS:
                        keys.append(key)
                        files.append(shard)
                        spans.append((member.offset_data, member.size))
                    elif ext.lower() == "cls":
                        text = tar.extractfile(member).read(64).strip()
                        if not re.fullmatch(rb"\d{1,9}", text):
                            raise DataError(f"{shard}:{member.name}: expected a class number, got {text[:20]!r}")
                        classes[(shard, key)] = int(text)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{shard}: not a readable uncompressed tar shard ({e})") from None
    if not keys:
        raise DataError(f"shards:{pattern}: no .png/.jpg members in the shards")
    labels = None
    if classes:
        missing = [k for f, k in zip(files, keys) if (f, k) not in classes]
        if missing:
            raise DataError(f"shards:{pattern}: {missing[0]} has no .cls label while other images have one")
        labels = [classes[(f, k)] for f, k in zip(files, keys)]
    return Source(f"shards:{pattern}", keys, files, spans, labels)


# -- checking and decoding one image --------------------------------------------------------------------
def inspect(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> tuple[int, int, int]:
    """(height, width, channels 1 or 3) of an encoded image, after the cheap checks of `scan`; a broken
    image is a one-line `DataError` naming `name`."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise DataError(f"{name}: {width}x{height} is {width * height:,} pixels, more than the limit of "
                                f"{max_pixels:,}")
            channels = 1 if img.mode in GRAY_MODES else 3
            if img.format == "JPEG":  # decoding at 1/8 scale reads every byte: a cut file fails
                img.draft("L" if channels == 1 else "RGB", (max(width // 8, 1), max(height // 8, 1)))
                img.load()
            else:
                img.verify()  # PNG: every chunk's checksum, up to IEND
    except DataError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise DataError(f"{name}: not a readable image ({_first_line(e)})") from None
    return height, width, channels


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0][:160] if str(e).strip() else type(e).__name__


def decode(data: bytes, name: str, channels: int, size: int, offsets: tuple[float, float] | None,
           max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An encoded image as uint8 (C, S, S) with `size` S (or (C, H, W) as it is when `size` is 0).

    `offsets` (fractions in [0, 1)) place a training crop; None takes the centre crop. An image whose
    shorter side is below S is first resized so that it is S. A broken image is a `DataError` naming `name`.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise DataError(f"{name}: {width * height:,} pixels, more than the limit of {max_pixels:,}")
            if size and min(width, height) < size:
                scale = size / min(width, height)
                width, height = max(size, round(width * scale)), max(size, round(height * scale))
                img = img.resize((width, height), Image.Resampling.BICUBIC)
            if size:
                fy, fx = offsets if offsets is not None else (None, None)
                top = (height - size) // 2 if fy is None else min(int(fy * (height - size + 1)), height - size)
                left = (width - size) // 2 if fx is None else min(int(fx * (width - size + 1)), width - size)
                img = img.crop((left, top, left + size, top + size))
            arr = _to_uint8(img, channels)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{name}: not a readable image ({_first_line(e)})") from None
    return np.ascontiguousarray(arr.transpose(2, 0, 1))  # (C, S, S)


def _to_uint8(img: Image.Image, channels: int) -> np.ndarray:
    """A PIL image as uint8 (H, W, channels): 16-bit gray scaled to 8 bits, alpha dropped, gray repeated."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        gray = np.asarray(img, dtype=np.float64) / 65535.0 * 255.0
        arr = np.clip(np.round(gray), 0, 255).astype(np.uint8)[..., None]
        return arr if channels == 1 else np.repeat(arr, 3, axis=2)
    if channels == 1:
        return np.asarray(img.convert("L"), dtype=np.uint8)[..., None]
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


# -- the dataset -------------------------------------------------------------------------------------------
@dataclass
class Stream:
    """A checked source split into `train` and `test` image indices, with the channels and size it yields."""

    source: Source
    train: list[int]
    test: list[int]
    channels: int
    size: tuple[int, int]  # (S, S) with an image_size, else every image's own (H, W)
    crop: int  # image_size S, 0 when images are used whole
    max_pixels: int = MAX_PIXELS

    def load(self, indices: list[int], workers: int = 4) -> torch.Tensor:
        """Images `indices` as float32 (N, C, H, W) in [0, 1], centre crops (deterministic)."""
        def one(i: int) -> np.ndarray:
            return decode(self.source.read(i), self.source.name(i), self.channels, self.crop, None, self.max_pixels)

        with ThreadPoolExecutor(max(workers, 1)) as pool:
            arrays = list(pool.map(one, indices))
        return from_uint8(torch.from_numpy(np.stack(arrays)))

    @property
    def labels(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.source.labels is None:
            return None, None
        return tuple(torch.tensor([self.source.labels[i] for i in part], dtype=torch.int64)
                     for part in (self.train, self.test))


def scan(source: Source, skip_bad_files: bool = False, max_pixels: int = MAX_PIXELS, workers: int = 4,
         warn: Callable[[str], None] = _warn) -> tuple[list[int], list[tuple[int, int, int]]]:
    """Check every image of `source` (`inspect`); returns the usable indices and their (H, W, C).

    A broken image is a `DataError` naming it (and how many others are broken), or with `skip_bad_files`
    a warning naming it; with nothing left, a `DataError`.
    """
    def check(i: int):
        try:
            return inspect(source.read(i), source.name(i), max_pixels)
        except OSError as e:
            return DataError(f"{source.name(i)}: cannot be read ({e.strerror or _first_line(e)})")
        except DataError as e:
            return e

    with ThreadPoolExecutor(max(workers, 1)) as pool:
        results = list(pool.map(check, range(len(source.keys))))
    bad = [r for r in results if isinstance(r, DataError)]
    if bad and not skip_bad_files:
        more = f" (and {len(bad) - 1} more broken file(s))" if len(bad) > 1 else ""
        raise DataError(f"{bad[0]}{more}; pass --skip-bad-files to train on the others")
    for error in bad:
        warn(f"skipped {error}")
    good = [i for i, r in enumerate(results) if not isinstance(r, DataError)]
    if not good:
        raise DataError(f"{source.uri}: every image is broken")
    return good, [results[i] for i in good]


def open_stream(uri: str, image_size: int = 0, skip_bad_files: bool = False, max_pixels: int = MAX_PIXELS,
                workers: int = 4, warn: Callable[[str], None] = _warn) -> Stream:
    """List, check and split the images of a `folder:` or `shards:` URI (see the module docstring)."""
    if uri.startswith("folder:"):
        source = list_folder(Path(uri[len("folder:"):]).expanduser())
    elif uri.startswith("shards:"):
        source = list_shards(uri[len("shards:"):])
    else:
        raise DataError(f"{uri!r}: expected folder:PATH or shards:PATH_OR_GLOB")
    if image_size < 0:
        raise DataError(f"{uri}: image_size must be >= 0 (0: images used whole), got {image_size}")
    good, shapes = scan(source, skip_bad_files, max_pixels, workers, warn)
    channels = 1 if all(c == 1 for _, _, c in shapes) else 3
    if image_size:
        size = (image_size, image_size)
    else:
        sizes = {(h, w) for h, w, _ in shapes}
        if len(sizes) > 1:
            first = shapes[0][:2]
            other = next(i for i, s in zip(good, shapes) if s[:2] != first)
            raise DataError(f"{uri}: images differ in size ({source.name(good[0])} is {first[0]}x{first[1]}, "
                            f"{source.name(other)} is {shapes[good.index(other)][0]}x{shapes[good.index(other)][1]}); "
                            "pass --image-size S to train on S x S crops")
        size = sizes.pop()
    test = [i for i in good if held_out(source.keys[i])]
    train = [i for i in good if not held_out(source.keys[i])]
    if len(good) < HELD_OUT_MODULUS or not train or not test:  # too few images to hold any out
        train, test = good, good
    return Stream(source, train, test, channels, size, image_size, max_pixels)


class StreamedDataset(Dataset):
    """A `Dataset` over a `Stream`: the held-out split is decoded on creation (centre crops), the training
    split only if `.train` is read (training itself reads batches through `BatchReader`)."""

    def __init__(self, stream: Stream, workers: int = 4):
        self.stream, self._workers, self._train = stream, workers, None
        train_labels, test_labels = stream.labels
        num_classes = 0 if stream.source.labels is None else max(stream.source.labels) + 1
        super().__init__(None, stream.load(stream.test, workers), train_labels, test_labels, num_classes,
                         stream.source.uri)

    @property
    def train(self) -> torch.Tensor:
        if self._train is None:
            self._train = self.stream.load(self.stream.train, self._workers)
        return self._train

    @train.setter
    def train(self, value: torch.Tensor | None) -> None:
        self._train = value

    @property
    def channels(self) -> int:
        return self.stream.channels

    @property
    def image_size(self) -> tuple[int, int]:
        return self.stream.size

    @property
    def num_train(self) -> int:
        return len(self.stream.train)

    def train_rows(self, start: int, stop: int) -> torch.Tensor:
        if self._train is not None:
            return self._train[start:stop]
        return self.stream.load(self.stream.train[start:stop], self._workers)


# -- batches for the trainer -------------------------------------------------------------------------------
def draw_batch(gen: torch.Generator, num_train: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch's positions in the training split, int64 (B,), and crop offsets, float32 (B, 2)."""
    positions = torch.randint(num_train, (batch_size,), generator=gen)
    offsets = torch.rand(batch_size, 2, generator=gen)
    return positions, offsets


class _Plans:
    """DataLoader batch sampler: this process's rows of the batches that `draw_batch` draws from a copy of
    the trainer's generator, as lists of (position, offset_y, offset_x)."""

    def __init__(self, state: torch.Tensor, num_train: int, batch_size: int, rows: range):
        self.state, self.num_train, self.batch_size, self.rows = state, num_train, batch_size, rows

    def __iter__(self):
        gen = torch.Generator()
        gen.set_state(self.state)
        while True:
            positions, offsets = draw_batch(gen, self.num_train, self.batch_size)
            yield [(int(positions[r]), float(offsets[r, 0]), float(offsets[r, 1])) for r in self.rows]


class _Decoder(torch.utils.data.Dataset):
    """Item (position, offset_y, offset_x) -> (position, uint8 (C, S, S) or None, error message or None).
    With `skip_bad_files`, an image that fails to decode is replaced by the next one that decodes."""

    def __init__(self, stream: Stream, skip_bad_files: bool):
        self.stream, self.skip = stream, skip_bad_files

    def __len__(self) -> int:
        return len(self.stream.train)

    def __getitem__(self, item):
        position, fy, fx = item
        stream, train = self.stream, self.stream.train
        for attempt in range(len(train) if self.skip else 1):
            i = train[(position + attempt) % len(train)]
            try:
                image = decode(stream.source.read(i), stream.source.name(i), stream.channels, stream.crop,
                               (fy, fx), stream.max_pixels)
                return position, image, None
            except (DataError, OSError) as e:
                error = str(e) if isinstance(e, DataError) else f"{stream.source.name(i)}: cannot be read ({e})"
        return position, None, error


def _collate(items):
    errors = [error for _, _, error in items if error is not None]
    if errors:
        return None, None, errors[0]
    return (torch.tensor([p for p, _, _ in items]), torch.from_numpy(np.stack([im for _, im, _ in items])), None)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class RankRows:
    """A global batch of B rows of which this process holds only its own n = B / processes rows (the others
    were never decoded): slicing it at this rank's rows, as the trainer's `batch_share` does, gives them."""

    def __init__(self, rows: torch.Tensor, batch_size: int, rank: int):
        self.rows, self.batch_size, self.rank = rows, batch_size, rank
        self.shape = (batch_size, *rows.shape[1:])

    def __getitem__(self, index: slice) -> torch.Tensor:
        n = len(self.rows)
        if index != slice(self.rank * n, (self.rank + 1) * n):
            raise IndexError(f"this process holds rows {self.rank * n}..{(self.rank + 1) * n - 1} only")
        return self.rows


class BatchReader:
    """`next_batch(generator)` for the trainer over a stream's training split: float32 (B, C, S, S) on
    `device` (one process), or `RankRows` of this rank's (n, C, S, S) (several processes).

    The batch is drawn from the generator it is given (`draw_batch`); the DataLoader decodes the batches
    that follow from a copy of that generator's state, so when the state is not the one expected (a
    resumed run), the loader restarts from it. pin_memory only on CUDA.
    """

    def __init__(self, stream: Stream, batch_size: int, device: torch.device, rank: int = 0, world_size: int = 1,
                 workers: int = 2, skip_bad_files: bool = False):
        assert batch_size % world_size == 0
        n = batch_size // world_size
        self.stream, self.batch_size, self.device = stream, batch_size, torch.device(device)
        self.rank, self.world_size, self.rows = rank, world_size, range(rank * n, (rank + 1) * n)
        self.workers, self.decoder = workers, _Decoder(stream, skip_bad_files)
        self._batches, self._loader, self._expected = None, None, None

    def _start(self, state: torch.Tensor) -> None:
        self.close()
        plans = _Plans(state, len(self.stream.train), self.batch_size, self.rows)
        options = dict(num_workers=self.workers, worker_init_fn=_worker_init, prefetch_factor=2) if self.workers \
            else {}
        self._loader = torch.utils.data.DataLoader(self.decoder, batch_sampler=plans, collate_fn=_collate,
                                                   pin_memory=self.device.type == "cuda", **options)
        self._batches = iter(self._loader)

    def __call__(self, gen: torch.Generator):
        state = gen.get_state()
        if self._batches is None or not torch.equal(state, self._expected):
            self._start(state)
        positions, _ = draw_batch(gen, len(self.stream.train), self.batch_size)
        self._expected = gen.get_state()
        got, images, error = next(self._batches)
        if error is not None:
            self.close()
            raise DataError(f"{error}; pass --skip-bad-files to train on the others")
        assert torch.equal(got, positions[self.rows.start:self.rows.stop]), "loader out of step with the generator"
        x = from_uint8(images.to(self.device, non_blocking=True))  # (n, C, S, S)
        return x if self.world_size == 1 else RankRows(x, self.batch_size, self.rank)

    def close(self) -> None:
        """Stop the worker processes (they also stop when the reader is garbage-collected)."""
        self._batches, self._loader, self._expected = None, None, None


# -- writing shards ------------------------------------------------------------------------------------------
def write_shards(folder: str | Path, out_dir: str | Path, prefix: str = "shard", per_shard: int = 1000,
                 skip_bad_files: bool = False, warn: Callable[[str], None] = _warn) -> list[Path]:
    """Pack the images of `folder` (sub-folders included) into tar shards OUT_DIR/PREFIX-000000.tar, ...
    of `per_shard` images each, webdataset's layout: member KEY.EXT (the file's bytes unchanged, EXT its
    lower-case suffix), keys as `folder:` gives them, so `shards:OUT_DIR` yields the same images in the same
    order and split. Files are checked first (`scan`). Each shard is written atomically; returns their paths."""
    if per_shard < 1:
        raise DataError(f"per_shard must be at least 1, got {per_shard}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise DataError(f"shard prefix {prefix!r}: use letters, digits, '-' and '_' only")
    source = list_folder(Path(folder).expanduser())
    good, _ = scan(source, skip_bad_files, warn=warn)
    members: dict[str, str] = {}
    for i in good:
        key = source.keys[i]
        if key in members:
            raise DataError(f"{source.files[i]} and {members[key]} have one key {key!r} in a shard; rename one")
        members[key] = source.files[i]
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out_dir}: cannot create ({e.strerror})") from None
    paths = []
    for number, start in enumerate(range(0, len(good), per_shard)):
        path = out_dir / f"{prefix}-{number:06d}.tar"
        chunk = good[start:start + per_shard]

        def write(f, chunk=chunk):
            with tarfile.open(fileobj=f, mode="w") as tar:
                for i in chunk:
                    data = source.read(i)
                    info = tarfile.TarInfo(source.keys[i] + Path(source.files[i]).suffix.lower())
                    info.size, info.mode, info.mtime = len(data), 0o644, 0  # the same bytes every time
                    tar.addfile(info, io.BytesIO(data))

        try:
            write_atomically(path, write)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot write ({_first_line(e)})") from None
        paths.append(path)
    return paths
