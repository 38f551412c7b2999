"""vqvae: discrete representations with Vector-Quantized VAEs, learned priors, sampling and compression."""

from .autoencoders import VQVAE
from .config import ModelConfig, PriorConfig, QuantizerConfig, TrainConfig
from .quantizers import EMAVectorQuantizer, Quantized, VectorQuantizer, build_quantizer

__version__ = "0.1.0"
__all__ = ["VQVAE", "ModelConfig", "PriorConfig", "QuantizerConfig", "TrainConfig", "EMAVectorQuantizer",
           "Quantized", "VectorQuantizer", "build_quantizer"]
