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

from vqvae import nearest
from vqvae.nearest import build_kernel, kmeans, nearest_codes, nearest_columns, scatter_sum
from vqvae.quantizers import VectorQuantizer

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
