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

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion
from jdiff.samplers import base, levels
from jdiff.samplers.grids import Grid, grid
from jdiff.samplers.driver import PLAN_REQUEST, Plan, Rule, Step, solve
from jdiff.schedules import Schedule

__all__ = ["euler", "euler_ancestral", "heun", "euler_rule", "euler_ancestral_rule", "heun_rule"]


def _ve_to_x0(out: jax.Array, y: jax.Array, sigma: jax.Array, prediction: str) -> jax.Array:
  """x0 from a model output at VE state y and VE noise level sigma (via the VP conversion)."""
  alpha = 1.0 / jnp.sqrt(sigma * sigma + 1.0)
  return diffusion.to_x0(out, y * alpha, alpha, sigma * alpha, prediction)


def _ve_init(x: jax.Array, g: Grid):
  """The VE state (y = x / alpha, current alpha) of a sample at level 0."""
  return x / g.alpha[0], g.alpha[0]


def _ve_sample(state) -> jax.Array:
  return state[0] * state[-1]


def _ve_with_sample(state, x: jax.Array):
  return (x / state[-1],) + tuple(state[1:])


def euler_rule(*, prediction: str = "epsilon", s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
               s_noise: float = 1.0) -> Rule:
  """Euler's method on the probability-flow ODE in the VE variables y = x / alpha, sigma / alpha:
  y' = y + (y - x0_hat) / sigma (sigma' - sigma), with Karras et al.'s optional churn.

  Args:
    prediction: what the model outputs.
    s_churn, s_tmin, s_tmax, s_noise: churn: levels in [s_tmin, s_tmax] are first raised to
      sigma (1 + gamma), gamma = min(s_churn / n, sqrt(2) - 1), with fresh noise (needs a key).

  Example:
    >>> x0 = solve(model_fn, grid(sched, 30, sigmas="karras", convention="euler"), x_T, euler_rule())
  """
  prediction = diffusion.check_prediction(prediction)
  stochastic = s_churn > 0

  def plan(g):
    ve = g.ve_sigma[:-1]
    gamma_max = min(s_churn / g.total, 2 ** 0.5 - 1)
    return jnp.where((s_tmin <= ve) & (ve <= s_tmax), gamma_max, 0.0)

  def step(model_fn, state, st: Step):
    y, _ = state
    s, s_next, gamma = st.sigma / st.alpha, st.sigma_to / st.alpha_to, st.plan
    s_hat = s * (gamma + 1.0)
    # as in diffusers, the model sees the state before the churn noise is added
    out = base.call_model(model_fn, y / jnp.sqrt(s * s + 1.0), st.t)
    if stochastic:
      z = base.step_noise(st.key, y.shape) * s_noise
      y = y + jnp.where(gamma > 0, z * jnp.sqrt(s_hat * s_hat - s * s), 0.0)
    # diffusers converts epsilon at sigma_hat and v at sigma (equal unless churning)
    x0 = _ve_to_x0(out, y, s_hat if prediction == "epsilon" else s, prediction)
    return y + (y - x0) / s_hat * (s_next - s_hat), st.alpha_to

  return Rule(init=_ve_init, step=step, sample=_ve_sample, plan=plan, needs_key=lambda g: stochastic,
              with_sample=_ve_with_sample)


def euler_ancestral_rule(*, prediction: str = "epsilon") -> Rule:
  """Euler ancestral: a deterministic Euler step down to sigma_down plus fresh noise of scale sigma_up,
  sigma_down^2 + sigma_up^2 = sigma'^2 (VE variables; always needs a key).

  Example:
    >>> x0 = solve(model_fn, grid(sched, 30, convention="euler"), x_T, euler_ancestral_rule(), key=key)
  """
  prediction = diffusion.check_prediction(prediction)

  def step(model_fn, state, st: Step):
    y, _ = state
    s, s_next = st.sigma / st.alpha, st.sigma_to / st.alpha_to
    out = base.call_model(model_fn, y / jnp.sqrt(s * s + 1.0), st.t)
    x0 = _ve_to_x0(out, y, s, prediction)
    s_up = jnp.sqrt(s_next * s_next * (s * s - s_next * s_next) / (s * s))
    s_down = jnp.sqrt(s_next * s_next - s_up * s_up)
    return y + (y - x0) / s * (s_down - s) + base.step_noise(st.key, y.shape) * s_up, st.alpha_to

  return Rule(init=_ve_init, step=step, sample=_ve_sample, needs_key=lambda g: True, with_sample=_ve_with_sample)


def _heun_calls(steps: Step) -> Step:
  """Per-call inputs of Heun: call 2i is the predictor of step i, call 2i + 1 the corrector of step i
  (at step i's target level); a step landing on zero noise has no corrector (2 n - 1 calls)."""
  n = steps.t.shape[0]
  k = np.arange(2 * n - 1)
  corrector = k % 2 == 1
  idx = np.where(corrector, (k + 1) // 2 - 1, k // 2)
  calls = jax.tree.map(lambda a: a[idx], steps._replace(plan=None))
  return calls._replace(t=steps.t[(k + 1) // 2], plan=jnp.asarray(corrector))


def heun_rule(*, prediction: str = "epsilon", postprocess=None) -> Rule:
  """Heun's second-order method in the VE variables: an Euler predictor to the next level, then a
  trapezoidal corrector with the model evaluated there (2 n - 1 model calls for n steps).

  Example:
    >>> x0 = solve(model_fn, grid(sched, 15, sigmas="karras", convention="euler"), x_T, heun_rule())
  """
  prediction = diffusion.check_prediction(prediction)
  post = postprocess or (lambda x0: x0)

  def init(x, g):
    y, a = _ve_init(x, g)
    return y, y, jnp.zeros_like(y), a

  def step(model_fn, state, st: Step):
    y, y_saved, d_saved, _ = state
    corr = st.plan
    a, b = st.sigma / st.alpha, st.sigma_to / st.alpha_to  # the step's levels (VE)
    s_in = jnp.where(corr, b, a)  # the level the model is evaluated at
    out = base.call_model(model_fn, y / jnp.sqrt(s_in * s_in + 1.0), st.t)
    x0 = post(_ve_to_x0(out, y, s_in, prediction))
    d = (y - x0) / s_in
    y_pred = y + d * (b - a)
    y_corr = y_saved + (d_saved + d) / 2 * (b - a)
    y_next = jnp.where(corr, y_corr, y_pred)
    return y_next, jnp.where(corr, y_saved, y), jnp.where(corr, d_saved, d), st.alpha_to

  return Rule(init=init, step=step, sample=_ve_sample, calls=_heun_calls)


def _init_scale(sig: jax.Array, spacing: str) -> jax.Array:
  """diffusers' ``init_noise_sigma``: max sigma (linspace, trailing) or sqrt(max^2 + 1) (leading)."""
  top = jnp.max(sig)
  return top if spacing in ("linspace", "trailing") else jnp.sqrt(top * top + 1.0)


def _facade(rule: Rule, g: Grid, spacing: str) -> Rule:
  """diffusers' conventions on top of a VE rule: the state starts at ``x_T * init_noise_sigma`` and
  the VE state y itself is returned (x_0 when the grid ends at zero noise)."""
  scale = _init_scale(g.ve_sigma, spacing)

  def init(x, g):
    return (x * scale,) + tuple(rule.init(x, g)[1:])

  return rule._replace(init=init, sample=lambda state: state[0])


def _euler_grid(schedule, num_steps, spacing, steps_offset, sigma_schedule, final="zero", sigma_min=None,
                sigma_max=None) -> Grid:
  rng = None if sigma_min is None and sigma_max is None else (sigma_min, sigma_max)
  return grid(schedule, num_steps, spacing=spacing, steps_offset=steps_offset, sigmas=sigma_schedule, final=final,
              convention="euler", sigma_range=rng)


@base.register("euler")
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
      :mod:`jdiff.samplers.levels`); ``sigma_min``/``sigma_max`` override its range.
    final_sigmas_type: "zero" or "sigma_min".
    s_churn, s_tmin, s_tmax, s_noise: Karras et al.'s stochastic churn (diffusers' step args).
    return_trajectory: also return the VE state after every step [num_steps, B, ...].

  Returns:
    The final state (x_0 for ``final_sigmas_type="zero"``) in float32, and the trajectory.

  Example:
    >>> x0 = samplers.euler(model_fn, sched, z, num_steps=30)
  """
  sigma_schedule = levels.pick_sigma_schedule(sigma_schedule, use_karras_sigmas, use_exponential_sigmas)
  g = _euler_grid(schedule, num_steps, timestep_spacing, steps_offset, sigma_schedule, final_sigmas_type,
                  sigma_min, sigma_max)
  rule = euler_rule(prediction=prediction, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
  if model_fn is PLAN_REQUEST:  # samplers.plan: the rule without the facade's x_T scaling
    return Plan(g, rule, _init_scale(g.ve_sigma, timestep_spacing) * g.alpha[0])
  return solve(model_fn, g, x_T, _facade(rule, g, timestep_spacing), key=key, return_trajectory=return_trajectory)


@base.register("euler_ancestral")
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
    key: PRNG key (required); step i draws ``samplers.step_noise(split(key, num_steps)[i], shape)``.
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
  sigma_schedule = levels.pick_sigma_schedule(sigma_schedule, use_karras_sigmas, use_exponential_sigmas)
  g = _euler_grid(schedule, num_steps, timestep_spacing, steps_offset, sigma_schedule)
  rule = euler_ancestral_rule(prediction=prediction)
  if model_fn is PLAN_REQUEST:
    return Plan(g, rule, _init_scale(g.ve_sigma, timestep_spacing) * g.alpha[0])
  return solve(model_fn, g, x_T, _facade(rule, g, timestep_spacing), key=key, return_trajectory=return_trajectory)


@base.register("heun")
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
  sigma_schedule = levels.pick_sigma_schedule(sigma_schedule, use_karras_sigmas, use_exponential_sigmas)
  g = _euler_grid(schedule, num_steps, timestep_spacing, steps_offset, sigma_schedule)
  post = functools.partial(base.process_x0, clip_sample=clip_sample, clip_sample_range=clip_sample_range)
  rule = heun_rule(prediction=prediction, postprocess=post)
  if model_fn is PLAN_REQUEST:
    return Plan(g, rule, _init_scale(g.ve_sigma, timestep_spacing) * g.alpha[0])
  return solve(model_fn, g, x_T, _facade(rule, g, timestep_spacing), return_trajectory=return_trajectory)
