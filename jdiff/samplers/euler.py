"""Karras-style samplers in the variance-exploding variable: Euler, Euler ancestral and Heun.

These follow diffusers' ``EulerDiscreteScheduler``, ``EulerAncestralDiscreteScheduler`` and
``HeunDiscreteScheduler``: the state is the VE sample y = x / alpha (started at
``x_T * init_noise_sigma``), the model sees y / sqrt(sigma^2 + 1) and a float32 timestep (the
spaced timesteps, or the fractional timesteps of Karras/exponential sigmas), and each step moves
y along dy/dsigma = (y - x0_hat) / sigma. The last step lands on sigma = 0, so the result is the
data sample.

Example:
  >>> x0 = jax.jit(lambda z: samplers.euler(model_fn, sched, z, num_steps=30, use_karras_sigmas=True))(z)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion
from jdiff.samplers import _common, _sigmas
from jdiff.samplers.dpm_solver import _pick_sigma_schedule
from jdiff.schedules import Schedule

__all__ = ["euler", "euler_ancestral", "heun"]


def _ve_to_x0(out: jax.Array, y: jax.Array, sigma: jax.Array, prediction: str) -> jax.Array:
  """x0 from a model output at VE state y and VE noise level sigma (via the VP conversion)."""
  alpha = 1.0 / jnp.sqrt(sigma * sigma + 1.0)
  return diffusion.to_x0(out, y * alpha, alpha, sigma * alpha, prediction)


def _init_scale(sig: jax.Array, spacing: str) -> jax.Array:
  """diffusers' ``init_noise_sigma``: max sigma (linspace, trailing) or sqrt(max^2 + 1) (leading)."""
  top = jnp.max(sig)
  return top if spacing in ("linspace", "trailing") else jnp.sqrt(top * top + 1.0)


def _grid(schedule, num_steps, spacing, steps_offset, sigma_schedule, final_sigmas_type="zero",
          sigma_min=None, sigma_max=None):
  ts, sig = _sigmas.euler_grid(schedule.alphas_cumprod, num_steps, spacing=spacing, steps_offset=steps_offset,
                               sigma_schedule=sigma_schedule, final_sigmas_type=final_sigmas_type,
                               sigma_min=sigma_min, sigma_max=sigma_max)
  return jnp.asarray(ts, jnp.float32), jnp.asarray(sig, jnp.float32)


@_common.register("euler")
def euler(model_fn, schedule: Schedule, x_T: jax.Array, *, num_steps: int, key: jax.Array | None = None,
          prediction: str = "epsilon", timestep_spacing: str = "linspace", steps_offset: int = 0,
          use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
          sigma_schedule: str | None = None, sigma_min: float | None = None, sigma_max: float | None = None,
          final_sigmas_type: str = "zero", s_churn: float = 0.0, s_tmin: float = 0.0,
          s_tmax: float = math.inf, s_noise: float = 1.0, return_trajectory: bool = False):
  """Samples with Euler's method on the probability-flow ODE (diffusers' EulerDiscreteScheduler).

  Args:
    model_fn: ``(x [B, ...], t [B] float32) -> output`` of type ``prediction``.
    schedule: the training noise schedule.
    x_T: unit-variance starting noise [B, ...] (scaled by ``init_noise_sigma`` here).
    num_steps: number of model calls.
    key: PRNG key, needed when ``s_churn > 0`` (step i uses ``split(key, num_steps)[i]``).
    prediction: "epsilon", "v" or "sample".
    timestep_spacing, steps_offset: diffusers' timestep spacing.
    use_karras_sigmas, use_exponential_sigmas, sigma_schedule: sigma schedule (see
      :mod:`jdiff.samplers._sigmas`); ``sigma_min``/``sigma_max`` override its range.
    final_sigmas_type: "zero" or "sigma_min".
    s_churn, s_tmin, s_tmax, s_noise: Karras et al.'s stochastic churn (diffusers' step args).
    return_trajectory: also return the VE state after every step [num_steps, B, ...].

  Returns:
    The final state (x_0 for ``final_sigmas_type="zero"``) in float32, and the trajectory.

  Example:
    >>> x0 = samplers.euler(model_fn, sched, z, num_steps=30)
  """
  sigma_schedule = _pick_sigma_schedule(sigma_schedule, use_karras_sigmas, use_exponential_sigmas)
  ts, sig = _grid(schedule, num_steps, timestep_spacing, steps_offset, sigma_schedule, final_sigmas_type,
                  sigma_min, sigma_max)
  stochastic = s_churn > 0
  x, prediction, keys = _common.prepare(x_T, prediction, key, num_steps, stochastic)
  y = x * _init_scale(sig, timestep_spacing)
  n = int(num_steps)
  gamma_max = min(s_churn / n, 2 ** 0.5 - 1)
  gammas = jnp.where((s_tmin <= sig[:-1]) & (sig[:-1] <= s_tmax), gamma_max, 0.0)

  def step(y, inputs):
    t, s, s_next, gamma, k = inputs
    s_hat = s * (gamma + 1.0)
    # as in diffusers, the model sees the state before the churn noise is added
    out = _common.call_model(model_fn, y / jnp.sqrt(s * s + 1.0), t, jnp.float32)
    if stochastic:
      z = _common.step_noise(k, y.shape) * s_noise
      y = y + jnp.where(gamma > 0, z * jnp.sqrt(s_hat * s_hat - s * s), 0.0)
    # diffusers converts epsilon at sigma_hat and v at sigma (equal unless churning)
    x0 = _ve_to_x0(out, y, s_hat if prediction == "epsilon" else s, prediction)
    y_next = y + (y - x0) / s_hat * (s_next - s_hat)
    return y_next, (y_next if return_trajectory else None)

  y, traj = jax.lax.scan(step, y, (ts, sig[:-1], sig[1:], gammas, keys))
  return (y, traj) if return_trajectory else y


@_common.register("euler_ancestral")
def euler_ancestral(model_fn, schedule: Schedule, x_T: jax.Array, *, num_steps: int,
                    key: jax.Array | None = None, prediction: str = "epsilon",
                    timestep_spacing: str = "linspace", steps_offset: int = 0,
                    use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                    sigma_schedule: str | None = None, return_trajectory: bool = False):
  """Samples with Euler ancestral (diffusers' EulerAncestralDiscreteScheduler).

  Each step goes deterministically down to sigma_down and adds fresh noise of scale sigma_up,
  with sigma_down^2 + sigma_up^2 = sigma_next^2.

  Args:
    model_fn: ``(x [B, ...], t [B] float32) -> output``.
    schedule: the training noise schedule.
    x_T: unit-variance starting noise [B, ...].
    num_steps: number of model calls.
    key: PRNG key (required); step i draws ``_common.step_noise(split(key, num_steps)[i], shape)``.
    prediction: "epsilon", "v" or "sample" (diffusers lacks "sample" here).
    timestep_spacing, steps_offset: diffusers' spacing.
    use_karras_sigmas, use_exponential_sigmas, sigma_schedule: sigma schedules (a jdiff
      extension for this sampler: diffusers' ancestral scheduler has only the spaced sigmas).
    return_trajectory: also return the state after every step.

  Returns:
    x_0 in float32 (and the trajectory when asked).

  Example:
    >>> x0 = samplers.euler_ancestral(model_fn, sched, z, num_steps=30, key=jax.random.key(0))
  """
  sigma_schedule = _pick_sigma_schedule(sigma_schedule, use_karras_sigmas, use_exponential_sigmas)
  ts, sig = _grid(schedule, num_steps, timestep_spacing, steps_offset, sigma_schedule)
  x, prediction, keys = _common.prepare(x_T, prediction, key, num_steps, True)
  y = x * _init_scale(sig, timestep_spacing)

  def step(y, inputs):
    t, s, s_next, k = inputs
    out = _common.call_model(model_fn, y / jnp.sqrt(s * s + 1.0), t, jnp.float32)
    x0 = _ve_to_x0(out, y, s, prediction)
    s_up = jnp.sqrt(s_next * s_next * (s * s - s_next * s_next) / (s * s))
    s_down = jnp.sqrt(s_next * s_next - s_up * s_up)
    y_next = y + (y - x0) / s * (s_down - s) + _common.step_noise(k, y.shape) * s_up
    return y_next, (y_next if return_trajectory else None)

  y, traj = jax.lax.scan(step, y, (ts, sig[:-1], sig[1:], keys))
  return (y, traj) if return_trajectory else y


@_common.register("heun")
def heun(model_fn, schedule: Schedule, x_T: jax.Array, *, num_steps: int, key: jax.Array | None = None,
         prediction: str = "epsilon", timestep_spacing: str = "linspace", steps_offset: int = 0,
         use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
         sigma_schedule: str | None = None, clip_sample: bool = False, clip_sample_range: float = 1.0,
         return_trajectory: bool = False):
  """Samples with Heun's second-order method (diffusers' HeunDiscreteScheduler).

  ``num_steps`` sigma intervals cost 2 * num_steps - 1 model calls: every interval but the last
  (which ends at sigma = 0) is an Euler predictor plus a trapezoidal corrector.

  Args:
    model_fn: ``(x [B, ...], t [B] float32) -> output``.
    schedule: the training noise schedule.
    x_T: unit-variance starting noise [B, ...].
    num_steps: number of sigma intervals (diffusers' ``num_inference_steps``).
    key: unused (deterministic); accepted for a uniform signature.
    prediction, timestep_spacing, steps_offset, use_karras_sigmas, use_exponential_sigmas,
    sigma_schedule, clip_sample, clip_sample_range: as in diffusers' HeunDiscreteScheduler.
    return_trajectory: also return the state after every model call [2 n - 1, B, ...].

  Returns:
    x_0 in float32 (and the trajectory when asked).

  Example:
    >>> x0 = samplers.heun(model_fn, sched, z, num_steps=15, use_karras_sigmas=True)
  """
  del key
  sigma_schedule = _pick_sigma_schedule(sigma_schedule, use_karras_sigmas, use_exponential_sigmas)
  ts, sig = _grid(schedule, num_steps, timestep_spacing, steps_offset, sigma_schedule)
  n = int(num_steps)
  x, prediction, _ = _common.prepare(x_T, prediction, None, n, False)
  y = x * _init_scale(sig, timestep_spacing)
  # one scan iteration per model call: calls 0, 2, 4, ... are predictors (interval i = call // 2),
  # calls 1, 3, ... correctors of the interval before them.
  calls = 2 * n - 1
  k = np.arange(calls)
  interval = (k + 1) // 2
  corrector = jnp.asarray(k % 2 == 1)
  t_call = ts[np.where(k % 2 == 1, interval, interval)]
  s_in = sig[np.where(k % 2 == 1, interval, interval)]  # the sigma scale_model_input sees
  s_from = sig[np.where(k % 2 == 1, interval - 1, interval)]
  s_to = sig[np.where(k % 2 == 1, interval, interval + 1)]
  post = dict(clip_sample=clip_sample, clip_sample_range=clip_sample_range)

  def step(carry, inputs):
    y, y_saved, d_saved = carry
    t, s, a, b, corr = inputs
    out = _common.call_model(model_fn, y / jnp.sqrt(s * s + 1.0), t, jnp.float32)
    s_conv = jnp.where(corr, b, a)
    x0 = _common.process_x0(_ve_to_x0(out, y, s_conv, prediction), **post)
    d = (y - x0) / s_conv
    y_pred = y + d * (b - a)
    y_corr = y_saved + (d_saved + d) / 2 * (b - a)
    y_next = jnp.where(corr, y_corr, y_pred)
    carry = (y_next, jnp.where(corr, y_saved, y), jnp.where(corr, d_saved, d))
    return carry, (y_next if return_trajectory else None)

  (y, _, _), traj = jax.lax.scan(step, (y, y, jnp.zeros_like(y)), (t_call, s_in, s_from, s_to, corrector))
  return (y, traj) if return_trajectory else y
