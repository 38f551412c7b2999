import math

import pytest
import torch
import torch.nn.functional as F

from vqvae import nearest
from vqvae.quantizers import EMAVectorQuantizer, Quantized, VectorQuantizer, build_quantizer


def brute_force_distances(z, codebook):
    return torch.cdist(z.double(), codebook.double()).pow(2)  # (N, K)


def test_forward_shapes_and_values():
    vq = VectorQuantizer(10, 4)
    z_e = torch.randn(2, 4, 3, 5)
    q = vq(z_e)
    assert q.z_q.shape == z_e.shape and q.codes.shape == (2, 3, 5) and q.codes.dtype == torch.long
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.equal(q.codes.reshape(-1), brute_force_distances(flat, vq.codebook).argmin(1))
    # z_q holds the chosen codebook vectors at each position
    assert torch.allclose(q.z_q.permute(0, 2, 3, 1), vq.codebook[q.codes])
    # 1-D latents (B, D, T) give codes (B, T)
    assert vq(torch.randn(3, 4, 11)).codes.shape == (3, 11)


def test_straight_through_gradient_and_loss_formula():
    torch.manual_seed(0)
    beta = 0.37
    vq = VectorQuantizer(8, 3, commitment_weight=beta)
    z_e = torch.randn(2, 3, 4, 4, requires_grad=True)
    q = vq(z_e)
    e = vq.codebook[q.codes].permute(0, 3, 1, 2)  # (B, D, H, W)
    expected = ((z_e.detach() - e.detach()) ** 2).mean() * (1 + beta)
    assert torch.allclose(q.loss, expected)
    # Straight-through: the encoder receives exactly the gradient that arrives at z_q.
    upstream = torch.randn_like(z_e)
    (grad_z,) = torch.autograd.grad((q.z_q * upstream).sum(), z_e, retain_graph=True)
    assert torch.equal(grad_z, upstream)
    # The codebook gets nothing through z_q ...
    assert torch.autograd.grad((q.z_q * upstream).sum(), vq.codebook, allow_unused=True)[0] is None or \
        torch.count_nonzero(torch.autograd.grad((q.z_q * upstream).sum(), vq.codebook, allow_unused=True)[0]) == 0


def test_beta_scales_only_the_commitment_term():
    torch.manual_seed(1)
    z = torch.randn(4, 3, 2, 2)
    grads = {}
    for beta in (0.0, 1.0):
        vq = VectorQuantizer(6, 3, commitment_weight=beta)
        vq.codebook.data = torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
        z_e = z.clone().requires_grad_()
        q = vq(z_e)
        g_z, g_e = torch.autograd.grad(q.loss, [z_e, vq.codebook])
        grads[beta] = (g_z, g_e)
    # codebook gradient does not depend on beta; the encoder gets only beta * commitment gradient
    assert torch.allclose(grads[0.0][1], grads[1.0][1])
    assert torch.count_nonzero(grads[0.0][0]) == 0
    # codebook gradient = d/de mean((e - sg z)^2), nonzero only at selected codes
    vq = VectorQuantizer(6, 3, commitment_weight=1.0)
    vq.codebook.data = torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    q = vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    codes = q.codes.reshape(-1)
    expected = torch.zeros(6, 3).index_add_(0, codes, 2 * (vq.codebook.data[codes] - flat) / flat.numel())
    assert torch.allclose(grads[1.0][1], expected, atol=1e-6)
    unused = torch.ones(6, dtype=torch.bool)
    unused[codes] = False
    assert torch.count_nonzero(grads[1.0][1][unused]) == 0


def test_stats_perplexity_and_usage():
    vq = VectorQuantizer(4, 1)
    vq.codebook.data = torch.tensor([[0.0], [10.0], [20.0], [30.0]])
    z = torch.tensor([0.1, 0.2, 9.9, 10.1]).view(1, 1, 4)  # codes 0, 0, 1, 1
    q = vq(z)
    assert torch.equal(q.codes, torch.tensor([[0, 0, 1, 1]]))
    assert math.isclose(float(q.stats["perplexity"]), 2.0, rel_tol=1e-5)
    assert math.isclose(float(q.stats["usage"]), 0.5)


def test_output_unpacks_as_a_tuple_and_by_name():
    from vqvae.config import QuantizerConfig

    for vq in (VectorQuantizer(10, 4), build_quantizer(QuantizerConfig(codebook_size=10, code_dim=4))):
        out = vq(torch.randn(2, 4, 3, 5))
        z_q, codes, loss = out  # the peer library's call shape
        assert isinstance(out, Quantized)
        assert z_q is out.z_q and codes is out.codes and loss is out.loss
        assert set(out.stats) == {"perplexity", "usage", "commitment"}


def test_ema_update_matches_hand_computation():
    decay, eps, K = 0.9, 1e-5, 3
    vq = EMAVectorQuantizer(K, 2, decay=decay, eps=eps)
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    vq.embed_sum.copy_(vq.codebook)
    vq.cluster_size.fill_(1.0)
    z = torch.tensor([[1.0, 0.0], [-1.0, 2.0], [9.0, 1.0]])  # codes 0, 0, 1; code 2 unused
    vq.train()
    q = vq(z.t()[None])  # (1, 2, 3)
    assert q.codes.tolist() == [[0, 0, 1]]
    n_k = torch.tensor([2.0, 1.0, 0.0])
    m_k = torch.tensor([[0.0, 2.0], [9.0, 1.0], [0.0, 0.0]])
    N = decay * torch.ones(3) + (1 - decay) * n_k
    M = decay * torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]) + (1 - decay) * m_k
    total = N.sum()
    smoothed = (N + eps) / (total + K * eps) * total
    assert torch.allclose(vq.cluster_size, N)
    assert torch.allclose(vq.codebook, M / smoothed[:, None], atol=1e-6)
    # the EMA quantizer's loss is the commitment term alone, with no codebook gradient
    assert torch.allclose(q.loss, 0.25 * F.mse_loss(z, torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 0.0]])))
    # eval mode changes nothing
    before = vq.codebook.clone()
    vq.eval()
    vq(z.t()[None])
    assert torch.equal(vq.codebook, before)


def test_ema_laplace_smoothing_by_hand_and_unused_codes_stay_finite():
    decay, eps = 0.5, 0.5  # large eps: the smoothing moves every code visibly
    vq = EMAVectorQuantizer(3, 1, decay=decay, eps=eps).train()
    vq.codebook.copy_(torch.tensor([[0.0], [10.0], [20.0]]))
    vq.embed_sum.copy_(torch.tensor([[0.0], [10.0], [0.0]]))
    vq.cluster_size.copy_(torch.tensor([1.0, 1.0, 0.0]))  # code 2 has never been used
    q = vq(torch.tensor([[[0.5, 9.0, 11.0]]]))  # (1, 1, 3)
    assert q.codes.tolist() == [[0, 1, 1]]
    # N = 0.5 [1, 1, 0] + 0.5 [1, 2, 0] = [1, 1.5, 0];  M = 0.5 [0, 10, 0] + 0.5 [0.5, 20, 0] = [0.25, 15, 0]
    # smoothed N = (N + 0.5) / (2.5 + 3 * 0.5) * 2.5 = [0.9375, 1.25, 0.3125]
    assert torch.allclose(vq.cluster_size, torch.tensor([1.0, 1.5, 0.0]))
    assert torch.allclose(vq.codebook.view(-1), torch.tensor([0.25 / 0.9375, 15 / 1.25, 0.0]))
    assert torch.isfinite(vq.codebook).all()  # without smoothing, code 2 would be 0 / 0


def test_kmeans_init_finds_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [0.0, -5.0]])
    points = centres.repeat_interleave(200, 0) + 0.1 * torch.randn(600, 2, generator=gen)
    torch.manual_seed(3)
    vq = VectorQuantizer(3, 2, kmeans_init=True, kmeans_iters=20)
    assert not bool(vq.initialized)
    vq.train()
    vq(points.t()[None])
    assert bool(vq.initialized)
    # each true centre has a code within 0.1 of it
    d = torch.cdist(centres, vq.codebook.detach())
    assert (d.min(1).values < 0.1).all()
    # and a second batch does not re-initialise
    snapshot = vq.codebook.detach().clone()
    vq(torch.randn(1, 2, 50) * 100)
    assert torch.equal(vq.codebook.detach(), snapshot)


@pytest.mark.parametrize("cls", [VectorQuantizer, EMAVectorQuantizer])
def test_dead_codes_restart_from_encoder_outputs(cls):
    torch.manual_seed(0)
    vq = cls(8, 2, dead_code_steps=3)
    vq.train()
    with torch.no_grad():
        vq.codebook.data.copy_(torch.randn(8, 2) * 0.01) if cls is VectorQuantizer else vq.codebook.copy_(torch.randn(8, 2) * 0.01)
    far = torch.randn(1, 2, 64) + 100.0  # all data far away: a couple of codes win everything
    used = torch.zeros(8, dtype=torch.bool)
    for step in range(2):
        used[vq(far).codes.unique()] = True
    assert (vq.codebook.detach()[~used].norm(dim=1) < 1).all()  # not yet restarted
    used[vq(far).codes.unique()] = True  # third step without use: dead codes re-seeded from these outputs
    codebook = vq.codebook.detach()
    assert used.sum() <= 2
    assert (codebook[~used].norm(dim=1) > 50).all(), codebook
    # every restarted code is one of the batch's vectors
    d = (codebook[~used][:, None] - far[0].t()[None]).norm(dim=-1).min(1).values
    assert (d < 1e-4).all()
    assert (vq.unused_steps < 3).all()


@pytest.mark.parametrize("cls", [VectorQuantizer, EMAVectorQuantizer])
def test_dead_code_counter_counts_steps_since_last_use(cls):
    vq = cls(4, 1, dead_code_steps=5).train()
    vq._set_codes(torch.arange(4), torch.tensor([[0.0], [10.0], [20.0], [30.0]]))
    steps = [([0.1, 10.2], [0, 0, 1, 1]),  # (batch, unused steps of each code afterwards, by hand)
             ([0.3], [0, 1, 2, 2]),
             ([20.1, 0.2], [0, 2, 0, 3]),
             ([0.1], [0, 3, 1, 4])]
    for batch, expected in steps:
        vq(torch.tensor(batch).view(1, 1, -1))
        assert vq.unused_steps.tolist() == expected


def test_dead_code_restart_disabled_by_zero():
    vq = VectorQuantizer(8, 2, dead_code_steps=0)
    vq.train()
    before = vq.codebook.detach().clone()
    for _ in range(5):
        vq(torch.randn(1, 2, 16) + 100)
    assert torch.equal(vq.codebook.detach(), before)


# --- the fast paths: compiled CPU kernel and PyTorch fallback give the reference results ----------------

HAS_KERNEL = nearest.build_kernel() is not None
PATHS = [pytest.param(True, marks=pytest.mark.skipif(not HAS_KERNEL, reason="C++ kernel did not build"), id="kernel"),
         pytest.param(False, id="pytorch")]


@pytest.fixture(params=PATHS)
def use_kernel(request, monkeypatch):
    monkeypatch.setattr(nearest, "USE_KERNEL", request.param)
    return request.param


def reference_quantize(z_e, codebook, beta, ema=False):
    """The straightforward implementation the fast one replaces: rows, gather, two mse_losses, STE."""
    B, D = z_e.shape[:2]
    z = z_e.movedim(1, -1).reshape(-1, D)  # (N, D)
    codes = brute_force_distances(z.detach(), codebook.detach()).argmin(1)
    e = codebook[codes]
    loss = beta * F.mse_loss(z, e.detach()) + (0 if ema else F.mse_loss(e, z.detach()))
    z_q = z + (e - z).detach()
    return z_q.view(B, *z_e.shape[2:], D).movedim(-1, 1), codes.view(B, *z_e.shape[2:]), loss


@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (3, 5, 100), (1, 5, 70, 3)])  # items shorter / longer than a block
def test_forward_and_gradients_match_reference(use_kernel, shape):
    gen = torch.Generator().manual_seed(0)
    beta = 0.3
    vq = VectorQuantizer(40, shape[1], commitment_weight=beta)
    vq.codebook.data = torch.randn(40, shape[1], generator=gen)
    z_e = torch.randn(*shape, generator=gen, requires_grad=True)
    upstream = torch.randn(*shape, generator=gen)
    q = vq(z_e)
    grads = torch.autograd.grad(q.loss + (q.z_q * upstream).sum(), [z_e, vq.codebook])
    ref_z_q, ref_codes, ref_loss = reference_quantize(z_e, vq.codebook, beta)
    ref_grads = torch.autograd.grad(ref_loss + (ref_z_q * upstream).sum(), [z_e, vq.codebook])
    assert torch.equal(q.codes, ref_codes)
    assert torch.allclose(q.z_q, ref_z_q, atol=1e-6) and torch.allclose(q.loss, ref_loss, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_second_backward_with_retain_graph_gives_the_same_gradient(use_kernel):
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4)
    z_e = torch.randn(2, 4, 8, 8, requires_grad=True)
    q = vq(z_e)
    total = q.loss + q.z_q.square().sum()
    first = torch.autograd.grad(total, [z_e, vq.codebook], retain_graph=True)
    second = torch.autograd.grad(total, [z_e, vq.codebook])
    for a, b in zip(first, second):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_ema_update_and_stats_same_on_both_paths(monkeypatch):
    if not HAS_KERNEL:
        pytest.skip("C++ kernel did not build")
    z_e = torch.randn(4, 8, 9, 9, generator=torch.Generator().manual_seed(5))
    results = []
    for use in (True, False):
        monkeypatch.setattr(nearest, "USE_KERNEL", use)
        torch.manual_seed(0)
        vq = EMAVectorQuantizer(32, 8, decay=0.9).train()
        q = vq(z_e)
        results.append((q.codes, q.loss, q.stats["perplexity"], vq.codebook.clone(), vq.embed_sum.clone()))
    for a, b in zip(*results):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)


def test_channels_last_memory_format_and_low_precision_inputs(use_kernel):
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 8)
    z_e = torch.randn(2, 8, 5, 6)
    codes = vq(z_e).codes
    assert torch.equal(vq(z_e.to(memory_format=torch.channels_last)).codes, codes)
    q = vq(z_e.to(torch.bfloat16))
    assert q.z_q.dtype == torch.bfloat16 and q.z_q.shape == z_e.shape
    assert torch.equal(q.z_q.float(), vq.codebook.detach()[q.codes].permute(0, 3, 1, 2).bfloat16().float())


def test_empty_batch(use_kernel):
    q = VectorQuantizer(8, 4)(torch.randn(0, 4, 3, 3))
    assert q.codes.shape == (0, 3, 3) and q.z_q.shape == (0, 4, 3, 3)


def test_workspace_reused_only_once_outputs_are_gone(use_kernel):
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4)
    z1, z2 = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8) + 3
    q1 = vq(z1.requires_grad_())
    kept = q1.z_q.detach().clone()
    vq(z2)  # q1 (its z_q, and the graph holding z - z_q) is still alive: must not be overwritten
    assert torch.equal(q1.z_q.detach(), kept)
    grad = torch.autograd.grad(q1.loss + q1.z_q.sum(), z1)[0]
    assert torch.allclose(grad, 1 + 2 * 0.25 * (z1 - kept).detach() / z1.numel(), atol=1e-6)
    if use_kernel:
        del q1, grad
        first = vq(z1.detach()).z_q.data_ptr()  # the buffer of the output just dropped is free again
        assert vq(z2).z_q.data_ptr() == first


# --- layouts and dtypes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [VectorQuantizer, EMAVectorQuantizer])
@pytest.mark.parametrize("spatial", [(7,), (3, 5)])  # (B, N, D) as a transformer holds it, and (B, H, W, D)
def test_channels_last_gives_the_channels_first_result(use_kernel, cls, spatial):
    torch.manual_seed(0)
    first, last = cls(16, 4, dead_code_steps=2).train(), cls(16, 4, dead_code_steps=2, channels_last=True).train()
    last.load_state_dict(first.state_dict())
    z = torch.randn(2, 4, *spatial)  # (B, D, *S)
    z_first, z_last = z.clone().requires_grad_(), z.movedim(1, -1).clone().requires_grad_()  # (B, *S, D)
    upstream = torch.randn(z.shape)
    a, b = first(z_first), last(z_last)
    assert b.z_q.shape == z_last.shape and b.codes.shape == (2, *spatial)
    assert torch.equal(b.codes, a.codes)
    assert torch.equal(b.z_q, a.z_q.movedim(1, -1))
    assert torch.equal(b.loss, a.loss)
    (grad_first,) = torch.autograd.grad(a.loss + (a.z_q * upstream).sum(), z_first)
    (grad_last,) = torch.autograd.grad(b.loss + (b.z_q * upstream.movedim(1, -1)).sum(), z_last)
    assert torch.equal(grad_last, grad_first.movedim(1, -1))
    assert torch.equal(last.codebook, first.codebook)  # the same training-time updates (EMA, restarts)


def test_wrong_layout_is_refused_with_the_expected_shape():
    with pytest.raises(ValueError, match=r"\(B, D, \*S\).*channels_last=True.*\(2, 7, 4\)"):
        VectorQuantizer(16, 4)(torch.randn(2, 7, 4))
    with pytest.raises(ValueError, match=r"\(B, \*S, D\) with D = 4, got shape \(2, 4, 7\)"):
        VectorQuantizer(16, 4, channels_last=True)(torch.randn(2, 4, 7))


@pytest.mark.parametrize("cls", [VectorQuantizer, EMAVectorQuantizer])
def test_float64_quantizer_matches_brute_force_and_reference_gradients(use_kernel, cls):
    gen = torch.Generator().manual_seed(0)
    beta, ema = 0.3, cls is EMAVectorQuantizer
    vq = cls(40, 5, commitment_weight=beta).double().train()
    vq._set_codes(torch.arange(40), torch.randn(40, 5, generator=gen, dtype=torch.float64))
    codebook = vq.embeddings.detach().clone()  # before this step's EMA update
    z_e = torch.randn(2, 5, 6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(z_e.shape, generator=gen, dtype=torch.float64)
    q = vq(z_e)
    assert q.z_q.dtype == q.loss.dtype == torch.float64
    rows = z_e.detach().movedim(1, -1).reshape(-1, 5)
    # float64 distances: gaps between the two nearest codes are far above rounding, so argmin is exact
    assert torch.equal(q.codes.view(-1), torch.cdist(rows, codebook).argmin(1))
    assert torch.equal(q.z_q.detach().movedim(1, -1), codebook[q.codes])
    reference_codebook = codebook.requires_grad_() if ema else vq.codebook
    ref_z_q, _, ref_loss = reference_quantize(z_e, reference_codebook, beta, ema=ema)
    assert torch.allclose(q.loss, ref_loss, rtol=1e-12)
    inputs = [z_e] if ema else [z_e, vq.codebook]
    grads = torch.autograd.grad(q.loss + (q.z_q * upstream).sum(), inputs)
    ref_grads = torch.autograd.grad(ref_loss + (ref_z_q * upstream).sum(), inputs)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.float64 and torch.allclose(got, want, rtol=1e-12, atol=1e-15)
    if ema:
        assert vq.cluster_size.dtype == torch.float64 and torch.isfinite(vq.codebook).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_codebook_is_refused(dtype):
    for vq in (VectorQuantizer(8, 4).to(dtype), EMAVectorQuantizer(8, 4).to(dtype)):
        with pytest.raises(TypeError, match=f"codebook dtype {dtype} is not supported.*autocast"):
            vq(torch.randn(1, 4, 3, dtype=dtype))


def test_autocast_keeps_the_search_in_float32(use_kernel):
    torch.manual_seed(0)
    vq = VectorQuantizer(64, 8)
    z_e = torch.randn(2, 8, 5, 5)
    expected = vq(z_e)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = vq(z_e)
    assert q.loss.dtype == torch.float32 and q.z_q.dtype == torch.float32
    assert torch.equal(q.codes, expected.codes) and torch.equal(q.z_q, expected.z_q)


@pytest.mark.parametrize("cls", [VectorQuantizer, EMAVectorQuantizer])
@pytest.mark.parametrize("channels_last", [False, True])
def test_lookup_gives_the_z_q_of_the_codes(cls, channels_last):
    torch.manual_seed(0)
    vq = cls(16, 4, channels_last=channels_last).eval()
    z = torch.randn(2, 3, 5, 4) if channels_last else torch.randn(2, 4, 3, 5)
    q = vq(z)
    assert torch.equal(vq.lookup(q.codes), q.z_q)


def test_build_quantizer_builds_every_kind():
    from vqvae.config import QuantizerConfig
    from vqvae.quantizer_variants import FiniteScalarQuantizer, GumbelQuantizer, ResidualVectorQuantizer

    expected = {"vq": VectorQuantizer, "ema": EMAVectorQuantizer, "fsq": FiniteScalarQuantizer,
                "rvq": ResidualVectorQuantizer, "gumbel": GumbelQuantizer}
    for kind, cls in expected.items():
        sizes = dict(levels=(4, 4), code_dim=2, codebook_size=16) if kind == "fsq" else dict(codebook_size=16)
        quantizer = build_quantizer(QuantizerConfig(kind=kind, **sizes))
        assert type(quantizer) is cls and quantizer.codebook_size == 16
