"""Fixed-point arithmetic whose results are the same integers on every machine: the integer priors' parts.

Key: B batch, K codebook size, I O a linear layer's input and output features.

- Matrix products in float64 on integer values: with |x| <= in_limit, every partial sum of x @ w.T is an
  integer below sum |w| * in_limit + |b| < 2**53 (`QLinear` checks it when built or loaded), so any
  summation order, any BLAS and any device computes the exact result.
- Requantization to another scale: an int64 multiply and a rounding right shift (`requant`).
- LayerNorm from integer sums, an exact integer square root and integer division (`layer_norm`).
- 2**-f from two stored 256-entry tables (`exp2_neg`), other functions from stored tables with linear
  interpolation (`lookup`); `frequencies` turns integer logits into the range coder's frequencies.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .errors import ConfigError, RunError

PRECISION = 24  # each row of frequencies sums to 2**24: constriction's range-coder precision
EXACT = 1 << 53  # float64 holds every integer below this: the bound on matrix products' partial sums
WIDE = 1 << 62  # int64 products (requantization, LayerNorm sums) stay below this
LOG2_FRAC = 16  # logits and attention scores in units of 2**-16 bits (log2 probability)
EXP_BITS = 30  # 2**-z as an integer at scale 2**30
PROB_BITS = 20  # attention weights at scale 2**20
TABLE_FRAC, TABLE_STEP = 16, 8  # nonlinearities: inputs and outputs in units of 2**-16, entries every 2**-8
GELU_RANGE = 8  # the GELU table covers [-8, 8]; gelu(x) = x above, 0 below
HIDDEN_BITS = 24  # pre-activations at scale 2**-16 saturate at +-128


def round_shift(x: Tensor, shift: Tensor | int) -> Tensor:
    """round(x / 2**shift) for int64 x, halves up; shift >= 1 (an int or an int64 tensor)."""
    return ((x >> (shift - 1)) + 1) >> 1


def requant(acc: Tensor, mult: Tensor, shift: Tensor) -> Tensor:
    """round(acc * mult / 2**shift): multiplication by the real mult / 2**shift, in int64."""
    return round_shift(acc * mult, shift)


def multiplier(scale: float, bound: int) -> tuple[int, int]:
    """(mult, shift) with mult / 2**shift ~ scale and mult * bound < 2**62: the most precise pair for
    requantizing accumulators of magnitude <= bound."""
    bound = max(bound, 1)
    shift = min(62, max(1, 61 - bound.bit_length() - math.floor(math.log2(scale))))
    while shift > 1 and round(scale * 2.0**shift) * bound >= WIDE:
        shift -= 1
    mult = round(scale * 2.0**shift)
    if not (1 <= mult and mult * bound < WIDE):
        raise ConfigError(f"cannot requantize by {scale:.3g} with accumulators up to {bound}: reduce act_bits")
    return mult, shift


def isqrt(q: Tensor) -> Tensor:
    """floor(sqrt(q)) exactly, for int64 0 <= q < 2**62: a float guess (off by at most one), then fixed up
    with integer comparisons, so the result does not depend on how the device rounds the guess."""
    r = torch.sqrt(q.to(torch.float64)).to(torch.int64)
    for _ in range(2):
        r = r - (r * r > q).long()
        r = r + ((r + 1) * (r + 1) <= q).long()
    return r


def take(table: Tensor, index: Tensor) -> Tensor:
    """table[index] for a 1-D table (index_select: several times faster than advanced indexing on CPU)."""
    return table.index_select(0, index.reshape(-1)).view(index.shape)


def exp2_neg(z: Tensor, hi: Tensor, lo: Tensor) -> Tensor:
    """round(2**EXP_BITS * 2**(-z / 2**LOG2_FRAC)) (within a unit) for int64 z >= 0, from two tables:
    hi[a] = 2**30 * 2**(-a / 256), lo[b] = 2**30 * 2**(-b / 65536) for the fraction's two bytes."""
    n = (z >> LOG2_FRAC).clamp_(max=62)
    f = z & ((1 << LOG2_FRAC) - 1)
    e = (take(hi, f >> 8) * take(lo, f & 255) + (1 << (EXP_BITS - 1))) >> EXP_BITS
    return e >> n


def exp2_tables() -> tuple[Tensor, Tensor]:
    hi = [round(2.0**EXP_BITS * 2.0 ** (-a / 256)) for a in range(256)]
    lo = [round(2.0**EXP_BITS * 2.0 ** (-b / 65536)) for b in range(256)]
    return torch.tensor(hi, dtype=torch.long), torch.tensor(lo, dtype=torch.long)


def function_table(fn, half_range: int) -> Tensor:
    """fn at -half_range .. half_range every 2**-TABLE_STEP, at scale 2**TABLE_FRAC -> (2*half_range*256 + 1,)."""
    n = 2 * half_range << TABLE_STEP
    return torch.tensor([round(fn(-half_range + i / 2**TABLE_STEP) * 2**TABLE_FRAC) for i in range(n + 1)],
                        dtype=torch.long)


def lookup(x: Tensor, table: Tensor) -> Tensor:
    """A tabulated function of x (int64, units of 2**-16), linearly interpolated between entries; x
    outside the table's range reads its end value."""
    half = (table.numel() - 1) << (TABLE_FRAC - TABLE_STEP - 1)  # half the range, in units of 2**-16
    u = (x + half).clamp_(0, 2 * half - 1)
    i, frac = u >> (TABLE_FRAC - TABLE_STEP), u & ((1 << (TABLE_FRAC - TABLE_STEP)) - 1)
    a, b = take(table, i), take(table, i + 1)
    return a + (((b - a) * frac + (1 << (TABLE_FRAC - TABLE_STEP - 1))) >> (TABLE_FRAC - TABLE_STEP))


def frequencies(logits: Tensor, hi: Tensor, lo: Tensor) -> Tensor:
    """Integer logits (B, K) in units of 2**-16 bits -> frequencies (B, K) int64, each >= 1, rows summing to
    2**PRECISION: floor(p * (2**PRECISION - K)) + 1, the remainder to the first most probable code
    (as codec.quantize_logits does with float probabilities)."""
    K = logits.size(-1)
    top = logits.amax(-1, keepdim=True)
    e = exp2_neg(top - logits, hi, lo)  # (B, K) in [0, 2**30], 2**30 at the top
    free = (1 << PRECISION) - K
    freqs = torch.div(e * free, e.sum(-1, keepdim=True), rounding_mode="floor")
    index = torch.arange(K, device=logits.device).expand_as(logits)
    first = torch.where(logits == top, index, K).amin(-1, keepdim=True)  # (B, 1)
    freqs.scatter_add_(-1, first, free - freqs.sum(-1, keepdim=True))
    return freqs + 1


def layer_norm(x: Tensor, eps_term: Tensor, out_frac: int, var_shift: int) -> Tensor:
    """Integer LayerNorm without gain and bias: round(2**out_frac * (x - mean) / sqrt(var + eps)) over
    the last dim of x (int64, any fixed-point scale s; eps_term = eps * C**2 / (s**2 * 4**var_shift)).

    With d = C * (x - mean) (exact), (x - mean) / sqrt(var + eps) = d / sqrt(sum d**2 / C + eps C**2 / s**2);
    d is shifted right by var_shift for the sum of squares so that it fits int64.
    """
    C = x.size(-1)
    d = C * x - x.sum(-1, keepdim=True)  # (..., C)
    dv = round_shift(d, var_shift) if var_shift else d
    q = torch.div((dv * dv).sum(-1, keepdim=True), C, rounding_mode="floor") + eps_term
    den = isqrt(q) << var_shift  # ~ sqrt(sum d**2 / C + eps C**2 / s**2), >= 1
    return torch.div((d << (out_frac + 1)) + den, den << 1, rounding_mode="floor")


class QLinear(nn.Module):
    """y = saturate(round((x @ weight.T + bias) * mult / 2**shift)) on integers, exactly.

    Inputs are int64 with |x| <= in_limit; outputs saturate at +-(2**(out_bits - 1) - 1). Each output
    channel o has its own weight scale and its own (mult[o], shift[o]): the output's fixed-point scale
    may differ per channel (q, k, v of one projection; the per-code logits of the head).
    """

    def __init__(self, in_features: int, out_features: int, in_limit: int, out_bits: int):
        super().__init__()
        self.in_limit, self.out_limit = in_limit, (1 << (out_bits - 1)) - 1
        for name, shape in (("weight", (out_features, in_features)), ("bias", (out_features,)),
                            ("mult", (out_features,)), ("shift", (out_features,))):
            self.register_buffer(name, torch.zeros(shape, dtype=torch.long))
        self.register_buffer("weight64", torch.zeros(out_features, in_features, dtype=torch.float64),
                             persistent=False)
        self.register_buffer("offset", torch.zeros(out_features, dtype=torch.long), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh())

    def products(self, x: Tensor | list[Tensor]) -> Tensor:
        """x (..., I) int64 -> x @ weight.T (..., O) int64, exact. A convolution passes the list of its n
        taps' inputs (..., I / n) instead (weight columns in tap order): every partial sum is still within
        the bound, so summing the taps' products in float64 is exact too."""
        if isinstance(x, Tensor):
            return torch.matmul(x.to(torch.float64), self.weight64.T).to(torch.long)
        w = self.weight64.view(self.weight64.size(0), len(x), -1)  # (O, n, I / n)
        return sum(torch.matmul(tap.to(torch.float64), w[:, i].T) for i, tap in enumerate(x)).to(torch.long)

    def forward(self, x: Tensor | list[Tensor]) -> Tensor:
        # (products + bias) * mult + 2**(shift - 1), shifted: the bias and the rounding in one offset
        y = self.products(x).mul_(self.mult).add_(self.offset).bitwise_right_shift_(self.shift)
        return y.clamp_(-self.out_limit, self.out_limit)

    def bound(self) -> Tensor:
        """(O,) the largest |accumulator| any input within in_limit can give."""
        return self.weight.abs().sum(1) * self.in_limit + self.bias.abs()

    def refresh(self) -> None:
        """Check the exactness bounds of the current integers and rebuild the float64 copy of the weight."""
        bound = self.bound()
        if int(bound.max()) >= EXACT or bool((self.shift < 1).any() | (self.shift > 62).any()) \
                or bool((self.mult < 1).any() | (self.mult * bound >= WIDE).any()):
            raise RunError("integer layer out of its exact range (products above 2**53 or 2**62)")
        self.weight64 = self.weight.to(torch.float64)
        self.offset = self.bias * self.mult + (1 << (self.shift - 1))

    @torch.no_grad()
    def set_weights(self, weight: Tensor, bias: Tensor | None, in_scale: float, out_scale: Tensor,
                    weight_bits: int) -> None:
        """Quantize real weight (O, I) and bias (O,) for inputs x standing for x * in_scale and output
        channel o in units of out_scale[o] (O,)."""
        w = weight.detach().to("cpu", torch.float64)
        s_w = w.abs().amax(1) / ((1 << (weight_bits - 1)) - 1)
        s_w[s_w == 0] = 1.0
        acc_scale = s_w * in_scale  # (O,) what one unit of the accumulator stands for
        self.weight.copy_(torch.round(w / s_w[:, None]).long())
        if bias is not None:
            self.bias.copy_(torch.round(bias.detach().to("cpu", torch.float64) / acc_scale).long())
        bound = self.bound()
        if int(bound.max()) >= EXACT:
            raise ConfigError(f"a {tuple(w.shape)} layer's products reach 2**{int(bound.max()).bit_length()}, "
                              f"not exact in float64: reduce weight_bits or act_bits")
        pairs = [multiplier(float(s), int(b)) for s, b in zip(acc_scale / out_scale.double().cpu(), bound)]
        self.mult.copy_(torch.tensor([m for m, _ in pairs]))
        self.shift.copy_(torch.tensor([s for _, s in pairs]))
        self.refresh()
