"""Images per second and peak memory of one full training step of the demo VQ-VAE: vqvae's quantizer
against the same network with vector-quantize-pytorch's VectorQuantize swapped in.

    python benchmarks/train.py [--data mnist|random] [--batch 32] [--steps 10] [--rounds 10] [--threads N]
    python benchmarks/train.py --device cuda [--batch 32] [--steps 200] [--rounds 2]

The demo configuration: `ModelConfig()` defaults (hidden 64, 2 residual blocks, downsample 4, EMA
quantizer K=512, D=16, k-means init, dead-code restart after 50 unused steps), MNIST digits (1x28x28,
7x7 codes, N = 32 * 49 latent vectors a step), Adam at the demo's learning rate; a step is forward,
backward and optimizer step, as `vqvae.train.Trainer` runs it. The swapped-in VectorQuantize has the
closest settings: EMA decay 0.99, commitment 0.25, k-means init (10 iterations), straight-through
gradient (rotation_trick=False), dead codes replaced below an EMA cluster size of 2; an adapter returns
its output as vqvae's `Quantized` with the same statistics.

Each variant runs in its own subprocess, in turn for --rounds rounds; a run does 3 warm-up steps (the
first initialises the codebook by k-means) and then --steps timed steps. Time: median step over all
rounds. Peak memory: the subprocess's peak resident set size during the timed steps (VmHWM, reset after
the warm-up) minus its resident set size at the reset: what a step adds on top of the model, optimizer
state and data. Writes benchmarks/results/train.json.

--device cuda (without a CUDA GPU the script exits with one line): the images live on the GPU and each
batch is drawn there (randint + index), so no host-side input pipeline can starve the GPU. Time: CUDA
events around each step, steps queued back to back, median over all rounds (default 2 rounds of 200
steps). "host ms": the median time the Python side takes to queue a step; close to the step time, the
step is bound by kernel launches rather than by the GPU. GPU utilisation: NVML's share of time a kernel
was running, sampled every 50 ms during the timed steps (torch.cuda.utilization; "n/a" without pynvml).
Peak memory: torch.cuda.max_memory_allocated during the timed steps minus the memory allocated after the
warm-up. Writes benchmarks/results/train-cuda-<device name>-batch<B>.json, with the device's name inside.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("vqvae", "vector-quantize-pytorch")


def build_model(variant: str):
    import torch
    from torch import nn

    from vqvae.autoencoders import VQVAE
    from vqvae.config import ModelConfig
    from vqvae.quantizers import Quantized

    cfg = ModelConfig()
    model = VQVAE(cfg)
    if variant == "vqvae":
        return model, cfg
    from vector_quantize_pytorch import VectorQuantize

    q = cfg.quantizer

    class Swapped(nn.Module):
        """VectorQuantize behind vqvae's quantizer interface: (B, D, H, W) -> Quantized."""

        def __init__(self):
            super().__init__()
            self.vq = VectorQuantize(dim=q.code_dim, codebook_size=q.codebook_size, decay=q.ema_decay,
                                     eps=q.ema_eps, commitment_weight=q.commitment_weight,
                                     kmeans_init=q.kmeans_init, kmeans_iters=q.kmeans_iters,
                                     threshold_ema_dead_code=2, rotation_trick=False, accept_image_fmap=True)

        @property
        def embeddings(self) -> torch.Tensor:
            return self.vq.codebook

        def forward(self, z_e: torch.Tensor) -> Quantized:
            z_q, codes, loss = self.vq(z_e)
            counts = torch.bincount(codes.reshape(-1), minlength=q.codebook_size)
            p = counts.double() / codes.numel()
            stats = {"perplexity": torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum()).float(),
                     "usage": (counts > 0).float().mean(),
                     "commitment": loss.detach() / q.commitment_weight}
            return Quantized(z_q, codes, loss, stats)

    model.quantizer = Swapped()
    return model, cfg


def worker(args) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quantizer import _reset_peak, _status_kib  # same memory method as benchmarks/quantizer.py

    from vqvae.config import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.data == "mnist":
        from vqvae.data import load_dataset

        images = load_dataset("mnist").train  # (N, 1, 28, 28) in [0, 1]
    else:
        images = torch.rand(4096, 1, 28, 28)
    images = images.to(args.device)  # on a GPU the whole set lives there: batches never wait for the host
    model, cfg = build_model(args.worker)
    model.to(args.device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=TrainConfig().lr)
    gen = torch.Generator(args.device).manual_seed(0)

    def step():
        x = images[torch.randint(images.shape[0], (args.batch,), generator=gen, device=args.device)]
        out = model(x)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    if args.device == "cuda":
        return cuda_timing(args, step, model)
    baseline = _status_kib("VmRSS")
    exact = _reset_peak()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = _status_kib("VmHWM") if exact else baseline
    print(json.dumps({"times": times, "peak_extra_mib": (peak - baseline) / 1024 if exact else None,
                      "threads": torch.get_num_threads(),
                      "quantizer": repr(getattr(model.quantizer, "vq", model.quantizer)).splitlines()[0]}))


def cuda_timing(args, step, model) -> None:
    """Time `step` on the GPU (CUDA events, host queueing time, NVML utilisation, extra memory); print JSON."""
    import torch

    from vqvae.nearest import search_path

    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    samples, done = [], threading.Event()

    def sample():  # NVML: share of the last sample period during which a kernel ran
        while not done.wait(0.05):
            try:
                samples.append(torch.cuda.utilization())
            except Exception:  # no pynvml / NVML
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(args.steps)]
    host = []
    for start, end in events:
        t0 = time.perf_counter()
        start.record()
        step()
        end.record()
        host.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    done.set()
    sampler.join()
    print(json.dumps({"times": [start.elapsed_time(end) / 1e3 for start, end in events], "host_times": host,
                      "peak_extra_mib": (torch.cuda.max_memory_allocated() - baseline) / 2**20,
                      "gpu_utilization": statistics.median(samples) if samples else None,
                      "threads": torch.get_num_threads(), "search_path": search_path("cuda", torch.float32),
                      "quantizer": repr(getattr(model.quantizer, "vq", model.quantizer)).splitlines()[0]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--data", choices=["mnist", "random"], default="mnist")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round (default: 10 CPU, 200 CUDA)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="alternating subprocess runs per variant (default: 10 CPU, 2 CUDA)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/train.json, or train-cuda-<device>-batch<B>.json")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.steps = args.steps or (200 if cuda else 10)
    args.rounds = args.rounds or (2 if cuda else 10)
    if args.worker:
        return worker(args)

    import torch

    device_name = None
    if cuda:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/train.py: --device cuda needs a CUDA GPU; torch.cuda.is_available() is False here")
        device_name = torch.cuda.get_device_name()
    if args.out is None:
        slug = "-".join("".join(c if c.isalnum() else " " for c in (device_name or "").lower()).split())
        args.out = RESULTS / (f"train-cuda-{slug}-batch{args.batch}.json" if cuda else "train.json")
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--worker", variant, "--data", args.data, "--batch", str(args.batch),
                   "--steps", str(args.steps), "--threads", str(args.threads), "--device", args.device]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                runs[variant].append({"status": f"timed out after {args.timeout:.0f} s"})
                continue
            if proc.returncode:
                runs[variant].append({"status": "failed: " + (proc.stderr.strip().splitlines() or [""])[-1][:200]})
            else:
                runs[variant].append({"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])})
    rows = {}
    for variant, results in runs.items():
        ok = [r for r in results if r["status"] == "ok"]
        if not ok:
            rows[variant] = {"status": results[-1]["status"]}
            continue
        step_s = statistics.median(t for r in ok for t in r["times"])
        peaks = [r["peak_extra_mib"] for r in ok if r["peak_extra_mib"] is not None]
        rows[variant] = {"status": "ok", "median_step_ms": 1e3 * step_s, "images_per_s": args.batch / step_s,
                         "peak_extra_mib": max(peaks) if peaks else None, "threads": ok[0]["threads"],
                         "quantizer": ok[0]["quantizer"], "steps": sum(len(r["times"]) for r in ok)}
        if cuda:
            usage = [r["gpu_utilization"] for r in ok if r["gpu_utilization"] is not None]
            rows[variant].update(host_ms=1e3 * statistics.median(t for r in ok for t in r["host_times"]),
                                 gpu_utilization=statistics.median(usage) if usage else None,
                                 search_path=ok[0]["search_path"])
    threads = next((r["threads"] for r in rows.values() if r["status"] == "ok"), None)
    print(f"demo VQ-VAE training step (ModelConfig() defaults), {args.data} 1x28x28, batch {args.batch}, "
          f"{device_name or f'{threads} thread(s)'}, median of {args.steps} steps x {args.rounds} rounds")
    print(f"{'quantizer':<26}{'step ms':>9}{'images/s':>10}{'peak extra MiB':>16}"
          + (f"{'host ms':>9}{'GPU busy':>10}" if cuda else ""))
    for variant, r in rows.items():
        if r["status"] != "ok":
            print(f"{variant:<26}  {r['status']}")
            continue
        peak = f"{r['peak_extra_mib']:.0f}" if r["peak_extra_mib"] is not None else "n/a"
        extra = ""
        if cuda:
            busy = f"{r['gpu_utilization']:.0f}%" if r["gpu_utilization"] is not None else "n/a"
            extra = f"{r['host_ms']:>9.2f}{busy:>10}"
        print(f"{variant:<26}{r['median_step_ms']:>9.2f}{r['images_per_s']:>10.0f}{peak:>16}{extra}")
    if all(r["status"] == "ok" for r in rows.values()):
        speedup = rows["vqvae"]["images_per_s"] / rows["vector-quantize-pytorch"]["images_per_s"]
        print(f"vqvae's quantizer: {speedup:.2f}x the images per second")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "data": args.data, "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
        "threads_requested": args.threads, "torch": torch.__version__, "machine": platform.machine(),
        "device": device_name or "cpu", "cuda": torch.version.cuda if cuda else None,
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
