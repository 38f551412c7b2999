"""The other quantizers: finite scalar (FSQ), residual VQ and Gumbel-softmax; same output as quantizers.py.

Key: B batch, D code dim, K codebook size, Q stages (residual VQ), S spatial shape ((H, W) or (T,)).

Each takes channels-first latents (B, D, *S) as conv nets emit them, or (B, *S, D) with
`channels_last=True`, returns a `Quantized(z_q, codes, loss, stats)` and has `lookup(codes)`, the
codebook vectors of codes laid out as z_q is, so that a decoder can start from codes alone.

- `FiniteScalarQuantizer` (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple"): each
  of the D dimensions is bounded by a tanh to `levels[i]` values and rounded; a position's code is the
  mixed-radix number of its D digits. The codebook is implicit (every one of the prod(levels) codes
  exists by construction, none can collapse), nothing is learned and the loss is 0.
- `ResidualVectorQuantizer` (SoundStream; VQ-VAE with several codebooks): Q quantizers, each quantizing
  what the previous ones left; z_q is the sum of the Q chosen codes. Encoding is greedy, so the first s
  stages of the codes are the codes of the s-stage quantizer: `lookup(codes[:, :s])` gives s operating
  points from one model.
- `GumbelQuantizer` (DALL-E's dVAE; Jang et al. 2017): logits over K codes per position; in training a
  Gumbel-softmax sample (a soft one-hot at `temperature`) weights the codebook, in eval mode the argmax
  picks one code. The loss is `kl_weight` times the KL of softmax(logits) to the uniform prior.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .metrics import perplexity
from .quantizers import SUPPORTED_DTYPES, EMAVectorQuantizer, Quantized, VectorQuantizer, _lookup


def _usage_stats(codes: torch.Tensor, codebook_size: int) -> dict[str, torch.Tensor]:
    counts = torch.bincount(codes.reshape(-1), minlength=codebook_size)  # (K,)
    return {"perplexity": perplexity(counts).float(), "usage": (counts > 0).float().mean()}


def _check_layout(z: torch.Tensor, channels: int, channels_last: bool, name: str = "D") -> None:
    if z.dim() < 2 or z.shape[-1 if channels_last else 1] != channels:
        layout = f"(B, *S, {name})" if channels_last else f"(B, {name}, *S) (channels_last=True takes (B, *S, {name}))"
        raise ValueError(f"expected latents {layout} with {name} = {channels}, got shape {tuple(z.shape)}")


class FiniteScalarQuantizer(nn.Module):
    """FSQ with `levels` values per dimension: D = len(levels), K = prod(levels) implicit codes.

    Dimension i of z_e is bounded to (-L/2, L/2) by  b = tanh(z + shift) * (L - 1)(1 + eps)/2 - offset
    (offset 1/2 for even L, shift = atanh(offset / half) so that b(0) = 0), rounded to one of L integers
    (straight-through: the rounding passes the gradient of b unchanged) and divided by floor(L / 2), so
    z_q lies in [-1, 1]. Digit i is the rounded value + floor(L / 2), in 0..L-1, and the code is
    sum_i digit_i * prod(levels[:i]). `embeddings` (K, D) lists every code's vector, in code order.
    The arithmetic runs in float32 (float64 after `.double()`), also under autocast.
    """

    def __init__(self, levels: tuple[int, ...] | list[int], eps: float = 1e-3, channels_last: bool = False):
        super().__init__()
        if not levels or any(int(n) < 2 for n in levels):
            raise ValueError(f"levels must be integers >= 2, got {tuple(levels)}")
        self.levels = tuple(int(n) for n in levels)
        self.code_dim, self.codebook_size = len(self.levels), math.prod(self.levels)
        self.eps, self.channels_last = eps, channels_last
        L = torch.tensor(self.levels, dtype=torch.float64)
        half = (L - 1) * (1 + eps) / 2
        offset = (L % 2 == 0).double() / 2
        basis = torch.cumprod(torch.tensor((1,) + self.levels[:-1]), 0)  # (D,) mixed-radix place values
        # Derived from `levels`, so not saved: the state dict of an FSQ is empty.
        for name, value in (("half_range", half), ("offset", offset), ("shift", torch.atanh(offset / half)),
                            ("half_width", torch.floor(L / 2))):
            self.register_buffer(name, value.float(), persistent=False)
        self.register_buffer("basis", basis, persistent=False)
        digits = torch.arange(self.codebook_size)[:, None] // basis % torch.tensor(self.levels)  # (K, D)
        self.register_buffer("_embeddings", (digits - self.half_width) / self.half_width, persistent=False)

    @property
    def embeddings(self) -> torch.Tensor:
        """Every code's vector (K, D) in [-1, 1], row k for code k."""
        return self._embeddings

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """(..., D) -> the bounded values before rounding, dimension i in (-L_i/2, L_i/2)."""
        return torch.tanh(z + self.shift) * self.half_range - self.offset

    def forward(self, z_e: torch.Tensor) -> Quantized:
        """z_e (B, D, *S) (or (B, *S, D)) -> Quantized(z_q like z_e, codes (B, *S), loss 0, stats)."""
        _check_layout(z_e, self.code_dim, self.channels_last)
        if self.half_range.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"FSQ dtype {self.half_range.dtype} is not supported (float32 or float64): keep the "
                            "quantizer in float32 and use torch.autocast for mixed precision")
        z = z_e if self.channels_last else z_e.movedim(1, -1)  # (B, *S, D)
        with torch.autocast(z_e.device.type, enabled=False):
            b = self.bound(z.to(self.half_range.dtype))
            rounded = b.round()
            # value exactly rounded / half_width, gradient that of b (b - sg[b] is exactly 0)
            z_q = (rounded.detach() + (b - b.detach())) / self.half_width  # (B, *S, D)
            codes = ((rounded.detach() + self.half_width).long() * self.basis).sum(-1)  # (B, *S)
        z_q = z_q.to(z_e.dtype)
        if not self.channels_last:
            z_q = z_q.movedim(-1, 1)  # (B, D, *S)
        return Quantized(z_q, codes, z_e.new_zeros(()), _usage_stats(codes, self.codebook_size))

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, *S) -> their vectors (B, D, *S) (or (B, *S, D)): equal to the z_q that produced them."""
        return _lookup(self.embeddings, codes, self.channels_last)

    def codes_of(self, z_q: torch.Tensor) -> torch.Tensor:
        """The inverse of `lookup`: quantized vectors (B, D, *S) (or (B, *S, D)) -> codes (B, *S)."""
        z = z_q if self.channels_last else z_q.movedim(1, -1)  # (B, *S, D)
        digits = (z.to(self.half_width.dtype) * self.half_width).round() + self.half_width
        return (digits.long() * self.basis).sum(-1)

    def extra_repr(self) -> str:
        return f"levels={self.levels}" + (", channels_last=True" if self.channels_last else "")


class ResidualVectorQuantizer(nn.Module):
    """Q stages of `codebook_size` codes of size `code_dim`: stage s quantizes r_s = z_e - sum_{t<s} e_t.

    Stages are `EMAVectorQuantizer`s (`ema=False`: `VectorQuantizer`s) with the given options, each with
    its own k-means initialisation, EMA updates and dead-code restarts on the residuals it sees. Codes are
    (B, Q, *S); z_q has the value sum_s e_s and passes the gradient straight through to z_e; the loss is
    the sum of the stages' losses, stage s's commitment term |r_s - sg[e_s]|^2 pulling z_e towards the
    sum of the codes up to s. With one stage this is exactly the plain quantizer.
    """

    def __init__(self, stages: int, codebook_size: int, code_dim: int, commitment_weight: float = 0.25,
                 ema: bool = True, decay: float = 0.99, eps: float = 1e-5, kmeans_init: bool = False,
                 kmeans_iters: int = 10, dead_code_steps: int = 0, channels_last: bool = False):
        super().__init__()
        if stages < 1:
            raise ValueError(f"stages must be at least 1, got {stages}")
        options = dict(commitment_weight=commitment_weight, kmeans_init=kmeans_init, kmeans_iters=kmeans_iters,
                       dead_code_steps=dead_code_steps)
        if ema:
            options.update(decay=decay, eps=eps)
        cls = EMAVectorQuantizer if ema else VectorQuantizer
        self.stages = nn.ModuleList(cls(codebook_size, code_dim, **options) for _ in range(stages))
        self.codebook_size, self.code_dim, self.channels_last = codebook_size, code_dim, channels_last

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def forward(self, z_e: torch.Tensor) -> Quantized:
        """z_e (B, D, *S) (or (B, *S, D)) -> Quantized(z_q like z_e, codes (B, Q, *S), loss, stats)."""
        _check_layout(z_e, self.code_dim, self.channels_last)
        z = z_e.movedim(-1, 1) if self.channels_last else z_e  # (B, D, *S)
        residual, total, codes, loss, stats = z, None, [], 0, []
        for stage in self.stages:
            q = stage(residual)
            value = q.z_q.detach()  # e_s (B, D, *S); the gradient goes straight through below
            total = value if total is None else total + value  # the order `lookup` sums in
            residual = residual - value
            codes.append(q.codes)
            loss = loss + q.loss
            stats.append(q.stats)
        z_q = total + (z - z.detach())  # value sum_s e_s exactly, gradient 1 to z_e
        if self.channels_last:
            z_q = z_q.movedim(1, -1)
        mean = {k: torch.stack([s[k] for s in stats]).mean() for k in ("perplexity", "usage")}
        return Quantized(z_q, torch.stack(codes, 1), loss, {**mean, "commitment": stats[-1]["commitment"]})

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, Q', *S) of the first Q' <= Q stages -> sum of their vectors (B, D, *S) (or (B, *S, D)).

        With all stages this equals the z_q that produced the codes; with Q' < Q it is what the quantizer
        of the first Q' stages alone would give (greedy encoding: those codes do not depend on later stages).
        """
        if codes.dim() < 2 or not 1 <= codes.shape[1] <= self.num_stages:
            raise ValueError(f"expected codes (B, Q', *S) with 1 <= Q' <= {self.num_stages}, got shape "
                             f"{tuple(codes.shape)}")
        total = None
        for s in range(codes.shape[1]):
            e = _lookup(self.stages[s].embeddings, codes[:, s])  # (B, D, *S)
            total = e if total is None else total + e
        return total.movedim(1, -1) if self.channels_last else total

    def extra_repr(self) -> str:
        return f"stages={self.num_stages}" + (", channels_last=True" if self.channels_last else "")


def gumbel_softmax(logits: torch.Tensor, temperature: float, gumbels: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """softmax((logits + gumbels) / temperature) along `dim`: with gumbels = -log(-log U), U ~ Uniform(0, 1),
    a relaxed sample of Categorical(softmax(logits)) that tends to its one-hot as temperature -> 0."""
    return torch.softmax((logits + gumbels) / temperature, dim)


def uniform_kl(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """KL(softmax(logits) || uniform over the K classes of `dim`) in nats, one per position:
    sum_k q_k log q_k + log K."""
    log_q = torch.log_softmax(logits, dim)
    return (log_q.exp() * log_q).sum(dim) + math.log(logits.shape[dim])


class GumbelQuantizer(nn.Module):
    """Logits (B, K, *S) -> z_q (B, D, *S) = soft one-hot (training) or one-hot (eval) times the codebook.

    Training: y = gumbel_softmax(logits, temperature, fresh Gumbel noise) (B, *S, K); z_q = y @ codebook;
    codes are argmax y, the code the sample is nearest to. Eval: codes = argmax logits (hard, no noise);
    z_q = codebook[codes]. loss = kl_weight * mean over positions of KL(softmax(logits) || uniform), in
    nats; stats add "kl" (that mean, unweighted). `temperature` and `kl_weight` are plain attributes for
    the caller's schedule (the dVAE sets them from training progress). The codebook (K, D) is learned by
    the gradient through z_q. The softmax and the codebook product run in float32 (also under autocast).
    """

    def __init__(self, codebook_size: int, code_dim: int, temperature: float = 1.0, kl_weight: float = 0.0,
                 channels_last: bool = False):
        super().__init__()
        self.codebook_size, self.code_dim, self.channels_last = codebook_size, code_dim, channels_last
        self.temperature, self.kl_weight = temperature, kl_weight
        self.codebook = nn.Parameter(torch.randn(codebook_size, code_dim))

    @property
    def embeddings(self) -> torch.Tensor:
        return self.codebook

    def forward(self, logits: torch.Tensor) -> Quantized:
        """logits (B, K, *S) (or (B, *S, K)) -> Quantized(z_q (B, D, *S) (or (B, *S, D)), codes (B, *S), ...)."""
        _check_layout(logits, self.codebook_size, self.channels_last, "K")
        if self.codebook.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"codebook dtype {self.codebook.dtype} is not supported (float32 or float64)")
        with torch.autocast(logits.device.type, enabled=False):
            l = logits.to(self.codebook.dtype)
            l = l if self.channels_last else l.movedim(1, -1)  # (B, *S, K)
            kl = uniform_kl(l).mean()
            if self.training:
                # -log(Exp(1)) is Gumbel(0, 1); drawn contiguous (B, *S, K), whatever the layout of l
                gumbels = -torch.empty(l.shape, dtype=l.dtype, device=l.device).exponential_().log()
                y = gumbel_softmax(l, self.temperature, gumbels)  # (B, *S, K)
                codes = y.detach().argmax(-1)
                z_q = y @ self.codebook  # (B, *S, D)
            else:
                codes = l.detach().argmax(-1)
                z_q = self.codebook[codes]
        z_q = z_q.to(logits.dtype)
        if not self.channels_last:
            z_q = z_q.movedim(-1, 1)  # (B, D, *S)
        stats = {**_usage_stats(codes, self.codebook_size), "kl": kl.detach()}
        return Quantized(z_q, codes, self.kl_weight * kl, stats)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, *S) -> codebook vectors (B, D, *S) (or (B, *S, D)): the eval-mode z_q."""
        return _lookup(self.embeddings, codes, self.channels_last)

    def extra_repr(self) -> str:
        return (f"codebook_size={self.codebook_size}, code_dim={self.code_dim}, temperature={self.temperature}, "
                f"kl_weight={self.kl_weight}" + (", channels_last=True" if self.channels_last else ""))
