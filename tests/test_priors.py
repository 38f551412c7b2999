"""Tests for vqvae.priors: causality, normalisation, cache == full pass, sampling, training, save/load."""

import itertools
import json
import math

import pytest
import torch

from vqvae.config import PriorConfig
from vqvae.errors import ConfigError, RunError
from vqvae.priors import (
    PixelCNNPrior, TransformerPrior, build_prior, load_prior, prior_bits, sample_from_logits,
)

ARCHS = ["transformer", "pixelcnn"]


def tiny(arch, grid=(3, 4), K=5, num_classes=0, **kw):
    torch.manual_seed(0)
    cfg = PriorConfig(arch=arch, codebook_size=K, grid=grid, num_classes=num_classes,
                      n_layer=2, n_head=2, n_embd=16, **kw)
    return build_prior(cfg).eval()


def random_codes(prior, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, prior.cfg.codebook_size, (n, *prior.cfg.grid), generator=g)


def labels(prior, n):
    return torch.arange(n) % prior.cfg.num_classes if prior.cfg.num_classes else None


def flat(logits):  # (B, K, *grid) -> (B, L, K) in raster order
    return logits.flatten(2).transpose(1, 2)


def greedy_by_full_passes(prior, n, cond):
    """Independent reference: decode position by position with a full `logits` pass each time."""
    codes = torch.zeros(n, prior.seq_len, dtype=torch.long)
    with torch.no_grad():
        for t in range(prior.seq_len):
            logits = flat(prior.logits(codes.view(n, *prior.cfg.grid), cond))[:, t]
            codes[:, t] = logits.argmax(-1)
    return codes.view(n, *prior.cfg.grid)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("grid", [(3, 4), (7,)])
@pytest.mark.parametrize("num_classes", [0, 3])
def test_causality(arch, grid, num_classes):
    prior = tiny(arch, grid, num_classes=num_classes)
    codes = random_codes(prior, 2).view(2, -1)
    cond = labels(prior, 2)
    with torch.no_grad():
        base = flat(prior.logits(codes.view(2, *grid), cond))  # (B, L, K)
        for t in range(prior.seq_len):
            changed = codes.clone()
            changed[:, t] = (changed[:, t] + 1) % prior.cfg.codebook_size
            out = flat(prior.logits(changed.view(2, *grid), cond))
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=1e-5, rtol=0)
            if t + 1 < prior.seq_len:  # random init: the next position does see code t
                assert (out[:, t + 1 :] - base[:, t + 1 :]).abs().max() > 1e-6


def influence(prior):
    """Brute force: seen[t, s] is True when changing code s changes the logits at position t.

    float64 and a 1e-12 threshold, over 4 random grids, so that a weak but real path (the one tap at
    the edge of the reach, or a ReLU of the head inactive for one grid) is not taken for no path.
    """
    prior = prior.double()
    L, K, grid = prior.seq_len, prior.cfg.codebook_size, prior.cfg.grid
    codes = torch.randint(0, K, (4, L), generator=torch.Generator().manual_seed(1))
    seen = torch.zeros(L, L, dtype=torch.bool)
    with torch.no_grad():
        base = prior.logits(codes.view(4, *grid)).flatten(2)  # (B, K, L)
        for s in range(L):
            changed = codes.clone()
            changed[:, s] = (changed[:, s] + 1) % K
            seen[:, s] = (prior.logits(changed.view(4, *grid)).flatten(2) - base).abs().amax((0, 1)) > 1e-12
    return seen


def earlier(L):
    return torch.ones(L, L, dtype=torch.bool).tril(-1)  # [t, s]: s < t


@pytest.mark.parametrize("grid", [(12,), (3, 12), (7, 7)])
def test_pixelcnn_every_earlier_code_reaches_every_later_one(grid):
    torch.manual_seed(0)
    prior = build_prior(PriorConfig(arch="pixelcnn", codebook_size=5, grid=grid, n_layer=4, n_embd=32)).eval()
    assert torch.equal(influence(prior), earlier(prior.seq_len))  # all earlier codes, no later one


@pytest.mark.parametrize("dilated,n_layer,grid", [
    (False, 4, (12,)), (False, 2, (7, 7)), (False, 4, (5, 16)),
    (True, 2, (12,)), (True, 3, (40,)), (True, 3, (4, 20)), (True, 1, (3, 6)),
])
def test_pixelcnn_reach_is_what_its_docstring_says(dilated, n_layer, grid):
    """Position (i, j) sees (i, j-R..j-1) and rows i-R..i-1 within columns j-R+1..j+R-1, R = prior.reach."""
    torch.manual_seed(0)
    prior = build_prior(PriorConfig(arch="pixelcnn", codebook_size=5, grid=grid, n_layer=n_layer, n_embd=32,
                                    dilated=dilated)).eval()
    R, (H, W) = prior.reach, prior.hw
    if not dilated:
        assert prior.dilations == [1] * n_layer and R == n_layer + 3
    expected = torch.zeros(H * W, H * W, dtype=torch.bool)
    for (ti, tj), (si, sj) in itertools.product(itertools.product(range(H), range(W)), repeat=2):
        expected[ti * W + tj, si * W + sj] = ((si == ti and 0 < tj - sj <= R)
                                              or (0 < ti - si <= R and abs(tj - sj) <= R - 1))
    assert torch.equal(influence(prior), expected)
    if grid == (12,) and not dilated:  # the undilated 4-layer stack misses 10 of the 66 pairs
        assert int((earlier(12) & ~expected).sum()) == 10


def test_pixelcnn_config_without_dilated_loads_the_undilated_prior(tmp_path):
    torch.manual_seed(0)
    old = build_prior(PriorConfig(arch="pixelcnn", codebook_size=5, grid=(12,), num_classes=2, n_layer=4,
                                  n_embd=16, dilated=False)).eval()
    old.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["dilated"]  # as written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_prior(tmp_path)
    assert loaded.cfg.dilated is False and loaded.dilations == [1, 1, 1, 1] and loaded.reach == 7
    codes, cond = random_codes(old, 3), torch.tensor([0, 1, 0])
    with torch.no_grad():
        assert torch.equal(loaded.logits(codes, cond), old.logits(codes, cond))
    # a prior made now is dilated, and says so in its config
    new = tiny("pixelcnn", grid=(12,))
    new.save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "config.json").read_text())["dilated"] is True
    assert load_prior(tmp_path / "new").dilations == new.dilations != [1, 1]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("grid", [(2, 2), (4,)])
@pytest.mark.parametrize("num_classes", [0, 2])
def test_log_prob_sums_to_one_over_all_grids(arch, grid, num_classes):
    prior = tiny(arch, grid, K=3, num_classes=num_classes)
    every = torch.tensor(list(itertools.product(range(3), repeat=4))).view(81, *grid)
    for label in range(max(num_classes, 1)):
        cond = torch.full((81,), label) if num_classes else None
        with torch.no_grad():
            total = prior.log_prob(every, cond).exp().sum().item()
        assert total == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("grid", [(3, 4), (6,)])
@pytest.mark.parametrize("num_classes", [0, 3])
def test_step_by_step_equals_full_pass(arch, grid, num_classes):
    prior = tiny(arch, grid, num_classes=num_classes)
    codes = random_codes(prior, 3)
    cond = labels(prior, 3)
    state = prior.start(3, cond)
    steps, prev = [], None
    for t in range(prior.seq_len):
        logits, state = prior.step(state, prev)
        steps.append(logits)
        prev = codes.view(3, -1)[:, t]
    with torch.no_grad():
        full = flat(prior.logits(codes, cond))
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="finished"):
        prior.step(state, prev)


@pytest.mark.parametrize("arch", ARCHS)
def test_sampled_sequences_match_full_pass(arch):
    """Sampling through the cache draws from the same distribution a full pass gives for its output."""
    prior = tiny(arch, num_classes=3)
    cond = labels(prior, 4)
    codes = prior.sample(4, cond, generator=torch.Generator().manual_seed(5))
    # replay the draw by hand, keeping the logits each step returned
    g, state, prev, rows, drawn = torch.Generator().manual_seed(5), prior.start(4, cond), None, [], []
    for _ in range(prior.seq_len):
        logits, state = prior.step(state, prev)
        prev = sample_from_logits(logits, generator=g)
        rows.append(logits)
        drawn.append(prev)
    assert torch.equal(torch.stack(drawn, 1), codes.view(4, -1))
    with torch.no_grad():
        full = flat(prior.logits(codes, cond))
    torch.testing.assert_close(torch.stack(rows, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_sample_reproducible_and_in_range(arch):
    prior = tiny(arch)
    a = prior.sample(6, generator=torch.Generator().manual_seed(3))
    b = prior.sample(6, generator=torch.Generator().manual_seed(3))
    c = prior.sample(6, generator=torch.Generator().manual_seed(4))
    assert a.shape == (6, 3, 4) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0 <= int(a.min()) and int(a.max()) < prior.cfg.codebook_size


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("num_classes", [0, 3])
def test_greedy_and_top1_equal_argmax_path(arch, num_classes):
    prior = tiny(arch, num_classes=num_classes)
    cond = labels(prior, 3)
    reference = greedy_by_full_passes(prior, 3, cond)
    assert torch.equal(prior.sample(3, cond, temperature=0), reference)
    top1 = prior.sample(3, cond, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(top1, reference)


def test_sample_from_logits_top_k_and_temperature():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    drawn = sample_from_logits(logits, top_k=2, generator=g)
    assert set(drawn.tolist()) == {2, 3}
    frac3 = (drawn == 3).float().mean().item()
    assert frac3 == pytest.approx(math.e / (1 + math.e), abs=0.04)  # softmax over the kept two
    cold = sample_from_logits(logits, temperature=0.05, generator=g)
    assert (cold == 3).all()
    with pytest.raises(ValueError, match="temperature"):
        sample_from_logits(logits, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        sample_from_logits(logits, top_k=0)


def structured_codes(n, K, grid, generator):
    """Each grid is a diagonal ramp (c + row + col) % K: the first code determines the rest."""
    H, W = (1, grid[0]) if len(grid) == 1 else grid
    c = torch.randint(0, K, (n, 1, 1), generator=generator)
    ramp = torch.arange(H)[:, None] + torch.arange(W)[None, :]
    return ((c + ramp) % K).view(n, *grid)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("num_classes", [0, 4])
def test_short_training_lowers_nll(arch, num_classes):
    K, grid = 8, (4, 4)
    torch.manual_seed(0)
    cfg = PriorConfig(arch=arch, codebook_size=K, grid=grid, num_classes=num_classes,
                      n_layer=2, n_head=2, n_embd=32)
    prior = build_prior(cfg).train()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    for _ in range(200):
        codes = structured_codes(64, K, grid, g)
        # conditional variant: the label is the first code's parity, so it carries one bit of it
        cond = codes.view(64, -1)[:, 0] % num_classes if num_classes else None
        loss = prior.loss(codes, cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    test = structured_codes(256, K, grid, g)
    cond = test.view(256, -1)[:, 0] % num_classes if num_classes else None
    bits_per_latent = float(prior_bits(prior, test, cond, batch_size=100).mean()) / 16
    # a perfect model pays log2(K) bits for the first code only (less given the label)
    assert bits_per_latent < 0.15 * math.log2(K)  # measured 0.06-0.2; log2(K) = 3
    assert prior.training  # prior_bits restored the mode


@pytest.mark.parametrize("arch", ARCHS)
def test_prior_bits_with_labels_matches_log_prob(arch):
    prior = tiny(arch, num_classes=3)
    codes = random_codes(prior, 10).to(torch.int16)  # stored codes are int16
    cond = labels(prior, 10)
    bits = prior_bits(prior, codes, cond, batch_size=4)
    with torch.no_grad():
        nats = -prior.log_prob(codes.long(), cond).double()
    assert torch.allclose(bits, nats / math.log(2), rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_is_mean_cross_entropy_per_latent(arch):
    prior = tiny(arch)
    codes = random_codes(prior, 5)
    with torch.no_grad():
        assert prior.loss(codes).item() == pytest.approx(-prior.log_prob(codes).mean().item() / 12, rel=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_identical_logits(arch, tmp_path):
    prior = tiny(arch, grid=(3, 4), num_classes=3)
    codes, cond = random_codes(prior, 4), labels(prior, 4)
    prior.save_pretrained(tmp_path / "prior")
    assert sorted(p.name for p in (tmp_path / "prior").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_prior(tmp_path / "prior")
    assert type(loaded) is type(prior) and loaded.cfg == prior.cfg and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded.logits(codes, cond), prior.logits(codes, cond))
    cls = TransformerPrior if arch == "transformer" else PixelCNNPrior
    assert type(cls.from_pretrained(tmp_path / "prior")) is cls
    other = PixelCNNPrior if arch == "transformer" else TransformerPrior
    with pytest.raises(RunError, match="not a"):
        other.from_pretrained(tmp_path / "prior")


def test_load_errors(tmp_path):
    with pytest.raises(RunError, match="missing"):
        load_prior(tmp_path)
    prior = tiny("transformer")
    prior.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(RunError, match="cannot load"):
        load_prior(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(RunError, match="not a vqvae prior config"):
        load_prior(tmp_path)


@pytest.mark.parametrize("arch", ARCHS)
def test_bad_inputs_raise_clear_errors(arch):
    uncond, cond = tiny(arch), tiny(arch, num_classes=3)
    codes = random_codes(uncond, 2)
    with pytest.raises(ValueError, match="unconditional"):
        uncond.logits(codes, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="class-conditional"):
        cond.sample(2)
    with pytest.raises(ValueError, match="cond must be int64"):
        cond.logits(codes, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        cond.sample(2, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="codes must be int64"):
        uncond.logits(codes[:, :2])
    with pytest.raises(ValueError, match="None on the first step"):
        uncond.step(uncond.start(2), codes.view(2, -1)[:, 0])
    dropout = build_prior(PriorConfig(arch=arch, codebook_size=5, grid=(3, 4), n_layer=1, n_head=2,
                                      n_embd=16, dropout=0.1))
    with pytest.raises(RuntimeError, match="eval"):
        dropout.start(2)
    assert dropout.sample(2).shape == (2, 3, 4) and dropout.training  # sample switches to eval and back


def test_prior_bits_matches_log_prob_and_marginalises_classes():
    torch.manual_seed(0)
    codes = torch.randint(0, 5, (6, 2, 3))
    plain = build_prior(PriorConfig(codebook_size=5, grid=(2, 3), n_layer=1, n_head=1, n_embd=8)).eval()
    assert torch.allclose(prior_bits(plain, codes, batch_size=4), -plain.log_prob(codes).double() / math.log(2),
                          atol=1e-5)
    conditional = build_prior(PriorConfig(codebook_size=5, grid=(2, 3), num_classes=3, n_layer=1, n_head=1,
                                          n_embd=8)).eval()
    per_class = torch.stack([conditional.log_prob(codes, torch.full((6,), y)) for y in range(3)]).double()
    expected = -(per_class.exp().mean(0)).log() / math.log(2)
    assert torch.allclose(prior_bits(conditional, codes), expected, atol=1e-5)


# -- residual-VQ stages: one sequence of S grids, stage after stage ------------------------------------


def staged(S=3, grid=(2, 3), K=4, num_classes=0):
    return tiny("transformer", grid, K=K, num_classes=num_classes, stages=S)


def test_stages_step_by_step_equals_full_pass_and_every_stage_prefix_is_causal():
    prior = staged(num_classes=2)
    codes = torch.randint(0, 4, (3, *prior.code_shape), generator=torch.Generator().manual_seed(0))  # (B, S, H, W)
    cond = torch.tensor([0, 1, 1])
    with torch.no_grad():
        full = flat(prior.logits(codes, cond))  # (B, S * L, K), stage-major
        state, prev, rows = prior.start(3, cond), None, []
        for t, code in enumerate(codes.flatten(1).T):
            logits, state = prior.step(state, prev)
            rows.append(logits)
            prev = code
        torch.testing.assert_close(torch.stack(rows, 1), full, atol=1e-5, rtol=1e-5)  # same math, other grouping
        for t in range(prior.seq_len):  # a code changes no logits at or before its own position
            changed = codes.flatten(1).clone()
            changed[:, t] = (changed[:, t] + 1) % 4
            after = flat(prior.logits(changed.view_as(codes), cond))
            assert torch.equal(after[:, : t + 1], full[:, : t + 1])


def test_stages_probabilities_sum_to_one_and_prefixes_are_marginals():
    """Brute force over every code sequence of a tiny staged prior: p sums to 1 over all S-stage codes, and
    summing out the last stage gives the probability the first S - 1 stages' logits assign (a prefix)."""
    prior = staged(S=2, grid=(1, 2), K=3)
    every = torch.tensor(list(itertools.product(range(3), repeat=4))).view(-1, *prior.code_shape)  # (81, 2, 1, 2)
    with torch.no_grad():
        log_p = prior.log_prob(every)
        assert float(torch.logsumexp(log_p, 0)) == pytest.approx(0.0, abs=1e-5)
        prefix = torch.log_softmax(flat(prior.logits(every)), -1)[:, :2]  # (81, 2, K): the stage-0 positions
        log_p0 = prefix.gather(-1, every[:, 0].flatten(1)[..., None]).sum((1, 2))
        marginal = torch.logsumexp(log_p.view(9, 9), 1)  # sum over the stage-1 codes of each stage-0 grid
        torch.testing.assert_close(marginal, log_p0.view(9, 9)[:, 0], atol=1e-5, rtol=0)


def test_stages_sample_shapes_and_save_load(tmp_path):
    prior = staged()
    g = torch.Generator().manual_seed(0)
    codes = prior.sample(5, generator=g)
    assert codes.shape == (5, 3, 2, 3) and int(codes.min()) >= 0 and int(codes.max()) < 4
    prior.save_pretrained(tmp_path)
    again = load_prior(tmp_path)
    assert again.cfg.stages == 3
    with torch.no_grad():
        assert torch.equal(again.logits(codes), prior.logits(codes))
    with pytest.raises(ValueError, match=r"\(B, 3, 2, 3\)"):
        prior.log_prob(codes[:, 0])


def test_stages_need_the_transformer():
    with pytest.raises(ConfigError, match="stages"):
        PriorConfig(arch="pixelcnn", stages=2)
    with pytest.raises(ConfigError, match="stages"):
        PriorConfig(stages=-1)


@pytest.mark.parametrize("arch", ["transformer", "pixelcnn"])
@pytest.mark.parametrize("guidance", [0.0, 2.5])
def test_guided_sampling_uses_the_priors_own_class_posterior(arch, guidance, monkeypatch):
    """The guided logits of every step, checked against a brute-force Bayes computation from full passes:
    log p(z_t | y, z_<t) + (w - 1) (log p(z_t | y, z_<t) - log sum_y' p(y' | z_<t) p(z_t | y', z_<t))."""
    import vqvae.priors as priors_module

    torch.manual_seed(0)
    Y, K = 3, 5
    prior = build_prior(PriorConfig(arch=arch, codebook_size=K, grid=(2, 2), num_classes=Y, n_layer=2, n_head=2,
                                    n_embd=16)).eval()
    seen = []
    plain = priors_module.sample_from_logits
    monkeypatch.setattr(priors_module, "sample_from_logits",
                        lambda logits, *a: seen.append(logits.clone()) or plain(logits, *a))
    cond = torch.tensor([0, 2, 1, 2])
    codes = prior.sample(4, cond, generator=torch.Generator().manual_seed(1), guidance=guidance).flatten(1)  # (4, 4)
    assert len(seen) == 4
    with torch.no_grad():  # log p(z_t = k | y, z_<t) for every class, from full passes (causal: prefixes suffice)
        log_p = torch.stack([torch.log_softmax(prior.logits(codes.view(4, 2, 2), torch.full((4,), y)).flatten(2), 1)
                             for y in range(Y)], 1)  # (4, Y, K, 4)
    for t, logits in enumerate(seen):
        own = log_p[torch.arange(4), cond, :, t]  # (4, K)
        prefix = log_p[..., :t].gather(2, codes[:, None, None, :t].expand(4, Y, 1, t)).sum((2, 3))  # (4, Y)
        posterior = prefix - torch.logsumexp(prefix, 1, keepdim=True)  # log p(y' | z_<t)
        marginal = torch.logsumexp(posterior[..., None] + log_p[..., t], 1)  # (4, K)
        expected = own + (guidance - 1) * (own - marginal)
        assert torch.allclose(logits, expected, atol=1e-4), t


def test_guidance_needs_classes_and_one_is_plain_sampling():
    torch.manual_seed(0)
    prior = build_prior(PriorConfig(codebook_size=8, grid=(3, 3), num_classes=2, n_layer=1, n_head=2, n_embd=16))
    cond = torch.tensor([1, 0, 1])
    plain = prior.sample(3, cond, generator=torch.Generator().manual_seed(4))
    assert torch.equal(prior.sample(3, cond, generator=torch.Generator().manual_seed(4), guidance=1.0), plain)
    with pytest.raises(ValueError, match="guidance must be >= 0"):
        prior.sample(3, cond, guidance=-1.0)
    unconditional = build_prior(PriorConfig(codebook_size=8, grid=(3, 3), n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="needs a class-conditional prior"):
        unconditional.sample(2, guidance=2.0)
