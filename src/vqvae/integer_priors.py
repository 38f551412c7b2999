"""Integer models of the priors: frequencies for the range coder that are bit-identical everywhere.

Key: B batch, K codebook size, L sequence length (raster order), C channels (n_embd), nh heads,
hs head size, I O a linear layer's input and output features, H W the code grid.

A float prior's logits move in their last bits with the thread count, the CPU's vector width, the BLAS,
the device and the batch grouping (the same sums in another order), and its integer frequencies move
with them: a file coded on one machine does not decode on another. An integer prior (Balle, Johnston &
Minnen, "Integer networks for data compression with latent-variable models", ICLR 2019) computes the
frequencies in exact arithmetic instead, so every machine gets the same integers:

- weights quantized per output channel (`weight_bits`), activations in fixed point (`act_bits`), biases
  at the accumulator's scale;
- matrix products in float64 on integer values: with |x| <= in_limit, every partial sum of x @ w.T is an
  integer below sum |w| * in_limit + |b| < 2**53 (checked for every layer when it is built or loaded),
  so any summation order, any BLAS and any device computes the exact result;
- requantization to another scale as an int64 multiply and a rounding right shift, then saturation;
- LayerNorm from integer sums, an exact integer square root and integer division (its gain and bias are
  folded into the next linear layer); softmax through a table of 2**-f; GELU, tanh and sigmoid through
  tables with linear interpolation. The tables are computed once, at quantization, and stored with the
  model: no libm difference between machines can reach them.
The arithmetic itself (exact products, requantization, LayerNorm, tables) is in `fixedpoint.py`; this
module holds the two models and their quantization from float priors.

    iprior = IntegerPrior.from_prior(prior, train_codes, train_labels)   # calibrate + quantize
    state = iprior.start(B, cond); freqs, state = iprior.step(state, prev)   # (B, K) int64, sum 2**24
    iprior.save_pretrained(directory); iprior = load_integer_prior(directory)
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from . import fixedpoint as fp
from . import pretrained
from .fixedpoint import PRECISION, QLinear
from .config import PriorConfig, from_dict, to_dict
from .errors import ConfigError, RunError
from .priors import (
    FIRST_KERNEL, KERNEL, DecodeState, PixelCNNPrior, Prior, TransformerPrior, check_step, pixelcnn_dilations,
)

__all__ = ["PRECISION", "IntegerPrior", "IntegerTransformerPrior", "IntegerPixelCNNPrior", "load_integer_prior"]

FORMAT_IDS = {}  # format_id -> class, filled by the subclasses


# ------------------------------------------------------------------------------------------------
# Base: checks, bits, save / load
# ------------------------------------------------------------------------------------------------


class IntegerPrior(nn.Module):
    """Base of the integer priors; same decode contract as `Prior.start` / `Prior.step`, but `step` returns
    the frequencies (B, K) int64 for the range coder directly, bit-identical on every machine.

    cfg: the float prior's PriorConfig. format_id: 1 transformer, 2 pixelcnn (written into .vqz headers).
    weight_bits / act_bits: the quantization's bit widths (options of `from_prior`).
    """

    format_id: int = 0

    def __init__(self, cfg: PriorConfig, weight_bits: int = 16, act_bits: int = 20):
        super().__init__()
        if not (2 <= weight_bits <= 24 and 8 <= act_bits <= 24):
            raise ConfigError(f"weight_bits must be in 2..24 and act_bits in 8..24, got {weight_bits}, {act_bits}")
        self.cfg, self.weight_bits, self.act_bits = cfg, weight_bits, act_bits
        self.grid_len = math.prod(cfg.grid)  # positions of one grid
        self.seq_len = self.grid_len * max(cfg.stages, 1)  # L tokens: stage-major with residual-VQ stages
        self.hw = (1, cfg.grid[0]) if len(cfg.grid) == 1 else cfg.grid  # (H, W)
        self.code_shape = (cfg.stages, *cfg.grid) if cfg.stages else cfg.grid  # one image's codes
        self.act_limit = (1 << (act_bits - 1)) - 1
        hi, lo = fp.exp2_tables()
        self.register_buffer("exp2_hi", hi)
        self.register_buffer("exp2_lo", lo)
        self.register_load_state_dict_post_hook(lambda module, _keys: module._verify())

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        FORMAT_IDS[cls.format_id] = cls

    @property
    def device(self) -> torch.device:
        return self.exp2_hi.device

    # --- arch-specific ---------------------------------------------------------------------------
    @classmethod
    def _quantize(cls, prior: Prior, codes: Tensor, cond: Tensor | None, **options) -> "IntegerPrior":
        raise NotImplementedError

    def _logits(self, codes: Tensor, cond: Tensor | None) -> Tensor:
        """codes (B, L) int64 -> integer logits (B, L, K) in units of 2**-16 bits, all positions at once."""
        raise NotImplementedError

    def start(self, batch: int, cond: Tensor | None = None) -> DecodeState:
        """Begin a step-by-step decode of `batch` grids; nothing is computed yet."""
        raise NotImplementedError

    def step(self, state: DecodeState, prev_codes: Tensor | None) -> tuple[Tensor, DecodeState]:
        """Feed the code of position `state.pos - 1` (None at position 0), get the frequencies (B, K) int64
        of position `state.pos` (each >= 1, rows summing to 2**PRECISION); the state advances in place.
        The result depends only on the weights, cond and the codes of its own row: not on the device, the
        thread count or the rest of the batch; it equals `frequencies` of a full pass exactly."""
        raise NotImplementedError

    def _verify(self) -> None:
        """After loading: the integers outside the layers are within the ranges the arithmetic assumes
        (the layers check their own bounds), so a damaged file cannot overflow int64 silently."""
        ok = all(0 <= int(t.min()) and int(t.max()) <= 1 << fp.EXP_BITS for t in (self.exp2_hi, self.exp2_lo))
        for name, t in self.named_buffers():
            if name.endswith("emb") or name.endswith("table") or name.endswith("cond_bias"):
                ok &= int(t.abs().max()) <= 1 << fp.HIDDEN_BITS
        if not ok:
            raise RunError("integer prior tables or embeddings out of range")

    # --- shared ----------------------------------------------------------------------------------
    @classmethod
    def from_prior(cls, prior: Prior, codes: Tensor, cond: Tensor | None = None, **options) -> "IntegerPrior":
        """Quantize a trained float prior, calibrating activation ranges on training code grids.

        codes: (N, *grid) integers ((N, S, *grid) with stages; a few thousand are plenty; more are subsampled), cond: (N,) labels for a
        class-conditional prior. options: weight_bits (16), act_bits (20), margin (2.0: headroom over the
        calibrated ranges), calib_size (2048 grids). Called on a subclass, the arch must match.
        Returns the integer prior on the float prior's device, in eval mode.
        """
        target = {"transformer": IntegerTransformerPrior, "pixelcnn": IntegerPixelCNNPrior}.get(prior.cfg.arch)
        if target is None or not issubclass(target, cls):
            raise ConfigError(f"no {cls.__name__} for a {prior.cfg.arch} prior")
        unknown = sorted(set(options) - {"weight_bits", "act_bits", "margin", "calib_size"})
        if unknown or not options.get("margin", 1) > 0 or not options.get("calib_size", 1) >= 1:
            raise ConfigError(f"unknown or bad options {unknown or options}: allowed weight_bits, act_bits, "
                              f"margin > 0, calib_size >= 1")
        codes = torch.as_tensor(codes)
        if tuple(codes.shape[1:]) != prior.code_shape or len(codes) == 0:
            raise ValueError(f"codes must be (N, {', '.join(map(str, prior.code_shape))}), got {tuple(codes.shape)}")
        if (cond is None) != (prior.cfg.num_classes == 0):
            raise ValueError("pass cond (N,) labels exactly when the prior is class-conditional")
        every = max(1, len(codes) // options.pop("calib_size", 2048))
        codes = codes[::every].to(prior.device, torch.long).flatten(1)  # (N', L)
        cond = None if cond is None else torch.as_tensor(cond)[::every].to(prior.device, torch.long)
        return target._quantize(prior, codes, cond, **options).to(prior.device).eval()

    def _check_device(self) -> None:
        if self.device.type == "mps":  # no float64 there, so no exact matrix products
            raise RunError("integer priors need float64 matrix products: run them on cpu or cuda, not mps")

    def _check_codes(self, codes: Tensor) -> Tensor:
        if codes.dtype != torch.long or tuple(codes.shape[1:]) != self.code_shape:
            raise ValueError(f"codes must be int64 of shape (B, {', '.join(map(str, self.code_shape))}), "
                             f"got {codes.dtype} {tuple(codes.shape)}")
        return codes.flatten(1)

    def _check_cond(self, cond: Tensor | None, batch: int) -> Tensor | None:
        Y = self.cfg.num_classes
        if Y == 0:
            if cond is not None:
                raise ValueError("this prior is unconditional (num_classes=0): pass cond=None")
            return None
        cond = torch.as_tensor(cond, device=self.device) if cond is not None else None
        if cond is None or cond.dtype != torch.long or cond.shape != (batch,):
            raise ValueError(f"this prior is class-conditional: pass cond, ({batch},) int64 labels in [0, {Y})")
        if not bool(((cond >= 0) & (cond < Y)).all()):
            raise ValueError(f"cond labels must be in [0, {Y}), got {cond.tolist()}")
        return cond

    def _advance(self, state: DecodeState, prev_codes: Tensor | None) -> None:
        check_step(state, prev_codes, self.seq_len)

    @torch.no_grad()
    def frequencies(self, codes: Tensor, cond: Tensor | None = None) -> Tensor:
        """codes (B, *grid) int64 -> frequencies (B, L, K) int64 of every position in one pass; equal to
        the step-by-step frequencies."""
        self._check_device()
        flat = self._check_codes(codes)
        cond = self._check_cond(cond, len(flat))
        return fp.frequencies(self._logits(flat, cond), self.exp2_hi, self.exp2_lo)

    @torch.no_grad()
    def bits(self, codes: Tensor, cond: Tensor | None = None, batch_size: int = 256) -> Tensor:
        """(B,) float64: the bits the range coder spends on each grid, sum of PRECISION - log2(freq of the code)."""
        codes = torch.as_tensor(codes).to(self.device, torch.long)
        out = []
        for i in range(0, len(codes), batch_size):
            z = codes[i:i + batch_size]
            c = None if cond is None else torch.as_tensor(cond)[i:i + batch_size].to(self.device, torch.long)
            freqs = self.frequencies(z, c).gather(-1, z.flatten(1)[..., None])[..., 0]  # (b, L)
            out.append((PRECISION - torch.log2(freqs.double())).sum(1).cpu())
        return torch.cat(out)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json (format, float prior config, bit widths) and model.safetensors (all integers)."""
        config = {"format": "vqvae-integer-prior", "format_id": self.format_id, "prior": to_dict(self.cfg),
                  "weight_bits": self.weight_bits, "act_bits": self.act_bits}
        pretrained.save(self, directory, config)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "IntegerPrior":
        """Rebuild from config.json and load model.safetensors (never unpickles); eval mode, on `device`."""
        config = pretrained.read_config(directory, "an integer prior directory written by save_pretrained",
                                        "integer prior")
        where = Path(directory) / pretrained.CONFIG_NAME
        target = FORMAT_IDS.get(config.get("format_id")) if isinstance(config, dict) else None
        if target is None or config.get("format") != "vqvae-integer-prior":
            raise RunError(f"{where}: not a vqvae integer prior config")
        if not issubclass(target, cls):
            raise RunError(f"{where}: holds a {target.__name__}, not a {cls.__name__}")
        try:
            model = target(from_dict(PriorConfig, config["prior"]), int(config["weight_bits"]),
                           int(config["act_bits"]))
        except (ConfigError, KeyError, TypeError, ValueError) as e:
            raise RunError(f"{where}: not a vqvae integer prior config ({e})") from None
        return pretrained.load_weights(model, directory, device)


def load_integer_prior(directory: str | Path, device: str | torch.device = "cpu") -> IntegerPrior:
    """Load an integer prior saved by `save_pretrained`, whichever its arch, in eval mode."""
    return IntegerPrior.from_pretrained(directory, device)


# ------------------------------------------------------------------------------------------------
# Transformer
# ------------------------------------------------------------------------------------------------


class _Block(nn.Module):
    """The integers of one pre-LN transformer block (the LayerNorms' gains and biases are folded into
    c_attn and c_fc); the arithmetic lives in `IntegerTransformerPrior._block`."""

    def __init__(self, C: int, ln_limit: int, act_bits: int):
        super().__init__()
        act_limit, hidden_limit = (1 << (act_bits - 1)) - 1, (1 << (fp.HIDDEN_BITS - 1)) - 1
        self.c_attn = QLinear(C, 3 * C, ln_limit, act_bits)  # -> q, k, v at their own scales
        self.attn_proj = QLinear(C, C, act_limit, act_bits)  # attention output (v's scale) -> residual
        self.c_fc = QLinear(C, 4 * C, ln_limit, fp.HIDDEN_BITS)  # -> GELU input, units of 2**-16
        self.mlp_proj = QLinear(4 * C, C, hidden_limit, act_bits)  # GELU output -> residual
        self.register_buffer("score_mult", torch.zeros((), dtype=torch.long))  # q.k -> units of 2**-16 bits
        self.register_buffer("score_shift", torch.ones((), dtype=torch.long))


class IntegerTransformerPrior(IntegerPrior):
    """Integer model of `TransformerPrior`: same inputs (start token, class embedding at every position,
    row + column embeddings), same blocks, tied head; KV cache of integers for step-by-step decoding.

    Fixed-point scales: the residual stream one calibrated scale for all layers; LayerNorm outputs
    2**-ln_frac; q, k, v one calibrated scale each per layer; the attention output v's scale; GELU input
    and output 2**-16; logits 2**-16 bits.
    """

    format_id = 1

    def __init__(self, cfg: PriorConfig, weight_bits: int = 16, act_bits: int = 20):
        super().__init__(cfg, weight_bits, act_bits)
        C, A = cfg.n_embd, self.act_limit
        # LayerNorm outputs (at most sqrt(C) in magnitude) get half the activation range
        self.ln_frac = act_bits - 2 - math.ceil(math.log2(math.sqrt(C)))
        # |d| = C |x - mean| <= 2 C A: shift it right until C * d**2 fits int64
        self.var_shift = next(r for r in range(64) if C * ((2 * C * A >> r) + 1) ** 2 < fp.WIDE // 2)
        assert (2 * C * A) << (self.ln_frac + 1) < fp.WIDE, "LayerNorm numerator overflows int64"
        hs = C // cfg.n_head
        if hs * A * A >= fp.EXACT or ((1 << fp.PROB_BITS) + self.seq_len) * A >= fp.EXACT:
            raise ConfigError(f"act_bits={act_bits} is too wide for exact attention products: reduce it")
        S = max(cfg.stages, 1)
        rows = {"tok_emb": S * cfg.codebook_size, "start_emb": max(cfg.num_classes, 1), "row_emb": self.hw[0],
                "col_emb": self.hw[1], **({"stage_emb": cfg.stages} if cfg.stages else {})}
        for name, n in rows.items():
            self.register_buffer(name, torch.zeros(n, C, dtype=torch.long))  # at the residual scale
        self.register_buffer("ln_eps", torch.ones(2 * cfg.n_layer + 1, dtype=torch.long))
        self.blocks = nn.ModuleList(_Block(C, A, act_bits) for _ in range(cfg.n_layer))
        self.head = QLinear(C, S * cfg.codebook_size, A, 48)  # -> logits in units of 2**-16 bits
        self.register_buffer("gelu_table", torch.zeros((2 * fp.GELU_RANGE << fp.TABLE_STEP) + 1, dtype=torch.long))

    def _verify(self) -> None:
        super()._verify()
        hs, A = self.cfg.n_embd // self.cfg.n_head, self.act_limit
        ok = bool(((self.ln_eps >= 1) & (self.ln_eps <= 1 << 60)).all())
        for blk in self.blocks:
            ok &= 1 <= int(blk.score_shift) <= 62 and 1 <= int(blk.score_mult) * 2 * hs * A * A < fp.WIDE
        if not ok:
            raise RunError("integer transformer scalars out of range (LayerNorm eps or attention scale)")

    # --- integer forward -------------------------------------------------------------------------
    def _ln(self, x: Tensor, i: int) -> Tensor:
        y = fp.layer_norm(x, self.ln_eps[i], self.ln_frac, self.var_shift)
        return y.clamp_(-self.act_limit, self.act_limit)

    def _attend(self, blk: _Block, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        """q (B, nh, T, hs), k v (B, nh, S, hs) float64 integers -> (B, nh, T, hs) int64 at v's scale.
        causal: T == S and query t sees keys 0..t; else every query sees every key."""
        s = torch.matmul(q, k.transpose(-1, -2)).to(torch.long)  # (B, nh, T, S), exact
        mask = None
        if causal:
            T = s.size(-1)
            mask = torch.ones(T, T, dtype=torch.bool, device=s.device).triu_(1)
            s = s.masked_fill(mask, torch.iinfo(torch.long).min)
        top = s.amax(-1, keepdim=True)
        gap = top - s if mask is None else (top - s).masked_fill_(mask, 0)
        e = fp.exp2_neg(fp.requant(gap, blk.score_mult, blk.score_shift), self.exp2_hi, self.exp2_lo)
        if mask is not None:
            e = e.masked_fill_(mask, 0)
        p = torch.div(e << fp.PROB_BITS, e.sum(-1, keepdim=True), rounding_mode="floor")  # sums to <= 2**20
        return fp.round_shift(torch.matmul(p.to(torch.float64), v).to(torch.long), fp.PROB_BITS)

    def _block(self, i: int, x: Tensor, kv: Tensor | None = None, pos: int = 0) -> Tensor:
        """x (B, T, C) int64 residual -> the same after block i. With `kv` (2, B, nh, L, hs) x is the single
        position `pos`: its key and value go into the cache and it attends over positions 0..pos."""
        blk, A, nh = self.blocks[i], self.act_limit, self.cfg.n_head
        qkv = blk.c_attn(self._ln(x, 2 * i)).to(torch.float64)
        q, k, v = (rearrange(z, "b t (h d) -> b h t d", h=nh) for z in qkv.split(self.cfg.n_embd, -1))
        if kv is None:
            y = self._attend(blk, q, k, v, causal=True)
        else:
            kv[0, :, :, pos] = k[:, :, 0]
            kv[1, :, :, pos] = v[:, :, 0]
            y = self._attend(blk, q, kv[0, :, :, : pos + 1], kv[1, :, :, : pos + 1], causal=False)
        x = (x + blk.attn_proj(rearrange(y, "b h t d -> b t (h d)"))).clamp_(-A, A)
        hidden = blk.c_fc(self._ln(x, 2 * i + 1))  # (B, T, 4C)
        gelu = torch.where(hidden >= fp.GELU_RANGE << fp.TABLE_FRAC, hidden, fp.lookup(hidden, self.gelu_table))
        return (x + blk.mlp_proj(gelu)).clamp_(-A, A)

    def _tokens(self, codes: Tensor, positions: Tensor) -> Tensor:
        """Codes (B, T) at sequence positions (T,) -> tokens: code + s * K at a position of stage s."""
        if not self.cfg.stages:
            return codes
        return codes + positions // self.grid_len * self.cfg.codebook_size

    def _stage_logits(self, logits: Tensor, positions: Tensor) -> Tensor:
        """Head outputs (B, T, S * K) at sequence positions (T,) -> (B, T, K), each its stage's K."""
        if not self.cfg.stages:
            return logits
        T = len(positions)
        return logits.view(len(logits), T, -1, self.cfg.codebook_size)[:, torch.arange(T), positions // self.grid_len]

    def _inputs(self, tokens: Tensor, positions: Tensor, cond: Tensor | None) -> Tensor:
        """tokens (B, T) int64 (`_tokens`), -1 for the start token; positions (T,) -> residual inputs (B, T, C)."""
        start = self.start_emb[0 if cond is None else cond][..., None, :].expand(*tokens.shape, -1)
        x = torch.where((tokens < 0)[..., None], start, self.tok_emb[tokens.clamp(min=0)])
        if cond is not None:
            x = x + self.start_emb[cond][:, None]
        p, W = positions % self.grid_len, self.hw[1]
        x = x + self.col_emb[p % W] + self.row_emb[p // W]
        if self.cfg.stages:
            x = x + self.stage_emb[positions // self.grid_len]
        return x.clamp_(-self.act_limit, self.act_limit)

    def _logits(self, codes: Tensor, cond: Tensor | None) -> Tensor:
        B, L = codes.shape
        positions = torch.arange(L, device=codes.device)
        tokens = torch.cat([codes.new_full((B, 1), -1), self._tokens(codes, positions)[:, :-1]], 1)
        x = self._inputs(tokens, positions, cond)
        for i in range(self.cfg.n_layer):
            x = self._block(i, x)
        return self._stage_logits(self.head(self._ln(x, 2 * self.cfg.n_layer)), positions)  # (B, L, K)

    @torch.no_grad()
    def start(self, batch: int, cond: Tensor | None = None) -> DecodeState:
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        self._check_device()
        cfg = self.cfg
        kv = torch.zeros(cfg.n_layer, 2, batch, cfg.n_head, self.seq_len, cfg.n_embd // cfg.n_head,
                         dtype=torch.float64, device=self.device)  # integer keys and values
        return DecodeState(pos=0, cond=self._check_cond(cond, batch), buffer=kv)

    @torch.no_grad()
    def step(self, state: DecodeState, prev_codes: Tensor | None) -> tuple[Tensor, DecodeState]:
        self._advance(state, prev_codes)
        t, B = state.pos, state.buffer.size(2)
        if t == 0:
            tokens = torch.full((B, 1), -1, device=self.device)
        else:  # the previous position's code, as a token of its stage
            tokens = self._tokens(prev_codes.to(self.device)[:, None], torch.tensor([t - 1], device=self.device))
        position = torch.tensor([t], device=self.device)
        x = self._inputs(tokens, position, state.cond)  # (B, 1, C)
        for i in range(self.cfg.n_layer):
            x = self._block(i, x, state.buffer[i], t)
        logits = self._stage_logits(self.head(self._ln(x, 2 * self.cfg.n_layer)), position)[:, 0]  # (B, K)
        state.pos += 1
        return fp.frequencies(logits, self.exp2_hi, self.exp2_lo), state

    # --- quantization ----------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def _quantize(cls, prior: TransformerPrior, codes: Tensor, cond: Tensor | None, weight_bits: int = 16,
                  act_bits: int = 20, margin: float = 2.0) -> "IntegerTransformerPrior":
        cfg, C = prior.cfg, prior.cfg.n_embd
        model = cls(cfg, weight_bits, act_bits)
        ranges = _transformer_ranges(prior, codes, cond)
        A = model.act_limit
        s_res = margin * ranges["residual"] / A
        s_ln = 2.0 ** -model.ln_frac
        unit = torch.full((4 * C,), 2.0 ** -fp.TABLE_FRAC, dtype=torch.float64)
        model.gelu_table.copy_(fp.function_table(lambda x: 0.5 * x * (1 + math.erf(x / math.sqrt(2))), fp.GELU_RANGE))
        emb = {"tok_emb": prior.tok_emb.weight, "start_emb": prior.start_emb.weight, "col_emb": prior.col_emb.weight,
               "row_emb": prior.row_emb.weight if prior.row_emb is not None else torch.zeros(1, C),
               **({"stage_emb": prior.stage_emb.weight} if cfg.stages else {})}
        for name, weight in emb.items():
            getattr(model, name).copy_(torch.round(weight.double().cpu() / s_res).long().clamp(-A, A))
        lns = [ln for b in prior.blocks for ln in (b.ln_1, b.ln_2)] + [prior.ln_f]
        eps = [round(ln.eps * C * C / (s_res * s_res * 4.0**model.var_shift)) for ln in lns]
        model.ln_eps.copy_(torch.tensor([min(max(1, e), 1 << 60) for e in eps]))  # q below 2**62
        for blk, fb, r in zip(model.blocks, prior.blocks, ranges["layers"]):
            s_q, s_k, s_v = (margin * r[name] / A for name in "qkv")
            w, b = _fold(fb.ln_1, fb.attn.c_attn)
            out = torch.cat([torch.full((C,), s, dtype=torch.float64) for s in (s_q, s_k, s_v)])
            blk.c_attn.set_weights(w, b, s_ln, out, weight_bits)
            blk.attn_proj.set_weights(fb.attn.c_proj.weight, fb.attn.c_proj.bias, s_v,
                                      torch.full((C,), s_res, dtype=torch.float64), weight_bits)
            w, b = _fold(fb.ln_2, fb.mlp.c_fc)
            blk.c_fc.set_weights(w, b, s_ln, unit, weight_bits)
            blk.mlp_proj.set_weights(fb.mlp.c_proj.weight, fb.mlp.c_proj.bias, 2.0 ** -fp.TABLE_FRAC,
                                     torch.full((C,), s_res, dtype=torch.float64), weight_bits)
            hs = C // cfg.n_head
            score_scale = s_q * s_k / math.sqrt(hs) / math.log(2) * 2**fp.LOG2_FRAC
            mult, shift = fp.multiplier(score_scale, 2 * hs * A * A)
            blk.score_mult.fill_(mult)
            blk.score_shift.fill_(shift)
        tokens = prior.tok_emb.weight.shape[0]  # S * K
        head = nn.Linear(C, tokens, bias=False).to(prior.device)
        head.weight.copy_(prior.tok_emb.weight)
        w, b = _fold(prior.ln_f, head)
        model.head.set_weights(w, b, s_ln, torch.full((tokens,), math.log(2) / 2**fp.LOG2_FRAC,
                                                      dtype=torch.float64), weight_bits)
        return model


def _fold(ln: nn.LayerNorm, linear: nn.Linear) -> tuple[Tensor, Tensor]:
    """linear(ln(x)) = W' norm(x) + b' with norm without gain and bias -> (W' (O, I), b' (O,)) in float64."""
    w = linear.weight.double()
    b = w @ ln.bias.double() + (linear.bias.double() if linear.bias is not None else 0.0)
    return w * ln.weight.double()[None, :], b


@torch.no_grad()
def _transformer_ranges(prior: TransformerPrior, codes: Tensor, cond: Tensor | None,
                        batch_size: int = 256) -> dict:
    """Largest magnitudes of the float prior's activations on codes (N, L): residual (every layer), and
    per layer q, k, v and the GELU input. Computed in float64 with the prior's own modules."""
    cfg, C = prior.cfg, prior.cfg.n_embd
    res, layers = 0.0, [{"q": 0.0, "k": 0.0, "v": 0.0, "hidden": 0.0} for _ in range(cfg.n_layer)]
    prior = copy.deepcopy(prior).eval().double()
    for i in range(0, len(codes), batch_size):
        z = codes[i:i + batch_size]
        c = None if cond is None else cond[i:i + batch_size]
        B, L = z.shape
        x = torch.cat([prior._start_tokens(B, c)[:, None], prior.tok_emb(prior._tokens(z)[:, :-1])], 1)
        if c is not None:
            x = x + prior.start_emb(c)[:, None]
        x = x + prior._pos_emb(L)
        res = max(res, float(x.abs().max()))
        for blk, r in zip(prior.blocks, layers):
            q, k, v = blk.attn.c_attn(blk.ln_1(x)).split(C, 2)
            for name, t in zip("qkv", (q, k, v)):
                r[name] = max(r[name], float(t.abs().max()))
            q, k, v = (rearrange(t, "b t (h d) -> b h t d", h=cfg.n_head) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + blk.attn.c_proj(rearrange(y, "b h t d -> b t (h d)"))
            res = max(res, float(x.abs().max()))
            hidden = blk.mlp.c_fc(blk.ln_2(x))
            r["hidden"] = max(r["hidden"], float(hidden.abs().max()))
            x = x + blk.mlp.c_proj(F.gelu(hidden))
            res = max(res, float(x.abs().max()))
    return {"residual": res, "layers": layers}


# ------------------------------------------------------------------------------------------------
# Gated PixelCNN
# ------------------------------------------------------------------------------------------------


def _windows(x: Tensor, kh: int, kw: int, left: int, dilation: int = 1) -> list[Tensor]:
    """x (B, H, W, C) -> the kh * kw taps of a dilated convolution, each (B, H, W, C): at (i, j) the rows
    i - (kh-1)*d .. i and the columns j - left .. j - left + (kw-1)*d, every d-th, zeros outside the
    grid; row-major tap order."""
    H, W, d = x.shape[1], x.shape[2], dilation
    p = F.pad(x, (0, 0, left, (kw - 1) * d - left, (kh - 1) * d, 0))
    return [p[:, dy * d:dy * d + H, dx * d:dx * d + W] for dy in range(kh) for dx in range(kw)]


def _conv_matrix(conv: nn.Conv2d) -> Tensor:
    """Conv weight (O, C, kh, kw) -> (O, kh * kw * C) in the tap order of `_windows`."""
    return rearrange(conv.weight, "o c kh kw -> o (kh kw c)")


class _GatedLayer(nn.Module):
    """The integers of one gated layer; the arithmetic lives in `IntegerPixelCNNPrior._trunk`."""

    def __init__(self, C: int, kernel: int, dilation: int, num_classes: int, act_bits: int):
        super().__init__()
        A, hidden = (1 << (act_bits - 1)) - 1, (1 << (fp.HIDDEN_BITS - 1)) - 1
        self.kernel, self.dilation = kernel, dilation
        self.v_conv = QLinear((kernel // 2 + 1) * kernel * C, 2 * C, A, fp.HIDDEN_BITS)  # -> units of 2**-16
        self.h_conv = QLinear((kernel // 2 + 1) * C, 2 * C, A, fp.HIDDEN_BITS)
        self.v_to_h = QLinear(2 * C, 2 * C, hidden, fp.HIDDEN_BITS)
        self.h_out = QLinear(C, C, A, act_bits)  # gate output -> the horizontal stream's scale
        self.register_buffer("cond_bias", torch.zeros(max(num_classes, 1), 2 * C, dtype=torch.long))


class IntegerPixelCNNPrior(IntegerPrior):
    """Integer model of `PixelCNNPrior`: the same causal (dilated) convolutions as sums of per-tap
    products, gates tanh(a) * sigmoid(b) from tables, the ReLU head. Step-by-step decoding recomputes rows 0..i of the
    trunk (row i's outputs depend on no later row) and the head at the one position asked for.

    Fixed-point scales: the horizontal stream (and the code embedding) one calibrated scale; gate inputs
    2**-16; gate outputs 2**-(act_bits - 1); the head's hidden layer a calibrated scale; logits 2**-16 bits.
    """

    format_id = 2

    def __init__(self, cfg: PriorConfig, weight_bits: int = 16, act_bits: int = 20):
        super().__init__(cfg, weight_bits, act_bits)
        C, K, A = cfg.n_embd, cfg.codebook_size, self.act_limit
        self.register_buffer("tok_emb", torch.zeros(K, C, dtype=torch.long))
        self.layers = nn.ModuleList(_GatedLayer(C, FIRST_KERNEL if i == 0 else KERNEL, d, cfg.num_classes, act_bits)
                                    for i, d in enumerate(pixelcnn_dilations(cfg)[0]))
        self.head_hidden = QLinear(C, C, A, act_bits)
        self.head_out = QLinear(C, K, A, 48)  # -> logits in units of 2**-16 bits
        self.register_buffer("tanh_table", torch.zeros((16 << fp.TABLE_STEP) + 1, dtype=torch.long))
        self.register_buffer("sigmoid_table", torch.zeros((32 << fp.TABLE_STEP) + 1, dtype=torch.long))

    def _gate(self, x: Tensor) -> Tensor:
        """tanh(a) * sigmoid(b) of the channel halves of x (..., 2C) at 2**-16 -> (..., C) at 2**-(act_bits - 1)."""
        a, b = x.chunk(2, -1)
        product = fp.lookup(a, self.tanh_table) * fp.lookup(b, self.sigmoid_table)  # units of 2**-32
        return fp.round_shift(product, 2 * fp.TABLE_FRAC - self.act_bits + 1).clamp_(-self.act_limit, self.act_limit)

    def _trunk(self, codes: Tensor, cond: Tensor | None) -> Tensor:
        """codes (B, H', W) int64, the first H' rows of the grid -> the horizontal stream (B, H', W, C)."""
        A, hidden = self.act_limit, (1 << (fp.HIDDEN_BITS - 1)) - 1
        emb = self.tok_emb[codes]  # (B, H', W, C)
        x_v = F.pad(emb, (0, 0, 0, 0, 1, 0))[:, :-1]  # shifted down: row i holds row i-1
        x_h = F.pad(emb, (0, 0, 1, 0))[:, :, :-1]  # shifted right: (i, j) holds (i, j-1)
        for layer in self.layers:
            k, d = layer.kernel, layer.dilation
            bias = 0 if cond is None else layer.cond_bias[cond][:, None, None]  # (B, 1, 1, 2C)
            v = layer.v_conv(_windows(x_v, k // 2 + 1, k, k // 2 * d, d))  # (B, H', W, 2C)
            h = layer.h_conv(_windows(x_h, 1, k // 2 + 1, k // 2 * d, d))
            pre_h = (h + layer.v_to_h(v) + bias).clamp_(-hidden, hidden)
            x_v = self._gate((v + bias).clamp_(-hidden, hidden))
            x_h = (x_h + layer.h_out(self._gate(pre_h))).clamp_(-A, A)
        return x_h

    def _head(self, x_h: Tensor) -> Tensor:
        """(..., C) -> integer logits (..., K)."""
        return self.head_out(self.head_hidden(x_h.clamp(min=0)).clamp_(min=0))

    def _logits(self, codes: Tensor, cond: Tensor | None) -> Tensor:
        x_h = self._trunk(codes.view(len(codes), *self.hw), cond)
        return self._head(x_h).flatten(1, 2)  # (B, L, K)

    @torch.no_grad()
    def start(self, batch: int, cond: Tensor | None = None) -> DecodeState:
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        self._check_device()
        codes = torch.zeros(batch, *self.hw, dtype=torch.long, device=self.device)  # (B, H, W)
        return DecodeState(pos=0, cond=self._check_cond(cond, batch), buffer=codes)

    @torch.no_grad()
    def step(self, state: DecodeState, prev_codes: Tensor | None) -> tuple[Tensor, DecodeState]:
        self._advance(state, prev_codes)
        t, W = state.pos, self.hw[1]
        if t > 0:
            state.buffer[:, (t - 1) // W, (t - 1) % W] = prev_codes
        x_h = self._trunk(state.buffer[:, : t // W + 1], state.cond)[:, t // W, t % W]  # (B, C)
        state.pos += 1
        return fp.frequencies(self._head(x_h), self.exp2_hi, self.exp2_lo), state

    @classmethod
    @torch.no_grad()
    def _quantize(cls, prior: PixelCNNPrior, codes: Tensor, cond: Tensor | None, weight_bits: int = 16,
                  act_bits: int = 20, margin: float = 2.0) -> "IntegerPixelCNNPrior":
        cfg, C = prior.cfg, prior.cfg.n_embd
        model = cls(cfg, weight_bits, act_bits)
        for il, fl in zip(model.layers, prior.layers):  # the float layers must have the geometry mirrored here
            k, p, d = il.kernel, il.kernel // 2, il.dilation
            shapes = (fl.v_conv.kernel_size, fl.h_conv.kernel_size, fl.v_conv.dilation, fl.h_conv.dilation, fl.pad)
            if shapes != ((p + 1, k), (1, p + 1), (d, d), (d, d), p * d):
                raise ConfigError(f"the integer PixelCNN does not model convolutions of kernel/dilation {shapes}")
        ranges = _pixelcnn_ranges(prior, codes, cond)
        A = model.act_limit
        s_res, s_head = margin * ranges["residual"] / A, margin * ranges["head"] / A
        s_gate, s_unit, hidden = 2.0 ** -(act_bits - 1), 2.0 ** -fp.TABLE_FRAC, (1 << (fp.HIDDEN_BITS - 1)) - 1
        model.tanh_table.copy_(fp.function_table(math.tanh, 8))
        model.sigmoid_table.copy_(fp.function_table(lambda x: 1 / (1 + math.exp(-x)), 16))
        model.tok_emb.copy_(torch.round(prior.tok_emb.weight.double().cpu() / s_res).long().clamp(-A, A))

        def full(n: int, scale: float) -> Tensor:
            return torch.full((n,), scale, dtype=torch.float64)

        for i, (il, fl) in enumerate(zip(model.layers, prior.layers)):
            il.v_conv.set_weights(_conv_matrix(fl.v_conv), fl.v_conv.bias, s_res if i == 0 else s_gate,
                                  full(2 * C, s_unit), weight_bits)
            il.h_conv.set_weights(_conv_matrix(fl.h_conv), fl.h_conv.bias, s_res, full(2 * C, s_unit), weight_bits)
            il.v_to_h.set_weights(_conv_matrix(fl.v_to_h), fl.v_to_h.bias, s_unit, full(2 * C, s_unit), weight_bits)
            il.h_out.set_weights(_conv_matrix(fl.h_out), fl.h_out.bias, s_gate, full(C, s_res), weight_bits)
            if fl.cond_emb is not None:
                bias = torch.round(fl.cond_emb.weight.double().cpu() / s_unit).long()
                il.cond_bias.copy_(bias.clamp(-hidden, hidden))
        hidden, out = prior.head[1], prior.head[3]
        model.head_hidden.set_weights(_conv_matrix(hidden), hidden.bias, s_res, full(C, s_head), weight_bits)
        model.head_out.set_weights(_conv_matrix(out), out.bias, s_head,
                                   full(cfg.codebook_size, math.log(2) / 2**fp.LOG2_FRAC), weight_bits)
        return model


@torch.no_grad()
def _pixelcnn_ranges(prior: PixelCNNPrior, codes: Tensor, cond: Tensor | None, batch_size: int = 256) -> dict:
    """Largest magnitudes of the float prior's horizontal stream (every layer) and of its head's hidden
    layer on codes (N, L), in float64 with the prior's own modules."""
    prior = copy.deepcopy(prior).eval().double()
    res, head = 0.0, 0.0
    for i in range(0, len(codes), batch_size):
        z = codes[i:i + batch_size].view(-1, *prior.hw)
        c = None if cond is None else cond[i:i + batch_size]
        emb = rearrange(prior.tok_emb(z), "b h w c -> b c h w")
        x_v, x_h = F.pad(emb, (0, 0, 1, 0))[:, :, :-1], F.pad(emb, (1, 0, 0, 0))[..., :-1]
        res = max(res, float(emb.abs().max()))
        for layer in prior.layers:
            x_v, x_h = layer(x_v, x_h, c)
            res = max(res, float(x_h.abs().max()))
        head = max(head, float(prior.head[:3](x_h).abs().max()))
    return {"residual": res, "head": head}
