import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vqvae import nearest
from vqvae.nearest import build_kernel, kmeans, nearest_codes, nearest_columns, scatter_sum, search_path
from vqvae.quantizers import EMAVectorQuantizer, VectorQuantizer

HAS_KERNEL = build_kernel() is not None
PATHS = [pytest.param(True, marks=pytest.mark.skipif(not HAS_KERNEL, reason="C++ kernel did not build"), id="kernel"),
         pytest.param(False, id="pytorch")]


@pytest.fixture(params=PATHS)
def use_kernel(request, monkeypatch):
    monkeypatch.setattr(nearest, "USE_KERNEL", request.param)
    return request.param


def brute_force_distances(z, codebook):
    return torch.cdist(z.double(), codebook.double()).pow(2)  # (N, K)


# --- nearest-code search against brute force --------------------------------------------------------------

@pytest.mark.parametrize("K", [2, 3, 17, 512, 1000, 8192])
@pytest.mark.parametrize("D", [1, 16, 64])
def test_nearest_codes_match_brute_force(K, D):
    gen = torch.Generator().manual_seed(K * 100 + D)
    z = torch.randn(700, D, generator=gen)
    codebook = torch.randn(K, D, generator=gen)
    fast = nearest_codes(z, codebook)
    dist = brute_force_distances(z, codebook)
    reference = dist.argmin(1)
    # Same index, or an exact tie up to float32 rounding of the distance (both are nearest).
    chosen = dist.gather(1, fast[:, None]).squeeze(1)
    best = dist.gather(1, reference[:, None]).squeeze(1)
    assert torch.allclose(chosen, best, rtol=1e-5, atol=1e-5)
    if D >= 16:  # in 1-D, thousands of codes make float32 near-ties common; in 16-D they are rare
        assert (fast == reference).float().mean() > 0.99


@pytest.mark.parametrize("K,D", [(3, 1), (50, 8), (3000, 16)])
def test_float64_search_matches_brute_force(use_kernel, K, D):
    # float64 always takes the PyTorch path (the kernel is float32 only). Random float64 data has gaps
    # between the nearest and second-nearest distances far above float64 rounding, so the codes are equal.
    gen = torch.Generator().manual_seed(K)
    z, codebook = torch.randn(2, D, 150, generator=gen).double(), torch.randn(K, D, generator=gen).double()
    rows = z.transpose(1, 2).reshape(-1, D)
    expected = torch.cdist(rows, codebook).argmin(1)
    assert torch.equal(nearest_columns(z, codebook).view(-1), expected)
    assert torch.equal(nearest_codes(rows, codebook), expected)


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 10_000])
def test_chunking_does_not_change_codes(use_kernel, chunk_rows):
    gen = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(300, 8, generator=gen), torch.randn(50, 8, generator=gen)
    assert torch.equal(nearest_codes(z, codebook, chunk_rows), nearest_codes(z, codebook, 300))


@pytest.mark.parametrize("K,D,N", [(5000, 4, 600), (300, 64, 1000), (2, 3, 70)])
def test_search_paths_agree_with_brute_force_across_code_tiles(K, D, N, monkeypatch):
    monkeypatch.setattr(nearest, "CODE_TILE", 256)  # several tiles even for small K
    gen = torch.Generator().manual_seed(K + D)
    z, codebook = torch.randn(2, D, N // 2, generator=gen), torch.randn(K, D, generator=gen)
    rows = z.transpose(1, 2).reshape(-1, D)
    dist = brute_force_distances(rows, codebook)
    for use in [False] + [True] * HAS_KERNEL:
        monkeypatch.setattr(nearest, "USE_KERNEL", use)
        codes = nearest_columns(z, codebook).view(-1)
        assert torch.allclose(dist.gather(1, codes[:, None]), dist.min(1, keepdim=True).values, rtol=1e-5, atol=1e-5)


def test_ties_go_to_the_lowest_index_across_tiles(use_kernel, monkeypatch):
    monkeypatch.setattr(nearest, "CODE_TILE", 4)
    codebook = torch.tensor([[9.0, 9.0], [1.0, 0.0], [5.0, 5.0], [7.0, 7.0], [8.0, 8.0], [1.0, 0.0], [1.0, 0.0]])
    z = torch.tensor([[1.0, 0.1], [1.0, -0.1], [5.0, 5.0]])
    assert nearest_codes(z, codebook).tolist() == [1, 1, 2]


def test_nan_latent_gets_the_same_code_as_argmax(use_kernel):
    codebook = torch.randn(10, 3)
    z = torch.randn(4, 3)
    z[2, 1] = float("nan")
    expected = torch.addmm(-0.5 * codebook.pow(2).sum(1), z, codebook.t()).argmax(1)
    assert torch.equal(nearest_codes(z, codebook), expected)


# --- search paths by device and dtype ----------------------------------------------------------------------

def test_search_path_by_device_and_dtype(monkeypatch):
    monkeypatch.setattr(nearest, "build_kernel", lambda: "C++ kernel")  # as where it builds
    monkeypatch.setattr(nearest, "fused_search", lambda: "gpu_search")  # as where Triton imports
    f32, f64 = torch.float32, torch.float64
    assert search_path("cpu", f32) == "cpu-kernel"
    assert search_path("cpu", f64) == "pytorch"
    assert search_path("cuda", f32) == search_path(torch.device("cuda", 1), f32) == "fused"
    assert search_path("cuda", f64) == "blocked"
    assert search_path("mps", f32) == search_path("meta", f32) == "blocked"
    monkeypatch.setattr(nearest, "fused_search", lambda: None)  # no Triton
    assert search_path("cuda", f32) == "blocked"
    assert search_path("cpu", f32) == "cpu-kernel"
    monkeypatch.setattr(nearest, "build_kernel", lambda: None)  # no compiler
    assert search_path("cpu", f32) == "pytorch"
    monkeypatch.setattr(nearest, "fused_search", lambda: "gpu_search")
    monkeypatch.setattr(nearest, "build_kernel", lambda: "C++ kernel")
    monkeypatch.setattr(nearest, "USE_KERNEL", False)  # PyTorch ops only, on every device
    assert search_path("cpu", f32) == "pytorch" and search_path("cuda", f32) == "blocked"
    monkeypatch.setattr(nearest, "SEARCH_PATH", "blocked")  # forced
    assert search_path("cpu", f32) == "blocked"


def test_search_path_builds_or_imports_only_what_the_device_can_use(monkeypatch):
    def fail():
        raise AssertionError("not for this device")

    monkeypatch.setattr(nearest, "fused_search", fail)
    assert search_path("cpu", torch.float64) == "pytorch"
    search_path("cpu", torch.float32)
    monkeypatch.setattr(nearest, "build_kernel", fail)
    assert search_path("meta", torch.float32) == "blocked"
    assert search_path("cuda", torch.float64) == "blocked"


def test_fused_path_is_called_and_falls_back_once_when_it_fails(monkeypatch):
    z, codebook = integer_latents(0, B=2, D=3, L=20, K=30)
    expected = brute_force_columns(z, codebook)
    calls = []

    class Fused:
        @staticmethod
        def nearest_columns(z, codebook):
            calls.append(z.shape)
            return torch.full(z.shape[::2], 7)

    monkeypatch.setattr(nearest, "SEARCH_PATH", "fused")
    monkeypatch.setattr(nearest, "_fused", Fused)
    assert torch.equal(nearest_columns(z, codebook), torch.full((2, 20), 7)) and calls == [(2, 3, 20)]

    class Broken:
        @staticmethod
        def nearest_columns(z, codebook):
            raise RuntimeError("PTX not supported by this driver")

    monkeypatch.setattr(nearest, "_fused", Broken)
    with pytest.warns(RuntimeWarning, match="fused nearest-code search failed"):
        codes = nearest_columns(z, codebook)
    assert torch.equal(codes, expected)  # the blocked path's answer
    assert nearest._fused is False and nearest.fused_search() is None  # not retried


# --- the blocked (GPU) path, run on CPU -------------------------------------------------------------------

def integer_latents(seed, B, D, L, K, duplicates=0):
    """z (B, D, L) and a codebook (K, D) of small integers: every path computes the scores exactly, so ties
    are exact ties everywhere. `duplicates` codebook rows are copies of earlier ones (always tied)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randint(-3, 4, (B, D, L), generator=gen).float()
    codebook = torch.randint(-3, 4, (K, D), generator=gen).float()
    for _ in range(duplicates):
        src, dst = sorted(torch.randint(0, K, (2,), generator=gen).tolist())
        codebook[max(dst, src + 1) % K] = codebook[src]
    return z, codebook


def brute_force_columns(z, codebook):
    """codes (B, L): argmin of float64 distances, the first among equal ones (argmin's rule, NaN first)."""
    rows = z.transpose(1, 2).reshape(-1, z.shape[1]).double()  # (N, D)
    return torch.cdist(rows, codebook.double()).argmin(1).view(z.shape[0], z.shape[2])


@pytest.mark.parametrize("B,D,L,K,block", [(4, 3, 10, 40, 25), (3, 5, 33, 200, 16), (2, 8, 7, 1000, 1000),
                                           (1, 2, 300, 9, 64), (5, 1, 12, 17, 1)])
def test_blocked_path_finds_brute_force_codes_with_exact_ties(monkeypatch, B, D, L, K, block):
    # block (scores per block) / K sets the columns per block: slices of one item, or several whole items
    monkeypatch.setattr(nearest, "SEARCH_PATH", "blocked")
    monkeypatch.setattr(nearest, "DEVICE_SCORE_BLOCK_ELEMENTS", block * K)
    z, codebook = integer_latents(B * K + D, B, D, L, K, duplicates=K // 3)
    expected = brute_force_columns(z, codebook)
    assert torch.equal(nearest_columns(z, codebook), expected)
    # the CPU paths pick the same codes on the same inputs
    for use in [False] + [True] * HAS_KERNEL:
        monkeypatch.setattr(nearest, "SEARCH_PATH", None)
        monkeypatch.setattr(nearest, "USE_KERNEL", use)
        assert torch.equal(nearest_columns(z, codebook), expected)


def test_blocked_path_ties_and_nans_follow_the_cpu_rule(monkeypatch):
    codebook = torch.tensor([[9.0, 9.0], [1.0, 0.0], [5.0, 5.0], [7.0, 7.0], [8.0, 8.0], [1.0, 0.0], [1.0, 0.0]])
    z = torch.tensor([[1.0, 0.1], [1.0, -0.1], [5.0, 5.0], [float("nan"), 1.0]]).t()[None]  # (1, 2, 4)
    monkeypatch.setattr(nearest, "SEARCH_PATH", "blocked")
    assert nearest_columns(z, codebook).tolist() == [[1, 1, 2, 0]]  # a NaN latent: every score NaN, code 0
    codebook[[3, 5]] = float("nan")  # NaN codes: the first one wins (the NaN latent's first NaN is code 0)
    assert nearest_columns(z, codebook, cols=1).tolist() == [[3, 3, 3, 0]]
    assert torch.equal(nearest_columns(z, codebook), brute_force_columns(z, codebook))
    monkeypatch.setattr(nearest, "SEARCH_PATH", None)
    assert nearest_columns(z, codebook).tolist() == [[3, 3, 3, 0]]


@pytest.mark.parametrize("K,D", [(2, 3), (300, 16), (5000, 4)])
def test_blocked_path_matches_brute_force_on_random_latents(monkeypatch, K, D):
    monkeypatch.setattr(nearest, "SEARCH_PATH", "blocked")
    gen = torch.Generator().manual_seed(K)
    z, codebook = torch.randn(3, D, 200, generator=gen), torch.randn(K, D, generator=gen)
    rows = z.transpose(1, 2).reshape(-1, D)
    dist = brute_force_distances(rows, codebook)
    codes = nearest_columns(z, codebook).view(-1)
    assert torch.allclose(dist.gather(1, codes[:, None]), dist.min(1, keepdim=True).values, rtol=1e-5, atol=1e-5)
    # float64 on the blocked path: nearest gaps far above float64 rounding, so the codes are the argmin
    assert torch.equal(nearest_columns(z.double(), codebook.double()).view(-1), dist.argmin(1))


class OpLog(TorchDispatchMode):
    """Records the aten ops run inside it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


VIEWS = {"t", "slice", "select", "transpose", "expand", "view", "as_strided", "unsqueeze", "alias"}  # no launch
HOST_SYNCS = {"nonzero", "_local_scalar_dense", "item", "is_nonzero", "masked_select", "equal", "allclose"}


@pytest.mark.parametrize("K,blocks", [(512, 4), (8192, 64), (65536, 512)])
def test_blocked_path_on_a_device_is_few_launches_without_host_syncs(K, blocks):
    # The GPU batch, z_e (256, 64, 32, 32), on the meta device: an accelerator as far as the
    # dispatch goes (shapes only, no data: a data-dependent op such as nonzero could not even run there).
    z, codebook = torch.empty(256, 64, 1024, device="meta"), torch.empty(K, 64, device="meta")
    assert search_path(z.device, z.dtype) == "blocked"
    with OpLog() as log:
        codes = nearest_columns(z, codebook)
    assert codes.shape == (256, 1024) and codes.dtype == torch.long
    matmuls = sum(op in ("addmm", "baddbmm") for op in log.ops)
    assert matmuls == blocks == 256 * 1024 * K // nearest.DEVICE_SCORE_BLOCK_ELEMENTS
    assert log.ops.count("argmax") == blocks
    launches = [op for op in log.ops if op not in VIEWS]
    assert len(launches) <= 2 * blocks + 4  # a matmul and an argmax per block, a few ops for the norms
    assert not HOST_SYNCS & set(log.ops)


@pytest.mark.parametrize("path", ["blocked", "pytorch"] + ["cpu-kernel"] * HAS_KERNEL)
def test_search_stays_float32_under_autocast(monkeypatch, path):
    monkeypatch.setattr(nearest, "SEARCH_PATH", path)
    gen = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(2, 16, 400, generator=gen), torch.randn(512, 16, generator=gen)
    expected = nearest_columns(z, codebook)
    # bfloat16 scores would pick other codes for some latents: the test could fail
    assert not torch.equal(nearest_columns(z.bfloat16().float(), codebook.bfloat16().float()), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(nearest_columns(z, codebook), expected)
        assert torch.equal(nearest_codes(z[0].t(), codebook), expected[0])


@pytest.mark.parametrize("quantizer", [VectorQuantizer, EMAVectorQuantizer])
def test_quantizer_step_on_the_blocked_path_matches_the_cpu_path(monkeypatch, quantizer):
    z_e, codebook = integer_latents(1, B=2, D=4, L=36, K=64, duplicates=10)
    results = []
    for path in ("blocked", None):
        monkeypatch.setattr(nearest, "SEARCH_PATH", path)
        vq = quantizer(64, 4).train()
        vq._set_codes(torch.arange(64), codebook)
        z = z_e.view(2, 4, 6, 6).clone().requires_grad_()
        q = vq(z)
        (q.loss + q.z_q.square().sum()).backward()
        results.append((q.codes, q.z_q.detach(), q.loss.detach(), z.grad, vq.embeddings.detach().clone()))
    for first, second in zip(*results):
        assert torch.equal(first, second)


# --- the fused Triton kernel, in Triton's interpreter on CPU ----------------------------------------------

HAS_TRITON = importlib.util.find_spec("triton") is not None
NEEDS_TRITON = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (`pip install triton` runs the "
                                  "fused GPU kernel here in Triton's CPU interpreter)")

# Runs with TRITON_INTERPRET=1: the kernel on CPU tensors, against brute force and the CPU paths. Prints
# a JSON object {check: passed}.
FUSED_CHECK = textwrap.dedent("""
    import json, warnings
    import torch, triton
    from vqvae import gpu_search, nearest
    from vqvae.nearest import nearest_columns, search_path
    from vqvae.quantizers import VectorQuantizer

    warnings.filterwarnings("error", message="vqvae: the fused")  # a fallback to the blocked path: fail
    checks = {}

    def integer_latents(seed, B, D, L, K, duplicates=0):
        gen = torch.Generator().manual_seed(seed)
        z = torch.randint(-3, 4, (B, D, L), generator=gen).float()
        codebook = torch.randint(-3, 4, (K, D), generator=gen).float()
        for _ in range(duplicates):
            src, dst = sorted(torch.randint(0, K, (2,), generator=gen).tolist())
            codebook[max(dst, src + 1) % K] = codebook[src]
        return z, codebook

    def brute_force(z, codebook):
        rows = z.transpose(1, 2).reshape(-1, z.shape[1]).double()
        return torch.cdist(rows, codebook.double()).argmin(1).view(z.shape[0], z.shape[2])

    def cpu_path(z, codebook):
        nearest.SEARCH_PATH = None
        try:
            return nearest_columns(z, codebook)
        finally:
            nearest.SEARCH_PATH = "fused"

    nearest.SEARCH_PATH = "fused"
    checks["triton imports"] = nearest.fused_search() is gpu_search and gpu_search.INTERPRET
    # (B, D, L, K, blocks): one or several code tiles and row blocks, blocks across items, D padded to 16,
    # D in chunks (BLOCK_D < D), BLOCK_D covering D (latents loaded once)
    cases = [(2, 3, 37, 50, (16, 16, 16)), (3, 20, 11, 70, (16, 32, 16)), (1, 64, 40, 33, (32, 16, 64)),
             (4, 1, 9, 5, (16, 16, 16)), (2, 40, 25, 130, (64, 64, 32)), (2, 5, 30, 300, None)]
    for i, (B, D, L, K, blocks) in enumerate(cases):
        z, codebook = integer_latents(i, B, D, L, K, duplicates=K // 3)
        expected = brute_force(z, codebook)
        name = f"ties B={B} D={D} L={L} K={K} blocks={blocks}"
        checks[name] = torch.equal(gpu_search.nearest_columns(z, codebook, blocks), expected)
        checks[name + " = CPU path"] = torch.equal(cpu_path(z, codebook), expected)
    z, codebook = integer_latents(9, 3, 6, 20, 40, duplicates=12)
    checks["through nearest_columns"] = torch.equal(nearest_columns(z, codebook), brute_force(z, codebook))
    channels_last = z.transpose(1, 2).contiguous().transpose(1, 2)  # (B, D, L) with D innermost in memory
    checks["strided latents"] = torch.equal(nearest_columns(channels_last, codebook), brute_force(z, codebook))
    checks["empty"] = nearest_columns(z[:0], codebook).shape == (0, 20)

    # NaNs as the CPU path defines them: a NaN latent gets code 0, NaN codes win from the first one on
    z[1, 2, 5] = float("nan")
    codebook[[23, 31]] = float("nan")
    for blocks in [(16, 16, 16), (16, 64, 16)]:  # the NaN codes in later tiles, or in the first one
        checks[f"nan {blocks}"] = torch.equal(gpu_search.nearest_columns(z, codebook, blocks), cpu_path(z, codebook))
    codebook[[23, 31]] = 0.0
    got = gpu_search.nearest_columns(z, codebook, (16, 16, 16))
    checks["nan latent"] = got[1, 5].item() == 0 and torch.equal(got, cpu_path(z, codebook))

    # random latents: the nearest code up to float32 rounding, mostly the very same as the CPU path's
    gen = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(2, 64, 300, generator=gen), torch.randn(1000, 64, generator=gen)
    codes, reference = gpu_search.nearest_columns(z, codebook, (64, 64, 32)).view(-1), cpu_path(z, codebook).view(-1)
    rows = z.transpose(1, 2).reshape(-1, 64).double()
    dist = torch.cdist(rows, codebook.double()).pow(2)
    checks["random: nearest up to rounding"] = torch.allclose(dist.gather(1, codes[:, None]),
                                                              dist.min(1, keepdim=True).values, rtol=1e-5)
    checks["random: same codes as the CPU path"] = (codes == reference).float().mean().item() > 0.99

    # a quantizer's training step on the fused path: same codes, loss and gradient as on the CPU path
    steps = []
    for path in ("fused", None):
        nearest.SEARCH_PATH = path
        torch.manual_seed(0)  # the same initial codebook
        vq = VectorQuantizer(64, 8).train()
        z_e = torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
        q = vq(z_e)
        (q.loss + q.z_q.square().sum()).backward()
        steps.append((q.codes, q.loss.detach(), z_e.grad))
    checks["quantizer step"] = all(torch.equal(a, b) for a, b in zip(*steps))
    nearest.SEARCH_PATH = "fused"

    # the autotuner's candidates: BLOCK_D capped at D padded, duplicates dropped
    configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "BLOCK_D": d}, num_warps=w, num_stages=s)
               for n, k, d, w, s in gpu_search.CONFIGS]
    capped = gpu_search._capped(configs, {}, D_PAD=16)
    checks["configs capped"] = (all(c.kwargs["BLOCK_D"] == 16 for c in capped) and len(capped) < len(configs)
                                and [c.kwargs["BLOCK_D"] for c in configs] == [x[2] for x in gpu_search.CONFIGS])

    # the autotuned launch that CUDA takes, with a stand-in for the GPU timer: each candidate runs once
    ran = []

    def timer(kernel_call, quantiles):
        kernel_call()
        ran.append(1)
        return [float(len(ran))] * 3  # the first candidate is the fastest

    gpu_search._tuned_kernel = gpu_search._autotuned(timer)
    z, codebook = integer_latents(11, 2, 20, 30, 50, duplicates=15)  # D = 20: BLOCK_D capped at 32
    checks["autotuned launch"] = torch.equal(nearest_columns(z, codebook), brute_force(z, codebook))
    candidates = gpu_search._capped(configs, {}, D_PAD=32)
    checks["autotuner tried each candidate"] = (len(ran) == len(candidates) == 5
                                                and gpu_search._tuned_kernel.best_config.kwargs == candidates[0].kwargs)
    print(json.dumps(checks))
""")


def run_python(code, tmp_path, **env):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_CACHE_DIR": str(tmp_path / "triton"), **env}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=environment, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@NEEDS_TRITON
def test_fused_kernel_in_the_triton_interpreter(tmp_path):
    """The fused search run by Triton's interpreter on CPU tensors (~10-20 s): exact ties, NaNs, blocks."""
    checks = run_python(FUSED_CHECK, tmp_path, TRITON_INTERPRET="1")
    assert [name for name, passed in checks.items() if not passed] == []
    assert len(checks) >= 20


# Compiles the kernel for an H100 (sm_90) with Triton's own compiler, which needs no GPU. Prints what the
# PTX computes the scores with.
COMPILE_CHECK = textwrap.dedent("""
    import json, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from vqvae import gpu_search

    signature = {name: "*fp32" for name in ("z_ptr", "e_ptr", "h_ptr")}
    signature.update(out_ptr="*i64", **{name: "i32" for name in ("N", "L", "K", "D", "stride_zb", "stride_zd",
                                                                  "stride_zl", "stride_ek", "stride_ed")})
    report = {}
    for d_pad, (n, k, d, warps, stages) in [(64, gpu_search.CONFIGS[0]), (64, gpu_search.CONFIGS[3])]:
        sizes = dict(D_PAD=d_pad, BLOCK_N=n, BLOCK_K=k, BLOCK_D=d)
        source = ASTSource(fn=gpu_search._nearest_kernel, signature={**signature, **{s: "constexpr" for s in sizes}},
                           constexprs=sizes)
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=warps, num_stages=stages, enable_fp_fusion=False))
        ptx = kernel.asm["ptx"]
        report[str(sizes)] = {"fma": ptx.count("fma.rn.f32"), "mma": ptx.count("mma"),
                              "tf32": ptx.count("tf32"), "cubin": len(kernel.asm["cubin"])}
    print(json.dumps(report))
""")


@NEEDS_TRITON
def test_fused_kernel_compiles_for_an_h100_in_ieee_float32(tmp_path):
    """Triton's compiler (no GPU needed) builds the kernel for sm_90 (~10-30 s): the scores are float32
    FMAs, no TF32 tensor-core instructions; the interpreter does not check the compiled language rules."""
    report = run_python(COMPILE_CHECK, tmp_path, TRITON_DEFAULT_FP_FUSION="0")
    for sizes, counts in report.items():
        assert counts["cubin"] > 0, sizes
        assert counts["fma"] > 0 and counts["mma"] == 0 and counts["tf32"] == 0, (sizes, counts)


# --- EMA sums and k-means ---------------------------------------------------------------------------------

def test_scatter_sum_matches_a_loop(use_kernel):
    gen = torch.Generator().manual_seed(0)
    values, codes = torch.randn(3, 5, 70, generator=gen), torch.randint(0, 9, (3, 70), generator=gen)
    expected = torch.zeros(9, 5, dtype=torch.float64)
    for b in range(3):
        for pos in range(70):
            expected[codes[b, pos]] += values[b, :, pos].double()
    assert torch.allclose(scatter_sum(values, codes, 9).double(), expected, atol=1e-5)


def test_kmeans_lowers_distortion_against_random_pick():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 4, generator=gen)

    def distortion(c):
        return brute_force_distances(x, c).min(1).values.mean()
    init = kmeans(x, 32, 0, generator=torch.Generator().manual_seed(0))
    fitted = kmeans(x, 32, 15, generator=torch.Generator().manual_seed(0))
    assert distortion(fitted) < 0.8 * distortion(init)


# --- building the kernel ----------------------------------------------------------------------------------

def test_quantizer_works_when_the_kernel_cannot_build(monkeypatch):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setattr(nearest, "_kernel", None)
    z_e = torch.randn(2, 4, 3, 3)
    vq = VectorQuantizer(8, 4)
    with pytest.warns(RuntimeWarning, match="did not build"):
        q = vq(z_e)
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.equal(q.codes.reshape(-1), brute_force_distances(flat, vq.codebook).argmin(1))
    assert nearest._kernel is False  # not retried on every call
    assert build_kernel() is None


# Runs inside the fresh environment: imports the installed package, builds its kernel, then counts the
# calls that one training step of a quantizer makes into the kernel and compares with the PyTorch path.
INSTALLED_CHECK = textwrap.dedent("""
    import json, os, torch
    import vqvae
    from vqvae import nearest
    from vqvae.quantizers import VectorQuantizer

    kernel = nearest.build_kernel()
    assert kernel is not None, "the kernel did not build"
    calls = []
    for name in ("nearest_codes", "gather_residual", "residual_backward"):
        def counted(*args, _f=getattr(kernel, name), _name=name):
            calls.append(_name)
            return _f(*args)
        setattr(kernel, name, counted)
    vq = VectorQuantizer(64, 8).train()
    z_e = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    results = []
    for use in (True, False):
        nearest.USE_KERNEL = use
        q = vq(z_e)
        (q.loss + q.z_q.square().sum()).backward()
        results.append(q.codes)
    print(json.dumps({"vqvae": vqvae.__file__, "source": str(nearest.KERNEL_SOURCE), "kernel": kernel.__file__,
                      "calls": calls, "same_codes": bool(torch.equal(*results))}))
""")


@pytest.mark.skipif(not HAS_KERNEL, reason="no C++ toolchain here: the kernel cannot build anywhere")
def test_installed_wheel_builds_and_uses_the_kernel(tmp_path):
    """Package data reaches an installed (not editable) copy, and the kernel builds from it (~30-60 s)."""
    repo, work = Path(__file__).resolve().parents[1], tmp_path / "repo"
    # Build from a copy: building writes build/ and *.egg-info next to the sources.
    shutil.copytree(repo / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, work / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp_path / "wheels", work],
                   check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheels").glob("vqvae-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", python, "install", "--no-deps", "--no-index", wheel], check=True,
                   capture_output=True)
    # torch and the other dependencies come from this interpreter's site-packages, appended after the
    # venv's own (this environment's editable vqvae is a .pth there, which a path entry does not run).
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    extensions = tmp_path / "torch_extensions"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TORCH_EXTENSIONS_DIR=str(extensions), OMP_NUM_THREADS="1")
    done = subprocess.run([python, "-c", INSTALLED_CHECK], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    installed = (site / "vqvae").resolve()
    assert Path(report["vqvae"]).resolve().parent == installed
    assert Path(report["source"]) == installed / "csrc" / "quantizer.cpp"
    assert Path(report["kernel"]).resolve().is_relative_to(extensions.resolve())  # built now, not from a cache
    build = Path(report["kernel"]).parent  # named by nearest.kernel_name(): keyed by source and environment
    assert build.parent == extensions and build.name.startswith("vqvae_quantizer_")
    assert report["source"] in (build / "build.ninja").read_text()
    # one step with the kernel: search, forward and backward; none with USE_KERNEL = False
    assert report["calls"] == ["nearest_codes", "gather_residual", "residual_backward"]
    assert report["same_codes"]
