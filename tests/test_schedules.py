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


U32 = 2.0 ** -24  # unit roundoff of float32


def rescaled_reference(betas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Zero-terminal-SNR rescaling recomputed in float64, with a first-order bound on float32's error.

  The input is the float32 ``fl(1 - beta)`` both implementations start from (an IEEE subtraction, the
  same numbers on every CPU). From there a float32 implementation rounds: the cumulative product once
  (PyTorch and jdiff accumulate it in float64), the sqrt, the shift ``s_j - s_L``, the scale by ``k``,
  the square (``pow``: within one ulp), the ratio of neighbours and ``1 - alpha``. The shift cancels
  catastrophically near the end, where ``s_j`` approaches ``s_L``: the bound carries that condition
  number, ``(s_j + s_L) / (s_j - s_L)``, which is why the last betas move by ~1e-5 between machines
  (vectorised sqrt/pow/division kernels round differently) while the first ones agree to an ulp.

  Returns the float64 betas and alphas_cumprod, and the bounds on a float32 implementation's absolute
  error in each.
  """
  alphas = (np.float32(1) - betas.astype(np.float32)).astype(np.float64)
  s = np.sqrt(np.cumprod(alphas))
  first, last = s[0], s[-1]
  d = s - last
  a = (d * (first / (first - last))) ** 2
  alpha = np.concatenate([a[:1], a[1:] / a[:-1]])
  beta = 1.0 - alpha
  err_s = 1.5 * U32  # the product's rounding, halved by the sqrt, plus the sqrt's own
  with np.errstate(divide="ignore"):
    err_d = err_s * (s + last) / np.abs(d) + 2 * U32  # shift (conditioned) + its rounding + scale by k
  err_a = 2 * err_d + 2 * U32  # square (one ulp)
  err_k = 2 * err_s + 3 * U32  # k = s_0 / (s_0 - s_L): only alpha_0 keeps it; it cancels in the ratios
  err_alpha = np.concatenate([[err_a[0] + 2 * err_k], err_a[1:] + err_a[:-1] + U32])
  with np.errstate(invalid="ignore"):  # 0 * inf at L, set next
    bound_beta = alpha * err_alpha + U32 * beta
  bound_beta[-1] = 0.0  # alpha_L = 0 / a_{L-1} is exactly 0 whatever the rounding
  # alphas_cumprod: the float64 product of fl(1 - beta') rounded once; each factor carries its beta's
  # error and one rounding.
  abar = np.cumprod(alpha)
  with np.errstate(divide="ignore", invalid="ignore"):
    rel_factor = np.where(alpha > 0, (bound_beta + U32 * alpha) / alpha, 0.0)
  bound_abar = abar * (np.cumsum(rel_factor) + U32)
  return beta, abar, bound_beta, bound_abar


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_schedule_matches_diffusers(name, rescale):
  kw, make = CASES[name]
  ref = diffusers.DDPMScheduler(num_train_timesteps=1000, rescale_betas_zero_snr=rescale, **kw)
  s = make(rescale)
  betas, abar = np.asarray(s.betas, np.float64), np.asarray(s.alphas_cumprod, np.float64)
  ref_betas, ref_abar = ref.betas.numpy().astype(np.float64), ref.alphas_cumprod.numpy().astype(np.float64)
  if not rescale:
    if name != "sigmoid":  # same float32 operations in the same order: bit for bit
      np.testing.assert_array_equal(betas, ref_betas)
      np.testing.assert_array_equal(abar, ref_abar)
    else:
      # sigmoid(x) from a vectorised exp is within 2 ulp (4u relative) on either side; scaled by
      # (end - start), plus the rounding of the product and the sum.
      tol = 2 * (4 * U32 * (0.02 - 1e-4) + 2 * U32 * ref_betas)
      assert np.all(np.abs(betas - ref_betas) <= tol)
      tol_abar = ref_abar * (np.cumsum(tol / (1 - ref_betas)) + 2 * U32)
      assert np.all(np.abs(abar - ref_abar) <= tol_abar)
    return
  # Rescaled: both float32 implementations against the float64 recomputation from the same input.
  beta64, abar64, bound_beta, bound_abar = rescaled_reference(np.asarray(make(False).betas))
  assert np.all(np.abs(betas - beta64) <= bound_beta), np.max(np.abs(betas - beta64) - bound_beta)
  assert np.all(np.abs(abar - abar64) <= bound_abar), np.max(np.abs(abar - abar64) - bound_abar)
  # diffusers obeys the same bound, so the two differ by at most twice it.
  assert np.all(np.abs(betas - ref_betas) <= 2 * bound_beta)
  assert np.all(np.abs(abar - ref_abar) <= 2 * bound_abar)
  assert float(s.alphas_cumprod[-1]) == 0.0
  assert float(schedules.snr(s, 999)) == 0.0


def test_rescale_bound_is_tight():
  """The error bound of the rescaled schedules is a bound, not a blanket: float32 computations reach a
  sizeable fraction of it, and a perturbation of a few ulps in the last sqrt(alpha-bar) exceeds it."""
  b32 = np.asarray(schedules.scaled_linear(1000, 0.00085, 0.012).betas)
  beta64, _, bound, _ = rescaled_reference(b32)
  got = np.asarray(schedules.scaled_linear(1000, 0.00085, 0.012, rescale_zero_snr=True).betas, np.float64)
  assert np.max(np.abs(got - beta64)[:-1] / bound[:-1]) > 0.1
  # Four ulps (8u relative) on one sqrt(alpha-bar) near the end, where the bound allows 1.5u each.
  alphas = (np.float32(1) - b32).astype(np.float64)
  s = np.sqrt(np.cumprod(alphas))
  s_bad = s.copy()
  s_bad[990] *= 1 + 8 * U32
  d = s_bad - s_bad[-1]
  a = (d * (s_bad[0] / (s_bad[0] - s_bad[-1]))) ** 2
  beta_bad = 1 - np.concatenate([a[:1], a[1:] / a[:-1]])
  assert np.any(np.abs(beta_bad - beta64)[:-1] > bound[:-1])


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
