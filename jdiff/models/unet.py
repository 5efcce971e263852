"""The conditional 2-D UNet of latent diffusion (diffusers' ``UNet2DConditionModel``), NHWC.

Structure (parameter names = diffusers' module names with list indices joined by ``_``)::

  conv_in -> down_blocks_i (resnets_j [+ attentions_j], downsamplers_0) -> mid_block
          -> up_blocks_i (resnets_j on [h, skip] [+ attentions_j], upsamplers_0)
          -> conv_norm_out -> silu -> conv_out
  time_embedding (linear_1, linear_2) on the sinusoidal timestep features, class_embedding optional,
  add_embedding (linear_1, linear_2) for SDXL's "text_time" conditioning (pooled text + time ids).

ControlNet residuals: ``down_residuals`` (one per skip connection, in order) are added to the skips and
``mid_residual`` to the middle block output, exactly as diffusers' ``down_block_additional_residuals`` /
``mid_block_additional_residual``.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.models import layers
from jdiff.models.configs import UNetConfig

__all__ = ["UNet", "DownBlock", "MidBlock", "UpBlock", "class_embedding", "addition_embedding"]

Dtype = Any


def _resnet_cls(remat: bool | str):
  return layers.remat_module(layers.ResnetBlock2D, remat, static_argnums=(3,))


class DownBlock(nn.Module):
  """``CrossAttnDownBlock2D`` (``attention=True``) or ``DownBlock2D``; returns (h, skips)."""

  features: int
  num_layers: int
  attention: bool
  add_downsample: bool
  heads: int = 1
  transformer_layers: int = 1
  groups: int = 32
  eps: float = 1e-5
  downsample_padding: int = 1
  use_linear_projection: bool = False
  upcast_attention: bool = False
  dropout: float = 0.0
  remat: bool | str = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, context, train: bool = False):
    resnet = _resnet_cls(self.remat)
    skips = []
    for j in range(self.num_layers):
      x = resnet(self.features, groups=self.groups, eps=self.eps, dropout=self.dropout,
                 dtype=self.dtype, name=f"resnets_{j}")(x, temb, train)
      if self.attention:
        x = _transformer(self, f"attentions_{j}")(x, context, train)
      skips.append(x)
    if self.add_downsample:
      x = layers.Downsample2D(self.features, padding=self.downsample_padding, dtype=self.dtype,
                              name="downsamplers_0")(x)
      skips.append(x)
    return x, skips


def _transformer(block, name: str) -> layers.Transformer2D:
  return layers.Transformer2D(block.heads, block.features // block.heads,
                              num_layers=block.transformer_layers, groups=block.groups,
                              use_linear_projection=block.use_linear_projection,
                              upcast_attention=block.upcast_attention, dropout=block.dropout,
                              remat=block.remat, dtype=block.dtype, name=name)


class MidBlock(nn.Module):
  """``UNetMidBlock2DCrossAttn``: resnet, then (transformer, resnet) pairs."""

  features: int
  heads: int = 1
  transformer_layers: int = 1
  groups: int = 32
  eps: float = 1e-5
  output_scale_factor: float = 1.0
  use_linear_projection: bool = False
  upcast_attention: bool = False
  dropout: float = 0.0
  remat: bool | str = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, context, train: bool = False):
    resnet = _resnet_cls(self.remat)

    def res(name):
      return resnet(self.features, groups=self.groups, eps=self.eps, dropout=self.dropout,
                    output_scale_factor=self.output_scale_factor, dtype=self.dtype, name=name)

    x = res("resnets_0")(x, temb, train)
    x = _transformer(self, "attentions_0")(x, context, train)
    return res("resnets_1")(x, temb, train)


class UpBlock(nn.Module):
  """``CrossAttnUpBlock2D`` (``attention=True``) or ``UpBlock2D``: each resnet eats one skip."""

  features: int
  num_layers: int
  attention: bool
  add_upsample: bool
  heads: int = 1
  transformer_layers: int = 1
  groups: int = 32
  eps: float = 1e-5
  use_linear_projection: bool = False
  upcast_attention: bool = False
  dropout: float = 0.0
  remat: bool | str = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, skips: Sequence[jax.Array], temb, context, train: bool = False):
    resnet = _resnet_cls(self.remat)
    skips = list(skips)
    for j in range(self.num_layers):
      skip = skips.pop()
      x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)  # [B, H, W, C + C_skip]
      x = resnet(self.features, groups=self.groups, eps=self.eps, dropout=self.dropout,
                 dtype=self.dtype, name=f"resnets_{j}")(x, temb, train)
      if self.attention:
        x = _transformer(self, f"attentions_{j}")(x, context, train)
    if self.add_upsample:
      x = layers.Upsample2D(self.features, dtype=self.dtype, name="upsamplers_0")(x)
    return x


class UNet(nn.Module):
  """Conditional UNet, numerically equal to diffusers' ``UNet2DConditionModel`` for the same weights.

  Attributes:
    config: a :class:`~jdiff.models.configs.UNetConfig`.

  Example:
    >>> unet = UNet(UNetConfig.tiny())
    >>> x, t, ctx = jnp.zeros((1, 16, 16, 4)), jnp.array([10]), jnp.zeros((1, 7, 32))
    >>> params = unet.init(jax.random.key(0), x, t, ctx)["params"]
    >>> unet.apply({"params": params}, x, t, ctx).shape
    (1, 16, 16, 4)

  An SDXL-style UNet (``addition_embed_type="text_time"``) also takes the pooled text and the time ids,
  diffusers' ``added_cond_kwargs={"text_embeds": ..., "time_ids": ...}`` as keyword arguments:

    >>> cfg = UNetConfig.tiny(addition_embed_type="text_time", addition_time_embed_dim=8,
    ...                       projection_class_embeddings_input_dim=32 + 6 * 8)
    >>> pooled, ids = jnp.zeros((1, 32)), jnp.array([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])
    >>> params = UNet(cfg).init(jax.random.key(0), x, t, ctx, text_embeds=pooled, time_ids=ids)["params"]
    >>> UNet(cfg).apply({"params": params}, x, t, ctx, text_embeds=pooled, time_ids=ids).shape
    (1, 16, 16, 4)
  """

  config: UNetConfig

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, encoder_hidden_states: jax.Array, *,
               down_residuals: Sequence[jax.Array] | None = None,
               mid_residual: jax.Array | None = None, class_labels: jax.Array | None = None,
               timestep_cond: jax.Array | None = None, text_embeds: jax.Array | None = None,
               time_ids: jax.Array | None = None, train: bool = False) -> jax.Array:
    """Predicts the model output for a batch.

    Args:
      x: noisy input [B, H, W, in_channels]; H and W divisible by 2^(levels - 1).
      t: timesteps [B] (int or float) or a scalar.
      encoder_hidden_states: conditioning [B, L, cross_attention_dim].
      down_residuals: ControlNet residuals, one per skip connection ([B, h, w, c] each).
      mid_residual: ControlNet residual for the middle block output.
      class_labels: [B] int labels (label embedding), [B] timesteps ("timestep") or [B, D] vectors.
      timestep_cond: [B, time_cond_proj_dim] when the config has ``time_cond_proj_dim``.
      text_embeds: pooled text [B, P] for ``addition_embed_type="text_time"`` (SDXL).
      time_ids: micro-conditioning [B, N] for "text_time", with P + N x ``addition_time_embed_dim`` =
        ``projection_class_embeddings_input_dim`` (SDXL base: original height, width, crop top, left,
        target height, width; the refiner: original height, width, crop top, left, aesthetic score).
      train: enables dropout (needs a "dropout" rng when ``config.dropout`` > 0).

    Returns:
      float32 [B, H, W, out_channels].
    """
    cfg = self.config
    dtype = cfg.compute_dtype
    b, hgt, wid, c = x.shape
    if c != cfg.in_channels:
      raise ValueError(f"UNet expects {cfg.in_channels} input channels, got x of shape {x.shape}")
    factor = 2 ** (cfg.num_levels - 1)
    if hgt % factor or wid % factor:
      raise ValueError(f"UNet input height and width must be divisible by {factor}, got {x.shape}")
    if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b:
      raise ValueError(f"encoder_hidden_states must be [B={b}, L, D], got {encoder_hidden_states.shape}")
    t = jnp.asarray(t)
    if t.ndim == 0:
      t = jnp.broadcast_to(t, (b,))
    if t.shape != (b,):
      raise ValueError(f"timesteps must have shape [{b}] or be a scalar, got {t.shape}")

    heads = cfg.heads_per_block()
    layers_per = cfg.per_block("layers_per_block")
    tlayers = cfg.per_block("transformer_layers_per_block")
    ch = cfg.block_out_channels
    n = cfg.num_levels
    common = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                  use_linear_projection=cfg.use_linear_projection,
                  upcast_attention=cfg.upcast_attention, dropout=cfg.dropout, remat=cfg.remat,
                  dtype=dtype)
    context = encoder_hidden_states.astype(dtype)  # [B, L, D]

    if cfg.center_input_sample:
      x = 2.0 * x - 1.0
    # Time (and class) embedding.
    t_feat = layers.timestep_embedding(t, ch[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                       freq_shift=cfg.freq_shift)  # [B, C0]
    emb = layers.TimestepEmbedding(cfg.time_embed_dim, cond_proj_dim=cfg.time_cond_proj_dim,
                                   dtype=dtype, name="time_embedding")(t_feat, timestep_cond)
    emb = emb + class_embedding(cfg, class_labels, b, ch[0], dtype)  # [B, T]
    emb = emb + addition_embedding(cfg, text_embeds, time_ids, b, dtype)  # [B, T]

    h = nn.Conv(ch[0], (cfg.conv_in_kernel,) * 2, padding=(cfg.conv_in_kernel - 1) // 2, dtype=dtype,
                name="conv_in")(x.astype(dtype))  # [B, H, W, C0]
    skips = [h]
    for i, block_type in enumerate(cfg.down_block_types):
      h, res = DownBlock(ch[i], layers_per[i], block_type == "CrossAttnDownBlock2D",
                         add_downsample=i < n - 1, heads=heads[i], transformer_layers=tlayers[i],
                         downsample_padding=cfg.downsample_padding, name=f"down_blocks_{i}",
                         **common)(h, emb, context, train)
      skips.extend(res)

    if down_residuals is not None:
      if len(down_residuals) != len(skips):
        raise ValueError(f"down_residuals has {len(down_residuals)} tensors, the UNet has "
                         f"{len(skips)} skip connections")
      for k, (s, r) in enumerate(zip(skips, down_residuals)):
        if r.shape != s.shape:
          raise ValueError(f"down_residuals[{k}] has shape {r.shape}, expected {s.shape}")
      skips = [s + r.astype(dtype) for s, r in zip(skips, down_residuals)]

    if cfg.mid_block_type is not None:
      h = MidBlock(ch[-1], heads=heads[-1], transformer_layers=tlayers[-1],
                   output_scale_factor=cfg.mid_block_scale_factor, name="mid_block",
                   **common)(h, emb, context, train)
    if mid_residual is not None:
      if mid_residual.shape != h.shape:
        raise ValueError(f"mid_residual has shape {mid_residual.shape}, expected {h.shape}")
      h = h + mid_residual.astype(dtype)

    for i, block_type in enumerate(cfg.up_block_types):
      level = n - 1 - i
      num = layers_per[level] + 1
      res, skips = skips[len(skips) - num:], skips[:len(skips) - num]
      h = UpBlock(ch[level], num, block_type == "CrossAttnUpBlock2D", add_upsample=i < n - 1,
                  heads=heads[level], transformer_layers=tlayers[level], name=f"up_blocks_{i}",
                  **common)(h, res, emb, context, train)

    h = nn.GroupNorm(num_groups=cfg.norm_num_groups, epsilon=cfg.norm_eps, dtype=dtype,
                     use_fast_variance=False, name="conv_norm_out")(h)
    h = nn.silu(h)
    h = nn.Conv(cfg.out_channels, (cfg.conv_out_kernel,) * 2, padding=(cfg.conv_out_kernel - 1) // 2,
                dtype=dtype, name="conv_out")(h)
    return h.astype(jnp.float32)  # [B, H, W, out_channels]


def class_embedding(cfg: UNetConfig, labels: jax.Array | None, b: int, c0: int, dtype) -> jax.Array:
  """The class embedding added to the time embedding ([B, T]), zero without class conditioning.

  Call it inside a compact module: its submodule is named "class_embedding" in the caller's scope
  (the UNet, and the ControlNet that copies it).
  """
  kind = cfg.class_embed_type
  if kind is None and cfg.num_class_embeds is None:
    return jnp.zeros((b, cfg.time_embed_dim), dtype)
  if labels is None:
    raise ValueError("this UNet is class-conditional: pass class_labels")
  labels = jnp.asarray(labels)
  if labels.shape[0] != b:
    raise ValueError(f"class_labels must have batch size {b}, got shape {labels.shape}")
  if kind is None:
    out = nn.Embed(cfg.num_class_embeds, cfg.time_embed_dim, name="class_embedding")(labels)
  elif kind == "timestep":
    feat = layers.timestep_embedding(labels, c0, flip_sin_to_cos=cfg.flip_sin_to_cos,
                                     freq_shift=cfg.freq_shift)
    out = layers.TimestepEmbedding(cfg.time_embed_dim, dtype=dtype, name="class_embedding")(feat)
  elif kind == "identity":
    out = labels
  elif kind == "projection":
    out = layers.TimestepEmbedding(cfg.time_embed_dim, dtype=dtype, name="class_embedding")(labels)
  else:  # simple_projection
    out = nn.Dense(cfg.time_embed_dim, dtype=dtype, name="class_embedding")(labels.astype(dtype))
  if out.shape != (b, cfg.time_embed_dim):
    raise ValueError(f"class embedding has shape {out.shape}, expected {(b, cfg.time_embed_dim)}")
  return out.astype(dtype)


def addition_embedding(cfg: UNetConfig, text_embeds: jax.Array | None, time_ids: jax.Array | None, b: int,
                       dtype) -> jax.Array:
  """The additional embedding added to the time embedding ([B, T]), zero without ``addition_embed_type``.

  For "text_time" (SDXL): each time id gets the sinusoidal embedding of width
  ``addition_time_embed_dim`` (the UNet's ``flip_sin_to_cos`` / ``freq_shift``), the [B, N x width]
  result is appended to ``text_embeds`` and sent through a two-layer MLP. Call it inside a compact
  module: its submodule is named "add_embedding" in the caller's scope.
  """
  if cfg.addition_embed_type is None:
    for name, value in (("text_embeds", text_embeds), ("time_ids", time_ids)):
      if value is not None:
        raise ValueError(f"{name} given but this UNet has no addition_embed_type (not an SDXL UNet)")
    return jnp.zeros((b, cfg.time_embed_dim), dtype)
  if text_embeds is None or time_ids is None:
    raise ValueError("this UNet has addition_embed_type='text_time' (SDXL): pass text_embeds [B, P] and "
                     "time_ids [B, N]")
  text_embeds, time_ids = jnp.asarray(text_embeds), jnp.asarray(time_ids)
  if text_embeds.ndim != 2 or time_ids.ndim != 2 or text_embeds.shape[0] != b or time_ids.shape[0] != b:
    raise ValueError(f"text_embeds and time_ids must be [B={b}, P] and [B={b}, N], got "
                     f"{text_embeds.shape} and {time_ids.shape}")
  width = text_embeds.shape[1] + time_ids.shape[1] * cfg.addition_time_embed_dim
  if width != cfg.projection_class_embeddings_input_dim:
    raise ValueError(f"text_embeds {text_embeds.shape} and time_ids {time_ids.shape} give "
                     f"{text_embeds.shape[1]} + {time_ids.shape[1]} x {cfg.addition_time_embed_dim} = {width} "
                     f"features, the UNet expects projection_class_embeddings_input_dim="
                     f"{cfg.projection_class_embeddings_input_dim}")
  ids = layers.timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                  flip_sin_to_cos=cfg.flip_sin_to_cos,
                                  freq_shift=cfg.freq_shift)  # [B * N, addition_time_embed_dim]
  ids = ids.reshape(b, time_ids.shape[1] * cfg.addition_time_embed_dim)  # [B, N x width]
  feats = jnp.concatenate([text_embeds.astype(jnp.float32), ids], axis=-1)  # [B, P + N x width]
  out = layers.TimestepEmbedding(cfg.time_embed_dim, dtype=dtype, name="add_embedding")(feats)
  return out.astype(dtype)
