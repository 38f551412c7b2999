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


# -- the HTML report ------------------------------------------------------------------------------------


def _images(text: str) -> list:
    """Every <img> of an HTML page, decoded from its data: URI (any other src fails the test)."""
    import base64
    import io
    import re

    from PIL import Image

    sources = re.findall(r'<img src="([^"]*)"', text)
    images = []
    for src in sources:
        assert src.startswith("data:image/png;base64,"), src[:40]
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        image.load()
        images.append(image)
    return images


def _figures(text: str) -> tuple[dict, dict]:
    """(the embedded figures JSON, the figures table as {name: shown text}) of a report page."""
    import html
    import json
    import re

    embedded = json.loads(html.unescape(re.search(r'<script type="application/json" id="figures">(.*?)</script>',
                                                  text, re.S).group(1)))
    table = re.search(r'<table class="figures">(.*?)</table>', text, re.S).group(1)
    shown = {html.unescape(k): html.unescape(v) for k, v in re.findall(r"<tr><th>(.*?)</th><td>(.*?)</td></tr>", table)}
    return embedded, shown


def test_report_is_self_contained_and_shows_evals_figures(tiny_run, tmp_path, capsys):
    import json

    from vqvae.cli import main

    pytest.importorskip("matplotlib", reason="the `report` extra (matplotlib) is not installed")
    target = tmp_path / "report.html"
    assert main(["report", str(tiny_run), "-o", str(target)]) == 0
    assert main(["eval", str(tiny_run), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    text = target.read_text()
    # curves (loss, PSNR, prior), usage, perplexity, histogram, reconstructions, 6 inputs + 6 grids, samples, R-D
    images = _images(text)
    assert len(images) == 3 + 3 + 1 + 12 + 1 + 1
    embedded, shown = _figures(text)
    assert embedded == printed
    assert shown == {k: f"{v:.4f}" if isinstance(v, float) else str(v) for k, v in printed.items()}
    samples = images[-2]  # 10 classes, one row each: 10 rows of 56-pixel digits and 2-pixel gaps
    assert samples.size[1] == 10 * (56 + 2) + 2
    assert "no prior yet" not in text and "<script src" not in text and "http" not in text


def test_report_of_a_vqvae2_draws_its_bottom_grids_and_samples(tiny_vqvae2_run, tmp_path):
    import io

    from PIL import Image

    from vqvae.html_report import code_grid_image, png_bytes, write_report

    pytest.importorskip("matplotlib", reason="the `report` extra (matplotlib) is not installed")
    text = write_report(Run(tiny_vqvae2_run), tmp_path / "r.html").read_text()
    images = _images(text)
    assert len(images) == 3 + 3 + 1 + 12 + 1 + 1 and "the bottom grid" in text
    grids = images[8:19:2]  # each input is followed by its code grid: the 7x7 bottom one
    bottom = Image.open(io.BytesIO(png_bytes(code_grid_image(torch.zeros(7, 7, dtype=torch.long), 16))))
    assert all(image.size == bottom.size for image in grids)
    assert images[-2].size[1] == 10 * (56 + 2) + 2  # prior samples, one row per class
    embedded, _ = _figures(text)
    assert 0 < embedded["nll_bits_per_latent"] <= 4  # 65 codes of K = 16 under the prior


def test_report_without_prior_says_what_is_missing(tiny_run, tmp_path):
    import shutil

    from vqvae.html_report import write_report

    pytest.importorskip("matplotlib", reason="the `report` extra (matplotlib) is not installed")
    bare = tmp_path / "bare"
    shutil.copytree(tiny_run, bare, ignore=shutil.ignore_patterns("prior", "codes", "report.html"))
    text = write_report(Run(bare)).read_text()
    assert f"no prior yet: `vqvae prior {bare}` trains one" in text
    assert "no code histogram" in text
    assert len(_images(text)) == 2 + 2 + 1 + 12  # 2 curves, usage and perplexity, reconstructions, grids
    embedded, _ = _figures(text)
    assert "nll_bits_per_latent" not in embedded and embedded["images"] == 500


def test_code_grid_image_colours_each_code():
    import numpy as np

    from vqvae.html_report import code_colours, code_grid_image

    codes = torch.tensor([[0, 1], [2, 0]])
    image = np.asarray(code_grid_image(codes, 3, cell=10))
    colours = code_colours(3)
    assert len({tuple(c) for c in colours}) == 3
    for (i, j), k in np.ndenumerate(codes.numpy()):
        assert tuple(image[i * 10 + 1, j * 10 + 1]) == tuple(colours[k])  # a corner, away from the label


def test_report_without_matplotlib_is_one_line(tiny_run, tmp_path, monkeypatch, capsys):
    import sys

    from vqvae.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    assert main(["report", str(tiny_run), "-o", str(tmp_path / "r.html")]) == 2
    assert "pip install 'vqvae[report]'" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()
