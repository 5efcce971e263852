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

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion
from jdiff.samplers import _common, _sigmas
from jdiff.schedules import Schedule

__all__ = ["dpm_solver", "ALGORITHMS", "SOLVER_TYPES", "FINAL_STEPS", "multistep_orders",
           "singlestep_orders", "extrapolated_final_step"]

ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")
FINAL_STEPS = ("default", "extrapolate")


def multistep_orders(num_steps: int, order: int, *, lower_order_final: bool, euler_at_final: bool,
                     final_sigmas_type: str) -> np.ndarray:
  """The order diffusers' multistep solver uses at each step (warm-up and final-step rules)."""
  n = int(num_steps)
  out = []
  for i in range(n):
    low_final = i == n - 1 and (euler_at_final or (lower_order_final and n < 15)
                                or final_sigmas_type == "zero")
    low_second = i == n - 2 and lower_order_final and n < 15
    if order == 1 or i < 1 or low_final:
      out.append(1)
    elif order == 2 or i < 2 or low_second:
      out.append(2)
    else:
      out.append(3)
  return np.asarray(out, np.int32)


def singlestep_orders(num_steps: int, order: int, *, lower_order_final: bool,
                      final_sigmas_type: str) -> np.ndarray:
  """The per-step orders of diffusers' singlestep solver (groups 1, 2, [3] restarting each group).

  As in diffusers, ``lower_order_final`` is forced on when ``num_steps`` is not a multiple of the
  order or when the last step lands on sigma = 0.
  """
  n = int(num_steps)
  lof = lower_order_final or n % order != 0 or final_sigmas_type == "zero"
  if lof:
    if order == 3:
      tail = {0: [1, 2] + [1], 1: [1], 2: [1, 2]}[n % 3]
      orders = [1, 2, 3] * (n // 3 - (1 if n % 3 == 0 else 0)) + tail
    elif order == 2:
      orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
    else:
      orders = [1] * n
  else:
    orders = ([1, 2, 3] * (n // 3)) if order == 3 else ([1, 2] * (n // 2) if order == 2 else [1] * n)
  if final_sigmas_type == "zero":
    orders[-1] = 1
  return np.asarray(orders[:n], np.int32)


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


def extrapolated_final_step(x_s: jax.Array, sigma_s: jax.Array, x0_s: jax.Array, x_p: jax.Array,
                            sigma_p: jax.Array, x0_p: jax.Array) -> jax.Array:
  """The last step to sigma = 0 as a second-order (Adams-Bashforth) step in the VE noise level.

  In VE coordinates y = x / alpha the probability-flow ODE reads dy/dsigma = eps(y, sigma) with
  eps = (y - x0_hat) / sigma. The jump from the smallest sigma_s to 0 is infinitely long in
  lambda, so DPM-Solver takes it at first order (y_0 = x0_hat(sigma_s)); in sigma it has finite
  length and eps is smooth (linear in sigma near 0 for smooth data), so integrating the secant
  of eps through the last two evaluations is second-order accurate:
  y_0 = y_s - sigma_s eps_s + sigma_s^2 / 2 * (eps_p - eps_s) / (sigma_p - sigma_s).

  Args:
    x_s, x_p: VP states at the last (sigma_s) and the previous (sigma_p > sigma_s) evaluation.
    sigma_s, sigma_p: their VE noise levels.
    x0_s, x0_p: the data predictions there.

  Returns:
    The sample at sigma = 0 [B, ...].
  """
  y_s = x_s * jnp.sqrt(1.0 + sigma_s * sigma_s)
  y_p = x_p * jnp.sqrt(1.0 + sigma_p * sigma_p)
  eps_s = (y_s - x0_s) / sigma_s
  eps_p = (y_p - x0_p) / sigma_p
  slope = (eps_p - eps_s) / (sigma_p - sigma_s)
  return x0_s + 0.5 * sigma_s * sigma_s * slope


@_common.register("dpm_solver")
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
               return_trajectory: bool = False):
  """Samples with DPM-Solver / DPM-Solver++ (multistep or singlestep).

  Args:
    model_fn: ``(x [B, ...], t [B] int32) -> output`` of type ``prediction``.
    schedule: the training noise schedule.
    x_T: starting noise [B, ...] (unit variance; the VP state at the first timestep).
    num_steps: number of model calls.
    key: PRNG key, needed for ``algorithm="sde-dpmsolver++"`` (step i draws
      ``_common.step_noise(jax.random.split(key, num_steps)[i], x_T.shape)``).
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

  Returns:
    x_0 in float32 (and the trajectory when asked).

  Example:
    >>> x0 = jax.jit(lambda z: samplers.dpm_solver(model_fn, sched, z, num_steps=10))(z)
  """
  if algorithm not in ALGORITHMS:
    raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {ALGORITHMS}")
  if solver_type not in SOLVER_TYPES:
    raise ValueError(f"unknown solver_type {solver_type!r}; expected one of {SOLVER_TYPES}")
  if order not in (1, 2, 3):
    raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
  if final_sigmas_type not in ("zero", "sigma_min"):
    raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
  if final_step not in FINAL_STEPS:
    raise ValueError(f"unknown final_step {final_step!r}; expected one of {FINAL_STEPS}")
  num_steps = _explicit_num_steps(sigmas, timesteps, num_steps, sigma_schedule, use_karras_sigmas,
                                  use_exponential_sigmas)
  extrapolate = final_step == "extrapolate"
  if algorithm == "dpmsolver" and final_sigmas_type == "zero" and not extrapolate:
    raise ValueError("algorithm='dpmsolver' cannot land on sigma = 0: pass final_sigmas_type='sigma_min' "
                     "or final_step='extrapolate'")
  if extrapolate and (algorithm == "sde-dpmsolver++" or final_sigmas_type != "zero" or singlestep
                      or num_steps < 2):
    raise ValueError("final_step='extrapolate' needs algorithm 'dpmsolver++' or 'dpmsolver', "
                     "final_sigmas_type='zero', singlestep=False and num_steps >= 2")
  sigma_schedule = _pick_sigma_schedule(sigma_schedule, use_karras_sigmas, use_exponential_sigmas)
  if singlestep and lower_order_final is None:
    lower_order_final = False
  elif lower_order_final is None:
    lower_order_final = True

  ts, sig = _sigmas.multistep_grid(schedule.alphas_cumprod, num_steps, spacing=timestep_spacing,
                                   steps_offset=steps_offset, sigma_schedule=sigma_schedule,
                                   final_sigmas_type=final_sigmas_type, sigmas=sigmas, timesteps=timesteps,
                                   round_timesteps=sigma_schedule != "exponential")
  n = int(num_steps)
  if singlestep:
    orders = singlestep_orders(n, order, lower_order_final=lower_order_final,
                               final_sigmas_type=final_sigmas_type)
  else:
    orders = multistep_orders(n, order, lower_order_final=lower_order_final,
                              euler_at_final=euler_at_final, final_sigmas_type=final_sigmas_type)
  if sigma_schedule is not None and final_sigmas_type == "sigma_min" and orders[-1] > 1:
    raise ValueError(f"sigma_schedule={sigma_schedule!r} already ends at sigma_min, so "
                     "final_sigmas_type='sigma_min' adds a zero-length last step that a step of order "
                     f"{orders[-1]} divides by; use final_sigmas_type='zero' or lower_order_final")
  stochastic = algorithm == "sde-dpmsolver++"
  x, prediction, keys = _common.prepare(x_T, prediction, key, n, stochastic)
  data_pred = algorithm != "dpmsolver"
  post = dict(thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
              sample_max_value=sample_max_value)

  sig = jnp.asarray(sig, jnp.float32)  # [n + 1]
  idx = np.arange(n)
  s_next, s0 = sig[idx + 1], sig[idx]
  s1, s2 = sig[np.maximum(idx - 1, 0)], sig[np.maximum(idx - 2, 0)]
  branch = jnp.asarray(orders - 1, jnp.int32)
  is_final = jnp.asarray(idx == n - 1) if extrapolate else jnp.zeros((n,), bool)
  s_prev = sig[np.maximum(idx - 1, 0)]

  def convert(out, x, s):
    alpha, sigma = _sigmas.alpha_sigma(s)
    if data_pred:
      return _common.process_x0(diffusion.to_x0(out, x, alpha, sigma, prediction), **post)
    eps = diffusion.to_epsilon(out, x, alpha, sigma, prediction)
    if thresholding:
      x0 = _common.process_x0(diffusion.to_x0(eps, x, alpha, sigma, "epsilon"), **post)
      eps = diffusion.to_epsilon(x0, x, alpha, sigma, "sample")
    return eps

  def lam(s):
    a, sg = _sigmas.alpha_sigma(s)
    return _sigmas.log_alpha_sigma_ratio(a, sg), a, sg

  def finish(c, xs, d0, d1=None, c1=None, d2=None, noise=None):
    out = c["a"] * xs + c["c0"] * d0
    if d1 is not None:
      out = out + c1 * d1
    if d2 is not None:
      out = out + c["c2"] * d2
    if stochastic:
      out = out + c["cn"] * noise
    return out

  def multistep_branches(x, x_start, hist, sc, noise):
    del x_start
    st, s_0, s_1, s_2 = sc
    lt, at, sgt = lam(st)
    l0, a0, sg0 = lam(s_0)
    l1, _, _ = lam(s_1)
    l2, _, _ = lam(s_2)
    h = lt - l0
    # a last step to sigma = 0 has h = inf: same value, but no (NaN) gradient through it
    h = jnp.where(st > 0, h, jax.lax.stop_gradient(h))
    c = _coefficients(algorithm, h, at, sgt, a0, sg0)
    m0, m1, m2 = hist[2], hist[1], hist[0]

    def first(_):
      return finish(c, x, m0, noise=noise)

    def second(_):
      r0 = (l0 - l1) / h
      d1 = (1.0 / r0) * (m0 - m1)
      return finish(c, x, m0, d1, c["c1m"] if solver_type == "midpoint" else c["c1h"], noise=noise)

    def third(_):
      r0, r1 = (l0 - l1) / h, (l1 - l2) / h
      d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
      d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
      d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
      return finish(c, x, m0, d1, c["c1h"], d2, noise=noise)

    return first, second, third

  def singlestep_branches(x, x_start, hist, sc, noise):
    st, s_0, s_1, s_2 = sc
    lt, at, sgt = lam(st)
    l0, a0, sg0 = lam(s_0)
    l1, a1, sg1 = lam(s_1)
    l2, a2, sg2 = lam(s_2)
    m0, m1, m2 = hist[2], hist[1], hist[0]

    def first(_):
      c = _coefficients(algorithm, lt - l0, at, sgt, a0, sg0)
      return finish(c, x, m0, noise=noise)

    def second(_):
      h = lt - l1
      c = _coefficients(algorithm, h, at, sgt, a1, sg1)
      r0 = (l0 - l1) / h
      d1 = (1.0 / r0) * (m0 - m1)
      return finish(c, x_start, m1, d1, c["c1m"] if solver_type == "midpoint" else c["c1h"],
                    noise=noise)

    def third(_):
      h = lt - l2
      c = _coefficients(algorithm, h, at, sgt, a2, sg2)
      r0, r1 = (l0 - l2) / h, (l1 - l2) / h
      d1_0, d1_1 = (1.0 / r1) * (m1 - m2), (1.0 / r0) * (m0 - m2)
      if solver_type == "midpoint":
        return finish(c, x_start, m2, d1_1, c["c1h"], noise=noise)
      d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
      d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
      return finish(c, x_start, m2, d1, c["c1h"], d2, noise=noise)

    return first, second, third

  make_branches = singlestep_branches if singlestep else multistep_branches
  t_dtype = jnp.int32 if jnp.issubdtype(jnp.asarray(ts).dtype, jnp.integer) else jnp.float32

  def step(carry, inputs):
    x, x_start, hist, x_last = carry
    t, st, s_0, s_1, s_2, br, final, sp, k = inputs
    out = _common.call_model(model_fn, x, t, t_dtype)
    m = convert(out, x, s_0)
    hist = jnp.concatenate([hist[1:], m[None]], axis=0)
    if singlestep:
      x_start = jnp.where(br == 0, x, x_start)
    noise = _common.step_noise(k, x.shape) if stochastic else None
    if extrapolate:  # the regular last step is discarded: aim it at a finite sigma (finite gradients)
      st = jnp.where(final, 0.5 * s_0, st)
    branches = make_branches(x, x_start, hist, (st, s_0, s_1, s_2), noise)
    x_next = jax.lax.switch(br, branches, None)
    if extrapolate:
      x0_s, x0_p = hist[2], hist[1]
      if not data_pred:  # the history holds noise predictions: x0 = (x - sigma_t eps) / alpha_t
        x0_s, x0_p = _eps_to_x0(x, s_0, hist[2]), _eps_to_x0(x_last, sp, hist[1])
      # on the other steps the formula is evaluated and discarded: keep it finite there (sp = s_0
      # at step 0) so that gradients through jnp.where stay finite
      sp = jnp.where(final, sp, 2.0 * s_0 + 1.0)
      x_next = jnp.where(final, extrapolated_final_step(x, s_0, x0_s, x_last, sp, x0_p), x_next)
    return (x_next, x_start, hist, x), (x_next if return_trajectory else None)

  hist0 = jnp.zeros((3,) + x.shape, jnp.float32)
  xs = (jnp.asarray(ts).astype(t_dtype), s_next, s0, s1, s2, branch, is_final, s_prev, keys)
  (x, _, _, _), traj = jax.lax.scan(step, (x, x, hist0, x), xs)
  return (x, traj) if return_trajectory else x


def _eps_to_x0(x: jax.Array, sigma: jax.Array, eps: jax.Array) -> jax.Array:
  """Data prediction of a noise prediction at VE level ``sigma`` (VP state x)."""
  alpha, sigma_t = _sigmas.alpha_sigma(sigma)
  return diffusion.to_x0(eps, x, alpha, sigma_t, "epsilon")


def _explicit_num_steps(sigmas, timesteps, num_steps, sigma_schedule, use_karras_sigmas: bool,
                        use_exponential_sigmas: bool):
  """Checks an explicit ``sigmas=`` grid against the schedule options; returns the step count."""
  if sigmas is None:
    if timesteps is not None:
      raise ValueError("timesteps= goes with sigmas= (pass the sigma list the timesteps belong to)")
    if num_steps is None:
      raise ValueError("num_steps is required unless sigmas= is given")
    return num_steps
  if sigma_schedule is not None or use_karras_sigmas or use_exponential_sigmas:
    raise ValueError("sigmas= replaces the sigma schedule: drop sigma_schedule, use_karras_sigmas and "
                     "use_exponential_sigmas")
  shape = np.shape(sigmas)
  if len(shape) != 1 or shape[0] < 2:
    raise ValueError(f"sigmas must be a 1-D list of at least 2 noise levels, got shape {shape}")
  if num_steps is not None and int(num_steps) != shape[0] - 1:
    raise ValueError(f"sigmas has {shape[0]} entries, so num_steps must be {shape[0] - 1} (got {num_steps})")
  return shape[0] - 1


def _pick_sigma_schedule(sigma_schedule, use_karras_sigmas: bool, use_exponential_sigmas: bool):
  """Merges diffusers' boolean flags into jdiff's ``sigma_schedule`` name."""
  picked = [name for name, on in (("karras", use_karras_sigmas),
                                  ("exponential", use_exponential_sigmas)) if on]
  if sigma_schedule is not None:
    _sigmas.check_sigma_schedule(sigma_schedule)
    picked.append(sigma_schedule)
  if len(set(picked)) > 1:
    raise ValueError(f"choose one sigma schedule, got {picked} (use_karras_sigmas, "
                     "use_exponential_sigmas and sigma_schedule are exclusive)")
  return picked[0] if picked else None
