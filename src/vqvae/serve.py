"""`vqvae serve RUN`: a local web page to draw or upload a digit, see its codes, edit them, decode, sample.

    app = create_app(Run("runs/demo"))          # a Starlette app (tests drive it with its TestClient)
    run_server(Run("runs/demo"), port=8000)     # uvicorn on 127.0.0.1:8000

Routes (JSON answers; every error is {"error": one line} with a 4xx status, never a 500 page):
    GET  /             the page (static/serve.html: canvas, upload, code grid, reconstruction, sizes)
    GET  /api/info     image size, channels, K, code grid shape, classes, whether there is a prior, code colours
    POST /api/encode   body: the bytes of a PNG/JPEG/WebP image -> codes (H', W'), the input as the model
                       sees it and its reconstruction (PNG data: URIs), PSNR, and the bytes of a .vqz file
                       (`Run.compress`), a PNG and the smallest WebP at least as sharp as the reconstruction
    POST /api/decode   {"codes": [[...]]} -> the decoded image
    POST /api/sample   {"label": int or null, "seed": int} -> codes drawn from the prior and their image

Uploads are scaled to the run's image size (what its prior models) after checks: at most
MAX_UPLOAD_BYTES bytes and MAX_UPLOAD_PIXELS pixels (413), an image Pillow reads (400), grayscale or RGB
with or without alpha (415). Transparent pixels count as black, the background of MNIST digits.
Model calls are serialised by one lock and run in a worker thread, so the event loop stays free.
"""

from __future__ import annotations

import io
import json
import threading
from importlib import resources

import numpy as np
import torch
from PIL import Image

from .errors import VQVAEError

MAX_UPLOAD_BYTES = 4 << 20
MAX_UPLOAD_PIXELS = 4096 * 4096
MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")  # what an upload may be: gray or colour, with alpha
WEBP_QUALITIES = (1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)


class BadRequest(Exception):
    """An input the page reports in one line, with its HTTP status (4xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def read_upload(data: bytes, size: tuple[int, int], channels: int, max_bytes: int = MAX_UPLOAD_BYTES,
                max_pixels: int = MAX_UPLOAD_PIXELS) -> torch.Tensor:
    """The bytes of an uploaded image -> float (C, H, W) in [0, 1] at `size` (H, W) with `channels`.

    Raises BadRequest: 400 empty or not an image, 413 too many bytes or pixels, 415 another mode
    (CMYK, 16-bit, float, ...)."""
    if not data:
        raise BadRequest(400, "the upload is empty: send a PNG, JPEG or WebP image")
    if len(data) > max_bytes:
        raise BadRequest(413, f"the upload is {len(data):,} bytes, more than the limit of {max_bytes:,}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise BadRequest(413, f"the image is {width}x{height}, more than {max_pixels:,} pixels")
            if img.mode not in MODES:
                raise BadRequest(415, f"the image is {img.mode} ({len(img.getbands())} channels): send a grayscale "
                                      "or RGB image")
            img.load()
            rgba = img.convert("RGBA")
    except BadRequest:
        raise
    except Image.DecompressionBombError:
        raise BadRequest(413, f"the image has more than {max_pixels:,} pixels") from None
    except (OSError, ValueError, SyntaxError):
        raise BadRequest(400, "the upload is not an image Pillow can read: send a PNG, JPEG or WebP image") from None
    background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    flat = Image.alpha_composite(background, rgba).convert("L" if channels == 1 else "RGB")
    flat = flat.resize((size[1], size[0]), Image.Resampling.BOX if flat.width >= size[1] else Image.Resampling.BICUBIC)
    arr = np.asarray(flat, dtype=np.float32).reshape(size[0], size[1], channels) / 255.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())  # (C, H, W)


def codec_sizes(run, x: torch.Tensor, x_hat: torch.Tensor) -> dict:
    """Bytes of one image x (C, H, W) as a .vqz file, a PNG, and the smallest WebP whose PSNR is at least
    the reconstruction x_hat's (or WebP's best quality when none is)."""
    from . import baselines
    from .data import to_uint8
    from .metrics import psnr

    target = float(psnr(x_hat[None], x[None]))
    vqz = len(run.compress([x])[0])
    png = len(baselines.encode_pil(to_uint8(x), "png", None))
    for quality in WEBP_QUALITIES:
        webp = baselines.rate_distortion(x[None], "webp", quality)
        if webp["psnr"] >= target:
            break
    return {"vqz": vqz, "png": png, "webp": int(webp["bytes_per_image"]), "webp_quality": quality,
            "webp_psnr": webp["psnr"], "psnr": target}


def _uri(x: torch.Tensor) -> str:
    from .html_report import data_uri, png_bytes

    return data_uri(png_bytes(x))


def create_app(run, max_upload_bytes: int = MAX_UPLOAD_BYTES, max_upload_pixels: int = MAX_UPLOAD_PIXELS):
    """The Starlette app of `run` (a `Run`, or a run directory). Loads the model (and prior) once."""
    try:
        from starlette.applications import Starlette
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import HTMLResponse, JSONResponse
        from starlette.routing import Route
    except ImportError:
        raise VQVAEError("vqvae serve needs starlette and uvicorn: pip install 'vqvae[serve]'") from None
    from .html_report import code_colours
    from .run import Run

    run = run if isinstance(run, Run) else Run(run)
    model = run.model()
    if model.cfg.dims != 2:
        raise VQVAEError(f"{run.path}: vqvae serve shows images; this run's model is {model.cfg.dims}-D")
    if not model.discrete or hasattr(model, "levels"):
        raise VQVAEError(f"{run.path}: vqvae serve edits one grid of codes per image; a {model.cfg.model!r} model "
                         f"has {'two grids' if model.discrete else 'continuous latents'}")
    size = tuple(run.config.get("data", {}).get("image_size") or (28, 28))
    channels, K = model.cfg.in_channels, model.cfg.quantizer.codebook_size
    prior = run.prior() if run.has_prior() else None
    classes = prior.cfg.num_classes if prior is not None else 0
    with torch.no_grad():
        grid = tuple(model.encode(torch.zeros(1, channels, *size)).codes.shape[1:])
    lock = threading.Lock()
    page = resources.files("vqvae").joinpath("static/serve.html").read_text()
    info = {"image_size": list(size), "channels": channels, "codebook_size": K, "grid": list(grid),
            "classes": classes, "has_prior": prior is not None,
            "colours": ["#%02x%02x%02x" % tuple(int(v) for v in c) for c in code_colours(K)]}

    def encode(data: bytes) -> dict:
        x = read_upload(data, size, channels, max_upload_bytes, max_upload_pixels)
        with lock, torch.no_grad():
            codes = model.encode(x[None]).codes[0]
            x_hat = model.decode(codes[None])[0]
            sizes = codec_sizes(run, x, x_hat) if prior is not None else None
        return {"codes": codes.tolist(), "input": _uri(x), "recon": _uri(x_hat), "sizes": sizes}

    def codes_from(body) -> torch.Tensor:
        rows = body.get("codes") if isinstance(body, dict) else None
        if not (isinstance(rows, list) and len(rows) == grid[0]
                and all(isinstance(row, list) and len(row) == grid[1] for row in rows)
                and all(type(k) is int and 0 <= k < K for row in rows for k in row)):  # bools and floats too
            raise BadRequest(422, f"codes must be a {grid[0]}x{grid[1]} grid of integers in 0..{K - 1}")
        return torch.tensor(rows, dtype=torch.long)

    def decode(body) -> dict:
        codes = codes_from(body)
        with lock:
            return {"recon": _uri(model.decode(codes[None])[0])}

    def sample(body) -> dict:
        if prior is None:
            raise BadRequest(409, f"this run has no prior yet: train one with `vqvae prior {run.path}`")
        body = body if isinstance(body, dict) else {}
        seed, label = body.get("seed", 0), body.get("label")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise BadRequest(422, "seed must be a non-negative integer")
        if classes and label is None:
            label = seed % classes
        if label is not None and (not classes or not isinstance(label, int) or not 0 <= label < classes):
            raise BadRequest(422, f"label must be an integer in 0..{classes - 1}" if classes else
                             "this prior has no classes: send no label")
        with lock:
            generator = torch.Generator(device=prior.device).manual_seed(seed)
            cond = torch.tensor([label], device=prior.device) if classes else None
            codes = prior.sample(1, cond, 1.0, None, generator)[0].cpu()
            return {"codes": codes.tolist(), "label": label, "recon": _uri(model.decode(codes[None])[0])}

    def endpoint(work, read):
        async def handle(request):
            try:
                payload = await read(request)
                return JSONResponse(await run_in_threadpool(work, payload))
            except BadRequest as e:
                return JSONResponse({"error": str(e)}, status_code=e.status)
            except VQVAEError as e:  # the run cannot do it (e.g. its prior's integer model is missing)
                return JSONResponse({"error": str(e)}, status_code=409)

        return handle

    async def body_bytes(request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_upload_bytes:
            raise BadRequest(413, f"the upload is {int(declared):,} bytes, more than the limit of {max_upload_bytes:,}")
        data = b""
        async for chunk in request.stream():
            data += chunk
            if len(data) > max_upload_bytes:
                raise BadRequest(413, f"the upload is more than the limit of {max_upload_bytes:,} bytes")
        return data

    async def body_json(request):
        try:
            return json.loads(await body_bytes(request))
        except ValueError:
            raise BadRequest(400, "the request body is not JSON") from None

    async def index(request):
        return HTMLResponse(page)

    async def get_info(request):
        return JSONResponse(info)

    return Starlette(routes=[Route("/", index), Route("/api/info", get_info),
                             Route("/api/encode", endpoint(encode, body_bytes), methods=["POST"]),
                             Route("/api/decode", endpoint(decode, body_json), methods=["POST"]),
                             Route("/api/sample", endpoint(sample, body_json), methods=["POST"])])


def run_server(run, host: str = "127.0.0.1", port: int = 8000, announce=None) -> None:
    """Serve `create_app(run)` with uvicorn until interrupted; `announce()` is called once the app is built
    (a run it refuses raises before)."""
    app = create_app(run)
    if announce is not None:
        announce()
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning")
