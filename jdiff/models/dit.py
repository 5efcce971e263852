"""The class-conditional diffusion transformer (DiT, Peebles & Xie 2023), equal to diffusers'
``DiTTransformer2DModel``, NHWC.

Structure (parameter names = diffusers' module names with list indices joined by ``_``)::

  pos_embed.proj (p x p patches -> D) + fixed 2-D sin-cos position embedding
  transformer_blocks_i: norm1 (adaLN-zero: emb = timestep_embedder(t) + class_embedder(y), linear -> 6 D),
                        attn1 (self-attention), norm3, ff (GELU feed-forward), gated residuals
  norm_out * (1 + scale) + shift with (shift, scale) = proj_out_1(silu(block 0's emb)), proj_out_2, unpatchify

Every block holds its own timestep and label embedders (as diffusers' checkpoints do); the output
layer reuses block 0's. The label table has ``num_embeds_ada_norm + 1`` rows: the last one is the null
class that classifier-free guidance uses (:attr:`DiTConfig.null_class`). With learned variance
(``out_channels = 2 * in_channels``) the first ``in_channels`` output channels are the epsilon
prediction and the rest the variance interpolation.

The shared pieces (sin-cos position embedding, patchify / unpatchify, the adaLN-zero modulation, the
GELU feed-forward and the config mapping) are public here and reused by :mod:`jdiff.models.mmdit`.

Example:
  >>> dit = DiT(DiTConfig.tiny())
  >>> x, t, y = jnp.zeros((2, 8, 8, 4)), jnp.array([10, 500]), jnp.array([3, 1000])
  >>> params = dit.init(jax.random.key(0), x, t, y)["params"]
  >>> dit.apply({"params": params}, x, t, y).shape
  (2, 8, 8, 8)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiff.models import layers
from jdiff.models.configs import check_remat, config_from_dict, resolve_dtype

__all__ = ["DiT", "DiTConfig", "DiTBlock", "PatchEmbed", "FeedForward", "AdaLayerNormZero", "sincos_pos_embed",
           "patchify", "unpatchify", "modulate", "layer_norm", "config_to_dict", "patch_inputs"]

Dtype = Any


def patch_inputs(x: jax.Array, t: jax.Array, in_channels: int, patch_size: int, what: str) -> jax.Array:
  """Checks a patched transformer's input ``x`` [B, H, W, in_channels] (H, W divisible by the patch
  size) and returns the timesteps ``t`` as [B] (a scalar is broadcast); one-line ValueErrors otherwise."""
  if x.ndim != 4 or x.shape[-1] != in_channels:
    raise ValueError(f"{what} expects x of shape [B, H, W, {in_channels}], got {x.shape}")
  b, hgt, wid, _ = x.shape
  if hgt % patch_size or wid % patch_size:
    raise ValueError(f"{what} input height and width must be divisible by patch_size={patch_size}, got {x.shape}")
  t = jnp.asarray(t)
  if t.ndim == 0:
    t = jnp.broadcast_to(t, (b,))
  if t.shape != (b,):
    raise ValueError(f"timesteps must have shape [{b}] or be a scalar, got {t.shape}")
  return t


def config_to_dict(config: Any, class_name: str) -> dict[str, Any]:
  """The diffusers config dict of a config dataclass (jdiff-only fields dropped, tuples as lists)."""
  out: dict[str, Any] = {"_class_name": class_name}
  for f in dataclasses.fields(config):
    if f.name in ("dtype", "remat"):
      continue
    value = getattr(config, f.name)
    out[f.name] = list(value) if isinstance(value, tuple) else value
  return out


# Transformer2DModel (the class older DiT checkpoints name) options that DiT does not use.
_DIT_FIXED: dict[str, tuple[Any, ...] | None] = {
    "norm_num_groups": None,  # unused by the patched (DiT) path
    "cross_attention_dim": (None,),
    "num_vector_embeds": (None,),
    "only_cross_attention": (False,),
    "double_self_attention": (False,),
    "use_linear_projection": None,
    "attention_type": ("default",),
    "caption_channels": (None,),
    "interpolation_scale": (None, 1, 1.0),
}
_DIT_ACTIVATIONS = ("gelu-approximate", "gelu")


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """Configuration of :class:`DiT` (diffusers' ``DiTTransformer2DModel`` options, same names).

  Attributes:
    num_attention_heads, attention_head_dim: heads and their width (model width D = product).
    in_channels: latent channels.
    out_channels: output channels (None: ``in_channels``); ``2 * in_channels`` for learned variance.
    num_layers: transformer blocks.
    dropout: dropout in attention outputs and feed-forwards (training only).
    norm_num_groups: kept for diffusers' config (unused by the network).
    attention_bias: biases on the q/k/v projections.
    sample_size: latent height/width the position embedding's base grid is built for.
    patch_size: p; inputs must have height and width divisible by p.
    activation_fn: "gelu-approximate" (tanh GELU) or "gelu" in the feed-forward.
    num_embeds_ada_norm: number of classes; label ``num_embeds_ada_norm`` is the null class.
    upcast_attention: attention in float32 whatever the compute dtype.
    norm_type: "ada_norm_zero" (the only DiT norm).
    norm_elementwise_affine: learned scale/bias on the feed-forward's pre-norm (``norm3``).
    norm_eps: epsilon of ``norm3``.
    dtype: compute dtype ("float32", "bfloat16"); parameters are float32.
    remat: rematerialise blocks: False, True or a policy of
      :data:`jdiff.models.configs.REMAT_POLICIES`.
  """

  num_attention_heads: int = 16
  attention_head_dim: int = 72
  in_channels: int = 4
  out_channels: int | None = None
  num_layers: int = 28
  dropout: float = 0.0
  norm_num_groups: int = 32
  attention_bias: bool = True
  sample_size: int = 32
  patch_size: int = 2
  activation_fn: str = "gelu-approximate"
  num_embeds_ada_norm: int = 1000
  upcast_attention: bool = False
  norm_type: str = "ada_norm_zero"
  norm_elementwise_affine: bool = False
  norm_eps: float = 1e-5
  dtype: str = "float32"
  remat: bool | str = False

  def __post_init__(self):
    check_remat(self.remat)
    resolve_dtype(self.dtype)
    if self.norm_type != "ada_norm_zero":
      raise ValueError(f"DiT config: norm_type={self.norm_type!r} is not supported (only 'ada_norm_zero')")
    if self.activation_fn not in _DIT_ACTIVATIONS:
      raise ValueError(f"DiT config: activation_fn={self.activation_fn!r} is not supported "
                       f"(supported: {_DIT_ACTIVATIONS})")
    if self.num_embeds_ada_norm is None or self.num_embeds_ada_norm < 1:
      raise ValueError(f"DiT config: num_embeds_ada_norm must be a positive class count, got "
                       f"{self.num_embeds_ada_norm!r}")
    if self.inner_dim % 4:
      raise ValueError(f"DiT width {self.inner_dim} must be divisible by 4 (2-D sin-cos position embedding)")
    if self.num_layers < 1:
      raise ValueError(f"DiT config: num_layers must be >= 1, got {self.num_layers}")
    if self.sample_size % self.patch_size:
      raise ValueError(f"sample_size {self.sample_size} is not divisible by patch_size {self.patch_size}")

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def output_channels(self) -> int:
    return self.in_channels if self.out_channels is None else self.out_channels

  @property
  def null_class(self) -> int:
    """The label of the unconditional (dropped) class: ``num_embeds_ada_norm``."""
    return self.num_embeds_ada_norm

  @property
  def learned_sigma(self) -> bool:
    return self.output_channels == 2 * self.in_channels

  @property
  def compute_dtype(self) -> Any:
    return resolve_dtype(self.dtype)

  @classmethod
  def tiny(cls, **overrides) -> DiTConfig:
    """Two blocks of width 32 on 8x8x4 latents, 1000 classes, learned variance: for tests."""
    base = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                sample_size=8, patch_size=2)
    return cls(**{**base, **overrides})

  @classmethod
  def xl_2(cls, **overrides) -> DiTConfig:
    """DiT-XL/2 (width 1152, 28 blocks, patch 2, learned variance) on 32x32 latents (256-pixel images);
    749,826,464 parameters in diffusers' layout (every block keeps its own timestep and label embedders)."""
    base = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                sample_size=32, patch_size=2)
    return cls(**{**base, **overrides})

  @classmethod
  def from_diffusers_config(cls, config: Mapping[str, Any], **overrides) -> DiTConfig:
    """Builds a config from a diffusers ``DiTTransformer2DModel`` (or DiT ``Transformer2DModel``)
    ``config.json`` dict.

    Args:
      config: the parsed config.json.
      **overrides: jdiff fields, e.g. ``dtype="bfloat16"``, ``remat=True``.

    Raises:
      ValueError: naming the first unknown or unsupported key.

    Example:
      >>> cfg = DiTConfig.from_diffusers_config({"num_layers": 2, "sample_size": 8})
      >>> cfg.num_layers
      2
    """
    config = dict(config)
    if config.get("patch_size", 2) is None:
      raise ValueError("DiT config: patch_size is null (a continuous or vectorised Transformer2DModel, not a DiT)")
    return config_from_dict(cls, config, _DIT_FIXED, "DiT", overrides)

  def to_diffusers_config(self) -> dict[str, Any]:
    """The diffusers ``DiTTransformer2DModel`` config dict.

    Example:
      >>> DiTConfig.tiny().to_diffusers_config()["out_channels"]
      8
    """
    return config_to_dict(self, "DiTTransformer2DModel")


# ---- shared pieces ----------------------------------------------------------------------------------


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """[sin(pos * w), cos(pos * w)] with w_k = 10000^(-k / (dim / 2)), float64 [M, dim]."""
  omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
  omega = 1.0 / 10000.0 ** omega  # [dim / 2]
  out = np.outer(pos.reshape(-1).astype(np.float64), omega)  # [M, dim / 2]
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


@functools.lru_cache(maxsize=32)
def sincos_pos_embed(dim: int, height: int, width: int, *, base_size: int, grid_size: tuple[int, int] | None = None,
                     offset: tuple[int, int] = (0, 0), interpolation_scale: float = 1.0) -> np.ndarray:
  """The fixed 2-D sin-cos position embedding of an ``height x width`` patch grid, float32 [h * w, dim].

  Token (i, j) (row-major) gets ``[emb_1d(x_j), emb_1d(y_i)]`` (first half: the column coordinate),
  with coordinates ``(offset + index) / (grid / base_size) / interpolation_scale`` computed in float32
  and the sines and cosines in float64, as diffusers' ``get_2d_sincos_pos_embed`` does. ``grid_size``
  (default ``(height, width)``) is the grid the coordinates are scaled for; a ``height x width``
  window at ``offset`` of a larger grid is SD3's cropped embedding.

  Example:
    >>> sincos_pos_embed(32, 4, 4, base_size=4).shape
    (16, 32)
  """
  if dim % 4:
    raise ValueError(f"sin-cos position embedding width {dim} must be divisible by 4")
  gh, gw = grid_size or (height, width)
  scale = np.float32(interpolation_scale)
  ys = (np.arange(gh, dtype=np.float32) / np.float32(gh / base_size) / scale)[offset[0]:offset[0] + height]
  xs = (np.arange(gw, dtype=np.float32) / np.float32(gw / base_size) / scale)[offset[1]:offset[1] + width]
  y = np.repeat(ys, width)  # [h * w], row index
  x = np.tile(xs, height)  # [h * w], column index
  emb = np.concatenate([_sincos_1d(dim // 2, x), _sincos_1d(dim // 2, y)], axis=1)
  emb = emb.astype(np.float32)
  emb.setflags(write=False)
  return emb


def patchify(x: jax.Array, p: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H / p) * (W / p), p * p * C], patches row-major, (row, col, channel) inside."""
  b, hgt, wid, c = x.shape
  x = x.reshape(b, hgt // p, p, wid // p, p, c).transpose(0, 1, 3, 2, 4, 5)  # [B, h, w, p, p, C]
  return x.reshape(b, (hgt // p) * (wid // p), p * p * c)


def unpatchify(x: jax.Array, h: int, w: int, p: int) -> jax.Array:
  """[B, h * w, p * p * C] -> [B, h * p, w * p, C] (diffusers' ``nhwpqc -> nchpwq`` in NHWC)."""
  b, _, d = x.shape
  c = d // (p * p)
  x = x.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)  # [B, h, p, w, p, C]
  return x.reshape(b, h * p, w * p, c)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """``x * (1 + scale) + shift`` with per-example shift/scale [B, D] over tokens x [B, T, D]."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


def layer_norm(eps: float, dtype: Dtype, name: str, *, affine: bool = False) -> nn.LayerNorm:
  """LayerNorm over the last axis, with (``affine``) or without learned scale and bias."""
  return nn.LayerNorm(epsilon=eps, use_bias=affine, use_scale=affine, dtype=dtype, use_fast_variance=False,
                      name=name)


class PatchEmbed(nn.Module):
  """diffusers' ``PatchEmbed`` projection: a p x p stride-p convolution as one matmul over patches.

  Parameters ``proj/kernel`` [p, p, C, D] (HWIO, a convolution's layout) and ``proj/bias`` [D].
  Returns the tokens [B, (H / p) * (W / p), D] (position embedding not added).
  """

  features: int
  patch_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p, c = self.patch_size, x.shape[-1]
    proj = _PatchProj(self.features, p, dtype=self.dtype, name="proj")
    return proj(patchify(x, p), c)  # [B, N, D]


class _PatchProj(nn.Module):
  features: int
  patch_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, patches: jax.Array, in_channels: int) -> jax.Array:
    p = self.patch_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, in_channels, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    patches, kernel, bias = nn.dtypes.promote_dtype(patches, kernel, bias, dtype=self.dtype)
    out = jnp.einsum("bnk,kd->bnd", patches, kernel.reshape(p * p * in_channels, self.features))
    return out + bias[None, None, :]


class FeedForward(nn.Module):
  """diffusers' ``FeedForward`` with a GELU activation: ``net_2(gelu(net_0.proj(x)))``, hidden 4x."""

  mult: int = 4
  approximate: bool = True
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    dim = x.shape[-1]
    h = _Proj(dim * self.mult, dtype=self.dtype, name="net_0")(x)  # [B, T, mult * D]
    h = jax.nn.gelu(h, approximate=True) if self.approximate else layers.gelu_exact(h)
    if self.dropout > 0:
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return nn.Dense(dim, dtype=self.dtype, name="net_2")(h)  # [B, T, D]


class _Proj(nn.Module):
  """A Dense named ``proj`` inside (diffusers' ``GELU.proj``)."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Dense(self.features, dtype=self.dtype, name="proj")(x)


class AdaLayerNormZero(nn.Module):
  """adaLN-zero: ``chunks`` modulation vectors ``linear(silu(emb))`` [B, D] each, in diffusers' order
  (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp[, shift_msa2, scale_msa2, gate_msa2]),
  and the first normalised-and-modulated input (LayerNorm without affine, eps 1e-6).

  Returns ``(modulated x [B, T, D], [the chunks], normalised x [B, T, D])``.
  """

  chunks: int = 6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array) -> tuple[jax.Array, list[jax.Array], jax.Array]:
    dim = x.shape[-1]
    mod = nn.Dense(self.chunks * dim, dtype=self.dtype, name="linear")(nn.silu(emb))  # [B, chunks * D]
    parts = jnp.split(mod, self.chunks, axis=-1)
    normed = layer_norm(1e-6, self.dtype, "norm")(x)
    return modulate(normed, parts[0], parts[1]), parts, normed


class _LabelEmbedding(nn.Module):
  num_classes: int
  features: int

  @nn.compact
  def __call__(self, labels: jax.Array) -> jax.Array:
    return nn.Embed(self.num_classes + 1, self.features, name="embedding_table")(labels)  # [B, D]


class _TimestepLabelEmbedding(nn.Module):
  """diffusers' ``CombinedTimestepLabelEmbeddings``: ``timestep_embedder(t features) + table[label]``."""

  num_classes: int
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t_feat: jax.Array, labels: jax.Array) -> jax.Array:
    temb = layers.TimestepEmbedding(self.features, dtype=self.dtype, name="timestep_embedder")(t_feat)
    return temb + _LabelEmbedding(self.num_classes, self.features, name="class_embedder")(labels).astype(temb.dtype)


class _DiTNorm1(nn.Module):
  """A DiT block's ``norm1``: its own timestep + label embedding, then adaLN-zero."""

  num_classes: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, t_feat, labels):
    dim = x.shape[-1]
    emb = _TimestepLabelEmbedding(self.num_classes, dim, dtype=self.dtype, name="emb")(t_feat, labels)  # [B, D]
    parts = jnp.split(nn.Dense(6 * dim, dtype=self.dtype, name="linear")(nn.silu(emb)), 6, axis=-1)
    normed = modulate(layer_norm(1e-6, self.dtype, "norm")(x), parts[0], parts[1])
    return normed, parts, emb


class DiTBlock(nn.Module):
  """diffusers' ``BasicTransformerBlock`` with ``norm_type="ada_norm_zero"`` and no cross-attention.

  Returns ``(x [B, T, D], emb [B, D])``; ``emb`` is the block's timestep + label embedding.
  """

  heads: int
  head_dim: int
  num_classes: int
  attention_bias: bool = True
  upcast_attention: bool = False
  approximate_gelu: bool = True
  norm_elementwise_affine: bool = False
  norm_eps: float = 1e-5
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, t_feat: jax.Array, labels: jax.Array, train: bool = False):
    normed, (_, _, gate_msa, shift_mlp, scale_mlp, gate_mlp), emb = _DiTNorm1(
        self.num_classes, dtype=self.dtype, name="norm1")(x, t_feat, labels)
    attn = layers.Attention(self.heads, self.head_dim, qkv_bias=self.attention_bias, upcast=self.upcast_attention,
                            dropout=self.dropout, dtype=self.dtype, name="attn1")(normed, None, train)
    x = x + gate_msa[:, None, :] * attn  # [B, T, D]
    h = layer_norm(self.norm_eps, self.dtype, "norm3", affine=self.norm_elementwise_affine)(x)
    h = modulate(h, shift_mlp, scale_mlp)
    h = FeedForward(approximate=self.approximate_gelu, dropout=self.dropout, dtype=self.dtype, name="ff")(h, train)
    return x + gate_mlp[:, None, :] * h, emb


class DiT(nn.Module):
  """Class-conditional diffusion transformer, numerically equal to diffusers' ``DiTTransformer2DModel``.

  Attributes:
    config: a :class:`DiTConfig`.

  Example:
    >>> dit = DiT(DiTConfig.tiny(dtype="bfloat16", remat=True))
  """

  config: DiTConfig

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, class_labels: jax.Array, *, train: bool = False) -> jax.Array:
    """Predicts the model output for a batch.

    Args:
      x: noisy latents [B, H, W, in_channels], H and W divisible by ``patch_size``.
      t: timesteps [B] (int or float) or a scalar.
      class_labels: int labels [B] in [0, num_embeds_ada_norm]; ``num_embeds_ada_norm`` is the null class.
      train: enables dropout (needs a "dropout" rng when ``config.dropout`` > 0).

    Returns:
      float32 [B, H, W, out_channels] (epsilon first, then the variance channels with learned sigma).
    """
    cfg = self.config
    dtype = cfg.compute_dtype
    p = cfg.patch_size
    t = patch_inputs(x, t, cfg.in_channels, p, "DiT")
    b, hgt, wid, _ = x.shape
    class_labels = jnp.asarray(class_labels)
    if class_labels.shape != (b,) or not jnp.issubdtype(class_labels.dtype, jnp.integer):
      raise ValueError(f"class_labels must be integer labels of shape [{b}], got {class_labels.dtype} "
                       f"{class_labels.shape}")
    h, w = hgt // p, wid // p
    d = cfg.inner_dim

    tokens = PatchEmbed(d, p, dtype=dtype, name="pos_embed")(x.astype(dtype))  # [B, N, D]
    pos = sincos_pos_embed(d, h, w, base_size=cfg.sample_size // p)  # [N, D] constant
    tokens = (tokens + jnp.asarray(pos)[None]).astype(dtype)
    t_feat = layers.timestep_embedding(t, 256, flip_sin_to_cos=True, freq_shift=1).astype(dtype)  # [B, 256]

    block = layers.remat_module(DiTBlock, cfg.remat, static_argnums=(4,))
    cond = None
    for i in range(cfg.num_layers):
      tokens, emb = block(cfg.num_attention_heads, cfg.attention_head_dim, cfg.num_embeds_ada_norm,
                          attention_bias=cfg.attention_bias, upcast_attention=cfg.upcast_attention,
                          approximate_gelu=cfg.activation_fn == "gelu-approximate",
                          norm_elementwise_affine=cfg.norm_elementwise_affine, norm_eps=cfg.norm_eps,
                          dropout=cfg.dropout, dtype=dtype, name=f"transformer_blocks_{i}")(
                              tokens, t_feat, class_labels, train)
      cond = emb if i == 0 else cond

    shift, scale = jnp.split(nn.Dense(2 * d, dtype=dtype, name="proj_out_1")(nn.silu(cond)), 2, axis=-1)
    tokens = modulate(layer_norm(1e-6, dtype, "norm_out")(tokens), shift, scale)
    tokens = nn.Dense(p * p * cfg.output_channels, dtype=dtype, name="proj_out_2")(tokens)  # [B, N, p * p * C_out]
    return unpatchify(tokens, h, w, p).astype(jnp.float32)  # [B, H, W, C_out]
