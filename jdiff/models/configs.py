"""Frozen configs for the UNet and the autoencoder, with presets and diffusers ``config.json`` mapping.

Field names are diffusers' (``block_out_channels``, ``attention_head_dim``, ...) with the same meaning,
including diffusers' historical quirk that ``attention_head_dim`` of ``UNet2DConditionModel`` is the
number of heads when ``num_attention_heads`` is unset. Two jdiff-only fields: ``dtype`` (compute
dtype; parameters are always float32) and ``remat`` (rematerialise blocks in the backward pass).

Presets: ``tiny`` (tests), ``digits`` (the bundled 32x32 digits, trains on CPU in minutes), ``sd15`` and
``sd21`` (Stable Diffusion 1.5 / 2.1 shapes), ``sdxl_base`` and ``sdxl_refiner`` (the UNets of Stable
Diffusion XL 1.0; the VAE preset ``sdxl``).

Example:
  >>> cfg = UNetConfig.sd15(dtype="bfloat16", remat=True)
  >>> cfg.heads_per_block()
  (8, 8, 8, 8)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

__all__ = ["UNetConfig", "VAEConfig"]

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_TYPES = ("UNetMidBlock2DCrossAttn", None)
_CLASS_EMBED_TYPES = (None, "timestep", "identity", "projection", "simple_projection")
_ADDITION_EMBED_TYPES = (None, "text_time")

# diffusers UNet2DConditionModel options jdiff does not implement: accepted only at these values.
_UNET_FIXED: dict[str, tuple[Any, ...]] = {
    "only_cross_attention": (False,),
    "act_fn": ("silu",),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "dual_cross_attention": (False,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "addition_embed_type_num_heads": None,  # any value: only "text" / "text_image" embeddings use it
}
_VAE_FIXED: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu",),
    "latents_mean": None,  # informational: kept in the config, not used by the network
    "latents_std": None,
}


def _tuple(value: Any) -> Any:
  return tuple(_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _per_block(value: Any, n: int, name: str) -> tuple:
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"{name} has {len(value)} entries but there are {n} blocks")
    return tuple(value)
  return (value,) * n


REMAT_POLICIES = ("full", "matmuls", "weights")


def check_remat(remat: Any) -> None:
  """Raises ValueError unless ``remat`` is False, True or one of :data:`REMAT_POLICIES`.

  ``False`` keeps every activation for the backward pass; ``True`` / ``"full"`` keeps only each block's
  inputs and recomputes the block; ``"matmuls"`` keeps the outputs of convolutions and matmuls and
  recomputes the cheap element-wise work (norms, activations, softmax); ``"weights"`` keeps only the
  outputs of convolutions and matmuls against weights (not attention's batched matmuls, whose
  [B, heads, T, S] products are the largest activations at high resolution).
  """
  if remat is False or remat is True or remat in REMAT_POLICIES:
    return
  raise ValueError(f"remat={remat!r} is not supported (use False, True or one of {REMAT_POLICIES})")


def resolve_dtype(dtype: Any) -> Any:
  """``jnp.dtype(dtype)``, or a one-line ValueError naming a value that is not a dtype."""
  try:
    return jnp.dtype(dtype)
  except TypeError:
    raise ValueError(f"dtype {dtype!r} is not a dtype (use e.g. 'float32' or 'bfloat16')") from None


def config_from_dict(cls: type, config: Mapping[str, Any], fixed: Mapping[str, Any], kind: str,
                     overrides: Mapping[str, Any]) -> Any:
  """A frozen config dataclass from a diffusers ``config.json`` dict.

  Keys starting with ``_`` are ignored; keys in ``fixed`` (options jdiff does not implement) are
  accepted only at the values listed there (None: any value); any other unknown key raises.

  Raises:
    ValueError: one line naming the first unknown or unsupported key.
  """
  fields = {f.name for f in dataclasses.fields(cls)} - {"dtype", "remat"}
  kwargs: dict[str, Any] = {}
  for key, value in config.items():
    if key.startswith("_"):
      continue  # _class_name, _diffusers_version, _name_or_path
    if key in fields:
      kwargs[key] = _tuple(value)
    elif key in fixed:
      allowed = fixed[key]
      if allowed is not None and _tuple(value) not in allowed:
        raise ValueError(f"{kind} config: {key}={value!r} is not supported by jdiff "
                         f"(supported: {' or '.join(repr(a) for a in allowed)})")
    else:
      raise ValueError(f"{kind} config: unknown key {key!r}")
  kwargs.update(overrides)
  return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Configuration of :class:`jdiff.models.UNet` (diffusers' ``UNet2DConditionModel`` options).

  Attributes:
    sample_size: nominal input height/width (informational).
    in_channels, out_channels: input and output channels.
    center_input_sample: map the input x to 2x - 1 first.
    flip_sin_to_cos, freq_shift: sinusoidal timestep embedding layout.
    down_block_types: per level, "CrossAttnDownBlock2D" or "DownBlock2D".
    mid_block_type: "UNetMidBlock2DCrossAttn" or None (no middle block).
    up_block_types: per level (deepest first), "CrossAttnUpBlock2D" or "UpBlock2D".
    block_out_channels: channels per level.
    layers_per_block: resnets per down level (up levels have one more); int or per level.
    downsample_padding: padding of the strided downsampling conv.
    mid_block_scale_factor: output scale of the middle block's resnets.
    dropout: dropout rate in resnets, attention outputs and feed-forwards (training only).
    norm_num_groups, norm_eps: GroupNorm of the resnets.
    cross_attention_dim: width of ``encoder_hidden_states``; int or per level.
    transformer_layers_per_block: transformer blocks per attention; int or per level.
    attention_head_dim: heads per level when ``num_attention_heads`` is None (diffusers' naming).
    num_attention_heads: heads per level (int or per level); overrides ``attention_head_dim``.
    use_linear_projection: linear (SD2) instead of 1x1-conv (SD1) transformer projections.
    upcast_attention: compute attention in float32 whatever the compute dtype (None reads as False).
    class_embed_type, num_class_embeds: class conditioning: None with ``num_class_embeds`` is a label
      embedding table; "timestep", "identity", "projection" and "simple_projection" as in diffusers.
    projection_class_embeddings_input_dim: input width of the "projection" class embedding, and of the
      "text_time" additional embedding (pooled text width + number of time ids x
      ``addition_time_embed_dim``; 1280 + 6 x 256 = 2816 for SDXL base).
    addition_embed_type: None or "text_time" (SDXL): the UNet takes ``text_embeds`` [B, P] (pooled
      text) and ``time_ids`` [B, N] (micro-conditioning: original size, crop corner, target size or
      aesthetic score); each time id gets the sinusoidal embedding of width ``addition_time_embed_dim``,
      these are flattened, appended to ``text_embeds`` and sent through ``add_embedding`` (a
      two-layer MLP), whose output is added to the time embedding.
    addition_time_embed_dim: width of each time id's sinusoidal embedding ("text_time" only).
    time_embedding_dim: width of the time embedding (default 4 x block_out_channels[0]).
    time_cond_proj_dim: width of an extra embedding added to the timestep features (LCM's w embedding).
    conv_in_kernel, conv_out_kernel: kernel sizes of the first and last convs.
    dtype: compute dtype ("float32", "bfloat16", ...); parameters are float32.
    remat: rematerialise resnets and transformer blocks (``nn.remat``) to save memory: False, True
      (= "full") or a policy of :data:`REMAT_POLICIES` (see :func:`check_remat`).
  """

  sample_size: int = 64
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                       "CrossAttnDownBlock2D", "DownBlock2D")
  mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
  up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                     "CrossAttnUpBlock2D")
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int | tuple[int, ...] = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  dropout: float = 0.0
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int | tuple[int, ...] = 1280
  transformer_layers_per_block: int | tuple[int, ...] = 1
  attention_head_dim: int | tuple[int, ...] = 8
  num_attention_heads: int | tuple[int, ...] | None = None
  use_linear_projection: bool = False
  upcast_attention: bool = False
  class_embed_type: str | None = None
  num_class_embeds: int | None = None
  projection_class_embeddings_input_dim: int | None = None
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  time_embedding_dim: int | None = None
  time_cond_proj_dim: int | None = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  dtype: str = "float32"
  remat: bool | str = False

  def __post_init__(self):
    check_remat(self.remat)
    for name in ("down_block_types", "up_block_types", "block_out_channels"):
      object.__setattr__(self, name, _tuple(getattr(self, name)))
    for name in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block",
                 "attention_head_dim", "num_attention_heads"):
      object.__setattr__(self, name, _tuple(getattr(self, name)))
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(f"down_block_types ({len(self.down_block_types)}), up_block_types "
                       f"({len(self.up_block_types)}) and block_out_channels ({n}) must have one "
                       "entry per level")
    for t in self.down_block_types:
      if t not in _DOWN_TYPES:
        raise ValueError(f"down block type {t!r} is not supported (supported: {_DOWN_TYPES})")
    for t in self.up_block_types:
      if t not in _UP_TYPES:
        raise ValueError(f"up block type {t!r} is not supported (supported: {_UP_TYPES})")
    if self.mid_block_type not in _MID_TYPES:
      raise ValueError(f"mid_block_type {self.mid_block_type!r} is not supported (supported: "
                       f"{_MID_TYPES})")
    if self.class_embed_type not in _CLASS_EMBED_TYPES:
      raise ValueError(f"class_embed_type {self.class_embed_type!r} is not supported (supported: "
                       f"{_CLASS_EMBED_TYPES})")
    if (self.class_embed_type in ("projection", "simple_projection")
        and self.projection_class_embeddings_input_dim is None):
      raise ValueError(f"class_embed_type {self.class_embed_type!r} needs "
                       "projection_class_embeddings_input_dim")
    if self.upcast_attention is None:  # diffusers configs write null for False
      object.__setattr__(self, "upcast_attention", False)
    if self.addition_embed_type not in _ADDITION_EMBED_TYPES:
      raise ValueError(f"addition_embed_type={self.addition_embed_type!r} is not supported (supported: "
                       f"{' or '.join(repr(a) for a in _ADDITION_EMBED_TYPES)})")
    if self.addition_embed_type == "text_time":
      for name in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
          raise ValueError(f"addition_embed_type 'text_time' needs a positive {name}, got "
                           f"{getattr(self, name)!r}")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f"block_out_channels {self.block_out_channels} must be divisible by "
                         f"norm_num_groups={self.norm_num_groups}")
    for name in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block",
                 "attention_head_dim"):
      _per_block(getattr(self, name), n, name)
    if len(set(self.per_block("cross_attention_dim"))) != 1:
      raise ValueError(f"cross_attention_dim {self.cross_attention_dim} must be the same for every block "
                       "(one encoder_hidden_states feeds all of them)")
    for c, heads in zip(self.block_out_channels, self.heads_per_block()):
      if c % heads:
        raise ValueError(f"{c} channels cannot be split into {heads} attention heads")
    resolve_dtype(self.dtype)

  # Per-level views -------------------------------------------------------------------------------
  @property
  def num_levels(self) -> int:
    return len(self.block_out_channels)

  @property
  def compute_dtype(self) -> Any:
    return resolve_dtype(self.dtype)

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  def heads_per_block(self) -> tuple[int, ...]:
    heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
    return _per_block(heads, self.num_levels, "num_attention_heads")

  def per_block(self, name: str) -> tuple:
    return _per_block(getattr(self, name), self.num_levels, name)

  # Presets --------------------------------------------------------------------------------------
  @classmethod
  def tiny(cls, **overrides) -> UNetConfig:
    """Two levels (32, 64 channels), one layer each: for tests."""
    base = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                attention_head_dim=4, norm_num_groups=8)
    return cls(**{**base, **overrides})

  @classmethod
  def digits(cls, **overrides) -> UNetConfig:
    """A small latent UNet for 8x8x4 latents of 32x32 digits (about 6M parameters)."""
    base = dict(sample_size=8, block_out_channels=(64, 128, 128), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=128, attention_head_dim=4, norm_num_groups=32)
    return cls(**{**base, **overrides})

  @classmethod
  def sd15(cls, **overrides) -> UNetConfig:
    """Stable Diffusion 1.x (859,520,964 parameters)."""
    base = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    return cls(**{**base, **overrides})

  @classmethod
  def sd21(cls, **overrides) -> UNetConfig:
    """Stable Diffusion 2.1 (768-v): linear projections, 64-wide heads, 1024-wide text."""
    base = dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True, upcast_attention=True)
    return cls(**{**base, **overrides})

  @classmethod
  def sdxl_base(cls, **overrides) -> UNetConfig:
    """Stable Diffusion XL 1.0 base (2,567,463,684 parameters): three levels, no attention at the first,
    1, 2 and 10 transformer blocks, 2048-wide text (both encoders' hidden states), "text_time"
    conditioning on the 1280-wide pooled text and six time ids."""
    base = dict(sample_size=128, block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    return cls(**{**base, **overrides})

  @classmethod
  def sdxl_refiner(cls, **overrides) -> UNetConfig:
    """Stable Diffusion XL 1.0 refiner (2,259,526,660 parameters): four 384-based levels with 4
    transformer blocks, 1280-wide text (the second encoder only), "text_time" conditioning on the pooled
    text and five time ids (original size, crop corner, aesthetic score)."""
    base = dict(sample_size=128, block_out_channels=(384, 768, 1536, 1536),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=4, attention_head_dim=(6, 12, 24, 24),
                cross_attention_dim=1280, use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=256, projection_class_embeddings_input_dim=2560)
    return cls(**{**base, **overrides})

  PRESETS = ("tiny", "digits", "sd15", "sd21", "sdxl_base", "sdxl_refiner")

  @classmethod
  def preset(cls, name: str, **overrides) -> UNetConfig:
    """A preset by name: one of :attr:`PRESETS`."""
    if name not in cls.PRESETS:
      raise ValueError(f"unknown UNet preset {name!r} (choose {', '.join(cls.PRESETS)})")
    return getattr(cls, name)(**overrides)

  # diffusers config.json ------------------------------------------------------------------------
  @classmethod
  def from_diffusers_config(cls, config: Mapping[str, Any], **overrides) -> UNetConfig:
    """Builds a config from a diffusers ``UNet2DConditionModel`` ``config.json`` dict.

    Keys starting with ``_`` are ignored; options jdiff does not implement are accepted only at
    their inert default; anything else raises.

    Args:
      config: the parsed config.json.
      **overrides: jdiff fields to set, e.g. ``dtype="bfloat16"``, ``remat=True``.

    Raises:
      ValueError: naming the first unknown or unsupported key.

    Example:
      >>> raw = read_config("sd15/unet")  # doctest: +SKIP
      >>> cfg = UNetConfig.from_diffusers_config(raw, dtype="bfloat16")  # doctest: +SKIP
    """
    config = dict(config)
    if config.get("num_attention_heads") is not None:
      raise ValueError("UNet config: num_attention_heads must be null in a diffusers "
                       "UNet2DConditionModel config (diffusers uses attention_head_dim as the head count)")
    return config_from_dict(cls, config, _UNET_FIXED, "UNet", overrides)

  def to_diffusers_config(self) -> dict[str, Any]:
    """The diffusers ``UNet2DConditionModel`` config dict (heads written as ``attention_head_dim``).

    Example:
      >>> UNetConfig.tiny().to_diffusers_config()["block_out_channels"]
      [32, 64]
    """
    out: dict[str, Any] = {"_class_name": "UNet2DConditionModel"}
    for f in dataclasses.fields(self):
      if f.name in ("dtype", "remat", "num_attention_heads"):
        continue
      value = getattr(self, f.name)
      out[f.name] = list(value) if isinstance(value, tuple) else value
    heads = self.heads_per_block()
    out["attention_head_dim"] = heads[0] if len(set(heads)) == 1 else list(heads)
    out["num_attention_heads"] = None
    return out


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Configuration of :class:`jdiff.models.AutoencoderKL` (diffusers' ``AutoencoderKL`` options).

  Attributes:
    sample_size: nominal image size (informational).
    in_channels, out_channels: image channels.
    down_block_types, up_block_types: "DownEncoderBlock2D" / "UpDecoderBlock2D" per level.
    block_out_channels: channels per level (the image is downsampled len - 1 times).
    layers_per_block: resnets per encoder level (decoder levels have one more).
    latent_channels: channels of the latent.
    norm_num_groups: GroupNorm groups.
    scaling_factor: multiply latents by this before diffusion (0.18215 for SD).
    shift_factor: subtracted before scaling when set (latent = (z - shift) * scale).
    use_quant_conv, use_post_quant_conv: the 1x1 convs around the latent.
    mid_block_add_attention: attention in the middle blocks.
    force_upcast: compute in float32 when ``dtype`` is float16 (diffusers' flag of the same name: the
      SDXL autoencoder's activations overflow float16). bfloat16, which has float32's range, is kept;
      :attr:`compute_dtype` is the dtype actually used.
    dtype: compute dtype; parameters are float32.
    remat: rematerialise resnets: False, True or a policy (see :func:`check_remat`).
  """

  sample_size: int = 32
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  force_upcast: bool = True
  dtype: str = "float32"
  remat: bool | str = False

  def __post_init__(self):
    check_remat(self.remat)
    for name in ("down_block_types", "up_block_types", "block_out_channels"):
      object.__setattr__(self, name, _tuple(getattr(self, name)))
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(f"down_block_types ({len(self.down_block_types)}), up_block_types "
                       f"({len(self.up_block_types)}) and block_out_channels ({n}) must have one "
                       "entry per level")
    if any(t != "DownEncoderBlock2D" for t in self.down_block_types):
      raise ValueError(f"down_block_types {self.down_block_types} not supported (only DownEncoderBlock2D)")
    if any(t != "UpDecoderBlock2D" for t in self.up_block_types):
      raise ValueError(f"up_block_types {self.up_block_types} not supported (only UpDecoderBlock2D)")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f"block_out_channels {self.block_out_channels} must be divisible by "
                         f"norm_num_groups={self.norm_num_groups}")
    resolve_dtype(self.dtype)

  @property
  def compute_dtype(self) -> Any:
    """The dtype the autoencoder computes in: ``dtype``, or float32 for float16 with ``force_upcast``."""
    dtype = resolve_dtype(self.dtype)
    if self.force_upcast and dtype == jnp.float16:
      return jnp.dtype(jnp.float32)
    return dtype

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def tiny(cls, **overrides) -> VAEConfig:
    """Two levels (32, 64 channels): for tests."""
    base = dict(sample_size=32, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    return cls(**{**base, **overrides})

  @classmethod
  def digits(cls, **overrides) -> VAEConfig:
    """32x32 single-channel digits to 8x8x4 latents (three levels: 32, 64, 64 channels)."""
    base = dict(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                layers_per_block=1, norm_num_groups=16, scaling_factor=1.0,
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    return cls(**{**base, **overrides})

  @classmethod
  def sd15(cls, **overrides) -> VAEConfig:
    """The Stable Diffusion 1.x/2.x autoencoder (8x downsampling, 4 latent channels)."""
    base = dict(sample_size=512, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    return cls(**{**base, **overrides})

  @classmethod
  def sd21(cls, **overrides) -> VAEConfig:
    """Stable Diffusion 2.1's autoencoder (same shapes as 1.5, 768-pixel sample size)."""
    return cls.sd15(**{"sample_size": 768, **overrides})

  @classmethod
  def sdxl(cls, **overrides) -> VAEConfig:
    """Stable Diffusion XL's autoencoder: SD's shapes, 1024-pixel sample size, scaling factor 0.13025,
    float32 compute under a float16 dtype (``force_upcast``)."""
    return cls.sd15(**{"sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True, **overrides})

  PRESETS = ("tiny", "digits", "sd15", "sd21", "sdxl")

  @classmethod
  def preset(cls, name: str, **overrides) -> VAEConfig:
    """A preset by name: one of :attr:`PRESETS`."""
    if name not in cls.PRESETS:
      raise ValueError(f"unknown VAE preset {name!r} (choose {', '.join(cls.PRESETS)})")
    return getattr(cls, name)(**overrides)

  @classmethod
  def from_diffusers_config(cls, config: Mapping[str, Any], **overrides) -> VAEConfig:
    """Builds a config from a diffusers ``AutoencoderKL`` ``config.json`` dict.

    Raises:
      ValueError: naming the first unknown or unsupported key.

    Example:
      >>> cfg = VAEConfig.from_diffusers_config(read_config("sd15/vae"))  # doctest: +SKIP
    """
    return config_from_dict(cls, dict(config), _VAE_FIXED, "VAE", overrides)

  def to_diffusers_config(self) -> dict[str, Any]:
    """The diffusers ``AutoencoderKL`` config dict for this config.

    Example:
      >>> VAEConfig.tiny().to_diffusers_config()["latent_channels"]
      4
    """
    out: dict[str, Any] = {"_class_name": "AutoencoderKL"}
    for f in dataclasses.fields(self):
      if f.name in ("dtype", "remat"):
        continue
      value = getattr(self, f.name)
      out[f.name] = list(value) if isinstance(value, tuple) else value
    return out
