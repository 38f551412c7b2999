"""Seconds to compress a run's held-out images into one .vqz file and to decompress it, in one run.

    python benchmarks/codec_speed.py [RUN]          # RUN: a run with a prior (default runs/demo)

Prints the times, the file size, and how many of the labels the writer chose (class-conditional priors,
chosen with the float prior) are the images' true classes.
"""

from __future__ import annotations

import argparse
import time

from vqvae import Run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default="runs/demo")
    run = Run(parser.parse_args().run)
    data = run.dataset()
    run.model(), run.prior(), run.integer_prior()  # loaded before timing
    start = time.perf_counter()
    encoded, stats = run.compress(list(data.test))
    compress_s = time.perf_counter() - start
    start = time.perf_counter()
    run.decompress(encoded)
    decompress_s = time.perf_counter() - start
    print(f"{len(data.test)} images: compress {compress_s:.1f} s, decompress {decompress_s:.1f} s, {len(encoded)} bytes")
    if stats["labels"] is not None and data.test_labels is not None:
        right = sum(int(a) == int(b) for a, b in zip(stats["labels"], data.test_labels))
        print(f"labels chosen by the writer that are the true class: {right}/{len(data.test)}")


if __name__ == "__main__":
    main()
