"""Bytes per clip and quality of vqvae's .vqz files against FLAC, Opus and 8 kHz mu-law on held-out speakers.

    python benchmarks/audio_codec.py [RUN] [--clips 100]    # RUN: a speech run with a prior (runs/speech,
                                                            # from `vqvae demo --data speech --out runs/speech`)

The clips are the first --clips held-out clips of the run's dataset (for `speech`: speakers that never
occur in training; each clip is the speech alone, without padding). Every codec compresses each clip on
its own: vqvae one .vqz file per clip (header, payload and CRC), FLAC (soundfile), Opus at 6, 8, 12 and
16 kbps (opusenc/opusdec from opus-tools: `make bench-audio` installs them; rows left out without them;
bytes include the Ogg pages), mu-law at 8 kHz (one byte a sample, no header). Quality: SNR and log-mel
spectral distance (dB, 80 mel bands; audio/spectral.py), and STOI (pystoi) when installed, averaged over
the clips long enough for it (pystoi needs 30 frames of 25.6 ms after dropping silent ones).
Prints a table; writes benchmarks/results/audio_codec.json and audio_codec.png (log-mel distance against
bytes per clip).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from vqvae import Run
from vqvae.audio import baselines
from vqvae.audio.pipeline import codec_rows, held_out_clips
from vqvae.audio.speech import SAMPLE_RATE

RESULTS = Path(__file__).parent / "results"


def stoi_score():
    """score(reference, decoded) -> {"stoi": STOI} (pystoi), or None when pystoi is not installed."""
    try:
        from pystoi import stoi
    except ImportError:
        return None
    import warnings

    def score(reference, decoded):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # clips with under 30 speech frames: pystoi returns 1e-5
            value = float(stoi(reference, decoded, SAMPLE_RATE, extended=False))
        return {"stoi": value if value > 1e-5 else float("nan")}  # left out of the mean

    return score


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        if row["codec"] == "FLAC":
            continue  # lossless: distance 0
        ax.scatter(row["bytes"], row["log_mel_db"], color="C3" if row["codec"].startswith("vqvae") else "C0")
        ax.annotate(row["codec"], (row["bytes"], row["log_mel_db"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("bytes per clip (log scale)")
    ax.set_ylabel("log-mel spectral distance (dB, lower is better)")
    ax.set_title("held-out speakers: size and spectral distance")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default="runs/speech")
    parser.add_argument("--clips", type=int, default=100, help="held-out clips to compress, one at a time")
    args = parser.parse_args()
    run = Run(args.run)
    clips, _ = held_out_clips(run.data_uri, args.clips)
    start = time.perf_counter()
    rows = codec_rows(run, clips, score=stoi_score())
    raw = float(np.mean([2 * c.shape[-1] for c in clips]))
    print(f"{len(clips)} held-out clips of {run.data_uri}, {raw:,.0f} bytes of 16-bit PCM each on average "
          f"({time.perf_counter() - start:.0f} s)")
    print(f"{'codec':<16} {'bytes/clip':>10} {'SNR dB':>8} {'log-mel dB':>10} {'STOI':>6}")
    for row in rows:
        stoi_text = f"{row['stoi']:.3f}" if "stoi" in row else "-"
        print(f"{row['codec']:<16} {row['bytes']:>10.0f} {row['snr_db']:>8.2f} {row['log_mel_db']:>10.2f} "
              f"{stoi_text:>6}")
    if not baselines.opus_available():
        print("Opus rows left out: opusenc/opusdec not found (apt-get install opus-tools)")
    RESULTS.mkdir(exist_ok=True)
    result = {"run": str(args.run), "data": run.data_uri, "clips": len(clips), "raw_bytes_per_clip": raw,
              "rows": rows}
    (RESULTS / "audio_codec.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, RESULTS / "audio_codec.png")
    print(f"wrote {RESULTS / 'audio_codec.json'} and {RESULTS / 'audio_codec.png'}")


if __name__ == "__main__":
    main()
