"""Rate-distortion of vqvae's .vqz files against PNG, JPEG and WebP on held-out images, in one run.

    python benchmarks/codec.py [RUN]          # RUN: a run with a prior (default runs/demo, from `make demo`)

Prints a table of bits per image and PSNR, and writes benchmarks/results/codec.json and codec.png
(PSNR against bits per image). vqvae's rows: one .vqz file holding every held-out image (payload bits per
image, range coder and Huffman) and one .vqz file per image (whole file: header, payload and CRC).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


from vqvae import Run, baselines
from vqvae.evaluate import reconstruct_dataset
from vqvae.metrics import psnr

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default="runs/demo")
    parser.add_argument("--single", type=int, default=100, help="how many images to compress one file each")
    args = parser.parse_args()
    run = Run(args.run)
    model, test = run.model(), run.dataset().test
    x_hat = reconstruct_dataset(model, test)
    quantized = (x_hat * 255).round() / 255  # what a decoded PNG of the output holds
    model_psnr = float(psnr(quantized, test).mean())

    rows = []
    for coder in ("range", "huffman"):
        data, stats = run.compress(list(test), coder)
        rows.append({"format": f"vqz-{coder} (one file of {len(test)}, payload)", "quality": None,
                     "bits_per_image": 8 * stats["payload_bytes"] / len(test), "psnr": model_psnr,
                     "cross_entropy_bits_per_image": stats["cross_entropy_bits"] / len(test)})
    single = [len(run.compress([x])[0]) for x in test[:args.single]]
    rows.append({"format": f"vqz-range (one file per image, first {args.single})", "quality": None,
                 "bits_per_image": 8 * sum(single) / len(single), "psnr": model_psnr})
    classical = baselines.sweep(test)
    rows += classical

    print(f"{'format':48s} {'quality':>7s} {'bits/image':>11s} {'PSNR dB':>8s}")
    for r in rows:
        print(f"{r['format']:48s} {str(r['quality'] or ''):>7s} {r['bits_per_image']:11.1f} {r['psnr']:8.2f}")
    webp = [r for r in classical if r["format"] == "webp" and r["psnr"] <= model_psnr + 1e-9]
    summary = {"vqz_psnr": model_psnr, "single_file_bits": rows[2]["bits_per_image"],
               "batch_payload_bits": rows[0]["bits_per_image"]}
    if webp:
        best = max(webp, key=lambda r: r["psnr"])  # the WebP quality closest to (not above) vqvae's PSNR
        summary.update(webp_quality=best["quality"], webp_bits=best["bits_per_image"], webp_psnr=best["psnr"],
                       single_file_ratio=best["bits_per_image"] / summary["single_file_bits"],
                       batch_payload_ratio=best["bits_per_image"] / summary["batch_payload_bits"])
        print(f"\nWebP q{best['quality']} ({best['psnr']:.2f} dB <= {model_psnr:.2f} dB): "
              f"{summary['single_file_ratio']:.2f}x a one-image .vqz file, "
              f"{summary['batch_payload_ratio']:.2f}x the per-image payload of one {len(test)}-image file")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "codec.json").write_text(json.dumps({"run": str(run), "images": len(test), "summary": summary,
                                                    "rows": rows}, indent=2) + "\n")
    plot(rows, RESULTS / "codec.png")
    print(f"wrote {RESULTS / 'codec.json'} and {RESULTS / 'codec.png'}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for fmt, marker in (("jpeg", "s-"), ("webp", "o-")):
        pts = sorted((r["bits_per_image"], r["psnr"]) for r in rows if r["format"] == fmt)
        ax.plot(*zip(*pts), marker, label=fmt.upper())
    for r, marker in zip(rows[:3], ("*", "P", "X")):
        ax.plot(r["bits_per_image"], r["psnr"], marker, markersize=12, label=r["format"])
    ax.set_xscale("log")
    ticks = [100, 200, 500, 1000, 2000, 5000]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("bits per image")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title("held-out MNIST digits")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
