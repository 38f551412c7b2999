"""Where training runs: the device, the processes of a torchrun launch, the CPU threads, the precision.

`pick_device` checks a named device exists here; `init_distributed` joins torchrun's process group (NCCL
on CUDA, gloo on CPU) and `world` says (rank, size); `batch_share` is a rank's slice of a global batch;
`set_threads` picks CPU threads that do not oversubscribe a busy machine; `AUTOCAST` maps --precision to
the autocast dtype.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import ConfigError


def pick_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda if available, else mps, else cpu; otherwise the named device, which must exist here
    (else a one-line `ConfigError`: e.g. "cuda" on a CPU-only build of torch)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {name!r}: no CUDA GPU is usable here (torch {torch.__version__}"
                              f"{'' if torch.version.cuda else ', a CPU-only build'}); use --device cpu or auto")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device {name!r}: there are {count} CUDA GPU(s), numbered from 0")
    elif device.type == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise ConfigError(f"device {name!r}: Apple's MPS is not available here; use --device cpu or auto")
    elif device.type != "cpu":
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    return device


# -- several processes ----------------------------------------------------------------------------------
def world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group that torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT) describes,
    once: NCCL on CUDA, gloo otherwise. Returns the device this rank trains on (cuda:LOCAL_RANK for a CUDA
    device without index). Without WORLD_SIZE > 1 in the environment, nothing happens."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def barrier() -> None:
    """Wait for every rank (nothing outside a process group)."""
    if world()[1] > 1:
        dist.barrier()


def batch_share(batch, rank: int, size: int):
    """This rank's slice of a global batch: tensors (B, ...) -> (B / size, ...), tuples element-wise."""
    if size == 1 or batch is None:
        return batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(batch_share(b, rank, size) for b in batch)
    n = batch.shape[0] // size
    return batch[rank * n:(rank + 1) * n]


AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# -- threads ----------------------------------------------------------------------------------------------
def usable_cpus() -> int:
    """CPUs this process may run on: its affinity set, capped by a cgroup CPU quota (containers)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def pick_threads() -> int:
    """Threads for PyTorch's CPU work that do not oversubscribe the machine: the usable CPUs less the ones
    other work keeps busy (the load average of the last minute, rounded), at least 1.

    PyTorch's default (one thread per core) assumes an idle machine; on a busy one its threads wait on
    each other: on a 2-core machine with other jobs running, the demo's training ran 10x slower with 2
    threads than with 1.
    """
    cpus = usable_cpus()
    try:
        busy = os.getloadavg()[0]
    except (OSError, AttributeError):  # no load average (Windows): assume an idle machine
        busy = 0.0
    return max(1, min(cpus, int(cpus - busy + 0.5)))


def set_threads(threads: int = 0) -> int:
    """Set PyTorch's CPU threads: `threads` if > 0; else OMP_NUM_THREADS if set (it stands); else
    `pick_threads()`. Returns the number in use."""
    if threads < 0:
        raise ConfigError(f"threads must be >= 0 (0: choose), got {threads}")
    if threads == 0 and os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()
    torch.set_num_threads(threads or pick_threads())
    return torch.get_num_threads()
