"""Autoencoders with continuous latents on the VQ-VAE's encoder and decoder: the deterministic `AE` (the
baseline bottleneck) and the Gaussian `VAE`.

Key: B batch, C image channels, D latent channels (`cfg.quantizer.code_dim`, the VQ-VAE's code dim),
S input spatial shape ((H, W) or (T,)), S' = ceil(S / downsample) the latent grid.

Both pad and crop as the VQ-VAE does (`pad_to_multiple`, `crop`), so any input size works, and the latent
grid (B, D, *S') has the size of the VQ-VAE's z_e: the same bottleneck, not quantized. `encode` returns
`Latents` (float) instead of integer codes.

The VAE's likelihoods are in bits, with the discretized Gaussian of `metrics.discretized_gaussian_nll_bits`
(the VQ-VAE's bits per dimension): its training loss is the negative ELBO in bits per input dimension,
with the decoder's log scale a learned scalar (`log_scale`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .autoencoders import Autoencoder, Output, crop, pad_to_multiple
from .config import ModelConfig
from .metrics import discretized_gaussian_nll_bits
from .nets import Decoder, Encoder

LN2 = math.log(2)


@dataclass
class Latents:
    """Continuous latents and the spatial size of the inputs they encode.

    z: (B, D, *S') float (the VAE: the posterior mean). size: S, to which `decode` crops its output.
    """

    z: torch.Tensor
    size: tuple[int, ...]


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) in nats per item (B,), summed over all other dims:
    1/2 sum(mean^2 + exp(logvar) - 1 - logvar)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)


def discretized_nll_bits(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """`metrics.discretized_gaussian_nll_bits` (B,) in x's dtype, with finite gradients everywhere.

    The same bins (8-bit pixels, open-ended first and last) and the same mirroring of bins above the mean
    into the lower tail, but the mirroring picks the bin edges before the one log-mass evaluation, so
    that no discarded branch (whose value may be -inf) sends NaN into the gradient.
    """
    k = (x.clamp(0, 1) * 255).round()
    scale = log_scale.exp()
    inf = torch.full_like(k, math.inf)
    lo = torch.where(k == 0, -inf, ((k - 0.5) / 255 - mean) / scale)  # standardised bin edges
    hi = torch.where(k == 255, inf, ((k + 0.5) / 255 - mean) / scale)
    above = k / 255 > mean  # Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi): take the side where Phi is small
    a, b = torch.where(above, -hi, lo), torch.where(above, -lo, hi)
    log_b = torch.special.log_ndtr(b)
    log_p = log_b + torch.log(-torch.expm1(torch.special.log_ndtr(a) - log_b))
    return -(log_p / LN2).flatten(1).sum(1)


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """N(0, 1) draws on `device`, from `generator` (on whatever device it lives) when one is given."""
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


class AE(Autoencoder):
    """x -> z = encoder(x) (B, D, *S') -> x_hat = decoder(z): no quantizer, loss = MSE."""

    discrete = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        args = (cfg.dims, cfg.in_channels, cfg.hidden, cfg.res_hidden, cfg.res_blocks, cfg.downsample)
        self.encoder = Encoder(*args, self._encoder_channels(), kernel=cfg.encoder_kernel)
        self.decoder = Decoder(*args, cfg.quantizer.code_dim)

    def _encoder_channels(self) -> int:
        return self.cfg.quantizer.code_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, *S), any S -> the encoder's output on the padded input (B, channels, *S')."""
        self._check_input(x)
        return self.encoder(pad_to_multiple(x, self.cfg.downsample) - 0.5)

    def _reconstruct(self, z: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        return crop(self.decoder(z) + 0.5, size)  # (B, C, *S), not clamped

    def forward(self, x: torch.Tensor) -> Output:
        """loss = reconstruction MSE; metrics: mse; codes None."""
        x_hat = self._reconstruct(self.features(x), x.shape[2:])
        mse = F.mse_loss(x_hat, x)
        return Output(x_hat, mse, {"mse": mse.detach()}, None)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> Latents:
        """x (B, C, *S) in [0, 1], any S -> Latents(z (B, D, *S'), size S)."""
        return Latents(self.features(x), tuple(int(s) for s in x.shape[2:]))

    @torch.no_grad()
    def decode(self, latents: Latents | torch.Tensor, size: tuple[int, ...] | None = None) -> torch.Tensor:
        """Latents (or z (B, D, *S')) -> images (B, C, *S) in [0, 1] (clamped, no gradient); cropped to
        the `Latents`' size or `size`, else S' * downsample."""
        if isinstance(latents, Latents):
            latents, size = latents.z, size or latents.size
        D = self.cfg.quantizer.code_dim
        if latents.dim() != self.cfg.dims + 2 or latents.shape[1] != D or not latents.dtype.is_floating_point:
            raise ValueError(f"expected float latents (B, {D}, {'T' if self.cfg.dims == 1 else 'H, W'}), "
                             f"got {latents.dtype} {tuple(latents.shape)}")
        self._check_size(size, latents.shape[2:])
        x_hat = self.decoder(latents.to(self.device)) + 0.5
        return (x_hat if size is None else crop(x_hat, size)).clamp(0, 1)


class VAE(AE):
    """Gaussian posterior q(z|x) = N(mean, diag exp(logvar)), the encoder emitting both (B, 2D, *S');
    prior N(0, I); decoder likelihood p(x|z) the discretized Gaussian of mean decoder(z) + 1/2 and scale
    exp(log_scale), a learned scalar (initial value `init_log_scale`).

    forward: z = mean + exp(logvar / 2) * eps (training; the mean in eval mode), loss = -ELBO in bits per
    input dimension = (NLL bits + KL / ln 2) / (C * prod(S)), averaged over the batch; metrics: mse (of
    the reconstruction clamped to [0, 1], as `decode` returns it), nll_bits_per_dim, kl_bits_per_dim,
    log_scale. `elbo_bits_per_dim` is the held-out figure.
    """

    init_log_scale = math.log(0.25)

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.log_scale = nn.Parameter(torch.tensor(self.init_log_scale))

    def _encoder_channels(self) -> int:
        return 2 * self.cfg.quantizer.code_dim

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, *S), any S -> (mean, logvar), each (B, D, *S')."""
        mean, logvar = self.features(x).chunk(2, dim=1)
        return mean, logvar

    def _terms(self, x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, sample: bool,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_hat (B, C, *S), NLL bits (B,), KL nats (B,)) for one z drawn from q (or its mean)."""
        if sample:
            eps = _randn(mean.shape, generator, mean.device).to(mean.dtype)
            z = mean + (0.5 * logvar).exp() * eps
        else:
            z = mean
        x_hat = self._reconstruct(z, x.shape[2:])
        return x_hat, discretized_nll_bits(x, x_hat, self.log_scale), gaussian_kl(mean, logvar)

    def forward(self, x: torch.Tensor) -> Output:
        mean, logvar = self.posterior(x)
        x_hat, nll, kl = self._terms(x, mean, logvar, sample=self.training)
        dims = x[0].numel()
        nll_bpd, kl_bpd = nll.mean() / dims, kl.mean() / (LN2 * dims)
        # The likelihood's mean may leave [0, 1] (the end bins are open); the reconstruction is clamped.
        metrics = {"mse": F.mse_loss(x_hat.detach().clamp(0, 1), x), "nll_bits_per_dim": nll_bpd.detach(),
                   "kl_bits_per_dim": kl_bpd.detach(), "log_scale": self.log_scale.detach().clone()}
        return Output(x_hat, nll_bpd + kl_bpd, metrics, None)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> Latents:
        """x (B, C, *S) -> Latents(posterior mean (B, D, *S'), size S)."""
        return Latents(self.posterior(x)[0], tuple(int(s) for s in x.shape[2:]))

    @torch.no_grad()
    def elbo_bits_per_dim(self, x: torch.Tensor, samples: int = 1, log_scale: float | None = None,
                          generator: torch.Generator | None = None) -> torch.Tensor:
        """-ELBO per input dimension (B,), an upper bound on -log2 p(x) / (C * prod(S)) for 8-bit x:
        (E_q[-log2 p(x|z)] + KL(q || N(0, I)) / ln 2) / dims, the expectation a mean over `samples` draws of
        z (reparameterised; `generator`, on any device, for reproducible draws), the likelihood that of
        `metrics.discretized_gaussian_nll_bits` (float64) at the learned log scale, or at `log_scale` if
        given (e.g. one fitted on training images with `metrics.fit_log_scale`, as the VQ-VAE's figure is).
        """
        mean, logvar = self.posterior(x)
        scale = self.log_scale if log_scale is None else log_scale
        nll = 0
        for _ in range(samples):
            x_hat, _, kl = self._terms(x, mean, logvar, sample=True, generator=generator)
            nll = nll + discretized_gaussian_nll_bits(x, x_hat, scale)
        return (nll / samples + kl.double() / LN2) / x[0].numel()

    @torch.no_grad()
    def sample(self, n: int, size: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
        """n images (n, C, *size) in [0, 1]: latents z ~ N(0, I) on the grid of `size`, decoded (the mean)."""
        z = _randn((n, self.cfg.quantizer.code_dim, *self.code_shape(size)), generator, self.device)
        return self.decode(z, size)
