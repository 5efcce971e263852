"""ControlNet (Zhang et al., 2023): a trainable copy of the UNet encoder steered by a control image.

The copy sees the noisy latent plus a hint embedding of the control image, and returns one residual
per UNet skip connection and one for the middle block, each through a zero-initialised 1x1
convolution, so an untrained ControlNet leaves the UNet's output unchanged. The residuals feed
:class:`jdiff.models.UNet` as ``down_residuals`` / ``mid_residual``. Parameter names follow
diffusers' ``ControlNetModel`` so its checkpoints convert by renaming (see
:mod:`jdiff.convert.controlnet`).

A ControlNet for SDXL (``addition_embed_type="text_time"`` in its UNet config) adds the UNet's
text-time embedding of the pooled text and the micro-conditioning time ids to its time embedding, as the
SDXL UNet does (``text_embeds=`` / ``time_ids=``).

Training keeps the UNet frozen: :func:`init_from_unet` copies the encoder weights into a fresh
ControlNet, and :mod:`jdiff.partition` labels ``{"unet": frozen, "controlnet": trainable}``.

Example:
  >>> cn = ControlNet(ControlNetConfig(unet=unet.config, conditioning_embedding_out_channels=(16, 32)))
  >>> cn_params = init_from_unet(unet_params, cn, x, t, ctx, hint, key=jax.random.key(0))
  >>> down, mid = cn.apply({"params": cn_params}, x, t, ctx, hint)
  >>> eps = unet.apply({"params": unet_params}, x, t, ctx, down_residuals=down, mid_residual=mid)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jdiff.models import layers
from jdiff.models.configs import UNetConfig
from jdiff.models.unet import DownBlock, MidBlock, addition_embedding, class_embedding

__all__ = ["ControlNetConfig", "ControlNet", "ConditioningEmbedding", "init_from_unet", "combine_residuals",
           "guidance_active", "ENCODER_PARAMS"]

# The UNet parameter groups a ControlNet copies (everything up to and including the middle block).
ENCODER_PARAMS = ("conv_in", "time_embedding", "class_embedding", "add_embedding", "down_blocks_", "mid_block")


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
  """A ControlNet: the UNet encoder's shape plus the hint encoder's.

  Attributes:
    unet: the config of the UNet this ControlNet steers (its encoder half is copied).
    conditioning_channels: channels of the control image (3 for RGB).
    conditioning_embedding_out_channels: hint-encoder widths; each step after the first halves
      the resolution, so the control image is 2^(len - 1) times the latent size (8 for SD).
    global_pool_conditions: average the residuals over space (diffusers' option for shuffle nets).
    channel_order: "rgb" or "bgr" (the control image's channels are flipped for "bgr").
  """

  unet: UNetConfig
  conditioning_channels: int = 3
  conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
  global_pool_conditions: bool = False
  channel_order: str = "rgb"

  def __post_init__(self):
    object.__setattr__(self, "conditioning_embedding_out_channels",
                       tuple(self.conditioning_embedding_out_channels))
    if self.channel_order not in ("rgb", "bgr"):
      raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {self.channel_order!r}")

  @property
  def hint_downsample(self) -> int:
    return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

  _OWN = ("conditioning_channels", "conditioning_embedding_out_channels", "global_pool_conditions",
          "controlnet_conditioning_channel_order")
  # ControlNetModel keys that describe the (absent) decoder half: never written.
  _UNET_ONLY = ("up_block_types", "out_channels", "center_input_sample", "conv_in_kernel",
                "conv_out_kernel", "time_embedding_dim", "time_cond_proj_dim", "sample_size", "dropout")

  @classmethod
  def from_diffusers_config(cls, config: Mapping[str, Any], **overrides) -> ControlNetConfig:
    """Builds a config from a diffusers ``ControlNetModel`` ``config.json`` dict."""
    config = dict(config)
    own = {k: config.pop(k) for k in cls._OWN if k in config}
    config.pop("_class_name", None)
    down = config.get("down_block_types", UNetConfig.down_block_types)
    config["up_block_types"] = tuple("CrossAttnUpBlock2D" if d == "CrossAttnDownBlock2D" else "UpBlock2D"
                                     for d in reversed(down))
    config["out_channels"] = config.get("in_channels", 4)
    unet = UNetConfig.from_diffusers_config(config, **overrides)
    return cls(unet=unet,
               conditioning_channels=own.get("conditioning_channels", 3),
               conditioning_embedding_out_channels=tuple(own.get("conditioning_embedding_out_channels",
                                                                 (16, 32, 96, 256))),
               global_pool_conditions=own.get("global_pool_conditions", False),
               channel_order=own.get("controlnet_conditioning_channel_order", "rgb"))

  def to_diffusers_config(self) -> dict[str, Any]:
    out = {k: v for k, v in self.unet.to_diffusers_config().items() if k not in self._UNET_ONLY}
    out["_class_name"] = "ControlNetModel"
    out.update(conditioning_channels=self.conditioning_channels,
               conditioning_embedding_out_channels=list(self.conditioning_embedding_out_channels),
               global_pool_conditions=self.global_pool_conditions,
               controlnet_conditioning_channel_order=self.channel_order)
    return out


class ConditioningEmbedding(nn.Module):
  """The hint encoder: conv, then (conv, strided conv) pairs with SiLU, then a zero-initialised conv."""

  out_features: int
  channels: Sequence[int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, cond: jax.Array) -> jax.Array:
    h = nn.Conv(self.channels[0], (3, 3), padding=1, dtype=self.dtype, name="conv_in")(cond)
    h = nn.silu(h)
    for i in range(len(self.channels) - 1):
      h = nn.silu(nn.Conv(self.channels[i], (3, 3), padding=1, dtype=self.dtype, name=f"blocks_{2 * i}")(h))
      h = nn.silu(nn.Conv(self.channels[i + 1], (3, 3), strides=2, padding=1, dtype=self.dtype,
                          name=f"blocks_{2 * i + 1}")(h))
    return nn.Conv(self.out_features, (3, 3), padding=1, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                   name="conv_out")(h)


class ControlNet(nn.Module):
  """diffusers' ``ControlNetModel`` in NHWC; returns ``(down_residuals, mid_residual)``."""

  config: ControlNetConfig

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, encoder_hidden_states: jax.Array, cond: jax.Array, *,
               conditioning_scale: float | jax.Array = 1.0, guess_mode: bool = False,
               class_labels: jax.Array | None = None, text_embeds: jax.Array | None = None,
               time_ids: jax.Array | None = None, train: bool = False) -> tuple[list[jax.Array], jax.Array]:
    """Computes the residuals.

    Args:
      x: noisy latents [B, h, w, C].
      t: timesteps [B] or scalar.
      encoder_hidden_states: [B, L, D].
      cond: the control image [B, h * f, w * f, conditioning_channels] in [0, 1] (f =
        ``config.hint_downsample``).
      conditioning_scale: multiplies every residual.
      guess_mode: scale residuals from 0.1 (shallowest) to 1.0 (middle), log-spaced, as diffusers.
      class_labels: the UNet's class conditioning ([B] labels, or [B, D] for "projection" types).
      text_embeds, time_ids: SDXL's pooled text [B, P] and micro-conditioning [B, N] for a ControlNet with
        ``addition_embed_type="text_time"`` (as :class:`jdiff.models.UNet` takes them).
      train: enables dropout.

    Returns:
      A list of [B, h_i, w_i, c_i] residuals, one per UNet skip connection, and the middle one.
    """
    cfg, ucfg = self.config, self.config.unet
    dtype = ucfg.compute_dtype
    b, hh, ww, _ = x.shape
    f = cfg.hint_downsample
    want = (b, hh * f, ww * f, cfg.conditioning_channels)
    if cond.shape != want:
      raise ValueError(f"control image must have shape {want} for latents {x.shape}, got {cond.shape}")
    t = jnp.broadcast_to(jnp.asarray(t), (b,))
    ch = ucfg.block_out_channels
    heads = ucfg.heads_per_block()
    layers_per = ucfg.per_block("layers_per_block")
    tlayers = ucfg.per_block("transformer_layers_per_block")
    common = dict(groups=ucfg.norm_num_groups, eps=ucfg.norm_eps, use_linear_projection=ucfg.use_linear_projection,
                  upcast_attention=ucfg.upcast_attention, dropout=ucfg.dropout, remat=ucfg.remat, dtype=dtype)
    context = encoder_hidden_states.astype(dtype)

    t_feat = layers.timestep_embedding(t, ch[0], flip_sin_to_cos=ucfg.flip_sin_to_cos, freq_shift=ucfg.freq_shift)
    emb = layers.TimestepEmbedding(ucfg.time_embed_dim, dtype=dtype, name="time_embedding")(t_feat)
    # The UNet's class embedding, under the same name so init_from_unet copies it.
    emb = emb + class_embedding(ucfg, class_labels, b, ch[0], dtype)
    # SDXL's text-time embedding, the UNet's code under the UNet's name ("add_embedding")
    emb = emb + addition_embedding(ucfg, text_embeds, time_ids, b, dtype)

    h = nn.Conv(ch[0], (ucfg.conv_in_kernel,) * 2, padding=(ucfg.conv_in_kernel - 1) // 2, dtype=dtype,
                name="conv_in")(x.astype(dtype))
    if cfg.channel_order == "bgr":
      cond = cond[..., ::-1]
    h = h + ConditioningEmbedding(ch[0], cfg.conditioning_embedding_out_channels, dtype=dtype,
                                  name="controlnet_cond_embedding")(cond.astype(dtype))
    skips = [h]
    n = ucfg.num_levels
    for i, block_type in enumerate(ucfg.down_block_types):
      h, res = DownBlock(ch[i], layers_per[i], block_type == "CrossAttnDownBlock2D", add_downsample=i < n - 1,
                         heads=heads[i], transformer_layers=tlayers[i], downsample_padding=ucfg.downsample_padding,
                         name=f"down_blocks_{i}", **common)(h, emb, context, train)
      skips.extend(res)
    h = MidBlock(ch[-1], heads=heads[-1], transformer_layers=tlayers[-1],
                 output_scale_factor=ucfg.mid_block_scale_factor, name="mid_block", **common)(h, emb, context, train)

    zero = nn.initializers.zeros
    down = [nn.Conv(s.shape[-1], (1, 1), dtype=dtype, kernel_init=zero, name=f"controlnet_down_blocks_{k}")(s)
            for k, s in enumerate(skips)]
    mid = nn.Conv(h.shape[-1], (1, 1), dtype=dtype, kernel_init=zero, name="controlnet_mid_block")(h)

    if guess_mode and not cfg.global_pool_conditions:
      scales = np.logspace(-1, 0, len(down) + 1).astype(np.float32)
      down = [d * (float(s) * conditioning_scale) for d, s in zip(down, scales)]
      mid = mid * (float(scales[-1]) * conditioning_scale)
    else:
      down = [d * conditioning_scale for d in down]
      mid = mid * conditioning_scale
    if cfg.global_pool_conditions:
      down = [jnp.mean(d, axis=(1, 2), keepdims=True) for d in down]
      mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
    return [d.astype(jnp.float32) for d in down], mid.astype(jnp.float32)


def init_from_unet(unet_params: Mapping[str, Any], controlnet: ControlNet, x: jax.Array, t: jax.Array,
                   encoder_hidden_states: jax.Array, cond: jax.Array, *, key: jax.Array,
                   **kwargs) -> dict[str, Any]:
  """Initialises ControlNet parameters with the UNet's encoder weights copied in.

  The hint encoder gets fresh weights; the zero convolutions (and the hint encoder's last conv)
  are zero, so at initialisation the ControlNet-augmented UNet equals the plain UNet exactly.
  Example inputs fix the shapes (they may be ``jax.ShapeDtypeStruct``-like zeros).
  """
  params = jax.jit(lambda k: controlnet.init(k, x, t, encoder_hidden_states, cond, **kwargs)["params"])(key)
  flat = traverse_util.flatten_dict(params, sep="/")
  src = traverse_util.flatten_dict(dict(unet_params), sep="/")
  copied = 0
  for path in flat:
    if path.startswith(ENCODER_PARAMS):
      if path not in src:
        raise ValueError(f"UNet parameters lack {path!r}: the ControlNet config does not match the UNet")
      if src[path].shape != flat[path].shape:
        raise ValueError(f"{path}: UNet shape {src[path].shape} != ControlNet shape {flat[path].shape}")
      flat[path] = jnp.asarray(src[path])
      copied += 1
  if not copied:
    raise ValueError("no UNet encoder parameters were found to copy")
  return traverse_util.unflatten_dict(flat, sep="/")


def guidance_active(step: jax.Array, num_steps: int, start: float = 0.0, end: float = 1.0) -> jax.Array:
  """diffusers' ``control_guidance_start/end``: 1.0 at sampling step ``step`` (0-based, of
  ``num_steps``) when ``step / n >= start`` and ``(step + 1) / n <= end``, else 0.0."""
  i = jnp.asarray(step, jnp.float32)
  return jnp.where((i / num_steps >= start) & ((i + 1) / num_steps <= end), 1.0, 0.0)


def combine_residuals(outputs: Sequence[tuple[list[jax.Array], jax.Array]],
                      scales: Sequence[float | jax.Array] | None = None) -> tuple[list[jax.Array], jax.Array]:
  """Sums the residuals of several ControlNets (``MultiControlNet``), each with its own scale."""
  if not outputs:
    raise ValueError("no ControlNet outputs to combine")
  scales = [1.0] * len(outputs) if scales is None else list(scales)
  if len(scales) != len(outputs):
    raise ValueError(f"{len(outputs)} ControlNet outputs but {len(scales)} scales")
  down = [sum(s * o[0][k] for o, s in zip(outputs, scales)) for k in range(len(outputs[0][0]))]
  mid = sum(s * o[1] for o, s in zip(outputs, scales))
  return down, mid
