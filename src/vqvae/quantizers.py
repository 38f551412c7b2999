"""Vector quantizers on channels-first latents (B, D, *S), as conv nets emit them.

Key: B batch, D code dim, K codebook size, S spatial shape ((H, W) or (T,)), N = B * prod(S) vectors.

Every latent vector z_e is replaced by its nearest codebook vector e_k (Euclidean argmin). The gradient
passes straight through: z_q = z_e + sg[e_k - z_e] has value e_k and the gradient of z_e. The loss is
    codebook term  |sg[z_e] - e|^2        (moves the codes; replaced by EMA updates in `EMAVectorQuantizer`)
  + beta * commitment term |z_e - sg[e]|^2  (keeps the encoder close to its codes)
each a mean over all latent positions and code dimensions (the paper's reference implementation), so the
value does not grow with D.

Options (constructor arguments): k-means initialisation from the first training batch, restart of codes
unused for `dead_code_steps` training steps from recent encoder outputs. Under torch.distributed the
statistics are all-reduced and the random choices made on rank 0 and broadcast, so ranks stay identical.

Speed (the quantizer runs on every latent vector of every step; benchmarks/quantizer.py measures each
choice against the floor, the nearest-code matmul alone):
- the latents stay channels-first: no (B, D, *S) <-> (N, D) copies;
- the search scores blocks of (codes x columns) by one matmul each, the norms folded into it, and never
  holds an (N, K) matrix; on CPU a small C++ kernel (built once with torch's cpp_extension, ~30 s, then
  cached) finds each column's first maximum in one vectorised pass, where torch.argmax costs as much as
  the matmul; without a compiler, or off CPU, PyTorch ops (amax + eq + a matmul that reads the index
  off the one-hot, half the cost of argmax) pick the same nearest codes, up to float rounding on near
  ties;
- `_Quantize` computes z_q and both loss terms in one pass and writes its backward by hand: straight
  through to z plus the commitment term, the codebook term scattered to the chosen codes only; z_q and
  z - z_q (which becomes z's gradient in place) share one buffer that each quantizer reuses once the
  last step's outputs are gone, instead of faulting fresh memory in every step.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

from .config import QuantizerConfig

# The nearest-code search scores a block of (codes x columns) at a time: small enough to stay in the L2
# cache while its maximum is found, large enough that the matmul runs at full speed. Codebooks larger than
# CODE_TILE are scored tile by tile.
SCORE_BLOCK_ELEMENTS = 1 << 18
CODE_TILE = 2048
# False: use PyTorch ops only, never the compiled kernel (tests and benchmarks compare the two).
USE_KERNEL = True

# The CPU kernels, compiled on first use. nearest_codes: blocks of columns in parallel, each scored by a
# matmul and reduced to its per-column first maximum in one vectorised pass (torch.argmax over a block
# is not vectorised and costs as much as the matmul). gather_residual / residual_backward / scatter_sum:
# the loss's forward, backward and the EMA sums, one pass each over the (B, D, L) latents.
_KERNEL_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <limits>

// For each column c of the (rows, n) block s (row stride ld): where a row beats best[c], take it. Strict >
// keeps the first maximum, and the first NaN wins, as torch.argmax does. Branch-free, so it vectorises
// across columns; compiled for AVX-512, AVX2 and plain x86-64, chosen at run time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
static void column_argmax(const float* s, int64_t rows, int64_t n, int64_t ld, int32_t first_code,
                          float* best, int32_t* index) {
  for (int64_t k = 0; k < rows; ++k) {
    const float* row = s + k * ld;
    const int32_t code = first_code + static_cast<int32_t>(k);
    for (int64_t c = 0; c < n; ++c) {
      const float v = row[c], b = best[c];
      const bool take = (v > b) | ((v != v) & (b == b));
      best[c] = take ? v : b;
      index[c] = take ? code : index[c];
    }
  }
}

// z (B, D, L) float32, any strides; e_aug (K, D+1) = [e, -|e|^2/2] -> codes (B, L) int64. A job is a
// block of at most `cols` positions, contiguous in (B, L) order: a slice of one item, or whole items.
torch::Tensor nearest_codes(torch::Tensor z, torch::Tensor e_aug, int64_t tile, int64_t cols) {
  const int64_t B = z.size(0), D = z.size(1), L = z.size(2), K = e_aug.size(0);
  const bool slices = L >= cols;
  const int64_t per_item = (L + cols - 1) / cols, items = slices ? 1 : cols / L;
  const int64_t jobs = slices ? B * per_item : (B + items - 1) / items;
  auto index = torch::empty({B * L}, z.options().dtype(torch::kInt));
  at::parallel_for(0, jobs, 1, [&](int64_t begin, int64_t end) {
    auto z_aug = torch::empty({D + 1, cols}, z.options());  // a block of z's columns over a row of ones
    z_aug[D].fill_(1);
    auto scores = torch::empty({std::min(tile, K), cols}, z.options());
    std::vector<float> best(cols);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b0 = slices ? job / per_item : job * items, nb = std::min(items, B - b0);
      const int64_t l0 = slices ? (job % per_item) * cols : 0, nl = slices ? std::min(cols, L - l0) : L;
      const int64_t n = nb * nl;
      auto block = z_aug.narrow(1, 0, n);
      block.narrow(0, 0, D).view({D, nb, nl}).copy_(z.narrow(0, b0, nb).narrow(2, l0, nl).transpose(0, 1));
      int32_t* out = index.data_ptr<int32_t>() + b0 * L + l0;
      std::fill(best.begin(), best.begin() + n, -std::numeric_limits<float>::infinity());
      std::fill(out, out + n, 0);
      for (int64_t k0 = 0; k0 < K; k0 += tile) {
        const int64_t rows = std::min(tile, K - k0);
        auto s = scores.narrow(0, 0, rows).narrow(1, 0, n);
        at::mm_out(s, e_aug.narrow(0, k0, rows), block);  // (rows, n) scores
        column_argmax(s.data_ptr<float>(), rows, n, s.stride(0), static_cast<int32_t>(k0), best.data(), out);
      }
    }
  });
  return index.to(torch::kLong).view({B, L});
}

// Forward of the loss in one pass: z_q = codebook[codes] written channels-first, diff = z - z_q and the
// sum of diff^2. z (B, D, L), codebook (K, D), codes (B, L), all contiguous. z_q and diff live in one
// (2, B, D, L) buffer: `workspace` again once nothing else holds it (last step's z_q and gradient are
// gone), else a new one, returned for next time. glibc hands freed buffers this large back to the
// system, and faulting them in again page by page costs more than the gather itself.
std::vector<torch::Tensor> gather_residual(torch::Tensor z, torch::Tensor codebook, torch::Tensor codes,
                                           c10::optional<torch::Tensor> workspace) {
  const int64_t B = z.size(0), D = z.size(1), L = z.size(2), K = codebook.size(0);
  auto table = codebook.t().contiguous();  // (D, K): row d is dimension d of every code
  const bool reuse = workspace.has_value() && workspace->defined() && workspace->numel() == 2 * B * D * L &&
                     workspace->storage().use_count() == 1;
  auto both = reuse ? *workspace : torch::empty({2, B, D, L}, z.options());
  auto z_q = torch::empty({0}, z.options()).set_(both.storage(), 0, z.sizes(), z.strides());
  auto diff = torch::empty({0}, z.options()).set_(both.storage(), B * D * L, z.sizes(), z.strides());
  std::vector<double> partial(B * D);
  const float *zp = z.data_ptr<float>(), *tp = table.data_ptr<float>();
  const int64_t* cp = codes.data_ptr<int64_t>();
  float *qp = z_q.data_ptr<float>(), *rp = diff.data_ptr<float>();
  at::parallel_for(0, B * D, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // row = b * D + d
      const float* t = tp + (row % D) * K;
      const int64_t* c = cp + (row / D) * L;
      const float* zr = zp + row * L;
      float *q = qp + row * L, *r = rp + row * L;
      float acc = 0;
      #pragma omp simd reduction(+ : acc)
      for (int64_t l = 0; l < L; ++l) {
        const float e = t[c[l]], v = zr[l] - e;
        q[l] = e;
        r[l] = v;
        acc += v * v;
      }
      partial[row] = acc;
    }
  });
  double total = 0;
  for (double p : partial) total += p;
  return {z_q, diff, torch::tensor(total, z.options().dtype(torch::kDouble)), both};
}

// sums[c[l], d0:d1] += v[d0:d1, l] for one item v (D, L), c (L), through a transposed tile of 64
// positions so that each add is a contiguous row.
static void add_to_codes(const float* v, const int64_t* c, int64_t D, int64_t L, int64_t d0, int64_t d1,
                         float* sums, float* tile) {
  const int64_t w = d1 - d0;
  for (int64_t l0 = 0; l0 < L; l0 += 64) {
    const int64_t n = std::min<int64_t>(64, L - l0);
    for (int64_t d = d0; d < d1; ++d)
      for (int64_t j = 0; j < n; ++j) tile[j * w + (d - d0)] = v[d * L + l0 + j];
    for (int64_t j = 0; j < n; ++j) {
      float* dst = sums + c[l0 + j] * D + d0;
      const float* src = tile + j * w;
      for (int64_t i = 0; i < w; ++i) dst[i] += src[i];
    }
  }
}

// Sums of the vectors assigned to each code: values (B, D, L), codes (B, L) -> (K, D). Each thread owns
// a range of d, so no two write the same element.
torch::Tensor scatter_sum(torch::Tensor values, torch::Tensor codes, int64_t K) {
  const int64_t B = values.size(0), D = values.size(1), L = values.size(2);
  auto sums = torch::zeros({K, D}, values.options());
  const float* vp = values.data_ptr<float>();
  const int64_t* cp = codes.data_ptr<int64_t>();
  at::parallel_for(0, D, 1, [&](int64_t d0, int64_t d1) {
    std::vector<float> tile(64 * (d1 - d0));
    for (int64_t b = 0; b < B; ++b)
      add_to_codes(vp + b * D * L, cp + b * L, D, L, d0, d1, sums.data_ptr<float>(), tile.data());
  });
  return sums;
}

// Backward of the loss in one pass over diff (B, D, L): if want_sums, the sums of diff per code (K, D),
// read first; then diff <- grad_z_q + scale * diff in place (no grad_z_q: zero).
torch::Tensor residual_backward(torch::Tensor diff, torch::Tensor codes, c10::optional<torch::Tensor> grad_z_q,
                                double scale, int64_t K, bool want_sums) {
  const int64_t B = diff.size(0), D = diff.size(1), L = diff.size(2);
  auto sums = want_sums ? torch::zeros({K, D}, diff.options()) : torch::Tensor();
  float* rp = diff.data_ptr<float>();
  const float* gp = grad_z_q.has_value() ? grad_z_q->data_ptr<float>() : nullptr;
  const int64_t* cp = codes.data_ptr<int64_t>();
  const float k = static_cast<float>(scale);
  at::parallel_for(0, D, 1, [&](int64_t d0, int64_t d1) {
    std::vector<float> tile(64 * (d1 - d0));
    for (int64_t b = 0; b < B; ++b) {
      if (want_sums) add_to_codes(rp + b * D * L, cp + b * L, D, L, d0, d1, sums.data_ptr<float>(), tile.data());
      for (int64_t d = d0; d < d1; ++d) {
        float* r = rp + (b * D + d) * L;
        const float* g = gp ? gp + (b * D + d) * L : nullptr;
        for (int64_t l = 0; l < L; ++l) r[l] = (g ? g[l] : 0.0f) + k * r[l];
      }
    }
  });
  return sums;
}
"""
_KERNEL_FUNCTIONS = ["nearest_codes", "gather_residual", "scatter_sum", "residual_backward"]
_kernel = None  # the compiled module; False once it failed to build


def _load_kernel():
    """The compiled kernels (built on first use, ~30 s, then cached by torch in ~/.cache/torch_extensions)."""
    global _kernel
    if _kernel is None:
        from torch.utils.cpp_extension import load_inline

        error = None
        for flags in (["-fopenmp"], []):  # compilers without OpenMP (Apple clang) build a serial kernel
            try:
                _kernel = load_inline("vqvae_quantizer_kernel", _KERNEL_SOURCE, functions=_KERNEL_FUNCTIONS,
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
    return _load_kernel() if USE_KERNEL and t.device.type == "cpu" and t.dtype == torch.float32 else None


@dataclass
class Quantized:
    """What every quantizer returns.

    z_q: (B, D, *S) quantized latents carrying the straight-through gradient.
    codes: (B, *S) int64 indices into the codebook.
    loss: scalar, codebook + beta * commitment (EMA quantizers: beta * commitment only).
    stats: detached scalar tensors: "perplexity" (exp entropy of the batch's code use), "usage" (fraction
        of codes used in the batch), "commitment" (mean |z_e - e|^2).
    """

    z_q: torch.Tensor
    codes: torch.Tensor
    loss: torch.Tensor
    stats: dict[str, torch.Tensor]


def nearest_codes(z: torch.Tensor, codebook: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """Index of the nearest codebook row for each row of z: (N, D), (K, D) -> (N,) int64.

    Ties go to the lowest index, as `argmin` of the distances would. `chunk_rows` (default: chosen from K)
    bounds the rows scored at once.
    """
    return _nearest_codes(z.t().unsqueeze(0), codebook, chunk_rows).view(-1)


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
def _nearest_codes(z: torch.Tensor, codebook: torch.Tensor, cols: int | None = None) -> torch.Tensor:
    """Nearest code of each column vector of z: (B, D, L), (K, D) -> codes (B, L) int64, ties to the lowest.

    argmin_k |z - e_k|^2 = argmax_k (z . e_k - |e_k|^2 / 2): one matmul per block of at most `cols`
    columns (default: chosen from K), never an (N, K) matrix. On CPU the codebook carries -|e_k|^2 / 2 as
    an extra column and z a row of ones, so the matmul adds the norms, and the compiled kernel finds the
    maxima; elsewhere, or where the kernel cannot be built, PyTorch ops (below).
    """
    B, D, L = z.shape
    K = codebook.shape[0]
    if B * L == 0:
        return torch.empty(B, L, dtype=torch.long, device=z.device)
    kernel = _cpu_kernel(z)
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


def _scatter_sum(values: torch.Tensor, codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Sum of the vectors assigned to each code: values (B, D, L), codes (B, L) -> (K, D)."""
    kernel = _cpu_kernel(values)
    if kernel is not None:
        return kernel.scatter_sum(values.contiguous(), codes, codebook_size)
    rows = values.transpose(1, 2).reshape(-1, values.shape[1])  # (N, D)
    return values.new_zeros(codebook_size, values.shape[1]).index_add_(0, codes.reshape(-1), rows)


def _kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Lloyd's k-means on rows of x (N, D) -> centroids (k, D); empty clusters keep their centroid."""
    N = x.shape[0]
    idx = torch.randperm(N, generator=generator, device="cpu")[:k] if N >= k else \
        torch.randint(N, (k,), generator=generator, device="cpu")
    centroids = x[idx.to(x.device)].clone()
    for _ in range(iters):
        assign = nearest_codes(x, centroids)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids


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
                sums = _scatter_sum(diff, codes, K) if want_sums else None
                grad_z = diff.mul_(scale) if grad_z_q is None else torch.addcmul(grad_z_q, diff, scale, out=diff)
        elif want_sums:
            sums = _scatter_sum(diff, codes, K)
        grad_codebook = sums.mul_(grad_codebook_term * (-2 / numel)) if want_sums else None
        return grad_z, grad_codebook, None, None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer with a codebook learned by the codebook loss |sg[z_e] - e|^2."""

    def __init__(self, codebook_size: int, code_dim: int, commitment_weight: float = 0.25,
                 kmeans_init: bool = False, kmeans_iters: int = 10, dead_code_steps: int = 0):
        super().__init__()
        self.codebook_size, self.code_dim = codebook_size, code_dim
        self.commitment_weight = commitment_weight
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.dead_code_steps = dead_code_steps
        self._init_codebook(torch.empty(codebook_size, code_dim).uniform_(-1 / codebook_size, 1 / codebook_size))
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self.register_buffer("unused_steps", torch.zeros(codebook_size, dtype=torch.long))
        self._workspace = [None]  # memory for z_q and z - z_q, reused from step to step (see _Quantize)

    def _init_codebook(self, weight: torch.Tensor) -> None:
        self.codebook = nn.Parameter(weight)

    @property
    def embeddings(self) -> torch.Tensor:
        """The codebook (K, D) as used for lookup."""
        return self.codebook

    @torch.no_grad()
    def _set_codes(self, index: torch.Tensor, vectors: torch.Tensor) -> None:
        self.codebook.data[index] = vectors

    def forward(self, z_e: torch.Tensor) -> Quantized:
        """z_e (B, D, *S) -> Quantized; in training mode also applies init / EMA / restarts."""
        B, spatial = z_e.shape[0], z_e.shape[2:]
        with torch.autocast(z_e.device.type, enabled=False):  # distances and codebook stay fp32
            # Work channels-first, as the conv emitted it: (B, D, *S) -> (B, D, L) is a view, not a copy.
            z = z_e.float().reshape(B, self.code_dim, math.prod(spatial)).contiguous()  # (B, D, L)
            if self.training:
                self._maybe_init(z.detach())
            codes = _nearest_codes(z.detach(), self.embeddings.detach())  # (B, L)
            counts = torch.bincount(codes.view(-1), minlength=self.codebook_size)  # (K,)
            z_q, commitment, codebook_term = _Quantize.apply(z, self.embeddings, codes, self._workspace)
            if self.training:
                self._update(z.detach(), codes, counts)  # after the lookup: z_q uses this step's codebook
            loss = self._codebook_loss(codebook_term) + self.commitment_weight * commitment
        z_q = z_q.view(z_e.shape).to(z_e.dtype)
        codes = codes.view(B, *spatial)
        p = counts.double() / codes.numel()
        stats = {
            "perplexity": torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum()).float(),
            "usage": (counts > 0).float().mean(),
            "commitment": commitment.detach(),
        }
        return Quantized(z_q, codes, loss, stats)

    def _codebook_loss(self, codebook_term: torch.Tensor) -> torch.Tensor:
        return codebook_term

    @torch.no_grad()
    def _maybe_init(self, z: torch.Tensor) -> None:
        if bool(self.initialized):
            return
        rows = z.transpose(1, 2).reshape(-1, self.code_dim)  # (N, D)
        centroids = _kmeans(rows, self.codebook_size, self.kmeans_iters)
        if _distributed():
            dist.broadcast(centroids, 0)
        self._set_codes(torch.arange(self.codebook_size, device=z.device), centroids)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _update(self, z: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> None:
        """Per-step bookkeeping in training mode: dead-code restart. z (B, D, L), codes (B, L), counts (K,)."""
        if self.dead_code_steps <= 0:
            return
        if _distributed():
            counts = counts.clone()
            dist.all_reduce(counts)
        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
        dead = torch.nonzero(self.unused_steps >= self.dead_code_steps).squeeze(1)
        if dead.numel() == 0:
            return
        # Re-seed each dead code from a random recent encoder output (rank 0's choice on all ranks).
        pick = torch.randint(codes.numel(), (dead.numel(),), device=z.device)
        vectors = z[pick // z.shape[2], :, pick % z.shape[2]]  # (dead, D)
        if _distributed():
            dist.broadcast(vectors, 0)
        self._set_codes(dead, vectors)
        self.unused_steps[dead] = 0

    def extra_repr(self) -> str:
        return f"codebook_size={self.codebook_size}, code_dim={self.code_dim}, beta={self.commitment_weight}"


class EMAVectorQuantizer(VectorQuantizer):
    """Codebook learned by exponential moving averages of the encoder outputs assigned to each code.

    With decay gamma, counts n_k and sums m_k of the vectors assigned to code k in a batch:
        N_k <- gamma N_k + (1 - gamma) n_k,   M_k <- gamma M_k + (1 - gamma) m_k,   e_k = M_k / N~_k
    where N~_k is N_k with Laplace smoothing, (N_k + eps) / (sum N + K eps) * sum N, so that no code
    divides by zero (the paper's appendix). The loss is the commitment term only.
    """

    def __init__(self, codebook_size: int, code_dim: int, commitment_weight: float = 0.25,
                 decay: float = 0.99, eps: float = 1e-5, kmeans_init: bool = False, kmeans_iters: int = 10,
                 dead_code_steps: int = 0):
        self.decay, self.eps = decay, eps
        super().__init__(codebook_size, code_dim, commitment_weight, kmeans_init, kmeans_iters, dead_code_steps)

    def _init_codebook(self, weight: torch.Tensor) -> None:
        self.register_buffer("codebook", weight)
        self.register_buffer("cluster_size", torch.ones(weight.shape[0]))
        self.register_buffer("embed_sum", weight.clone())

    @torch.no_grad()
    def _set_codes(self, index: torch.Tensor, vectors: torch.Tensor) -> None:
        self.codebook[index] = vectors
        self.cluster_size[index] = 1.0
        self.embed_sum[index] = vectors

    def _codebook_loss(self, codebook_term: torch.Tensor) -> torch.Tensor:
        return codebook_term.new_zeros(())

    @torch.no_grad()
    def _update(self, z: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> None:
        sums = _scatter_sum(z, codes, self.codebook_size)  # (K, D)
        counts_f = counts.to(z.dtype)
        if _distributed():
            dist.all_reduce(counts_f)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts_f, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.codebook.copy_(self.embed_sum / smoothed[:, None])
        super()._update(z, codes, counts)


def build_quantizer(cfg: QuantizerConfig) -> VectorQuantizer:
    """The quantizer a `QuantizerConfig` describes."""
    common = dict(codebook_size=cfg.codebook_size, code_dim=cfg.code_dim,
                  commitment_weight=cfg.commitment_weight, kmeans_init=cfg.kmeans_init,
                  kmeans_iters=cfg.kmeans_iters, dead_code_steps=cfg.dead_code_steps)
    if cfg.kind == "ema":
        return EMAVectorQuantizer(decay=cfg.ema_decay, eps=cfg.ema_eps, **common)
    return VectorQuantizer(**common)
