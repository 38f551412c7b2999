"""Named recipes: values for `vqvae train`'s options (`--preset NAME`); options given explicitly win.

imagenet128  the VQ-VAE paper's ImageNet model (van den Oord et al. 2017, section 4.1): 128x128 RGB crops
             into 32x32 codes (downsample 4: two stride-2 4x4 convolutions), 256 hidden channels, two
             residual blocks (ReLU, 3x3 conv, ReLU, 1x1 conv) of 256 channels in the encoder and, mirrored
             with transposed convolutions, the decoder; K=512 codes of D=64; EMA codebook. One difference:
             the first strided convolution has 128 channels (hidden / 2), as in the authors' Sonnet example.
"""

from __future__ import annotations

PRESETS: dict[str, dict[str, int]] = {
    "imagenet128": dict(image_size=128, hidden=256, res_hidden=256, res_blocks=2, downsample=4, encoder_kernel=3,
                        codebook_size=512, code_dim=64),
}
