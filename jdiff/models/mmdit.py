"""Stable Diffusion 3's multimodal diffusion transformer (MMDiT), equal to diffusers'
``SD3Transformer2DModel``, NHWC.

Structure (parameter names = diffusers' module names with list indices joined by ``_``)::

  pos_embed.proj (p x p patches -> D) + a centred crop of a fixed pos_embed_max_size^2 sin-cos table
  time_text_embed: timestep_embedder(sin-cos t) + text_embedder(pooled projections)   -> temb [B, D]
  context_embedder: text tokens [B, L, joint_attention_dim] -> [B, L, D]
  transformer_blocks_i (JointTransformerBlock): adaLN-zero on both streams, one attention over the
      concatenated [image; text] tokens (per-stream q/k/v, optional per-head RMS norm of q and k),
      gated feed-forwards; the last block updates only the image stream (context_pre_only);
      blocks in ``dual_attention_layers`` add a second, image-only attention (SD3.5, adaLN-zero-X)
  norm_out (AdaLayerNormContinuous on temb), proj_out, unpatchify

The position-embedding table is a constant recomputed here (diffusers stores it as a buffer in the
checkpoint; :mod:`jdiff.convert.dit` checks the stored one against this recomputation).

Example:
  >>> net = MMDiT(SD3Config.tiny())
  >>> x, t = jnp.zeros((1, 8, 8, 4)), jnp.array([500.0])
  >>> ctx, pooled = jnp.zeros((1, 5, 24)), jnp.zeros((1, 16))
  >>> params = net.init(jax.random.key(0), x, t, ctx, pooled)["params"]
  >>> net.apply({"params": params}, x, t, ctx, pooled).shape
  (1, 8, 8, 4)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.models import layers
from jdiff.models.configs import check_remat, config_from_dict, resolve_dtype
from jdiff.models.dit import (AdaLayerNormZero, FeedForward, PatchEmbed, config_to_dict, layer_norm, modulate,
                              patch_inputs, sincos_pos_embed, unpatchify)

__all__ = ["MMDiT", "SD3Config", "JointTransformerBlock", "JointAttention", "sd3_pos_embed"]

Dtype = Any
_QK_NORMS = (None, "rms_norm")  # SD3.0 and SD3.5 checkpoints


@dataclasses.dataclass(frozen=True)
class SD3Config:
  """Configuration of :class:`MMDiT` (diffusers' ``SD3Transformer2DModel`` options, same names).

  Attributes:
    sample_size: latent height/width of training; sets the position embedding's base grid.
    patch_size: p; inputs must have height and width divisible by p.
    in_channels, out_channels: latent channels in and out.
    num_layers: joint transformer blocks (the last one is ``context_pre_only``).
    attention_head_dim, num_attention_heads: heads and their width (model width D = product).
    joint_attention_dim: width of the text tokens (``encoder_hidden_states``).
    caption_projection_dim: width the context embedder projects the text to (must equal D).
    pooled_projection_dim: width of the pooled text vector.
    pos_embed_max_size: side of the position-embedding table; inputs may be at most this many patches.
    dual_attention_layers: blocks with a second, image-only attention (SD3.5).
    qk_norm: None or "rms_norm" (learned-scale RMS norm of each head's queries and keys, SD3.5).
    dtype: compute dtype; parameters are float32.
    remat: rematerialise blocks: False, True or a policy of
      :data:`jdiff.models.configs.REMAT_POLICIES`.
  """

  sample_size: int = 128
  patch_size: int = 2
  in_channels: int = 16
  num_layers: int = 18
  attention_head_dim: int = 64
  num_attention_heads: int = 18
  joint_attention_dim: int = 4096
  caption_projection_dim: int = 1152
  pooled_projection_dim: int = 2048
  out_channels: int | None = 16
  pos_embed_max_size: int = 96
  dual_attention_layers: tuple[int, ...] = ()
  qk_norm: str | None = None
  dtype: str = "float32"
  remat: bool | str = False

  def __post_init__(self):
    check_remat(self.remat)
    resolve_dtype(self.dtype)
    object.__setattr__(self, "dual_attention_layers", tuple(int(i) for i in self.dual_attention_layers))
    if self.qk_norm not in _QK_NORMS:
      raise ValueError(f"SD3 config: qk_norm={self.qk_norm!r} is not supported (supported: {_QK_NORMS})")
    if self.caption_projection_dim != self.inner_dim:
      raise ValueError(f"SD3 config: caption_projection_dim {self.caption_projection_dim} must equal "
                       f"num_attention_heads * attention_head_dim = {self.inner_dim}")
    if self.inner_dim % 4:
      raise ValueError(f"SD3 width {self.inner_dim} must be divisible by 4 (2-D sin-cos position embedding)")
    if self.num_layers < 1:
      raise ValueError(f"SD3 config: num_layers must be >= 1, got {self.num_layers}")
    bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
    if bad:
      raise ValueError(f"SD3 config: dual_attention_layers {bad} are not block indices (0..{self.num_layers - 1})")
    if self.pos_embed_max_size is None or self.pos_embed_max_size < 1:
      raise ValueError(f"SD3 config: pos_embed_max_size must be a positive size, got {self.pos_embed_max_size!r}")

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def output_channels(self) -> int:
    return self.in_channels if self.out_channels is None else self.out_channels

  @property
  def compute_dtype(self) -> Any:
    return resolve_dtype(self.dtype)

  @classmethod
  def tiny(cls, **overrides) -> SD3Config:
    """Three blocks of width 32 on 8x8x4 latents, RMS qk-norm, one dual-attention block: for tests."""
    base = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
                num_attention_heads=4, joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=16,
                pos_embed_max_size=12, dual_attention_layers=(0,), qk_norm="rms_norm")
    return cls(**{**base, **overrides})

  @classmethod
  def sd3_medium(cls, **overrides) -> SD3Config:
    """Stable Diffusion 3 Medium's transformer (24 blocks of width 1536, 16 latent channels; 2,028,328,000
    parameters)."""
    base = dict(sample_size=128, num_layers=24, attention_head_dim=64, num_attention_heads=24,
                caption_projection_dim=1536, pos_embed_max_size=192)
    return cls(**{**base, **overrides})

  @classmethod
  def from_diffusers_config(cls, config: Mapping[str, Any], **overrides) -> SD3Config:
    """Builds a config from a diffusers ``SD3Transformer2DModel`` ``config.json`` dict.

    Raises:
      ValueError: naming the first unknown or unsupported key.

    Example:
      >>> SD3Config.from_diffusers_config({**SD3Config.tiny().to_diffusers_config()}).num_layers
      3
    """
    return config_from_dict(cls, dict(config), {}, "SD3 transformer", overrides)

  def to_diffusers_config(self) -> dict[str, Any]:
    """The diffusers ``SD3Transformer2DModel`` config dict.

    Example:
      >>> SD3Config.tiny().to_diffusers_config()["qk_norm"]
      'rms_norm'
    """
    return config_to_dict(self, "SD3Transformer2DModel")


def sd3_pos_embed(config: SD3Config, h: int, w: int):
  """The float32 [h * w, D] position embedding of an h x w patch grid: the centred crop of the
  ``pos_embed_max_size``-square table (base grid ``sample_size / patch_size``).

  Example:
    >>> sd3_pos_embed(SD3Config.tiny(), 4, 4).shape
    (16, 32)
  """
  m = config.pos_embed_max_size
  if h > m or w > m:
    raise ValueError(f"input of {h} x {w} patches exceeds pos_embed_max_size={m}")
  top, left = (m - h) // 2, (m - w) // 2
  return sincos_pos_embed(config.inner_dim, h, w, base_size=config.sample_size // config.patch_size,
                          grid_size=(m, m), offset=(top, left))


def _qk_norm(kind: str | None, dtype: Dtype, name: str) -> nn.Module | None:
  return None if kind is None else nn.RMSNorm(epsilon=1e-6, dtype=dtype, name=name)


def _heads_norm(norm: nn.Module | None, x: jax.Array, heads: int) -> jax.Array:
  """Applies ``norm`` per head: [B, T, heads * d] viewed as [B, T, heads, d]."""
  if norm is None:
    return x
  b, t, inner = x.shape
  return norm(x.reshape(b, t, heads, inner // heads)).reshape(b, t, inner)


class JointAttention(nn.Module):
  """diffusers' ``Attention`` with ``JointAttnProcessor2_0``: one softmax over image and text tokens.

  Image projections ``to_q/to_k/to_v`` (+ ``norm_q/norm_k``), text projections ``add_q_proj/add_k_proj/
  add_v_proj`` (+ ``norm_added_q/norm_added_k``), outputs ``to_out_0`` (image) and ``to_add_out``
  (text, absent when ``context_pre_only``). Without ``context`` it is plain self-attention (the
  dual-attention ``attn2``). Returns (image [B, N, D], text [B, L, D] or None).
  """

  heads: int
  head_dim: int
  qk_norm: str | None = None
  context_pre_only: bool | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None):
    inner = self.heads * self.head_dim
    dense = lambda name: nn.Dense(inner, dtype=self.dtype, name=name)  # noqa: E731
    q = _heads_norm(_qk_norm(self.qk_norm, self.dtype, "norm_q"), dense("to_q")(x), self.heads)  # [B, N, inner]
    k = _heads_norm(_qk_norm(self.qk_norm, self.dtype, "norm_k"), dense("to_k")(x), self.heads)
    v = dense("to_v")(x)
    n = x.shape[1]
    if context is not None:
      cq = _heads_norm(_qk_norm(self.qk_norm, self.dtype, "norm_added_q"), dense("add_q_proj")(context), self.heads)
      ck = _heads_norm(_qk_norm(self.qk_norm, self.dtype, "norm_added_k"), dense("add_k_proj")(context), self.heads)
      cv = dense("add_v_proj")(context)
      q, k, v = (jnp.concatenate([a, c], axis=1) for a, c in ((q, cq), (k, ck), (v, cv)))  # [B, N + L, inner]
    out = layers.attend(q, k, v, self.heads)
    img, txt = out[:, :n], out[:, n:]
    img = nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(img)  # [B, N, D]
    if context is None or self.context_pre_only:
      return img, None
    return img, nn.Dense(context.shape[-1], dtype=self.dtype, name="to_add_out")(txt)  # [B, L, D]


class _AdaLayerNormContinuous(nn.Module):
  """``LN(x) * (1 + scale) + shift`` with ``(scale, shift) = linear(silu(emb))`` (note the order)."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    mod = nn.Dense(2 * x.shape[-1], dtype=self.dtype, name="linear")(nn.silu(emb))
    scale, shift = jnp.split(mod, 2, axis=-1)
    return modulate(layer_norm(1e-6, self.dtype, "norm")(x), shift, scale)


class JointTransformerBlock(nn.Module):
  """diffusers' ``JointTransformerBlock``. Returns (image tokens, text tokens or None when
  ``context_pre_only``)."""

  heads: int
  head_dim: int
  context_pre_only: bool = False
  qk_norm: str | None = None
  dual_attention: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, temb: jax.Array):
    dt = self.dtype
    modulated, parts, normed = AdaLayerNormZero(9 if self.dual_attention else 6, dtype=dt, name="norm1")(x, temb)
    gate_msa, shift_mlp, scale_mlp, gate_mlp = parts[2:6]
    if self.context_pre_only:
      c_modulated = _AdaLayerNormContinuous(dtype=dt, name="norm1_context")(context, temb)
    else:
      c_modulated, c_parts, _ = AdaLayerNormZero(6, dtype=dt, name="norm1_context")(context, temb)
    attn, c_attn = JointAttention(self.heads, self.head_dim, self.qk_norm, self.context_pre_only, dtype=dt,
                                  name="attn")(modulated, c_modulated)
    x = x + gate_msa[:, None, :] * attn  # [B, N, D]
    if self.dual_attention:  # SD3.5: image-only attention on the block input's second modulation
      shift_msa2, scale_msa2, gate_msa2 = parts[6:9]
      attn2, _ = JointAttention(self.heads, self.head_dim, self.qk_norm, None, dtype=dt, name="attn2")(
          modulate(normed, shift_msa2, scale_msa2))
      x = x + gate_msa2[:, None, :] * attn2
    h = modulate(layer_norm(1e-6, dt, "norm2")(x), shift_mlp, scale_mlp)
    x = x + gate_mlp[:, None, :] * FeedForward(dtype=dt, name="ff")(h)
    if self.context_pre_only:
      return x, None
    c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_parts[2:6]
    context = context + c_gate_msa[:, None, :] * c_attn  # [B, L, D]
    ch = modulate(layer_norm(1e-6, dt, "norm2_context")(context), c_shift_mlp, c_scale_mlp)
    context = context + c_gate_mlp[:, None, :] * FeedForward(dtype=dt, name="ff_context")(ch)
    return x, context


class MMDiT(nn.Module):
  """SD3's multimodal diffusion transformer, numerically equal to diffusers' ``SD3Transformer2DModel``.

  Attributes:
    config: an :class:`SD3Config`.

  Example:
    >>> net = MMDiT(SD3Config.sd3_medium(dtype="bfloat16", remat=True))
  """

  config: SD3Config

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, encoder_hidden_states: jax.Array, pooled_projections: jax.Array,
               *, skip_layers: Sequence[int] = ()) -> jax.Array:
    """Predicts the model output (SD3: the flow velocity) for a batch.

    Args:
      x: noisy latents [B, H, W, in_channels]; H / p and W / p at most ``pos_embed_max_size``.
      t: timesteps [B] (float, SD3 passes ``1000 * sigma``) or a scalar.
      encoder_hidden_states: text tokens [B, L, joint_attention_dim].
      pooled_projections: pooled text vectors [B, pooled_projection_dim].
      skip_layers: indices of blocks to skip (diffusers' ``skip_layers``, skip-layer guidance); initialise
        parameters without it (a skipped block creates none).

    Returns:
      float32 [B, H, W, out_channels].
    """
    cfg = self.config
    dtype = cfg.compute_dtype
    p = cfg.patch_size
    t = patch_inputs(x, t, cfg.in_channels, p, "SD3 transformer")
    b, hgt, wid, _ = x.shape
    if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b \
        or encoder_hidden_states.shape[-1] != cfg.joint_attention_dim:
      raise ValueError(f"encoder_hidden_states must be [B={b}, L, {cfg.joint_attention_dim}], got "
                       f"{encoder_hidden_states.shape}")
    if pooled_projections.shape != (b, cfg.pooled_projection_dim):
      raise ValueError(f"pooled_projections must be [{b}, {cfg.pooled_projection_dim}], got {pooled_projections.shape}")
    h, w = hgt // p, wid // p
    d = cfg.inner_dim
    skip = set(int(i) for i in skip_layers)

    tokens = PatchEmbed(d, p, dtype=dtype, name="pos_embed")(x.astype(dtype))  # [B, N, D]
    tokens = (tokens + jnp.asarray(sd3_pos_embed(cfg, h, w))[None]).astype(dtype)
    t_feat = layers.timestep_embedding(t, 256, flip_sin_to_cos=True, freq_shift=0).astype(dtype)  # [B, 256]
    temb = _TimeTextEmbedding(d, dtype=dtype, name="time_text_embed")(t_feat, pooled_projections.astype(dtype))
    context = nn.Dense(cfg.caption_projection_dim, dtype=dtype, name="context_embedder")(
        encoder_hidden_states.astype(dtype))  # [B, L, D]

    block = layers.remat_module(JointTransformerBlock, cfg.remat)
    for i in range(cfg.num_layers):
      module = block(cfg.num_attention_heads, cfg.attention_head_dim, context_pre_only=i == cfg.num_layers - 1,
                     qk_norm=cfg.qk_norm, dual_attention=i in cfg.dual_attention_layers, dtype=dtype,
                     name=f"transformer_blocks_{i}")
      if i in skip:
        continue
      tokens, new_context = module(tokens, context, temb)
      context = context if new_context is None else new_context

    tokens = _AdaLayerNormContinuous(dtype=dtype, name="norm_out")(tokens, temb)
    tokens = nn.Dense(p * p * cfg.output_channels, dtype=dtype, name="proj_out")(tokens)  # [B, N, p * p * C]
    return unpatchify(tokens, h, w, p).astype(jnp.float32)  # [B, H, W, C_out]


class _TimeTextEmbedding(nn.Module):
  """diffusers' ``CombinedTimestepTextProjEmbeddings``: ``timestep_embedder(t) + text_embedder(pooled)``."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t_feat: jax.Array, pooled: jax.Array) -> jax.Array:
    temb = layers.TimestepEmbedding(self.features, dtype=self.dtype, name="timestep_embedder")(t_feat)
    return temb + layers.TimestepEmbedding(self.features, dtype=self.dtype, name="text_embedder")(pooled)
