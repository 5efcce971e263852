"""Stable Diffusion XL's conditioning as pure functions: the text conditioning of both encoders and the
micro-conditioning time ids that the "text_time" UNet embeds.

The UNet (``UNetConfig.sdxl_base()`` / ``sdxl_refiner()``) is called as
``unet.apply(params, x, t, prompt_embeds, text_embeds=pooled, time_ids=ids)``; the parts of a diffusers
folder load with :func:`jdiff.convert.sdxl.load_sdxl_parts`.

Example:
  >>> embeds, pooled = sdxl_text_conditioning(parts.encoders, [tok(prompts) for tok in parts.tokenizers])
  ... # doctest: +SKIP
  >>> ids = time_ids((1024, 1024), (0, 0), (1024, 1024), batch_size=len(prompts))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from jdiff.models.text import sdxl_text_conditioning

__all__ = ["sdxl_text_conditioning", "time_ids"]


def time_ids(original_size: Sequence[float], crops_coords_top_left: Sequence[float] = (0, 0),
             target_size: Sequence[float] | None = None, *, aesthetic_score: float | None = None,
             batch_size: int = 1) -> jax.Array:
  """SDXL's micro-conditioning as diffusers' pipelines build it, one row per batch element.

  The base model's six ids are ``original_size + crops_coords_top_left + target_size`` (each (height,
  width) / (top, left) in pixels); the refiner (``requires_aesthetics_score``) takes five:
  ``original_size + crops_coords_top_left + (aesthetic_score,)``.

  Args:
    original_size: (height, width) of the training image the output should look like.
    crops_coords_top_left: (top, left) of the crop.
    target_size: (height, width) of the output (base model); defaults to ``original_size``.
    aesthetic_score: the refiner's score (diffusers' defaults: 6.0, and 2.5 for the negative side); when
      given, it replaces ``target_size``.
    batch_size: rows of the result.

  Returns:
    float32 ``[batch_size, 6]`` (or ``[batch_size, 5]`` with ``aesthetic_score``).

  Raises:
    ValueError: a size or corner that is not a pair, or ``batch_size`` < 1.

  Example:
    >>> time_ids((1024, 1024), (0, 0), (1024, 1024)).tolist()
    [[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]
    >>> time_ids((1024, 768), aesthetic_score=6.0, batch_size=2).shape
    (2, 5)
  """
  target = original_size if target_size is None else target_size
  for name, value in (("original_size", original_size), ("crops_coords_top_left", crops_coords_top_left),
                      ("target_size", target)):
    if len(tuple(value)) != 2:
      raise ValueError(f"{name} must be a pair, got {value!r}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  tail = (aesthetic_score,) if aesthetic_score is not None else tuple(target)
  row = jnp.asarray(tuple(original_size) + tuple(crops_coords_top_left) + tail, jnp.float32)  # [N]
  return jnp.broadcast_to(row.reshape(1, -1), (batch_size, row.shape[0]))
