"""Rate-distortion of vqvae's .vqz files against PNG, JPEG and WebP on held-out images, in one run.

    python benchmarks/codec.py [RUN ...]      # runs with a prior (default runs/demo, from `make demo`)
    python benchmarks/codec.py --train-rvq runs/rvq4 runs/rvq4   # first train the residual-VQ run measured
    python benchmarks/codec.py --train-family runs/rd            # first train several models (FAMILY)

Every run gives operating points: a residual-VQ run one per stage count s (the first s stages of its
codes, `vqvae compress --stages s`), any other run one. For each: PSNR of the decoded held-out images (8-bit,
as a decoded PNG holds them), bits of one-image .vqz files (whole file: header, payload and CRC; the first
--single held-out images), and the payload bits per image of one file holding every held-out image. PNG,
JPEG and WebP are one-image files too (Pillow; WebP at every quality 0, 5, ..., 100). Each vqvae point is
set against the smallest WebP file of equal or higher PSNR.

Prints the table and writes benchmarks/results/codec.json, codec.md and codec.png (PSNR against bits per
image).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vqvae import Run, baselines
from vqvae.evaluate import encode_dataset
from vqvae.metrics import psnr

RESULTS = Path(__file__).parent / "results"
WEBP_QUALITIES = tuple(range(0, 101, 5))
JPEG_QUALITIES = (1, 5, 10, 20, 30, 50, 70, 90)


@torch.no_grad()
def operating_points(run: Run, test: torch.Tensor, single: int) -> list[dict]:
    """One row per operating point of `run`: its stages (None without), PSNR, one-image file bits and the
    payload bits per image of one file of all `test` images."""
    model = run.model()
    codes = encode_dataset(model, test).long()  # (N, [Q,] h, w)
    rows = []
    for stages in range(1, model.code_stages + 1) if model.code_stages else [None]:
        kept = codes if stages is None else codes[:, :stages]
        x_hat = torch.cat([model.decode(kept[i:i + 250], tuple(test.shape[2:])).cpu() for i in range(0, len(test), 250)])
        quantized = (x_hat * 255).round() / 255  # what a decoded PNG of the output holds
        files = [len(run.compress([x], stages=stages)[0]) for x in test[:single]]
        _, stats = run.compress(list(test), stages=stages)
        name = Path(run.path).name + ("" if stages is None else f" s={stages}")
        rows.append({"format": "vqz", "point": name, "run": str(run.path), "stages": stages,
                     "psnr": float(psnr(quantized, test).mean()), "bits_per_image": 8 * sum(files) / len(files),
                     "batch_payload_bits_per_image": 8 * stats["payload_bytes"] / len(test),
                     "cross_entropy_bits_per_image": stats["cross_entropy_bits"] / len(test)})
    return rows


def compare(points: list[dict], classical: list[dict]) -> None:
    """Add to each vqvae point the smallest WebP of equal or higher PSNR and the size ratio (in place)."""
    for p in points:
        best = baselines.smallest_at_psnr(classical, "webp", p["psnr"])
        if best is not None:
            p.update(webp_quality=best["quality"], webp_bits=best["bits_per_image"], webp_psnr=best["psnr"],
                     webp_ratio=best["bits_per_image"] / p["bits_per_image"])


def table(points: list[dict], classical: list[dict], images: int, single: int) -> str:
    lines = [f"Held-out digits: {images} images; vqvae one-image files over the first {single}.", "",
             "| operating point | PSNR (dB) | bits/image, one-image file | payload bits/image, one file of all "
             "| smallest WebP at >= PSNR | WebP / vqz |", "|---|---:|---:|---:|---|---:|"]
    for p in points:
        webp = (f"q{p['webp_quality']}: {p['webp_bits']:.0f} bits, {p['webp_psnr']:.2f} dB" if "webp_bits" in p
                else "none reaches it")
        ratio = f"{p['webp_ratio']:.2f}x" if "webp_ratio" in p else "-"
        lines.append(f"| {p['point']} | {p['psnr']:.2f} | {p['bits_per_image']:.0f} | "
                     f"{p['batch_payload_bits_per_image']:.0f} | {webp} | {ratio} |")
    lines += ["", "| classical | quality | PSNR (dB) | bits/image |", "|---|---:|---:|---:|"]
    lines += [f"| {r['format']} | {r['quality'] if r['quality'] is not None else '-'} | {r['psnr']:.2f} | "
              f"{r['bits_per_image']:.0f} |" for r in classical]
    return "\n".join(lines) + "\n"


def train_rvq(path: Path, stages: int = 4, codebook_size: int = 256, seconds: float = 240.0) -> None:
    """The residual-VQ run of the README's curve: a VQ-VAE with `stages` stages of `codebook_size` codes on
    MNIST, then a class-conditional transformer prior over all stages, each trained for `seconds`."""
    from vqvae import ModelConfig, QuantizerConfig, TrainConfig, train_autoencoder, train_prior

    q = QuantizerConfig(kind="rvq", stages=stages, codebook_size=codebook_size, code_dim=16)
    train_autoencoder(ModelConfig(quantizer=q), TrainConfig(data="mnist", steps=100_000, max_seconds=seconds,
                                                            device="cpu"), path, show_progress=False)
    prior_train = TrainConfig(data="codes", steps=100_000, max_seconds=seconds, batch_size=64, device="cpu",
                              warmup_steps=200)
    train_prior(path, dict(arch="transformer", n_layer=4, n_embd=64, n_head=4), prior_train, shifts=1,
                show_progress=False)


FAMILY = {  # name: (`vqvae train` options, `vqvae prior` options); each trained with `vqvae.cli.main`
    "d4k512": (["--steps", "8000"], ["--steps", "2000"]),  # what `vqvae demo` trains: 7x7 codes, K = 512
    "d2k64": (["--downsample", "2", "--codebook-size", "64", "--steps", "8000"],
              ["--steps", "3000", "--max-seconds", "1500"]),  # 14x14 codes, K = 64
    "d2k512": (["--downsample", "2", "--steps", "8000"], ["--steps", "3000", "--max-seconds", "1500"]),
}


def train_family(directory: Path) -> list[Path]:
    """The runs of the README's curve from several models, under `directory`: a VQ-VAE per FAMILY entry on
    MNIST (7x7 codes as `vqvae demo` trains them; 14x14 codes at K = 64 and K = 512), each with a
    class-conditional transformer prior. Step budgets, except the 14x14 priors: at most 25 minutes each."""
    from vqvae.cli import main as cli

    paths = []
    for name, (train, prior) in FAMILY.items():
        path = directory / name
        for args in (["train", "--data", "mnist", "--out", str(path), *train], ["prior", str(path), *prior]):
            if cli(args) != 0:
                raise SystemExit(f"`vqvae {' '.join(args)}` failed")
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="runs with a prior (default: runs/demo unless --train-family)")
    parser.add_argument("--single", type=int, default=100, help="how many images to compress one file each")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for codec.json, codec.md, codec.png")
    parser.add_argument("--train-rvq", type=Path, help="first train a 4-stage residual-VQ run and its prior here "
                                                        "(4 + 4 minutes of training)")
    parser.add_argument("--train-family", type=Path, help="first train the runs of FAMILY under this directory "
                                                           "(about 80 minutes on one core) and measure them too")
    args = parser.parse_args()
    if args.train_rvq is not None:
        train_rvq(args.train_rvq)
    family = train_family(args.train_family) if args.train_family is not None else []
    runs = [Run(r) for r in [*family, *(args.runs or ([] if family else ["runs/demo"]))]]
    test = runs[0].dataset().test
    points = [p for run in runs for p in operating_points(run, test, args.single)]
    classical = ([baselines.rate_distortion(test, "png")]
                 + [baselines.rate_distortion(test, "jpeg", q) for q in JPEG_QUALITIES]
                 + [baselines.rate_distortion(test, "webp", q) for q in WEBP_QUALITIES])
    compare(points, classical)
    text = table(points, classical, len(test), min(args.single, len(test)))
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "codec.json").write_text(json.dumps({"runs": [str(r.path) for r in runs], "images": len(test),
                                                     "single": args.single, "points": points,
                                                     "classical": classical}, indent=2) + "\n")
    (args.out / "codec.md").write_text(text)
    plot(points, classical, args.out / "codec.png")
    print(f"wrote {args.out / 'codec.json'}, codec.md and codec.png")


def plot(points: list[dict], classical: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for fmt, marker in (("jpeg", "s-"), ("webp", "o-")):
        pts = sorted((r["bits_per_image"], r["psnr"]) for r in classical if r["format"] == fmt)
        ax.plot(*zip(*pts), marker, markersize=4, label=f"{fmt.upper()} (one-image files)")
    png = next(r for r in classical if r["format"] == "png")
    ax.axvline(png["bits_per_image"], color="gray", linestyle=":", label="PNG (lossless)")
    for run in dict.fromkeys(p["run"] for p in points):
        pts = [p for p in points if p["run"] == run]
        ax.plot([p["bits_per_image"] for p in pts], [p["psnr"] for p in pts], "*-", markersize=10,
                label=f".vqz {Path(run).name} (one-image files)")
        for p in pts:
            if p["stages"] is not None:
                ax.annotate(f"s={p['stages']}", (p["bits_per_image"], p["psnr"]), textcoords="offset points",
                            xytext=(5, -10), fontsize=7)
    ax.set_xscale("log")
    ticks = [200, 500, 1000, 2000, 5000]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("bits per image (whole file)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title("held-out MNIST digits")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
