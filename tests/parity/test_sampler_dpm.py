"""Parity of jdiff's DPM-Solver family with diffusers' DPMSolverMultistepScheduler and
DPMSolverSinglestepScheduler over whole trajectories (toy model, float32, <= 1e-5), including
the SDE variant with the same noise injected into both, and moments of sde-dpmsolver++ on
Gaussian data against the exact answer."""

from __future__ import annotations

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.parity import test_sampler_common as h

diffusers = pytest.importorskip("diffusers")

from jdiff.samplers import dpm_solver  # noqa: E402

TOL = 1e-5
_SIGMAS = (None, "karras", "exponential")
_SPACINGS = ("linspace", "leading", "trailing")
_PREDS = ("epsilon", "v_prediction", "sample")


def _cases():
  """Every (order, algorithm, solver_type) for multistep and singlestep, each paired with a
  rotating choice of the remaining options so that every value of every option appears."""
  out = []
  core = list(itertools.product((False, True), (1, 2, 3), ("dpmsolver++", "dpmsolver", "sde-dpmsolver++"),
                                ("midpoint", "heun")))
  for i, (single, order, alg, st) in enumerate(core):
    final = "sigma_min" if alg == "dpmsolver" or i % 4 == 1 else "zero"
    # a sigma schedule already ends at sigma_min: "sigma_min" would add a zero-length step
    sig = None if final == "sigma_min" and i % 3 != 0 else _SIGMAS[i % 3]
    if sig is not None and final == "sigma_min":
      final, alg_ok = ("zero", alg != "dpmsolver")
      if not alg_ok:
        final, sig = "sigma_min", None
    out.append(dict(singlestep=single, order=order, algorithm=alg, solver_type=st, sigma=sig,
                    spacing="linspace" if single else _SPACINGS[(i // 3) % 3], prediction=_PREDS[(i // 2) % 3],
                    num_steps=(7, 10, 16, 12)[i % 4], lower_order_final=(i % 5 != 2),
                    euler_at_final=(i % 7 == 3), final=final, steps_offset=(1 if i % 6 == 0 else 0),
                    schedule=("scaled_linear", "linear")[i % 2], thresholding=False))
  # dynamic thresholding (4-D samples) in both parameterisations
  for single, alg in ((False, "dpmsolver++"), (False, "dpmsolver"), (True, "dpmsolver++")):
    out.append(dict(singlestep=single, order=2, algorithm=alg, solver_type="midpoint", sigma=None,
                    spacing="linspace", prediction="epsilon", num_steps=8, lower_order_final=True,
                    euler_at_final=False, final="sigma_min" if alg == "dpmsolver" else "zero", steps_offset=0,
                    schedule="scaled_linear", thresholding=True))
  return out


def _id(c):
  return "-".join(str(c[k]) for k in ("singlestep", "order", "algorithm", "solver_type", "sigma", "spacing",
                                      "prediction", "num_steps", "final", "thresholding"))


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_trajectory_matches_diffusers(case):
  sched, cfg = h.schedule_pair(case["schedule"])
  n = case["num_steps"]
  kw = dict(solver_order=case["order"], algorithm_type=case["algorithm"], solver_type=case["solver_type"],
            use_karras_sigmas=case["sigma"] == "karras", use_exponential_sigmas=case["sigma"] == "exponential",
            prediction_type=case["prediction"], final_sigmas_type=case["final"],
            lower_order_final=case["lower_order_final"], thresholding=case["thresholding"],
            sample_max_value=1.5)
  xT = h.x_T(seed=n, spatial=(2, 2) if case["thresholding"] else ())
  key = jax.random.key(n)
  stochastic = case["algorithm"] == "sde-dpmsolver++"
  noises = h.jdiff_noises(key, n, xT.shape) if stochastic else None
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    if case["singlestep"]:
      sch = diffusers.DPMSolverSinglestepScheduler(**cfg, **kw)
      if stochastic:
        with h.injected_noise("diffusers.schedulers.scheduling_dpmsolver_singlestep", noises):
          ref, ts = h.run_diffusers(sch, xT, n)
      else:
        ref, ts = h.run_diffusers(sch, xT, n)
    else:
      sch = diffusers.DPMSolverMultistepScheduler(**cfg, **kw, euler_at_final=case["euler_at_final"],
                                                  timestep_spacing=case["spacing"],
                                                  steps_offset=case["steps_offset"])
      ref, ts = h.run_diffusers(sch, xT, n, noises=noises)
  log = []
  _, traj = dpm_solver(h.recording_model(h.toy_jax, log), sched, jnp.asarray(xT), num_steps=n,
                       key=key if stochastic else None, order=case["order"], algorithm=case["algorithm"],
                       solver_type=case["solver_type"], sigma_schedule=case["sigma"],
                       prediction=case["prediction"], final_sigmas_type=case["final"],
                       lower_order_final=case["lower_order_final"], euler_at_final=case["euler_at_final"],
                       timestep_spacing=case["spacing"], steps_offset=case["steps_offset"],
                       thresholding=case["thresholding"], sample_max_value=1.5,
                       singlestep=case["singlestep"], return_trajectory=True)
  assert np.all(np.isfinite(ref))
  np.testing.assert_array_equal(np.stack(log)[:, 0], ts)  # same timesteps, int32
  assert np.stack(log).dtype == np.int32
  assert h.max_rel_diff(np.asarray(traj), ref) <= TOL


def test_rejects_bad_options():
  sched, _ = h.schedule_pair()
  x = jnp.zeros((1, 4))
  with pytest.raises(ValueError, match="algorithm"):
    dpm_solver(h.toy_jax, sched, x, num_steps=4, algorithm="deis")
  with pytest.raises(ValueError, match="sigma_min"):
    dpm_solver(h.toy_jax, sched, x, num_steps=4, algorithm="dpmsolver")
  with pytest.raises(ValueError, match="key"):
    dpm_solver(h.toy_jax, sched, x, num_steps=4, algorithm="sde-dpmsolver++")
  with pytest.raises(ValueError, match="sigma schedule"):
    dpm_solver(h.toy_jax, sched, x, num_steps=4, use_karras_sigmas=True, use_exponential_sigmas=True)
  with pytest.raises(ValueError, match="order"):
    dpm_solver(h.toy_jax, sched, x, num_steps=4, order=4)


def _sde_first_order_law(cfg, n: int):
  """Exact mean and variance (float64) of first-order sde-dpmsolver++'s output with the exact
  Gaussian denoiser, from diffusers' own sigma grid: every step is affine in (x, z)."""
  sch = diffusers.DPMSolverMultistepScheduler(**cfg, solver_order=1, algorithm_type="sde-dpmsolver++")
  sch.set_timesteps(n)
  sig = sch.sigmas.numpy().astype(np.float64)
  mu, s = h.GAUSS_MU, h.GAUSS_S
  m, v = 0.0, 1.0
  for i in range(n):
    a0, s0 = 1 / np.sqrt(1 + sig[i] ** 2), sig[i] / np.sqrt(1 + sig[i] ** 2)
    at, st = 1 / np.sqrt(1 + sig[i + 1] ** 2), sig[i + 1] / np.sqrt(1 + sig[i + 1] ** 2)
    # x0_hat = mu + g (x - a0 mu) with g = a0 s^2 / (a0^2 s^2 + s0^2)
    g = a0 * s * s / (a0 * a0 * s * s + s0 * s0)
    if st == 0:
      big_a, c0, cn = 0.0, 1.0, 0.0
    else:
      e = np.exp(-(np.log(at / st) - np.log(a0 / s0)))
      big_a, c0, cn = st / s0 * e, at * (1 - e * e), st * np.sqrt(1 - e * e)
    m = big_a * m + c0 * (mu + g * (m - a0 * mu))
    v = (big_a + c0 * g) ** 2 * v + cn * cn
  return m, v


def test_sde_first_order_moments_exact_law():
  sched, cfg = h.schedule_pair()
  n = 30
  x = jax.random.normal(jax.random.key(1), (4000, 8))
  out = jax.jit(lambda z, k: dpm_solver(h.gaussian_eps_jax(sched), sched, z, num_steps=n, key=k, order=1,
                                        algorithm="sde-dpmsolver++"))(x, jax.random.key(2))
  out = np.asarray(out, np.float64)
  m, v = _sde_first_order_law(cfg, n)
  # 32000 samples: standard errors ~0.0025 (mean) and ~0.002 (std)
  assert abs(out.mean() - m) < 0.01
  assert abs(out.std() - np.sqrt(v)) < 0.008
  # and the law itself is close to the data distribution N(mu, s^2)
  assert abs(m - h.GAUSS_MU) < 0.01 and abs(np.sqrt(v) - h.GAUSS_S) < 0.08


def test_sde_second_order_moments_on_gaussian_data():
  # sde-dpmsolver++ (order 2) from pure noise produces N(mu, s^2) when the model is exact.
  sched, _ = h.schedule_pair()
  x = jax.random.normal(jax.random.key(1), (4000, 8))
  out = jax.jit(lambda z, k: dpm_solver(h.gaussian_eps_jax(sched), sched, z, num_steps=100, key=k, order=2,
                                        algorithm="sde-dpmsolver++"))(x, jax.random.key(2))
  out = np.asarray(out, np.float64)
  assert abs(out.mean() - h.GAUSS_MU) < 0.01
  assert abs(out.std() - h.GAUSS_S) < 0.01
