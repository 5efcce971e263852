"""Shared pieces of the samplers: the registry, x0 clipping/thresholding, the model call and the
per-step noise.

Every sampler is a pure function ``(model_fn, schedule, x_T, *, num_steps, key, **options) -> x_0``
whose loop is one ``lax.scan``; the timestep grid depends only on static options (ints and
strings), so it is computed with numpy at trace time and baked into the program.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion
from jdiff.samplers.levels import spaced_timesteps

__all__ = [
    "register",
    "get",
    "available",
    "spaced_timesteps",
    "skip_steps",
    "threshold_sample",
    "process_x0",
    "call_model",
    "step_noise",
    "prepare",
    "to_x0",
    "to_epsilon",
    "to_flow",
]

_REGISTRY: dict[str, Callable[..., Any]] = {}


def register(name: str):
  """Decorator that registers a sampler function under ``name`` for :func:`jdiff.samplers.sample`."""

  def wrap(fn):
    if name in _REGISTRY:
      raise ValueError(f"sampler {name!r} registered twice")
    _REGISTRY[name] = fn
    return fn

  return wrap


def get(name: str) -> Callable[..., Any]:
  """The sampler function registered as ``name`` (a one-line ValueError listing the names otherwise)."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown sampler {name!r}; available: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def available() -> list[str]:
  """The registered sampler names, sorted."""
  return sorted(_REGISTRY)


def skip_steps(ts: np.ndarray, prev: np.ndarray, start_step: int) -> tuple[np.ndarray, np.ndarray]:
  """Drops the first ``start_step`` entries of a timestep grid (and its previous-timestep map)."""
  if not 0 <= int(start_step) < len(ts):
    raise ValueError(f"start_step must be in [0, {len(ts)}), got {start_step}")
  return ts[start_step:], prev[start_step:]


def threshold_sample(x0: jax.Array, ratio: float = 0.995, max_value: float = 1.0) -> jax.Array:
  """Dynamic thresholding (Saharia et al., 2022): per example, s = clip(quantile(|x0|, ratio), 1,
  max_value); x0 <- clip(x0, -s, s) / s. The quantile is over all of an example's elements."""
  b = x0.shape[0]
  flat = x0.reshape(b, -1).astype(jnp.float32)
  s = jnp.quantile(jnp.abs(flat), ratio, axis=1, keepdims=True)
  s = jnp.clip(s, 1.0, max_value)
  return (jnp.clip(flat, -s, s) / s).reshape(x0.shape).astype(x0.dtype)


def process_x0(x0: jax.Array, *, clip_sample: bool = False, clip_sample_range: float = 1.0,
               thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
               sample_max_value: float = 1.0) -> jax.Array:
  """Applies diffusers' x0 post-processing: dynamic thresholding if enabled, else clipping."""
  if thresholding:
    return threshold_sample(x0, dynamic_thresholding_ratio, sample_max_value)
  if clip_sample:
    return jnp.clip(x0, -clip_sample_range, clip_sample_range)
  return x0


def call_model(model_fn: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, t,
               t_dtype=None) -> jax.Array:
  """Calls ``model_fn(x, t [B])`` and returns its output in float32 (sampler state stays float32).

  ``t`` is broadcast over the batch in ``t_dtype`` (default: its own dtype, int32 for Python ints).
  """
  t = jnp.asarray(t)
  tb = jnp.broadcast_to(t.astype(t_dtype or t.dtype), (x.shape[0],))
  out = model_fn(x, tb)
  if out.shape[0] != x.shape[0] or out.shape[1:-1] != x.shape[1:-1]:
    raise ValueError(f"model output shape {out.shape} does not match sample shape {x.shape}")
  return out.astype(jnp.float32)


def step_noise(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """The standard-normal noise a stochastic sampler draws from one step's key."""
  return jax.random.normal(key, shape, dtype)


# A flow velocity v = eps - x0 at x_t = alpha x0 + sigma eps: x_t - sigma v = (alpha + sigma) x0 and
# x_t + alpha v = (alpha + sigma) eps (alpha + sigma = 1 on a flow grid).


def to_x0(out: jax.Array, x: jax.Array, alpha, sigma, prediction: str) -> jax.Array:
  """:func:`jdiff.diffusion.to_x0` that also takes ``prediction="flow"``."""
  if prediction == "flow":
    return (x - sigma * out) / (alpha + sigma)
  return diffusion.to_x0(out, x, alpha, sigma, prediction)


def to_epsilon(out: jax.Array, x: jax.Array, alpha, sigma, prediction: str) -> jax.Array:
  """:func:`jdiff.diffusion.to_epsilon` that also takes ``prediction="flow"``."""
  if prediction == "flow":
    return (x + alpha * out) / (alpha + sigma)
  return diffusion.to_epsilon(out, x, alpha, sigma, prediction)


def to_flow(out: jax.Array, x: jax.Array, alpha, sigma, prediction: str) -> jax.Array:
  """The flow velocity eps - x0 implied by a model output of any prediction type."""
  if prediction == "flow":
    return out
  return to_epsilon(out, x, alpha, sigma, prediction) - to_x0(out, x, alpha, sigma, prediction)


def prepare(x_T: jax.Array, prediction: str, key: jax.Array | None, num_steps: int,
            needs_key: bool) -> tuple[jax.Array, str, jax.Array]:
  """Validates common arguments; returns float32 x_T, the canonical prediction and per-step keys."""
  x_T = jnp.asarray(x_T)
  if x_T.ndim < 2:
    raise ValueError(f"x_T must have a batch axis and at least one data axis, got shape {x_T.shape}")
  prediction = diffusion.check_prediction(prediction)
  if needs_key:
    if key is None:
      raise ValueError("this sampler configuration is stochastic: pass key=jax.random.key(...)")
    keys = jax.random.split(key, num_steps)
  else:
    keys = jnp.zeros((num_steps,), jnp.uint32)  # never read: deterministic rules get no key, the scan still carries one entry per step
  return x_T.astype(jnp.float32), prediction, keys
