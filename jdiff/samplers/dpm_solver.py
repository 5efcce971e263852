"""DPM-Solver and DPM-Solver++ (Lu et al., 2022): exponential integrators of the probability-flow
ODE in the half log-SNR lambda = log(alpha_t / sigma_t).

Multistep (diffusers' ``DPMSolverMultistepScheduler``) reuses the model outputs of the previous one
or two steps for orders 2 and 3; ``singlestep=True`` (``DPMSolverSinglestepScheduler``) groups the
steps as 1, 2, 3, 1, 2, 3, ... where each group restarts from the sample at its first point.
``algorithm`` picks the parameterisation: "dpmsolver++" (data prediction, the default),
"dpmsolver" (noise prediction) or "sde-dpmsolver++" (the SDE variant, which draws fresh noise each
step). Grids, orders and final-step rules follow diffusers option for option.

jdiff extension: ``final_step="extrapolate"`` replaces the last first-order jump from the smallest
sigma to sigma = 0 by a second-order step in the variance-exploding noise level sigma (where the
jump has finite length, unlike in lambda), using the last two model outputs (data or noise
predictions: the noise-prediction solver, which cannot step to sigma = 0 in lambda, lands there
this way). With
``sigma_schedule="logsnr"`` (uniform steps in log-SNR) this is jdiff's accurate 10-step setting;
see ``bench/samplers.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion
from jdiff.samplers import base, levels
from jdiff.samplers.flow import solver_flow_grid
from jdiff.samplers.grids import grid
from jdiff.samplers.multistep import (extrapolated_final_step, extrapolated_last_step, finite_target, history_init,
                                      history_push)
from jdiff.samplers.orders import multistep_orders, singlestep_orders, step_orders
from jdiff.samplers.driver import Rule, Step, sample_is_first, solve
from jdiff.schedules import Schedule

__all__ = ["dpm_solver", "dpm_solver_rule", "ALGORITHMS", "SOLVER_TYPES", "FINAL_STEPS", "multistep_orders",
           "singlestep_orders", "extrapolated_final_step"]

ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")
FINAL_STEPS = ("default", "extrapolate")


def _coefficients(algorithm: str, h, alpha_t, sigma_t, alpha_s, sigma_s):
  """Coefficients of x_t = A x_s + c0 D0 + c1 D1 (midpoint c1m / heun c1h) + c2 D2 + cn z."""
  if algorithm == "dpmsolver":
    e = jnp.exp(h) - 1.0
    return dict(a=alpha_t / alpha_s, c0=-sigma_t * e, c1m=-0.5 * sigma_t * e,
                c1h=-sigma_t * (e / h - 1.0), c2=-sigma_t * ((e - h) / (h * h) - 0.5), cn=None)
  if algorithm == "dpmsolver++":
    e = jnp.exp(-h) - 1.0
    return dict(a=sigma_t / sigma_s, c0=-alpha_t * e, c1m=-0.5 * alpha_t * e,
                c1h=alpha_t * (e / h + 1.0), c2=-alpha_t * ((e + h) / (h * h) - 0.5), cn=None)
  # sde-dpmsolver++
  e = 1.0 - jnp.exp(-2.0 * h)
  return dict(a=sigma_t / sigma_s * jnp.exp(-h), c0=alpha_t * e, c1m=0.5 * alpha_t * e,
              c1h=alpha_t * (e / (-2.0 * h) + 1.0),
              c2=alpha_t * ((e - 2.0 * h) / ((2.0 * h) * (2.0 * h)) - 0.5),
              cn=sigma_t * jnp.sqrt(e))


def _lam(alpha, sigma):
  return levels.log_alpha_sigma_ratio(alpha, sigma)


def _combine(c, xs, d0, d1=None, c1=None, d2=None, noise=None):
  out = c["a"] * xs + c["c0"] * d0
  if d1 is not None:
    out = out + c1 * d1
  if d2 is not None:
    out = out + c["c2"] * d2
  if noise is not None:
    out = out + c["cn"] * noise
  return out


def _multistep_update(algorithm, solver_type, x, hist, lv, to, noise):
  """The order-1/2/3 multistep updates (lax.switch branches) from the latest level lv[.., 2]."""
  (lt, at, sgt), (l0, a0, sg0), l1, l2 = to, lv[2], lv[1][0], lv[0][0]
  h = lt - l0
  # a last step to sigma = 0 has h = inf: same value, but no (NaN) gradient through it
  h = jnp.where(sgt > 0, h, jax.lax.stop_gradient(h))
  c = _coefficients(algorithm, h, at, sgt, a0, sg0)
  m0, m1, m2 = hist[2], hist[1], hist[0]
  c1 = c["c1m"] if solver_type == "midpoint" else c["c1h"]

  def first(_):
    return _combine(c, x, m0, noise=noise)

  def second(_):
    r0 = (l0 - l1) / h
    return _combine(c, x, m0, (1.0 / r0) * (m0 - m1), c1, noise=noise)

  def third(_):
    r0, r1 = (l0 - l1) / h, (l1 - l2) / h
    d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
    return _combine(c, x, m0, d1, c["c1h"], d2, noise=noise)

  return first, second, third


def _singlestep_update(algorithm, solver_type, x, x_start, hist, lv, to, noise):
  """The order-1/2/3 singlestep updates: order k restarts from the group's first sample x_start."""
  (lt, at, sgt), (l0, a0, sg0), (l1, a1, sg1), (l2, a2, sg2) = to, lv[2], lv[1], lv[0]
  m0, m1, m2 = hist[2], hist[1], hist[0]

  def first(_):
    return _combine(_coefficients(algorithm, lt - l0, at, sgt, a0, sg0), x, m0, noise=noise)

  def second(_):
    h = lt - l1
    c = _coefficients(algorithm, h, at, sgt, a1, sg1)
    d1 = (1.0 / ((l0 - l1) / h)) * (m0 - m1)
    return _combine(c, x_start, m1, d1, c["c1m"] if solver_type == "midpoint" else c["c1h"], noise=noise)

  def third(_):
    h = lt - l2
    c = _coefficients(algorithm, h, at, sgt, a2, sg2)
    r0, r1 = (l0 - l2) / h, (l1 - l2) / h
    d1_0, d1_1 = (1.0 / r1) * (m1 - m2), (1.0 / r0) * (m0 - m2)
    if solver_type == "midpoint":
      return _combine(c, x_start, m2, d1_1, c["c1h"], noise=noise)
    d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
    d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
    return _combine(c, x_start, m2, d1, c["c1h"], d2, noise=noise)

  return first, second, third


def dpm_solver_rule(order: int = 2, *, algorithm: str = "dpmsolver++", solver_type: str = "midpoint",
                    singlestep: bool = False, lower_order_final: bool | None = None, euler_at_final: bool = False,
                    final_step: str = "default", prediction: str = "epsilon", postprocess=None) -> Rule:
  """DPM-Solver(++) steps in lambda = log(alpha / sigma), with the last three outputs as history.

  Args:
    order: 1, 2 or 3 (per-step orders: :func:`jdiff.samplers.orders.step_orders`).
    algorithm: "dpmsolver++" (data prediction), "dpmsolver" (noise prediction) or
      "sde-dpmsolver++" (draws fresh noise each step: needs a key).
    solver_type: "midpoint" or "heun" (the second-order formula).
    singlestep: diffusers' singlestep grouping (1, 2, 3, 1, 2, 3, ...).
    lower_order_final, euler_at_final: diffusers' final-step rules (None: True multistep, False
      singlestep).
    final_step: "default" or "extrapolate" (a second-order last step in sigma to sigma = 0,
      :func:`extrapolated_final_step`).
    prediction: what the model outputs.
    postprocess: ``x0 -> x0`` on the data estimates (thresholding), or None.

  Example:
    >>> x0 = solve(model_fn, grid(sched, 10, sigmas="karras"), x_T, dpm_solver_rule(order=3))
  """
  if algorithm not in ALGORITHMS:
    raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {ALGORITHMS}")
  if solver_type not in SOLVER_TYPES:
    raise ValueError(f"unknown solver_type {solver_type!r}; expected one of {SOLVER_TYPES}")
  if order not in (1, 2, 3):
    raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
  if final_step not in FINAL_STEPS:
    raise ValueError(f"unknown final_step {final_step!r}; expected one of {FINAL_STEPS}")
  prediction = diffusion.check_prediction(prediction)
  if lower_order_final is None:
    lower_order_final = not singlestep
  extrapolate, stochastic = final_step == "extrapolate", algorithm == "sde-dpmsolver++"
  if extrapolate and (stochastic or singlestep):
    raise ValueError("final_step='extrapolate' needs algorithm 'dpmsolver++' or 'dpmsolver', "
                     "final_sigmas_type='zero', singlestep=False and num_steps >= 2")
  data_pred = algorithm != "dpmsolver"

  def plan(g):
    if algorithm == "dpmsolver" and g.final == "zero" and not extrapolate:
      raise ValueError("algorithm='dpmsolver' cannot land on sigma = 0: pass final_sigmas_type='sigma_min' "
                       "or final_step='extrapolate'")
    if extrapolate and (g.final != "zero" or g.total < 2):
      raise ValueError("final_step='extrapolate' needs algorithm 'dpmsolver++' or 'dpmsolver', "
                       "final_sigmas_type='zero', singlestep=False and num_steps >= 2")
    return step_orders(g, order, kind="singlestep" if singlestep else "multistep",
                       lower_order_final=lower_order_final, euler_at_final=euler_at_final)

  def convert(out, x, alpha, sigma):
    if data_pred:
      return (postprocess or (lambda v: v))(base.to_x0(out, x, alpha, sigma, prediction))
    eps = base.to_epsilon(out, x, alpha, sigma, prediction)
    if postprocess is not None:
      x0 = postprocess(diffusion.to_x0(eps, x, alpha, sigma, "epsilon"))
      eps = diffusion.to_epsilon(x0, x, alpha, sigma, "sample")
    return eps

  def init(x, g):
    return x, x, history_init(x, g), x

  def step(model_fn, state, st: Step):
    x, x_start, hist, x_last = state
    out = base.call_model(model_fn, x, st.t)
    hist = history_push(hist, convert(out, x, st.alpha, st.sigma), st.alpha, st.sigma)
    ms, ah, sh = hist
    branch = st.plan - 1
    if singlestep:
      x_start = jnp.where(branch == 0, x, x_start)
    noise = base.step_noise(st.key, x.shape) if stochastic else None
    final = st.last if extrapolate else False
    at, sgt = finite_target(final, st) if extrapolate else (st.alpha_to, st.sigma_to)
    lv = [(_lam(ah[j], sh[j]), ah[j], sh[j]) for j in range(3)]
    to = (_lam(at, sgt), at, sgt)
    if singlestep:
      branches = _singlestep_update(algorithm, solver_type, x, x_start, ms, lv, to, noise)
    else:
      branches = _multistep_update(algorithm, solver_type, x, ms, lv, to, noise)
    x_next = jax.lax.switch(branch, branches, None)
    if extrapolate:
      x_next = jnp.where(final, extrapolated_last_step(final, x, x_last, hist, data_pred), x_next)
    return x_next, x_start, hist, x

  return Rule(init=init, step=step, sample=lambda state: state[0], plan=plan, needs_key=lambda g: stochastic,
              with_sample=sample_is_first)


@base.register("dpm_solver")
def dpm_solver(model_fn, schedule: Schedule, x_T: jax.Array, *, num_steps: int | None = None,
               key: jax.Array | None = None, prediction: str = "epsilon", order: int = 2,
               algorithm: str = "dpmsolver++", solver_type: str = "midpoint",
               lower_order_final: bool | None = None, euler_at_final: bool = False,
               final_sigmas_type: str = "zero", use_karras_sigmas: bool = False,
               use_exponential_sigmas: bool = False, sigma_schedule: str | None = None,
               timestep_spacing: str = "linspace", steps_offset: int = 0, thresholding: bool = False,
               dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
               singlestep: bool = False, final_step: str = "default",
               sigmas: jax.Array | np.ndarray | None = None, timesteps: jax.Array | np.ndarray | None = None,
               return_trajectory: bool = False, use_beta_sigmas: bool = False, use_flow_sigmas: bool = False,
               flow_shift: float = 1.0, use_dynamic_shifting: bool = False, mu: float | None = None):
  """Samples with DPM-Solver / DPM-Solver++ (multistep or singlestep).

  Args:
    model_fn: ``(x [B, ...], t [B] int32) -> output`` of type ``prediction``.
    schedule: the training noise schedule.
    x_T: starting noise [B, ...] (unit variance; the VP state at the first timestep).
    num_steps: number of model calls.
    key: PRNG key, needed for ``algorithm="sde-dpmsolver++"`` (step i draws
      ``samplers.step_noise(jax.random.split(key, num_steps)[i], x_T.shape)``).
    prediction: "epsilon", "v" or "sample".
    order: solver order 1, 2 or 3 (diffusers' ``solver_order``).
    algorithm: "dpmsolver++", "dpmsolver" or "sde-dpmsolver++" (``algorithm_type``).
    solver_type: "midpoint" or "heun" (second-order formula).
    lower_order_final: use lower orders on the last steps when num_steps < 15; None takes
      diffusers' default (True multistep, False singlestep).
    euler_at_final: first-order last step (multistep).
    final_sigmas_type: "zero" (land on sigma = 0; needs a "++" algorithm) or "sigma_min".
    use_karras_sigmas, use_exponential_sigmas: diffusers' sigma schedules (timesteps of Karras
      sigmas are rounded to integers, as diffusers does).
    sigma_schedule: the same choice by name: None, "karras", "exponential" or "logsnr"
      (uniform in log-SNR, jdiff).
    timestep_spacing, steps_offset: diffusers' spacing of the timesteps (the singlestep
      scheduler of diffusers only has "linspace").
    thresholding, dynamic_thresholding_ratio, sample_max_value: dynamic thresholding of x0.
    singlestep: use DPMSolverSinglestepScheduler's grouping.
    final_step: "default" (diffusers' last step) or "extrapolate" (jdiff: a second-order last
      step in sigma to sigma = 0; needs algorithm "dpmsolver++" or "dpmsolver",
      ``final_sigmas_type="zero"``, multistep and num_steps >= 2). With "dpmsolver" (noise
      prediction, which diffusers can only stop at sigma_min) this lands on sigma = 0 without the
      wasted zero-length step diffusers takes with Karras/exponential sigmas.
    sigmas: an explicit grid instead of the spacing and sigma schedule (diffusers' ``sigmas=``):
      n + 1 descending VE noise levels, the last 0 (``final_sigmas_type="zero"``) or positive
      ("sigma_min"); num_steps may then be None. Unless ``timesteps`` is given the model gets the
      fractional timesteps of these sigmas in float32. May be a traced array (one program for
      every grid; differentiable, see :mod:`jdiff.samplers.calibrate`).
    timesteps: optional model timesteps [n] that go with ``sigmas``.
    return_trajectory: also return the state after every step [num_steps, B, ...].
    use_beta_sigmas: diffusers' beta sigma schedule (``sigma_schedule="beta"``).
    use_flow_sigmas, flow_shift, use_dynamic_shifting, mu: diffusers' rectified-flow grid
      (:func:`jdiff.samplers.flow.flow_grid`, ``convention="multistep"``): alpha = 1 - sigma, the
      shift ``flow_shift`` (``exp(mu)`` when dynamic); use with ``prediction="flow_prediction"`` (a
      velocity model) and ``final_sigmas_type="zero"``. ``schedule`` may then be None (T = 1000).

  Image-to-image runs the same rule on a cut grid: ``samplers.solve(model_fn, samplers.cut(grid,
  strength=s), x, samplers.dpm_solver_rule(...))``.

  Returns:
    x_0 in float32 (and the trajectory when asked).

  Example:
    >>> x0 = jax.jit(lambda z: samplers.dpm_solver(model_fn, sched, z, num_steps=10))(z)
  """
  if final_sigmas_type not in ("zero", "sigma_min"):
    raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
  num_steps = levels.explicit_num_steps(sigmas, timesteps, num_steps, sigma_schedule, use_karras_sigmas,
                                        use_exponential_sigmas, use_beta_sigmas)
  post = None
  if thresholding:
    post = functools.partial(base.threshold_sample, ratio=dynamic_thresholding_ratio, max_value=sample_max_value)
  rule = dpm_solver_rule(order, algorithm=algorithm, solver_type=solver_type, singlestep=singlestep,
                         lower_order_final=lower_order_final, euler_at_final=euler_at_final, final_step=final_step,
                         prediction=prediction, postprocess=post)
  sigma_schedule = levels.pick_sigma_schedule(sigma_schedule, use_karras_sigmas, use_exponential_sigmas,
                                              use_beta_sigmas)
  if use_flow_sigmas:
    g = solver_flow_grid(schedule, num_steps, convention="multistep", flow_shift=flow_shift,
                         use_dynamic_shifting=use_dynamic_shifting, mu=mu, final_sigmas_type=final_sigmas_type,
                         sigma_schedule=sigma_schedule, sigmas=sigmas, timesteps=timesteps)
  else:
    g = grid(schedule, num_steps, spacing=timestep_spacing, steps_offset=steps_offset,
             sigmas=sigma_schedule if sigmas is None else sigmas, final=final_sigmas_type, timesteps=timesteps)
  orders = rule.plan(g)
  if sigma_schedule is not None and final_sigmas_type == "sigma_min" and orders[-1] > 1:
    raise ValueError(f"sigma_schedule={sigma_schedule!r} already ends at sigma_min, so "
                     "final_sigmas_type='sigma_min' adds a zero-length last step that a step of order "
                     f"{orders[-1]} divides by; use final_sigmas_type='zero' or lower_order_final")
  return solve(model_fn, g, x_T, rule, key=key, return_trajectory=return_trajectory)
