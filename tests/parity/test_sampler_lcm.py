"""Parity of jdiff's LCM sampler with diffusers' LCMScheduler (same noise injected, float32,
<= 1e-5 over the trajectory) and its moments on Gaussian data against the sampler's exact law."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.parity import test_sampler_common as h

diffusers = pytest.importorskip("diffusers")

from jdiff.samplers import lcm  # noqa: E402

CASES = list(itertools.product((1, 2, 4, 8), ("epsilon", "v_prediction", "sample"), (50, 25)))


@pytest.mark.parametrize("n,prediction,orig", CASES)
def test_lcm_matches_diffusers_with_same_noise(n, prediction, orig):
  sched, cfg = h.schedule_pair("scaled_linear" if orig == 50 else "linear")
  scaling = 10.0 if orig == 50 else 7.0
  key = jax.random.key(n)
  xT = h.x_T(seed=n, spatial=(2, 2))
  noises = h.jdiff_noises(key, n, xT.shape)[:-1]
  clip = prediction == "sample"
  sch = diffusers.LCMScheduler(**cfg, prediction_type=prediction, original_inference_steps=orig,
                               timestep_scaling=scaling, clip_sample=clip, clip_sample_range=1.3,
                               thresholding=prediction == "v_prediction", sample_max_value=1.5)
  with h.injected_noise("diffusers.schedulers.scheduling_lcm", noises):
    ref, ts = h.run_diffusers(sch, xT, n)
  log = []
  _, traj = lcm(h.recording_model(h.toy_jax, log), sched, jnp.asarray(xT), num_steps=n,
                key=key if n > 1 else None, prediction=prediction, original_inference_steps=orig,
                timestep_scaling=scaling, clip_sample=clip, clip_sample_range=1.3,
                thresholding=prediction == "v_prediction", sample_max_value=1.5, return_trajectory=True)
  np.testing.assert_array_equal(np.stack(log)[:, 0], ts)
  assert h.max_rel_diff(np.asarray(traj), ref) <= 1e-5


def _lcm_law(cfg, n: int):
  """Exact mean/variance (float64) of LCM sampling with the exact Gaussian denoiser: every step
  (denoise to c_out x0_hat + c_skip x, then re-noise) is affine in the state and fresh noise."""
  sch = diffusers.LCMScheduler(**cfg)
  sch.set_timesteps(n)
  ts = sch.timesteps.numpy()
  abar = sch.alphas_cumprod.numpy().astype(np.float64)
  mu, s = h.GAUSS_MU, h.GAUSS_S
  m, v = 0.0, 1.0
  for i, t in enumerate(ts):
    a, sg = np.sqrt(abar[t]), np.sqrt(1 - abar[t])
    g = a * s * s / (a * a * s * s + sg * sg)  # x0_hat = mu + g (x - a mu)
    sc = t * 10.0
    c_skip, c_out = 0.25 / (sc * sc + 0.25), sc / np.sqrt(sc * sc + 0.25)
    k = c_out * g + c_skip
    m, v = c_out * (mu - g * a * mu) + k * m, k * k * v
    if i < n - 1:
      ap = abar[ts[i + 1]]
      m, v = np.sqrt(ap) * m, ap * v + (1 - ap)
  return m, v


@pytest.mark.parametrize("n", [2, 4])
def test_lcm_moments_on_gaussian_data(n):
  sched, cfg = h.schedule_pair()
  x = jax.random.normal(jax.random.key(1), (4000, 8))
  out = jax.jit(lambda z, k: lcm(h.gaussian_eps_jax(sched), sched, z, num_steps=n, key=k))(x, jax.random.key(3))
  out = np.asarray(out, np.float64)
  m, v = _lcm_law(cfg, n)
  assert abs(out.mean() - m) < 0.01 and abs(out.std() - np.sqrt(v)) < 0.008
  # with an (undistilled) exact denoiser each step outputs a posterior mean E[x0 | x_t]: the mean
  # of the data (up to the c_skip term), and a spread shrunk by the last step's noise level
  assert abs(m - h.GAUSS_MU) < 1e-3 and 0.0 < np.sqrt(v) < h.GAUSS_S
