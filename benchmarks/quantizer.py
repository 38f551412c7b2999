"""Forward + backward time and peak memory of vqvae's quantizers against the matmul floor and
vector-quantize-pytorch, on one realistic latent batch, on CPU or on a CUDA GPU.

    python benchmarks/quantizer.py [--codebook-sizes 512 8192 65536] [--threads N] [--rounds R]
    python benchmarks/quantizer.py --device cuda [--codebook-sizes 512 8192 65536]

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

--device cuda (the GPU of torch.cuda.current_device(); without one the script exits with one line):
z_e (256, 64, 32, 32) unless --shape, N = 262,144. The floor is the issue's: addmm(|e|^2, z, e^T,
alpha=-2).argmin(1) over chunks of 4,096, 16,384 and 65,536 rows (floor/R), the fastest of them.
vqvae-vq-nokernel runs the blocked PyTorch search (Triton off); vqvae-vq and vqvae-ema run whichever
search `vqvae.nearest.search_path` picks (the fused Triton kernel where Triton imports). Time: CUDA events
around each step, steps queued back to back, median; by default 1 round of 20 steps (K <= 8192) or 5,
after 3 warm-up steps (Triton compiles and autotunes in the first). Extra memory:
torch.cuda.max_memory_allocated during the timed steps minus the memory allocated before the warm-up
(inputs and modules): what a step adds, buffers kept between steps included. vqvae-search also checks
its codes on 2,048 latents against float64 brute force (largest excess of the chosen distance over the
minimum). TF32 stays off (torch's default), so every contender computes in float32.

Prints a table per codebook size and writes benchmarks/results/quantizer.json (CPU) or
benchmarks/results/quantizer-cuda-<device name>.json, with the device's name inside.
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

RESULTS = Path(__file__).resolve().parent / "results"
FLOOR_CHUNKS = {"cpu": ("256", "1024", "4096", "N"), "cuda": ("4096", "16384", "65536")}
QUANTIZERS = ("vqvae-search", "vqvae-vq", "vqvae-ema", "vqvae-vq-nokernel", "vqpt-vq", "vqpt-ema")
CONTENDERS = {device: tuple(f"floor/{c}" for c in chunks) + QUANTIZERS for device, chunks in FLOOR_CHUNKS.items()}
DEFAULT_SHAPE = {"cpu": [32, 64, 32, 32], "cuda": [256, 64, 32, 32]}
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


def make_step(name: str, K: int, shape: tuple[int, ...], device: str = "cpu"):
    """A function running one timed step of contender `name` on `device`, a description of it, and a
    function that checks its codes (None where there is nothing to check)."""
    import torch

    B, D, *spatial = shape
    N = B * int(torch.tensor(spatial).prod())
    gen = torch.Generator().manual_seed(0)
    if name.startswith("floor/"):
        chunk = N if name == "floor/N" else int(name.split("/")[1])
        z = torch.randn(N, D, generator=gen).to(device)  # (N, D)
        e = torch.randn(K, D, generator=gen).to(device)  # (K, D)
        norms = e.pow(2).sum(1)  # (K,)
        with_argmin = device != "cpu"  # the GPU floor includes the argmin

        def step():
            for start in range(0, N, chunk):
                scores = torch.addmm(norms, z[start:start + chunk], e.t(), alpha=-2)  # (chunk, K)
                if with_argmin:
                    scores.argmin(1)

        return step, f"addmm{' + argmin' * with_argmin} over chunks of {chunk} rows", None

    z0 = torch.randn(*shape, generator=gen).to(device)  # (B, D, H, W)
    upstream = torch.randn(*shape, generator=gen).to(device)  # the gradient a decoder would send back to z_q
    one = torch.ones((), device=device)
    # Every contender starts from the same codebook, drawn like the data (as k-means init would give),
    # so that the codes spread over the codebook as in training rather than piling onto a few.
    codebook = torch.randn(K, D, generator=gen).to(device)
    if name == "vqvae-search":
        from vqvae import nearest
        from vqvae.nearest import build_kernel, nearest_columns

        if device == "cpu":
            assert build_kernel() is not None, "the compiled search did not build"
        path = nearest.search_path(device, torch.float32)

        def step():
            nearest_columns(z0.view(B, D, -1), codebook)

        def check():
            return check_codes(nearest_columns(z0.view(B, D, -1), codebook), z0.view(B, D, -1), codebook)

        return step, f"vqvae.nearest.nearest_columns ({path} path)", check
    if name in ("vqvae-vq", "vqvae-ema", "vqvae-vq-nokernel"):
        from vqvae import nearest
        from vqvae.quantizers import EMAVectorQuantizer, VectorQuantizer

        nearest.USE_KERNEL = name != "vqvae-vq-nokernel"
        module = EMAVectorQuantizer(K, D, decay=0.99) if name == "vqvae-ema" else VectorQuantizer(K, D)
        module.to(device).train()._set_codes(torch.arange(K, device=device), codebook)

        def step():
            q = module(z0.detach().requires_grad_())
            torch.autograd.backward((q.loss, q.z_q), (one, upstream))

        path = nearest.search_path(device, torch.float32)
        kernel = {"cpu-kernel": "compiled search", "pytorch": "PyTorch search", "fused": "fused Triton search",
                  "blocked": "blocked PyTorch search"}[path]
        return step, f"{module!r}, {kernel}", None
    if name in ("vqpt-vq", "vqpt-ema"):
        from vector_quantize_pytorch import VectorQuantize

        options = dict(dim=D, codebook_size=K, commitment_weight=0.25, accept_image_fmap=True,
                       rotation_trick=False, kmeans_init=False, threshold_ema_dead_code=0)
        if name == "vqpt-vq":
            options.update(ema_update=False, learnable_codebook=True)
        else:
            options.update(decay=0.99, eps=1e-5)
        module = VectorQuantize(**options).to(device).train()
        with torch.no_grad():
            module._codebook.embed.copy_(codebook[None])
            module._codebook.embed_avg.copy_(codebook[None])

        def step():
            quantized, _, loss = module(z0.detach().requires_grad_())
            torch.autograd.backward((loss, quantized), (one, upstream))

        return step, f"VectorQuantize({', '.join(f'{k}={v}' for k, v in options.items())})", None
    raise ValueError(f"unknown contender {name!r}; expected one of {CONTENDERS[device]}")


def check_codes(codes, z, codebook, rows: int = 2048) -> dict:
    """codes (B, L) of z (B, D, L) against float64 brute force on the first `rows` latents: the largest
    excess of the chosen distance over the minimum, and the share of codes equal to the float64 argmin."""
    import torch

    flat = z.transpose(1, 2).reshape(-1, z.shape[1])[:rows].double()  # (rows, D)
    chosen = codes.reshape(-1)[:rows]
    excess, same = [], []
    for start in range(0, flat.shape[0], 512):
        dist = torch.cdist(flat[start:start + 512], codebook.double()).pow(2)  # (512, K)
        pick = chosen[start:start + 512]
        excess.append((dist.gather(1, pick[:, None]).squeeze(1) - dist.min(1).values).max())
        same.append((pick == dist.argmin(1)).double().mean())
    return {"rows": flat.shape[0], "max_excess_distance": float(torch.stack(excess).max()),
            "same_as_float64_argmin": float(torch.stack(same).mean())}


def worker(args) -> None:
    """Run one contender in this process and print one JSON line."""
    if args.device == "cuda":
        return cuda_worker(args)
    limit = int(args.memory_limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    step, description, _ = make_step(args.worker, args.codebook_size, tuple(args.shape))
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


def cuda_worker(args) -> None:
    """One contender on the GPU: CUDA-event times of steps queued back to back, extra GPU memory."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    step, description, check = make_step(args.worker, args.codebook_size, tuple(args.shape), "cuda")
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()  # inputs and modules
    for _ in range(args.warmup):  # Triton compiles and autotunes here; buffers kept between steps appear
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()  # the autotuner's scratch memory is not the step's
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(args.repeats)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    print(json.dumps({"times": [start.elapsed_time(end) / 1e3 for start, end in events],
                      "peak_extra_mib": (peak - baseline) / 2**20, "faults_per_step": None,
                      "peak_method": "torch.cuda.max_memory_allocated", "threads": torch.get_num_threads(),
                      "description": description, "check": check() if check else None}))


# ---------------------------------------------------------------------------------------------- parent

def run_worker(name: str, K: int, args) -> dict:
    """One subprocess run of contender `name`: times and memory, or why it failed."""
    cmd = [sys.executable, __file__, "--worker", name, "--codebook-sizes", str(K), "--codebook-size", str(K),
           "--shape", *map(str, args.shape), "--repeats", str(repeats_for(K, args)), "--warmup", str(args.warmup),
           "--memory-limit-gb", str(args.memory_limit_gb), "--device", args.device]
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
        limit = "GPU memory" if args.device == "cuda" else f"limit {args.memory_limit_gb:g} GiB"
        return {"status": f"out of memory ({limit}: {why})"}
    return {"status": f"failed: {tail[0][:160]}"}


def repeats_for(K: int, args) -> int:
    if args.device == "cuda":
        return args.repeats or (20 if K <= 8192 else 5)
    return args.repeats or (10 if K <= 1024 else 3 if K <= 8192 else 1)


def rounds_for(K: int, args) -> int:
    return args.rounds or (3 if K <= 8192 and args.device == "cpu" else 1)


def summarise(K: int, runs: dict[str, list[dict]]) -> dict:
    """Median times, ratios to the floor and to VectorQuantize, peak memory per contender."""
    rows = {}
    for name, results in runs.items():
        ok = [r for r in results if r["status"] == "ok"]
        if not ok:
            rows[name] = {"status": results[-1]["status"]}
            continue
        times = [t for r in ok for t in r["times"]]
        faults = [r["faults_per_step"] for r in ok if r["faults_per_step"] is not None]
        rows[name] = {"status": "ok", "median_ms": 1e3 * statistics.median(times),
                      "min_ms": 1e3 * min(times), "steps": len(times),
                      "peak_extra_mib": max(r["peak_extra_mib"] for r in ok),
                      "faults_per_step": statistics.median(faults) if faults else None,
                      "peak_method": ok[0]["peak_method"], "threads": ok[0]["threads"],
                      "description": ok[0]["description"]}
        if ok[0].get("check"):
            rows[name]["check"] = ok[0]["check"]
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


def targets(K: int, summary: dict, device: str = "cpu") -> list[tuple[str, bool]]:
    """The issue's targets at this K, each with whether this run met it. On CPU: within 2x of the floor,
    10x faster than vector-quantize-pytorch up to K = 8192, under 0.5 GB extra beyond; on CUDA: within 2x
    of the floor, 5x faster than vector-quantize-pytorch where it runs, under 0.5 GB extra, at every K."""
    rows, checks = summary["rows"], []
    speedup = 10 if device == "cpu" else 5
    for name in ("vqvae-vq", "vqvae-ema"):
        r = rows.get(name, {})
        if r.get("status") != "ok":
            continue
        if "x_floor" in r:
            checks.append((f"{name} within 2.0x of the floor ({r['x_floor']:.2f}x)", r["x_floor"] <= 2.0))
        if K <= 8192 or device != "cpu":
            theirs = "vqpt-" + name.split("-")[1]
            if "speedup_vs_vector_quantize" in r:
                s = r["speedup_vs_vector_quantize"]
                checks.append((f"{name} at least {speedup}x faster than {theirs} ({s:.1f}x)", s >= speedup))
            elif theirs in rows:
                checks.append((f"{name} at least {speedup}x faster than {theirs} ({rows[theirs]['status']})",
                               rows[theirs]["status"].startswith("out of memory")))
        if K > 8192 or device != "cpu":
            mib = r["peak_extra_mib"]
            checks.append((f"{name} under 0.5 GB extra peak memory ({mib:.0f} MiB)", mib * 2**20 < 0.5e9))
    return checks


def print_table(K: int, summary: dict, args) -> None:
    rows = summary["rows"]
    where = summary["device"] if args.device == "cuda" else f"{summary['threads']} thread(s)"
    print(f"\nK={K}, D={args.shape[1]}, z_e {tuple(args.shape)} (N={summary['N']}), forward + backward, "
          f"{where}, median of {summary['steps']} steps in {rounds_for(K, args)} round(s)")
    print(f"{'contender':<18}{'median ms':>10}{'x floor':>9}{'peak extra MiB':>16}{'page faults':>13}"
          f"{'VQ-pytorch / this':>19}")
    for name, r in rows.items():
        if r["status"] != "ok":
            print(f"{name:<18}  {r['status']}")
            continue
        mark = " <- floor" if name == summary["floor"] else ""
        speed = f"{r['speedup_vs_vector_quantize']:.1f}x" if "speedup_vs_vector_quantize" in r else ""
        faults = f"{r['faults_per_step']:.0f}" if r["faults_per_step"] is not None else "-"
        print(f"{name:<18}{r['median_ms']:>10.2f}{r.get('x_floor', float('nan')):>9.2f}"
              f"{r['peak_extra_mib']:>16.0f}{faults:>13}{speed:>19}{mark}")
        if "check" in r:
            c = r["check"]
            print(f"{'':<18}codes on {c['rows']} latents: chosen - minimum distance <= {c['max_excess_distance']:.2g}, "
                  f"{100 * c['same_as_float64_argmin']:.2f}% the float64 argmin")
    for text, met in summary["targets"]:
        print(f"  target {'met    ' if met else 'NOT MET'}  {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--codebook-sizes", type=int, nargs="+", default=[512, 8192, 65536])
    parser.add_argument("--shape", type=int, nargs="+", default=None,
                        help="z_e shape (B, D, *spatial), channels-first (default: 32 64 32 32 on CPU, "
                             "256 64 32 32 on CUDA)")
    parser.add_argument("--contenders", nargs="+", default=None, choices=sorted(set().union(*CONTENDERS.values())),
                        help="default: all for the device")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="interleaved rounds (0: 3, or 1 when K > 8192 or on CUDA)")
    parser.add_argument("--repeats", type=int, default=0,
                        help="timed steps per round (0: CPU 10 when K <= 1024, 3 when K <= 8192, else 1; "
                             "CUDA 20 when K <= 8192, else 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 CPU, 3 CUDA)")
    parser.add_argument("--memory-limit-gb", type=float, default=12.0,
                        help="address-space limit per contender (CPU only)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per contender run")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/quantizer.json, or quantizer-cuda-<device>.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--codebook-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.shape = args.shape or DEFAULT_SHAPE[args.device]
    args.warmup = args.warmup if args.warmup is not None else (3 if args.device == "cuda" else 1)
    if args.worker:
        return worker(args)

    import torch

    device_name = _cpu_name()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("benchmarks/quantizer.py: --device cuda needs a CUDA GPU; torch.cuda.is_available() is False here")
        device_name = torch.cuda.get_device_name()
    args.contenders = args.contenders or list(CONTENDERS[args.device])
    if args.out is None:
        args.out = RESULTS / ("quantizer.json" if args.device == "cpu" else f"quantizer-cuda-{_slug(device_name)}.json")
    N = args.shape[0] * int(torch.tensor(args.shape[2:]).prod())
    report = {"shape": args.shape, "N": N, "code_dim": args.shape[1], "threads_requested": args.threads,
              "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
              "cpu": _cpu_name(), "cpus": os.cpu_count(), "memory_limit_gb": args.memory_limit_gb,
              "device": device_name, "command": " ".join([Path(sys.executable).name, *sys.argv]), "results": {}}
    if args.device == "cuda":
        from vqvae.nearest import search_path

        report.update(cuda=torch.version.cuda, triton=_version("triton"),
                      vector_quantize_pytorch=_version("vector_quantize_pytorch"),
                      search_path=search_path("cuda", torch.float32))
    for K in args.codebook_sizes:
        runs: dict[str, list[dict]] = {name: [] for name in args.contenders}
        for _ in range(rounds_for(K, args)):
            for name in args.contenders:
                if runs[name] and runs[name][-1]["status"] != "ok":
                    continue  # failed once (memory, timeout): do not retry in later rounds
                runs[name].append(run_worker(name, K, args))
        summary = summarise(K, runs)
        ok = [r for r in summary["rows"].values() if r["status"] == "ok"]
        summary.update(N=N, threads=ok[0]["threads"] if ok else None, device=device_name,
                       steps=max((r["steps"] for r in ok), default=0))
        summary["targets"] = targets(K, summary, args.device)
        report["results"][str(K)] = summary
        print_table(K, summary, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


def _slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


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
