"""vqvae: discrete representations with Vector-Quantized VAEs, learned priors, sampling and compression.

    import vqvae
    run = vqvae.Run("runs/demo")                      # a run directory written by `vqvae train` / `vqvae prior`
    model, prior = run.model(), run.prior()
    encoded = model.encode(x)                         # x (B, C, H, W) in [0, 1], any H, W -> codes (B, H', W')
    x_hat = model.decode(encoded)                     # (B, C, H, W) in [0, 1]
    data, stats = run.compress([image])               # the bytes of a .vqz file (integer prior, range coder)
    images = run.decompress(data)
"""

from .autoencoders import DVAE, VQVAE, Autoencoder, Encoded, Output
from .continuous import AE, VAE, Latents
from .hierarchical import VQVAE2, Encoded2
from .integer_priors import IntegerPixelCNNPrior, IntegerPrior, IntegerTransformerPrior, load_integer_prior
from .models import build_model, load_model
from .quantizer_variants import FiniteScalarQuantizer, GumbelQuantizer, ResidualVectorQuantizer
from .config import ModelConfig, PriorConfig, QuantizerConfig, TrainConfig
from .data import (MAX_PIXELS, Dataset, check_outputs, load_codes, load_dataset, load_images, output_paths,
                   save_codes, save_image, to_channels, write_bytes)
from .errors import CodecError, ConfigError, DataError, RunError, VQVAEError
from .evaluate import (compression_table, encode_dataset, evaluate_autoencoder, evaluate_run, likelihood,
                       prior_figures)
from .priors import PixelCNNPrior, Prior, TransformerPrior, build_prior, load_prior, prior_bits
from .quantizers import EMAVectorQuantizer, Quantized, VectorQuantizer, build_quantizer
from .report import sample_images, save_grid, save_reconstructions
from .run import Run
from .html_report import write_report
from .serve import create_app, run_server
from .codec import compress, decompress, read_header
from .devices import set_threads, world
from .presets import PRESETS
from .streaming import write_shards
from .prior_training import train_prior
from .train import Stopped, train_autoencoder
from .compare import (MODEL_VARIANTS, compare_models, comparison_markdown, comparison_settings, comparison_table,
                      variant_config, write_comparison)
from .audio import is_audio_file, load_audio, save_wav
from .audio.pipeline import SPEECH_MODEL, audio_compression_table, sample_targets, save_audio_samples

__version__ = "0.1.0"
__all__ = [
    "VQVAE", "Encoded", "Output", "Autoencoder", "DVAE", "AE", "VAE", "Latents", "VQVAE2", "Encoded2",
    "build_model", "load_model",
    "IntegerPrior", "IntegerTransformerPrior", "IntegerPixelCNNPrior", "load_integer_prior",
    "FiniteScalarQuantizer", "GumbelQuantizer", "ResidualVectorQuantizer",
    "ModelConfig", "PriorConfig", "QuantizerConfig", "TrainConfig",
    "MAX_PIXELS", "Dataset", "check_outputs", "output_paths", "load_codes", "load_dataset", "load_images", "save_codes", "save_image", "to_channels", "write_bytes",
    "CodecError", "ConfigError", "DataError", "RunError", "VQVAEError",
    "compression_table", "encode_dataset", "evaluate_autoencoder", "evaluate_run", "likelihood", "prior_figures",
    "PixelCNNPrior", "Prior", "TransformerPrior", "build_prior", "load_prior", "prior_bits",
    "EMAVectorQuantizer", "Quantized", "VectorQuantizer", "build_quantizer",
    "sample_images", "save_grid", "save_reconstructions", "write_report", "create_app", "run_server",
    "Run", "compress", "decompress", "read_header",
    "Stopped", "set_threads", "train_autoencoder", "train_prior", "world",
    "PRESETS", "write_shards",
    "MODEL_VARIANTS", "compare_models", "comparison_markdown", "comparison_settings", "comparison_table",
    "variant_config", "write_comparison",
    "is_audio_file", "load_audio", "save_wav", "SPEECH_MODEL", "audio_compression_table", "sample_targets",
    "save_audio_samples",
]
