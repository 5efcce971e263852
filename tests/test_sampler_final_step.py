"""jdiff's extrapolated last step (``final_step="extrapolate"``) for noise-prediction solvers: on
Gaussian data, whose probability-flow map is closed form, it lands on sigma = 0 and is more
accurate than diffusers' only option for these solvers (stopping at sigma_min)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import schedules
from jdiff.samplers import dpm_solver, unipc

MEAN, STD, DIM = 0.5, 0.3, 4


def _setup():
  sched = schedules.scaled_linear(1000, 0.00085, 0.012)
  abar = np.asarray(sched.alphas_cumprod, np.float64)
  log_sig = jnp.asarray(np.log(np.sqrt((1 - abar) / abar)), jnp.float32)

  def model(x, t):  # exact epsilon of N(MEAN, STD^2 I) at the (integer) timestep's noise level
    sig = jnp.exp(log_sig[t]).reshape(-1, 1)  # [B, 1]
    alpha = 1.0 / jnp.sqrt(1.0 + sig * sig)
    sigma = sig * alpha
    return sigma * (x - alpha * MEAN) / (alpha * alpha * STD * STD + sigma * sigma)

  x_T = np.random.default_rng(0).standard_normal((16, DIM)).astype(np.float32)
  sig_T = float(np.sqrt((1 - abar[-1]) / abar[-1]))
  y_T = x_T.astype(np.float64) * np.sqrt(1 + sig_T ** 2)
  exact = MEAN + (y_T - MEAN) * STD / np.sqrt(STD ** 2 + sig_T ** 2)  # float64 closed form at sigma = 0
  return sched, model, jnp.asarray(x_T), exact


SETUP = _setup()


def _err(fn, **opts):
  sched, model, x_T, exact = SETUP
  x = np.asarray(jax.jit(lambda z: fn(model, sched, z, num_steps=10, **opts))(x_T), np.float64)
  return float(np.linalg.norm(x - exact) / np.linalg.norm(exact))


@pytest.mark.parametrize("fn,opts", [
    (dpm_solver, dict(order=3, algorithm="dpmsolver", sigma_schedule="karras")),
    (unipc, dict(order=3, solver_type="bh1", predict_x0=False, sigma_schedule="karras")),
])
def test_noise_prediction_lands_on_zero_more_accurately(fn, opts):
  lof = {"lower_order_final": True}
  stop = _err(fn, final_sigmas_type="sigma_min", **opts, **lof)
  land = _err(fn, final_step="extrapolate", **opts)
  assert np.isfinite(land)
  # the remaining error is the integer-timestep grid's; the part from stopping short is gone
  assert land < 0.9 * stop, (stop, land)


def test_extrapolate_agrees_between_parameterisations():
  # the same last step from data and noise predictions: both land close to the exact answer
  e_x0 = _err(dpm_solver, order=2, final_step="extrapolate", sigma_schedule="logsnr")
  e_eps = _err(dpm_solver, order=2, algorithm="dpmsolver", final_step="extrapolate", sigma_schedule="logsnr")
  assert e_x0 < 2e-2 and e_eps < 2e-2, (e_x0, e_eps)


def test_noise_prediction_to_zero_needs_the_extrapolated_step():
  sched, model, x_T, _ = SETUP
  with pytest.raises(ValueError, match="final_step='extrapolate'"):
    dpm_solver(model, sched, x_T, num_steps=5, algorithm="dpmsolver", final_sigmas_type="zero")
  with pytest.raises(ValueError, match="final_step='extrapolate'"):
    unipc(model, sched, x_T, num_steps=5, predict_x0=False, final_sigmas_type="zero")
  with pytest.raises(ValueError, match="final_step='extrapolate' needs"):
    dpm_solver(model, sched, x_T, num_steps=5, algorithm="sde-dpmsolver++", final_step="extrapolate",
               key=jax.random.key(0))
