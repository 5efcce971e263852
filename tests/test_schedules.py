"""Schedules against diffusers' betas/alphas_cumprod and a float64 recomputation of derived terms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import schedules

diffusers = pytest.importorskip("diffusers")

CASES = {
    "linear": (dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
               lambda z: schedules.linear(1000, 1e-4, 0.02, rescale_zero_snr=z)),
    "scaled_linear": (dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
                      lambda z: schedules.scaled_linear(1000, 0.00085, 0.012, rescale_zero_snr=z)),
    "squaredcos_cap_v2": (dict(beta_schedule="squaredcos_cap_v2"),
                          lambda z: schedules.cosine(1000, rescale_zero_snr=z)),
    "sigmoid": (dict(beta_schedule="sigmoid", beta_start=1e-4, beta_end=0.02),
                lambda z: schedules.sigmoid(1000, 1e-4, 0.02, rescale_zero_snr=z)),
}


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_schedule_matches_diffusers(name, rescale):
  kw, make = CASES[name]
  ref = diffusers.DDPMScheduler(num_train_timesteps=1000, rescale_betas_zero_snr=rescale, **kw)
  s = make(rescale)
  np.testing.assert_allclose(np.asarray(s.betas), ref.betas.numpy(), rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(s.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
  if not rescale and name != "sigmoid":  # same float32 values bit for bit
    np.testing.assert_array_equal(np.asarray(s.betas), ref.betas.numpy())
    np.testing.assert_array_equal(np.asarray(s.alphas_cumprod), ref.alphas_cumprod.numpy())
  if rescale:
    assert float(s.alphas_cumprod[-1]) == 0.0
    assert float(schedules.snr(s, 999)) == 0.0


def test_make_by_name_and_errors():
  np.testing.assert_array_equal(schedules.make("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012).betas,
                                schedules.scaled_linear().betas)
  with pytest.raises(ValueError, match="unknown beta schedule 'nope'"):
    schedules.make("nope")
  with pytest.raises(ValueError, match="num_timesteps"):
    schedules.linear(0)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    schedules.from_betas(np.array([0.1, 1.5]))


def test_derived_terms_match_float64():
  s = schedules.cosine(200)
  b = np.asarray(s.betas, np.float64)
  abar = np.cumprod(1 - b)
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  post_var = b * (1 - abar_prev) / (1 - abar)
  np.testing.assert_allclose(s.alphas_cumprod, abar, rtol=2e-6)
  np.testing.assert_allclose(s.posterior_variance, post_var, rtol=1e-5, atol=1e-12)
  np.testing.assert_allclose(s.posterior_log_variance_clipped[1:], np.log(post_var[1:]), rtol=1e-5)
  assert float(s.posterior_log_variance_clipped[0]) == pytest.approx(np.log(post_var[1]), rel=1e-5)
  np.testing.assert_allclose(s.posterior_mean_coef1, b * np.sqrt(abar_prev) / (1 - abar), rtol=1e-5)
  np.testing.assert_allclose(s.posterior_mean_coef2, (1 - abar_prev) * np.sqrt(1 - b) / (1 - abar), rtol=1e-5)
  np.testing.assert_allclose(schedules.snr(s), abar / (1 - abar), rtol=2e-5)
  np.testing.assert_allclose(schedules.log_snr(s), np.log(abar / (1 - abar)), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(schedules.sigmas(s), np.sqrt((1 - abar) / abar), rtol=2e-5)
  np.testing.assert_allclose(schedules.lambdas(s), 0.5 * np.log(abar / (1 - abar)), rtol=1e-4, atol=1e-5)


def test_constructors_are_jit_safe():
  """Traced endpoints take the float32 path and agree with the concrete (diffusers-exact) one."""
  traced = jax.jit(lambda a, b: schedules.scaled_linear(1000, a, b, rescale_zero_snr=True))(0.00085, 0.012)
  concrete = schedules.scaled_linear(1000, 0.00085, 0.012, rescale_zero_snr=True)
  np.testing.assert_allclose(traced.alphas_cumprod, concrete.alphas_cumprod, rtol=0, atol=2e-5)
  c = jax.jit(lambda s: schedules.cosine(100, s=s))(0.008)
  np.testing.assert_allclose(c.betas, schedules.cosine(100).betas, rtol=1e-4, atol=1e-6)


def test_schedule_is_a_pytree():
  s = schedules.linear(10)
  leaves = jax.tree.leaves(s)
  assert len(leaves) == 10 and all(l.shape == (10,) and l.dtype == jnp.float32 for l in leaves)
  doubled = jax.tree.map(lambda x: 2 * x, s)
  np.testing.assert_allclose(doubled.betas, 2 * np.asarray(s.betas))
