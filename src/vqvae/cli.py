"""The `vqvae` command: thin wrappers that parse arguments, call the library and print what they wrote.

Errors at the boundary (`VQVAEError`) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import VQVAEError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Vector-quantized autoencoders: train, evaluate, encode to discrete codes, decode.")
out = Console()
err = Console(stderr=True)

RunArg = typer.Argument(..., help="Run directory written by `vqvae train`.")


def _print_figures(title: str, figures: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(figures))
        return
    table = Table(title=title, show_header=False)
    for key, value in figures.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    out.print(table)


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
    checkpoint_every: int = typer.Option(500, help="Write a checkpoint every this many steps."),
    log_every: int = typer.Option(50, help="Append to metrics.jsonl every this many steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    as_json: bool = typer.Option(False, "--json", help="Print held-out figures as one JSON object."),
) -> None:
    """Train a VQ-VAE and write config.json, model.safetensors, metrics.jsonl and recon.png to --out."""
    from .config import ModelConfig, QuantizerConfig, TrainConfig
    from .train import train_autoencoder

    qcfg = QuantizerConfig(codebook_size=codebook_size, code_dim=code_dim, commitment_weight=beta, kind=quantizer,
                           kmeans_init=kmeans, dead_code_steps=dead_code_steps)
    mcfg = ModelConfig(hidden=hidden, res_hidden=res_hidden, res_blocks=res_blocks, downsample=downsample,
                       encoder_kernel=encoder_kernel, quantizer=qcfg)
    tcfg = TrainConfig(data=data, steps=steps, max_seconds=max_seconds, batch_size=batch_size, lr=lr,
                       seed=seed, device=device, checkpoint_every=checkpoint_every, log_every=log_every)
    figures = train_autoencoder(mcfg, tcfg, out_dir, resume=resume, console=err)
    _write_recon(out_dir)
    err.print(f"wrote {out_dir}/config.json, model.safetensors, metrics.jsonl, recon.png")
    _print_figures(f"held-out figures of {out_dir}", figures, as_json)


def _write_recon(run: Path, n: int = 32) -> Path:
    """recon.png: `n` held-out images above their reconstructions."""
    import torch

    from .autoencoders import VQVAE, read_run_config
    from .data import load_dataset, pad_to_multiple, unpad
    from .report import save_comparison

    model = VQVAE.from_pretrained(run)
    test = load_dataset(read_run_config(run)["data"]["uri"]).test
    x = test[torch.linspace(0, len(test) - 1, min(n, len(test))).long()]  # spread over the split (all classes)
    padded, pad = pad_to_multiple(x, model.cfg.downsample)
    save_comparison(x, unpad(model.reconstruct(padded), pad), run / "recon.png")
    return run / "recon.png"


@app.command("eval")
def evaluate(run: Path = RunArg,
             as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Held-out PSNR, SSIM, MSE, perplexity and codebook usage of a trained run."""
    from .autoencoders import VQVAE, read_run_config
    from .data import load_dataset, pad_to_multiple
    from .metrics import evaluate_autoencoder

    model = VQVAE.from_pretrained(run)
    test = load_dataset(read_run_config(run)["data"]["uri"]).test
    figures = evaluate_autoencoder(model, pad_to_multiple(test, model.cfg.downsample)[0])
    figures.update(_bits_per_dim(run))
    _print_figures(f"held-out figures of {run}", figures, as_json)


@app.command()
def reconstruct(run: Path = RunArg,
                images: list[Path] = typer.Argument(..., help="Image files (PNG/JPEG, any size)."),
                output: Path = typer.Option(..., "-o", "--output",
                                            help="One input: the output image. Several: a directory.")) -> None:
    """Encode and decode images; outputs have the inputs' size and channels."""
    from .autoencoders import VQVAE
    from .data import load_images, pad_to_multiple, save_image, unpad

    model = VQVAE.from_pretrained(run)
    inputs = _check_channels(load_images(images), model, images)
    targets = _output_paths(images, output, ".png")
    for x, target in zip(inputs, targets):
        padded, pad = pad_to_multiple(x[None], model.cfg.downsample)
        save_image(unpad(model.reconstruct(padded), pad)[0], target)
        err.print(f"wrote {target}")


@app.command()
def encode(run: Path = RunArg,
           images: list[Path] = typer.Argument(..., help="Image files (PNG/JPEG, any size)."),
           output: Path = typer.Option(..., "-o", "--output", help="The .npz file of codes to write.")) -> None:
    """Images -> integer code grids, saved as .npz (codes_0, codes_1, ... with names and paddings)."""
    import numpy as np

    from .autoencoders import VQVAE
    from .data import load_images, pad_to_multiple

    model = VQVAE.from_pretrained(run)
    inputs = _check_channels(load_images(images), model, images)
    arrays: dict[str, np.ndarray] = {"names": np.array([p.name for p in images]),
                                     "channels": np.array(model.cfg.in_channels)}
    for i, x in enumerate(inputs):
        padded, pad = pad_to_multiple(x[None], model.cfg.downsample)
        arrays[f"codes_{i}"] = model.encode(padded)[0].numpy().astype(np.int32)
        arrays[f"pad_{i}"] = np.array(pad)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(output)
    shapes = ", ".join("x".join(map(str, arrays[f"codes_{i}"].shape)) for i in range(len(inputs)))
    err.print(f"wrote {output}: {len(inputs)} code grid(s) of {shapes}, K={model.cfg.quantizer.codebook_size}")


@app.command()
def decode(run: Path = RunArg,
           codes: Path = typer.Argument(..., help="A .npz file written by `vqvae encode`."),
           output: Path = typer.Option(..., "-o", "--output", help="Directory for the decoded images.")) -> None:
    """Code grids (.npz from `vqvae encode`) -> images, at the encoded images' sizes."""
    import numpy as np
    import torch

    from .autoencoders import VQVAE
    from .data import save_image, unpad
    from .errors import DataError

    model = VQVAE.from_pretrained(run)
    K = model.cfg.quantizer.codebook_size
    try:
        with np.load(codes, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{codes}: not a codes file written by `vqvae encode` ({e})") from None
    if "names" not in arrays:
        raise DataError(f"{codes}: not a codes file written by `vqvae encode` (no 'names' entry)")
    output.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(arrays["names"]):
        grid = arrays.get(f"codes_{i}")
        if grid is None or grid.ndim != model.cfg.dims or grid.min() < 0 or grid.max() >= K:
            raise DataError(f"{codes}: entry codes_{i} is missing or not a code grid with values in 0..{K - 1}")
        x = unpad(model.decode(torch.from_numpy(grid.astype(np.int64))[None]).clamp(0, 1),
                  tuple(int(v) for v in arrays[f"pad_{i}"]))
        target = output / (Path(str(name)).stem + ".png")
        save_image(x[0].detach(), target)
        err.print(f"wrote {target}")


@app.command()
def prior(run: Path = RunArg,
          arch: str = typer.Option("transformer", help="transformer (causal attention) or pixelcnn (gated)."),
          steps: int = typer.Option(4000, help="Training steps."),
          max_seconds: float = typer.Option(0.0, help="Stop after this much training time (0: no limit)."),
          batch_size: int = typer.Option(64),
          lr: float = typer.Option(2e-3),
          layers: int = typer.Option(4, help="Transformer blocks / gated PixelCNN layers."),
          width: int = typer.Option(64, help="Embedding width (channels)."),
          heads: int = typer.Option(4, help="Attention heads (transformer)."),
          dropout: float = typer.Option(0.0),
          shifts: int = typer.Option(1, help="Also train on codes of the images shifted by up to this many pixels."),
          seed: int = typer.Option(0),
          device: str = typer.Option("auto"),
          resume: bool = typer.Option(False, "--resume", help="Continue the run's prior from its last checkpoint."),
          force: bool = typer.Option(False, "--force", help="Replace an existing prior."),
          as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Learn an autoregressive prior over the run's codes (saved under RUN/prior/); print held-out bits."""
    import shutil

    from .config import TrainConfig
    from .train import PRIOR_DIR, train_prior

    if force and (run / PRIOR_DIR).exists():
        shutil.rmtree(run / PRIOR_DIR)
    tcfg = TrainConfig(data="codes", steps=steps, max_seconds=max_seconds, batch_size=batch_size, lr=lr, seed=seed,
                       device=device, warmup_steps=200)
    overrides = dict(arch=arch, n_layer=layers, n_embd=width, n_head=heads, dropout=dropout)
    figures = train_prior(run, overrides, tcfg, shifts=shifts, resume=resume, console=err)
    figures.update(_bits_per_dim(run))
    err.print(f"wrote {run / PRIOR_DIR}/config.json, model.safetensors, metrics.jsonl")
    _print_figures(f"held-out code likelihood of {run}", figures, as_json)


def _bits_per_dim(run: Path) -> dict:
    """bits_per_dim of the held-out split: prior bits + discretized-Gaussian pixel bits, per dimension."""
    from .autoencoders import VQVAE, read_run_config
    from .data import load_dataset, pad_to_multiple, unpad
    from .metrics import bits_per_dim, fit_log_scale
    from .priors import load_prior, prior_bits
    from .train import PRIOR_DIR, encode_split

    if not (run / PRIOR_DIR / "model.safetensors").is_file():
        return {}
    model, prior_model = VQVAE.from_pretrained(run), load_prior(run / PRIOR_DIR)
    data = load_dataset(read_run_config(run)["data"]["uri"])

    def reconstruct(x):
        padded, pad = pad_to_multiple(x, model.cfg.downsample)
        return unpad(model.reconstruct(padded), pad)

    train = data.train[:1000]
    log_scale = fit_log_scale(train, reconstruct(train))  # the decoder's noise scale, fitted on training images
    z = encode_split(model, data.test)
    bpd = bits_per_dim(prior_bits(prior_model, z), data.test, reconstruct(data.test), log_scale)
    return {"bits_per_dim": float(bpd.mean()), "decoder_log_scale": log_scale}


@app.command()
def sample(run: Path = RunArg,
           n: int = typer.Option(64, "-n", help="Number of samples (with classes and no --label: n / classes per row)."),
           temperature: float = typer.Option(1.0, help="Softmax temperature; 0 is greedy."),
           top_k: Optional[int] = typer.Option(None, help="Sample only among the k most likely codes."),
           label: Optional[int] = typer.Option(None, help="Class to sample (class-conditional priors)."),
           seed: int = typer.Option(0),
           output: Path = typer.Option(Path("samples.png"), "-o", "--output", help="The grid image to write.")) -> None:
    """Sample codes from the learned prior, decode them, and write a grid of images."""
    import math

    import torch

    from .autoencoders import VQVAE
    from .errors import ConfigError
    from .priors import load_prior
    from .report import save_grid
    from .train import PRIOR_DIR

    model = VQVAE.from_pretrained(run)
    prior_model = load_prior(run / PRIOR_DIR)
    classes = prior_model.cfg.num_classes
    if n < 1 or temperature < 0 or (top_k is not None and top_k < 1):
        raise ConfigError(f"need -n >= 1, --temperature >= 0 and --top-k >= 1; got {n}, {temperature}, {top_k}")
    if label is not None and not 0 <= label < max(classes, 1):
        raise ConfigError(f"--label must be in 0..{classes - 1} for this prior" if classes else
                          "--label needs a class-conditional prior; this run's prior has no classes")
    nrow = None
    if classes and label is None:
        per_class = math.ceil(n / classes)
        cond, nrow = torch.arange(classes).repeat_interleave(per_class), per_class  # one row per class
    elif classes:
        cond = torch.full((n,), label)
    else:
        cond = None
    generator = torch.Generator(device=prior_model.device).manual_seed(seed)
    codes = prior_model.sample(len(cond) if cond is not None else n, cond, temperature, top_k, generator)
    images = model.decode(codes).clamp(0, 1)
    save_grid(images, output, nrow=nrow, scale=2)
    err.print(f"wrote {output}: {len(images)} samples" + (" (one row per class)" if nrow else ""))


def _load_prior_and_counts(run: Path, coder: str):
    """The run's prior (range coder) or training-code counts (Huffman), whichever `coder` needs."""
    import numpy as np
    import torch

    from .errors import ConfigError, RunError
    from .priors import load_prior
    from .train import CODES_DIR, PRIOR_DIR

    if coder not in ("range", "huffman"):
        raise ConfigError(f"--coder must be 'range' or 'huffman', got {coder!r}")
    if coder == "range":
        if not (run / PRIOR_DIR / "model.safetensors").is_file():
            raise RunError(f"{run / PRIOR_DIR}: no prior; train one with `vqvae prior {run}` first")
        return load_prior(run / PRIOR_DIR), None
    path = run / CODES_DIR / "train.npy"
    if not path.is_file():
        raise RunError(f"{path}: missing; `vqvae prior {run}` writes the training codes the Huffman code needs")
    return None, torch.from_numpy(np.load(path).astype(np.int64)).flatten()


@app.command()
def compress(run: Path = RunArg,
             images: list[Path] = typer.Argument(..., help="Image files (PNG/JPEG, any size)."),
             output: Path = typer.Option(..., "-o", "--output", help="The .vqz file to write."),
             coder: str = typer.Option("range", help="range (the learned prior) or huffman (static code table)."),
             as_json: bool = typer.Option(False, "--json", help="Print one JSON object of sizes.")) -> None:
    """Compress one or many images into one .vqz file with the run's learned prior."""
    import torch

    from . import codec
    from .autoencoders import VQVAE
    from .data import load_images

    model = VQVAE.from_pretrained(run)
    prior_model, codes = _load_prior_and_counts(run, coder)
    counts = None if codes is None else torch.bincount(codes, minlength=model.cfg.quantizer.codebook_size)
    inputs = _check_channels(load_images(images), model, images)
    data, stats = codec.compress(model, prior_model, inputs, coder=coder, code_counts=counts)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(output)
    figures = {k: stats[k] for k in ("bytes", "header_bytes", "payload_bytes", "bits_per_image",
                                     "cross_entropy_bits", "overhead", "num_images", "coder")}
    err.print(f"wrote {output}: {len(data)} bytes for {len(inputs)} image(s)")
    _print_figures(f"{output}", figures, as_json)


@app.command()
def decompress(run: Path = RunArg,
               file: Path = typer.Argument(..., help="A .vqz file written by `vqvae compress`."),
               output: Path = typer.Option(..., "-o", "--output",
                                           help="One image: the output file. Several: a directory.")) -> None:
    """Decode a .vqz file back to images at their original sizes."""
    from . import codec
    from .autoencoders import VQVAE
    from .data import save_image
    from .errors import CodecError

    model = VQVAE.from_pretrained(run)
    if not file.is_file():
        raise CodecError(f"{file}: no such file")
    data = file.read_bytes()
    coder = codec.read_header(data).coder
    prior_model, codes = _load_prior_and_counts(run, coder)
    counts = None
    if codes is not None:
        import torch

        counts = torch.bincount(codes, minlength=model.cfg.quantizer.codebook_size)
    decoded = codec.decompress(model, prior_model, data, code_counts=counts)
    if len(decoded) == 1 and output.suffix:
        targets = [output]
    else:
        output.mkdir(parents=True, exist_ok=True)
        targets = [output / f"{i:05d}.png" for i in range(len(decoded))]
    for image, target in zip(decoded, targets):
        save_image(image.cpu(), target)
    err.print(f"wrote {len(decoded)} image(s) to {output}")


def _check_channels(inputs: list, model, paths: list[Path]) -> list:
    """Convert grayscale <-> RGB inputs to the model's channel count (luma / replicate)."""
    C = model.cfg.in_channels
    converted = []
    for x in inputs:
        if x.shape[0] != C:
            x = x.mean(0, keepdim=True) if C == 1 else x.expand(C, *x.shape[1:])
        converted.append(x)
    return converted


def _output_paths(inputs: list[Path], output: Path, suffix: str) -> list[Path]:
    if len(inputs) == 1 and output.suffix:
        return [output]
    if output.exists() and not output.is_dir():
        from .errors import DataError

        raise DataError(f"{output}: exists and is not a directory; with several inputs -o must be a directory")
    output.mkdir(parents=True, exist_ok=True)
    return [output / (p.stem + suffix) for p in inputs]


DEMO_STEPS, DEMO_PRIOR_STEPS = 8000, 2000


@app.command()
def demo(out_dir: Path = typer.Option(Path("runs/demo"), "--out", help="Run directory to write (replaced)."),
         steps: int = typer.Option(DEMO_STEPS, help="VQ-VAE training steps (about 3 minutes on 2 CPU cores)."),
         prior_steps: int = typer.Option(DEMO_PRIOR_STEPS, help="Prior training steps (about 3 minutes)."),
         seed: int = typer.Option(0)) -> None:
    """The whole pipeline on the bundled MNIST digits: VQ-VAE, prior, samples, compression.

    Budgets are step counts, not seconds, so the figures are the same on a busy or a fast machine.
    """
    import shutil

    from .config import ModelConfig, TrainConfig
    from .train import train_autoencoder

    if out_dir.exists():
        shutil.rmtree(out_dir)
    err.rule("1/4  VQ-VAE on 4,500 MNIST digits")
    figures = train_autoencoder(ModelConfig(), TrainConfig(data="mnist", steps=steps, seed=seed), out_dir,
                                console=err)
    recon = _write_recon(out_dir)
    err.print(f"wrote {out_dir}/config.json, model.safetensors, metrics.jsonl, {recon}")
    _print_figures("held-out MNIST (500 digits)", figures, False)

    err.rule("2/4  prior over the 7x7 code grids")
    prior(out_dir, steps=prior_steps, max_seconds=0.0, seed=seed, **PRIOR_DEFAULTS)

    err.rule("3/4  samples")
    sample(out_dir, n=60, temperature=1.0, top_k=None, label=None, seed=seed, output=out_dir / "samples.png")

    err.rule("4/4  compression of the 500 held-out digits")
    _print_figures("bytes per held-out digit", _compression_table(out_dir, figures["psnr"]), False)


def _compression_table(run: Path, model_psnr: float) -> dict:
    """Bytes per digit of .vqz (one file of 500, and one file per digit) next to PNG, JPEG and WebP."""
    from . import baselines, codec
    from .autoencoders import VQVAE, read_run_config
    from .data import load_dataset
    from .priors import load_prior
    from .train import PRIOR_DIR

    model, prior_model = VQVAE.from_pretrained(run), load_prior(run / PRIOR_DIR)
    test = load_dataset(read_run_config(run)["data"]["uri"]).test
    many, stats = codec.compress(model, prior_model, list(test))
    (run / "heldout.vqz").write_bytes(many)
    single = [len(codec.compress(model, prior_model, [x])[0]) for x in test[:50]]
    rows = baselines.sweep(test)
    table = {".vqz, one file of 500 (payload bytes/digit)": stats["payload_bytes"] / len(test),
             ".vqz, one file per digit (bytes, first 50)": sum(single) / len(single),
             f".vqz PSNR (dB)": model_psnr,
             "PNG (lossless)": rows[0]["bytes_per_image"]}
    for fmt in ("jpeg", "webp"):
        best = baselines.smallest_at_psnr(rows, fmt, model_psnr)
        if best is not None:
            table[f"{fmt.upper()} q{best['quality']} ({best['psnr']:.1f} dB)"] = best["bytes_per_image"]
    return table


PRIOR_DEFAULTS = dict(arch="transformer", batch_size=64, lr=2e-3, layers=4, width=64, heads=4, dropout=0.0,
                      shifts=1, device="auto", resume=False, force=True, as_json=False)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app; boundary errors become one line on stderr and exit code 2."""
    from .train import Stopped

    try:
        app(args=argv, standalone_mode=False)
    except VQVAEError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        return 2
    except Stopped as e:
        err.print(str(e))
        return 130
    except (typer.Abort, KeyboardInterrupt):
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
