"""UniPC (Zhao et al., 2023): a unified predictor-corrector multistep solver in log-SNR.

Each step evaluates the model once; the new output first corrects the state that the previous
predictor produced (UniC, order of the previous step), then the predictor (UniP) extrapolates to
the next sigma. Matches diffusers' ``UniPCMultistepScheduler``: ``solver_type`` "bh1" | "bh2",
orders 1-3 with warm-up and ``lower_order_final``, ``predict_x0``, ``disable_corrector``, the
Karras/exponential sigma schedules and ``final_sigmas_type``.

Example:
  >>> x0 = jax.jit(lambda z: samplers.unipc(model_fn, sched, z, num_steps=10, order=3))(z)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion
from jdiff.samplers import base, levels
from jdiff.samplers.flow import solver_flow_grid
from jdiff.samplers.multistep import extrapolated_last_step, finite_target, history_init, history_push
from jdiff.samplers.grids import grid
from jdiff.samplers.orders import step_orders, unipc_orders
from jdiff.samplers.driver import Rule, Step, sample_is_first, solve
from jdiff.schedules import Schedule

__all__ = ["unipc", "unipc_rule", "SOLVER_TYPES", "unipc_orders"]

SOLVER_TYPES = ("bh1", "bh2")


def _rhs(hh, b_h, order: int):
  """b_k = h phi_k(h) k! / B(h) for k = 1..order (the right-hand side of UniPC's order conditions)."""
  h_phi_k = jnp.expm1(hh) / hh - 1.0
  fact, out = 1, []
  for i in range(1, order + 1):
    out.append(h_phi_k * fact / b_h)
    fact *= i + 1
    h_phi_k = h_phi_k / hh - 1.0 / fact
  return out


def _solve(rks, b):
  """Solves sum_k rho_k rks_k^(i-1) = b_i for i = 1..len(rks)."""
  mat = jnp.stack([jnp.stack([r ** i for r in rks]) for i in range(len(rks))])
  return jnp.linalg.solve(mat, jnp.stack(b))


def _updates(predict_x0: bool, solver_type: str):
  """UniPC's predictor (UniP, order p) and corrector (UniC, order c) in lambda = log(alpha / sigma).

  Levels are (lambda, alpha, sigma) triples; ``hist`` is (outputs, alphas, sigmas) with the latest
  entry last.
  """

  def base_step(x, m0, to, frm):
    (lt, at, st), (l0, a0, s0) = to, frm
    h = lt - l0
    hh = -h if predict_x0 else h
    b_h = hh if solver_type == "bh1" else jnp.expm1(hh)
    if predict_x0:
      return st / s0 * x - at * jnp.expm1(hh) * m0, at * b_h, h, hh, b_h
    return at / a0 * x - st * jnp.expm1(hh) * m0, st * b_h, h, hh, b_h

  def lam(hist, j):
    return levels.log_alpha_sigma_ratio(hist[1][j], hist[2][j])

  def predictor(x, hist, to, p: int):
    frm = (lam(hist, 2), hist[1][2], hist[2][2])
    m0 = hist[0][2]
    x_, scale, h, hh, b_h = base_step(x, m0, to, frm)
    if p == 1:
      return x_
    rks = [(lam(hist, 2 - k) - frm[0]) / h for k in range(1, p)]
    d1s = [(hist[0][2 - k] - m0) / rk for k, rk in zip(range(1, p), rks)]
    rhos = [jnp.float32(0.5)] if p == 2 else list(_solve(rks, _rhs(hh, b_h, p)[:-1]))
    return x_ - scale * sum(r * d for r, d in zip(rhos, d1s))

  def corrector(x_last, x_this, m_new, hist, to, c: int):
    # the sample x_this sits at level ``to``; the previous step started from the latest history level
    frm = (lam(hist, 2), hist[1][2], hist[2][2])
    m0 = hist[0][2]
    x_, scale, h, hh, b_h = base_step(x_last, m0, to, frm)
    rks = [(lam(hist, 2 - k) - frm[0]) / h for k in range(1, c)]
    d1s = [(hist[0][2 - k] - m0) / rk for k, rk in zip(range(1, c), rks)]
    b = _rhs(hh, b_h, c)
    rhos = [jnp.float32(0.5)] if c == 1 else list(_solve(rks + [jnp.ones((), jnp.float32)], b))
    res = sum((r * d for r, d in zip(rhos[:-1], d1s)), jnp.zeros_like(x_this))
    return x_ - scale * (res + rhos[-1] * (m_new - m0))

  return predictor, corrector


def unipc_rule(order: int = 2, *, solver_type: str = "bh2", predict_x0: bool = True, lower_order_final: bool = True,
               disable_corrector: tuple[int, ...] = (), final_step: str = "default", prediction: str = "epsilon",
               postprocess=None) -> Rule:
  """UniPC steps: the new output first corrects the previous predictor's sample (UniC), then the
  predictor (UniP) extrapolates to the next level; history of the last three outputs.

  Args:
    order: 1, 2 or 3 (per-step predictor/corrector orders: :func:`jdiff.samplers.orders.step_orders`).
    solver_type: "bh1" or "bh2" (the B(h) of the paper).
    predict_x0: solve in data prediction (True) or noise prediction.
    lower_order_final, disable_corrector: diffusers' options (corrector indices into the uncut grid).
    final_step: "default" or "extrapolate" (second-order last step in sigma to sigma = 0).
    prediction: what the model outputs.
    postprocess: ``x0 -> x0`` on the data estimates (thresholding; data prediction only), or None.

  Example:
    >>> x0 = solve(model_fn, grid(sched, 10, convention="unipc"), x_T, unipc_rule(order=3))
  """
  if solver_type not in SOLVER_TYPES:
    raise ValueError(f"unknown solver_type {solver_type!r}; expected one of {SOLVER_TYPES}")
  if order not in (1, 2, 3):
    raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
  if final_step not in ("default", "extrapolate"):
    raise ValueError(f"unknown final_step {final_step!r}; expected 'default' or 'extrapolate'")
  prediction = diffusion.check_prediction(prediction)
  extrapolate = final_step == "extrapolate"
  predictor, corrector = _updates(predict_x0, solver_type)

  def plan(g):
    if g.final == "zero" and not predict_x0 and not extrapolate:
      raise ValueError("predict_x0=False cannot land on sigma = 0: pass final_sigmas_type='sigma_min' "
                       "or final_step='extrapolate'")
    if extrapolate and (g.final != "zero" or g.total < 2):
      raise ValueError("final_step='extrapolate' needs final_sigmas_type='zero' and num_steps >= 2")
    orders = step_orders(g, order, kind="unipc", lower_order_final=lower_order_final,
                         disable_corrector=disable_corrector)
    if g.ends_at_zero and orders[-1, 0] > 1:
      raise ValueError("lower_order_final=False with final_sigmas_type='zero' divides by the infinite last "
                       "log-SNR step; use lower_order_final=True")
    return orders

  def convert(out, x, alpha, sigma):
    if predict_x0:
      return (postprocess or (lambda v: v))(base.to_x0(out, x, alpha, sigma, prediction))
    return base.to_epsilon(out, x, alpha, sigma, prediction)

  def init(x, g):
    return x, x, history_init(x, g), x

  def step(model_fn, state, st: Step):
    x, x_last, hist, x_prev_eval = state
    p, c = st.plan[0], st.plan[1]
    final = st.last if extrapolate else False
    at, sgt = finite_target(final, st) if extrapolate else (st.alpha_to, st.sigma_to)
    here = (levels.log_alpha_sigma_ratio(st.alpha, st.sigma), st.alpha, st.sigma)
    x_eval = x
    m = convert(base.call_model(model_fn, x, st.t), x, st.alpha, st.sigma)
    x = jax.lax.switch(c, [lambda _: x] + [(lambda _, k=k: corrector(x_last, x, m, hist, here, k))
                                          for k in (1, 2, 3)], None)
    hist = history_push(hist, m, st.alpha, st.sigma)
    to = (levels.log_alpha_sigma_ratio(at, sgt), at, sgt)
    x_next = jax.lax.switch(p - 1, [(lambda _, k=k: predictor(x, hist, to, k)) for k in (1, 2, 3)], None)
    if extrapolate:
      x_next = jnp.where(final, extrapolated_last_step(final, x_eval, x_prev_eval, hist, predict_x0), x_next)
    return x_next, x, hist, x_eval

  return Rule(init=init, step=step, sample=lambda state: state[0], plan=plan, with_sample=sample_is_first)


@base.register("unipc")
def unipc(model_fn, schedule: Schedule, x_T: jax.Array, *, num_steps: int | None = None,
          key: jax.Array | None = None, prediction: str = "epsilon", order: int = 2, solver_type: str = "bh2",
          predict_x0: bool = True,
          lower_order_final: bool = True, disable_corrector: tuple[int, ...] = (),
          use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
          sigma_schedule: str | None = None, final_sigmas_type: str = "zero",
          timestep_spacing: str = "linspace", steps_offset: int = 0, thresholding: bool = False,
          dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
          final_step: str = "default", sigmas: jax.Array | np.ndarray | None = None,
          timesteps: jax.Array | np.ndarray | None = None, return_trajectory: bool = False,
          use_beta_sigmas: bool = False, use_flow_sigmas: bool = False, flow_shift: float = 1.0,
          use_dynamic_shifting: bool = False, mu: float | None = None, time_shift_type: str = "exponential",
          shift_terminal: float | None = None):
  """Samples with UniPC (multistep predictor-corrector).

  Args:
    model_fn: ``(x [B, ...], t [B] int32) -> output`` of type ``prediction``.
    schedule: the training noise schedule.
    x_T: unit-variance starting noise [B, ...].
    num_steps: number of model calls.
    key: unused (deterministic); accepted for a uniform signature.
    prediction: "epsilon", "v" or "sample".
    order: 1, 2 or 3 (diffusers' ``solver_order``).
    solver_type: "bh1" or "bh2" (the B(h) of the paper).
    predict_x0: solve in data prediction (True) or noise prediction.
    lower_order_final, disable_corrector: as in diffusers.
    use_karras_sigmas, use_exponential_sigmas, sigma_schedule: sigma schedule (see
      :func:`jdiff.samplers.dpm_solver`); "logsnr" is jdiff's uniform log-SNR grid.
    final_sigmas_type: "zero" or "sigma_min".
    timestep_spacing, steps_offset, thresholding, dynamic_thresholding_ratio, sample_max_value:
      as in diffusers.
    final_step: "default" or "extrapolate" (jdiff: second-order last step in sigma, see
      :func:`jdiff.samplers.dpm_solver.extrapolated_final_step`; needs a final sigma of zero and
      num_steps >= 2; with ``predict_x0=False`` it is the only way to land on sigma = 0).
    return_trajectory: also return the state after every step [num_steps, B, ...] (the
      predictor's output; the corrector refines it at the next step, as in diffusers).
    sigmas, timesteps: an explicit grid (n + 1 descending sigmas, optional model timesteps [n]);
      see :func:`jdiff.samplers.dpm_solver`.
    use_beta_sigmas: diffusers' beta sigma schedule (``sigma_schedule="beta"``).
    use_flow_sigmas, flow_shift, use_dynamic_shifting, mu, time_shift_type, shift_terminal: diffusers'
      rectified-flow grid (:func:`jdiff.samplers.flow.flow_grid`, ``convention="unipc"``): alpha =
      1 - sigma; use with ``prediction="flow_prediction"`` and ``final_sigmas_type="zero"``.
      ``schedule`` may then be None (T = 1000).

  Returns:
    x_0 in float32 (and the trajectory when asked).

  Example:
    >>> x0 = samplers.unipc(model_fn, sched, z, num_steps=10, order=3, use_karras_sigmas=True)
  """
  del key
  if final_sigmas_type not in ("zero", "sigma_min"):
    raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
  post = None
  if thresholding:
    post = functools.partial(base.threshold_sample, ratio=dynamic_thresholding_ratio, max_value=sample_max_value)
  rule = unipc_rule(order, solver_type=solver_type, predict_x0=predict_x0, lower_order_final=lower_order_final,
                    disable_corrector=disable_corrector, final_step=final_step, prediction=prediction,
                    postprocess=post)
  num_steps = levels.explicit_num_steps(sigmas, timesteps, num_steps, sigma_schedule, use_karras_sigmas,
                                        use_exponential_sigmas, use_beta_sigmas)
  sigma_schedule = levels.pick_sigma_schedule(sigma_schedule, use_karras_sigmas, use_exponential_sigmas,
                                              use_beta_sigmas)
  if use_flow_sigmas:
    g = solver_flow_grid(schedule, num_steps, convention="unipc", flow_shift=flow_shift,
                         use_dynamic_shifting=use_dynamic_shifting, mu=mu, time_shift_type=time_shift_type,
                         shift_terminal=shift_terminal, final_sigmas_type=final_sigmas_type,
                         sigma_schedule=sigma_schedule, sigmas=sigmas, timesteps=timesteps)
  else:
    g = grid(schedule, num_steps, spacing=timestep_spacing, steps_offset=steps_offset,
             sigmas=sigma_schedule if sigmas is None else sigmas, final=final_sigmas_type, timesteps=timesteps,
             convention="unipc")
  orders = rule.plan(g)
  if sigma_schedule is not None and final_sigmas_type == "sigma_min" and orders[-1, 0] > 1:
    raise ValueError(f"sigma_schedule={sigma_schedule!r} already ends at sigma_min, so "
                     "final_sigmas_type='sigma_min' adds a zero-length last step; use lower_order_final=True")
  return solve(model_fn, g, x_T, rule, return_trajectory=return_trajectory)
