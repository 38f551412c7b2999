"""Forward + backward time and peak memory of vqvae's quantizers against the matmul floor and
vector-quantize-pytorch, on one realistic latent batch.

    python benchmarks/quantizer.py [--codebook-sizes 512 8192 65536] [--threads N] [--rounds R]

Input: z_e of shape (B, D, H, W) = (32, 64, 32, 32), channels-first and contiguous as a conv encoder emits
it (N = B*H*W = 32768 vectors of D = 64), a fresh leaf each step; the backward feeds a dense upstream
gradient to z_q and 1 to the loss, as a decoder would. Contenders, each in its own subprocess (one that
runs out of memory is reported as such and the rest still run):

  floor/R        the nearest-code product alone: addmm(|e|^2, z, e^T, alpha=-2) over row chunks of R
                 rows of z (N, D) (R = 256, 1024, 4096, N); "floor" is the fastest of them
  vqvae-search   vqvae's nearest-code search alone (no loss, no backward)
  vqvae-vq       vqvae.quantizers.VectorQuantizer, training mode, forward + backward
  vqvae-ema      vqvae.quantizers.EMAVectorQuantizer (decay 0.99), training mode, forward + backward
  vqvae-vq-nokernel  vqvae-vq with the compiled search switched off (PyTorch addmm + argmax search),
                 what a machine without a C++ compiler runs
  vqpt-vq        vector_quantize_pytorch.VectorQuantize, learnable codebook (no EMA), straight-through,
                 commitment 0.25, accept_image_fmap=True
  vqpt-ema       the same with EMA updates (decay 0.99): the library's default mode

Time: median over all timed steps of all rounds; rounds run the contenders in turn (interleaved), so a
burst of load from other processes hits all of them alike. Ratios are between medians of one run.
Peak memory: the subprocess's peak resident set size (VmHWM, reset through /proc/self/clear_refs once
inputs and modules exist) minus its resident set size at that moment: what one step adds on top of its
inputs and parameters. "page faults": minor page faults per timed step (ru_minflt): first touches of
memory that glibc returned to the system; on a VM each costs a few microseconds, and 4,000 a step
(two fresh N x D float32 tensors) cost several ms, so allocator settings (MALLOC_TRIM_THRESHOLD_,
jemalloc) move the ratios; the table is with the default allocator. Each subprocess runs under an
address-space limit (--memory-limit-gb), so a contender that needs more fails with an allocation error
instead of bringing the machine down.

Threads: torch's default unless --threads N (the run prints and records the count). On a machine shared
with other jobs, use --threads 1: OpenMP threads that wait for a busy core make every multi-threaded
matmul erratic (one addmm per chunk pays it each time), which swamps the ratios.

Prints a table per codebook size and writes benchmarks/results/quantizer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "quantizer.json"
FLOOR_CHUNKS = ("256", "1024", "4096", "N")
CONTENDERS = tuple(f"floor/{c}" for c in FLOOR_CHUNKS) + (
    "vqvae-search", "vqvae-vq", "vqvae-ema", "vqvae-vq-nokernel", "vqpt-vq", "vqpt-ema")
OOM_MARKERS = ("out of memory", "can't allocate memory", "not enough memory", "MemoryError",
               "std::bad_alloc", "Cannot allocate memory")


# ---------------------------------------------------------------------------------------------- worker

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def make_step(name: str, K: int, shape: tuple[int, ...]):
    """A function running one timed step of contender `name`, and a description of it."""
    import torch

    B, D, *spatial = shape
    N = B * int(torch.tensor(spatial).prod())
    gen = torch.Generator().manual_seed(0)
    if name.startswith("floor/"):
        chunk = N if name == "floor/N" else int(name.split("/")[1])
        z = torch.randn(N, D, generator=gen)  # (N, D)
        e = torch.randn(K, D, generator=gen)  # (K, D)
        norms = e.pow(2).sum(1)  # (K,)

        def step():
            for start in range(0, N, chunk):
                torch.addmm(norms, z[start:start + chunk], e.t(), alpha=-2)  # (chunk, K), dropped

        return step, f"addmm over chunks of {chunk} rows"

    z0 = torch.randn(*shape, generator=gen)  # (B, D, H, W)
    upstream = torch.randn(*shape, generator=gen)  # the gradient a decoder would send back to z_q
    one = torch.ones(())
    # Every contender starts from the same codebook, drawn like the data (as k-means init would give),
    # so that the codes spread over the codebook as in training rather than piling onto a few.
    codebook = torch.randn(K, D, generator=gen)
    if name == "vqvae-search":
        from vqvae.nearest import build_kernel, nearest_columns

        assert build_kernel() is not None, "the compiled search did not build"

        def step():
            nearest_columns(z0.view(B, D, -1), codebook)

        return step, "vqvae.nearest.nearest_columns"
    if name in ("vqvae-vq", "vqvae-ema", "vqvae-vq-nokernel"):
        from vqvae import nearest
        from vqvae.quantizers import EMAVectorQuantizer, VectorQuantizer

        nearest.USE_KERNEL = name != "vqvae-vq-nokernel"
        module = EMAVectorQuantizer(K, D, decay=0.99) if name == "vqvae-ema" else VectorQuantizer(K, D)
        module.train()._set_codes(torch.arange(K), codebook)

        def step():
            q = module(z0.detach().requires_grad_())
            torch.autograd.backward((q.loss, q.z_q), (one, upstream))

        kernel = "compiled search" if nearest.USE_KERNEL and nearest.build_kernel() else "PyTorch search"
        return step, f"{module!r}, {kernel}"
    if name in ("vqpt-vq", "vqpt-ema"):
        from vector_quantize_pytorch import VectorQuantize

        options = dict(dim=D, codebook_size=K, commitment_weight=0.25, accept_image_fmap=True,
                       rotation_trick=False, kmeans_init=False, threshold_ema_dead_code=0)
        if name == "vqpt-vq":
            options.update(ema_update=False, learnable_codebook=True)
        else:
            options.update(decay=0.99, eps=1e-5)
        module = VectorQuantize(**options).train()
        with torch.no_grad():
            module._codebook.embed.copy_(codebook[None])
            module._codebook.embed_avg.copy_(codebook[None])

        def step():
            quantized, _, loss = module(z0.detach().requires_grad_())
            torch.autograd.backward((loss, quantized), (one, upstream))

        return step, f"VectorQuantize({', '.join(f'{k}={v}' for k, v in options.items())})"
    raise ValueError(f"unknown contender {name!r}; expected one of {CONTENDERS}")


def worker(args) -> None:
    """Run one contender in this process and print one JSON line."""
    limit = int(args.memory_limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    step, description = make_step(args.worker, args.codebook_size, tuple(args.shape))
    baseline_kib = _status_kib("VmRSS")
    exact_peak = _reset_peak()
    if not exact_peak:  # fall back to the process's whole-life peak
        baseline_kib = min(baseline_kib, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    times = []
    for i in range(args.warmup + args.repeats):
        if i == args.warmup:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.repeats
    peak_kib = _status_kib("VmHWM") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"times": times, "peak_extra_mib": (peak_kib - baseline_kib) / 1024, "faults_per_step": faults,
                      "peak_method": "VmHWM reset" if exact_peak else "ru_maxrss",
                      "threads": torch.get_num_threads(), "description": description}))


# ---------------------------------------------------------------------------------------------- parent

def run_worker(name: str, K: int, args) -> dict:
    """One subprocess run of contender `name`: times and memory, or why it failed."""
    cmd = [sys.executable, __file__, "--worker", name, "--codebook-sizes", str(K), "--codebook-size", str(K),
           "--shape", *map(str, args.shape), "--repeats", str(repeats_for(K, args)), "--warmup", str(args.warmup),
           "--memory-limit-gb", str(args.memory_limit_gb)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {args.timeout:.0f} s"}
    if proc.returncode == 0:
        return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
    if proc.returncode < 0 or any(m in proc.stderr for m in OOM_MARKERS):
        why = "killed by signal %d" % -proc.returncode if proc.returncode < 0 else tail[0][:120]
        return {"status": f"out of memory (limit {args.memory_limit_gb:g} GiB: {why})"}
    return {"status": f"failed: {tail[0][:160]}"}


def repeats_for(K: int, args) -> int:
    return args.repeats or (10 if K <= 1024 else 3 if K <= 8192 else 1)


def rounds_for(K: int, args) -> int:
    return args.rounds or (3 if K <= 8192 else 1)


def summarise(K: int, runs: dict[str, list[dict]]) -> dict:
    """Median times, ratios to the floor and to VectorQuantize, peak memory per contender."""
    rows = {}
    for name, results in runs.items():
        ok = [r for r in results if r["status"] == "ok"]
        if not ok:
            rows[name] = {"status": results[-1]["status"]}
            continue
        times = [t for r in ok for t in r["times"]]
        rows[name] = {"status": "ok", "median_ms": 1e3 * statistics.median(times),
                      "min_ms": 1e3 * min(times), "steps": len(times),
                      "peak_extra_mib": max(r["peak_extra_mib"] for r in ok),
                      "faults_per_step": statistics.median(r["faults_per_step"] for r in ok),
                      "peak_method": ok[0]["peak_method"], "threads": ok[0]["threads"],
                      "description": ok[0]["description"]}
    floors = {n: r["median_ms"] for n, r in rows.items() if n.startswith("floor/") and r["status"] == "ok"}
    floor_name = min(floors, key=floors.get) if floors else None
    for name, r in rows.items():
        if r["status"] != "ok":
            continue
        if floor_name:
            r["x_floor"] = r["median_ms"] / rows[floor_name]["median_ms"]
        for mine, theirs in (("vqvae-vq", "vqpt-vq"), ("vqvae-ema", "vqpt-ema")):
            if name == mine and rows.get(theirs, {}).get("status") == "ok":
                r["speedup_vs_vector_quantize"] = rows[theirs]["median_ms"] / r["median_ms"]
    return {"floor": floor_name, "rows": rows}


def targets(K: int, summary: dict) -> list[tuple[str, bool]]:
    """The issue's targets at this K, each with whether this run met it."""
    rows, checks = summary["rows"], []
    for name in ("vqvae-vq", "vqvae-ema"):
        r = rows.get(name, {})
        if r.get("status") != "ok":
            continue
        if "x_floor" in r:
            checks.append((f"{name} within 2.0x of the floor ({r['x_floor']:.2f}x)", r["x_floor"] <= 2.0))
        if K <= 8192:
            theirs = "vqpt-" + name.split("-")[1]
            if "speedup_vs_vector_quantize" in r:
                s = r["speedup_vs_vector_quantize"]
                checks.append((f"{name} at least 10x faster than {theirs} ({s:.1f}x)", s >= 10))
            elif theirs in rows:
                checks.append((f"{name} at least 10x faster than {theirs} ({rows[theirs]['status']})",
                               rows[theirs]["status"].startswith("out of memory")))
        else:
            mib = r["peak_extra_mib"]
            checks.append((f"{name} under 0.5 GB extra peak memory ({mib:.0f} MiB)", mib * 2**20 < 0.5e9))
    return checks


def print_table(K: int, summary: dict, args) -> None:
    rows = summary["rows"]
    print(f"\nK={K}, D={args.shape[1]}, z_e {tuple(args.shape)} (N={summary['N']}), forward + backward, "
          f"{summary['threads']} thread(s), median of {summary['steps']} steps in {rounds_for(K, args)} round(s)")
    print(f"{'contender':<18}{'median ms':>10}{'x floor':>9}{'peak extra MiB':>16}{'page faults':>13}"
          f"{'VQ-pytorch / this':>19}")
    for name, r in rows.items():
        if r["status"] != "ok":
            print(f"{name:<18}  {r['status']}")
            continue
        mark = " <- floor" if name == summary["floor"] else ""
        speed = f"{r['speedup_vs_vector_quantize']:.1f}x" if "speedup_vs_vector_quantize" in r else ""
        print(f"{name:<18}{r['median_ms']:>10.1f}{r.get('x_floor', float('nan')):>9.2f}"
              f"{r['peak_extra_mib']:>16.0f}{r['faults_per_step']:>13.0f}{speed:>19}{mark}")
    for text, met in summary["targets"]:
        print(f"  target {'met    ' if met else 'NOT MET'}  {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codebook-sizes", type=int, nargs="+", default=[512, 8192, 65536])
    parser.add_argument("--shape", type=int, nargs="+", default=[32, 64, 32, 32],
                        help="z_e shape (B, D, *spatial), channels-first")
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds (0: 3, or 1 when K > 8192)")
    parser.add_argument("--repeats", type=int, default=0,
                        help="timed steps per round (0: 10 when K <= 1024, 3 when K <= 8192, else 1)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--memory-limit-gb", type=float, default=12.0, help="address-space limit per contender")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per contender run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--codebook-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import torch

    N = args.shape[0] * int(torch.tensor(args.shape[2:]).prod())
    report = {"shape": args.shape, "N": N, "code_dim": args.shape[1], "threads_requested": args.threads,
              "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
              "cpu": _cpu_name(), "cpus": os.cpu_count(), "memory_limit_gb": args.memory_limit_gb,
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "results": {}}
    for K in args.codebook_sizes:
        runs: dict[str, list[dict]] = {name: [] for name in args.contenders}
        for _ in range(rounds_for(K, args)):
            for name in args.contenders:
                if runs[name] and runs[name][-1]["status"] != "ok":
                    continue  # failed once (memory, timeout): do not retry in later rounds
                runs[name].append(run_worker(name, K, args))
        summary = summarise(K, runs)
        ok = [r for r in summary["rows"].values() if r["status"] == "ok"]
        summary.update(N=N, threads=ok[0]["threads"] if ok else None,
                       steps=max((r["steps"] for r in ok), default=0))
        summary["targets"] = targets(K, summary)
        report["results"][str(K)] = summary
        print_table(K, summary, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
