"""The KL autoencoder of latent diffusion (diffusers' ``AutoencoderKL``), NHWC.

``encode`` returns a :class:`DiagonalGaussian` posterior over latents; ``decode`` maps latents back to
images. Latents given to a diffusion model are ``(posterior.sample(key=key) - shift) * scaling_factor``
(:meth:`AutoencoderKL.scale_latents`), and decoded after :meth:`AutoencoderKL.unscale_latents`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jdiff.models import layers
from jdiff.models.configs import VAEConfig

__all__ = ["AutoencoderKL", "DiagonalGaussian", "Encoder", "Decoder"]

Dtype = Any
_EPS = 1e-6


@flax.struct.dataclass
class DiagonalGaussian:
  """A diagonal Gaussian over latents, parameterised like diffusers' ``DiagonalGaussianDistribution``
  (log-variance clipped to [-30, 20]).

  Attributes:
    mean: [B, h, w, C] float32.
    logvar: [B, h, w, C] float32.

  Example:
    >>> post = vae.apply({"params": params}, images, method=AutoencoderKL.encode)
    >>> z = post.sample(key=jax.random.key(0))
  """

  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
    """Splits [B, h, w, 2C] moments into mean and (clipped) log-variance along channels."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> jax.Array:
    return jnp.exp(self.logvar)

  def reparameterize(self, noise: jax.Array) -> jax.Array:
    """``mean + std * noise`` for standard-normal ``noise`` of the latent shape."""
    return self.mean + self.std * noise

  def sample(self, *, key: jax.Array) -> jax.Array:
    """A reparameterised sample (differentiable in mean and logvar)."""
    return self.reparameterize(jax.random.normal(key, self.mean.shape, jnp.float32))

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self) -> jax.Array:
    """KL divergence to the standard normal, summed over latent dimensions: [B]."""
    return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


def _resnet_cls(remat: bool | str):
  return layers.remat_module(layers.ResnetBlock2D, remat, static_argnums=(3,))


class _VAEMidBlock(nn.Module):
  """``UNetMidBlock2D`` without time embedding: resnet, [spatial attention], resnet."""

  features: int
  groups: int
  add_attention: bool = True
  remat: bool | str = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    resnet = _resnet_cls(self.remat)
    x = resnet(self.features, groups=self.groups, eps=_EPS, dtype=self.dtype,
               name="resnets_0")(x, None, False)
    if self.add_attention:
      x = layers.SpatialAttention(groups=self.groups, eps=_EPS, dtype=self.dtype,
                                  name="attentions_0")(x)
    return resnet(self.features, groups=self.groups, eps=_EPS, dtype=self.dtype,
                  name="resnets_1")(x, None, False)


class _EncoderBlock(nn.Module):
  features: int
  num_layers: int
  groups: int
  add_downsample: bool
  remat: bool | str = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    resnet = _resnet_cls(self.remat)
    for j in range(self.num_layers):
      x = resnet(self.features, groups=self.groups, eps=_EPS, dtype=self.dtype,
                 name=f"resnets_{j}")(x, None, False)
    if self.add_downsample:
      x = layers.Downsample2D(self.features, padding=0, dtype=self.dtype, name="downsamplers_0")(x)
    return x


class _DecoderBlock(nn.Module):
  features: int
  num_layers: int
  groups: int
  add_upsample: bool
  remat: bool | str = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    resnet = _resnet_cls(self.remat)
    for j in range(self.num_layers):
      x = resnet(self.features, groups=self.groups, eps=_EPS, dtype=self.dtype,
                 name=f"resnets_{j}")(x, None, False)
    if self.add_upsample:
      x = layers.Upsample2D(self.features, dtype=self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """Images [B, H, W, in] -> moments [B, H/f, W/f, 2 * latent_channels]."""

  config: VAEConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, dtype = self.config, self.config.compute_dtype
    ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
    h = nn.Conv(ch[0], (3, 3), padding=1, dtype=dtype, name="conv_in")(x.astype(dtype))
    for i in range(n):
      h = _EncoderBlock(ch[i], cfg.layers_per_block, cfg.norm_num_groups, i < n - 1, remat=cfg.remat,
                        dtype=dtype, name=f"down_blocks_{i}")(h)
    h = _VAEMidBlock(ch[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, remat=cfg.remat,
                     dtype=dtype, name="mid_block")(h)
    h = nn.GroupNorm(num_groups=cfg.norm_num_groups, epsilon=_EPS, dtype=dtype, use_fast_variance=False,
                     name="conv_norm_out")(h)
    h = nn.silu(h)
    return nn.Conv(2 * cfg.latent_channels, (3, 3), padding=1, dtype=dtype, name="conv_out")(h)


class Decoder(nn.Module):
  """Latents [B, h, w, latent_channels] -> images [B, h*f, w*f, out]."""

  config: VAEConfig

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    cfg, dtype = self.config, self.config.compute_dtype
    ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
    h = nn.Conv(ch[-1], (3, 3), padding=1, dtype=dtype, name="conv_in")(z.astype(dtype))
    h = _VAEMidBlock(ch[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, remat=cfg.remat,
                     dtype=dtype, name="mid_block")(h)
    for i in range(n):
      h = _DecoderBlock(ch[n - 1 - i], cfg.layers_per_block + 1, cfg.norm_num_groups, i < n - 1,
                        remat=cfg.remat, dtype=dtype, name=f"up_blocks_{i}")(h)
    h = nn.GroupNorm(num_groups=cfg.norm_num_groups, epsilon=_EPS, dtype=dtype, use_fast_variance=False,
                     name="conv_norm_out")(h)
    h = nn.silu(h)
    return nn.Conv(cfg.out_channels, (3, 3), padding=1, dtype=dtype, name="conv_out")(h)


class AutoencoderKL(nn.Module):
  """Variational autoencoder with a diagonal Gaussian posterior, equal to diffusers' ``AutoencoderKL``.

  Attributes:
    config: a :class:`~jdiff.models.configs.VAEConfig`.

  Example:
    >>> vae = AutoencoderKL(VAEConfig.tiny())
    >>> x = jnp.zeros((1, 32, 32, 3))
    >>> params = vae.init(jax.random.key(0), x)["params"]
    >>> post = vae.apply({"params": params}, x, method=AutoencoderKL.encode)
    >>> vae.apply({"params": params}, post.mode(), method=AutoencoderKL.decode).shape
    (1, 32, 32, 3)
  """

  config: VAEConfig

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    dtype = cfg.compute_dtype
    if cfg.use_quant_conv:
      self.quant_conv = nn.Conv(2 * cfg.latent_channels, (1, 1), dtype=dtype)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1), dtype=dtype)

  def encode(self, x: jax.Array) -> DiagonalGaussian:
    """Images [B, H, W, in_channels] (in [-1, 1]) -> posterior over [B, H/f, W/f, latent_channels]."""
    cfg = self.config
    if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
      raise ValueError(f"VAE expects images [B, H, W, {cfg.in_channels}], got {x.shape}")
    f = cfg.downsample_factor
    if x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f"image height and width must be divisible by {f}, got {x.shape}")
    moments = self.encoder(x)  # [B, h, w, 2C]
    if cfg.use_quant_conv:
      moments = self.quant_conv(moments)
    return DiagonalGaussian.from_moments(moments)

  def decode(self, z: jax.Array) -> jax.Array:
    """Latents [B, h, w, latent_channels] (unscaled) -> float32 images [B, h*f, w*f, out_channels]."""
    cfg = self.config
    if z.ndim != 4 or z.shape[-1] != cfg.latent_channels:
      raise ValueError(f"VAE decode expects latents [B, h, w, {cfg.latent_channels}], got {z.shape}")
    z = z.astype(cfg.compute_dtype)
    if cfg.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> tuple[jax.Array, DiagonalGaussian]:
    """Reconstructs ``x`` for training: returns (reconstruction, posterior).

    Decodes a posterior sample drawn with ``key``, or the posterior mode when ``key`` is None.
    """
    posterior = self.encode(x)
    z = posterior.mode() if key is None else posterior.sample(key=key)
    return self.decode(z), posterior

  def scale_latents(self, z: jax.Array) -> jax.Array:
    """``(z - shift_factor) * scaling_factor``: latents as the diffusion model sees them."""
    shift = self.config.shift_factor or 0.0
    return (z - shift) * self.config.scaling_factor

  def unscale_latents(self, z: jax.Array) -> jax.Array:
    """Inverse of :meth:`scale_latents`."""
    shift = self.config.shift_factor or 0.0
    return z / self.config.scaling_factor + shift
