"""Classifier-free guidance as a transformation of a model function.

``cfg(apply, cond, uncond, guidance_scale)`` turns a conditional network ``apply(x, t, c)`` into a plain
model function ``(x, t) -> output`` that evaluates the conditional and unconditional branches in
ONE call on a doubled batch and mixes them:

    out = out_uncond + guidance_scale * (out_cond - out_uncond)

optionally followed by guidance rescale (Lin et al., 2023, "Common Diffusion Noise Schedules and
Sample Steps are Flawed", eq. 15-16), which matches the per-example standard deviation of the
guided output to that of the conditional one and blends with weight ``guidance_rescale``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["cfg", "mix", "rescale_guidance"]


def rescale_guidance(guided: jax.Array, cond_out: jax.Array, phi: float) -> jax.Array:
  """Guidance rescale: blend ``guided * std(cond)/std(guided)`` with ``guided`` by weight ``phi``."""
  axes = tuple(range(1, guided.ndim))
  std_cond = jnp.std(cond_out, axis=axes, keepdims=True)
  std_guided = jnp.std(guided, axis=axes, keepdims=True)
  rescaled = guided * (std_cond / std_guided)
  return phi * rescaled + (1.0 - phi) * guided


def mix(cond_out: jax.Array, uncond_out: jax.Array, guidance_scale, guidance_rescale: float = 0.0) -> jax.Array:
  """uncond + guidance_scale * (cond - uncond), with optional guidance rescale; the scale may be [B]."""
  scale = jnp.asarray(guidance_scale, cond_out.dtype)
  if scale.ndim == 1:
    scale = scale.reshape((-1,) + (1,) * (cond_out.ndim - 1))
  guided = uncond_out + scale * (cond_out - uncond_out)
  if isinstance(guidance_rescale, (int, float)):
    return rescale_guidance(guided, cond_out, guidance_rescale) if guidance_rescale else guided
  # a traced weight: 0 selects the plain guided output exactly
  return jnp.where(guidance_rescale > 0, rescale_guidance(guided, cond_out, guidance_rescale), guided)


def _batch_of(tree: Any) -> int | None:
  leaves = jax.tree.leaves(tree)
  return leaves[0].shape[0] if leaves and jnp.ndim(leaves[0]) > 0 else None


def cfg(apply: Callable[[jax.Array, jax.Array, Any], jax.Array], cond: Any, uncond: Any, guidance_scale,
        *, guidance_rescale: float = 0.0, out_channels: int | None = None) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Wraps a conditional network into a guided model function evaluated on one doubled batch.

  Args:
    apply: ``apply(x [2B, ...], t [2B], c) -> output [2B, ...]``; ``c`` is a pytree whose leaves
      have a leading batch axis.
    cond: the conditioning pytree for the B examples (leaves [B, ...]).
    uncond: the null conditioning with the same structure; leaves with batch 1 (or no batch axis
      matching B) are broadcast to B.
    guidance_scale: guidance scale w (scalar or [B]); w = 1 gives the conditional model, w = 0 the
      unconditional one.
    guidance_rescale: guidance-rescale weight phi in [0, 1] (0 disables it).
    out_channels: if the network outputs extra channels (e.g. a learned variance), only the first
      ``out_channels`` are guided; the rest are taken from the conditional branch.

  Returns:
    ``model_fn(x [B, ...], t [B]) -> guided output [B, ...]``.

  Example:
    >>> model_fn = guidance.cfg(lambda x, t, c: unet.apply(p, x, t, c), text_emb, null_emb, 7.5)
    >>> x0 = samplers.sample("ddim", model_fn, sched, x_T, num_steps=50)
  """
  b = _batch_of(cond)
  if b is None:
    raise ValueError("cond must be a pytree of arrays with a leading batch axis")

  def fit(u, c):
    u = jnp.asarray(u, c.dtype)
    if u.ndim == c.ndim - 1:
      u = u[None]
    if u.ndim != c.ndim:
      raise ValueError(f"uncond leaf of shape {u.shape} does not match cond leaf {c.shape}")
    return jnp.broadcast_to(u, c.shape)

  uncond = jax.tree.map(fit, uncond, cond)
  both = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)

  def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
    if x.shape[0] != b:
      raise ValueError(f"x has batch {x.shape[0]} but the conditioning has batch {b}")
    t = jnp.broadcast_to(jnp.asarray(t), (b,))
    out = apply(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), both)
    out_c, out_u = jnp.split(out, 2, axis=0)
    if out_channels is not None and out_c.shape[-1] > out_channels:
      guided = mix(out_c[..., :out_channels], out_u[..., :out_channels], guidance_scale, guidance_rescale)
      return jnp.concatenate([guided, out_c[..., out_channels:]], axis=-1)
    return mix(out_c, out_u, guidance_scale, guidance_rescale)

  return model_fn
