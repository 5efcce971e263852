"""The rectified-flow process: the linear path, its conversions, timestep densities, shifts and loss.

Everything here is a pure function of arrays, floats and PRNG keys, in the style of
:mod:`jdiff.diffusion`. Arrays are NHWC (any trailing shape works); the noise level ``t`` is a float
array of shape [B] in [0, 1] (diffusers calls it sigma).

The path (Liu et al., 2022; Esser et al., 2024) interpolates linearly between data and noise::

  x_t = (1 - t) x0 + t eps,        v = dx_t / dt = eps - x0,

so alpha_t = 1 - t and sigma_t = t in the notation of :mod:`jdiff.diffusion`. A flow network predicts
the velocity v; :func:`to_x0` and :func:`to_epsilon` turn it into the other parameterisations and
:func:`velocity_from_x0` / :func:`velocity_from_epsilon` go back. The model is told the timestep
``t * num_train_timesteps`` (diffusers' convention: ``scheduler.timesteps`` are sigma * 1000).

Timestep densities and loss weightings are those of SD3 (diffusers' ``compute_density_for_timestep_sampling``
and ``compute_loss_weighting_for_sd3``); :func:`shift_time` is SD3's shift t' = s t / (1 + (s - 1) t) and
:func:`time_shift` the resolution-dependent shift with mu from :func:`dynamic_shift_mu` (Flux, SD3).
The shift maps are written with plain arithmetic so that they run on numpy arrays (the samplers'
grids, in diffusers' float64) and on jax arrays (training) alike.

Example:
  >>> l = flow.loss(lambda x, t: dit.apply(p, x, t, y), latents, key=key, density="logit_normal", shift=3.0)
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdiff.diffusion import broadcast_to

__all__ = [
    "DENSITIES",
    "WEIGHTINGS",
    "TIME_SHIFTS",
    "interpolate",
    "velocity",
    "to_x0",
    "to_epsilon",
    "velocity_from_x0",
    "velocity_from_epsilon",
    "sample_t",
    "loss_weight",
    "shift_time",
    "time_shift",
    "dynamic_shift_mu",
    "stretch_to_terminal",
    "loss",
]

DENSITIES = ("uniform", "logit_normal", "mode")
WEIGHTINGS = (None, "sigma_sqrt", "cosmap")
TIME_SHIFTS = ("exponential", "linear")
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check_t(t: jax.Array, x: jax.Array) -> jax.Array:
  t = jnp.asarray(t)
  if t.ndim != 1 or t.shape[0] != x.shape[0]:
    raise ValueError(f"t must have shape [batch]={x.shape[:1]}, got {t.shape}")
  return t


# ----------------------------------------------------------------------------- the path


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = (1 - t) x0 + t eps for noise levels t [B] in [0, 1]; same shape and dtype as x0."""
  t = _check_t(t, x0)
  if noise.shape != x0.shape:
    raise ValueError(f"noise shape {noise.shape} != x0 shape {x0.shape}")
  tb = broadcast_to(t, x0)
  return ((1.0 - tb) * x0 + tb * noise).astype(x0.dtype)


def velocity(x0: jax.Array, noise: jax.Array) -> jax.Array:
  """The regression target of a flow network: v = eps - x0 (the path's time derivative)."""
  return noise - x0


def to_x0(v: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
  """The x0 implied by a velocity v at x_t: x0 = x_t - t v."""
  return x_t - broadcast_to(_check_t(t, x_t), x_t) * v


def to_epsilon(v: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
  """The noise implied by a velocity v at x_t: eps = x_t + (1 - t) v."""
  return x_t + (1.0 - broadcast_to(_check_t(t, x_t), x_t)) * v


def velocity_from_x0(x0: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
  """The velocity implied by an x0 prediction: v = (x_t - x0) / t (t > 0)."""
  return (x_t - x0) / broadcast_to(_check_t(t, x_t), x_t)


def velocity_from_epsilon(eps: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
  """The velocity implied by a noise prediction: v = (eps - x_t) / (1 - t) (t < 1)."""
  return (eps - x_t) / (1.0 - broadcast_to(_check_t(t, x_t), x_t))


# ----------------------------------------------------------------------------- timesteps


def sample_t(key: jax.Array, shape, *, density: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
             mode_scale: float = 1.29) -> jax.Array:
  """Draws training noise levels t in (0, 1] (float32) from one of SD3's densities.

  * ``"uniform"``: t ~ U(0, 1] (drawn as 1 - U[0, 1), so that t = 0 and its infinite
    ``sigma_sqrt`` weight never occur).
  * ``"logit_normal"``: t = sigmoid(n), n ~ N(logit_mean, logit_std^2).
  * ``"mode"``: t = 1 - u - mode_scale (cos^2(pi u / 2) - 1 + u), u ~ U[0, 1) (mode sampling with
    heavy tails; ``mode_scale`` in [-1, 2 / (pi - 2)] keeps the map monotone).

  diffusers' training scripts then round t down to one of the scheduler's 1000 levels; here t stays
  continuous.

  Args:
    key: PRNG key.
    shape: shape of the draw (e.g. ``(batch,)``).
    density: "uniform", "logit_normal" or "mode".
    logit_mean, logit_std: the logit-normal's parameters (SD3: 0 and 1).
    mode_scale: the mode density's scale (SD3: 1.29).

  Returns:
    t of the given shape, float32.
  """
  if density == "uniform":
    return 1.0 - jax.random.uniform(key, shape, jnp.float32)
  if density == "logit_normal":
    return jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, shape, jnp.float32))
  if density == "mode":
    u = jax.random.uniform(key, shape, jnp.float32)
    return 1.0 - u - mode_scale * (jnp.square(jnp.cos(0.5 * math.pi * u)) - 1.0 + u)
  raise ValueError(f"unknown timestep density {density!r}; expected one of {DENSITIES}")


def loss_weight(t: jax.Array, weighting: str | None = None) -> jax.Array:
  """SD3's per-example loss weights at noise levels t: None -> 1, ``"sigma_sqrt"`` -> t^-2,
  ``"cosmap"`` -> 2 / (pi (1 - 2 t + 2 t^2))."""
  t = jnp.asarray(t, jnp.float32)
  if weighting is None:
    return jnp.ones_like(t)
  if weighting == "sigma_sqrt":
    return 1.0 / jnp.square(t)
  if weighting == "cosmap":
    return 2.0 / (math.pi * (1.0 - 2.0 * t + 2.0 * jnp.square(t)))
  raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {WEIGHTINGS}")


def shift_time(t, shift: float):
  """SD3's timestep shift t' = s t / (1 + (s - 1) t): s > 1 moves every level towards noise
  (numpy or jax arrays; :func:`time_shift` with mu = log s is the same map)."""
  return shift * t / (1 + (shift - 1) * t)


def time_shift(t, mu, *, kind: str = "exponential", sigma: float = 1.0):
  """The resolution-dependent shift of diffusers' flow schedulers (numpy or jax arrays).

  ``"exponential"``: e^mu / (e^mu + (1 / t - 1)^sigma); ``"linear"``: mu / (mu + (1 / t - 1)^sigma).
  With sigma = 1 the exponential map is :func:`shift_time` with s = e^mu.
  """
  if kind not in TIME_SHIFTS:
    raise ValueError(f"unknown time_shift_type {kind!r}; expected one of {TIME_SHIFTS}")
  if kind == "exponential":
    mu = math.exp(mu) if isinstance(mu, (int, float, np.floating)) else jnp.exp(mu)
  return mu / (mu + (1 / t - 1) ** sigma)


def dynamic_shift_mu(image_seq_len, *, base_seq_len: int = 256, max_seq_len: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15):
  """mu of the dynamic shift: linear in the image's token count, ``base_shift`` at ``base_seq_len``
  tokens and ``max_shift`` at ``max_seq_len`` (diffusers' ``calculate_shift`` in the SD3/Flux pipelines).

  Example:
    >>> mu = dynamic_shift_mu((1024 // 16) ** 2)  # a 1024px image, 8x VAE, patch 2: 4096 tokens -> 1.15
  """
  m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
  b = base_shift - m * base_seq_len
  return image_seq_len * m + b


def stretch_to_terminal(t, shift_terminal: float):
  """Rescales 1 - t of a descending schedule so that its last level is ``shift_terminal``
  (diffusers' ``stretch_shift_to_terminal``, from LTX-Video)."""
  one_minus = 1 - t
  scale = one_minus[-1] / (1 - shift_terminal)
  return 1 - (one_minus / scale)


# ----------------------------------------------------------------------------- loss


def loss(model_fn: ModelFn, x0: jax.Array, *, key: jax.Array, density: str = "uniform", logit_mean: float = 0.0,
         logit_std: float = 1.0, mode_scale: float = 1.29, weighting: str | None = None, shift: float = 1.0,
         num_train_timesteps: int = 1000, t: jax.Array | None = None, noise: jax.Array | None = None,
         reduce: bool = True) -> jax.Array:
  """The rectified-flow training loss: E_t w(t) |model(x_t, t T) - (eps - x0)|^2.

  Draws t from ``density`` (:func:`sample_t`) and shifts it (:func:`shift_time`), draws eps ~ N(0, I)
  (unless given), forms x_t with :func:`interpolate` and regresses ``model_fn(x_t, t *
  num_train_timesteps)`` on the velocity eps - x0, each example's mean squared error weighted by
  :func:`loss_weight`. The noise levels come from ``jax.random.split(key)[0]`` and the noise from
  ``jax.random.split(key)[1]``.

  Args:
    model_fn: ``(x_t [B, ...], timestep [B] float32) -> velocity [B, ...]``.
    x0: clean data [B, ...].
    key: PRNG key for t and the noise.
    density, logit_mean, logit_std, mode_scale: the timestep density (:func:`sample_t`).
    weighting: None, "sigma_sqrt" or "cosmap" (:func:`loss_weight`, at the shifted t).
    shift: SD3's timestep shift s applied to the drawn t (1: none).
    num_train_timesteps: the model is told ``t * num_train_timesteps``.
    t: optional fixed noise levels [B] in [0, 1] (used as given: no shift).
    noise: optional fixed noise, shape of x0.
    reduce: mean over the batch (True) or per-example losses [B] (False).

  Returns:
    A scalar loss (or [B]).

  Example:
    >>> l = flow.loss(model_fn, latents, key=key, density="logit_normal", weighting="cosmap")
  """
  if shift <= 0:
    raise ValueError(f"shift must be > 0, got {shift}")
  if weighting not in WEIGHTINGS:
    raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {WEIGHTINGS}")
  k_t, k_n = jax.random.split(key)
  b = x0.shape[0]
  if t is None:
    t = shift_time(sample_t(k_t, (b,), density=density, logit_mean=logit_mean, logit_std=logit_std,
                            mode_scale=mode_scale), shift)
  t = _check_t(t, x0).astype(jnp.float32)
  if noise is None:
    noise = jax.random.normal(k_n, x0.shape, jnp.float32).astype(x0.dtype)
  x_t = interpolate(x0, noise, t)
  out = model_fn(x_t, t * num_train_timesteps)
  if out.shape != x0.shape:
    raise ValueError(f"model output shape {out.shape} != input shape {x0.shape}")
  tgt = velocity(x0.astype(jnp.float32), noise.astype(jnp.float32))
  err = jnp.mean(jnp.square(out.astype(jnp.float32) - tgt), axis=tuple(range(1, x0.ndim)))
  per_ex = err * loss_weight(t, weighting)
  return jnp.mean(per_ex) if reduce else per_ex
