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

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import QuantizerConfig

# Elements of the (rows x K) score block computed at once: 2^20 floats = 4 MiB, small enough to stay in
# cache on common CPUs, large enough that the matmul runs at full speed.
SCORE_BLOCK_ELEMENTS = 1 << 20


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

    argmin_k |z - e_k|^2 = argmax_k (z . e_k - |e_k|^2 / 2): one matmul per chunk of rows, never an
    (N, K, D) tensor, and only a (chunk, K) block of scores alive at a time.
    """
    N, K = z.shape[0], codebook.shape[0]
    if chunk_rows is None:
        chunk_rows = max(64, SCORE_BLOCK_ELEMENTS // K)
    half_norms = codebook.pow(2).sum(1).mul_(-0.5)  # (K,)
    codes = torch.empty(N, dtype=torch.long, device=z.device)
    et = codebook.t()
    for start in range(0, N, chunk_rows):
        stop = min(start + chunk_rows, N)
        scores = torch.addmm(half_norms, z[start:stop], et)  # (chunk, K)
        codes[start:stop] = scores.argmax(1)
    return codes


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


class _StraightThrough(torch.autograd.Function):
    """Forward: the codes e. Backward: the incoming gradient goes unchanged to z, none to e.

    Same as z + sg[e - z] but exact: that sum rounds, so z_q would differ from e in the last bits.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return e.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


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
        spatial = z_e.shape[2:]
        with torch.autocast(z_e.device.type, enabled=False):  # distances and codebook stay fp32
            z = rearrange(z_e.float(), "b d ... -> (b ...) d")  # (N, D)
            if self.training:
                self._maybe_init(z.detach())
            codes = nearest_codes(z.detach(), self.embeddings.detach())  # (N,)
            counts = torch.bincount(codes, minlength=self.codebook_size)  # (K,)
            e = self.embeddings[codes]  # (N, D); a copy that gathers gradient only at the chosen codes
            if self.training:
                self._update(z.detach(), codes, counts)  # after the lookup: z_q uses this step's codebook
            commitment = F.mse_loss(z, e.detach())
            loss = self._codebook_loss(z, e) + self.commitment_weight * commitment
            z_q = _StraightThrough.apply(z, e.detach())  # value e exactly, gradient passed to z
        z_q = rearrange(z_q, "(b s) d -> b d s", b=z_e.shape[0]).reshape(z_e.shape).to(z_e.dtype)
        codes = codes.view(z_e.shape[0], *spatial)
        p = counts.double() / codes.numel()
        stats = {
            "perplexity": torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum()).float(),
            "usage": (counts > 0).float().mean(),
            "commitment": commitment.detach(),
        }
        return Quantized(z_q, codes, loss, stats)

    def _codebook_loss(self, z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(e, z.detach())

    @torch.no_grad()
    def _maybe_init(self, z: torch.Tensor) -> None:
        if bool(self.initialized):
            return
        centroids = _kmeans(z, self.codebook_size, self.kmeans_iters)
        if _distributed():
            dist.broadcast(centroids, 0)
        self._set_codes(torch.arange(self.codebook_size, device=z.device), centroids)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _update(self, z: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> None:
        """Per-step bookkeeping in training mode: dead-code restart."""
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
        pick = torch.randint(z.shape[0], (dead.numel(),), device=z.device)
        vectors = z[pick]
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

    def _codebook_loss(self, z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return z.new_zeros(())

    @torch.no_grad()
    def _update(self, z: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> None:
        sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, z)  # (K, D)
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
