"""The `vqvae` command: thin wrappers that parse arguments, call the public API and print what they wrote.

Errors at the boundary (`VQVAEError`) become one line on stderr and exit code 2. Paths are printed with
Rich markup escaped (a file may be called "scan [draft].png"). Outputs are checked before the first one is
written: two outputs with one name, an existing file without --force, or a target that cannot be written
are refused.
"""

from __future__ import annotations

import json
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
ImagesArg = typer.Argument(..., help="Image files (PNG/JPEG, any size).")
ForceOpt = typer.Option(False, "--force", help="Replace output files that exist.")
MaxPixelsOpt = typer.Option(MAX_PIXELS, "--max-pixels", help="Refuse input images of more pixels than this.")
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


def _load_inputs(paths: list[Path], channels: int, max_pixels: int = MAX_PIXELS) -> list:
    """Image files as (C, H, W) tensors with the model's channel count (gray <-> RGB converted)."""
    return [vqvae.to_channels(x, channels) for x in vqvae.load_images(paths, max_pixels)]


def _naming_inputs(error: VQVAEError, paths: list[Path]) -> VQVAEError:
    """The library counts images ("image 3 is ..."); the user gave files: name the file instead."""
    match = re.match(r"image (\d+)\b", str(error))
    if match and int(match.group(1)) < len(paths):
        return type(error)(f"{paths[int(match.group(1))]}{str(error)[match.end():]}")
    return error


# -- the autoencoder ---------------------------------------------------------------------------------------


@app.command()
def train(
    data: str = typer.Option("mnist", help="Dataset URI: mnist, digits, photos, folder:PATH, npy:PATH."),
    out_dir: Path = typer.Option(Path("runs/mnist"), "--out", help="Run directory to write."),
    steps: int = typer.Option(8000, help="Training steps (the schedule runs over them)."),
    max_seconds: float = typer.Option(0.0, help="Stop after this much training time (0: no limit)."),
    batch_size: int = typer.Option(32),
    lr: float = typer.Option(2e-3, help="Peak learning rate (Adam; warmup, then cosine decay)."),
    quantizer: str = typer.Option("ema", help="Codebook learning: 'ema' (moving averages) or 'vq' (gradient)."),
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
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    as_json: bool = typer.Option(False, "--json", help="Print held-out figures as one JSON object."),
    log: list[str] = LogOpt,
) -> None:
    """Train a VQ-VAE and write config.json, model.safetensors, metrics.jsonl and recon.png to --out."""
    qcfg = vqvae.QuantizerConfig(codebook_size=codebook_size, code_dim=code_dim, commitment_weight=beta,
                                 kind=quantizer, kmeans_init=kmeans, dead_code_steps=dead_code_steps)
    mcfg = vqvae.ModelConfig(hidden=hidden, res_hidden=res_hidden, res_blocks=res_blocks, downsample=downsample,
                             encoder_kernel=encoder_kernel, quantizer=qcfg)
    tcfg = vqvae.TrainConfig(data=data, steps=steps, max_seconds=max_seconds, batch_size=batch_size, lr=lr,
                             seed=seed, device=device, precision=precision, checkpoint_every=checkpoint_every,
                             log_every=log_every)
    figures = _train(mcfg, tcfg, out_dir, resume, tuple(log))
    if world()[0] == 0:  # under torchrun: one report, from rank 0
        _print_figures(f"held-out figures of {out_dir}", figures, as_json)


def _train(model_cfg, train_cfg, out_dir: Path, resume: bool = False, log: tuple[str, ...] = ()) -> dict:
    figures = vqvae.train_autoencoder(model_cfg, train_cfg, out_dir, resume=resume, console=err, log=log)
    if world()[0] != 0:
        return figures
    run = Run(out_dir)
    with run.lock("vqvae train"):
        vqvae.save_reconstructions(run.model(), run.dataset().test, run.path / Run.RECON)
    err.print(f"wrote {_shown(out_dir)}/config.json, model.safetensors, metrics.jsonl, {Run.RECON}")
    return figures


@app.command("eval")
def evaluate(run: Path = RunArg,
             data: Optional[str] = typer.Option(None, help="Evaluate on this dataset URI's held-out split "
                                                           "instead of the run's own."),
             as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Held-out PSNR, SSIM, MSE, perplexity, codebook usage; with a prior, its bits (float and integer
    models) and bits per dimension."""
    figures = vqvae.evaluate_run(Run(run), data)
    _print_figures(f"held-out figures of {run}" + (f" on {data}" if data else ""), figures, as_json)


@app.command()
def reconstruct(run: Path = RunArg, images: list[Path] = ImagesArg,
                output: Path = typer.Option(..., "-o", "--output",
                                            help="One input: the output image. Several: a directory."),
                force: bool = ForceOpt, max_pixels: int = MaxPixelsOpt) -> None:
    """Encode and decode images; outputs have the inputs' size and channels."""
    targets = output_paths(images, output, ".png")
    check_outputs(targets, force, sources=images)
    model = Run(run).model()
    inputs = _load_inputs(images, model.cfg.in_channels, max_pixels)
    for x, target in zip(inputs, targets):
        vqvae.save_image(model.reconstruct(x[None])[0], target)
        err.print(f"wrote {_shown(target)}")


@app.command()
def encode(run: Path = RunArg, images: list[Path] = ImagesArg,
           output: Path = typer.Option(..., "-o", "--output", help="The .npz file of codes to write."),
           force: bool = ForceOpt, max_pixels: int = MaxPixelsOpt) -> None:
    """Images -> integer code grids, saved as .npz (codes_0, codes_1, ... with names and sizes)."""
    check_outputs([output], force)
    model = Run(run).model()
    encoded = [model.encode(x[None]) for x in _load_inputs(images, model.cfg.in_channels, max_pixels)]
    vqvae.save_codes(output, [e.codes[0] for e in encoded], [e.size for e in encoded], [p.name for p in images],
                     model.cfg.quantizer.codebook_size, model.cfg.in_channels)
    shapes = ", ".join("x".join(map(str, e.codes.shape[1:])) for e in encoded)
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
    model = Run(run).model()
    entries = vqvae.load_codes(codes, model.cfg.quantizer.codebook_size, model.cfg.dims, model.cfg.downsample)
    names = [name for name, _, _ in entries]
    targets = output_paths(names, output, ".png", unique=True)
    check_outputs(targets, force, sources=names)
    for (name, grid, size), target in zip(entries, targets):
        vqvae.save_image(model.decode(grid[None], size)[0], target)
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
          resume: bool = typer.Option(False, "--resume", help="Continue the run's prior from its last checkpoint."),
          force: bool = typer.Option(False, "--force", help="Replace an existing prior."),
          as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
          log: list[str] = LogOpt) -> None:
    """Learn an autoregressive prior over the run's codes (saved under RUN/prior/, with its integer model
    for the range coder under RUN/prior/integer/); print held-out bits."""
    figures = _prior(run, arch=arch, steps=steps, max_seconds=max_seconds, batch_size=batch_size, lr=lr,
                     layers=layers, width=width, heads=heads, dropout=dropout, shifts=shifts, seed=seed,
                     device=device, precision=precision, resume=resume, force=force, log=tuple(log))
    _print_figures(f"held-out code likelihood of {run}", figures, as_json)


def _prior(run: Path, steps: int, seed: int = 0, max_seconds: float = 0.0, device: str = "auto",
           precision: str = "fp32", resume: bool = False, force: bool = False, log: tuple[str, ...] = (),
           **options) -> dict:
    options = {**PRIOR_DEFAULTS, **options}
    tcfg = vqvae.TrainConfig(data="codes", steps=steps, max_seconds=max_seconds, batch_size=options["batch_size"],
                             lr=options["lr"], seed=seed, device=device, precision=precision,
                             warmup_steps=200)
    overrides = dict(arch=options["arch"], n_layer=options["layers"], n_embd=options["width"],
                     n_head=options["heads"], dropout=options["dropout"])
    figures = vqvae.train_prior(run, overrides, tcfg, shifts=options["shifts"], resume=resume, force=force,
                                console=err, log=log)
    err.print(f"wrote {_shown(Run(run).prior_dir)}/config.json, model.safetensors, metrics.jsonl")
    return figures


@app.command()
def sample(run: Path = RunArg,
           n: int = typer.Option(64, "-n", help="Number of samples (with classes and no --label: n / classes per row)."),
           temperature: float = typer.Option(1.0, help="Softmax temperature; 0 is greedy."),
           top_k: Optional[int] = typer.Option(None, help="Sample only among the k most likely codes."),
           label: Optional[int] = typer.Option(None, help="Class to sample (class-conditional priors)."),
           seed: int = typer.Option(0),
           output: Path = typer.Option(Path("samples.png"), "-o", "--output", help="The grid image to write."),
           force: bool = ForceOpt) -> None:
    """Sample codes from the learned prior, decode them, and write a grid of images."""
    check_outputs([output], force)
    r = Run(run)
    images, nrow = vqvae.sample_images(r.model(), r.prior(), n, label, temperature, top_k, seed)
    vqvae.save_grid(images, output, nrow=nrow, scale=2)
    err.print(f"wrote {_shown(output)}: {len(images)} samples" + (" (one row per class)" if nrow else ""))


# -- compression ---------------------------------------------------------------------------------------


@app.command()
def compress(run: Path = RunArg, images: list[Path] = ImagesArg,
             output: Path = typer.Option(..., "-o", "--output", help="The .vqz file to write."),
             coder: str = typer.Option("range", help="range (the learned prior) or huffman (static code table)."),
             as_json: bool = typer.Option(False, "--json", help="Print one JSON object of sizes."),
             force: bool = ForceOpt, max_pixels: int = MaxPixelsOpt) -> None:
    """Compress one or many images into one .vqz file with the run's learned prior."""
    check_outputs([output], force)
    r = Run(run)
    try:
        data, stats = r.compress(_load_inputs(images, r.model().cfg.in_channels, max_pixels), coder)
    except VQVAEError as e:
        raise _naming_inputs(e, images) from None
    vqvae.write_bytes(output, data)
    figures = {k: stats[k] for k in ("bytes", "header_bytes", "payload_bytes", "bits_per_image",
                                     "cross_entropy_bits", "overhead", "num_images", "coder")}
    err.print(f"wrote {_shown(output)}: {len(data)} bytes for {len(images)} image(s)")
    _print_figures(f"{output}", figures, as_json)


@app.command()
def decompress(run: Path = RunArg,
               file: Path = typer.Argument(..., help="A .vqz file written by `vqvae compress`."),
               output: Path = typer.Option(..., "-o", "--output",
                                           help="One image: the output file. Several: a directory."),
               force: bool = ForceOpt, max_pixels: int = typer.Option(
                   MAX_PIXELS, "--max-pixels", help="Refuse files whose images hold more pixels than this.")) -> None:
    """Decode a .vqz file back to images at their original sizes (several: 00000.png, 00001.png, ...)."""
    if not file.is_file():
        raise vqvae.CodecError(f"{file}: {'is a directory' if file.is_dir() else 'no such file'}")
    data = file.read_bytes()
    count = vqvae.read_header(data).num_images  # every target is checked before any work
    targets = output_paths([f"{i:05d}.png" for i in range(count)], output, ".png")
    check_outputs(targets, force)
    decoded = Run(run).decompress(data, max_pixels)
    for image, target in zip(decoded, targets):
        vqvae.save_image(image.cpu(), target)
    err.print(f"wrote {len(decoded)} image(s) to {_shown(output)}")


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
    err.print(f"serving {_shown(run)} on http://{host}:{port} (Ctrl-C stops)")
    vqvae.run_server(r, host=host, port=port)


# -- everything at once ------------------------------------------------------------------------------------

DEMO_STEPS, DEMO_PRIOR_STEPS = 8000, 2000


@app.command()
def demo(out_dir: Path = typer.Option(Path("runs/demo"), "--out",
                                      help="Run directory to write; an earlier run there is replaced."),
         steps: int = typer.Option(DEMO_STEPS, help="VQ-VAE training steps (about 3 minutes on 2 CPU cores)."),
         prior_steps: int = typer.Option(DEMO_PRIOR_STEPS, help="Prior training steps (about 3 minutes)."),
         seed: int = typer.Option(0),
         force: bool = typer.Option(False, "--force", help="Replace --out even if it holds files that are no "
                                                           "part of a vqvae run (they are deleted).")) -> None:
    """The whole pipeline on the bundled MNIST digits: VQ-VAE, prior, samples, compression.

    Budgets are step counts, not seconds, so the figures are the same on a busy or a fast machine.
    --out is replaced only if it is empty or holds a vqvae run (or with --force).
    """
    run = Run(out_dir)
    with run.lock("vqvae demo", create=True):
        run.clear(force)
        _demo(out_dir, steps, prior_steps, seed)


def _demo(out_dir: Path, steps: int, prior_steps: int, seed: int) -> None:
    err.rule("1/4  VQ-VAE on 4,500 MNIST digits")
    figures = _train(vqvae.ModelConfig(), vqvae.TrainConfig(data="mnist", steps=steps, seed=seed), out_dir)
    _print_figures("held-out MNIST (500 digits)", figures, False)

    err.rule("2/4  prior over the 7x7 code grids")
    _print_figures(f"held-out code likelihood of {out_dir}", _prior(out_dir, steps=prior_steps, seed=seed, force=True),
                   False)

    err.rule("3/4  samples")
    sample(out_dir, n=60, temperature=1.0, top_k=None, label=None, seed=seed, output=out_dir / Run.SAMPLES,
           force=True)

    err.rule("4/4  compression of the 500 held-out digits")
    table = vqvae.compression_table(Run(out_dir), figures["psnr"], write=out_dir / Run.HELDOUT)
    _print_figures("bytes per held-out digit", table, False)

    err.rule("report")
    try:
        report(out_dir, output=None)
    except VQVAEError as e:  # e.g. matplotlib missing: the run itself is complete
        err.print(f"no report: {_shown(e)}")


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
