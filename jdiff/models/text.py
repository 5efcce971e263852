"""CLIP text encoder: the causal pre-LayerNorm transformer that conditions Stable Diffusion.

Numerics follow transformers' ``CLIPTextModel``: token + learned position embeddings, ``num_hidden_layers``
pre-LN blocks (causal self-attention, MLP with ``quick_gelu`` or ``gelu``), a final LayerNorm, and a
pooled output read at the end-of-text token. With ``projection_dim`` set the module is transformers'
``CLIPTextModelWithProjection``: the pooled output also goes through ``text_projection`` (no bias), as
``text_embeds`` (SDXL's second encoder, OpenCLIP ViT-bigG). Parameter names mirror the transformers state dict
(``encoder/layers_3/self_attn/q_proj/kernel`` <-> ``encoder.layers.3.self_attn.q_proj.weight``), so
checkpoints convert by renaming and transposing (see :mod:`jdiff.convert.text`).

Example:
  >>> config = CLIPTextConfig.tiny()
  >>> model = CLIPTextModel(config)
  >>> ids = jnp.zeros((2, config.max_position_embeddings), jnp.int32)
  >>> params = model.init(jax.random.key(0), ids)["params"]
  >>> out = model.apply({"params": params}, ids)
  >>> out.last_hidden_state.shape
  (2, 16, 32)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jdiff.models import layers
from jdiff.models.configs import check_remat

__all__ = ["CLIPTextConfig", "CLIPTextModel", "CLIPTextOutput", "ACTIVATIONS", "sdxl_text_conditioning"]


def _quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": _quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "hidden_act", "layer_norm_eps", "bos_token_id", "eos_token_id",
            "pad_token_id")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Configuration of :class:`CLIPTextModel`; field names are transformers' ``CLIPTextConfig`` names.

  Attributes:
    vocab_size: token embedding rows.
    hidden_size: model width.
    intermediate_size: MLP hidden width.
    num_hidden_layers: transformer blocks.
    num_attention_heads: attention heads (``hidden_size`` must divide evenly).
    max_position_embeddings: position embedding rows; the longest sequence (77 for CLIP).
    hidden_act: MLP activation, one of :data:`ACTIVATIONS`.
    layer_norm_eps: LayerNorm epsilon.
    bos_token_id: begin-of-text id.
    eos_token_id: end-of-text id. The pooled output is read at the first ``eos_token_id``, except for
      legacy configs with ``eos_token_id == 2`` (SD 1.x/2.x checkpoints), where it is read at the
      largest id in each row, as transformers does.
    pad_token_id: padding id (informational; the tokenizer decides padding).
    projection_dim: width of ``text_projection`` (transformers' ``CLIPTextModelWithProjection``); None
      for a plain ``CLIPTextModel``, which has no projection. Read from a transformers config only when
      its ``architectures`` name ``CLIPTextModelWithProjection`` (every CLIP text config carries a
      ``projection_dim``, used or not).
    dtype: compute dtype ("float32" or "bfloat16"); parameters stay float32.
    remat: rematerialise each block in the backward pass (``nn.remat``): False, True or a policy
      (see :func:`jdiff.models.configs.check_remat`).

  Example:
    >>> CLIPTextConfig.sd15().hidden_size
    768
  """
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  bos_token_id: int = 0
  eos_token_id: int = 2
  pad_token_id: int = 1
  projection_dim: int | None = None
  dtype: str = "float32"
  remat: bool | str = False

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                       f"num_attention_heads={self.num_attention_heads}")
    if self.projection_dim is not None and self.projection_dim <= 0:
      raise ValueError(f"projection_dim={self.projection_dim} must be positive (or None: no projection)")
    check_remat(self.remat)
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"dtype={self.dtype!r}; expected float32, bfloat16 or float16")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def tiny(cls, **overrides: Any) -> CLIPTextConfig:
    """A 2-layer, width-32 encoder for tests (vocab 1000, 16 positions)."""
    base = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16, bos_token_id=998, eos_token_id=999,
                pad_token_id=999)
    return cls(**{**base, **overrides})

  @classmethod
  def sd15(cls, **overrides: Any) -> CLIPTextConfig:
    """OpenAI CLIP ViT-L/14 text tower as shipped in Stable Diffusion 1.x (123M parameters)."""
    return cls(**overrides)

  @classmethod
  def sd21(cls, **overrides: Any) -> CLIPTextConfig:
    """OpenCLIP ViT-H/14 text tower as shipped in Stable Diffusion 2.x: the penultimate layer's output is
    what SD 2 uses, so the diffusers checkpoint keeps 23 of the 24 blocks."""
    base = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                hidden_act="gelu")
    return cls(**{**base, **overrides})

  @classmethod
  def sdxl(cls, **overrides: Any) -> CLIPTextConfig:
    """SDXL's first text encoder: OpenAI CLIP ViT-L/14's text tower, all 12 blocks (123M parameters)."""
    return cls(**overrides)

  @classmethod
  def sdxl_2(cls, **overrides: Any) -> CLIPTextConfig:
    """SDXL's second text encoder: OpenCLIP ViT-bigG/14's text tower with its 1280-wide projection
    (``CLIPTextModelWithProjection``, 694,659,840 parameters)."""
    base = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                hidden_act="gelu", projection_dim=1280)
    return cls(**{**base, **overrides})

  @classmethod
  def from_hf_config(cls, config: Mapping[str, Any], **overrides: Any) -> CLIPTextConfig:
    """Builds a config from a transformers ``config.json`` dict (a ``clip_text_model`` or a full ``clip``
    config, whose ``text_config`` is used). Unknown keys are ignored.

    Example:
      >>> CLIPTextConfig.from_hf_config({"hidden_size": 64, "num_attention_heads": 4}).head_dim
      16
    """
    if config.get("model_type") == "clip" or "text_config" in config:
      config = config.get("text_config") or {}
    model_type = config.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
      raise ValueError(f"model_type={model_type!r} is not a CLIP text model (expected 'clip_text_model')")
    values = {k: config[k] for k in _HF_KEYS if config.get(k) is not None}
    if "CLIPTextModelWithProjection" in (config.get("architectures") or ()):
      values["projection_dim"] = config.get("projection_dim", 512)  # transformers' default
    return cls(**{**values, **overrides})

  def to_hf_config(self) -> dict[str, Any]:
    """The transformers ``config.json`` dict for this encoder (``CLIPTextModel``, or
    ``CLIPTextModelWithProjection`` with ``projection_dim``)."""
    out = {k: getattr(self, k) for k in _HF_KEYS}
    arch = "CLIPTextModel" if self.projection_dim is None else "CLIPTextModelWithProjection"
    out.update(architectures=[arch], model_type="clip_text_model", attention_dropout=0.0,
               initializer_factor=1.0, initializer_range=0.02, projection_dim=self.projection_dim or 512,
               dtype="float32")
    return out


@flax.struct.dataclass
class CLIPTextOutput:
  """Outputs of :class:`CLIPTextModel`.

  Attributes:
    last_hidden_state: ``[B, T, D]`` final-LayerNorm output of the last block used.
    pooler_output: ``[B, D]`` ``last_hidden_state`` at the end-of-text token.
    hidden_states: when requested, ``num_hidden_layers + 1`` arrays ``[B, T, D]``: the embeddings and each
      block's output (before the final LayerNorm), like transformers' ``hidden_states``.
    text_embeds: ``[B, projection_dim]`` ``text_projection(pooler_output)`` when the config has a
      ``projection_dim``, else None (transformers' ``CLIPTextModelWithProjection`` output).
  """
  last_hidden_state: jax.Array
  pooler_output: jax.Array
  hidden_states: tuple[jax.Array, ...] | None = None
  text_embeds: jax.Array | None = None


class CLIPAttention(nn.Module):
  """Multi-head self-attention with a causal mask (and an optional key padding mask)."""
  config: CLIPTextConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    cfg = self.config
    b, t, _ = x.shape
    dense = lambda name: nn.Dense(cfg.hidden_size, dtype=cfg.dtype, name=name)
    heads = (b, t, cfg.num_attention_heads, cfg.head_dim)
    q = dense("q_proj")(x).reshape(heads)  # [B, T, N, H]
    k = dense("k_proj")(x).reshape(heads)
    v = dense("v_proj")(x).reshape(heads)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)  # [B, T, N, H]
    return dense("out_proj")(out.reshape(b, t, cfg.hidden_size))


class CLIPMLP(nn.Module):
  config: CLIPTextConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    h = nn.Dense(cfg.intermediate_size, dtype=cfg.dtype, name="fc1")(x)
    h = ACTIVATIONS[cfg.hidden_act](h)
    return nn.Dense(cfg.hidden_size, dtype=cfg.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
  """Pre-LN block: x + attn(LN(x)), then x + mlp(LN(x))."""
  config: CLIPTextConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    cfg = self.config
    norm = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, name=name)
    x = x + CLIPAttention(cfg, name="self_attn")(norm("layer_norm1")(x), mask)
    return x + CLIPMLP(cfg, name="mlp")(norm("layer_norm2")(x))


class CLIPTextModel(nn.Module):
  """The CLIP text transformer: transformers' ``CLIPTextModel``, or ``CLIPTextModelWithProjection`` when
  ``config.projection_dim`` is set (then ``text_embeds`` = ``text_projection(pooler_output)``).

  Call with ``input_ids [B, T]`` (T <= ``max_position_embeddings``), an optional ``attention_mask [B, T]``
  (1 = attend, 0 = padding; SD pipelines pass none), and:

  * ``output_hidden_states``: also return the embeddings and every block's output;
  * ``clip_skip``: use the output of block ``num_hidden_layers - clip_skip`` (0 = last), passed through the
    final LayerNorm, as ``last_hidden_state`` -- diffusers' ``clip_skip``; the later blocks are not run.
    The pooled output (and ``text_embeds``) is read from that same tensor.

  Example:
    >>> out = CLIPTextModel(CLIPTextConfig.tiny()).apply({"params": params}, ids, clip_skip=1)  # doctest: +SKIP
  """
  config: CLIPTextConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               output_hidden_states: bool = False, clip_skip: int = 0) -> CLIPTextOutput:
    cfg = self.config
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    b, t = input_ids.shape
    if t > cfg.max_position_embeddings:
      raise ValueError(f"sequence length {t} exceeds max_position_embeddings={cfg.max_position_embeddings}")
    if not 0 <= clip_skip < cfg.num_hidden_layers:
      raise ValueError(f"clip_skip={clip_skip} must be in [0, {cfg.num_hidden_layers})")
    mask = None
    if attention_mask is not None:
      if attention_mask.shape != (b, t):
        raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {(b, t)}")
      mask = attention_mask.astype(bool).reshape(b, 1, 1, t)  # [B, 1(heads), 1(queries), T(keys)]

    x = _Embeddings(cfg, name="embeddings")(input_ids)  # [B, T, D]
    hidden = _Encoder(cfg, num_layers=cfg.num_hidden_layers - clip_skip, name="encoder")(x, mask)
    x = hidden[-1]
    last = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, name="final_layer_norm")(x)

    ids = input_ids.astype(jnp.int32)
    if cfg.eos_token_id == 2:
      eos_at = jnp.argmax(ids, axis=-1)  # legacy configs: end-of-text is the largest id
    else:
      eos_at = jnp.argmax((ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)  # first occurrence
    pooled = jnp.take_along_axis(last, eos_at.reshape(b, 1, 1), axis=1).reshape(b, cfg.hidden_size)
    text_embeds = None
    if cfg.projection_dim is not None:
      text_embeds = nn.Dense(cfg.projection_dim, use_bias=False, dtype=cfg.dtype,
                             name="text_projection")(pooled)  # [B, projection_dim]
    return CLIPTextOutput(last_hidden_state=last, pooler_output=pooled,
                          hidden_states=tuple(hidden) if output_hidden_states else None,
                          text_embeds=text_embeds)


class _Embeddings(nn.Module):
  config: CLIPTextConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    cfg = self.config
    t = input_ids.shape[1]
    tok = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, name="token_embedding")(input_ids)
    pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=cfg.dtype,
                   name="position_embedding")(jnp.arange(t, dtype=jnp.int32))  # [T, D]
    return tok + pos.reshape(1, t, cfg.hidden_size)


class _Encoder(nn.Module):
  """The first ``num_layers`` blocks; returns the input and every block's output."""
  config: CLIPTextConfig
  num_layers: int

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> list[jax.Array]:
    block = layers.remat_module(CLIPEncoderLayer, self.config.remat)
    hidden = [x]
    for i in range(self.num_layers):
      x = block(self.config, name=f"layers_{i}")(x, mask)
      hidden.append(x)
    return hidden


def sdxl_text_conditioning(encoders: Sequence[tuple[CLIPTextModel, Any]], input_ids: Sequence[jax.Array], *,
                           clip_skip: int = 0) -> tuple[jax.Array, jax.Array]:
  """Stable Diffusion XL's text conditioning, as diffusers' ``StableDiffusionXLPipeline.encode_prompt``.

  Each encoder reads its own token ids; from each, ``hidden_states[-(clip_skip + 2)]`` (at ``clip_skip=0``
  the penultimate block's output, without the final LayerNorm) is taken, and these are concatenated
  along features. The pooled embedding is ``text_embeds`` (the projected pooled output of the whole
  model, whatever ``clip_skip``) of the first encoder that has a projection.

  Args:
    encoders: ``(module, params)`` per encoder, in pipeline order: SDXL base passes
      ``[(text_encoder, p1), (text_encoder_2, p2)]``, the refiner only ``[(text_encoder_2, p2)]``.
    input_ids: token ids ``[B, T]`` per encoder (each from its own tokenizer).
    clip_skip: blocks to skip beyond SDXL's penultimate one (diffusers' ``clip_skip``).

  Returns:
    ``(prompt_embeds, pooled)``: float32 ``[B, T, sum of hidden sizes]`` and ``[B, projection_dim]``.

  Raises:
    ValueError: no encoder with a projection, mismatched counts or shapes, or ``clip_skip`` too large.

  Example:
    >>> embeds, pooled = sdxl_text_conditioning([(te1, p1), (te2, p2)], [ids1, ids2])  # doctest: +SKIP
    >>> embeds.shape, pooled.shape  # doctest: +SKIP
    ((1, 77, 2048), (1, 1280))
  """
  if not encoders or len(encoders) != len(input_ids):
    raise ValueError(f"sdxl_text_conditioning needs one input_ids array per encoder, got {len(encoders)} "
                     f"encoders and {len(input_ids)} input_ids")
  if not any(module.config.projection_dim is not None for module, _ in encoders):
    raise ValueError("sdxl_text_conditioning: no encoder has a text_projection (projection_dim); SDXL's "
                     "pooled embedding comes from text_encoder_2 (CLIPTextModelWithProjection)")
  shapes = {tuple(jnp.shape(ids)) for ids in input_ids}
  if len(shapes) != 1:
    raise ValueError(f"input_ids of all encoders must have the same [B, T] shape, got {sorted(shapes)}")
  hidden, pooled = [], None
  for (module, params), ids in zip(encoders, input_ids):
    n = module.config.num_hidden_layers
    if not 0 <= clip_skip < n:
      raise ValueError(f"clip_skip={clip_skip} must be in [0, {n}) for a {n}-block encoder")
    params = params["params"] if set(params) == {"params"} else params
    out = module.apply({"params": params}, jnp.asarray(ids), output_hidden_states=True)
    hidden.append(out.hidden_states[-(clip_skip + 2)].astype(jnp.float32))  # [B, T, D_i]
    if pooled is None and out.text_embeds is not None:
      pooled = out.text_embeds.astype(jnp.float32)  # [B, projection_dim]
  return jnp.concatenate(hidden, axis=-1), pooled
