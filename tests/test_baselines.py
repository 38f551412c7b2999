import torch

from vqvae.baselines import rate_distortion, smallest_at_psnr, sweep


def test_png_is_lossless_and_quality_buys_psnr():
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(4, 1, 28, 28, generator=gen) > 0.7).float() * torch.rand(4, 1, 1, 1, generator=gen)
    png = rate_distortion(images, "png")
    assert png["psnr"] == 100.0 and png["bits_per_image"] > 0
    low, high = rate_distortion(images, "jpeg", 10), rate_distortion(images, "jpeg", 90)
    assert high["psnr"] > low["psnr"] and high["bits_per_image"] > low["bits_per_image"]


def test_smallest_at_psnr_picks_the_cheapest_row_that_reaches_it():
    rows = sweep(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)), qualities=(10, 50, 90))
    best = smallest_at_psnr(rows, "webp", 20.0)
    assert best is None or (best["psnr"] >= 20.0 and all(
        r["bits_per_image"] >= best["bits_per_image"] for r in rows if r["format"] == "webp" and r["psnr"] >= 20.0))
    assert smallest_at_psnr(rows, "jpeg", 1e9) is None
