"""Flax Linen networks: the conditional UNet, the KL autoencoder and the CLIP text encoder, with configs.

Example:
  >>> from jdiff.models import UNet, UNetConfig
  >>> unet = UNet(UNetConfig.sd15())
"""

from jdiff.models import layers
from jdiff.models.configs import UNetConfig, VAEConfig
from jdiff.models.dit import DiT, DiTConfig
from jdiff.models.mmdit import MMDiT, SD3Config
from jdiff.models.text import CLIPTextConfig, CLIPTextModel
from jdiff.models.unet import UNet
from jdiff.models.vae import AutoencoderKL, DiagonalGaussian

__all__ = ["layers", "UNet", "UNetConfig", "AutoencoderKL", "VAEConfig", "DiagonalGaussian",
           "CLIPTextConfig", "CLIPTextModel", "DiT", "DiTConfig", "MMDiT", "SD3Config"]
