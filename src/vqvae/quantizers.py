"""Vector quantizers: `VectorQuantizer`, `EMAVectorQuantizer`, their output `Quantized`, `build_quantizer`
(which also builds the finite-scalar, residual and Gumbel quantizers of quantizer_variants.py).

Key: B batch, D code dim, K codebook size, S spatial shape ((H, W) or (T,)), N = B * prod(S) vectors.

Latents are channels-first (B, D, *S), as conv nets emit them, or with `channels_last=True` (B, *S, D),
as transformers hold them ((B, N, D) for a sequence). Every latent vector z_e is replaced by its nearest
codebook vector e_k (Euclidean argmin). The gradient passes straight through: z_q = z_e + sg[e_k - z_e]
has value e_k and the gradient of z_e. The loss is
    codebook term  |sg[z_e] - e|^2        (moves the codes; replaced by EMA updates in `EMAVectorQuantizer`)
  + beta * commitment term |z_e - sg[e]|^2  (keeps the encoder close to its codes)
each a mean over all latent positions and code dimensions (the paper's reference implementation), so the
value does not grow with D. The output unpacks like a tuple, `z_q, codes, loss = quantizer(z_e)`, and
names its fields, `quantizer(z_e).stats`.

Options (constructor arguments): k-means initialisation from the first training batch, restart of codes
unused for `dead_code_steps` training steps from recent encoder outputs. Under torch.distributed (training
mode) every rank makes the same collectives in the same order, so the codebooks stay identical: the code
counts and EMA sums are all-reduced (the stats are global); k-means runs on rank 0 over the vectors of all
ranks (all_gather) and is broadcast; a restart is decided from the all-reduced counts, hence on every rank
at once, and its vectors are drawn by rank 0 from all ranks' vectors. With rank r holding the r-th slice
of a global batch, this is the computation one process makes on the whole batch.

Precision: the search, the loss and the codebook are computed in the codebook's dtype, float32 (also under
autocast) or float64 (after `.double()`); z_q comes back in the input's dtype. Half-precision codebooks
are refused (their distances and EMA statistics lose too much precision).

This module owns the codebooks and what changes them; the arithmetic (nearest-code search, the fused
z_q + loss step with its backward, k-means, the CPU kernel) is in `nearest.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .config import QuantizerConfig
from .metrics import perplexity
from .nearest import kmeans, nearest_columns, quantize, scatter_sum

SUPPORTED_DTYPES = (torch.float32, torch.float64)  # of the codebook, hence of the arithmetic


@dataclass
class Quantized:
    """What every quantizer returns; unpacks as the tuple (z_q, codes, loss).

    z_q: quantized latents carrying the straight-through gradient, shaped like the input: (B, D, *S), or
        (B, *S, D) for a quantizer with channels_last (the Gumbel quantizer takes logits (B, K, *S) and
        returns (B, D, *S)).
    codes: (B, *S) int64 indices into the codebook; residual VQ: (B, Q, *S), one code per stage.
    loss: scalar, codebook + beta * commitment (EMA quantizers: beta * commitment only; residual VQ: the
        sum over stages; FSQ: 0; Gumbel: kl_weight * KL to the uniform prior).
    stats: detached scalar tensors: "perplexity" (exp entropy of the batch's code use), "usage" (fraction
        of codes used in the batch), "commitment" (mean |z_e - e|^2), and what a variant adds ("kl").
    """

    z_q: torch.Tensor
    codes: torch.Tensor
    loss: torch.Tensor
    stats: dict[str, torch.Tensor]

    def __iter__(self):
        """`z_q, codes, loss = quantizer(z_e)`, the call shape of other VQ libraries; stats by name only."""
        return iter((self.z_q, self.codes, self.loss))


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer with a codebook learned by the codebook loss |sg[z_e] - e|^2.

    codebook_size K, code_dim D, commitment_weight beta; kmeans_init: seed the codebook by `kmeans_iters`
    rounds of k-means on the first training batch; dead_code_steps > 0: re-seed codes unused for that
    many training steps from the batch's encoder outputs; channels_last: take (B, *S, D) latents and
    return z_q (B, *S, D) instead of (B, D, *S).
    """

    def __init__(self, codebook_size: int, code_dim: int, commitment_weight: float = 0.25,
                 kmeans_init: bool = False, kmeans_iters: int = 10, dead_code_steps: int = 0,
                 channels_last: bool = False):
        super().__init__()
        self.codebook_size, self.code_dim = codebook_size, code_dim
        self.commitment_weight = commitment_weight
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.dead_code_steps = dead_code_steps
        self.channels_last = channels_last
        self._init_codebook(torch.empty(codebook_size, code_dim).uniform_(-1 / codebook_size, 1 / codebook_size))
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self.register_buffer("unused_steps", torch.zeros(codebook_size, dtype=torch.long))
        self._workspace = [None]  # memory for z_q and z - z_q, reused from step to step (see nearest.quantize)

    def _init_codebook(self, weight: torch.Tensor) -> None:
        self.codebook = nn.Parameter(weight)

    @property
    def embeddings(self) -> torch.Tensor:
        """The codebook (K, D) as used for lookup."""
        return self.codebook

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, *S) -> their codebook vectors as z_q is laid out: (B, D, *S), or (B, *S, D) with
        channels_last."""
        return _lookup(self.embeddings, codes, self.channels_last)

    @torch.no_grad()
    def _set_codes(self, index: torch.Tensor, vectors: torch.Tensor) -> None:
        self.codebook.data[index] = vectors

    def forward(self, z_e: torch.Tensor) -> Quantized:
        """z_e (B, D, *S), or (B, *S, D) with channels_last -> Quantized; in training mode also applies
        init / EMA / restarts."""
        self._check_input(z_e)
        if self.channels_last:
            z_e = z_e.movedim(-1, 1)  # (B, D, *S), a view
        B, spatial = z_e.shape[0], z_e.shape[2:]
        with torch.autocast(z_e.device.type, enabled=False):  # distances and codebook stay in their dtype
            # Channels-first, as the conv emitted it: (B, D, *S) -> (B, D, L) is a view, not a copy.
            z = z_e.to(self.embeddings.dtype).reshape(B, self.code_dim, math.prod(spatial)).contiguous()
            if self.training:
                self._maybe_init(z.detach())
            codes = nearest_columns(z.detach(), self.embeddings.detach())  # (B, L)
            counts = torch.bincount(codes.view(-1), minlength=self.codebook_size)  # (K,)
            if self.training and _distributed():
                dist.all_reduce(counts)  # global counts: the stats, EMA and restarts of the whole batch
            z_q, commitment, codebook_term = quantize(z, self.embeddings, codes, self._workspace)  # (B, D, L)
            if self.training:
                self._update(z.detach(), codes, counts)  # after the lookup: z_q uses this step's codebook
            loss = self._codebook_loss(codebook_term) + self.commitment_weight * commitment
        z_q = z_q.view(z_e.shape).to(z_e.dtype)  # (B, D, *S)
        if self.channels_last:
            z_q = z_q.movedim(1, -1)  # (B, *S, D)
        codes = codes.view(B, *spatial)
        stats = {
            "perplexity": perplexity(counts).float(),
            "usage": (counts > 0).float().mean(),
            "commitment": commitment.detach(),
        }
        return Quantized(z_q, codes, loss, stats)

    def _check_input(self, z_e: torch.Tensor) -> None:
        if z_e.dim() < 2 or z_e.shape[-1 if self.channels_last else 1] != self.code_dim:
            layout = "(B, *S, D)" if self.channels_last else "(B, D, *S) (channels_last=True takes (B, *S, D))"
            raise ValueError(f"expected latents {layout} with D = {self.code_dim}, got shape {tuple(z_e.shape)}")
        if self.embeddings.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"codebook dtype {self.embeddings.dtype} is not supported (float32 or float64): keep "
                            "the quantizer in float32 and use torch.autocast for mixed precision")

    def _codebook_loss(self, codebook_term: torch.Tensor) -> torch.Tensor:
        return codebook_term

    @torch.no_grad()
    def _maybe_init(self, z: torch.Tensor) -> None:
        if bool(self.initialized):
            return
        rows = z.transpose(1, 2).reshape(-1, self.code_dim)  # (N, D)
        if _distributed():  # k-means over every rank's vectors, run once (rank 0) and broadcast
            rows = _gather_rows(rows)  # (N over all ranks, D) on rank 0, None elsewhere
            centroids = kmeans(rows, self.codebook_size, self.kmeans_iters) if rows is not None else \
                z.new_empty(self.codebook_size, self.code_dim)
            dist.broadcast(centroids, 0)
        else:
            centroids = kmeans(rows, self.codebook_size, self.kmeans_iters)
        self._set_codes(torch.arange(self.codebook_size, device=z.device), centroids)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _update(self, z: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> None:
        """Per-step bookkeeping in training mode: dead-code restart. z (B, D, L), codes (B, L), counts (K,):
        global (all ranks') counts under torch.distributed, so every rank finds the same dead codes."""
        if self.dead_code_steps <= 0:
            return
        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
        dead = torch.nonzero(self.unused_steps >= self.dead_code_steps).squeeze(1)
        if dead.numel() == 0:  # the same on every rank: no rank waits on a collective another skips
            return
        # Re-seed each dead code from a random recent encoder output: rows in batch order, over all ranks.
        if _distributed():
            vectors = _pick_rows(z, dead.numel())
        else:
            pick = torch.randint(codes.numel(), (dead.numel(),), device=z.device)
            vectors = z[pick // z.shape[2], :, pick % z.shape[2]]  # (dead, D)
        self._set_codes(dead, vectors)
        self.unused_steps[dead] = 0

    def extra_repr(self) -> str:
        layout = ", channels_last=True" if self.channels_last else ""
        return f"codebook_size={self.codebook_size}, code_dim={self.code_dim}, beta={self.commitment_weight}{layout}"


class EMAVectorQuantizer(VectorQuantizer):
    """Codebook learned by exponential moving averages of the encoder outputs assigned to each code.

    With decay gamma, counts n_k and sums m_k of the vectors assigned to code k in a batch:
        N_k <- gamma N_k + (1 - gamma) n_k,   M_k <- gamma M_k + (1 - gamma) m_k,   e_k = M_k / N~_k
    where N~_k is N_k with Laplace smoothing, (N_k + eps) / (sum N + K eps) * sum N, so that no code
    divides by zero (the paper's appendix). The loss is the commitment term only.
    """

    def __init__(self, codebook_size: int, code_dim: int, commitment_weight: float = 0.25,
                 decay: float = 0.99, eps: float = 1e-5, kmeans_init: bool = False, kmeans_iters: int = 10,
                 dead_code_steps: int = 0, channels_last: bool = False):
        self.decay, self.eps = decay, eps
        super().__init__(codebook_size, code_dim, commitment_weight, kmeans_init, kmeans_iters, dead_code_steps,
                         channels_last)

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
        sums = scatter_sum(z, codes, self.codebook_size)  # (K, D)
        counts_f = counts.to(z.dtype)  # already global under torch.distributed
        if _distributed():
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts_f, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.codebook.copy_(self.embed_sum / smoothed[:, None])
        super()._update(z, codes, counts)


def build_quantizer(cfg: QuantizerConfig) -> nn.Module:
    """The quantizer a `QuantizerConfig` describes (kind "vq", "ema", "fsq", "rvq" or "gumbel")."""
    from .quantizer_variants import FiniteScalarQuantizer, GumbelQuantizer, ResidualVectorQuantizer

    common = dict(codebook_size=cfg.codebook_size, code_dim=cfg.code_dim,
                  commitment_weight=cfg.commitment_weight, kmeans_init=cfg.kmeans_init,
                  kmeans_iters=cfg.kmeans_iters, dead_code_steps=cfg.dead_code_steps)
    if cfg.kind == "ema":
        return EMAVectorQuantizer(decay=cfg.ema_decay, eps=cfg.ema_eps, **common)
    if cfg.kind == "fsq":
        return FiniteScalarQuantizer(cfg.levels)
    if cfg.kind == "rvq":
        return ResidualVectorQuantizer(cfg.stages, decay=cfg.ema_decay, eps=cfg.ema_eps, **common)
    if cfg.kind == "gumbel":
        return GumbelQuantizer(cfg.codebook_size, cfg.code_dim, temperature=cfg.temperature)
    return VectorQuantizer(**common)


def _lookup(embeddings: torch.Tensor, codes: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """Rows of embeddings (K, D) at codes (B, *S) -> (B, D, *S), or (B, *S, D) with channels_last."""
    e = embeddings[codes.long().to(embeddings.device)]  # (B, *S, D)
    return e if channels_last else torch.movedim(e, -1, 1)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1



def _row_counts(n: int, device: torch.device) -> list[int]:
    """The number of rows each rank holds (this rank's is `n`), in rank order."""
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=device))
    return [int(s) for s in sizes]


def _gather_rows(rows: torch.Tensor) -> torch.Tensor | None:
    """Every rank's rows (N_r, D), concatenated in rank order, on rank 0 (None on other ranks). Ranks may
    hold different numbers of rows: each sends its rows padded to the largest count."""
    sizes = _row_counts(rows.shape[0], rows.device)
    padded = rows.new_zeros(max(sizes), rows.shape[1])
    padded[:rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    if dist.get_rank() != 0:
        return None
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def _pick_rows(z: torch.Tensor, count: int) -> torch.Tensor:
    """`count` vectors drawn at random (rank 0's draw, the one a single process would make) from the rows
    of every rank's z (B_r, D, L), numbered in rank order then (b, l) order; the same on every rank.

    Only the picked indices are broadcast; each rank writes the vectors it holds and a sum over ranks
    (exact: the other ranks add zeros) puts them together.
    """
    L = z.shape[2]
    sizes = _row_counts(z.shape[0] * L, z.device)
    start = sum(sizes[:dist.get_rank()])
    pick = torch.randint(sum(sizes), (count,), device=z.device) if dist.get_rank() == 0 else \
        torch.empty(count, dtype=torch.long, device=z.device)
    dist.broadcast(pick, 0)
    local = pick - start
    mine = (local >= 0) & (local < z.shape[0] * L)
    local = local.clamp(0, z.shape[0] * L - 1)
    vectors = z[local // L, :, local % L] * mine[:, None].to(z.dtype)  # (count, D)
    dist.all_reduce(vectors)
    return vectors
