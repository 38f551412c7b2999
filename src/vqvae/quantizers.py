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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

from .config import QuantizerConfig

# The nearest-code search scores a block of (code tile x columns) at a time: small enough to stay in the
# L2 cache through the passes that find each column's maximum, large enough that the matmul runs at full
# speed. Codebooks larger than CODE_TILE are searched tile by tile; each tile is split into SLABS slabs.
SCORE_BLOCK_ELEMENTS = 1 << 19
CODE_TILE = 2048
SLABS = 16
# Gather and scatter loop over batch items when each holds at least this many vectors (one contiguous
# (D, L) slice per call); shorter items are handled by one call over the whole batch.
_PER_ITEM_MIN_LENGTH = 64


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

    argmin_k |z - e_k|^2 = argmax_k (z . e_k - |e_k|^2 / 2), scored by one matmul per (code tile x columns)
    block: the codebook carries -|e_k|^2 / 2 as an extra column and z a row of ones, so no pass adds the
    norms. `argmax` over a block is slow on CPU (not vectorised), several times the cost of `amax`; so:
      1. one amax over the block's SLABS slabs of codes -> (tile / SLABS, n): the best row r of any slab;
      2. on that small matrix: the maximum, its one-hot (eq) and a matmul that reads r off the one-hot,
         with a count;
      3. the SLABS scores at row r of each slab (a gather): the one-hot of the maximum gives the slab g.
    Index reads use small integers only, exact even when matmuls run in bf16/TF32. A column whose counts
    are not 1 (an exact tie, or NaN) is re-searched by argmax. Nothing of size N x K is allocated.
    """
    B, D, L = z.shape
    K, N = codebook.shape[0], B * L
    tiles = -(-K // CODE_TILE)
    tile = -(-K // (tiles * SLABS)) * SLABS  # equal tiles of whole slabs, padded with codes that never win
    rows = tile // SLABS  # codes per slab
    cols = min(cols or max(1, SCORE_BLOCK_ELEMENTS // tile), N)
    e_aug = torch.cat([codebook, codebook.pow(2).sum(1, keepdim=True).mul_(-0.5)], 1)  # (K, D+1)
    padded = e_aug.new_zeros(tiles * tile, D + 1)
    padded[:K], padded[K:, D] = e_aug, -math.inf
    row_digits = torch.stack([torch.arange(rows), torch.ones(rows, dtype=torch.long)]).to(z)  # (2, rows)
    slab_digits = torch.stack([torch.arange(SLABS), torch.ones(SLABS, dtype=torch.long)]).to(z)  # (2, SLABS)
    z_aug = z.new_empty(D + 1, cols)
    z_aug[D] = 1
    scores, slab_max = z.new_empty(tile, cols), z.new_empty(rows, cols)
    best = z.new_empty(tiles, N)  # best score of each tile
    found = z.new_empty(tiles, 4, N)  # row r, its count, slab g, its count
    pos = 0
    for b0, b1, l0, l1 in _blocks(B, L, cols):
        n = (b1 - b0) * (l1 - l0)
        z_aug[:D, :n].view(D, b1 - b0, l1 - l0).copy_(z[b0:b1, :, l0:l1].transpose(0, 1))
        for t in range(tiles):
            block = torch.mm(padded[t * tile:(t + 1) * tile], z_aug[:, :n], out=scores[:, :n])  # (tile, n)
            block = block.view(SLABS, rows, n)
            row_max = torch.amax(block, 0, out=slab_max[:, :n])  # (rows, n)
            top = torch.amax(row_max, 0, out=best[t, pos:pos + n])  # (n,)
            f = found[t, :, pos:pos + n]
            torch.mm(row_digits, torch.eq(row_max, top, out=row_max), out=f[:2])
            r = f[0].long().clamp_(0, rows - 1)  # in range even where the count is not 1 (then unused)
            at_row = block.gather(1, r.view(1, 1, n).expand(SLABS, 1, n))[:, 0]  # (SLABS, n)
            torch.mm(slab_digits, torch.eq(at_row, top, out=at_row), out=f[2:])
        pos += n
    if tiles == 1:
        tile_index, found = torch.zeros(N, dtype=torch.long, device=z.device), found[0]
    else:  # the first tile holding the maximum: ties across tiles go to the lower index
        tile_index = best.argmax(0)
        found = found.gather(0, tile_index.view(1, 1, N).expand(1, 4, N))[0]
    codes = tile_index * tile + found[2].long() * rows + found[0].long()  # (N,)
    unsure = ((found[1] != 1) | (found[3] != 1)).nonzero().squeeze(1)
    if unsure.numel():
        codes[unsure] = _argmax_scores(z[unsure // L, :, unsure % L], e_aug)
    return codes.view(B, L)


def _argmax_scores(rows: torch.Tensor, e_aug: torch.Tensor) -> torch.Tensor:
    """Brute-force argmax of the same scores for a few rows (N', D) -> (N',), in row chunks."""
    chunk = max(1, SCORE_BLOCK_ELEMENTS // e_aug.shape[0])
    rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)  # (N', D+1)
    return torch.cat([torch.mm(rows[i:i + chunk], e_aug.t()).argmax(1) for i in range(0, rows.shape[0], chunk)])


def _gather(codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """codebook (K, D), codes (B, L) -> the chosen codes (B, D, L), written channels-first directly."""
    (B, L), (K, D) = codes.shape, codebook.shape
    table = codebook.t().contiguous()  # (D, K)
    if L < _PER_ITEM_MIN_LENGTH:
        return table.expand(B, D, K).gather(2, codes[:, None].expand(B, D, L))
    out = codebook.new_empty(B, D, L)
    for b in range(B):
        torch.index_select(table, 1, codes[b], out=out[b])
    return out


def _scatter_sum(values: torch.Tensor, codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Sum of the vectors assigned to each code: values (B, D, L), codes (B, L) -> (K, D)."""
    B, D, L = values.shape
    sums = values.new_zeros(D, codebook_size)
    if L < _PER_ITEM_MIN_LENGTH:
        sums.index_add_(1, codes.reshape(-1), values.transpose(0, 1).reshape(D, B * L))
    else:
        for b in range(B):
            sums.index_add_(1, codes[b], values[b])
    return sums.t().contiguous()


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
    """z (B, D, L), codebook (K, D), codes (B, L) -> z_q, commitment, codebook_term, in one pass each.

    z_q has the value e exactly, and its gradient passes straight through to z (none to the codebook).
    The two loss terms have the same value, mean |z - e|^2, and differ in where the gradient goes:
    commitment to z only (2 (z - e) / numel), codebook_term to the chosen codes only (scattered sums of
    2 (e - z) / numel). Written by hand, the backward is one pass over z plus one scatter, where autograd
    through the gather, two mse_losses and a straight-through sum made several passes and allocations.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor):
        z_q = _gather(codebook, codes)  # (B, D, L)
        diff = z - z_q
        flat = diff.view(-1)
        commitment = torch.dot(flat, flat) / flat.numel()
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
        grad_z = grad_codebook = None
        if ctx.needs_input_grad[1] and grad_codebook_term is not None:
            grad_codebook = _scatter_sum(diff, codes, ctx.codebook_size).mul_(grad_codebook_term * (-2 / diff.numel()))
        if ctx.needs_input_grad[0]:
            grad_z = grad_z_q  # straight through
            if grad_commitment is not None:
                scale = grad_commitment * (2 / diff.numel())
                grad_z = diff.mul_(scale) if grad_z is None else torch.addcmul(grad_z, diff, scale, out=diff)
        return grad_z, grad_codebook, None


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
            z = z_e.float().reshape(B, self.code_dim, -1).contiguous()  # (B, D, L)
            if self.training:
                self._maybe_init(z.detach())
            codes = _nearest_codes(z.detach(), self.embeddings.detach())  # (B, L)
            counts = torch.bincount(codes.view(-1), minlength=self.codebook_size)  # (K,)
            z_q, commitment, codebook_term = _Quantize.apply(z, self.embeddings, codes)  # z_q (B, D, L)
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
