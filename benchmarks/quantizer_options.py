"""Which codebook handling gives the best held-out MNIST PSNR at the demo budget?

Trains the demo network once per quantizer option set, each for the demo's step budget, and prints
held-out PSNR, codebook usage and perplexity. Writes benchmarks/results/quantizer_options.json.

    python benchmarks/quantizer_options.py [--steps 8000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from vqvae.config import ModelConfig, QuantizerConfig, TrainConfig
from vqvae.train import train_autoencoder

VARIANTS = {
    "vq, random init": dict(kind="vq", kmeans_init=False, dead_code_steps=0),
    "vq, k-means init + dead-code restart": dict(kind="vq", kmeans_init=True, dead_code_steps=50),
    "ema, random init": dict(kind="ema", kmeans_init=False, dead_code_steps=0),
    "ema, k-means init + dead-code restart (default)": dict(kind="ema", kmeans_init=True, dead_code_steps=50),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8000)
    args = parser.parse_args()
    rows = []
    for name, options in VARIANTS.items():
        cfg = ModelConfig(quantizer=QuantizerConfig(**options))
        with tempfile.TemporaryDirectory() as tmp:
            figures = train_autoencoder(cfg, TrainConfig(steps=args.steps), Path(tmp), show_progress=False)
            seconds = json.loads((Path(tmp) / "metrics.jsonl").read_text().splitlines()[-1])["time"]
        rows.append({"variant": name, "steps": args.steps, "seconds": seconds, **figures})
        print(f"{name:50s} {seconds:6.0f} s  PSNR {figures['psnr']:.2f} dB  "
              f"codes used {figures['codes_used']:.1%}  perplexity {figures['perplexity']:.0f}", flush=True)
    out = Path(__file__).parent / "results" / "quantizer_options.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
