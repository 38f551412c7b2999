"""Images per second of the streamed datasets: the check before training, and batches of crops read by
DataLoader workers, from a folder and from the tar shards written from it.

    python benchmarks/streaming.py [--images 2000] [--size 256] [--crop 128] [--batch 32] [--workers 0 1 2]

Makes --images photographs' worth of files in a temporary folder (half JPEG, half PNG, --size pixels on the
longer side, sizes varying, three sub-folders; random crops of scikit-image photographs, so the codecs see
natural images), then times: `scan` (the check of every file before training), one full decode of every
file (what the check avoids), and 20 batches of --batch --crop x --crop crops through `BatchReader` at each
--workers (after 2 warm-up batches), for the folder and for its shards. Writes
benchmarks/results/streaming.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vqvae.data import _photo
from vqvae.streaming import BatchReader, decode, open_stream, scan, write_shards

ROOT = Path(__file__).resolve().parents[1]


def make_folder(root: Path, count: int, size: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    photos = [_photo(n) for n in ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry")]
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = int(size * rng.uniform(0.6, 1.0)), size
        top, left = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
        image = Image.fromarray(photo[top:top + h, left:left + w])
        folder = root / "abc"[i % 3]
        folder.mkdir(exist_ok=True)
        image.save(folder / f"{i:06d}.{'jpg' if i % 2 else 'png'}", quality=90)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict = {"images": args.images, "size": args.size, "crop": args.crop, "batch": args.batch}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        make_folder(folder, args.images, args.size)
        write_shards(folder, Path(tmp) / "shards", per_shard=500)
        stream = open_stream(f"folder:{folder}", args.crop)
        source = stream.source
        results["scan_images_per_s"] = args.images / timed(lambda: scan(source, workers=1))
        results["full_decode_images_per_s"] = args.images / timed(
            lambda: [decode(source.read(i), "", 3, 0, None) for i in range(len(source.keys))])
        for uri in (f"folder:{folder}", f"shards:{Path(tmp) / 'shards'}"):
            stream = open_stream(uri, args.crop)
            kind = uri.split(":")[0]
            for workers in args.workers:
                reader = BatchReader(stream, args.batch, torch.device("cpu"), workers=workers)
                gen = torch.Generator().manual_seed(0)
                for _ in range(2):
                    reader(gen)
                seconds = timed(lambda: [reader(gen) for _ in range(20)])
                reader.close()
                results[f"{kind}_batches_images_per_s_workers_{workers}"] = 20 * args.batch / seconds
    for key, value in results.items():
        print(f"{key:45s} {value:10.1f}" if isinstance(value, float) else f"{key:45s} {value:10d}")
    out = ROOT / "benchmarks" / "results" / "streaming.json"
    out.write_text(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in results.items()},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
