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

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion
from jdiff.samplers import _common, _sigmas
from jdiff.samplers.dpm_solver import (_eps_to_x0, _explicit_num_steps, _pick_sigma_schedule,
                                       extrapolated_final_step)
from jdiff.schedules import Schedule

__all__ = ["unipc", "SOLVER_TYPES", "unipc_orders"]

SOLVER_TYPES = ("bh1", "bh2")


def unipc_orders(num_steps: int, order: int, lower_order_final: bool,
                 disable_corrector=()) -> tuple[np.ndarray, np.ndarray]:
  """Per-step predictor orders and corrector orders (0 = no corrector) of diffusers' UniPC."""
  n = int(num_steps)
  pred, corr = [], []
  for i in range(n):
    corr.append(pred[-1] if i > 0 and (i - 1) not in set(disable_corrector) else 0)
    this = min(order, n - i) if lower_order_final else order
    pred.append(min(this, min(i, order) + 1))
  return np.asarray(pred, np.int32), np.asarray(corr, np.int32)


def _lam(s):
  a, sg = _sigmas.alpha_sigma(s)
  return _sigmas.log_alpha_sigma_ratio(a, sg), a, sg


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


@_common.register("unipc")
def unipc(model_fn, schedule: Schedule, x_T: jax.Array, *, num_steps: int | None = None,
          key: jax.Array | None = None, prediction: str = "epsilon", order: int = 2, solver_type: str = "bh2",
          predict_x0: bool = True,
          lower_order_final: bool = True, disable_corrector: tuple[int, ...] = (),
          use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
          sigma_schedule: str | None = None, final_sigmas_type: str = "zero",
          timestep_spacing: str = "linspace", steps_offset: int = 0, thresholding: bool = False,
          dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
          final_step: str = "default", sigmas: jax.Array | np.ndarray | None = None,
          timesteps: jax.Array | np.ndarray | None = None, return_trajectory: bool = False):
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

  Returns:
    x_0 in float32 (and the trajectory when asked).

  Example:
    >>> x0 = samplers.unipc(model_fn, sched, z, num_steps=10, order=3, use_karras_sigmas=True)
  """
  del key
  if solver_type not in SOLVER_TYPES:
    raise ValueError(f"unknown solver_type {solver_type!r}; expected one of {SOLVER_TYPES}")
  if order not in (1, 2, 3):
    raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
  if final_sigmas_type not in ("zero", "sigma_min"):
    raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
  if final_step not in ("default", "extrapolate"):
    raise ValueError(f"unknown final_step {final_step!r}; expected 'default' or 'extrapolate'")
  num_steps = _explicit_num_steps(sigmas, timesteps, num_steps, sigma_schedule, use_karras_sigmas,
                                  use_exponential_sigmas)
  extrapolate = final_step == "extrapolate"
  if final_sigmas_type == "zero" and not predict_x0 and not extrapolate:
    raise ValueError("predict_x0=False cannot land on sigma = 0: pass final_sigmas_type='sigma_min' "
                     "or final_step='extrapolate'")
  if extrapolate and (final_sigmas_type != "zero" or num_steps < 2):
    raise ValueError("final_step='extrapolate' needs final_sigmas_type='zero' and num_steps >= 2")
  sigma_schedule = _pick_sigma_schedule(sigma_schedule, use_karras_sigmas, use_exponential_sigmas)
  ts, sig = _sigmas.multistep_grid(schedule.alphas_cumprod, num_steps, spacing=timestep_spacing,
                                   steps_offset=steps_offset, sigma_schedule=sigma_schedule,
                                   final_sigmas_type=final_sigmas_type, sigmas=sigmas, timesteps=timesteps,
                                   round_timesteps=sigma_schedule != "exponential",
                                   karras_final_sigma_min="schedule")
  n = int(num_steps)
  p_orders, c_orders = unipc_orders(n, order, lower_order_final, disable_corrector)
  if final_sigmas_type == "zero" and p_orders[-1] > 1:
    raise ValueError("lower_order_final=False with final_sigmas_type='zero' divides by the infinite last "
                     "log-SNR step; use lower_order_final=True")
  if sigma_schedule is not None and final_sigmas_type == "sigma_min" and p_orders[-1] > 1:
    raise ValueError(f"sigma_schedule={sigma_schedule!r} already ends at sigma_min, so "
                     "final_sigmas_type='sigma_min' adds a zero-length last step; use lower_order_final=True")
  x, prediction, _ = _common.prepare(x_T, prediction, None, n, False)
  post = dict(thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
              sample_max_value=sample_max_value)
  sig = jnp.asarray(sig, jnp.float32)
  idx = np.arange(n)
  # sigmas at i+1, i, i-1, i-2, i-3 (clipped; unused entries are never read)
  window = jnp.stack([sig[np.clip(idx + 1 - j, 0, n)] for j in range(5)], axis=1)  # [n, 5]
  is_final = jnp.asarray(idx == n - 1) if extrapolate else jnp.zeros((n,), bool)

  def convert(out, x, s):
    alpha, sigma = _sigmas.alpha_sigma(s)
    if predict_x0:
      return _common.process_x0(diffusion.to_x0(out, x, alpha, sigma, prediction), **post)
    return diffusion.to_epsilon(out, x, alpha, sigma, prediction)

  def b_of(hh):
    return hh if solver_type == "bh1" else jnp.expm1(hh)

  def base(x, m0, lt, at, st, l0, a0, s0):
    h = lt - l0
    hh = -h if predict_x0 else h
    b_h = b_of(hh)
    if predict_x0:
      return st / s0 * x - at * jnp.expm1(hh) * m0, at * b_h, h, hh, b_h
    return at / a0 * x - st * jnp.expm1(hh) * m0, st * b_h, h, hh, b_h

  def predictor(x, hist, w, p):
    lt, at, st = _lam(w[0])
    l0, a0, s0 = _lam(w[1])
    m0 = hist[2]
    x_, scale, h, hh, b_h = base(x, m0, lt, at, st, l0, a0, s0)
    if p == 1:
      return x_
    rks, d1s = [], []
    for k in range(1, p):
      rk = (_lam(w[1 + k])[0] - l0) / h
      rks.append(rk)
      d1s.append((hist[2 - k] - m0) / rk)
    b = _rhs(hh, b_h, p)
    rhos = [jnp.float32(0.5)] if p == 2 else list(_solve(rks, b[:-1]))
    return x_ - scale * sum(r * d for r, d in zip(rhos, d1s))

  def corrector(x_last, x_this, m_new, hist, w, c):
    # this sample sits at sigma_i = w[1]; the previous step started at sigma_{i-1} = w[2]
    lt, at, st = _lam(w[1])
    l0, a0, s0 = _lam(w[2])
    m0 = hist[2]
    x_, scale, h, hh, b_h = base(x_last, m0, lt, at, st, l0, a0, s0)
    rks, d1s = [], []
    for k in range(1, c):
      rk = (_lam(w[2 + k])[0] - l0) / h
      rks.append(rk)
      d1s.append((hist[2 - k] - m0) / rk)
    b = _rhs(hh, b_h, c)
    rhos = [jnp.float32(0.5)] if c == 1 else list(_solve(rks + [jnp.ones((), jnp.float32)], b))
    res = sum((r * d for r, d in zip(rhos[:-1], d1s)), jnp.zeros_like(x_this))
    return x_ - scale * (res + rhos[-1] * (m_new - m0))

  t_dtype = jnp.int32 if jnp.issubdtype(jnp.asarray(ts).dtype, jnp.integer) else jnp.float32

  def step(carry, inputs):
    x, x_last, hist, x_prev_eval = carry
    t, w, p, c, final = inputs
    if extrapolate:  # the predictor's last step is discarded: aim it at a finite sigma (finite gradients)
      w = w.at[0].set(jnp.where(final, 0.5 * w[1], w[0]))
    x_eval = x
    out = _common.call_model(model_fn, x, t, t_dtype)
    m = convert(out, x, w[1])
    c_branches = [lambda _: x] + [
        (lambda _, c=c: corrector(x_last, x, m, hist, w, c)) for c in (1, 2, 3)]
    x = jax.lax.switch(c, c_branches, None)
    hist = jnp.concatenate([hist[1:], m[None]], axis=0)
    p_branches = [(lambda _, p=p: predictor(x, hist, w, p)) for p in (1, 2, 3)]
    x_next = jax.lax.switch(p - 1, p_branches, None)
    if extrapolate:
      m_s, m_p = hist[2], hist[1]
      if not predict_x0:  # noise predictions -> data predictions at the same points
        m_s, m_p = _eps_to_x0(x_eval, w[1], m_s), _eps_to_x0(x_prev_eval, w[2], m_p)
      sp = jnp.where(final, w[2], 2.0 * w[1] + 1.0)  # finite when discarded (finite gradients)
      x_next = jnp.where(final, extrapolated_final_step(x_eval, w[1], m_s, x_prev_eval, sp, m_p), x_next)
    return (x_next, x, hist, x_eval), (x_next if return_trajectory else None)

  hist0 = jnp.zeros((3,) + x.shape, jnp.float32)
  xs = (jnp.asarray(ts).astype(t_dtype), window, jnp.asarray(p_orders), jnp.asarray(c_orders), is_final)
  (x, _, _, _), traj = jax.lax.scan(step, (x, x, hist0, x), xs)
  return (x, traj) if return_trajectory else x
