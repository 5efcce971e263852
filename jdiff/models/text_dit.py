"""A text-conditioned diffusion transformer with the UNet's call signature: SD3's MMDiT fed by one text encoder.

:class:`TextDiT` is :class:`~jdiff.models.mmdit.MMDiT` (joint text-image attention, adaLN-zero blocks)
whose pooled projection is the text encoder's own pooled state (:func:`jdiff.ldm.pooled_text`: the
causal encoder's last position), so that it is called as ``net.apply({"params": p}, x, t, context)``
like :class:`jdiff.ldm.TextUNet`: every ``model_fn`` caller (the latent diffusion bundle, classifier-free
guidance, LoRA merging) takes it unchanged. Its parameters are the MMDiT's.

:class:`TextDiTConfig` is an :class:`~jdiff.models.mmdit.SD3Config` with the few attributes the
bundle reads from its denoiser's config (``per_block("cross_attention_dim")``, ``time_cond_proj_dim``,
``class_embed_type``; the size multiple is its ``patch_size``).

Example:
  >>> net = TextDiT(TextDiTConfig.tiny())
  >>> x, ctx = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1, 5, 24))
  >>> params = net.init(jax.random.key(0), x, jnp.array([500.0]), ctx)["params"]
  >>> net.apply({"params": params}, x, jnp.array([500.0]), ctx).shape
  (1, 8, 8, 4)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jdiff.models.mmdit import MMDiT, SD3Config

__all__ = ["TextDiT", "TextDiTConfig", "text_dit_config"]


@dataclasses.dataclass(frozen=True)
class TextDiTConfig(SD3Config):
  """An :class:`~jdiff.models.mmdit.SD3Config` whose text tokens and pooled text have one width
  (``joint_attention_dim == pooled_projection_dim``), plus the denoiser attributes the bundle reads."""

  def __post_init__(self):
    super().__post_init__()
    if self.pooled_projection_dim != self.joint_attention_dim:
      raise ValueError(f"text DiT: pooled_projection_dim {self.pooled_projection_dim} must equal "
                       f"joint_attention_dim {self.joint_attention_dim} (both are the text encoder's width)")
    if self.patch_size < 1 or self.patch_size & (self.patch_size - 1):
      raise ValueError(f"text DiT: patch_size must be a power of 2, got {self.patch_size}")

  def per_block(self, name: str) -> tuple[Any, ...]:
    """``("cross_attention_dim",)``: the text width, as the UNet config answers it."""
    if name != "cross_attention_dim":
      raise ValueError(f"a text DiT config has no per-block {name!r}")
    return (self.joint_attention_dim,)

  @property
  def time_cond_proj_dim(self) -> None:
    return None  # no guidance-scale embedding

  @property
  def class_embed_type(self) -> None:
    return None  # the pooled text enters through the time-text embedding, not a class embedding

  @classmethod
  def tiny(cls, **overrides) -> TextDiTConfig:
    """Two blocks of width 32 on 8x8x4 latents and 24-wide text: for tests."""
    base = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                num_attention_heads=4, joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=24,
                pos_embed_max_size=4, qk_norm="rms_norm")
    return cls(**{**base, **overrides})


def text_dit_config(section: Mapping[str, Any], *, latent_channels: int, latent_size: int,
                    text_dim: int) -> TextDiTConfig:
  """The TextDiTConfig of a ``train.ldm`` ``dit`` config section (any SD3Config field; the latent
  channels, text widths, sample size and position table follow from the bundle unless given).

  Raises:
    ValueError: an unknown field, or a text width other than ``text_dim``.
  """
  fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in section.items()}
  if fields.get("qk_norm", None) == "":
    fields["qk_norm"] = None  # "" in configs (ml_collections cannot override a None)
  width = int(fields.get("num_attention_heads", 0)) * int(fields.get("attention_head_dim", 0))
  p = int(fields.setdefault("patch_size", 2))
  fields.setdefault("in_channels", latent_channels)
  fields.setdefault("out_channels", latent_channels)
  fields.setdefault("sample_size", latent_size)
  fields.setdefault("pos_embed_max_size", max(1, latent_size // p))
  fields.setdefault("caption_projection_dim", width)
  for name in ("joint_attention_dim", "pooled_projection_dim"):
    dim = int(fields.setdefault(name, text_dim))
    if dim != text_dim:
      raise ValueError(f"dit.{name}={dim} must equal text.hidden_size={text_dim}")
  try:
    return TextDiTConfig(**fields)
  except TypeError as e:
    raise ValueError(f"dit config: {e}") from None


class TextDiT(MMDiT):
  """:class:`~jdiff.models.mmdit.MMDiT` called as ``(x, t, encoder_hidden_states)``: the pooled
  projection is :func:`jdiff.ldm.pooled_text` of the text tokens unless ``pooled_projections`` is given."""

  config: TextDiTConfig

  def __call__(self, x: jax.Array, t: jax.Array, encoder_hidden_states: jax.Array,
               pooled_projections: jax.Array | None = None, **kwargs) -> jax.Array:
    if pooled_projections is None:
      if encoder_hidden_states.ndim != 3:
        raise ValueError(f"encoder_hidden_states must be [B, L, D], got {encoder_hidden_states.shape}")
      pooled_projections = encoder_hidden_states[:, -1].astype(jnp.float32)  # [B, D], as jdiff.ldm.pooled_text
    return super().__call__(x, t, encoder_hidden_states, pooled_projections, **kwargs)
