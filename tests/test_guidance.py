import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import guidance


def _apply(calls):
  def apply(x, t, c):
    calls.append(x.shape[0])
    return jnp.tanh(x * c["emb"].reshape(-1, 1, 1, 1) + t.reshape(-1, 1, 1, 1) / 100.0)
  return apply


def test_cfg_is_one_doubled_call_and_mixes(key):
  calls = []
  apply = _apply(calls)
  x = jax.random.normal(key, (3, 4, 4, 2))
  t = jnp.array([10, 20, 30])
  cond = {"emb": jnp.array([1.0, 2.0, 3.0])}
  uncond = {"emb": jnp.array([0.5])}  # batch 1: broadcast to 3
  fn = guidance.cfg(apply, cond, uncond, 4.0)
  got = fn(x, t)
  assert calls == [6]
  c = np.asarray(apply(x, t, cond))
  u = np.asarray(apply(x, t, {"emb": jnp.full((3,), 0.5)}))
  np.testing.assert_allclose(got, u + 4.0 * (c - u), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(guidance.cfg(apply, cond, uncond, 1.0)(x, t), c, rtol=1e-6, atol=1e-6)
  per_example = guidance.cfg(apply, cond, uncond, jnp.array([1.0, 2.0, 3.0]))(x, t)
  np.testing.assert_allclose(per_example[2], (u + 3.0 * (c - u))[2], rtol=1e-5, atol=1e-6)


def test_guidance_rescale_matches_definition(key):
  apply = _apply([])
  x = jax.random.normal(key, (2, 5, 5, 3))
  t = jnp.array([1, 2])
  cond, uncond = {"emb": jnp.array([2.0, -1.0])}, {"emb": jnp.array([0.1, 0.1])}
  got = np.asarray(guidance.cfg(apply, cond, uncond, 6.0, guidance_rescale=0.7)(x, t), np.float64)
  c = np.asarray(apply(x, t, cond), np.float64)
  u = np.asarray(apply(x, t, uncond), np.float64)
  g = u + 6.0 * (c - u)
  # Lin et al. eq. 15-16 with unbiased standard deviations per example (the ratio is the same).
  sc = c.reshape(2, -1).std(1, ddof=1).reshape(2, 1, 1, 1)
  sg = g.reshape(2, -1).std(1, ddof=1).reshape(2, 1, 1, 1)
  want = 0.7 * g * sc / sg + 0.3 * g
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_cfg_errors():
  apply = _apply([])
  fn = guidance.cfg(apply, {"emb": jnp.ones((2,))}, {"emb": jnp.zeros((2,))}, 3.0)
  with pytest.raises(ValueError, match="batch 3"):
    fn(jnp.zeros((3, 2, 2, 1)), jnp.zeros((3,)))
  with pytest.raises(ValueError, match="does not match cond leaf"):
    guidance.cfg(apply, {"emb": jnp.ones((2, 4))}, {"emb": jnp.zeros((2, 2, 4, 1))}, 3.0)


def test_cfg_guides_only_the_prediction_channels():
  def apply(x, t, c):
    return jnp.concatenate([x * c, x * 0 + c], axis=-1)
  fn = guidance.cfg(apply, jnp.array([[[[2.0]]]]), jnp.array([[[[0.0]]]]), 3.0, out_channels=1)
  out = fn(jnp.ones((1, 1, 1, 1)), jnp.zeros((1,)))
  np.testing.assert_allclose(out[..., 0], 6.0)
  np.testing.assert_allclose(out[..., 1], 2.0)  # the variance channel comes from the cond branch
