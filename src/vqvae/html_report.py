"""The HTML report of a run: one self-contained file (RUN/report.html) with every picture inlined.

    path = write_report(Run("runs/demo"))       # curves, codebook use, reconstructions, code grids,
                                                # samples, rate-distortion against PNG/JPEG/WebP

Its held-out figures are `evaluate.evaluate_run`'s, the ones `vqvae eval --json` prints (also embedded as
JSON in <script id="figures">). A section whose inputs are missing (no prior yet, no cached codes) says
what makes them instead of failing. Plots are drawn with matplotlib (the `report` extra): it is what
people read plots from, and a hand-drawn axis in Pillow would be more code to keep than the feature.

Images are float tensors (N, C, H, W) in [0, 1]; code grids are integer tensors (N, H', W').
"""

from __future__ import annotations

import base64
import colorsys
import html
import io
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .errors import RunError, VQVAEError

RD_QUALITIES = (1, 5, 10, 20, 30, 50, 70, 90)  # JPEG and WebP qualities of the rate-distortion plot
SINGLE_FILES = 20  # held-out images compressed one file each for the .vqz per-image point


# -- pictures as data: URIs ----------------------------------------------------------------------------
def png_bytes(image: torch.Tensor | np.ndarray | Image.Image) -> bytes:
    """A float (C, H, W) tensor in [0, 1], a uint8 (H, W[, C]) array or a PIL image -> PNG bytes."""
    from .data import to_uint8

    if isinstance(image, torch.Tensor):
        arr = to_uint8(image)  # (H, W, C)
        image = arr[..., 0] if arr.shape[2] == 1 else arr
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def code_colours(codebook_size: int) -> np.ndarray:
    """(K, 3) uint8: a colour per code, hues spread by the golden ratio so neighbouring codes differ."""
    rgb = [colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.55 + 0.35 * (k % 3) / 2, 0.95 - 0.25 * (k % 2))
           for k in range(codebook_size)]
    return (np.array(rgb) * 255).round().astype(np.uint8)


def code_grid_image(codes: torch.Tensor, codebook_size: int, cell: int = 24) -> Image.Image:
    """One code grid (H', W') as coloured cells `cell` pixels wide, each labelled with its code."""
    colours = code_colours(codebook_size)
    H, W = codes.shape
    image = Image.new("RGB", (W * cell, H * cell), "white")
    draw = ImageDraw.Draw(image)
    for (i, j), k in np.ndenumerate(codes.numpy()):
        colour = tuple(int(c) for c in colours[k])
        draw.rectangle([j * cell, i * cell, (j + 1) * cell - 1, (i + 1) * cell - 1], fill=colour)
        ink = "black" if sum(colour) > 380 else "white"
        draw.text((j * cell + cell / 2, i * cell + cell / 2), str(int(k)), fill=ink, anchor="mm")
    return image


# -- plots ---------------------------------------------------------------------------------------------
def _figure():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise VQVAEError("the HTML report draws its plots with matplotlib: pip install 'vqvae[report]'") from None
    return Figure(figsize=(5.2, 3.2), dpi=100, layout="tight")


def _plot_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file ([] when it is missing); lines that do not parse are skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def plot_curves(records: list[dict], keys: list[tuple[str, str]], ylabel: str, title: str,
                transform=None) -> bytes:
    """PNG of `keys` ([(metrics key, legend label)]) against the step; `transform` maps each value."""
    fig = _figure()
    ax = fig.add_subplot()
    for key, label in keys:
        steps, values = _series(records, key)
        if steps:
            ax.plot(steps, [transform(v) for v in values] if transform else values, ".-", label=label, markersize=3)
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _plot_png(fig)


def mse_to_psnr(mse: float) -> float:
    """PSNR (dB) of images in [0, 1] from their mean squared error, as the training progress bar shows it."""
    return 10 * math.log10(1 / max(mse, 1e-10))


def plot_histogram(counts: torch.Tensor) -> bytes:
    """PNG of how often each code occurs (bars by code index) and, sorted, how the use is spread."""
    fig = _figure()
    ax = fig.add_subplot()
    total = max(int(counts.sum()), 1)
    ax.bar(range(len(counts)), (counts.float() / total).numpy(), width=1.0, color="#4c72b0")
    ax.set(xlabel="code", ylabel="frequency", title="code frequencies (cached training codes)")
    return _plot_png(fig)


def plot_rate_distortion(rows: list[dict]) -> bytes:
    """PNG of PSNR against bits per image: JPEG and WebP curves, PNG's lossless rate, the .vqz points."""
    fig = _figure()
    ax = fig.add_subplot()
    for fmt, style in (("jpeg", "o-"), ("webp", "s-")):
        points = sorted((r["bits_per_image"], r["psnr"]) for r in rows if r["format"] == fmt)
        if points:
            ax.plot(*zip(*points), style, label=fmt.upper(), markersize=4)
    for r in rows:
        if r["format"] == "png":
            ax.axvline(r["bits_per_image"], color="gray", linestyle="--", label="PNG (lossless)")
        elif r["format"] == "vqz":
            ax.plot(r["bits_per_image"], r["psnr"], "*", markersize=12, label=r["label"])
    ax.set(xscale="log", xlabel="bits per image", ylabel="PSNR (dB)", title="rate-distortion, held-out images")
    ax.xaxis.set_minor_formatter("")  # labels at powers of ten only: the minor ones overlap
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _plot_png(fig)


# -- the figures ---------------------------------------------------------------------------------------
def rate_distortion(run, images: torch.Tensor, model_psnr: float, qualities=RD_QUALITIES,
                    single_files: int = SINGLE_FILES) -> list[dict]:
    """Points (format, label, quality, bits_per_image, psnr) of PNG, JPEG and WebP at `qualities` on
    `images` (N, C, H, W), and of .vqz at `model_psnr`: one file of all N images and one file per image
    (the first `single_files`). Needs the run's prior (RunError otherwise)."""
    from . import baselines

    rows = [dict(baselines.rate_distortion(images, "png"), label="PNG")]
    for fmt in ("jpeg", "webp"):
        rows += [dict(baselines.rate_distortion(images, fmt, q), label=f"{fmt.upper()} q{q}") for q in qualities]
    data, _ = run.compress(list(images))
    single = [len(run.compress([x])[0]) for x in images[:single_files]]
    rows.append({"format": "vqz", "label": f".vqz, one file of {len(images)}", "quality": None,
                 "bits_per_image": 8 * len(data) / len(images), "psnr": model_psnr})
    rows.append({"format": "vqz", "label": f".vqz, one file each (first {len(single)})", "quality": None,
                 "bits_per_image": 8 * sum(single) / len(single), "psnr": model_psnr})
    return rows


def _spread(images: torch.Tensor, n: int) -> torch.Tensor:
    """`n` images spread over the split (a split sorted by class shows every class)."""
    return images[torch.linspace(0, len(images) - 1, min(n, len(images))).long()]


# -- the page ------------------------------------------------------------------------------------------
def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _section(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>\n{body}\n</section>\n"


def _missing(text: str) -> str:
    return f'<p class="missing">{html.escape(text)}</p>'


def _table(rows: list[tuple[str, str]], cls: str = "") -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f'<table class="{cls}">{cells}</table>'


def format_figure(value) -> str:
    """A figure as `vqvae eval` prints it in its table (4 decimals for floats)."""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def build_report(run, figures: dict | None = None, samples_per_class: int = 8, seed: int = 0) -> str:
    """The HTML text of the report of `run` (a `Run`). `figures`: `evaluate_run(run)`, computed if None."""
    from .evaluate import encode_dataset, evaluate_run, reconstruct_dataset
    from .report import grid, sample_images

    _figure()  # a missing matplotlib is reported before any work
    figures = evaluate_run(run) if figures is None else figures
    model = run.model()
    K = model.cfg.quantizer.codebook_size
    test = run.dataset().test
    channels = model.cfg.in_channels
    if test.shape[1] != channels:
        from .data import to_channels

        test = to_channels(test, channels)
    parts = []

    rows = [(k, format_figure(v)) for k, v in figures.items()]
    parts.append(_section("Held-out figures (vqvae eval)", _table(rows, "figures") +
                          f'\n<script type="application/json" id="figures">{html.escape(json.dumps(figures))}'
                          "</script>"))

    records = read_metrics(run.metrics_path)
    prior_records = read_metrics(run.prior_dir / "metrics.jsonl")
    if records:
        body = _img(data_uri(plot_curves(records, [("loss", "loss"), ("mse", "MSE"), ("vq_loss", "VQ loss")],
                                         "loss", "training loss")), "training loss")
        body += _img(data_uri(plot_curves(records, [("mse", "train batches")], "PSNR (dB)",
                                          "training PSNR (from batch MSE)", mse_to_psnr)), "training PSNR")
        if prior_records:
            body += _img(data_uri(plot_curves(prior_records, [("bits_per_latent", "train batches")],
                                              "bits per latent", "prior training")), "prior training")
        parts.append(_section("Training curves", body))
        body = _img(data_uri(plot_curves(records, [("usage", "codes used in a batch")], f"fraction of the {K} codes",
                                         "codebook usage")), "codebook usage")
        body += _img(data_uri(plot_curves(records, [("perplexity", "batch perplexity")], "perplexity",
                                          "code perplexity")), "code perplexity")
    else:
        parts.append(_section("Training curves", _missing(f"no {run.metrics_path.name}: the run has no training log")))
        body = ""
    try:
        body += _img(data_uri(plot_histogram(run.code_counts())), "code frequencies")
    except RunError as e:
        body += _missing(f"no code histogram: {e}")
    parts.append(_section("Codebook", body))

    if model.cfg.dims != 2:
        parts.append(_section("Pictures", _missing(f"pictures are drawn for image runs; this model is "
                                                   f"{model.cfg.dims}-D")))
        return _page(run, model, "", parts)
    originals = _spread(test, 16)
    recons = reconstruct_dataset(model, originals)
    both = torch.cat([originals, recons])
    parts.append(_section("Reconstructions (held-out: originals above, reconstructions below)",
                          _img(data_uri(png_bytes(grid(both, nrow=len(originals), scale=2))), "reconstructions")))

    inputs = _spread(test, 6)
    codes = encode_dataset(model, inputs).long()
    if hasattr(model, "levels"):  # VQ-VAE-2: the sequence holds the top grid, then the bottom one drawn here
        bottom = model.code_shape(tuple(inputs.shape[2:]))
        codes = codes[:, -math.prod(bottom):].view(-1, *bottom)
    cells = "".join(f'<figure>{_img(data_uri(png_bytes(grid(x[None], nrow=1, scale=4))), "input")}'
                    f'{_img(data_uri(png_bytes(code_grid_image(c, K))), "code grid")}</figure>'
                    for x, c in zip(inputs, codes))
    parts.append(_section("Code grids (each input next to its codes, one colour per code"
                          + (", the bottom grid" if hasattr(model, "levels") else "") + ")",
                          f'<div class="codes">{cells}</div>'))

    if run.has_prior():
        prior = run.prior()
        classes = prior.cfg.num_classes
        n = classes * samples_per_class if classes else 4 * samples_per_class
        samples, nrow = sample_images(model, prior, n, seed=seed)
        note = "<p>One row per class (0 at the top).</p>" if nrow else ""
        parts.append(_section("Samples from the prior", note + _img(data_uri(png_bytes(
            grid(samples, nrow=nrow or samples_per_class, scale=2))), "samples")))
        rd = rate_distortion(run, test, figures["psnr"])
        table = "<table class=\"rd\"><tr><th>file</th><th>bits per image</th><th>PSNR (dB)</th></tr>" + "".join(
            f"<tr><td>{html.escape(r['label'])}</td><td>{r['bits_per_image']:.1f}</td><td>{r['psnr']:.2f}</td></tr>"
            for r in rd) + "</table>"
        parts.append(_section(f"Rate-distortion on the {len(test)} held-out images",
                              _img(data_uri(plot_rate_distortion(rd)), "rate-distortion") + table))
    else:
        text = f"no prior yet: `vqvae prior {run.path}` trains one"
        parts.append(_section("Samples from the prior", _missing(text)))
        parts.append(_section("Rate-distortion", _missing(f"{text}; .vqz files need it")))

    return _page(run, model, "x".join(map(str, codes.shape[1:])), parts)


def _page(run, model, grid_shape: str, parts: list[str]) -> str:
    title = f"vqvae report: {run.path}"
    K = model.cfg.quantizer.codebook_size
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>\n"
            f"<p>data {html.escape(run.data_uri)} &middot; K = {K} codes of dimension {model.cfg.quantizer.code_dim}"
            + (f" &middot; code grid {grid_shape}" if grid_shape else "") + "</p>\n" + "".join(parts) + "</body></html>\n")


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h2{border-bottom:1px solid #ccc;padding-bottom:.2em}img{image-rendering:pixelated;margin:4px;vertical-align:top}
table{border-collapse:collapse}th,td{padding:2px 10px;text-align:left;border-bottom:1px solid #eee}
.missing{color:#a33;font-style:italic}.codes{display:flex;flex-wrap:wrap}
figure{margin:6px;display:flex;flex-direction:column;align-items:center}"""


def write_report(run, path: str | Path | None = None, figures: dict | None = None, seed: int = 0) -> Path:
    """Write the report of `run` (a `Run`) to `path` (RUN/report.html by default), atomically -> the path."""
    from .config import write_atomically

    target = Path(path) if path is not None else run.path / "report.html"
    text = build_report(run, figures, seed=seed).encode()
    write_atomically(target, lambda f: f.write(text))
    return target
