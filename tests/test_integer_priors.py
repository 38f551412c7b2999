"""Tests for vqvae.integer_priors: exact frequencies whatever the path, batch grouping, thread count or
device; the integer arithmetic against references; quality against the float prior; save/load."""

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vqvae
from vqvae.config import PriorConfig
from vqvae.errors import ConfigError, RunError
from vqvae.fixedpoint import PRECISION, QLinear
from vqvae.integer_priors import IntegerPrior, load_integer_prior
from vqvae.priors import build_prior, prior_bits

ARCHS = ["transformer", "pixelcnn"]
K, GRID = 12, (4, 5)


def structured_codes(n, generator, num_classes=0, grid=GRID):
    """A ramp (c + row + 2 col) % K with 20% of the codes replaced at random; label c % num_classes."""
    H, W = grid
    c = torch.randint(0, K, (n, 1, 1), generator=generator)
    ramp = (c + torch.arange(H)[:, None] + 2 * torch.arange(W)[None, :]) % K
    noise = torch.randint(0, K, (n, H, W), generator=generator)
    codes = torch.where(torch.rand(n, H, W, generator=generator) < 0.2, noise, ramp)
    return codes, (c.view(n) % num_classes if num_classes else None)


@functools.lru_cache(maxsize=None)
def trained(arch, num_classes):
    """(float prior, integer prior) after 250 training steps on structured codes (a few seconds)."""
    torch.manual_seed(0)
    cfg = PriorConfig(arch=arch, codebook_size=K, grid=GRID, num_classes=num_classes,
                      n_layer=2, n_head=2, n_embd=32)
    prior = build_prior(cfg).train()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    for _ in range(250):
        codes, cond = structured_codes(64, g, num_classes)
        loss = prior.loss(codes, cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    prior.eval()
    codes, cond = structured_codes(1024, g, num_classes)
    return prior, IntegerPrior.from_prior(prior, codes, cond)


def held_out(num_classes, n=64, seed=7):
    return structured_codes(n, torch.Generator().manual_seed(seed), num_classes)


def step_by_step(iprior, codes, cond, chunk=None):
    """Frequencies (B, L, K) through start/step, fed the given codes."""
    flat = codes.flatten(1)
    state, prev, rows = iprior.start(len(flat), cond), None, []
    for t in range(iprior.seq_len):
        freqs, state = iprior.step(state, prev)
        rows.append(freqs)
        prev = flat[:, t]
    return torch.stack(rows, 1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("num_classes", [0, 3])
def test_step_by_step_equals_full_pass_exactly(arch, num_classes):
    _, iprior = trained(arch, num_classes)
    codes, cond = held_out(num_classes, 6)
    codes[0] = torch.randint(0, K, GRID, generator=torch.Generator().manual_seed(3))  # off the training pattern
    full = iprior.frequencies(codes, cond)
    assert full.dtype == torch.long and full.shape == (6, iprior.seq_len, K)
    assert torch.equal(step_by_step(iprior, codes, cond), full)
    state = iprior.start(6, cond)
    with pytest.raises(ValueError, match="prev_codes"):
        iprior.step(state, codes.flatten(1)[:, 0])
    for t in range(iprior.seq_len):
        _, state = iprior.step(state, None if t == 0 else codes.flatten(1)[:, t - 1])
    with pytest.raises(RuntimeError, match="finished"):
        iprior.step(state, codes.flatten(1)[:, 0])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("num_classes", [0, 3])
def test_frequencies_do_not_depend_on_the_batch(arch, num_classes):
    _, iprior = trained(arch, num_classes)
    codes, cond = held_out(num_classes, 16)
    whole = iprior.frequencies(codes, cond)
    for sizes in ([1] * 16, [5, 3, 8], [16]):
        parts, start = [], 0
        for size in sizes:
            c = None if cond is None else cond[start:start + size]
            parts.append(iprior.frequencies(codes[start:start + size], c))
            start += size
        assert torch.equal(torch.cat(parts), whole)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    shuffled = step_by_step(iprior, codes[order], None if cond is None else cond[order])
    assert torch.equal(shuffled, whole[order])


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_are_valid_and_bits_are_their_information(arch):
    _, iprior = trained(arch, 3)
    codes, cond = held_out(3, 10)
    freqs = iprior.frequencies(codes, cond)
    assert int(freqs.min()) >= 1
    assert bool((freqs.sum(-1) == 1 << PRECISION).all())
    expected = [sum(-math.log2(int(freqs[b, t, int(code)]) / 2**PRECISION)
                    for t, code in enumerate(codes[b].flatten().tolist())) for b in range(10)]
    bits = iprior.bits(codes, cond, batch_size=3)
    assert bits.dtype == torch.float64
    assert bits.tolist() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("num_classes", [0, 3])
def test_bits_within_two_percent_of_the_float_prior(arch, num_classes):
    prior, iprior = trained(arch, num_classes)
    codes, cond = held_out(num_classes, 512, seed=11)
    float_bits = float(prior_bits(prior, codes, cond).mean())
    integer_bits = float(iprior.bits(codes, cond).mean())
    assert integer_bits == pytest.approx(float_bits, rel=0.02)  # measured: within 0.01%
    uniform = iprior.seq_len * math.log2(K)
    assert float_bits < 0.7 * uniform  # the prior did learn something, so the comparison means something


@pytest.mark.parametrize("arch", ARCHS)
def test_probabilities_follow_the_float_prior(arch):
    """Each integer probability is the float softmax's, up to the fixed point's resolution."""
    prior, iprior = trained(arch, 3)
    codes, cond = held_out(3, 8)
    with torch.no_grad():
        p = torch.softmax(prior.logits(codes, cond).double(), 1).flatten(2).transpose(1, 2)  # (B, L, K)
    q = iprior.frequencies(codes, cond).double() / 2**PRECISION
    # measured 5e-5 (transformer) and 2e-5 (pixelcnn): mostly the 20-bit residual stream; 2**-24 from rounding
    assert float((q - p).abs().max()) < 2e-4


def test_dilated_pixelcnn_follows_the_float_prior():
    """On an 8x8 grid the second layer is dilated (by 4): the integer taps must land where the float ones do."""
    torch.manual_seed(0)
    cfg = PriorConfig(arch="pixelcnn", codebook_size=8, grid=(8, 8), num_classes=2, n_layer=3, n_embd=16)
    prior = build_prior(cfg).eval()
    assert max(prior.dilations) > 1
    with torch.no_grad():  # random weights, scaled up so that the probabilities are far from uniform
        for name, p in prior.named_parameters():
            p.mul_(2.0 if "weight" in name else 1.0)
    codes = torch.randint(0, 8, (40, 8, 8), generator=torch.Generator().manual_seed(1))
    cond = torch.arange(40) % 2
    iprior = IntegerPrior.from_prior(prior, codes, cond)
    with torch.no_grad():
        p = torch.softmax(prior.logits(codes[:6], cond[:6]).double(), 1).flatten(2).transpose(1, 2)
    assert float(p.max(-1).values.mean()) > 0.3  # uniform would be 0.125
    full = iprior.frequencies(codes[:6], cond[:6])
    # measured 3e-5; the same model with layer 1 undilated is off by 0.26
    assert float((full.double() / 2**PRECISION - p).abs().max()) < 1e-3
    assert torch.equal(step_by_step(iprior, codes[:6], cond[:6]), full)


def thread_hash_script(directory, codes_path, threads, mkldnn):
    return f"""
import hashlib, torch
torch.set_num_threads({threads})
torch.backends.mkldnn.enabled = {mkldnn}
from vqvae.integer_priors import load_integer_prior
from safetensors.torch import load_file
iprior = load_integer_prior({str(directory)!r})
data = load_file({str(codes_path)!r})
cond = data.get("cond")
digest = hashlib.sha256()
for freqs in (iprior.frequencies(data["codes"], cond), iprior.frequencies(data["codes"][5:], cond[5:])):
    digest.update(freqs.contiguous().numpy().tobytes())
state, prev = iprior.start(len(data["codes"]), cond), None
for t in range(iprior.seq_len):
    freqs, state = iprior.step(state, prev)
    prev = data["codes"].flatten(1)[:, t]
    digest.update(freqs.contiguous().numpy().tobytes())
print(torch.get_num_threads(), digest.hexdigest())
"""


@pytest.mark.parametrize("arch", ARCHS + ["staged"])
def test_same_frequencies_with_one_or_two_threads_without_onednn_or_vector_units(arch, tmp_path):
    """Also for the transformer over residual-VQ stages (3 stages of 4x5 codes, one sequence)."""
    _, iprior = staged(3) if arch == "staged" else trained(arch, 3)
    iprior.save_pretrained(tmp_path / "iprior")
    codes, cond = staged_codes(16, torch.Generator().manual_seed(7), 3) if arch == "staged" else held_out(3, 16)
    save_file({"codes": codes.contiguous(), "cond": cond.contiguous()}, str(tmp_path / "codes.safetensors"))
    src = str(Path(vqvae.__file__).parents[1])
    hashes = set()
    # the last run stands in for another CPU: torch's kernels without vector units, MKL limited to SSE4.2
    other_cpu = {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}
    for threads, mkldnn, extra in ((1, True, {}), (2, True, {}), (2, False, {}), (1, True, other_cpu)):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **extra,
                   PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
        script = thread_hash_script(tmp_path / "iprior", tmp_path / "codes.safetensors", threads, mkldnn)
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        used, digest = out.stdout.split()
        assert int(used) == threads
        hashes.add(digest)
    assert len(hashes) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to compare CPU and GPU frequencies")
@pytest.mark.parametrize("arch", ARCHS)
def test_cpu_and_gpu_frequencies_are_identical(arch, tmp_path):
    _, iprior = trained(arch, 3)
    iprior.save_pretrained(tmp_path)
    gpu = load_integer_prior(tmp_path, device="cuda")
    codes, cond = held_out(3, 33)
    on_gpu = gpu.frequencies(codes.cuda(), cond.cuda())
    assert torch.equal(on_gpu.cpu(), iprior.frequencies(codes, cond))
    assert torch.equal(step_by_step(gpu, codes.cuda(), cond.cuda()).cpu(), on_gpu.cpu())


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch, tmp_path):
    _, iprior = trained(arch, 3)
    iprior.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["format_id"] == iprior.format_id and config["prior"]["arch"] == arch
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert all(t.dtype == torch.long for t in stored.values())  # integers and tables only
    loaded = load_integer_prior(tmp_path)
    assert type(loaded) is type(iprior) and not loaded.training
    codes, cond = held_out(3, 9)
    assert torch.equal(loaded.frequencies(codes, cond), iprior.frequencies(codes, cond))
    assert torch.equal(step_by_step(loaded, codes, cond), iprior.frequencies(codes, cond))


def test_load_rejects_other_directories_and_inexact_weights(tmp_path):
    _, iprior = trained("transformer", 0)
    with pytest.raises(RunError, match="missing"):
        load_integer_prior(tmp_path)
    iprior.save_pretrained(tmp_path)
    float_prior = build_prior(iprior.cfg)
    float_prior.save_pretrained(tmp_path / "float")
    with pytest.raises(RunError, match="not a vqvae integer prior"):
        load_integer_prior(tmp_path / "float")
    good = load_file(str(tmp_path / "model.safetensors"))
    for name, value, message in (("blocks.0.c_fc.weight", 1 << 40, "exact"),  # products would pass 2**53
                                 ("exp2_hi", 1 << 40, "out of range"), ("blocks.1.score_shift", 0, "out of range")):
        state = {k: v.clone() for k, v in good.items()}
        state[name].view(-1)[0] = value
        save_file(state, str(tmp_path / "model.safetensors"))
        with pytest.raises(RunError, match=message):
            load_integer_prior(tmp_path)


def test_from_prior_checks_its_inputs():
    prior, _ = trained("transformer", 3)
    codes, cond = held_out(3, 8)
    with pytest.raises(ValueError, match="cond"):
        IntegerPrior.from_prior(prior, codes)
    with pytest.raises(ValueError, match="codes"):
        IntegerPrior.from_prior(prior, codes.flatten(1), cond)
    with pytest.raises(ConfigError, match="act_bits"):
        IntegerPrior.from_prior(prior, codes, cond, act_bits=30)
    layer = QLinear(4096, 2, in_limit=(1 << 23) - 1, out_bits=20)  # 4096 * 2**23 * 2**23 > 2**53
    with pytest.raises(ConfigError, match="not exact"):
        layer.set_weights(torch.ones(2, 4096), None, 1.0, torch.ones(2), weight_bits=24)
    _, iprior = trained("transformer", 3)
    with pytest.raises(ValueError, match="labels"):
        iprior.start(2, torch.tensor([0, 3]))


# --- the integer arithmetic against references --------------------------------------------------


# -- residual-VQ stages -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def staged(num_classes=0):
    """(float, integer) staged transformer priors over codes (B, 3, 4, 5): stage s copies the ramp + s."""
    torch.manual_seed(0)
    cfg = PriorConfig(codebook_size=K, grid=GRID, stages=3, num_classes=num_classes, n_layer=2, n_head=2, n_embd=32)
    prior = build_prior(cfg).eval()
    codes = staged_codes(256, torch.Generator().manual_seed(0), num_classes)
    return prior, IntegerPrior.from_prior(prior, *codes)


def staged_codes(n, generator, num_classes=0):
    codes, cond = structured_codes(n, generator, num_classes)
    return torch.stack([(codes + s) % K for s in range(3)], 1), cond  # (n, 3, H, W)


@pytest.mark.parametrize("num_classes", [0, 3])
def test_stages_step_by_step_equals_full_pass_and_follows_the_float_prior(num_classes):
    prior, iprior = staged(num_classes)
    codes, cond = staged_codes(8, torch.Generator().manual_seed(5), num_classes)
    assert torch.equal(step_by_step(iprior, codes, cond), iprior.frequencies(codes, cond))
    bits, reference = iprior.bits(codes, cond), prior_bits(prior, codes, cond)
    torch.testing.assert_close(bits, reference.double(), rtol=0.02, atol=0)
    # rows of the K codes of their own stage: valid frequencies
    freqs = iprior.frequencies(codes, cond)
    assert freqs.shape == (8, 3 * 20, K) and bool((freqs >= 1).all()) and bool((freqs.sum(-1) == 1 << PRECISION).all())


def test_stages_save_load_round_trip(tmp_path):
    _, iprior = staged()
    iprior.save_pretrained(tmp_path)
    again = load_integer_prior(tmp_path)
    codes, _ = staged_codes(4, torch.Generator().manual_seed(1))
    assert again.cfg.stages == 3 and torch.equal(again.frequencies(codes), iprior.frequencies(codes))
    with pytest.raises(ValueError, match=r"\(N, 3, 4, 5\)"):
        IntegerPrior.from_prior(staged()[0], codes[:, 0])
