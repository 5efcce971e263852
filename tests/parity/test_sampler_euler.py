"""Parity of jdiff's Euler, Euler ancestral and Heun samplers with diffusers' EulerDiscrete,
EulerAncestralDiscrete and HeunDiscrete schedulers over whole trajectories (float32, <= 1e-5),
with the same noise injected for the stochastic ones, and Euler ancestral's moments on Gaussian
data against the exact law of the sampler and the data distribution."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.parity import test_sampler_common as h

diffusers = pytest.importorskip("diffusers")

from jdiff.samplers import euler, euler_ancestral, heun  # noqa: E402

TOL = 1e-5
_PRED = {"epsilon": "epsilon", "v_prediction": "v_prediction", "sample": "sample"}


def _run_jdiff(fn, sched, xT, n, **kw):
  log = []
  _, traj = fn(h.recording_model(h.toy_jax, log), sched, jnp.asarray(xT), num_steps=n,
               return_trajectory=True, **kw)
  return np.asarray(traj), np.stack(log)


EULER_CASES = [dict(spacing=sp, sigma=sg, prediction=p, final=f, n=n, schedule=sc)
               for (sp, sg, p, f), n, sc in zip(
                   itertools.product(("linspace", "leading", "trailing"), (None, "karras", "exponential"),
                                     ("epsilon", "v_prediction"), ("zero", "sigma_min")),
                   itertools.cycle((7, 12, 20)), itertools.cycle(("scaled_linear", "linear", "linear")))]


@pytest.mark.parametrize("case", EULER_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_euler_matches_diffusers(case):
  sched, cfg = h.schedule_pair(case["schedule"])
  n = case["n"]
  sch = diffusers.EulerDiscreteScheduler(**cfg, prediction_type=case["prediction"],
                                         timestep_spacing=case["spacing"], steps_offset=1,
                                         use_karras_sigmas=case["sigma"] == "karras",
                                         use_exponential_sigmas=case["sigma"] == "exponential",
                                         final_sigmas_type=case["final"])
  xT = h.x_T(seed=n)
  ref, ts = h.run_diffusers(sch, xT, n)
  traj, t_seen = _run_jdiff(euler, sched, xT, n, prediction=case["prediction"],
                            timestep_spacing=case["spacing"], steps_offset=1, sigma_schedule=case["sigma"],
                            final_sigmas_type=case["final"])
  assert t_seen.dtype == np.float32
  np.testing.assert_allclose(t_seen[:, 0], ts, rtol=1e-6, atol=1e-4)
  assert h.max_rel_diff(traj, ref) <= TOL


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_euler_churn_matches_diffusers_with_same_noise(prediction):
  sched, cfg = h.schedule_pair()
  n = 10
  key = jax.random.key(5)
  xT = h.x_T(seed=2)
  noises = h.jdiff_noises(key, n, xT.shape)
  sch = diffusers.EulerDiscreteScheduler(**cfg, prediction_type=prediction, use_karras_sigmas=True)
  churn = dict(s_churn=4.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.003)
  with h.injected_noise("diffusers.schedulers.scheduling_euler_discrete", noises):
    ref, _ = h.run_diffusers(sch, xT, n, step_kwargs=churn)
  traj, _ = _run_jdiff(euler, sched, xT, n, key=key, prediction=prediction, use_karras_sigmas=True, **churn)
  assert h.max_rel_diff(traj, ref) <= TOL


ANCESTRAL_CASES = list(itertools.product(("linspace", "leading", "trailing"), ("epsilon", "v_prediction"),
                                         (6, 15)))


@pytest.mark.parametrize("spacing,prediction,n", ANCESTRAL_CASES)
def test_euler_ancestral_matches_diffusers_with_same_noise(spacing, prediction, n):
  sched, cfg = h.schedule_pair("scaled_linear" if n == 6 else "linear")
  key = jax.random.key(n)
  xT = h.x_T(seed=n)
  noises = h.jdiff_noises(key, n, xT.shape)
  sch = diffusers.EulerAncestralDiscreteScheduler(**cfg, prediction_type=prediction, timestep_spacing=spacing,
                                                  steps_offset=1)
  with h.injected_noise("diffusers.schedulers.scheduling_euler_ancestral_discrete", noises):
    ref, ts = h.run_diffusers(sch, xT, n)
  traj, t_seen = _run_jdiff(euler_ancestral, sched, xT, n, key=key, prediction=prediction,
                            timestep_spacing=spacing, steps_offset=1)
  np.testing.assert_allclose(t_seen[:, 0], ts, rtol=1e-6)
  assert h.max_rel_diff(traj, ref) <= TOL


HEUN_CASES = [dict(spacing=sp, sigma=sg, prediction=p, n=n, clip=c)
              for (sp, sg, p), n, c in zip(
                  itertools.product(("linspace", "leading", "trailing"), (None, "karras", "exponential"),
                                    ("epsilon", "v_prediction", "sample")),
                  itertools.cycle((5, 9, 12)), itertools.cycle((False, False, True)))]


@pytest.mark.parametrize("case", HEUN_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_heun_matches_diffusers(case):
  sched, cfg = h.schedule_pair()
  n = case["n"]
  sch = diffusers.HeunDiscreteScheduler(**cfg, prediction_type=case["prediction"],
                                        timestep_spacing=case["spacing"], steps_offset=1,
                                        use_karras_sigmas=case["sigma"] == "karras",
                                        use_exponential_sigmas=case["sigma"] == "exponential",
                                        clip_sample=case["clip"], clip_sample_range=1.2)
  xT = h.x_T(seed=n)
  ref, ts = h.run_diffusers(sch, xT, n)
  assert ref.shape[0] == 2 * n - 1
  traj, t_seen = _run_jdiff(heun, sched, xT, n, prediction=case["prediction"], timestep_spacing=case["spacing"],
                            steps_offset=1, sigma_schedule=case["sigma"], clip_sample=case["clip"],
                            clip_sample_range=1.2)
  np.testing.assert_allclose(t_seen[:, 0], ts, rtol=1e-6, atol=1e-4)
  assert h.max_rel_diff(traj, ref) <= TOL


def _ancestral_law(cfg, n: int):
  """Exact mean and variance (float64) of Euler ancestral's output with the exact Gaussian
  denoiser, on diffusers' own sigma grid (each step is affine in the state and fresh noise)."""
  sch = diffusers.EulerAncestralDiscreteScheduler(**cfg)
  sch.set_timesteps(n)
  sig = sch.sigmas.numpy().astype(np.float64)
  mu, s = h.GAUSS_MU, h.GAUSS_S
  m, v = 0.0, float(sch.init_noise_sigma) ** 2
  for i in range(n):
    sf, st = sig[i], sig[i + 1]
    up = np.sqrt(st * st * (sf * sf - st * st) / (sf * sf))
    down = np.sqrt(st * st - up * up)
    # VE denoiser of N(mu, s^2): x0_hat = mu + s^2 / (s^2 + sigma^2) (y - mu)
    g = s * s / (s * s + sf * sf)
    # y' = y + (y - x0_hat) / sf * (down - sf) + up z
    k = 1 + (1 - g) / sf * (down - sf)
    m = k * m + (1 - k) * mu
    v = k * k * v + up * up
  return m, v


@pytest.mark.parametrize("n", [40, 250])
def test_euler_ancestral_moments_on_gaussian_data(n):
  sched, cfg = h.schedule_pair()
  x = jax.random.normal(jax.random.key(1), (4000, 8))
  out = jax.jit(lambda z, k: euler_ancestral(h.gaussian_eps_jax(sched), sched, z, num_steps=n, key=k))(
      x, jax.random.key(2))
  out = np.asarray(out, np.float64)
  m, v = _ancestral_law(cfg, n)
  # the sampler's own law (32000 samples: standard errors ~0.003 mean, ~0.002 std) ...
  assert abs(out.mean() - m) < 0.01 and abs(out.std() - np.sqrt(v)) < 0.008
  # ... which approaches the data distribution as the steps shrink (the bias is O(1/n))
  assert abs(m - h.GAUSS_MU) < 0.01 and abs(np.sqrt(v) - h.GAUSS_S) < 6.0 / n
  assert abs(out.mean() - h.GAUSS_MU) < 0.015 and abs(out.std() - h.GAUSS_S) < 6.0 / n + 0.008
