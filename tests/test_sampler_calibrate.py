"""Explicit sigma grids (``sigmas=``) for the multistep samplers and the model-calibrated step
schedule (``jdiff.samplers.calibrate``).

References: the samplers' own default grids (an explicit copy of a default grid must give the
default result), and Gaussian data, whose probability-flow map is closed form:
x0 = m + (y - m) s / sqrt(s^2 + sigma^2) for y = x_T / alpha at noise level sigma.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import samplers, schedules
from jdiff.samplers import calibrate, dpm_solver, levels, unipc

MEAN, STD, DIM = 0.4, 0.1, 4
SCHED = schedules.scaled_linear(1000, 0.00085, 0.012)
ABAR = np.asarray(SCHED.alphas_cumprod, np.float64)
TABLE = np.sqrt((1 - ABAR) / ABAR)
LO, HI = float(np.float32(TABLE[0])), float(np.float32(TABLE[-1]))


def _gaussian_model():
  """Exact epsilon of N(MEAN, STD^2 I) at (fractional) timesteps: log sigma interpolated linearly,
  the rule ``levels.sigma_to_t`` inverts."""
  log_sig = jnp.asarray(np.log(TABLE), jnp.float32)

  def model(x, t):
    tf = t.astype(jnp.float32)
    lo = jnp.clip(jnp.floor(tf), 0, log_sig.shape[0] - 2).astype(jnp.int32)
    fr = tf - lo.astype(jnp.float32)
    sig = jnp.exp((1.0 - fr) * log_sig[lo] + fr * log_sig[lo + 1]).reshape(-1, 1)  # [B, 1]
    alpha = 1.0 / jnp.sqrt(1.0 + sig * sig)
    sigma = sig * alpha
    return sigma * (x - alpha * MEAN) / (alpha * alpha * STD * STD + sigma * sigma)

  return model


MODEL = _gaussian_model()


def _exact(x_T: np.ndarray) -> np.ndarray:
  """The float64 PF-ODE end point from the VP state x_T at the top sigma of the schedule."""
  y = x_T.astype(np.float64) * np.sqrt(1.0 + TABLE[-1] ** 2)
  return MEAN + (y - MEAN) * STD / np.sqrt(STD ** 2 + TABLE[-1] ** 2)


def _noise(seed: int, batch: int) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((batch, DIM)).astype(np.float32)


def _rel(x, ref) -> float:
  return float(np.linalg.norm(np.asarray(x, np.float64) - ref) / np.linalg.norm(ref))


CASES = [
    (dpm_solver, dict(order=3)),
    (dpm_solver, dict(order=2, solver_type="heun", final_step="extrapolate")),
    (dpm_solver, dict(order=3, algorithm="dpmsolver", final_sigmas_type="sigma_min")),
    (unipc, dict(order=3)),
    (unipc, dict(order=2, solver_type="bh1", predict_x0=False, final_sigmas_type="sigma_min")),
]


@pytest.mark.parametrize("fn,opts,spacing,schedule", [c + ("linspace", None) for c in CASES]
                         + [c + ("trailing", "karras") for c in (CASES[0], CASES[3])])
def test_explicit_default_grid_reproduces_default(fn, opts, spacing, schedule):
  x_T = jnp.asarray(_noise(0, 8))
  fin = opts.get("final_sigmas_type", "zero")
  base = dict(opts, timestep_spacing=spacing)
  default = np.asarray(fn(MODEL, SCHED, x_T, num_steps=7, sigma_schedule=schedule, **base))
  kw = {} if fn is dpm_solver else {"karras_final_sigma_min": "schedule"}
  ts, sig = levels.multistep_grid(SCHED.alphas_cumprod, 7, spacing=spacing, sigma_schedule=schedule,
                                   final_sigmas_type=fin, **kw)
  # the default grid's sigmas with its own (integer) timesteps: the same program, bit for bit
  same = np.asarray(fn(MODEL, SCHED, x_T, sigmas=sig, timesteps=ts, **base))
  np.testing.assert_array_equal(same, default)
  if schedule is None:
    # sigmas only: the model gets the fractional timesteps of those sigmas, here integers again
    frac = np.asarray(fn(MODEL, SCHED, x_T, sigmas=sig, **base))
    np.testing.assert_allclose(frac, default, rtol=1e-5, atol=1e-5)
  # through the dispatcher, num_steps inferred from the grid
  via = np.asarray(samplers.sample(fn.__name__, MODEL, SCHED, x_T, sigmas=sig, timesteps=ts, **base))
  np.testing.assert_array_equal(via, default)


def test_explicit_grid_compiles_once():
  traces = []

  def run(sig, x):
    traces.append(1)
    return unipc(MODEL, SCHED, x, sigmas=sig, order=3, final_step="extrapolate")

  f = jax.jit(run)
  x_T = jnp.asarray(_noise(0, 8))
  a = np.concatenate([levels.logsnr_uniform(LO, HI, 6), [0.0]]).astype(np.float32)
  b = np.concatenate([levels.karras(LO, HI, 6), [0.0]]).astype(np.float32)
  out_a, out_b = np.asarray(f(jnp.asarray(a), x_T)), np.asarray(f(jnp.asarray(b), x_T))
  assert len(traces) == 1
  assert not np.allclose(out_a, out_b)
  # the traced grid gives the concrete grid's answer
  np.testing.assert_allclose(out_a, np.asarray(run(a, x_T)), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_gradients_with_respect_to_the_grid_are_finite():
  x_T = jnp.asarray(_noise(0, 8))
  # gradients with respect to the grid are finite for every solver family, including the steps
  # whose results are discarded (the extrapolated last step, the infinite last log-SNR step)
  for fn, opts in [(dpm_solver, dict(order=3)), (dpm_solver, dict(order=3, algorithm="dpmsolver",
                                                                  final_step="extrapolate")),
                   (unipc, dict(order=3, final_step="extrapolate")),
                   (unipc, dict(order=3, solver_type="bh1", predict_x0=False, final_step="extrapolate"))]:
    g = jax.grad(lambda lg: jnp.sum(fn(MODEL, SCHED, x_T, sigmas=calibrate.sigmas_from_logits(lg, LO, HI),
                                       **opts) ** 2))(jnp.zeros((6,)))
    assert np.all(np.isfinite(np.asarray(g))), (fn.__name__, opts)
    assert np.any(np.asarray(g) != 0)


def test_logits_parameterise_monotone_grids():
  grid = np.concatenate([levels.logsnr_uniform(LO, HI, 8), [0.0]])
  logits = calibrate.logits_from_sigmas(grid, LO, HI, slack=0.1)
  sig = np.asarray(calibrate.sigmas_from_logits(jnp.asarray(logits), LO, HI))
  assert sig.shape == (9,) and sig[0] == np.float32(HI) and sig[-1] == 0.0
  assert np.all(np.diff(sig) < 0) and sig[-2] > LO
  # close to the grid it came from (the last level moved up by the slack only)
  np.testing.assert_allclose(np.log(sig[1:-2]), np.log(grid[1:-2]), atol=0.1)
  # any logits give a strictly decreasing grid inside the range; "sigma_min" ends there
  rand = jax.random.normal(jax.random.key(1), (8,)) * 3.0
  s2 = np.asarray(calibrate.sigmas_from_logits(rand, LO, HI, "sigma_min"))
  assert np.all(np.diff(s2) < 0) and s2[-1] == np.float32(LO) and s2[-2] > s2[-1]


@pytest.fixture(scope="module")
def calibrated():
  opts = dict(order=2)
  sig, info = calibrate.calibrate_timesteps("dpm_solver", MODEL, SCHED, jnp.asarray(_noise(1, 64)), num_steps=5,
                                            iterations=60, learning_rate=0.05, return_info=True, **opts)
  return sig, info, opts


def test_calibration_reduces_error_on_fresh_noises(calibrated):
  sig, info, opts = calibrated
  assert sig.shape == (6,) and sig.dtype == np.float32
  assert sig[0] == np.float32(HI) and sig[-1] == 0.0 and np.all(np.diff(sig) < 0) and sig[-2] >= np.float32(LO)
  assert info["error"] < min(info["initial_error"].values())
  # scored on other noises against the closed-form map, not against the teacher
  x_T = _noise(2, 64)
  exact = _exact(x_T)
  cal = _rel(dpm_solver(MODEL, SCHED, jnp.asarray(x_T), sigmas=sig, **opts), exact)
  uncal = {name: _rel(dpm_solver(MODEL, SCHED, jnp.asarray(x_T), num_steps=5, sigma_schedule=name, **opts), exact)
           for name in (None, "karras", "logsnr")}
  assert cal < 0.5 * min(uncal.values()), (cal, uncal)


def test_calibrated_model_shift_on_fresh_noises():
  opts = dict(order=2)
  (sig, ts), info = calibrate.calibrate_timesteps("dpm_solver", MODEL, SCHED, jnp.asarray(_noise(1, 64)),
                                                  num_steps=5, iterations=60, learning_rate=0.05,
                                                  shift_timesteps=True, return_info=True, **opts)
  assert sig.shape == (6,) and ts.shape == (5,) and np.all(np.diff(ts) < 0)
  x_T = _noise(2, 64)
  exact = _exact(x_T)
  cal = _rel(dpm_solver(MODEL, SCHED, jnp.asarray(x_T), sigmas=sig, timesteps=ts, **opts), exact)
  uncal = {name: _rel(dpm_solver(MODEL, SCHED, jnp.asarray(x_T), num_steps=5, sigma_schedule=name, **opts), exact)
           for name in (None, "karras", "logsnr")}
  assert cal < 0.5 * min(uncal.values()), (cal, uncal)


def test_teacher_matches_closed_form():
  # the default teacher (256 uniform log-SNR levels, UniPC-3, extrapolated last step)
  x_T = _noise(3, 16)
  method, opts = calibrate.DEFAULT_REFERENCE
  sig = np.concatenate([levels.logsnr_uniform(LO, HI, 256), [0.0]])
  x = samplers.sample(method, MODEL, SCHED, jnp.asarray(x_T), sigmas=sig, **opts)
  # what is left is the last jump from sigma_min (0.029, a third of this data's spread) to 0
  assert _rel(x, _exact(x_T)) < 1e-3


@pytest.mark.slow  # three calibrations: ~20 s
def test_calibration_with_given_teacher_one_step_and_shift():
  x_c = jnp.asarray(_noise(4, 16))
  exact = jnp.asarray(_exact(np.asarray(x_c)), jnp.float32)
  sig = calibrate.calibrate_timesteps("dpm_solver", MODEL, SCHED, x_c, num_steps=1, x_ref=exact, order=1)
  np.testing.assert_array_equal(sig, np.array([np.float32(HI), 0.0], np.float32))
  sig3 = calibrate.calibrate_timesteps("dpm_solver", MODEL, SCHED, x_c, num_steps=3, x_ref=exact, iterations=5,
                                       init="karras", loss="relative")
  assert sig3.shape == (4,) and np.all(np.diff(sig3) < 0)
  # two first-order steps with calibrated model noise levels (timesteps) as well
  (sig2, ts2), info = calibrate.calibrate_timesteps("dpm_solver", MODEL, SCHED, x_c, num_steps=2, x_ref=exact,
                                                    order=1, shift_timesteps=True, iterations=40,
                                                    learning_rate=0.1, loss="relative", init="logsnr",
                                                    return_info=True)
  assert sig2.shape == (3,) and ts2.shape == (2,) and ts2.dtype == np.float32 and np.all((ts2 >= 0) & (ts2 <= 999))
  assert info["error"] < 0.9 * info["initial_error"]["logsnr"]
  x = dpm_solver(MODEL, SCHED, x_c, sigmas=sig2, timesteps=ts2, order=1)
  assert _rel(x, np.asarray(exact, np.float64)) == pytest.approx(info["error"], rel=1e-3)


@pytest.mark.parametrize("call,match", [
    (lambda x: dpm_solver(MODEL, SCHED, x, sigmas=[14.6, 1.0, 0.0], sigma_schedule="karras"), "replaces"),
    (lambda x: dpm_solver(MODEL, SCHED, x, num_steps=3, sigmas=[14.6, 1.0, 0.0]), "num_steps must be 2"),
    (lambda x: unipc(MODEL, SCHED, x, sigmas=[14.6, 1.0, 2.0, 0.0]), "strictly decreasing"),
    (lambda x: unipc(MODEL, SCHED, x, sigmas=[14.6, 1.0, 0.1], final_sigmas_type="zero"), "final_sigmas_type"),
    (lambda x: unipc(MODEL, SCHED, x, sigmas=[14.6, 1.0, 0.0], timesteps=[999]), "timesteps must have shape"),
    (lambda x: unipc(MODEL, SCHED, x, num_steps=3, timesteps=[999, 500, 100]), "goes with sigmas"),
    (lambda x: unipc(MODEL, SCHED, x), "num_steps is required"),
    (lambda x: calibrate.calibrate_timesteps("ddim", MODEL, SCHED, x, num_steps=3), "supports methods"),
    (lambda x: calibrate.calibrate_timesteps("unipc", MODEL, SCHED, x, num_steps=3, sigma_schedule="karras"),
     "sigma_schedule"),
    (lambda x: calibrate.calibrate_timesteps("unipc", MODEL, SCHED, x, num_steps=3, loss="l7"), "unknown loss"),
    (lambda x: calibrate.calibrate_timesteps("unipc", MODEL, SCHED, x, num_steps=3, init="cosine"), "unknown init"),
])
def test_bad_input(call, match):
  with pytest.raises(ValueError, match=match):
    call(jnp.asarray(_noise(0, 2)))
