import pytest
import torch

from vqvae.errors import ConfigError
from vqvae.report import grid, sample_images, save_comparison
from vqvae.run import Run


def test_grid_places_each_image():
    images = torch.rand(5, 1, 3, 4)
    out = grid(images, nrow=2, pad=1)
    assert out.shape == (1, 3 * 4 + 1, 2 * 5 + 1)
    for i in range(5):
        r, c = divmod(i, 2)
        assert torch.equal(out[:, 1 + r * 4:1 + r * 4 + 3, 1 + c * 5:1 + c * 5 + 4], images[i])
    assert torch.equal(out[:, 0], torch.ones(1, 11))  # white gaps


def test_save_comparison_puts_reconstructions_below(tmp_path):
    from PIL import Image
    import numpy as np

    originals, recons = torch.zeros(3, 1, 2, 2), torch.ones(3, 1, 2, 2)
    save_comparison(originals, recons, tmp_path / "c.png", nrow=3, scale=1)
    pixels = np.asarray(Image.open(tmp_path / "c.png"))
    assert pixels.shape == (2 * 4 + 2, 3 * 4 + 2)
    assert (pixels[2:4, 2:4] == 0).all() and (pixels[6:8, 2:4] == 255).all()


def test_sample_images_one_row_per_class_and_reproducible(tiny_run):
    run = Run(tiny_run)
    model, prior = run.model(), run.prior()
    images, nrow = sample_images(model, prior, 20, seed=3)
    assert nrow == 2 and images.shape == (20, 1, 28, 28)
    again, _ = sample_images(model, prior, 20, seed=3)
    assert torch.equal(images, again)
    sevens, nrow = sample_images(model, prior, 3, label=7, seed=3)
    assert nrow is None and sevens.shape == (3, 1, 28, 28)
    with pytest.raises(ConfigError, match="label must be in 0..9"):
        sample_images(model, prior, 3, label=10)
    with pytest.raises(ConfigError, match="temperature"):
        sample_images(model, prior, 3, temperature=-1)
