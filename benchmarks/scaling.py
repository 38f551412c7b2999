"""Images per second of the demo VQ-VAE's training step at 1, 2 and 4 processes (torch.distributed, gloo on
CPU), and the time per step spent in all-reduce.

    python benchmarks/scaling.py [--processes 1 2 4] [--batch 32] [--steps 12]

Each setting is launched with torchrun (`python -m torch.distributed.run --nproc-per-node N`), one thread
per process. A step is what `vqvae.train.Trainer` runs under torchrun: each rank takes its B/N slice of the
global batch B, forward (the EMA quantizer all-reduces its counts and sums), backward (DDP all-reduces
the gradients), Adam step. Time: median of --steps steps after 3 warm-up steps (the first runs k-means).
All-reduce: the median time of one all-reduce of the bytes a step sends (all gradients, plus the
quantizer's K counts and K x D sums), measured apart from the step. Images per second: B / step time.

On a machine with C cores, N > C processes share cores, so the figures past N = C measure contention,
not scaling. Writes benchmarks/results/scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(batch: int, steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from vqvae.autoencoders import VQVAE
    from vqvae.config import ModelConfig
    from vqvae.data import load_dataset
    from vqvae.devices import init_distributed, world

    torch.set_num_threads(1)
    init_distributed(torch.device("cpu"))
    rank, size = world()
    torch.manual_seed(0)
    cfg = ModelConfig()
    model = VQVAE(cfg)
    train_model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if size > 1 else model
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    images = load_dataset("mnist").train
    gen = torch.Generator().manual_seed(0)
    share = batch // size
    times = []
    for step in range(3 + steps):
        idx = torch.randint(images.shape[0], (batch,), generator=gen)[rank * share:(rank + 1) * share]
        t0 = time.perf_counter()
        out_ = train_model(images[idx])
        optimizer.zero_grad(set_to_none=True)
        out_.loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    K, D = cfg.quantizer.codebook_size, cfg.quantizer.code_dim
    params = sum(p.numel() for p in model.parameters())
    buffer = torch.zeros(params + K * (D + 1))
    reduce_times = []
    for _ in range(10 if size > 1 else 0):
        t0 = time.perf_counter()
        dist.all_reduce(buffer)
        reduce_times.append(time.perf_counter() - t0)
    if rank == 0:
        step_s = statistics.median(times[3:])
        Path(out).write_text(json.dumps({
            "processes": size, "batch": batch, "step_ms": 1000 * step_s, "images_per_s": batch / step_s,
            "allreduce_ms": 1000 * statistics.median(reduce_times) if reduce_times else 0.0,
            "allreduce_bytes": 4 * buffer.numel()}))
    if size > 1:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--worker", default="")
    args = parser.parse_args()
    if args.worker:
        return worker(args.batch, args.steps, args.worker)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    rows = []
    for n in args.processes:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = ROOT / "benchmarks" / "results" / f".scaling-{n}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}",
                        f"--master-port={port}", __file__, "--batch", str(args.batch), "--steps", str(args.steps),
                        "--worker", str(out)], env=env, check=True, timeout=900)
        rows.append(json.loads(out.read_text()))
        out.unlink()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"demo VQ-VAE, global batch {args.batch}, gloo, 1 thread per process, {cores} cores")
    print(f"{'processes':>9} {'ms/step':>8} {'images/s':>9} {'all-reduce ms':>14} {'MB/step':>8}")
    for r in rows:
        print(f"{r['processes']:>9} {r['step_ms']:>8.1f} {r['images_per_s']:>9.1f} {r['allreduce_ms']:>14.2f} "
              f"{r['allreduce_bytes'] / 1e6:>8.2f}")
    (ROOT / "benchmarks" / "results" / "scaling.json").write_text(json.dumps({"cores": cores, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
