"""Building blocks shared by the UNet and the autoencoder, NHWC throughout.

Parameter names follow diffusers' module names (``to_q``, ``conv1``, ``time_emb_proj``, ...) so that a
diffusers checkpoint converts by renaming list indices (``resnets.0`` -> ``resnets_0``) and transposing
kernels (conv OIHW -> HWIO, linear (out, in) -> (in, out)); see :mod:`jdiff.convert`.

Every module takes ``dtype`` (the compute dtype, e.g. ``jnp.bfloat16``); parameters stay float32.
Normalisation statistics, softmax and the sinusoidal embedding are computed in float32.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "attention_implementation",
    "timestep_embedding",
    "TimestepEmbedding",
    "ResnetBlock2D",
    "Attention",
    "SpatialAttention",
    "GEGLU",
    "FeedForward",
    "BasicTransformerBlock",
    "Transformer2D",
    "Downsample2D",
    "Upsample2D",
]

Dtype = Any


def timestep_embedding(t: jax.Array, dim: int, *, flip_sin_to_cos: bool = False,
                       freq_shift: float = 1.0, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps, as diffusers' ``Timesteps``.

  Frequencies are ``exp(-log(max_period) * i / (dim / 2 - freq_shift))`` for ``i < dim / 2``; the
  output is ``[sin, cos]`` (``[cos, sin]`` with ``flip_sin_to_cos``), zero-padded when ``dim`` is odd.

  Args:
    t: timesteps [B] (int or float).
    dim: embedding size.
    flip_sin_to_cos: put the cosines first.
    freq_shift: diffusers' ``downscale_freq_shift``.
    max_period: the longest period.

  Returns:
    float32 [B, dim].

  Example:
    >>> timestep_embedding(jnp.array([0, 500]), 320, flip_sin_to_cos=True, freq_shift=0).shape
    (2, 320)
  """
  if t.ndim != 1:
    raise ValueError(f"timesteps must have shape [B], got {t.shape}")
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  freqs = jnp.exp(exponent)  # [half]
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, half]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _group_norm(groups: int, eps: float, dtype: Dtype, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def _conv(features: int, kernel: int, dtype: Dtype, name: str, *, stride: int = 1,
          padding: Any = None) -> nn.Conv:
  pad = (kernel - 1) // 2 if padding is None else padding
  if isinstance(pad, int):
    pad = ((pad, pad), (pad, pad))
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, dtype=dtype,
                 name=name)


class TimestepEmbedding(nn.Module):
  """Two-layer MLP on a timestep (or class) embedding: ``linear_2(silu(linear_1(x)))``.

  ``cond_proj_dim`` adds ``cond_proj(condition)`` (no bias) to the input first, as LCM's guidance
  embedding does.
  """

  features: int
  cond_proj_dim: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, condition: jax.Array | None = None) -> jax.Array:
    x = x.astype(self.dtype)  # [B, D_in]
    if self.cond_proj_dim is not None:
      if condition is None:
        raise ValueError("this UNet has time_cond_proj_dim set: pass timestep_cond [B, "
                         f"{self.cond_proj_dim}]")
      x = x + nn.Dense(x.shape[-1], use_bias=False, dtype=self.dtype, name="cond_proj")(condition)
    x = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x)
    x = nn.silu(x)
    return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(x)  # [B, features]


class ResnetBlock2D(nn.Module):
  """GroupNorm-SiLU-conv twice, optional time embedding added in between, 1x1 shortcut when channels
  change; the output is ``(x + h) / output_scale_factor``.

  Example:
    >>> y = ResnetBlock2D(64).apply(params, x, temb)  # x [B, H, W, C], temb [B, T]
  """

  features: int
  groups: int = 32
  eps: float = 1e-5
  dropout: float = 0.0
  output_scale_factor: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None = None, train: bool = False) -> jax.Array:
    h = _group_norm(self.groups, self.eps, self.dtype, "norm1")(x)  # [B, H, W, C_in]
    h = nn.silu(h)
    h = _conv(self.features, 3, self.dtype, "conv1")(h)  # [B, H, W, C]
    if temb is not None:
      e = nn.Dense(self.features, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))  # [B, C]
      h = h + e[:, None, None, :]
    h = _group_norm(self.groups, self.eps, self.dtype, "norm2")(h)
    h = nn.silu(h)
    if self.dropout > 0:
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _conv(self.features, 3, self.dtype, "conv2")(h)
    if x.shape[-1] != self.features:
      x = _conv(self.features, 1, self.dtype, "conv_shortcut")(x)
    out = x.astype(h.dtype) + h
    if self.output_scale_factor != 1.0:
      out = out / self.output_scale_factor
    return out


_ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")
_attention_impl: list[str | None] = [None]


@contextlib.contextmanager
def attention_implementation(implementation: str | None) -> Iterator[None]:
  """Chooses ``jax.nn.dot_product_attention``'s implementation for modules TRACED inside the block.

  ``None`` (default) and ``"xla"`` use XLA's attention; ``"cudnn"`` uses cuDNN's fused (flash)
  attention on NVIDIA GPUs for the calls it supports (bfloat16/float16 inputs, head size a multiple
  of 8 and at most 128) and XLA's for the others (e.g. float32-upcast or 160-wide heads). The choice
  is read when a function is traced, so build (and first call / lower) the jitted function inside.

  Example:
    >>> with attention_implementation("cudnn"):  # doctest: +SKIP
    ...   compiled = jax.jit(step).lower(state, batch).compile()
  """
  if implementation not in _ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is not one of {_ATTENTION_IMPLEMENTATIONS}")
  previous = _attention_impl[0]
  _attention_impl[0] = implementation
  try:
    yield
  finally:
    _attention_impl[0] = previous


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, *, upcast: bool) -> jax.Array:
  """Multi-head scaled dot-product attention on [B, T, heads * d] projections."""
  b, tq, inner = q.shape
  d = inner // heads
  q = q.reshape(b, tq, heads, d)
  k = k.reshape(b, k.shape[1], heads, d)
  v = v.reshape(b, v.shape[1], heads, d)
  dtype = q.dtype
  if upcast and dtype != jnp.float32:
    q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
  impl = _attention_impl[0]
  if impl == "cudnn" and not (q.dtype in (jnp.bfloat16, jnp.float16) and d % 8 == 0 and d <= 128):
    impl = "xla"  # outside cuDNN's fused-attention envelope
  out = jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(d), implementation=impl)  # [B, T, heads, d]
  return out.astype(dtype).reshape(b, tq, inner)


class Attention(nn.Module):
  """Multi-head (self or cross) attention with diffusers' ``to_q/to_k/to_v/to_out.0`` projections.

  Example:
    >>> y = Attention(heads=8, head_dim=40).apply(params, x, context)  # x [B, T, C], context [B, S, D]
  """

  heads: int
  head_dim: int
  qkv_bias: bool = False
  upcast: bool = False
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None, train: bool = False) -> jax.Array:
    inner = self.heads * self.head_dim
    context = x if context is None else context.astype(self.dtype)
    q = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_q")(x)  # [B, T, inner]
    k = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_k")(context)  # [B, S, inner]
    v = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_v")(context)
    out = _attend(q, k, v, self.heads, upcast=self.upcast)
    out = nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out)  # [B, T, C]
    if self.dropout > 0:
      out = nn.Dropout(self.dropout, deterministic=not train)(out)
    return out


class SpatialAttention(nn.Module):
  """The autoencoder's single-head attention over pixels: GroupNorm, attention, residual.

  Example:
    >>> y = SpatialAttention(groups=32).apply(params, x)  # x [B, H, W, C]
  """

  groups: int = 32
  eps: float = 1e-6
  head_dim: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    head_dim = self.head_dim or c
    h = _group_norm(self.groups, self.eps, self.dtype, "group_norm")(x).reshape(b, hgt * wid, c)
    q = nn.Dense(c, dtype=self.dtype, name="to_q")(h)  # [B, HW, C]
    k = nn.Dense(c, dtype=self.dtype, name="to_k")(h)
    v = nn.Dense(c, dtype=self.dtype, name="to_v")(h)
    out = _attend(q, k, v, c // head_dim, upcast=True)
    out = nn.Dense(c, dtype=self.dtype, name="to_out_0")(out)
    return x.astype(out.dtype) + out.reshape(b, hgt, wid, c)


class GEGLU(nn.Module):
  """``a * gelu(g)`` with ``[a, g] = proj(x)`` (exact GELU), diffusers' ``GEGLU``."""

  inner: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    a, g = jnp.split(nn.Dense(2 * self.inner, dtype=self.dtype, name="proj")(x), 2, axis=-1)
    return a * jax.nn.gelu(g, approximate=False)  # [B, T, inner]


class FeedForward(nn.Module):
  """GEGLU feed-forward ``net_2(GEGLU(x))`` with a ``mult``-times wider hidden layer."""

  mult: int = 4
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    dim = x.shape[-1]
    h = GEGLU(dim * self.mult, dtype=self.dtype, name="net_0")(x)  # [B, T, mult * dim]
    if self.dropout > 0:
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return nn.Dense(dim, dtype=self.dtype, name="net_2")(h)  # [B, T, dim]


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each with a residual."""

  heads: int
  head_dim: int
  upcast_attention: bool = False
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, train: bool = False) -> jax.Array:
    def norm(name):
      return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, use_fast_variance=False, name=name)

    def attn(name):
      return Attention(self.heads, self.head_dim, upcast=self.upcast_attention, dropout=self.dropout,
                       dtype=self.dtype, name=name)

    x = x + attn("attn1")(norm("norm1")(x), None, train)  # [B, T, C]
    x = x + attn("attn2")(norm("norm2")(x), context, train)
    x = x + FeedForward(dropout=self.dropout, dtype=self.dtype, name="ff")(norm("norm3")(x), train)
    return x


class Transformer2D(nn.Module):
  """diffusers' ``Transformer2DModel`` on continuous NHWC input: GroupNorm, ``proj_in`` (1x1 conv or
  linear), ``num_layers`` transformer blocks, ``proj_out``, residual.

  Example:
    >>> y = Transformer2D(heads=8, head_dim=40).apply(params, x, context)  # [B, H, W, 320], [B, 77, 768]
  """

  heads: int
  head_dim: int
  num_layers: int = 1
  groups: int = 32
  use_linear_projection: bool = False
  upcast_attention: bool = False
  dropout: float = 0.0
  remat: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, train: bool = False) -> jax.Array:
    b, hgt, wid, c = x.shape
    inner = self.heads * self.head_dim
    h = _group_norm(self.groups, 1e-6, self.dtype, "norm")(x)  # [B, H, W, C]
    if self.use_linear_projection:
      h = nn.Dense(inner, dtype=self.dtype, name="proj_in")(h.reshape(b, hgt * wid, c))
    else:
      h = _conv(inner, 1, self.dtype, "proj_in")(h).reshape(b, hgt * wid, inner)
    block = nn.remat(BasicTransformerBlock, static_argnums=(3,)) if self.remat else BasicTransformerBlock
    for i in range(self.num_layers):
      h = block(self.heads, self.head_dim, upcast_attention=self.upcast_attention,
                dropout=self.dropout, dtype=self.dtype, name=f"transformer_blocks_{i}")(h, context, train)
    if self.use_linear_projection:
      h = nn.Dense(c, dtype=self.dtype, name="proj_out")(h).reshape(b, hgt, wid, c)
    else:
      h = _conv(c, 1, self.dtype, "proj_out")(h.reshape(b, hgt, wid, inner))
    return x.astype(h.dtype) + h


class Downsample2D(nn.Module):
  """Strided 3x3 conv halving H and W. ``padding`` 1 pads all sides (UNet); 0 pads only bottom/right
  by one (the autoencoder)."""

  features: int
  padding: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad = ((self.padding, self.padding),) * 2 if self.padding else ((0, 1), (0, 1))
    return _conv(self.features, 3, self.dtype, "conv", stride=2, padding=pad)(x)  # [B, H/2, W/2, C]


class Upsample2D(nn.Module):
  """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # [B, 2H, 2W, C]
    return _conv(self.features, 3, self.dtype, "conv")(x)
