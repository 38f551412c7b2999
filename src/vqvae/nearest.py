"""The quantizer's arithmetic: nearest-code search, the fused z_q + loss step, EMA sums, k-means.

Key: B batch, D code dim, K codebook size, S spatial shape ((H, W) or (T,)), L = prod(S) positions per
item, N = B * L vectors.

This module owns the numbers; `quantizers.py` owns the modules (codebook, options, training-time
updates) and calls only the public functions here:
- `nearest_codes` (rows (N, D)) and `nearest_columns` (channels-first (B, D, L)): index of the nearest
  codebook vector, ties to the lowest index;
- `quantize`: z_q with the straight-through gradient and both loss terms, in one pass with a hand-written
  backward;
- `scatter_sum`: the sums of the vectors assigned to each code (the EMA update);
- `kmeans`: Lloyd's k-means (the codebook's initialisation);
- `build_kernel`: the C++ kernels of csrc/quantizer.cpp, compiled with torch's cpp_extension on first
  use (~30 s, then cached by torch in ~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR under
  `kernel_name()`, which is keyed by the source, the Python environment and torch's version, so that
  environments and versions never rebuild each other's copy or wait on its lock), or None where they
  cannot be built; `USE_KERNEL = False` switches them off, and the Triton kernel too (tests and
  benchmarks compare the paths);
- `search_path`: which search a device and dtype take (`SEARCH_PATH` forces one); `fused_search`: the
  Triton kernel's module (gpu_search.py), or None where Triton does not import.

Speed (the quantizer runs on every latent vector of every step; benchmarks/quantizer.py measures each
choice against the floor, the nearest-code matmul alone):
- the latents stay channels-first: no (B, D, *S) <-> (N, D) copies;
- the search scores blocks of (codes x columns) by one matmul each, the norms folded into it, and never
  holds an (N, K) matrix. Its path goes by device and dtype (`search_path`): on CPU in float32 the C++
  kernel finds each column's first maximum in one vectorised pass, where torch.argmax costs as much as
  the matmul; on CPU without a compiler or in float64, PyTorch ops in cache-sized blocks (amax + eq + a
  matmul that reads the index off the one-hot, half the cost of argmax); on CUDA in float32 with Triton,
  one fused kernel (gpu_search.py) that never writes the scores; on other devices (CUDA without Triton,
  float64, MPS), PyTorch ops in few large blocks, addmm + argmax each, with no host synchronisation,
  since a GPU pays ~50 us of launch per op. All pick the same nearest codes (argmax's: the lowest index
  among exact maxima, the first NaN), up to float rounding on near ties;
- `quantize` computes z_q and both loss terms in one pass and writes its backward by hand: straight
  through to z plus the commitment term, the codebook term scattered to the chosen codes only; z_q and
  z - z_q (which becomes z's gradient in place) share one buffer that each quantizer reuses once the
  last step's outputs are gone, instead of faulting fresh memory in every step.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import warnings
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

# On CPU the nearest-code search scores a block of (codes x columns) at a time: small enough to stay in the
# L2 cache while its maximum is found, large enough that the matmul runs at full speed. Codebooks larger
# than CODE_TILE are scored tile by tile.
SCORE_BLOCK_ELEMENTS = 1 << 18
CODE_TILE = 2048
# Off CPU ("blocked" path) a block is one addmm + argmax over all K codes at once: few launches, each
# large enough to fill a GPU; 2**25 float32 scores are 128 MiB.
DEVICE_SCORE_BLOCK_ELEMENTS = 1 << 25
# False: use PyTorch ops only, never a compiled kernel (C++ on CPU, Triton on CUDA); tests and benchmarks
# compare the paths.
USE_KERNEL = True
# The search paths (see `search_path`); SEARCH_PATH forces one of them (tests, benchmarks), None: by device.
SEARCH_PATHS = ("cpu-kernel", "pytorch", "fused", "blocked")
SEARCH_PATH: str | None = None

KERNEL_SOURCE = Path(__file__).resolve().parent / "csrc" / "quantizer.cpp"  # package data
_kernel = None  # the compiled module; False once it failed to build


def kernel_name() -> str:
    """The name the compiled kernel is cached under: "vqvae_quantizer_" + a hash of the C++ source, its
    path, this Python environment (sys.prefix), the Python and torch versions. The build records the
    source's path, so two checkouts of one version (one environment, several worktrees) need two names, or
    each would rebuild the other's kernel on every first use."""
    key = hashlib.sha256(KERNEL_SOURCE.read_bytes())
    for part in (str(KERNEL_SOURCE.resolve()), sys.prefix, sys.version, torch.__version__):
        key.update(b"\0" + part.encode())
    return f"vqvae_quantizer_{key.hexdigest()[:12]}"


def build_kernel():
    """The compiled kernels of csrc/quantizer.cpp, or None where they cannot be built.

    Built on first use (~30 s; torch caches the build), then held for the process. Compilers without
    OpenMP (Apple clang) get a serial build; without a compiler, ninja or headers this warns once and
    returns None, and the quantizers use PyTorch ops, which give the same codes.
    """
    global _kernel
    if _kernel is None:
        from torch.utils.cpp_extension import load

        error = None
        for flags in (["-fopenmp"], []):
            try:
                _kernel = load(name=kernel_name(), sources=[str(KERNEL_SOURCE)],
                               extra_cflags=["-O3", *flags], extra_ldflags=flags)
                break
            except Exception as e:  # no compiler, ninja or headers: PyTorch ops give the same results
                error = error or e
        else:
            warnings.warn(f"vqvae: the quantizer's C++ kernel did not build ({str(error).splitlines()[0][:200]}); "
                          "using PyTorch ops, slower on CPU", RuntimeWarning, stacklevel=3)
            _kernel = False
    return _kernel or None


def _cpu_kernel(t: torch.Tensor):
    """The compiled kernels where they apply to t (a CPU float32 tensor), else None."""
    return build_kernel() if USE_KERNEL and t.device.type == "cpu" and t.dtype == torch.float32 else None


_fused = None  # the gpu_search module; False once it failed to import or run


def fused_search():
    """The Triton search (module `vqvae.gpu_search`), or None where Triton does not import (>= 3.0 needed)."""
    global _fused
    if _fused is None:
        try:
            from . import gpu_search
            _fused = gpu_search
        except Exception:  # no Triton (CPU wheels, macOS, Windows) or too old: the blocked path is exact too
            _fused = False
    return _fused or None


def search_path(device: torch.device | str, dtype: torch.dtype) -> str:
    """Which search `nearest_columns` runs for latents on `device` in `dtype` (one of SEARCH_PATHS).

    "cpu-kernel": CPU float32 with the C++ kernel built; "pytorch": CPU otherwise (no compiler, float64,
    USE_KERNEL off), PyTorch ops in cache-sized blocks; "fused": CUDA float32 where Triton imports, the
    gpu_search kernel; "blocked": any other device or dtype, PyTorch ops in few large blocks without host
    syncs. SEARCH_PATH, when set, overrides the choice. Builds the C++ kernel or imports Triton only when
    the device and dtype could use it.
    """
    if SEARCH_PATH is not None:
        return SEARCH_PATH
    kind = torch.device(device).type
    if kind == "cpu":
        return "cpu-kernel" if USE_KERNEL and dtype == torch.float32 and build_kernel() is not None else "pytorch"
    if kind == "cuda" and USE_KERNEL and dtype == torch.float32 and fused_search() is not None:
        return "fused"
    return "blocked"


# ----------------------------------------------------------------------------------- nearest-code search

def nearest_codes(z: torch.Tensor, codebook: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """Index of the nearest codebook row for each row of z: (N, D), (K, D) -> (N,) int64.

    Ties go to the lowest index, as `argmin` of the distances would. `chunk_rows` (default: chosen from K)
    bounds the rows scored at once. z and codebook share a dtype.
    """
    return nearest_columns(z.t().unsqueeze(0), codebook, chunk_rows).view(-1)


def _blocks(B: int, L: int, cols: int):
    """(b0, b1, l0, l1): row-major slices of a (B, L) grid of positions, at most `cols` positions each."""
    if L >= cols:
        for b in range(B):
            for l0 in range(0, L, cols):
                yield b, b + 1, l0, min(l0 + cols, L)
    else:
        for b0 in range(0, B, cols // L):
            yield b0, min(b0 + cols // L, B), 0, L


@torch.no_grad()
def nearest_columns(z: torch.Tensor, codebook: torch.Tensor, cols: int | None = None) -> torch.Tensor:
    """Nearest code of each column vector of z: (B, D, L), (K, D) -> codes (B, L) int64, ties to the lowest.

    argmin_k |z - e_k|^2 = argmax_k (z . e_k - |e_k|^2 / 2), computed in the inputs' dtype (also under
    autocast): the lowest index among exact maxima, the first NaN score where there is one (argmax's rule).
    One matmul per block of at most `cols` columns (default: chosen from K and the device; the fused
    kernel tiles by itself), never an (N, K) matrix. The path goes by device and dtype (`search_path`):
    on CPU in float32 the codebook carries -|e_k|^2 / 2 as an extra column and z a row of ones, so the
    matmul adds the norms, and the compiled kernel finds the maxima; on CUDA in float32 with Triton, one
    fused kernel; elsewhere PyTorch ops in blocks sized for the device.
    """
    B, _, L = z.shape
    if B * L == 0:
        return torch.empty(B, L, dtype=torch.long, device=z.device)
    path = search_path(z.device, z.dtype)
    assert path in SEARCH_PATHS, path
    # Autocast would run the matmuls below in half precision: the search stays in the inputs' dtype.
    with torch.autocast(z.device.type, enabled=False) if _autocast_on(z.device.type) else contextlib.nullcontext():
        if path == "fused":
            codes = _fused_columns(z, codebook)
            if codes is not None:
                return codes
            path = "blocked"
        if path == "blocked":
            return _blocked_columns(z, codebook, cols)
        return _cpu_columns(z, codebook, cols, build_kernel() if path == "cpu-kernel" else None)


def _cpu_columns(z: torch.Tensor, codebook: torch.Tensor, cols: int | None, kernel) -> torch.Tensor:
    """The CPU search: the C++ kernel where given, else PyTorch ops in cache-sized blocks. (B, D, L) -> (B, L)."""
    B, D, L = z.shape
    K = codebook.shape[0]
    if kernel is not None:
        tile = min(K, CODE_TILE)
        cols = min(cols or max(1, SCORE_BLOCK_ELEMENTS // tile), B * L)
        e_aug = torch.cat([codebook, codebook.pow(2).sum(1, keepdim=True).mul_(-0.5)], 1)  # (K, D+1)
        return kernel.nearest_codes(z, e_aug.to(z.dtype).contiguous(), tile, cols)
    # PyTorch ops: torch.argmax over a (rows x K) block is not vectorised on CPU (it costs as much as the
    # matmul), so amax, then the one-hot of the maximum (eq, in place) times a (K, 3) matrix that reads off
    # the index as two base-256 digits (exact even in bf16 / TF32 matmuls) and counts the maxima. Rows
    # whose count is not 1 (an exact tie, or NaN) are searched again by argmax.
    cols = min(cols or max(64, SCORE_BLOCK_ELEMENTS // K), B * L)
    half_norms = codebook.pow(2).sum(1).mul_(-0.5)  # (K,)
    index = torch.arange(K, device=z.device)
    digits = torch.stack([index % 256, index // 256, torch.ones_like(index)], 1).to(z.dtype)  # (K, 3)
    codes = torch.empty(B, L, dtype=torch.long, device=z.device)
    for b0, b1, l0, l1 in _blocks(B, L, cols):
        rows = z[b0:b1, :, l0:l1].transpose(1, 2).reshape(-1, D)  # (n, D); a copy only across items
        scores = torch.addmm(half_norms, rows, codebook.t())  # (n, K)
        top = scores.amax(1, keepdim=True)
        found = torch.eq(scores, top, out=scores) @ digits  # (n, 3)
        block = (found[:, 0] + 256 * found[:, 1]).long()
        unsure = (found[:, 2] != 1).nonzero().squeeze(1)
        if unsure.numel():
            block[unsure] = torch.addmm(half_norms, rows[unsure], codebook.t()).argmax(1)
        codes[b0:b1, l0:l1] = block.view(b1 - b0, l1 - l0)
    return codes


def _blocked_columns(z: torch.Tensor, codebook: torch.Tensor, cols: int | None) -> torch.Tensor:
    """The search off CPU in PyTorch ops: (B, D, L), (K, D) -> codes (B, L), two launches per block.

    Blocks of about DEVICE_SCORE_BLOCK_ELEMENTS scores, each one matmul with the norms added (addmm for a
    slice of one item, baddbmm for whole items, both reading z channels-first without a copy) and one
    argmax over all K codes, written into the output: no host synchronisation (no nonzero, no item), so
    the launches queue ahead of the GPU. argmax itself keeps the tie rule on every device: the lowest index
    among exact maxima, the first NaN. Matmuls follow torch's float32 precision setting (IEEE float32
    unless TF32 was enabled: then `nearest_columns` warns once).
    """
    B, D, L = z.shape
    K = codebook.shape[0]
    if z.device.type == "cuda" and z.dtype == torch.float32:
        _warn_if_tf32()
    cols = min(cols or max(1, DEVICE_SCORE_BLOCK_ELEMENTS // K), B * L)
    half_norms = codebook.pow(2).sum(1).mul_(-0.5)  # (K,)
    codebook_t = codebook.t()  # (D, K)
    codes = torch.empty(B, L, dtype=torch.long, device=z.device)
    for b0, b1, l0, l1 in _blocks(B, L, cols):
        if b1 - b0 == 1:  # a slice of one item
            scores = torch.addmm(half_norms, z[b0, :, l0:l1].t(), codebook_t)  # (n, K)
            torch.argmax(scores, 1, out=codes[b0, l0:l1])
        else:  # whole items
            scores = torch.baddbmm(half_norms, z[b0:b1].transpose(1, 2), codebook_t.expand(b1 - b0, D, K))  # (b, L, K)
            torch.argmax(scores, 2, out=codes[b0:b1])
    return codes


def _fused_columns(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor | None:
    """The Triton search, or None (after one warning) where it fails to compile or launch."""
    global _fused
    module = fused_search()
    if module is None:
        return None
    try:
        return module.nearest_columns(z, codebook)
    except Exception as e:  # a compiler or driver Triton cannot use: the blocked path gives the same codes
        warnings.warn(f"vqvae: the fused nearest-code search failed ({str(e).splitlines()[0][:200]}); "
                      "using PyTorch ops", RuntimeWarning, stacklevel=3)
        _fused = False
        return None


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # a device type autocast does not know
        return False


_tf32_warned = False


def _warn_if_tf32() -> None:
    """Warn once where CUDA float32 matmuls run in TF32: the blocked search's scores are then TF32's."""
    global _tf32_warned
    if _tf32_warned:
        return
    matmul = torch.backends.cuda.matmul
    level = getattr(matmul, "fp32_precision", None)  # torch >= 2.9; reading it never mixes the two APIs
    if level is None:
        on = bool(matmul.allow_tf32)
    else:
        on = (level if level != "none" else getattr(torch.backends, "fp32_precision", "none")) == "tf32"
    if on:
        _tf32_warned = True
        warnings.warn("vqvae: TF32 matmuls are enabled, so the nearest-code search without Triton scores in "
                      "TF32: codes may differ from float32 ones on near ties", RuntimeWarning, stacklevel=4)


# ------------------------------------------------------------------------------- z_q and the loss terms

def _gather_residual(z: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor, workspace: list):
    """z (B, D, L), codebook (K, D), codes (B, L) -> z_q = chosen codes (B, D, L), z - z_q, sum (z - z_q)^2.

    workspace: [tensor or None], the caller's buffer for z_q and z - z_q, reused by the kernel once free.
    """
    kernel = _cpu_kernel(z)
    if kernel is not None:
        z_q, diff, total, workspace[0] = kernel.gather_residual(z.contiguous(), codebook.contiguous(),
                                                                codes.contiguous(), workspace[0])
        return z_q, diff, total.to(z.dtype)
    (B, L), (K, D) = codes.shape, codebook.shape
    z_q = codebook.t().expand(B, D, K).gather(2, codes[:, None].expand(B, D, L))  # channels-first directly
    diff = z - z_q
    return z_q, diff, torch.dot(diff.view(-1), diff.view(-1))


def scatter_sum(values: torch.Tensor, codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Sum of the vectors assigned to each code: values (B, D, L), codes (B, L) -> (K, D)."""
    kernel = _cpu_kernel(values)
    if kernel is not None:
        return kernel.scatter_sum(values.contiguous(), codes, codebook_size)
    rows = values.transpose(1, 2).reshape(-1, values.shape[1])  # (N, D)
    return values.new_zeros(codebook_size, values.shape[1]).index_add_(0, codes.reshape(-1), rows)


class _Quantize(torch.autograd.Function):
    """z (B, D, L), codebook (K, D), codes (B, L), workspace -> z_q, commitment, codebook_term.

    z_q has the value e exactly, and its gradient passes straight through to z (none to the codebook).
    The two loss terms have the same value, mean |z - e|^2, and differ in where the gradient goes:
    commitment to z only (2 (z - e) / numel), codebook_term to the chosen codes only (scattered sums of
    2 (e - z) / numel). Forward and backward are one pass each over z, by hand, where autograd through a
    gather, two mse_losses and a straight-through sum made several passes and allocations.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor, workspace: list):
        z_q, diff, total = _gather_residual(z, codebook, codes, workspace)  # (B, D, L), (B, D, L), ()
        commitment = total / diff.numel()
        ctx.save_for_backward(z, z_q, codes)
        # Not saved for backward: the first backward turns it into z's gradient in place (a fresh
        # N x D buffer costs page faults); a second one (retain_graph) recomputes it from z and z_q.
        ctx.diff = diff
        ctx.codebook_size = codebook.shape[0]
        ctx.set_materialize_grads(False)
        return z_q, commitment, commitment.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z_q, grad_commitment, grad_codebook_term):
        z, z_q, codes = ctx.saved_tensors
        diff, ctx.diff = ctx.diff, None
        if diff is None:
            diff = z - z_q
        numel, K = diff.numel(), ctx.codebook_size
        want_sums = ctx.needs_input_grad[1] and grad_codebook_term is not None
        grad_z, sums = grad_z_q, None  # straight through
        if ctx.needs_input_grad[0] and grad_commitment is not None:
            scale = grad_commitment * (2 / numel)
            kernel = _cpu_kernel(diff)
            if kernel is not None:  # the sums of diff per code, then z's gradient in place, in one pass
                upstream = None if grad_z_q is None else grad_z_q.contiguous()
                sums = kernel.residual_backward(diff, codes, upstream, float(scale), K, want_sums)
                grad_z = diff
            else:
                sums = scatter_sum(diff, codes, K) if want_sums else None
                grad_z = diff.mul_(scale) if grad_z_q is None else torch.addcmul(grad_z_q, diff, scale, out=diff)
        elif want_sums:
            sums = scatter_sum(diff, codes, K)
        grad_codebook = sums.mul_(grad_codebook_term * (-2 / numel)) if want_sums else None
        return grad_z, grad_codebook, None, None


def quantize(z: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor, workspace: list):
    """z (B, D, L), codebook (K, D), codes (B, L) -> z_q (B, D, L), commitment (), codebook_term ().

    z_q equals codebook[codes] (channels-first) and passes its gradient straight through to z. Both loss
    terms have the value mean |z - e|^2; commitment sends its gradient to z only, codebook_term to the
    chosen codes only. z and codebook share a dtype. workspace: a one-element list the caller keeps
    between calls ([None] at first): the memory of z_q and z - z_q, reused once the last outputs are gone.
    """
    return _Quantize.apply(z, codebook, codes, workspace)


# ---------------------------------------------------------------------------------------------- k-means

def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Lloyd's k-means on rows of x (N, D) -> centroids (k, D); empty clusters keep their centroid.

    Starts from k distinct rows of x (with repeats where N < k), drawn by `generator` on the CPU.
    """
    N = x.shape[0]
    idx = torch.randperm(N, generator=generator, device="cpu")[:k] if N >= k else \
        torch.randint(N, (k,), generator=generator, device="cpu")
    centroids = x[idx.to(x.device)].clone()
    for _ in range(iters):
        assign = nearest_codes(x, centroids)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        # where, not boolean indexing: no host sync per iteration on a GPU
        centroids = torch.where((counts > 0)[:, None], sums / counts.clamp_min(1)[:, None], centroids)
    return centroids
