"""The rectified-flow process (jdiff.flow) against float64 NumPy closed forms: the path and its conversions,
the timestep shifts, the dynamic-shift mu, the loss weightings and the loss itself; the timestep densities'
moments within sampling error; and the flow Euler sampler on Gaussian data against its exact law."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from jdiff import diffusion, flow, samplers
from jdiff.samplers import base

U32 = 2.0 ** -24  # float32 unit roundoff


def _data(key, shape=(4, 3, 3, 2)):
  k1, k2 = jax.random.split(key)
  return jax.random.normal(k1, shape), jax.random.normal(k2, shape)


def test_path_and_conversions_are_the_closed_forms(key):
  x0, eps = _data(key)
  t = jnp.array([0.0, 0.1, 0.63, 1.0], jnp.float32)
  x0n, en, tn = (np.asarray(a, np.float64) for a in (x0, eps, t))
  tb = tn.reshape(-1, 1, 1, 1)
  scale = max(np.abs(x0n).max(), np.abs(en).max())
  xt = flow.interpolate(x0, eps, t)
  # three float32 roundings (two products and a sum) of numbers up to ``scale``
  np.testing.assert_allclose(xt, (1 - tb) * x0n + tb * en, rtol=0, atol=4 * U32 * scale)
  v = flow.velocity(x0, eps)
  np.testing.assert_allclose(v, en - x0n, rtol=0, atol=2 * U32 * scale)
  np.testing.assert_allclose(flow.to_x0(v, xt, t), x0n, rtol=0, atol=1e-6)
  np.testing.assert_allclose(flow.to_epsilon(v, xt, t), en, rtol=0, atol=1e-6)
  inner = slice(1, 3)  # velocity_from_x0 needs t > 0, velocity_from_epsilon t < 1
  np.testing.assert_allclose(flow.velocity_from_x0(x0[inner], xt[inner], t[inner]), (en - x0n)[inner], atol=1e-5)
  np.testing.assert_allclose(flow.velocity_from_epsilon(eps[inner], xt[inner], t[inner]), (en - x0n)[inner],
                             atol=1e-5)
  # the samplers' general conversions agree on a flow level (alpha = 1 - t, sigma = t)
  a, s = (1 - t).reshape(-1, 1, 1, 1), t.reshape(-1, 1, 1, 1)
  np.testing.assert_allclose(base.to_x0(v, xt, a, s, "flow"), x0n, atol=1e-6)
  np.testing.assert_allclose(base.to_epsilon(v, xt, a, s, "flow"), en, atol=1e-6)
  assert diffusion.check_prediction("flow_prediction") == "flow"
  with pytest.raises(ValueError, match="shape"):
    flow.interpolate(x0, eps, t[:2])


def test_shifts_are_the_closed_forms():
  t = np.linspace(0.0, 1.0, 101)
  for s in (1.0, 3.0, 0.5):
    want = s * t / (1 + (s - 1) * t)
    np.testing.assert_allclose(flow.shift_time(t, s), want, rtol=1e-15, atol=0)
    # the exponential time shift with mu = log s is the same map
    with np.errstate(divide="ignore"):
      np.testing.assert_allclose(flow.time_shift(t, math.log(s)), want, rtol=1e-13, atol=1e-300)
  with np.errstate(divide="ignore"):
    lin = flow.time_shift(t, 0.8, kind="linear")
    np.testing.assert_allclose(lin[1:], 0.8 / (0.8 + (1 / t[1:] - 1)), rtol=1e-15)
    assert lin[0] == 0.0 and lin[-1] == 1.0
  # the same maps on jax arrays (training), within float32 rounding
  tj = jnp.asarray(t[1:], jnp.float32)
  np.testing.assert_allclose(flow.shift_time(tj, 3.0), flow.shift_time(t[1:], 3.0), rtol=8 * U32)
  np.testing.assert_allclose(flow.time_shift(tj, jnp.float32(0.7)), flow.time_shift(t[1:], 0.7), rtol=16 * U32)
  # stretch to terminal: the last level becomes shift_terminal, the first stays 1
  st = flow.stretch_to_terminal(flow.shift_time(np.linspace(1, 0.001, 10), 3.0), 0.1)
  assert st[0] == 1.0 and abs(st[-1] - 0.1) < 1e-15
  with pytest.raises(ValueError, match="time_shift_type"):
    flow.time_shift(t, 0.5, kind="cosine")


def test_dynamic_shift_mu_is_affine_in_the_sequence_length():
  kw = dict(base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15)
  assert abs(flow.dynamic_shift_mu(256, **kw) - 0.5) < 1e-15
  assert abs(flow.dynamic_shift_mu(4096, **kw) - 1.15) < 1e-15
  assert abs(flow.dynamic_shift_mu(1024, **kw) - (0.5 + 0.65 * 768 / 3840)) < 1e-15
  assert abs(flow.dynamic_shift_mu(8192, **kw) - (0.5 + 0.65 * 7936 / 3840)) < 1e-14  # extrapolates


def test_loss_weightings_are_sd3s():
  t = np.array([0.01, 0.2, 0.5, 0.9, 1.0])
  got = {w: np.asarray(flow.loss_weight(jnp.asarray(t, jnp.float32), w)) for w in flow.WEIGHTINGS}
  t32 = t.astype(np.float32).astype(np.float64)
  np.testing.assert_array_equal(got[None], np.ones(5))
  np.testing.assert_allclose(got["sigma_sqrt"], t32 ** -2.0, rtol=4 * U32)
  np.testing.assert_allclose(got["cosmap"], 2 / (np.pi * (1 - 2 * t32 + 2 * t32 ** 2)), rtol=16 * U32)
  with pytest.raises(ValueError, match="weighting"):
    flow.loss_weight(jnp.asarray(t), "snr")


def _moments(f, lo=0.0, hi=1.0, weight=None):
  """Mean, variance and fourth central moment of f(U) (or of f under a density ``weight``) by quadrature."""
  w = weight or (lambda x: 1.0)
  m = integrate.quad(lambda x: f(x) * w(x), lo, hi, limit=200)[0]
  v = integrate.quad(lambda x: (f(x) - m) ** 2 * w(x), lo, hi, limit=200)[0]
  m4 = integrate.quad(lambda x: (f(x) - m) ** 4 * w(x), lo, hi, limit=200)[0]
  return m, v, m4


@pytest.mark.parametrize("density,kw", [("uniform", {}), ("logit_normal", dict(logit_mean=0.3, logit_std=0.8)),
                                        ("mode", dict(mode_scale=1.29))])
def test_timestep_densities_have_their_moments(density, kw, key):
  n = 200_000
  t = np.asarray(flow.sample_t(key, (n,), density=density, **kw), np.float64)
  assert t.dtype == np.float64 and np.all(t > 0) and np.all(t <= 1)
  if density == "uniform":
    m, v, m4 = 0.5, 1 / 12, 1 / 80
  elif density == "logit_normal":
    mu, sd = kw["logit_mean"], kw["logit_std"]
    gauss = lambda z: math.exp(-0.5 * ((z - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))  # noqa: E731
    m, v, m4 = _moments(lambda z: 1 / (1 + math.exp(-z)), mu - 12 * sd, mu + 12 * sd, gauss)
  else:
    s = kw["mode_scale"]
    m, v, m4 = _moments(lambda u: 1 - u - s * (math.cos(math.pi * u / 2) ** 2 - 1 + u))
  # five standard errors of the sample mean and variance
  assert abs(t.mean() - m) < 5 * math.sqrt(v / n)
  assert abs(t.var() - v) < 5 * math.sqrt((m4 - v * v) / n)


def test_mode_density_with_zero_scale_is_uniform(key):
  np.testing.assert_array_equal(flow.sample_t(key, (64,), density="mode", mode_scale=0.0),
                                flow.sample_t(key, (64,), density="uniform"))
  with pytest.raises(ValueError, match="density"):
    flow.sample_t(key, (4,), density="cosmap")


def _toy(x, tt):
  return 0.3 * x - 0.1 + 1e-3 * tt.reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("weighting", flow.WEIGHTINGS)
def test_loss_matches_float64_recomputation(weighting, key):
  x0, noise = _data(key, (5, 4, 4, 2))
  t = jnp.array([0.02, 0.3, 0.5, 0.77, 1.0], jnp.float32)
  got = flow.loss(_toy, x0, key=key, weighting=weighting, t=t, noise=noise, num_train_timesteps=1000)
  x0n, nn = np.asarray(x0, np.float64), np.asarray(noise, np.float64)
  tn = np.asarray(t, np.float64).reshape(-1, 1, 1, 1)
  xt = (1 - tn) * x0n + tn * nn
  err = ((0.3 * xt - 0.1 + tn - (nn - x0n)) ** 2).mean(axis=(1, 2, 3))
  w = {None: np.ones(5), "sigma_sqrt": tn.ravel() ** -2.0,
       "cosmap": 2 / (np.pi * (1 - 2 * tn.ravel() + 2 * tn.ravel() ** 2))}[weighting]
  # float32 sums of 32 O(1) squares per example: a few ulp
  np.testing.assert_allclose(float(got), (w * err).mean(), rtol=1e-5)
  per = flow.loss(_toy, x0, key=key, weighting=weighting, t=t, noise=noise, reduce=False)
  assert per.shape == (5,)
  np.testing.assert_allclose(per, w * err, rtol=1e-5)


def test_loss_draws_shifted_levels_from_the_key(key):
  x0, _ = _data(jax.random.key(3), (6, 2, 2, 1))
  kw = dict(density="logit_normal", logit_mean=0.2, logit_std=1.1, weighting="cosmap", shift=3.0)
  got = flow.loss(_toy, x0, key=key, **kw)
  k_t, k_n = jax.random.split(key)
  t = flow.shift_time(flow.sample_t(k_t, (6,), density="logit_normal", logit_mean=0.2, logit_std=1.1), 3.0)
  want = flow.loss(_toy, x0, key=key, weighting="cosmap", t=t, noise=jax.random.normal(k_n, x0.shape))
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  assert float(got) != float(flow.loss(_toy, x0, key=key, weighting="cosmap"))  # density and shift take effect


def test_loss_is_zero_for_the_exact_velocity(key):
  x0, noise = _data(key)
  assert float(flow.loss(lambda x, tt: noise - x0, x0, key=key, noise=noise)) == 0.0
  with pytest.raises(ValueError, match="shape"):
    flow.loss(lambda x, tt: x[..., :1], x0, key=key)
  with pytest.raises(ValueError, match="shift"):
    flow.loss(_toy, x0, key=key, shift=0.0)


GAUSS_MU, GAUSS_S = 0.7, 0.5


def _gaussian_velocity(x, tt):
  """E[eps - x0 | x_t] for x0 ~ N(mu, s^2) per element: x_t is jointly Gaussian with v."""
  t = (tt / 1000.0).reshape((-1,) + (1,) * (x.ndim - 1))
  var = (1 - t) ** 2 * GAUSS_S ** 2 + t ** 2
  return -GAUSS_MU + (t - (1 - t) * GAUSS_S ** 2) / var * (x - (1 - t) * GAUSS_MU)


def _euler_law(sig: np.ndarray):
  """Exact mean and variance (float64) of flow Euler's output with the exact Gaussian velocity on the
  levels ``sig``: each step is affine in the state."""
  m, v = 0.0, 1.0
  for s, s_next in zip(sig[:-1], sig[1:]):
    var = (1 - s) ** 2 * GAUSS_S ** 2 + s ** 2
    b = (s - (1 - s) * GAUSS_S ** 2) / var
    a = -GAUSS_MU - b * (1 - s) * GAUSS_MU
    k = 1 + (s_next - s) * b
    m, v = k * m + (s_next - s) * a, k * k * v
  return m, v


@pytest.mark.parametrize("n,shift", [(8, 3.0), (64, 1.0)])
def test_flow_euler_on_gaussian_data_has_its_exact_law(n, shift):
  z = jax.random.normal(jax.random.key(1), (4000, 8))
  out = np.asarray(samplers.sample("flow_euler", _gaussian_velocity, None, z, num_steps=n, shift=shift), np.float64)
  _, sig = samplers.flow_sigmas(n, shift=shift)
  m, v = _euler_law(sig.astype(np.float64))
  # 32000 samples: standard errors ~0.003 (mean) and ~0.002 (std)
  assert abs(out.mean() - m) < 0.015 and abs(out.std() - math.sqrt(v)) < 0.01
  # and the law approaches the data distribution as the steps shrink (Euler's bias is O(1/n))
  assert abs(m - GAUSS_MU) < 2.0 / n and abs(math.sqrt(v) - GAUSS_S) < 2.0 / n


@pytest.mark.parametrize("method,opts", [
    ("flow_euler", dict(shift=3.0)), ("flow_euler", dict(stochastic_sampling=True, key=jax.random.key(1))),
    ("flow_heun", dict(use_dynamic_shifting=True, image_seq_len=1024)),
    ("dpm_solver", dict(use_flow_sigmas=True, flow_shift=3.0, prediction="flow_prediction", order=3)),
    ("unipc", dict(use_flow_sigmas=True, flow_shift=3.0, prediction="flow_prediction", order=3))])
def test_flow_samplers_are_one_program_with_float32_state(method, opts):
  traces = []

  def bf16_model(x, t):
    traces.append(1)  # runs only while tracing
    return (0.1 * x * jnp.cos(t.astype(jnp.float32) / 700.0).reshape(-1, 1, 1, 1)).astype(jnp.bfloat16)

  run = jax.jit(lambda z: samplers.sample(method, bf16_model, None, z, num_steps=6, **opts))
  out = run(jnp.ones((1, 4, 4, 2), jnp.bfloat16))
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
  assert len(traces) == 1  # the steps live in one lax.scan
  run(jnp.zeros((1, 4, 4, 2), jnp.bfloat16))
  assert len(traces) == 1 and run._cache_size() == 1
