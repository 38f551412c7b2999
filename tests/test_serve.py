"""The local web page: its API through Starlette's test client, then the page itself in Chromium (Playwright)."""

import base64
import io
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("starlette", reason="the `serve` extra (starlette, uvicorn) is not installed")
pytest.importorskip("httpx", reason="httpx (Starlette's test client) is not installed")
from starlette.testclient import TestClient  # noqa: E402

from vqvae.run import Run  # noqa: E402
from vqvae.serve import create_app  # noqa: E402

CHROMIUM = "/usr/bin/chromium"


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(uri: str) -> np.ndarray:
    """The uint8 pixels of a PNG data: URI."""
    assert uri.startswith("data:image/png;base64,")
    return np.array(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


def a_digit() -> Image.Image:
    """A white stroke on black, 100x100: a '1' as someone would draw it."""
    image = Image.new("L", (100, 100), 0)
    image.paste(255, (45, 15, 58, 85))
    return image


@pytest.fixture(scope="module")
def client(tiny_run):
    return TestClient(create_app(Run(tiny_run)))


def test_info(client):
    info = client.get("/api/info").json()
    assert info["image_size"] == [28, 28] and info["channels"] == 1 and info["grid"] == [7, 7]
    assert info["codebook_size"] == 16 and info["classes"] == 10 and info["has_prior"]
    assert len(info["colours"]) == 16 and len(set(info["colours"])) == 16


def test_encode_answers_the_models_codes_and_the_file_sizes(client, tiny_run):
    answer = client.post("/api/encode", content=png(a_digit())).json()
    # the input as the model sees it is 8-bit exact: encode it again independently
    x = torch.from_numpy(pixels(answer["input"])).float()[None] / 255  # (1, 28, 28)
    run = Run(tiny_run)
    model = run.model()
    assert answer["codes"] == model.encode(x[None]).codes[0].tolist()
    assert np.array_equal(pixels(answer["recon"]), (model.decode(model.encode(x[None]))[0, 0] * 255).round().byte().numpy())
    sizes = answer["sizes"]
    assert sizes["vqz"] == len(run.compress([x])[0])
    assert sizes["png"] > 0 and sizes["webp"] > 0 and 1 <= sizes["webp_quality"] <= 100


def test_transparent_pixels_count_as_black(client):
    opaque = client.post("/api/encode", content=png(a_digit())).json()
    rgba = Image.new("RGBA", (100, 100), (255, 0, 0, 0))  # transparent red: black once flattened
    rgba.paste((255, 255, 255, 255), (45, 15, 58, 85))
    assert client.post("/api/encode", content=png(rgba)).json()["input"] == opaque["input"]


@pytest.mark.parametrize("body, status, message", [
    (b"", 400, "empty"),
    (b"hello, not an image", 400, "not an image"),
    (png(Image.new("L", (100, 100)))[:60], 400, "not an image"),  # a truncated PNG
    (png(Image.new("L", (4097, 4096))), 413, "4097x4096"),
    (png(Image.new("I;16", (20, 20))), 415, "I;16"),
    (b"\0" * ((4 << 20) + 1), 413, "bytes"),
])
def test_bad_uploads_are_4xx_with_one_line(client, body, status, message):
    response = client.post("/api/encode", content=body)
    assert response.status_code == status
    assert message in response.json()["error"] and "\n" not in response.json()["error"]


def test_cmyk_is_refused(client):
    buffer = io.BytesIO()
    Image.new("CMYK", (20, 20)).save(buffer, format="JPEG")
    response = client.post("/api/encode", content=buffer.getvalue())
    assert response.status_code == 415 and "CMYK (4 channels)" in response.json()["error"]


def test_decode_and_its_bad_inputs(client, tiny_run):
    codes = [[(i * 7 + j) % 16 for j in range(7)] for i in range(7)]
    answer = client.post("/api/decode", json={"codes": codes}).json()
    expected = Run(tiny_run).model().decode(torch.tensor([codes]))[0, 0]
    assert np.array_equal(pixels(answer["recon"]), (expected * 255).round().byte().numpy())
    for bad in ([[16] * 7] * 7, [[-1] * 7] * 7, [[0] * 7] * 6, [["a"] * 7] * 7, [[0.5] * 7] * 7, [[True] * 7] * 7, None, "x"):
        response = client.post("/api/decode", json={"codes": bad})
        assert response.status_code == 422 and "7x7 grid of integers in 0..15" in response.json()["error"]
    response = client.post("/api/decode", content=b"{not json")
    assert response.status_code == 400 and "not JSON" in response.json()["error"]


def test_sample_per_class_reproducible(client, tiny_run):
    first = client.post("/api/sample", json={"label": 3, "seed": 5}).json()
    assert first == client.post("/api/sample", json={"label": 3, "seed": 5}).json()
    assert first["label"] == 3 and np.array(first["codes"]).shape == (7, 7)
    decoded = client.post("/api/decode", json={"codes": first["codes"]}).json()
    assert decoded["recon"] == first["recon"]
    for bad in ({"label": 10, "seed": 1}, {"label": "3", "seed": 1}, {"label": 1, "seed": -1}):
        response = client.post("/api/sample", json=bad)
        assert response.status_code == 422, bad


def test_a_run_without_prior_encodes_and_refuses_to_sample(tiny_run, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_run, bare, ignore=shutil.ignore_patterns("prior", "codes", "report.html"))
    client = TestClient(create_app(Run(bare)))
    assert client.get("/api/info").json()["has_prior"] is False
    answer = client.post("/api/encode", content=png(a_digit())).json()
    assert answer["sizes"] is None and np.array(answer["codes"]).shape == (7, 7)
    response = client.post("/api/sample", json={"seed": 1})
    assert response.status_code == 409 and "vqvae prior" in response.json()["error"]


def test_a_run_that_cannot_compress_is_a_409(tiny_run, tmp_path):
    broken = tmp_path / "broken"  # a prior without its integer model, and no training codes to make one
    shutil.copytree(tiny_run, broken, ignore=shutil.ignore_patterns("integer", "codes", "report.html"))
    client = TestClient(create_app(Run(broken)))
    response = client.post("/api/encode", content=png(a_digit()))
    assert response.status_code == 409 and "vqvae prior" in response.json()["error"]


# -- the page in a browser ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run):
    """uvicorn serving the tiny run's app on a free port, in a thread -> its URL."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(Run(tiny_run)), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright (the `test` extra) is not installed")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` (make test does it as root)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page()
    page.set_default_timeout(15000)
    page.goto(server)
    page.wait_for_selector("body[data-ready='1']")
    yield page
    page.close()


def _draw_a_one(page) -> None:
    box = page.locator("#canvas").bounding_box()
    for (x0, y0), (x1, y1) in (((0.5, 0.15), (0.5, 0.85)), ((0.4, 0.25), (0.5, 0.15))):
        page.mouse.move(box["x"] + x0 * box["width"], box["y"] + y0 * box["height"])
        page.mouse.down()
        for t in np.linspace(0, 1, 8):
            page.mouse.move(box["x"] + (x0 + t * (x1 - x0)) * box["width"], box["y"] + (y0 + t * (y1 - y0)) * box["height"])
        page.mouse.up()


def test_page_draw_encode_and_edit_a_code(page, tiny_run):
    _draw_a_one(page)
    page.click("#encode")
    page.wait_for_selector("#vqz-bytes")
    assert page.locator("#grid .cell").count() == 49
    recon = page.get_attribute("#recon", "src")
    assert pixels(recon).shape == (28, 28)
    # what the page shows is what the run gives for the input it shows: the strokes reached the model
    x = torch.from_numpy(pixels(page.get_attribute("#input", "src"))).float()[None] / 255
    assert x.max() == 1 and x.mean() > 0.02
    run = Run(tiny_run)
    assert int(page.text_content("#vqz-bytes")) == len(run.compress([x])[0])
    codes = run.model().encode(x[None]).codes[0]
    cells = page.locator("#grid .cell")
    assert [int(c) for c in cells.all_text_contents()] == codes.flatten().tolist()

    # edit: cycle one code until the picture changes (the next code may decode to the same 8-bit pixels)
    before = int(page.text_content("#grid .cell[data-i='3'][data-j='3']"))
    for step in range(1, 16):
        page.click("#grid .cell[data-i='3'][data-j='3']")
        page.wait_for_selector("body[data-busy='0']")
        assert int(page.text_content("#grid .cell[data-i='3'][data-j='3']")) == (before + step) % 16
        if page.get_attribute("#recon", "src") != recon:
            break
    assert page.text_content("#recon-title").startswith("decoded")
    edited = codes.clone()
    edited[3, 3] = (before + step) % 16
    shown = pixels(page.get_attribute("#recon", "src"))
    assert not np.array_equal(shown, pixels(recon))
    assert np.array_equal(shown, (run.model().decode(edited[None])[0, 0] * 255).round().byte().numpy())


def test_page_upload_of_a_non_image_shows_the_error(page, tmp_path):
    page.set_input_files("#upload", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"just text"}])
    page.wait_for_function("document.querySelector('#error').textContent.length > 0")
    assert "not an image" in page.text_content("#error")
    assert page.locator("#grid .cell").count() == 0


def test_page_samples_a_class(page):
    page.select_option("#label", "7")
    page.click("#sample")
    page.wait_for_function("document.querySelector('#recon-title').textContent == 'sample of class 7'")
    assert page.locator("#grid .cell").count() == 49
    assert pixels(page.get_attribute("#recon", "src")).shape == (28, 28)


def test_cli_serve_binds_localhost_by_default(tiny_run, monkeypatch, capsys):
    import vqvae
    from vqvae.cli import main

    calls = []
    monkeypatch.setattr(vqvae, "run_server",
                        lambda run, host, port, announce: calls.append((run.path, host, port)) or announce())
    assert main(["serve", str(tiny_run)]) == 0
    assert calls == [(tiny_run, "127.0.0.1", 8000)]
    assert "serving" in capsys.readouterr().err
    assert main(["serve", str(tiny_run / "nothing-here")]) == 2
    assert "nothing-here" in capsys.readouterr().err


def test_a_vqvae2_run_is_refused_in_one_line(tiny_vqvae2_run, capsys):
    from vqvae.cli import main

    assert main(["serve", str(tiny_vqvae2_run)]) == 2
    err = capsys.readouterr().err
    assert "two grids" in err and "serving" not in err and err.strip().count("\n") == 0
