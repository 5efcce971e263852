"""The forward process, posterior, conversions, losses and ELBO terms against closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from jdiff import diffusion, schedules

SCHED = schedules.linear(1000)


def test_q_sample_is_the_closed_form_and_has_the_right_moments(key):
  x0 = jnp.linspace(-1, 1, 8, dtype=jnp.float32).reshape(1, 2, 2, 2)
  t = jnp.array([637], jnp.int32)
  abar = float(np.prod(1 - np.asarray(SCHED.betas, np.float64)[:638]))
  noise = jax.random.normal(key, (20000, 2, 2, 2))
  xt = diffusion.q_sample(SCHED, jnp.broadcast_to(x0, noise.shape), jnp.full((20000,), 637, jnp.int32), noise)
  np.testing.assert_allclose(xt.mean(0), math.sqrt(abar) * x0[0], atol=0.03)
  np.testing.assert_allclose(xt.var(0), np.full((2, 2, 2), 1 - abar), rtol=0.05)
  one = diffusion.q_sample(SCHED, x0, t, noise[:1])
  np.testing.assert_allclose(one, math.sqrt(abar) * x0 + math.sqrt(1 - abar) * noise[:1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_posterior_matches_bayes_rule_in_float64(t):
  """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): a product of two Gaussians in x_{t-1}."""
  rng = np.random.default_rng(t)
  x0 = rng.standard_normal((3, 4, 4, 1)).astype(np.float32)
  xt = rng.standard_normal((3, 4, 4, 1)).astype(np.float32)
  b = np.asarray(SCHED.betas, np.float64)
  abar = np.cumprod(1 - b)
  prec = 1 / (1 - abar[t - 1]) + (1 - b[t]) / b[t]
  mean = (np.sqrt(abar[t - 1]) * x0 / (1 - abar[t - 1]) + np.sqrt(1 - b[t]) * xt / b[t]) / prec
  m, v, lv = diffusion.q_posterior(SCHED, jnp.asarray(x0), jnp.asarray(xt), jnp.full((3,), t, jnp.int32))
  np.testing.assert_allclose(m, mean, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(v[:, 0, 0, 0], np.full(3, 1 / prec), rtol=2e-5)
  np.testing.assert_allclose(lv[:, 0, 0, 0], np.full(3, np.log(1 / prec)), rtol=2e-5)


@pytest.mark.parametrize("pred", ["epsilon", "sample", "v", "v_prediction"])
def test_prediction_conversions_round_trip(pred, key):
  k1, k2 = jax.random.split(key)
  x0 = jax.random.normal(k1, (4, 3, 3, 2))
  eps = jax.random.normal(k2, (4, 3, 3, 2))
  t = jnp.array([0, 100, 700, 999], jnp.int32)
  a, s = diffusion.q_mean_std(SCHED, t, x0)
  xt = a * x0 + s * eps
  v = a * eps - s * x0
  out = diffusion.target(x0, eps, a, s, pred)
  np.testing.assert_allclose(diffusion.to_x0(out, xt, a, s, pred), x0, atol=2e-3)
  np.testing.assert_allclose(diffusion.to_epsilon(out, xt, a, s, pred), eps, atol=2e-3)
  np.testing.assert_allclose(diffusion.to_v(out, xt, a, s, pred), v, atol=2e-3)
  for dest, want in [("epsilon", eps), ("sample", x0), ("v", v)]:
    back = diffusion.convert(diffusion.convert(out, xt, a, s, source=pred, dest=dest), xt, a, s,
                             source=dest, dest=pred)
    np.testing.assert_allclose(back, out, atol=2e-3)
    np.testing.assert_allclose(diffusion.convert(out, xt, a, s, source=pred, dest=dest), want, atol=2e-3)
  with pytest.raises(ValueError, match="unknown prediction type 'score'"):
    diffusion.to_x0(out, xt, a, s, "score")


@pytest.mark.parametrize("pred", ["epsilon", "v", "sample"])
@pytest.mark.parametrize("weighting", [None, "min_snr"])
def test_loss_matches_float64_recomputation(pred, weighting, key):
  x0 = jax.random.normal(key, (5, 4, 4, 3))
  t = jnp.array([3, 50, 400, 800, 999], jnp.int32)
  noise = jax.random.normal(jax.random.key(7), x0.shape)
  model = lambda x, tt: 0.3 * x - 0.1  # noqa: E731
  got = diffusion.loss(model, SCHED, x0, key=key, prediction=pred, weighting=weighting, min_snr_gamma=5.0, t=t,
                       noise=noise)
  abar = np.cumprod(1 - np.asarray(SCHED.betas, np.float64))[np.asarray(t)].reshape(-1, 1, 1, 1)
  x0n, nn = np.asarray(x0, np.float64), np.asarray(noise, np.float64)
  xt = np.sqrt(abar) * x0n + np.sqrt(1 - abar) * nn
  tgt = {"epsilon": nn, "sample": x0n, "v": np.sqrt(abar) * nn - np.sqrt(1 - abar) * x0n}[pred]
  per = ((0.3 * xt - 0.1 - tgt) ** 2).mean(axis=(1, 2, 3))
  snr = (abar / (1 - abar)).ravel()
  w = np.ones(5) if weighting is None else {
      "epsilon": np.minimum(snr, 5) / snr, "v": np.minimum(snr, 5) / (snr + 1), "sample": np.minimum(snr, 5)}[pred]
  np.testing.assert_allclose(float(got), (per * w).mean(), rtol=1e-4)


@pytest.mark.parametrize("pred", ["epsilon", "v"])
def test_loss_offset_noise_and_input_perturbation(pred, key):
  """Offset noise is one draw per example and channel added to the noise (which stays the target);
  input perturbation changes only the noise x_t is made from. The draws are those of the documented
  keys (``fold_in(key, 1)`` and ``fold_in(key, 2)``); the rest is recomputed in float64."""
  x0 = jax.random.normal(key, (3, 4, 4, 2))
  t = jnp.array([10, 500, 990], jnp.int32)
  noise = jax.random.normal(jax.random.key(7), x0.shape)
  model = lambda x, tt: 0.3 * x - 0.1  # noqa: E731
  got = diffusion.loss(model, SCHED, x0, key=key, prediction=pred, t=t, noise=noise, noise_offset=0.5,
                       input_perturbation=0.5)
  offset = 0.5 * np.asarray(jax.random.normal(jax.random.fold_in(key, 1), (3, 1, 1, 2)), np.float64)
  extra = 0.5 * np.asarray(jax.random.normal(jax.random.fold_in(key, 2), x0.shape), np.float64)
  abar = np.cumprod(1 - np.asarray(SCHED.betas, np.float64))[np.asarray(t)].reshape(-1, 1, 1, 1)
  x0n = np.asarray(x0, np.float64)
  nn = np.asarray(noise, np.float64) + offset
  xt = np.sqrt(abar) * x0n + np.sqrt(1 - abar) * (nn + extra)
  tgt = nn if pred == "epsilon" else np.sqrt(abar) * nn - np.sqrt(1 - abar) * x0n
  want = ((0.3 * xt - 0.1 - tgt) ** 2).mean()
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # Both options off: exactly the plain loss.
  plain = diffusion.loss(model, SCHED, x0, key=key, prediction=pred, t=t, noise=noise)
  assert float(diffusion.loss(model, SCHED, x0, key=key, prediction=pred, t=t, noise=noise, noise_offset=0.0,
                              input_perturbation=0.0)) == float(plain)
  assert abs(float(plain) - want) > 1e-2 * want  # the options change the loss (far beyond rtol)


def test_loss_is_zero_for_the_exact_predictor(key):
  x0 = jax.random.normal(key, (4, 2, 2, 1))
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  got = diffusion.loss(lambda x, t: noise, SCHED, x0, key=key, noise=noise)
  assert float(got) == 0.0
  with pytest.raises(ValueError, match="model output shape"):
    diffusion.loss(lambda x, t: x[..., :1], SCHED, jnp.zeros((2, 2, 2, 3)), key=key)
  with pytest.raises(ValueError, match="integer timesteps"):
    diffusion.q_sample(SCHED, x0, jnp.zeros((4,)), noise)


def test_normal_kl_matches_numerical_integration():
  m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.2, math.log(1.7)
  p = stats.norm(m1, math.exp(0.5 * lv1))
  q = stats.norm(m2, math.exp(0.5 * lv2))
  num, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), -20, 20)
  assert float(diffusion.normal_kl(m1, lv1, m2, lv2)) == pytest.approx(num, rel=1e-5)


def test_discretized_decoder_likelihood_matches_cdf_differences():
  x = jnp.array([-1.0, -0.5, 0.0, 0.2509804, 1.0])
  mean = jnp.array([-0.9, -0.45, 0.3, 0.25, 0.7])
  log_scale = jnp.log(jnp.array([0.1, 0.02, 0.5, 0.001, 0.2]))
  got = np.asarray(diffusion.discretized_gaussian_log_likelihood(x, mean, log_scale))
  xs, ms, ss = np.asarray(x, np.float64), np.asarray(mean, np.float64), np.exp(np.asarray(log_scale, np.float64))
  h = 1 / 255
  upper = np.where(xs > 1 - 1e-3, np.inf, xs + h)
  lower = np.where(xs < -1 + 1e-3, -np.inf, xs - h)
  want = np.log(stats.norm.cdf(upper, ms, ss) - stats.norm.cdf(lower, ms, ss))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # the probabilities of all 256 levels sum to one
  levels = jnp.linspace(-1, 1, 256)
  lp = diffusion.discretized_gaussian_log_likelihood(levels, jnp.full(256, 0.137), jnp.full(256, math.log(0.3)))
  assert float(jnp.exp(lp).sum()) == pytest.approx(1.0, abs=1e-4)


def test_prior_bpd_closed_form():
  x0 = jnp.array([[0.5, -1.0, 0.0]])
  s = schedules.linear(1000)
  abar = float(np.prod(1 - np.asarray(s.betas, np.float64)))
  want = np.mean(0.5 * ((1 - abar) + abar * np.array([0.25, 1.0, 0.0]) - 1 - np.log(1 - abar))) / math.log(2)
  assert float(diffusion.prior_bpd(s, x0)[0]) == pytest.approx(want, rel=1e-3, abs=1e-9)


def test_vb_terms_vanish_for_the_exact_predictor_and_bits_per_dim_adds_up(key):
  """With eps_hat = the true noise, p(x_{t-1}|x_t) has the true posterior mean and (fixed_small)
  variance, so every KL term is 0; the total is the prior plus the decoder NLL."""
  s = schedules.linear(20, 1e-3, 0.2)
  x0 = jnp.round(jax.random.uniform(key, (3, 2, 2, 1), minval=-1, maxval=1) * 127.5) / 127.5
  noise = jax.random.normal(jax.random.key(4), x0.shape)
  t = jnp.array([1, 7, 19], jnp.int32)
  xt = diffusion.q_sample(s, x0, t, noise)
  kl = diffusion.vb_term_bpd(s, noise, x0, xt, t)
  np.testing.assert_allclose(kl, np.zeros(3), atol=1e-5)

  def exact_eps(x, tt):  # exact only for the fixed draws below, used to check the bookkeeping
    a, sg = diffusion.q_mean_std(s, tt, x)
    return (x - a * x0) / sg

  out = diffusion.bits_per_dim(exact_eps, s, x0, key=key)
  np.testing.assert_allclose(out["terms"][1:], np.zeros((19, 3)), atol=1e-4)
  np.testing.assert_allclose(out["total"], out["prior"] + out["terms"][0], rtol=1e-5)
  assert np.all(np.asarray(out["terms"][0]) > 0)


def test_drop_condition(key):
  cond = {"emb": jnp.ones((10000, 3, 2)), "label": jnp.arange(10000)}
  null = {"emb": jnp.zeros((3, 2)), "label": jnp.array(-1)}
  same = diffusion.drop_condition(cond, null, 0.0, key=key)
  np.testing.assert_array_equal(same["label"], cond["label"])
  allnull = diffusion.drop_condition(cond, null, 1.0, key=key)
  assert np.all(np.asarray(allnull["label"]) == -1) and float(allnull["emb"].sum()) == 0
  out = diffusion.drop_condition(cond, null, 0.3, key=key)
  dropped = np.asarray(out["label"]) == -1
  assert abs(dropped.mean() - 0.3) < 0.02
  np.testing.assert_array_equal(np.asarray(out["emb"]).sum((1, 2)) == 0, dropped)  # same decision per leaf
