"""The `vqvae` command: thin wrappers that parse arguments, call the public API and print what they wrote.

Errors at the boundary (`VQVAEError`) become one line on stderr and exit code 2. Paths are printed with
Rich markup escaped (a file may be called "scan [draft].png"). Outputs are checked before the first one is
written: two outputs with one name, an existing file without --force, or a target that cannot be written
are refused.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import vqvae
from vqvae import MAX_PIXELS, Run, VQVAEError, check_outputs, output_paths, set_threads, world

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Vector-quantized autoencoders: train, evaluate, encode to discrete codes, learn a prior, "
                       "sample, compress.")
out = Console()
err = Console(stderr=True, soft_wrap=True)  # a long path stays on one line

RunArg = typer.Argument(..., help="Run directory written by `vqvae train`.")
ImagesArg = typer.Argument(..., help="Image files (PNG/JPEG, any size); WAV/FLAC files for a sound (1-D) model.")
ForceOpt = typer.Option(False, "--force", help="Replace output files that exist.")
MaxPixelsOpt = typer.Option(MAX_PIXELS, "--max-pixels", help="Refuse input images of more pixels than this.")
EVAL_HELP = ("Every this many steps: held-out figures in metrics.jsonl and the progress line, the best weights "
             "kept in model.best.safetensors, a warning when held-out and training figures part (0: never).")
LogOpt = typer.Option([], "--log", help="Also log metrics to: csv (metrics.csv next to metrics.jsonl) or tensorboard "
                                        "(event files in tensorboard/); repeat for both.")


def _version(value: bool) -> None:
    if value:
        print(f"vqvae {vqvae.__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit."),
          threads: int = typer.Option(0, "--threads", help="CPU threads for PyTorch. 0: OMP_NUM_THREADS if set, "
                                                           "else the cores that other work leaves idle.")) -> None:
    """Vector-quantized autoencoders: train, evaluate, encode to discrete codes, learn a prior, sample, compress."""
    set_threads(threads)


def _shown(path) -> str:
    """A path (or any text) to print through Rich: its markup escaped."""
    return escape(str(path))


def _print_figures(title: str, figures: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(figures))
        return
    table = Table(title=_shown(title), show_header=False)
    for key, value in figures.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    out.print(table)


def _load_inputs(paths: list[Path], channels: int, max_pixels: int = MAX_PIXELS, dims: int = 2) -> list:
    """Image files as (C, H, W) tensors with the model's channel count (gray <-> RGB converted); for a
    1-D model, sound files as (1, T) clips at its rate."""
    if dims == 1:
        return vqvae.load_audio(paths)
    return [vqvae.to_channels(x, channels) for x in vqvae.load_images(paths, max_pixels)]


def _save_output(x, path: Path) -> None:
    """An image (C, H, W), or a clip (1, T) as a WAV file, in [0, 1]."""
    (vqvae.save_wav if x.dim() == 2 else vqvae.save_image)(x.cpu(), path)


def _naming_inputs(error: VQVAEError, paths: list[Path]) -> VQVAEError:
    """The library counts images ("image 3 is ..."); the user gave files: name the file instead."""
    match = re.match(r"image (\d+)\b", str(error))
    if match and int(match.group(1)) < len(paths):
        return type(error)(f"{paths[int(match.group(1))]}{str(error)[match.end():]}")
    return error


# -- the autoencoder ---------------------------------------------------------------------------------------


@app.command()
def train(
    ctx: typer.Context,
    data: str = typer.Option("mnist", help="Dataset URI: mnist, digits, photos, folder:PATH, "
                                           "shards:PATH_OR_GLOB, npy:PATH; sound (the 1-D model, use "
                                           "--downsample 64): speech, wav:PATH."),
    out_dir: Path = typer.Option(Path("runs/mnist"), "--out", help="Run directory to write."),
    steps: int = typer.Option(8000, help="Training steps (the schedule runs over them)."),
    max_seconds: float = typer.Option(0.0, help="Stop after this much training time (0: no limit)."),
    batch_size: int = typer.Option(32),
    lr: float = typer.Option(2e-3, help="Peak learning rate (Adam; warmup, then cosine decay)."),
    model: str = typer.Option("vqvae", help="vqvae, ae (deterministic bottleneck), vae (Gaussian latents), dvae "
                                            "(Gumbel-softmax codes) or vqvae2 (top and bottom code grids)."),
    quantizer: Optional[str] = typer.Option(None, help="ema (moving averages; the default), vq (gradient), fsq "
                                                       "(finite scalar, see --levels), rvq (residual, see --stages); "
                                                       "dvae: gumbel (its default). ae and vae have none."),
    levels: str = typer.Option("8,5,5,5", help="fsq: values per dimension, comma-separated (sets the code dim "
                                               "and K = their product)."),
    stages: int = typer.Option(2, help="rvq: residual stages (codes per position)."),
    temperature: float = typer.Option(1.0, help="dvae: Gumbel-softmax temperature at the start."),
    temperature_end: float = typer.Option(1 / 16, help="dvae: temperature at the end (cosine decay)."),
    kl_weight: float = typer.Option(0.05, help="dvae: weight of the KL to the uniform prior (nats per input "
                                               "dimension) once warmed up."),
    kl_warmup: float = typer.Option(0.05, help="dvae: fraction of training over which the KL weight rises from 0."),
    codebook_size: int = typer.Option(512, help="K, the number of codes."),
    code_dim: int = typer.Option(16, help="D, the size of each code vector."),
    beta: float = typer.Option(0.25, help="Commitment weight."),
    kmeans: bool = typer.Option(True, help="Initialise the codebook by k-means on the first batch."),
    dead_code_steps: int = typer.Option(50, help="Restart codes unused for this many steps (0: never)."),
    hidden: int = typer.Option(64, help="Channels of the conv nets."),
    res_hidden: int = typer.Option(32, help="Channels inside residual blocks."),
    res_blocks: int = typer.Option(2, help="Residual blocks in encoder and decoder."),
    downsample: int = typer.Option(4, help="Downsampling factor (power of 2): 28x28 -> 7x7 at 4."),
    encoder_kernel: int = typer.Option(1, help="Kernel of the encoder's unstrided convs: 1 (local codes, "
                                               "easier for the prior) or 3 (the paper's)."),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, mps."),
    precision: str = typer.Option("fp32", help="fp32, bf16 or fp16 (autocast for encoder and decoder; the "
                                               "quantizer stays fp32; fp16 needs CUDA)."),
    checkpoint_every: int = typer.Option(500, help="Write a checkpoint every this many steps."),
    log_every: int = typer.Option(50, help="Append to metrics.jsonl every this many steps."),
    eval_every: int = typer.Option(0, "--eval-every", help=EVAL_HELP),
    image_size: int = typer.Option(0, help="Train on S x S crops (random; held-out: centre) of folder:/shards: "
                                           "images of any size; photos: the crop size. 0: whole images."),
    skip_bad_files: bool = typer.Option(False, "--skip-bad-files", help="folder:/shards: warn about broken "
                                                                         "files and train on the others."),
    workers: int = typer.Option(2, help="Processes decoding folder:/shards: images (0: the training process)."),
    preset: Optional[str] = typer.Option(None, help="A recipe's values for the options not given: "
                                                    + ", ".join(vqvae.PRESETS) + "."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    as_json: bool = typer.Option(False, "--json", help="Print held-out figures as one JSON object."),
    log: list[str] = LogOpt,
) -> None:
    """Train a model of the family (VQ-VAE by default) and write config.json, model.safetensors, metrics.jsonl
    and recon.png to --out."""
    sizes = _with_preset(ctx, preset, dict(image_size=image_size, hidden=hidden, res_hidden=res_hidden,
                                           res_blocks=res_blocks, downsample=downsample,
                                           encoder_kernel=encoder_kernel, codebook_size=codebook_size,
                                           code_dim=code_dim))
    qcfg = _quantizer_config(model, quantizer, levels, codebook_size=sizes["codebook_size"],
                             code_dim=sizes["code_dim"], commitment_weight=beta, kmeans_init=kmeans,
                             dead_code_steps=dead_code_steps, stages=stages, temperature=temperature,
                             temperature_end=temperature_end, kl_weight=kl_weight, kl_warmup=kl_warmup)
    mcfg = vqvae.ModelConfig(**{k: sizes[k] for k in ("hidden", "res_hidden", "res_blocks", "downsample",
                                                      "encoder_kernel")}, quantizer=qcfg, model=model)
    tcfg = vqvae.TrainConfig(data=data, steps=steps, max_seconds=max_seconds, batch_size=batch_size, lr=lr,
                             seed=seed, device=device, precision=precision, checkpoint_every=checkpoint_every,
                             log_every=log_every, eval_every=eval_every, image_size=sizes["image_size"],
                             skip_bad_files=skip_bad_files, workers=workers)
    figures = _train(mcfg, tcfg, out_dir, resume, tuple(log))
    if world()[0] == 0:  # under torchrun: one report, from rank 0
        _print_with_warning(f"held-out figures of {out_dir}", figures, as_json)


def _print_with_warning(title: str, figures: dict, as_json: bool) -> None:
    """The figures; an overfit warning (training found held-out and training figures parting) below the
    table, where it is not lost among the training output (in --json it stays a field)."""
    warning = None if as_json else figures.pop("overfit_warning", None)
    _print_figures(title, figures, as_json)
    if warning:
        err.print(f"[yellow]warning:[/yellow] {_shown(warning)}", highlight=False)


def _with_preset(ctx: typer.Context, preset: Optional[str], options: dict) -> dict:
    """`options` with the preset's values for those left at their defaults on the command line."""
    if preset is None:
        return options
    if preset not in vqvae.PRESETS:
        raise vqvae.ConfigError(f"unknown preset {preset!r}; expected one of: {', '.join(vqvae.PRESETS)}")
    return {**options, **{name: value for name, value in vqvae.PRESETS[preset].items()
                          if ctx.get_parameter_source(name).name == "DEFAULT"}}  # typer ships its own click


def _quantizer_config(model: str, kind: Optional[str], levels: str, **fields) -> "vqvae.QuantizerConfig":
    """The QuantizerConfig of `vqvae train`'s options: the kind defaults to gumbel for the dvae and ema
    otherwise; fsq's code dim and codebook size follow --levels."""
    kind = kind or ("gumbel" if model == "dvae" else "ema")
    try:
        parsed = tuple(int(v) for v in levels.split(","))
    except ValueError:
        raise vqvae.ConfigError(f"--levels must be integers separated by commas, e.g. 8,5,5,5; got {levels!r}") from None
    if kind == "fsq":
        fields.update(code_dim=len(parsed), codebook_size=math.prod(parsed))
    return vqvae.QuantizerConfig(kind=kind, levels=parsed, **fields)


def _train(model_cfg, train_cfg, out_dir: Path, resume: bool = False, log: tuple[str, ...] = ()) -> dict:
    figures = vqvae.train_autoencoder(model_cfg, train_cfg, out_dir, resume=resume, console=err, log=log)
    if world()[0] != 0:
        return figures
    run = Run(out_dir)
    with run.lock("vqvae train"):
        vqvae.save_reconstructions(run.model(), run.dataset().test, run.path / Run.RECON)
    err.print(f"wrote {_shown(out_dir)}/config.json, model.safetensors, metrics.jsonl, {Run.RECON}")
    return figures


@app.command()
def shards(folder: Path = typer.Argument(..., help="A folder of PNG/JPEG images (sub-folders included)."),
           output: Path = typer.Option(..., "-o", "--output", help="The directory to write the shards to."),
           per_shard: int = typer.Option(1000, help="Images per shard."),
           prefix: str = typer.Option("shard", help="Shard names: PREFIX-000000.tar, PREFIX-000001.tar, ..."),
           skip_bad_files: bool = typer.Option(False, "--skip-bad-files", help="Leave broken files out (with a "
                                                                                "warning) instead of stopping.")) -> None:
    """Pack a folder of images into tar shards (webdataset's layout) for `--data shards:DIR`."""
    paths = vqvae.write_shards(folder, output, prefix, per_shard, skip_bad_files,
                               warn=lambda m: err.print(f"warning: {_shown(m)}", highlight=False))
    err.print(f"wrote {len(paths)} shard(s) to {_shown(output)}: {_shown(paths[0].name)} .. {_shown(paths[-1].name)}")


@app.command("eval")
def evaluate(run: Path = RunArg,
             data: Optional[str] = typer.Option(None, help="Evaluate on this dataset URI's held-out split "
                                                           "instead of the run's own."),
             as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
             class_samples: int = typer.Option(20, "--class-samples", min=0,
                                               help="Prior samples of each class that a classifier trained on "
                                                    "the training images reads (class-conditional priors; "
                                                    "0: skip)."),
             class_temperature: float = typer.Option(1.0, "--class-temperature", min=0.0,
                                                     help="Softmax temperature of those samples."),
             class_guidance: float = typer.Option(1.0, "--class-guidance", min=0.0,
                                                  help="Guidance of those samples (see `vqvae sample --guidance`; "
                                                       "1: plain sampling).")) -> None:
    """Held-out PSNR, SSIM, MSE, bits per dimension (the VAE's ELBO; the uniform prior's for models with
    codes), perplexity and codebook usage; with a prior, its bits (float and integer models) and bits per
    dimension; with a class-conditional prior, how often a classifier recognises its samples' classes next to
    real held-out images' (sample_class_accuracy, real_class_accuracy, sample_class_ratio)."""
    figures = vqvae.evaluate_run(Run(run), data, samples_per_class=class_samples, class_temperature=class_temperature,
                                 class_guidance=class_guidance)
    _print_figures(f"held-out figures of {run}" + (f" on {data}" if data else ""), figures, as_json)


@app.command()
def reconstruct(run: Path = RunArg, images: list[Path] = ImagesArg,
                output: Path = typer.Option(..., "-o", "--output",
                                            help="One input: the output image. Several: a directory."),
                force: bool = ForceOpt, max_pixels: int = MaxPixelsOpt) -> None:
    """Encode and decode images (or sound files); outputs have the inputs' size and channels."""
    model = Run(run).model()
    targets = output_paths(images, output, ".wav" if model.cfg.dims == 1 else ".png")
    check_outputs(targets, force, sources=images)
    inputs = _load_inputs(images, model.cfg.in_channels, max_pixels, model.cfg.dims)
    for x, target in zip(inputs, targets):
        _save_output(model.reconstruct(x[None])[0], target)
        err.print(f"wrote {_shown(target)}")


def _coded_model(run: Path):
    """The run's model if it has integer codes (one grid per image, a residual VQ's with a stage axis, or a
    VQ-VAE-2's two grids), else a one-line RunError: the AE and VAE have continuous latents."""
    model = Run(run).model()
    if not model.discrete:
        raise vqvae.RunError(f"{run}: a {model.cfg.model!r} model has continuous latents, not integer codes; "
                             "`vqvae reconstruct` encodes and decodes them")
    if hasattr(model, "levels") and model.code_stages:
        raise vqvae.RunError(f"{run}: a 'vqvae2' model with residual-VQ quantizers has no codes files; "
                             "`vqvae reconstruct` encodes and decodes its images")
    return model


@app.command()
def encode(run: Path = RunArg, images: list[Path] = ImagesArg,
           output: Path = typer.Option(..., "-o", "--output", help="The .npz file of codes to write."),
           force: bool = ForceOpt, max_pixels: int = MaxPixelsOpt) -> None:
    """Images -> integer code grids, saved as .npz (codes_0, codes_1, ... with names and sizes); residual VQ's
    grids have a stage axis first; a vqvae2's bottom grids are codes_i and its top grids top_i. Models without
    codes (ae, vae) are refused."""
    check_outputs([output], force)
    model = _coded_model(run)
    encoded = [model.encode(x[None]) for x in _load_inputs(images, model.cfg.in_channels, max_pixels, model.cfg.dims)]
    two = hasattr(model, "levels")
    bottoms = [e.bottom[0] if two else e.codes[0] for e in encoded]
    vqvae.save_codes(output, bottoms, [e.size for e in encoded], [p.name for p in images],
                     model.cfg.quantizer.codebook_size, model.cfg.in_channels,
                     tops=[e.top[0] for e in encoded] if two else None)
    shapes = ", ".join(("x".join(map(str, e.top.shape[1:])) + " + " if two else "") + "x".join(map(str, b.shape))
                       for e, b in zip(encoded, bottoms))
    err.print(f"wrote {_shown(output)}: {len(encoded)} code grid(s) of {shapes}, "
              f"K={model.cfg.quantizer.codebook_size}")


@app.command()
def decode(run: Path = RunArg,
           codes: Path = typer.Argument(..., help="A .npz file written by `vqvae encode`."),
           output: Path = typer.Option(..., "-o", "--output",
                                       help="One code grid: the output image (or a directory). Several: a "
                                            "directory, one image per grid named after its source file "
                                            "(x.png, x-2.png, ... where sources share a name)."),
           force: bool = ForceOpt) -> None:
    """Code grids (.npz from `vqvae encode`) -> images, at the encoded images' sizes."""
    model = _coded_model(run)
    entries = vqvae.load_codes(codes, model.cfg.quantizer.codebook_size, model.cfg.dims, model.cfg.downsample,
                               stages=getattr(model.quantizer, "num_stages", 0), top=hasattr(model, "levels"))
    names = [name for name, _, _ in entries]
    targets = output_paths(names, output, ".wav" if model.cfg.dims == 1 else ".png", unique=True)
    check_outputs(targets, force, sources=names)
    for (name, grid, size), target in zip(entries, targets):
        batch = tuple(g[None] for g in grid) if isinstance(grid, tuple) else grid[None]  # VQ-VAE-2: (top, bottom)
        _save_output(model.decode(batch, size)[0], target)
        err.print(f"wrote {_shown(target)}")


# -- the prior -----------------------------------------------------------------------------------------

PRIOR_DEFAULTS = dict(arch="transformer", steps=4000, batch_size=64, lr=2e-3, layers=4, width=64, heads=4,
                      dropout=0.0, shifts=1)


@app.command()
def prior(run: Path = RunArg,
          arch: str = typer.Option(PRIOR_DEFAULTS["arch"], help="transformer (causal attention) or pixelcnn (gated)."),
          steps: int = typer.Option(PRIOR_DEFAULTS["steps"], help="Training steps."),
          max_seconds: float = typer.Option(0.0, help="Stop after this much training time (0: no limit)."),
          batch_size: int = typer.Option(PRIOR_DEFAULTS["batch_size"]),
          lr: float = typer.Option(PRIOR_DEFAULTS["lr"]),
          layers: int = typer.Option(PRIOR_DEFAULTS["layers"], help="Transformer blocks / gated PixelCNN layers."),
          width: int = typer.Option(PRIOR_DEFAULTS["width"], help="Embedding width (channels)."),
          heads: int = typer.Option(PRIOR_DEFAULTS["heads"], help="Attention heads (transformer)."),
          dropout: float = typer.Option(PRIOR_DEFAULTS["dropout"]),
          shifts: int = typer.Option(PRIOR_DEFAULTS["shifts"],
                                     help="Also train on codes of the images shifted by up to this many pixels."),
          seed: int = typer.Option(0),
          device: str = typer.Option("auto"),
          precision: str = typer.Option("fp32", help="fp32, bf16 or fp16 (autocast for the prior; fp16 needs CUDA)."),
          eval_every: int = typer.Option(0, "--eval-every", help=EVAL_HELP.replace("model.best", "prior/model.best")),
          resume: bool = typer.Option(False, "--resume", help="Continue the run's prior from its last checkpoint."),
          force: bool = typer.Option(False, "--force", help="Replace an existing prior."),
          as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
          log: list[str] = LogOpt) -> None:
    """Learn an autoregressive prior over the run's codes (saved under RUN/prior/, with its integer model
    for the range coder under RUN/prior/integer/); print held-out bits."""
    figures = _prior(run, arch=arch, steps=steps, max_seconds=max_seconds, batch_size=batch_size, lr=lr,
                     layers=layers, width=width, heads=heads, dropout=dropout, shifts=shifts, seed=seed,
                     device=device, precision=precision, resume=resume, force=force, eval_every=eval_every,
                     log=tuple(log))
    if world()[0] == 0:  # under torchrun: one report, from rank 0
        _print_with_warning(f"held-out code likelihood of {run}", figures, as_json)


def _prior(run: Path, steps: int, seed: int = 0, max_seconds: float = 0.0, device: str = "auto",
           precision: str = "fp32", resume: bool = False, force: bool = False, eval_every: int = 0,
           log: tuple[str, ...] = (),
           **options) -> dict:
    options = {**PRIOR_DEFAULTS, **options}
    tcfg = vqvae.TrainConfig(data="codes", steps=steps, max_seconds=max_seconds, batch_size=options["batch_size"],
                             lr=options["lr"], seed=seed, device=device, precision=precision,
                             warmup_steps=200, eval_every=eval_every)
    overrides = dict(arch=options["arch"], n_layer=options["layers"], n_embd=options["width"],
                     n_head=options["heads"], dropout=options["dropout"])
    figures = vqvae.train_prior(run, overrides, tcfg, shifts=options["shifts"], resume=resume, force=force,
                                console=err, log=log)
    if world()[0] == 0:
        err.print(f"wrote {_shown(Run(run).prior_dir)}/config.json, model.safetensors, metrics.jsonl")
    return figures


@app.command()
def sample(run: Path = RunArg,
           n: int = typer.Option(64, "-n", help="Number of samples (with classes and no --label: n / classes per row)."),
           temperature: float = typer.Option(1.0, help="Softmax temperature; 0 is greedy."),
           top_k: Optional[int] = typer.Option(None, help="Sample only among the k most likely codes."),
           label: Optional[int] = typer.Option(None, help="Class to sample (class-conditional priors)."),
           guidance: float = typer.Option(1.0, help="Class-conditional priors: > 1 draws codes that tell the class "
                                                    "apart more strongly (the prior's own class posterior as "
                                                    "classifier-free guidance); 1 is plain sampling."),
           seed: int = typer.Option(0),
           output: Path = typer.Option(Path("samples.png"), "-o", "--output", help="The grid image to write."),
           force: bool = ForceOpt) -> None:
    """Sample codes from the learned prior, decode them, and write a grid of images (a sound model: WAV
    files OUTPUT-000.wav, ... and their spectrograms in OUTPUT)."""
    check_outputs([output], force)
    r = Run(run)
    model = r.model()
    images, nrow = vqvae.sample_images(model, r.prior(), n, label, temperature, top_k, seed, guidance)
    if model.cfg.dims == 1:
        check_outputs(vqvae.sample_targets(output, len(images)), force)
        written = vqvae.save_audio_samples(images, output)
        err.print(f"wrote {_shown(written[0])} and {len(written) - 1} WAV files next to it: {len(images)} samples"
                  + (f" ({nrow} per class, in class order)" if nrow else ""))
        return
    vqvae.save_grid(images, output, nrow=nrow, scale=2)
    err.print(f"wrote {_shown(output)}: {len(images)} samples" + (" (one row per class)" if nrow else ""))


# -- compression ---------------------------------------------------------------------------------------


@app.command()
def compress(run: Path = RunArg, images: list[Path] = ImagesArg,
             output: Path = typer.Option(..., "-o", "--output", help="The .vqz file to write."),
             coder: str = typer.Option("range", help="range (the learned prior) or huffman (static code table)."),
             stages: Optional[int] = typer.Option(None, "--stages", help="Residual-VQ runs: code the first S "
                                                  "stages only (fewer bytes, lower quality; default all)."),
             as_json: bool = typer.Option(False, "--json", help="Print one JSON object of sizes."),
             force: bool = ForceOpt, max_pixels: int = MaxPixelsOpt) -> None:
    """Compress one or many images into one .vqz file with the run's learned prior (decompress reads the
    stages a file holds from its header)."""
    check_outputs([output], force)
    r = Run(run)
    try:
        model = r.model()
        data, stats = r.compress(_load_inputs(images, model.cfg.in_channels, max_pixels, model.cfg.dims), coder,
                                 stages)
    except VQVAEError as e:
        raise _naming_inputs(e, images) from None
    vqvae.write_bytes(output, data)
    figures = {k: stats[k] for k in ("bytes", "header_bytes", "payload_bytes", "bits_per_image",
                                     "cross_entropy_bits", "overhead", "num_images", "coder", "stages")}
    err.print(f"wrote {_shown(output)}: {len(data)} bytes for {len(images)} image(s)")
    _print_figures(f"{output}", figures, as_json)


@app.command()
def decompress(run: Path = RunArg,
               file: Path = typer.Argument(..., help="A .vqz file written by `vqvae compress`."),
               output: Path = typer.Option(..., "-o", "--output",
                                           help="One image: the output file. Several: a directory."),
               force: bool = ForceOpt, max_pixels: int = typer.Option(
                   MAX_PIXELS, "--max-pixels", help="Refuse files whose images hold more pixels than this.")) -> None:
    """Decode a .vqz file back to images at their original sizes (several: 00000.png, 00001.png, ...);
    sound as WAV files."""
    if not file.is_file():
        raise vqvae.CodecError(f"{file}: {'is a directory' if file.is_dir() else 'no such file'}")
    data = file.read_bytes()
    header = vqvae.read_header(data)  # every target is checked before any work
    suffix = ".wav" if len(header.shapes[0]) == 2 else ".png"  # (C, T): sound
    targets = output_paths([f"{i:05d}{suffix}" for i in range(header.num_images)], output, suffix)
    check_outputs(targets, force)
    decoded = Run(run).decompress(data, max_pixels)
    for image, target in zip(decoded, targets):
        _save_output(image, target)
    err.print(f"wrote {len(decoded)} image(s) to {_shown(output)}")


# -- the family side by side -------------------------------------------------------------------------------


@app.command("compare")
def compare_cmd(
    data: str = typer.Option("mnist", help="Dataset URI (as for `vqvae train`)."),
    steps: int = typer.Option(1500, help="Training steps of every model."),
    models: str = typer.Option(",".join(vqvae.MODEL_VARIANTS),
                               help=f"Comma-separated, from {', '.join(vqvae.MODEL_VARIANTS)} (fsq and rvq are "
                                    "VQ-VAEs with those quantizers)."),
    prior_steps: int = typer.Option(0, help="Also train a prior this many steps on single-grid codes (vqvae, "
                                            "dvae, fsq): learned-prior bits/dim and .vqz bits per image."),
    out_dir: Path = typer.Option(Path("runs/compare"), "--out", help="Directory of the runs (one per model) and "
                                                                     "of compare.json, compare.md, compare.png."),
    batch_size: int = typer.Option(32),
    lr: float = typer.Option(2e-3),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    force: bool = typer.Option(False, "--force", help="Replace runs that exist under --out."),
) -> None:
    """Train each model at the same step budget, one run each under --out, and print one table of held-out
    PSNR, SSIM, bits per dimension, codebook use, training time and .vqz size (also as JSON, Markdown, PNG)."""
    names = [m.strip() for m in models.split(",") if m.strip()]
    tcfg = vqvae.TrainConfig(data=data, steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device)
    rows = vqvae.compare_models(data, names, out_dir, steps, prior_steps=prior_steps, train=tcfg, force=force,
                                console=err)
    settings = vqvae.comparison_settings(data, names, steps, prior_steps, tcfg, None)
    paths = vqvae.write_comparison(rows, out_dir, settings)
    out.print(vqvae.comparison_table(rows, _shown(f"held-out {data}, {steps} steps each")))
    err.print("wrote " + ", ".join(_shown(p) for p in paths))


# -- looking at a run ---------------------------------------------------------------------------------------


@app.command()
def report(run: Path = RunArg,
           output: Optional[Path] = typer.Option(None, "-o", "--output", help="The HTML file (RUN/report.html).")) -> None:
    """Write one self-contained HTML page of the run: curves, codebook use, reconstructions, code grids,
    samples and rate-distortion against PNG, JPEG and WebP (needs the `report` extra: matplotlib)."""
    path = vqvae.write_report(Run(run), output)
    err.print(f"wrote {_shown(path)}")


@app.command()
def serve(run: Path = RunArg,
          port: int = typer.Option(8000, help="TCP port."),
          host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface; the page "
                                                      "has no authentication).")) -> None:
    """A local web page: draw or upload a digit, see its codes and reconstruction, edit codes, sample
    (needs the `serve` extra: starlette, uvicorn)."""
    r = Run(run)
    r.model()  # a path that is not a run is one line here, before anything listens
    vqvae.run_server(r, host=host, port=port,
                     announce=lambda: err.print(f"serving {_shown(run)} on http://{host}:{port} (Ctrl-C stops)"))


# -- everything at once ------------------------------------------------------------------------------------

DEMO_STEPS, DEMO_PRIOR_STEPS = 8000, 2000
SPEECH_STEPS, SPEECH_PRIOR_STEPS = 1000, 500  # --data speech: under 10 minutes on 2 shared CPU cores


@app.command()
def demo(out_dir: Path = typer.Option(Path("runs/demo"), "--out",
                                      help="Run directory to write; an earlier run there is replaced."),
         steps: Optional[int] = typer.Option(None, help=f"VQ-VAE training steps (default {DEMO_STEPS}, about 3 "
                                                        f"minutes on 2 CPU cores; speech {SPEECH_STEPS})."),
         prior_steps: Optional[int] = typer.Option(None, help=f"Prior training steps (default {DEMO_PRIOR_STEPS}, "
                                                              f"about 3 minutes; speech {SPEECH_PRIOR_STEPS})."),
         data: str = typer.Option("mnist", "--data", help="mnist (images) or speech (spoken digits: the 1-D "
                                                          "VQ-VAE, a prior, sampled speech, audio compression)."),
         seed: int = typer.Option(0),
         force: bool = typer.Option(False, "--force", help="Replace --out even if it holds files that are no "
                                                           "part of a vqvae run (they are deleted).")) -> None:
    """The whole pipeline on the bundled MNIST digits: VQ-VAE, prior, samples, compression.

    Budgets are step counts, not seconds, so the figures are the same on a busy or a fast machine.
    --out is replaced only if it is empty or holds a vqvae run (or with --force).
    """
    if data not in ("mnist", "speech"):
        raise vqvae.ConfigError(f"--data must be mnist or speech, got {data!r}")
    run = Run(out_dir)
    with run.lock("vqvae demo", create=True):
        run.clear(force)
        if data == "speech":
            _demo_speech(out_dir, steps or SPEECH_STEPS, prior_steps or SPEECH_PRIOR_STEPS, seed)
        else:
            _demo(out_dir, steps or DEMO_STEPS, prior_steps or DEMO_PRIOR_STEPS, seed)


def _demo(out_dir: Path, steps: int, prior_steps: int, seed: int) -> None:
    err.rule("1/4  VQ-VAE on 4,500 MNIST digits")
    figures = _train(vqvae.ModelConfig(), vqvae.TrainConfig(data="mnist", steps=steps, seed=seed), out_dir)
    _print_figures("held-out MNIST (500 digits)", figures, False)

    err.rule("2/4  prior over the 7x7 code grids")
    _print_figures(f"held-out code likelihood of {out_dir}", _prior(out_dir, steps=prior_steps, seed=seed, force=True),
                   False)

    err.rule("3/4  samples")
    sample(out_dir, n=60, temperature=1.0, top_k=None, label=None, guidance=1.0, seed=seed,
           output=out_dir / Run.SAMPLES, force=True)

    err.rule("4/4  compression of the 500 held-out digits")
    table = vqvae.compression_table(Run(out_dir), figures["psnr"], write=out_dir / Run.HELDOUT)
    _print_figures("bytes per held-out digit", table, False)

    err.rule("report")
    try:
        report(out_dir, output=None)
    except VQVAEError as e:  # e.g. matplotlib missing: the run itself is complete
        err.print(f"no report: {_shown(e)}")


def _demo_speech(out_dir: Path, steps: int, prior_steps: int, seed: int) -> None:
    err.rule("1/4  1-D VQ-VAE on spoken digits (16 kHz -> 250 codes/s)")
    tcfg = vqvae.TrainConfig(data="speech", steps=steps, batch_size=16, seed=seed, log_every=20)
    figures = _train(vqvae.SPEECH_MODEL, tcfg, out_dir)
    _print_figures("held-out speakers", {k: v for k, v in figures.items() if k != "ssim"}, False)

    err.rule("2/4  prior over the code sequences, conditional on the digit")
    figures = _prior(out_dir, steps=prior_steps, seed=seed, force=True, batch_size=16, shifts=0, layers=2, width=32)
    _print_figures(f"held-out code likelihood of {out_dir}", figures, False)

    err.rule("3/4  samples: one of each digit")
    sample(out_dir, n=10, temperature=1.0, top_k=None, label=None, guidance=1.0, seed=seed,
           output=out_dir / Run.SAMPLES, force=True)

    err.rule("4/4  compression of held-out clips (one .vqz file per clip)")
    _print_figures("bytes per held-out clip", vqvae.audio_compression_table(Run(out_dir), limit=50), False)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app; boundary errors become one line on stderr and exit code 2."""
    try:
        app(args=argv, standalone_mode=False)
    except VQVAEError as e:
        err.print(f"[red]error:[/red] {_shown(e)}", highlight=False, soft_wrap=True)
        return 2
    except vqvae.Stopped as e:
        err.print(_shown(e))
        return 130
    except typer.Abort as e:
        if isinstance(e.__cause__, EOFError):  # click turns EOFError into Abort: a file ended early, not Ctrl-C
            err.print(f"[red]error:[/red] a file ended early ({_shown(e.__cause__) or 'EOFError'})",
                      highlight=False, soft_wrap=True)
            return 2
        return 130
    except KeyboardInterrupt:
        return 130
    except typer.Exit as e:
        return e.exit_code
    except Exception as e:
        if hasattr(e, "show") and hasattr(e, "exit_code"):  # usage errors: unknown option, missing argument
            e.show()
            return e.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
