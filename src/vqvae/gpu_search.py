"""The nearest-code search fused into one Triton kernel: the GPU path of `nearest.nearest_columns`.

Key: B batch, D code dim, K codebook size, L positions per item, N = B * L latent vectors.

`nearest.py` calls `nearest_columns` here for CUDA float32 latents where Triton imports (`nearest.search_path`
says which path a device and dtype take). Each program takes BLOCK_N latent vectors, read straight from the
channels-first (B, D, L) latents, and walks the codebook in tiles of BLOCK_K codes: the scores
z . e - |e|^2 / 2 of a tile come from one tl.dot in IEEE float32 (never TF32, whatever torch's matmul
setting), and only the tile's first maximum is kept, merged into a running (best score, index) per vector.
The N x K scores are never written, which is what makes the plain matmul + argmax (the floor) slow.

The choice is argmax's, as on the CPU: the lowest index among exact maxima of the float32 scores, and the
first NaN where any score is NaN. A tile's maximum only replaces the running one when strictly greater,
and tiles go in code order, so ties keep the earlier code. Float rounding of the scores follows the
kernel's own summation order, so on near ties (equal up to the last bit) the code can differ from the CPU
path's, as the CPU's own paths can differ from each other.

On CUDA the block sizes are autotuned per (K, D) on first use (seconds); under TRITON_INTERPRET=1
(Triton's interpreter, which runs the kernel on CPU tensors, as the tests do) fixed block sizes are used.
Requires triton >= 3.0 (`input_precision` of tl.dot); older versions fail to import this module and
`nearest` falls back to PyTorch ops.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

if int(triton.__version__.split(".")[0]) < 3:
    raise ImportError(f"vqvae's fused search needs triton >= 3.0, found {triton.__version__}")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# (BLOCK_N, BLOCK_K, BLOCK_D, num_warps, num_stages): the autotuner's candidates on CUDA, CONFIGS[0] alone
# under the interpreter. BLOCK_D is capped at D padded to a power of two (at least 16, for tl.dot); where
# it covers all of D, a block's latents are loaded once for the whole codebook walk, else chunk by chunk per
# code tile. Chosen so that none spills registers at D = 64 on sm_90 with IEEE float32 dots (ptxas -v).
CONFIGS = ((64, 64, 64, 4, 2), (64, 64, 32, 8, 2), (128, 64, 64, 8, 2), (128, 64, 32, 8, 2),
           (128, 128, 32, 16, 2), (256, 64, 32, 16, 2))
NO_CODE = tl.constexpr(2**31 - 1)  # larger than any code index


@triton.jit
def _nearest_kernel(z_ptr, e_ptr, h_ptr, out_ptr, N, L, K, D,
                    stride_zb, stride_zd, stride_zl, stride_ek, stride_ed,
                    D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[n] = argmax_k (z[:, n] . e[k] + h[k]) for the BLOCK_N flat positions n = b * L + l of a program."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    n_ok = n < N
    b = n // L
    z_rows = z_ptr + b.to(tl.int64) * stride_zb + (n - b * L).to(tl.int64) * stride_zl  # (BLOCK_N,) pointers
    d = tl.arange(0, BLOCK_D)
    if BLOCK_D == D_PAD:  # the block's latents, (BLOCK_N, BLOCK_D), loaded once for the whole codebook
        z_tile = tl.load(z_rows[:, None] + d[None, :].to(tl.int64) * stride_zd,
                         mask=n_ok[:, None] & (d < D)[None, :], other=0.0)
    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    index = tl.zeros((BLOCK_N,), tl.int32)
    nan_seen = tl.zeros((BLOCK_N,), tl.int32)  # 1 once a NaN score was found: that code stays
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        k_ok = k < K
        e_cols = e_ptr + k.to(tl.int64) * stride_ek  # (BLOCK_K,) pointers
        if BLOCK_D == D_PAD:
            e_tile = tl.load(e_cols[None, :] + d[:, None] * stride_ed, mask=k_ok[None, :] & (d < D)[:, None],
                             other=0.0)  # (BLOCK_D, BLOCK_K)
            acc = tl.dot(z_tile, e_tile, input_precision="ieee")  # (BLOCK_N, BLOCK_K)
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
            for d0 in range(0, D_PAD, BLOCK_D):  # a loop, not unrolled: shared memory for one chunk
                dc = d0 + d
                z_part = tl.load(z_rows[:, None] + dc[None, :].to(tl.int64) * stride_zd,
                                 mask=n_ok[:, None] & (dc < D)[None, :], other=0.0)
                e_part = tl.load(e_cols[None, :] + dc[:, None] * stride_ed,
                                 mask=k_ok[None, :] & (dc < D)[:, None], other=0.0)
                acc = tl.dot(z_part, e_part, acc, input_precision="ieee")
        h = tl.load(h_ptr + k, mask=k_ok, other=0.0)  # (BLOCK_K,) -|e_k|^2 / 2
        scores = tl.where(k_ok[None, :], acc + h[None, :], float("-inf"))  # padding codes never win
        is_nan = scores != scores
        tile_nan = tl.max(is_nan.to(tl.int32), 1)  # (BLOCK_N,)
        first_nan = tl.min(tl.where(is_nan, k[None, :], NO_CODE), 1)
        scores = tl.where(is_nan, float("-inf"), scores)
        top = tl.max(scores, 1)  # (BLOCK_N,)
        first_top = tl.min(tl.where(scores == top[:, None], k[None, :], NO_CODE), 1)
        take_nan = (nan_seen == 0) & (tile_nan == 1)
        take_top = (nan_seen == 0) & (tile_nan == 0) & (top > best)
        index = tl.where(take_nan, first_nan, tl.where(take_top, first_top, index))
        best = tl.where(take_top, top, best)
        nan_seen = nan_seen | tile_nan
    tl.store(out_ptr + n, index.to(tl.int64), mask=n_ok)


def _capped(configs, named_args, **kwargs):
    """The autotuner's candidates with BLOCK_D capped at D_PAD (new Config objects), duplicates dropped."""
    d_pad, kept = kwargs["D_PAD"], {}
    for c in configs:
        sizes = {**c.kwargs, "BLOCK_D": min(c.kwargs["BLOCK_D"], d_pad)}
        kept.setdefault((*sorted(sizes.items()), c.num_warps, c.num_stages),
                        triton.Config(sizes, num_warps=c.num_warps, num_stages=c.num_stages))
    return list(kept.values())


def _autotuned(do_bench=None):
    """The kernel autotuned over CONFIGS per (K, D); do_bench replaces Triton's GPU timer (tests)."""
    configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "BLOCK_D": d}, num_warps=w, num_stages=s)
               for n, k, d, w, s in CONFIGS]
    timer = {"do_bench": do_bench} if do_bench else {}
    return triton.autotune(configs, key=["K", "D"], prune_configs_by={"early_config_prune": _capped},
                           **timer)(_nearest_kernel)


_tuned_kernel = None if INTERPRET else _autotuned()


def nearest_columns(z: torch.Tensor, codebook: torch.Tensor,
                    blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Nearest code of each column of z: (B, D, L) float32, (K, D) float32 -> codes (B, L) int64.

    Same contract as `nearest.nearest_columns` (argmax of z . e - |e|^2 / 2, ties to the lowest code,
    the first NaN score wins). z may have any strides. blocks = (BLOCK_N, BLOCK_K, BLOCK_D), powers of
    two >= 16 (BLOCK_D capped at D padded), fixes the block sizes; by default they are autotuned on CUDA,
    or CONFIGS[0] under the interpreter.
    """
    B, D, L = z.shape
    K = codebook.shape[0]
    assert z.dtype == codebook.dtype == torch.float32 and codebook.shape[1] == D, (z.dtype, codebook.shape)
    codes = torch.empty(B, L, dtype=torch.long, device=z.device)
    N = B * L
    if N == 0:
        return codes
    half_norms = codebook.pow(2).sum(1).mul_(-0.5)  # (K,)
    d_pad = max(16, triton.next_power_of_2(D))
    args = (z, codebook, half_norms, codes, N, L, K, D, *z.stride(), *codebook.stride())
    # enable_fp_fusion=False: no mul + add contracted into FMAs beyond the dot's own (and no warning about
    # the default changing in Triton 3.10).
    # Triton launches on the current CUDA device: make it z's.
    with torch.cuda.device(z.device) if z.device.type == "cuda" else contextlib.nullcontext():
        if blocks is not None or _tuned_kernel is None:
            block_n, block_k, block_d, warps, stages = (*blocks, 4, 2) if blocks else CONFIGS[0]
            _nearest_kernel[(triton.cdiv(N, block_n),)](*args, D_PAD=d_pad, BLOCK_N=block_n, BLOCK_K=block_k,
                                                        BLOCK_D=min(block_d, d_pad), num_warps=warps,
                                                        num_stages=stages, enable_fp_fusion=False)
        else:
            _tuned_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, D_PAD=d_pad, enable_fp_fusion=False)
    return codes
