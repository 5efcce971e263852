"""DDIM/DDPM against exact answers on Gaussian data, compile-once behaviour, and argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import diffusion, guidance, samplers, schedules

SCHED = schedules.scaled_linear(1000, 0.00085, 0.012)
MU, S = 0.7, 0.4  # data x0 ~ N(MU, S^2 I)


def gaussian_predictor(schedule, pred="epsilon"):
  """The exact E[eps | x_t] (converted to ``pred``) for x0 ~ N(MU, S^2 I)."""

  def fn(x, t):
    a, s = diffusion.q_mean_std(schedule, t, x)
    eps = s * (x - a * MU) / (a * a * S * S + s * s)
    return diffusion.convert(eps, x, a, s, source="epsilon", dest=pred)

  return fn


def exact_flow_map(x_T, abar_start):
  """The probability-flow ODE keeps z = (x - a mu)/sqrt(a^2 s^2 + sigma^2) constant."""
  a = np.sqrt(abar_start)
  z = (x_T - a * MU) / np.sqrt(a * a * S * S + (1 - abar_start))
  return MU + S * z


@pytest.mark.parametrize("pred,grid", [("epsilon", False), ("v", False), ("epsilon", True)])
def test_ddim_converges_to_the_exact_flow_map(pred, grid):
  x_T = np.asarray(jax.random.normal(jax.random.key(0), (64, 8)), np.float64)
  abar_T = float(np.asarray(SCHED.alphas_cumprod)[999])
  want = exact_flow_map(x_T, abar_T)
  errors = []
  # With prev_from_grid any num_steps is consistent; diffusers' rule needs num_steps to divide T.
  for n in ((10, 30, 100, 300, 1000) if grid else (10, 25, 100, 250, 1000)):
    got = samplers.ddim(gaussian_predictor(SCHED, pred), SCHED, jnp.asarray(x_T, jnp.float32), num_steps=n,
                        prediction=pred, timestep_spacing="trailing", prev_from_grid=grid)
    errors.append(float(np.max(np.abs(np.asarray(got) - want))))
  assert all(b < a for a, b in zip(errors, errors[1:])), errors
  # DDIM is first order in the step size: the error falls roughly in proportion to 1/num_steps.
  assert errors[-1] < 0.012 and errors[-1] < errors[0] / 25, errors


def _moment_errors(x):
  """|mean - MU| and |std - S| of the samples."""
  x = np.asarray(x)
  return abs(float(x.mean()) - MU), abs(float(x.std()) - S)


def test_ddpm_full_chain_samples_the_data_distribution():
  x_T = jax.random.normal(jax.random.key(1), (4096, 4))
  dm, ds = _moment_errors(samplers.ddpm(gaussian_predictor(SCHED), SCHED, x_T, key=jax.random.key(2)))
  assert dm < 0.02 and ds < 0.02, (dm, ds)


def test_ddim_eta_one_samples_the_data_distribution():
  x_T = jax.random.normal(jax.random.key(3), (4096, 4))
  out = samplers.ddim(gaussian_predictor(SCHED), SCHED, x_T, num_steps=1000, eta=1.0, key=jax.random.key(4),
                      timestep_spacing="trailing")
  dm, ds = _moment_errors(out)
  assert dm < 0.02 and ds < 0.02, (dm, ds)


def test_jit_compiles_once():
  traces = []

  def model(x, t):
    traces.append(1)
    return gaussian_predictor(SCHED)(x, t)

  fn = jax.jit(lambda z, k: samplers.sample("ddim", model, SCHED, z, num_steps=10, eta=0.5, key=k))
  a = fn(jnp.ones((2, 4, 4, 3)), jax.random.key(0))
  b = fn(jnp.zeros((2, 4, 4, 3)), jax.random.key(1))
  assert len(traces) == 1  # the scan body traced once; the second call hit the compile cache
  assert fn._cache_size() == 1
  assert not np.allclose(a, b)
  d = jax.jit(lambda z, k: samplers.ddpm(model, SCHED, z, num_steps=20, key=k))
  d(jnp.ones((2, 3)), jax.random.key(0))
  d(jnp.ones((2, 3)), jax.random.key(1))
  assert d._cache_size() == 1 and len(traces) == 2


def test_sampler_with_cfg_and_bfloat16_model_keeps_float32_state():
  def apply(x, t, c):
    return (gaussian_predictor(SCHED)(x, t) * c).astype(jnp.bfloat16)

  fn = guidance.cfg(apply, jnp.ones((3, 1)), jnp.zeros((3, 1)), 1.0)
  out = samplers.sample("ddim", fn, SCHED, jax.random.normal(jax.random.key(0), (3, 2)), num_steps=10)
  assert out.dtype == jnp.float32 and np.all(np.isfinite(out))


def test_registry_and_errors():
  assert {"ddim", "ddpm"} <= set(samplers.available())
  m = gaussian_predictor(SCHED)
  x = jnp.zeros((1, 2))
  with pytest.raises(ValueError, match="unknown sampler 'nope'"):
    samplers.sample("nope", m, SCHED, x, num_steps=2)
  with pytest.raises(ValueError, match="timestep_spacing 'middle'"):
    samplers.ddim(m, SCHED, x, num_steps=2, timestep_spacing="middle")
  with pytest.raises(ValueError, match="exceeds"):
    samplers.ddim(m, SCHED, x, num_steps=2000)
  with pytest.raises(ValueError, match="outside"):
    samplers.ddim(m, SCHED, x, num_steps=1000, steps_offset=1)
  with pytest.raises(ValueError, match="pass key"):
    samplers.ddim(m, SCHED, x, num_steps=2, eta=1.0)
  with pytest.raises(ValueError, match="pass key"):
    samplers.ddpm(m, SCHED, x, num_steps=2)
  with pytest.raises(ValueError, match="variance_type"):
    samplers.ddpm(m, SCHED, x, num_steps=2, key=jax.random.key(0), variance_type="fixed_large_log")
  with pytest.raises(ValueError, match="needs 4 output channels"):
    samplers.ddpm(m, SCHED, x, num_steps=2, key=jax.random.key(0), variance_type="learned")


def test_spaced_timesteps_match_diffusers_grids():
  assert samplers.spaced_timesteps(1000, 10, "leading", 1).tolist() == [901, 801, 701, 601, 501, 401, 301, 201,
                                                                           101, 1]
  assert samplers.spaced_timesteps(1000, 10, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299,
                                                                        199, 99]
  assert samplers.spaced_timesteps(1000, 4, "linspace").tolist() == [999, 666, 333, 0]


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_start_step_continues_the_same_chain(method):
  """Running k steps, then the rest with start_step=k, equals one uninterrupted run."""
  m = gaussian_predictor(SCHED)
  x_T = jax.random.normal(jax.random.key(5), (3, 4))
  key = jax.random.key(6)
  full, traj = samplers.sample(method, m, SCHED, x_T, num_steps=10, key=key, return_trajectory=True)
  # The continuation draws its own per-step keys; for ddim (eta=0) no noise is used at all.
  if method == "ddim":
    rest = samplers.ddim(m, SCHED, traj[3], num_steps=10, start_step=4)
    np.testing.assert_allclose(rest, full, rtol=1e-6, atol=1e-6)
  else:
    rest, rest_traj = samplers.ddpm(m, SCHED, traj[3], num_steps=10, start_step=4, key=key, return_trajectory=True)
    assert rest_traj.shape == (6, 3, 4)
  with pytest.raises(ValueError, match="start_step"):
    samplers.sample(method, m, SCHED, x_T, num_steps=10, key=key, start_step=10)
