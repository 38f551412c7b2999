"""Autoregressive priors over code grids: a causal transformer and a gated PixelCNN.

Key: B batch, K codebook size, H W code grid (a 1-D grid of T codes is treated as H=1, W=T),
L = H*W sequence length (raster order: row by row, left to right), C channels (n_embd),
nh heads, hs head size (C / nh).

Both priors share one interface (the `Prior` base class):
    logits(codes, cond)    (B, *grid) int64 -> (B, K, *grid); logits at a position see only earlier codes
    log_prob(codes, cond)  -> (B,) natural-log likelihood of each grid
    loss(codes, cond)      -> scalar mean cross-entropy in nats per latent (what a trainer minimises)
    sample(n, cond, temperature, top_k, generator, guidance) -> (n, *grid) int64
    start(batch, cond) -> DecodeState;  step(state, prev_codes) -> (logits (B, K), state)
The step API decodes one position at a time; the transformer keeps a key/value cache so the prefix is
never recomputed. The entropy coder drives it on both sides: see `Prior.step` for the contract.

Residual-VQ codes (S stages, codes (B, S, H, W), `PriorConfig.stages` = S, transformer only) are one
sequence of S * L tokens in stage-major order: the whole stage-0 grid in raster order, then stage 1, ...
Why this order and not the S codes of a position next to each other: the first s stages of the codes are
then the first s * L tokens, so one prior gives the exact likelihood of every stage prefix, which is what
compressing with the first s stages (s operating points of one model) and sampling with fewer stages
need; with stages interleaved by position, the stage-0 code of a position would be predicted from later
stages of earlier positions, which a file of fewer stages does not hold. The context is also the more
useful one: a stage-s code sees the whole coarser grids, its neighbours' coarser codes on every side
included. Each position has its own vocabulary: the token of stage s is code + s * K in a table of S * K
embeddings, a stage embedding joins the row and column ones, and the logits of a stage-s position are the
K of its stage (the tied head's slice), so probabilities never go to another stage's codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from . import pretrained
from .config import PriorConfig, from_dict, to_dict
from .errors import ConfigError, RunError
from .nets import eval_mode
from .pretrained import CONFIG_NAME

__all__ = [
    "DecodeState", "Prior", "TransformerPrior", "PixelCNNPrior",
    "build_prior", "class_bits", "load_prior", "marginal_bits", "prior_bits", "sample_from_logits",
]


@dataclass
class DecodeState:
    """Where a step-by-step decode stands; made by `Prior.start`, advanced by `Prior.step`.

    pos: the position (0..L) whose logits the next `step` returns.
    cond: (B,) int64 class labels, or None for an unconditional prior.
    buffer: the prior's working memory, allocated once by `start` and written in place:
        TransformerPrior: keys and values of every layer, (n_layer, 2, B, nh, L, hs);
        PixelCNNPrior: the codes decoded so far, (B, H, W), zeros from `pos` on.
    """

    pos: int
    cond: Tensor | None
    buffer: Tensor


def check_step(state: DecodeState, prev_codes: Tensor | None, seq_len: int) -> None:
    """The step API's contract: a position left to decode, and `prev_codes` None exactly at position 0."""
    if state.pos >= seq_len:
        raise RuntimeError(f"decode finished: all {seq_len} positions were returned")
    if (prev_codes is None) != (state.pos == 0):
        raise ValueError("prev_codes must be None on the first step and (B,) int64 codes after it")


def sample_from_logits(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                       generator: torch.Generator | None = None) -> Tensor:
    """Draw one code per row of `logits` (B, K) -> (B,) int64.

    temperature == 0 is greedy (argmax); top_k keeps only the k largest logits before sampling.
    `generator` (on the logits' device) makes the draw reproducible.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be None or at least 1, got {top_k}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


class Prior(nn.Module):
    """Base of the priors: everything that does not depend on the architecture.

    Subclasses implement `logits`, `start` and `step`; `log_prob`, `loss`, `sample` and the
    `save_pretrained` / `from_pretrained` pair are shared.
    """

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.cfg = cfg
        self.grid_len = math.prod(cfg.grid)  # L: positions of one grid
        self.seq_len = self.grid_len * max(cfg.stages, 1)  # tokens: L, or S * L with residual-VQ stages
        self.hw = (1, cfg.grid[0]) if len(cfg.grid) == 1 else cfg.grid  # (H, W)
        self.code_shape = (cfg.stages, *cfg.grid) if cfg.stages else cfg.grid  # one image's codes

    # --- arch-specific ---------------------------------------------------------------------------
    def logits(self, codes: Tensor, cond: Tensor | None = None) -> Tensor:
        """codes (B, *grid) int64 -> logits (B, K, *grid); position t depends only on codes before t."""
        raise NotImplementedError

    def start(self, batch: int, cond: Tensor | None = None) -> DecodeState:
        """Begin a step-by-step decode of `batch` grids; nothing is computed yet."""
        raise NotImplementedError

    def step(self, state: DecodeState, prev_codes: Tensor | None) -> tuple[Tensor, DecodeState]:
        """Feed the code chosen at position `state.pos - 1` and get the logits of position `state.pos`.

        prev_codes: (B,) int64, or None on the first call (position 0 has no previous code).
        Returns (logits (B, K) float32, state) with state.pos advanced by one; the state is updated in
        place and returned for convenience. L calls decode a whole grid: step(s, None), step(s, c_0),
        ..., step(s, c_{L-2}).
        Contract for the entropy coder: for the same weights, device, batch size, cond and codes fed in
        the same order, the logits are bit-identical from run to run, so encoder and decoder must both
        use this API (not `logits`, whose full pass rounds differently in the last bits). Requires eval
        mode when dropout > 0.
        """
        raise NotImplementedError

    # --- shared ----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _check_codes(self, codes: Tensor) -> None:
        if codes.dtype != torch.long or tuple(codes.shape[1:]) != self.code_shape:
            raise ValueError(f"codes must be int64 of shape (B, {', '.join(map(str, self.code_shape))}), "
                             f"got {codes.dtype} {tuple(codes.shape)}")

    def _check_cond(self, cond: Tensor | None, batch: int) -> Tensor | None:
        """Validate class labels against the config: required iff num_classes > 0, shape (B,)."""
        if self.cfg.num_classes == 0:
            if cond is not None:
                raise ValueError("this prior is unconditional (num_classes=0): pass cond=None")
            return None
        if cond is None:
            raise ValueError(f"this prior is class-conditional: pass cond, (B,) int64 labels in "
                             f"[0, {self.cfg.num_classes})")
        cond = torch.as_tensor(cond, device=self.device)
        if cond.dtype != torch.long or cond.shape != (batch,):
            raise ValueError(f"cond must be int64 of shape ({batch},), got {cond.dtype} {tuple(cond.shape)}")
        return cond

    def _check_decode(self, batch: int, cond: Tensor | None) -> Tensor | None:
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        if self.training and self.cfg.dropout > 0:
            raise RuntimeError("call prior.eval() before decoding: dropout would make step() random")
        cond = self._check_cond(cond, batch)
        if cond is not None and not bool(((cond >= 0) & (cond < self.cfg.num_classes)).all()):
            raise ValueError(f"cond labels must be in [0, {self.cfg.num_classes}), got {cond.tolist()}")
        return cond

    def _advance(self, state: DecodeState, prev_codes: Tensor | None) -> None:
        check_step(state, prev_codes, self.seq_len)

    def log_prob(self, codes: Tensor, cond: Tensor | None = None) -> Tensor:
        """codes (B, *grid) int64 -> (B,) log-likelihood in nats, summed over the grid."""
        nll = F.cross_entropy(self.logits(codes, cond).float(), codes, reduction="none")  # (B, *grid)
        return -nll.flatten(1).sum(1)

    def loss(self, codes: Tensor, cond: Tensor | None = None) -> Tensor:
        """Mean cross-entropy in nats per latent over the batch: the training objective."""
        return F.cross_entropy(self.logits(codes, cond).float(), codes)

    @torch.no_grad()
    def sample(self, n: int, cond: Tensor | None = None, temperature: float = 1.0, top_k: int | None = None,
               generator: torch.Generator | None = None, guidance: float = 1.0) -> Tensor:
        """Draw `n` code grids -> (n, *grid) int64 ((n, S, *grid) with stages), one position at a time
        through `start`/`step`.

        cond: (n,) int64 labels (class-conditional priors) or None. temperature 0 is greedy, top_k keeps
        the k most likely codes; `generator` (on the prior's device) makes the draw reproducible.
        guidance w (class-conditional priors): each code is drawn from
        log p(z_t | y, z_<t) + (w - 1) * (log p(z_t | y, z_<t) - log p(z_t | z_<t)), where the unconditional
        p(z_t | z_<t) = sum_y' p(y' | z_<t) p(z_t | y', z_<t) is the prior's own mixture over its Y classes
        (uniform p(y'), p(y' | z_<t) by Bayes from the codes drawn so far). w = 1 is plain sampling; w > 1
        favours codes that tell the class apart (classifier-free guidance, with the class posterior of the
        prior itself instead of a second, unconditional network); it runs Y sequences per sample.
        Runs in eval mode and restores the module's mode afterwards.
        """
        if not math.isfinite(guidance) or guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {guidance}")
        Y = self.cfg.num_classes
        if guidance != 1.0 and not Y:
            raise ValueError("guidance needs a class-conditional prior; this prior has no classes")
        with eval_mode(self):
            if guidance == 1.0:
                state = self.start(n, cond)
            else:  # every sample's sequence under each of the Y classes, (n * Y) rows: sample i, class y at i * Y + y
                cond = self._check_decode(n, cond)
                state = self.start(n * Y, torch.arange(Y, device=self.device).repeat(n))
                log_prefix = torch.zeros(n, Y, device=self.device)  # log p(z_<t | y') of each sample, each class
            codes = torch.empty(n, self.seq_len, dtype=torch.long, device=self.device)  # (B, L)
            prev = None
            for t in range(self.seq_len):
                logits, state = self.step(state, prev)  # (B, K), or (n * Y, K)
                if guidance != 1.0:
                    log_p = F.log_softmax(logits.view(n, Y, -1), -1)  # (n, Y, K)
                    own = log_p[torch.arange(n, device=self.device), cond]  # (n, K) log p(z_t | y, z_<t)
                    weights = F.log_softmax(log_prefix, -1)[..., None]  # (n, Y, 1) log p(y' | z_<t)
                    marginal = torch.logsumexp(weights + log_p, 1)  # (n, K) log p(z_t | z_<t)
                    logits = own + (guidance - 1) * (own - marginal)
                chosen = sample_from_logits(logits, temperature, top_k, generator)  # (n,)
                codes[:, t] = chosen
                if guidance != 1.0:
                    log_prefix += log_p.gather(2, chosen[:, None, None].expand(n, Y, 1))[..., 0]
                    chosen = chosen.repeat_interleave(Y)  # fed to each class's row of its sample
                prev = chosen
        return codes.view(n, *self.code_shape)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `config.json` (the PriorConfig) and `model.safetensors`, each atomically."""
        pretrained.save(self, directory, to_dict(self.cfg))

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "Prior":
        """Rebuild from `config.json`, load `model.safetensors` (never unpickles); returns it in eval mode.

        Called on `Prior` it builds whichever arch the config names; on a subclass the arch must match.
        """
        config = pretrained.read_config(directory, "a prior directory written by save_pretrained", "prior")
        try:
            cfg = from_dict(PriorConfig, config)
        except ConfigError as e:  # a field out of range or unknown: name the file
            raise RunError(f"{Path(directory) / CONFIG_NAME}: not a vqvae prior config ({e})") from None
        model = build_prior(cfg)
        if not isinstance(model, cls):
            raise RunError(f"{Path(directory) / CONFIG_NAME}: holds a {cfg.arch} prior, not a {cls.__name__}")
        return pretrained.load_weights(model, directory, device)


# ------------------------------------------------------------------------------------------------
# Transformer (nanoGPT-style, pre-LN)
# ------------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, kv: Tensor | None = None, pos: int = 0) -> Tensor:
        """x (B, T, C). Without `kv`: causal attention over the T positions. With `kv` (2, B, nh, L, hs):
        x is the single position `pos` (T == 1); its key and value are written into the cache and it
        attends over positions 0..pos, so the prefix is never recomputed."""
        q, k, v = self.c_attn(x).split(x.size(-1), dim=2)
        q, k, v = (rearrange(z, "b t (h d) -> b h t d", h=self.n_head) for z in (q, k, v))  # (B, nh, T, hs)
        if kv is None:
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:
            assert x.size(1) == 1, "cached attention takes one position at a time"
            kv[0, :, :, pos] = k[:, :, 0]
            kv[1, :, :, pos] = v[:, :, 0]
            # one query attending to every cached position: no mask needed
            y = F.scaled_dot_product_attention(q, kv[0, :, :, : pos + 1], kv[1, :, :, : pos + 1])
        y = rearrange(y, "b h t d -> b t (h d)")  # (B, T, C)
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, kv: Tensor | None = None, pos: int = 0) -> Tensor:
        x = x + self.attn(self.ln_1(x), kv, pos)
        return x + self.mlp(self.ln_2(x))


class TransformerPrior(Prior):
    """Decoder-only transformer over the raster-scanned code grid.

    The input at position t is a start token (a learned embedding per class, or one learned token when
    num_classes == 0) at t = 0, and code t-1 after it; so logits at t predict code t from codes < t.
    A class-conditional prior also adds the class embedding to every position's input: conditioning
    through the start token alone is learned too slowly for a few minutes of training.
    Positions are embedded as row + column embeddings (1-D grids: one position embedding). The output
    head shares its weights with the code embedding (tied, as in nanoGPT). With `cfg.stages` = S the
    sequence is the S grids one after the other (the module docstring says why): S * K token embeddings
    (stage s's code k is token s * K + k), a stage embedding, and the logits of a position are the K of
    its stage.
    """

    def __init__(self, cfg: PriorConfig):
        super().__init__(cfg)
        C = cfg.n_embd
        self.tok_emb = nn.Embedding(max(cfg.stages, 1) * cfg.codebook_size, C)  # also the output head
        self.stage_emb = nn.Embedding(cfg.stages, C) if cfg.stages else None
        self.start_emb = nn.Embedding(max(cfg.num_classes, 1), C)
        self.row_emb = nn.Embedding(self.hw[0], C) if len(cfg.grid) == 2 else None
        self.col_emb = nn.Embedding(self.hw[1], C)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(C)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _pos_emb(self, T: int) -> Tensor:
        """Embeddings of sequence positions 0..T-1 -> (T, C): row + column (+ stage)."""
        t = torch.arange(T, device=self.col_emb.weight.device)
        p, W = t % self.grid_len, self.hw[1]
        emb = self.col_emb(p % W)
        if self.stage_emb is not None:
            emb = emb + self.stage_emb(t // self.grid_len)
        return emb if self.row_emb is None else emb + self.row_emb(p // W)

    def _tokens(self, codes: Tensor) -> Tensor:
        """Flat codes (B, T) -> tokens (B, T): code + s * K at the positions of stage s."""
        if self.stage_emb is None:
            return codes
        stage = torch.arange(codes.size(1), device=codes.device) // self.grid_len
        return codes + stage * self.cfg.codebook_size

    def _head(self, x: Tensor) -> Tensor:
        """Final hidden states (B, T, C) of positions 0..T-1 -> logits (B, T, K), each of its stage's K."""
        out = F.linear(self.ln_f(x), self.tok_emb.weight)  # (B, T, S * K)
        if self.stage_emb is None:
            return out
        T = x.size(1)
        t = torch.arange(T, device=x.device)
        return out.view(x.size(0), T, -1, self.cfg.codebook_size)[:, t, t // self.grid_len]  # (B, T, K)

    def _start_tokens(self, batch: int, cond: Tensor | None) -> Tensor:
        """The position-0 input of each sequence -> (B, C)."""
        if cond is None:
            return self.start_emb.weight[0].expand(batch, -1)
        return self.start_emb(cond)

    def forward(self, codes: Tensor, cond: Tensor | None = None) -> Tensor:
        """codes (B, T) int64 raster-ordered (stage-major with stages), 1 <= T <= L -> logits (B, T, K)
        for positions 0..T-1.

        logits[:, t] predicts codes[:, t] from codes[:, :t]; the last code is never read, so a prefix
        plus any placeholder gives the logits of the next position (the uncached sampling baseline).
        """
        B, T = codes.shape
        assert 1 <= T <= self.seq_len, f"sequence length {T} not in [1, {self.seq_len}]"
        cond = self._check_cond(cond, B)
        tokens = self._tokens(codes)
        x = torch.cat([self._start_tokens(B, cond)[:, None], self.tok_emb(tokens[:, :-1])], dim=1)  # (B, T, C)
        if cond is not None:  # the class at every position, not only through the start token's attention
            x = x + self.start_emb(cond)[:, None]
        x = self.drop(x + self._pos_emb(T))
        for block in self.blocks:
            x = block(x)
        return self._head(x)  # (B, T, K)

    def logits(self, codes: Tensor, cond: Tensor | None = None) -> Tensor:
        self._check_codes(codes)
        out = self(codes.flatten(1), cond)  # (B, L, K)
        return rearrange(out, "b l k -> b k l").reshape(codes.size(0), -1, *self.code_shape)

    @torch.no_grad()
    def start(self, batch: int, cond: Tensor | None = None) -> DecodeState:
        cond = self._check_decode(batch, cond)
        cfg, w = self.cfg, self.tok_emb.weight
        kv = w.new_zeros(cfg.n_layer, 2, batch, cfg.n_head, self.seq_len, cfg.n_embd // cfg.n_head)
        return DecodeState(pos=0, cond=cond, buffer=kv)

    @torch.no_grad()
    def step(self, state: DecodeState, prev_codes: Tensor | None) -> tuple[Tensor, DecodeState]:
        self._advance(state, prev_codes)
        t, batch = state.pos, state.buffer.size(2)
        K, stage = self.cfg.codebook_size, t // self.grid_len
        if t == 0:
            x = self._start_tokens(batch, state.cond)  # (B, C)
        else:  # the previous position's code, as a token of its stage
            x = self.tok_emb(prev_codes + (t - 1) // self.grid_len * K if self.stage_emb is not None else prev_codes)
        if state.cond is not None:
            x = x + self.start_emb(state.cond)
        p, W = t % self.grid_len, self.hw[1]
        pos = self.col_emb.weight[p % W] + (0 if self.row_emb is None else self.row_emb.weight[p // W])
        if self.stage_emb is not None:
            pos = pos + self.stage_emb.weight[stage]
        x = (x + pos)[:, None]  # (B, 1, C)
        for i, block in enumerate(self.blocks):
            x = block(x, state.buffer[i], t)
        weight = self.tok_emb.weight if self.stage_emb is None else self.tok_emb.weight[stage * K:(stage + 1) * K]
        logits = F.linear(self.ln_f(x[:, 0]), weight)  # (B, K)
        state.pos += 1
        return logits.float(), state


# ------------------------------------------------------------------------------------------------
# Gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders")
# ------------------------------------------------------------------------------------------------

FIRST_KERNEL, KERNEL = 7, 3  # the first layer sees a wider neighbourhood, as in the paper's setup


def _gate(x: Tensor, cond_bias: Tensor | float) -> Tensor:
    """tanh(a) * sigmoid(b) over the two channel halves of x + cond_bias: (B, 2C, H, W) -> (B, C, H, W)."""
    a, b = (x + cond_bias).chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One gated layer with a vertical stack (rows above) and a horizontal stack (left in the row).

    Causality comes from padding, not weight masks: with p = kernel//2 and dilation d, the vertical conv
    (p+1, k) at row i reads rows i-p*d..i of its input (every d-th) and the horizontal conv (1, p+1) at
    (i, j) reads columns j-p*d..j. The model shifts the first layer's inputs down by one row / right by
    one column, so vertical features at row i depend only on rows < i and horizontal ones only on
    (rows < i) + (row i, columns < j): no blind spot, and the vertical -> horizontal link needs no extra
    shift.
    """

    def __init__(self, channels: int, kernel: int, num_classes: int, dilation: int = 1):
        super().__init__()
        self.pad = kernel // 2 * dilation
        self.v_conv = nn.Conv2d(channels, 2 * channels, (kernel // 2 + 1, kernel), dilation=dilation)
        self.h_conv = nn.Conv2d(channels, 2 * channels, (1, kernel // 2 + 1), dilation=dilation)
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = nn.Conv2d(channels, channels, 1)
        # class conditioning: a learned bias per class inside both gates (the paper's V^T h)
        self.cond_emb = nn.Embedding(num_classes, 2 * channels) if num_classes > 0 else None

    def forward(self, x_v: Tensor, x_h: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        """x_v, x_h (B, C, H, W), cond (B,) or None -> new (x_v, x_h), same shapes."""
        p = self.pad
        bias = 0.0 if cond is None else self.cond_emb(cond)[:, :, None, None]  # (B, 2C, 1, 1)
        v = self.v_conv(F.pad(x_v, (p, p, p, 0)))  # (B, 2C, H, W)
        h = self.h_conv(F.pad(x_h, (p, 0, 0, 0)))  # (B, 2C, H, W)
        out_v = _gate(v, bias)
        out_h = x_h + self.h_out(_gate(h + self.v_to_h(v), bias))  # residual on the horizontal stack
        return out_v, out_h


def pixelcnn_dilations(cfg: PriorConfig) -> tuple[list[int], int]:
    """The dilation of each gated layer (a list of n_layer ints) and the reach R of the stack.

    Position (i, j) sees the codes (i, j-R..j-1) of its row and those of rows i-R..i-1 within columns
    j-R+1..j+R-1; so it sees every earlier code of an H x W grid when R >= max(H - 1, W).
    The first layer (kernel 7) has R = 4. A layer of kernel k and dilation d adds d * (k//2) to R; its
    taps stay gap-free while d <= R, so a dilated stack takes d = min(R, what is still missing): R
    doubles per layer until it covers the grid, then the layers go on undilated.
    """
    H, W = (1, cfg.grid[0]) if len(cfg.grid) == 1 else cfg.grid
    needed = max(H - 1, W)
    reach, dilations = FIRST_KERNEL // 2 + 1, [1]
    for _ in range(cfg.n_layer - 1):
        missing = -(-(needed - reach) // (KERNEL // 2))  # ceil: dilation that closes the gap in one layer
        d = max(1, min(reach, missing)) if cfg.dilated else 1
        dilations.append(d)
        reach += d * (KERNEL // 2)
    return dilations, reach


class PixelCNNPrior(Prior):
    """Gated PixelCNN over code embeddings: n_layer gated layers of n_embd channels, then a
    ReLU-1x1-ReLU-1x1 head to K logits. 1-D grids of T codes run as a (1, T) image, where the vertical
    stack sees nothing and the horizontal stack is a causal 1-D conv net. n_head is unused.
    With `cfg.dilated` the layers' dilations (`pixelcnn_dilations`) let every code see all earlier
    codes once 4 * 2^(n_layer-1) >= max(H - 1, W); undilated, once n_layer + 3 >= max(H - 1, W).
    """

    def __init__(self, cfg: PriorConfig):
        super().__init__(cfg)
        C = cfg.n_embd
        self.dilations, self.reach = pixelcnn_dilations(cfg)
        self.tok_emb = nn.Embedding(cfg.codebook_size, C)
        self.layers = nn.ModuleList(
            GatedLayer(C, FIRST_KERNEL if i == 0 else KERNEL, cfg.num_classes, dilation)
            for i, dilation in enumerate(self.dilations))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 1), nn.ReLU(), nn.Conv2d(C, cfg.codebook_size, 1))

    def _logits_hw(self, codes: Tensor, cond: Tensor | None) -> Tensor:
        """codes (B, H, W) -> logits (B, K, H, W)."""
        emb = rearrange(self.tok_emb(codes), "b h w c -> b c h w")
        x_v = F.pad(emb, (0, 0, 1, 0))[:, :, :-1]  # shifted down: row i holds row i-1
        x_h = F.pad(emb, (1, 0, 0, 0))[..., :-1]  # shifted right: (i, j) holds (i, j-1)
        for layer in self.layers:
            x_v, x_h = layer(x_v, x_h, cond)
        return self.head(x_h)

    def logits(self, codes: Tensor, cond: Tensor | None = None) -> Tensor:
        self._check_codes(codes)
        B = codes.size(0)
        cond = self._check_cond(cond, B)
        out = self._logits_hw(codes.view(B, *self.hw), cond)  # (B, K, H, W)
        return out.view(B, -1, *self.cfg.grid)

    @torch.no_grad()
    def start(self, batch: int, cond: Tensor | None = None) -> DecodeState:
        cond = self._check_decode(batch, cond)
        codes = torch.zeros(batch, *self.hw, dtype=torch.long, device=self.device)  # (B, H, W)
        return DecodeState(pos=0, cond=cond, buffer=codes)

    @torch.no_grad()
    def step(self, state: DecodeState, prev_codes: Tensor | None) -> tuple[Tensor, DecodeState]:
        # a full forward pass per position (standard for PixelCNN); positions >= pos hold zeros
        self._advance(state, prev_codes)
        t, W = state.pos, self.hw[1]
        if t > 0:
            state.buffer[:, (t - 1) // W, (t - 1) % W] = prev_codes
        logits = self._logits_hw(state.buffer, state.cond)[:, :, t // W, t % W]  # (B, K)
        state.pos += 1
        return logits.float(), state


# ------------------------------------------------------------------------------------------------


def build_prior(cfg: PriorConfig) -> Prior:
    """The prior that `cfg.arch` names, freshly initialised."""
    return {"transformer": TransformerPrior, "pixelcnn": PixelCNNPrior}[cfg.arch](cfg)


def load_prior(directory: str | Path, device: str | torch.device = "cpu") -> Prior:
    """Load a prior saved by `save_pretrained`, whichever its arch, in eval mode."""
    return Prior.from_pretrained(directory, device)


@torch.no_grad()
def prior_bits(prior: Prior, codes: Tensor, cond: Tensor | None = None, batch_size: int = 250) -> Tensor:
    """-log2 p(z) of each code grid (N,) under `prior`, in float64, in eval mode, batched.

    codes: (N, *grid) integers (int16 as cached in runs/NAME/codes is fine). With `cond` (N,) labels the
    conditional p(z | y); without, a class-conditional prior gives the marginal p(z) = (1/Y) sum_y p(z | y)
    over its Y classes with a uniform p(y): a likelihood of the codes alone, as when compressing an
    image whose label is unknown.
    """
    codes = torch.as_tensor(codes)
    if cond is None and prior.cfg.num_classes:
        return marginal_bits(class_bits(prior, codes, batch_size))
    device = prior.device
    out = []
    with eval_mode(prior):
        for i in range(0, len(codes), batch_size):
            z = codes[i:i + batch_size].to(device, torch.long)
            c = None if cond is None else torch.as_tensor(cond)[i:i + batch_size].to(device, torch.long)
            out.append(-prior.log_prob(z, c).double().cpu() / math.log(2))
    return torch.cat(out)


@torch.no_grad()
def class_bits(prior: Prior, codes: Tensor, batch_size: int = 250) -> Tensor:
    """-log2 p(z | y) of each code grid under each of a class-conditional prior's Y classes -> (Y, N)
    float64, in eval mode, batched."""
    codes, Y = torch.as_tensor(codes), prior.cfg.num_classes
    return torch.stack([prior_bits(prior, codes, torch.full((len(codes),), y, dtype=torch.long), batch_size)
                        for y in range(Y)])


def marginal_bits(per_class: Tensor) -> Tensor:
    """(Y, N) bits of each grid under each class -> (N,) bits of the marginal -log2 (1/Y) sum_y 2^-bits,
    a uniform p(y); classes at +inf bits add nothing."""
    Y = per_class.size(0)
    return -(torch.logsumexp(-per_class.double() * math.log(2), 0) - math.log(Y)) / math.log(2)
