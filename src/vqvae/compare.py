"""The model family on one bench: train each variant at the same step budget and set their held-out figures
side by side (`vqvae compare`).

    rows = compare_models("mnist", ["ae", "vae", "vqvae"], "runs/compare", steps=1500)
    write_comparison(rows, "runs/compare", settings)   # compare.json, compare.md, compare.png

Every variant shares the encoder and decoder of `ModelConfig()` (hidden 64, downsample 4: 7x7 latents
for 28x28 digits, 16 channels) and the training settings; each trains into its own run directory
OUT/NAME, which `vqvae eval`, `reconstruct` and the other commands read like any run.

Bits per dimension (upper bounds on -log2 p(x) per 8-bit pixel, evaluate.bits_figures) are of three kinds,
in separate columns: the VAE's negative ELBO; for models with codes, the uniform prior's log2 K per code
plus the decoder's pixel bits (the VQ-VAE paper's figure before a prior is learned); and, with
`prior_steps` > 0, the same with a learned prior instead of the uniform one (every model with integer
codes: `takes_prior`; these are also those `Run.compress` codes into a .vqz file).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace
from pathlib import Path

from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from .config import ModelConfig, QuantizerConfig, TrainConfig, to_dict, write_atomically, write_json
from .errors import ConfigError, RunError
from .evaluate import evaluate_autoencoder
from .run import Run
from .prior_training import train_prior
from .train import train_autoencoder

# name -> (ModelConfig.model, QuantizerConfig fields); every other field is the default's.
# FSQ's levels (8, 8, 8) give K = 512 as the VQ-VAE's codebook; residual VQ pays 2 x 9 bits per position.
MODEL_VARIANTS: dict[str, tuple[str, dict]] = {
    "ae": ("ae", {}),
    "vae": ("vae", {}),
    "vqvae": ("vqvae", {"kind": "ema"}),
    "dvae": ("dvae", {"kind": "gumbel"}),
    "vqvae2": ("vqvae2", {"kind": "ema"}),
    "fsq": ("vqvae", {"kind": "fsq", "levels": (8, 8, 8), "code_dim": 3}),
    "rvq": ("vqvae", {"kind": "rvq", "stages": 2}),
}

PRIOR = dict(arch="transformer", n_layer=4, n_embd=64, n_head=4)  # `vqvae prior`'s defaults

# (key, header, format) of the table's columns; a row lacks the keys that do not apply to its model
COLUMNS = [
    ("model", "model", "{}"),
    ("psnr", "PSNR dB", "{:.2f}"),
    ("ssim", "SSIM", "{:.3f}"),
    ("elbo_bits_per_dim", "ELBO bits/dim", "{:.3f}"),
    ("uniform_bits_per_dim", "uniform-prior bits/dim", "{:.3f}"),
    ("bits_per_dim", "learned-prior bits/dim", "{:.3f}"),
    ("codes_used", "codes used", "{:.1%}"),
    ("perplexity", "perplexity", "{:.1f}"),
    ("train_seconds", "train s", "{:.0f}"),
    ("vqz_bits_per_image", ".vqz bits/image", "{:.1f}"),
]


def variant_config(name: str, base: ModelConfig | None = None) -> ModelConfig:
    """The ModelConfig of variant `name` (a key of MODEL_VARIANTS) on `base`'s encoder and decoder (default
    `ModelConfig()`); FSQ's codebook size follows its levels."""
    if name not in MODEL_VARIANTS:
        raise ConfigError(f"unknown model {name!r}; choose from {', '.join(MODEL_VARIANTS)}")
    base = base or ModelConfig()
    model, fields = MODEL_VARIANTS[name]
    q = {**vars(base.quantizer), **fields}
    if q["kind"] == "fsq":
        q["codebook_size"] = math.prod(q["levels"])
    return replace(base, model=model, quantizer=QuantizerConfig(**q))


def takes_prior(cfg: ModelConfig) -> bool:
    """Whether the model has integer codes that a prior and the .vqz codec take: a VQ-VAE (any quantizer,
    residual VQ's stages included), a dVAE, a VQ-VAE-2 (not with residual VQ: several codes per position of
    two grids)."""
    return cfg.model in ("vqvae", "dvae") or (cfg.model == "vqvae2" and cfg.quantizer.kind != "rvq")


def train_seconds(run: Run) -> float | None:
    """Training time of a run (seconds spent in training steps, from the last line of metrics.jsonl)."""
    try:
        lines = run.metrics_path.read_text().splitlines()
        return float(json.loads(lines[-1])["time"]) if lines else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def compare_models(data: str, models: list[str], out_dir: str | Path, steps: int, prior_steps: int = 0,
                   base: ModelConfig | None = None, train: TrainConfig | None = None, force: bool = False,
                   console: Console | None = None, show_progress: bool = True) -> list[dict]:
    """Train each of `models` (keys of MODEL_VARIANTS) on dataset `data` for `steps` steps into OUT/NAME, in turn,
    and evaluate it on the held-out split -> one row per model: model, run, train_seconds and the figures
    of `evaluate_autoencoder` (bits per dimension included); with `prior_steps` > 0, models with codes
    (`takes_prior`) also get a prior (PRIOR, as `vqvae prior` trains it), its held-out nll_bits_per_latent,
    integer_bits_per_latent and bits_per_dim, and vqz_bits_per_image (the held-out split compressed into
    one .vqz file with `Run.compress`, bits per image, header included).

    `train` supplies the other training settings (batch size, lr, seed, ...; its data and steps are
    replaced). An OUT/NAME that holds a run is refused unless `force`, which replaces it.
    """
    if not models or len(set(models)) != len(models):
        raise ConfigError(f"models must be distinct names from {', '.join(MODEL_VARIANTS)}, got {models}")
    configs = {name: variant_config(name, base) for name in models}  # every name checked before any training
    if prior_steps < 0:
        raise ConfigError(f"prior_steps must be >= 0, got {prior_steps}")
    train_cfg = replace(train or TrainConfig(), data=data, steps=steps)
    out_dir = Path(out_dir)
    runs = {name: Run(out_dir / name) for name in models}
    for name, run in runs.items():
        if run.path.exists() and any(run.path.iterdir()) and not force:
            raise RunError(f"{run.path}: already holds a run; pass --force to replace it or choose another --out")
    console = console or Console(stderr=True)
    rows = []
    for i, (name, cfg) in enumerate(configs.items()):
        run = runs[name]
        console.rule(f"{i + 1}/{len(configs)}  {name}")
        with run.lock("vqvae compare", create=True):
            run.clear(force)
        train_autoencoder(cfg, train_cfg, run.path, show_progress=show_progress, console=console)
        run = Run(run.path)
        dataset = run.dataset()
        row = {"model": name, "run": str(run.path),
               **evaluate_autoencoder(run.model(), dataset.test, train_images=dataset.train),
               "train_seconds": train_seconds(run)}
        if prior_steps and takes_prior(cfg):
            prior_train = TrainConfig(data="codes", steps=prior_steps, batch_size=64, seed=train_cfg.seed,
                                      warmup_steps=min(200, prior_steps // 5), device=train_cfg.device)
            figures = train_prior(run.path, PRIOR, prior_train, shifts=1, show_progress=show_progress,
                                  console=console)  # held-out bits of the float and integer priors, bits/dim
            row.update({k: figures[k] for k in ("nll_bits_per_latent", "integer_bits_per_latent", "bits_per_dim")})
            row["vqz_bits_per_image"] = run.compress(list(dataset.test))[1]["bits_per_image"]
        rows.append(row)
    return rows


def comparison_table(rows: list[dict], title: str = "") -> Table:
    """The rows as a Rich table of COLUMNS; empty cells where a figure does not apply."""
    t = Table(title=title or None)
    for _, header, _ in COLUMNS:
        t.add_column(header, justify="left" if header == "model" else "right", overflow="fold")
    for row in rows:
        t.add_row(*_cells(row))
    return t


def _cells(row: dict) -> list[str]:
    return [fmt.format(row[key]) if row.get(key) is not None else "" for key, _, fmt in COLUMNS]


def comparison_markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table of COLUMNS (the text of compare.md)."""
    lines = ["| " + " | ".join(header for _, header, _ in COLUMNS) + " |",
             "|" + "|".join("---" if key == "model" else "---:" for key, _, _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_comparison(rows: list[dict], out_dir: str | Path, settings: dict) -> list[Path]:
    """compare.json ({"settings": ..., "rows": ...}), compare.md and compare.png in `out_dir` -> their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "compare.json", out_dir / "compare.md", out_dir / "compare.png"]
    write_json(paths[0], {"settings": settings, "rows": rows})
    text = comparison_markdown(rows).encode()
    write_atomically(paths[1], lambda f: f.write(text))
    plot(rows, paths[2])
    return paths


def plot(rows: list[dict], path: str | Path) -> None:
    """Bar charts drawn with Pillow (a core dependency, so the command needs no plotting extra): held-out
    PSNR and bits per dimension (the best bound each model has: learned prior, ELBO or uniform prior) per
    model, one panel each."""
    def bpd(row: dict) -> float | None:
        for key in ("bits_per_dim", "elbo_bits_per_dim", "uniform_bits_per_dim"):
            if row.get(key) is not None:
                return row[key]
        return None

    panels = [("held-out PSNR (dB), higher is better", [r.get("psnr") for r in rows]),
              ("bits/dim (learned prior, ELBO or uniform prior), lower is better", [bpd(r) for r in rows])]
    bar, gap, label_w, bar_w, top = 18, 6, 80, 320, 24
    panel_h = top + len(rows) * (bar + gap) + 10
    image = Image.new("RGB", (label_w + bar_w + 70, panel_h * len(panels)), "white")
    draw = ImageDraw.Draw(image)
    for p, (title, values) in enumerate(panels):
        y0 = p * panel_h
        draw.text((6, y0 + 6), title, fill="black")
        largest = max([v for v in values if v is not None] or [1.0]) or 1.0
        for i, (row, value) in enumerate(zip(rows, values)):
            y = y0 + top + i * (bar + gap)
            draw.text((6, y + 3), row["model"], fill="black")
            if value is None:
                draw.text((label_w, y + 3), "n/a", fill="gray")
                continue
            width = max(1, round(bar_w * max(value, 0) / largest))
            draw.rectangle([label_w, y, label_w + width, y + bar], fill=(70, 110, 180))
            draw.text((label_w + width + 4, y + 3), f"{value:.2f}", fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_atomically(path, lambda f: f.write(buffer.getvalue()))


def comparison_settings(data: str, models: list[str], steps: int, prior_steps: int, train: TrainConfig | None,
                base: ModelConfig | None) -> dict:
    """What compare.json records of how its rows were made."""
    return {"data": data, "models": models, "steps": steps, "prior_steps": prior_steps,
            "train": to_dict(replace(train or TrainConfig(), data=data, steps=steps)),
            "base_model": to_dict(base or ModelConfig())}
