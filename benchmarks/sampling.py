"""TransformerPrior sampling speed with and without the key/value cache.

With the cache each step runs one position through the network; without it each step runs a full
forward pass over the whole prefix (what a naive sampler does). Both draw from the same logits.

    python benchmarks/sampling.py [--quick] [--device cpu|cuda] [--batch 8] [--grid 16 16]

Prints a table and the speed-up, and writes benchmarks/results/sampling.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from vqvae.config import PriorConfig, to_dict
from vqvae.priors import TransformerPrior, sample_from_logits

RESULTS = Path(__file__).resolve().parent / "results" / "sampling.json"


@torch.no_grad()
def sample_uncached(prior: TransformerPrior, n: int, generator: torch.Generator) -> torch.Tensor:
    """Baseline: at step t, a full forward pass over [start, codes < t] -> logits of position t."""
    codes = torch.zeros(n, prior.seq_len, dtype=torch.long, device=prior.device)  # (B, L)
    for t in range(prior.seq_len):
        logits = prior(codes[:, : t + 1])[:, -1]  # (B, K); codes[:, t] is a placeholder, never read
        codes[:, t] = sample_from_logits(logits, generator=generator)
    return codes.view(n, *prior.cfg.grid)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Best wall-clock seconds of `repeats` calls (after one warm-up call)."""
    fn()
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed repeat instead of three")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--grid", type=int, nargs="+", default=[16, 16])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    cfg = PriorConfig(arch="transformer", codebook_size=512, grid=tuple(args.grid), n_layer=4, n_head=4, n_embd=128)
    prior = TransformerPrior(cfg).to(device).eval()
    repeats = 1 if args.quick else 3
    gen = lambda: torch.Generator(device=device).manual_seed(args.seed)  # noqa: E731

    # same weights and seed: both samplers must agree on (almost all) draws
    cached_codes = prior.sample(args.batch, generator=gen())
    uncached_codes = sample_uncached(prior, args.batch, gen())
    agreement = (cached_codes == uncached_codes).float().mean().item()

    tokens = args.batch * prior.seq_len
    seconds = {
        "kv_cache": timed(lambda: prior.sample(args.batch, generator=gen()), device, repeats),
        "full_prefix": timed(lambda: sample_uncached(prior, args.batch, gen()), device, repeats),
    }
    speedup = seconds["full_prefix"] / seconds["kv_cache"]

    print(f"TransformerPrior sampling: grid {cfg.grid} (L={prior.seq_len}), K={cfg.codebook_size}, "
          f"{cfg.n_layer} layers, n_embd {cfg.n_embd}, batch {args.batch}, {device} "
          f"({torch.get_num_threads()} threads), best of {repeats}")
    print(f"{'sampler':<14}{'seconds':>10}{'tokens/s':>12}")
    for name, s in seconds.items():
        print(f"{name:<14}{s:>10.3f}{tokens / s:>12.0f}")
    print(f"speed-up of the cache: {speedup:.1f}x   (same draws: {agreement:.1%} of codes)")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "config": to_dict(cfg), "batch": args.batch, "tokens": tokens, "repeats": repeats,
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "seconds": seconds,
        "tokens_per_second": {k: tokens / s for k, s in seconds.items()},
        "speedup": speedup, "same_draws": agreement,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
