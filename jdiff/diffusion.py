"""The forward process, its posterior, prediction conversions and training losses.

Everything here is a pure function of a :class:`jdiff.schedules.Schedule`, arrays and PRNG keys.
Arrays are NHWC (any trailing shape works); ``t`` is an int array of shape [B].

Prediction types: a network may predict the noise ``"epsilon"``, the clean sample ``"sample"``
(x0) or the velocity ``"v"`` = alpha_t * eps - sigma_t * x0 (Salimans & Ho, 2022), where
x_t = alpha_t * x0 + sigma_t * eps with alpha_t = sqrt(alpha-bar_t), sigma_t = sqrt(1 - alpha-bar_t).
:func:`to_x0`, :func:`to_epsilon` and :func:`to_v` are the only place in jdiff where one is turned
into another; samplers and losses never branch on the parameterisation themselves.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jdiff.schedules import Schedule

__all__ = [
    "PREDICTIONS",
    "check_prediction",
    "broadcast_to",
    "q_sample",
    "q_mean_std",
    "q_posterior",
    "to_x0",
    "to_epsilon",
    "to_v",
    "convert",
    "target",
    "p_mean_variance",
    "loss",
    "loss_weight",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
    "prior_bpd",
    "vb_term_bpd",
    "bits_per_dim",
    "drop_condition",
]

PREDICTIONS = ("epsilon", "sample", "v")
FLOW = "flow"  # a rectified-flow velocity (jdiff.flow); bundles carry it, the functions below refuse it
_ALIASES = {"v_prediction": "v", "x0": "sample", "eps": "epsilon", "flow_prediction": FLOW}
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def check_prediction(prediction: str, *, flow: bool = True) -> str:
  """Returns the canonical name of a prediction type (diffusers' ``v_prediction`` is accepted).

  With ``flow`` (the default) the rectified-flow velocity ``"flow"`` (diffusers' ``flow_prediction``,
  :mod:`jdiff.flow`) is a known name too; the variance-preserving conversions and losses of this module
  check with ``flow=False``.
  """
  prediction = _ALIASES.get(prediction, prediction)
  if prediction == FLOW and not flow:
    raise ValueError("prediction 'flow' is a rectified-flow velocity: train it with jdiff.flow.loss and sample "
                     "it with the flow samplers (flow_euler, flow_heun)")
  if prediction not in PREDICTIONS and prediction != FLOW:
    raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTIONS + (FLOW,)}")
  return prediction


def broadcast_to(coef: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes per-example coefficients [B] (or a scalar) to broadcast against x [B, ...]."""
  coef = jnp.asarray(coef)
  if coef.ndim == 0:
    return coef
  if coef.ndim != 1 or coef.shape[0] != x.shape[0]:
    raise ValueError(f"per-example coefficient of shape {coef.shape} does not match batch of {x.shape}")
  return coef.reshape(coef.shape + (1,) * (x.ndim - 1))


def _check_t(schedule: Schedule, x: jax.Array, t: jax.Array) -> jax.Array:
  t = jnp.asarray(t)
  if t.ndim != 1 or t.shape[0] != x.shape[0]:
    raise ValueError(f"t must have shape [batch]={x.shape[:1]}, got {t.shape}")
  if not jnp.issubdtype(t.dtype, jnp.integer):
    raise ValueError(f"t must be integer timesteps in [0, {schedule.num_timesteps}), got dtype {t.dtype}")
  return t


def q_mean_std(schedule: Schedule, t: jax.Array, like: jax.Array) -> tuple[jax.Array, jax.Array]:
  """alpha_t = sqrt(alpha-bar_t) and sigma_t = sqrt(1 - alpha-bar_t), shaped to broadcast with ``like``."""
  return (broadcast_to(schedule.sqrt_alphas_cumprod[t], like),
          broadcast_to(schedule.sqrt_one_minus_alphas_cumprod[t], like))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """Samples q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I) with the given noise.

  Args:
    schedule: the noise schedule.
    x0: clean data [B, ...].
    t: int timesteps [B].
    noise: standard normal noise, same shape as x0.

  Returns:
    x_t, same shape and dtype as x0.
  """
  t = _check_t(schedule, x0, t)
  if noise.shape != x0.shape:
    raise ValueError(f"noise shape {noise.shape} != x0 shape {x0.shape}")
  a, s = q_mean_std(schedule, t, x0)
  return (a * x0 + s * noise).astype(x0.dtype)


def q_posterior(schedule: Schedule, x0: jax.Array, x_t: jax.Array,
                t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mean, variance and (clipped) log variance of q(x_{t-1} | x_t, x_0).

  mean = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t,
  variance = (1 - abar_{t-1}) / (1 - abar_t) beta_t. At t = 0 the variance is 0 and its log is
  clipped to the value at t = 1. Variance and log variance are shaped [B, 1, ..., 1].
  """
  t = _check_t(schedule, x_t, t)
  c1 = broadcast_to(schedule.posterior_mean_coef1[t], x_t)
  c2 = broadcast_to(schedule.posterior_mean_coef2[t], x_t)
  mean = c1 * x0 + c2 * x_t
  var = broadcast_to(schedule.posterior_variance[t], x_t)
  log_var = broadcast_to(schedule.posterior_log_variance_clipped[t], x_t)
  return mean, var, log_var


# ----------------------------------------------------------------------------- conversions


def to_x0(output: jax.Array, x_t: jax.Array, alpha: jax.Array, sigma: jax.Array,
          prediction: str) -> jax.Array:
  """The x0 implied by a network ``output`` of the given prediction type at x_t = alpha x0 + sigma eps."""
  prediction = check_prediction(prediction, flow=False)
  if prediction == "epsilon":
    return (x_t - sigma * output) / alpha
  if prediction == "sample":
    return output
  return alpha * x_t - sigma * output


def to_epsilon(output: jax.Array, x_t: jax.Array, alpha: jax.Array, sigma: jax.Array,
               prediction: str) -> jax.Array:
  """The noise implied by a network ``output`` of the given prediction type."""
  prediction = check_prediction(prediction, flow=False)
  if prediction == "epsilon":
    return output
  if prediction == "sample":
    return (x_t - alpha * output) / sigma
  return alpha * output + sigma * x_t


def to_v(output: jax.Array, x_t: jax.Array, alpha: jax.Array, sigma: jax.Array,
         prediction: str) -> jax.Array:
  """The velocity v = alpha eps - sigma x0 implied by a network ``output``."""
  prediction = check_prediction(prediction, flow=False)
  if prediction == "v":
    return output
  eps = to_epsilon(output, x_t, alpha, sigma, prediction)
  x0 = to_x0(output, x_t, alpha, sigma, prediction)
  return alpha * eps - sigma * x0


def convert(output: jax.Array, x_t: jax.Array, alpha: jax.Array, sigma: jax.Array, *,
            source: str, dest: str) -> jax.Array:
  """Converts a prediction from type ``source`` to type ``dest``."""
  dest = check_prediction(dest, flow=False)
  fn = {"epsilon": to_epsilon, "sample": to_x0, "v": to_v}[dest]
  return fn(output, x_t, alpha, sigma, source)


def target(x0: jax.Array, noise: jax.Array, alpha: jax.Array, sigma: jax.Array,
           prediction: str) -> jax.Array:
  """The regression target of a network with the given prediction type."""
  prediction = check_prediction(prediction, flow=False)
  if prediction == "epsilon":
    return noise
  if prediction == "sample":
    return x0
  return alpha * noise - sigma * x0


# ----------------------------------------------------------------------------- losses


def loss_weight(schedule: Schedule, t: jax.Array, *, prediction: str, weighting: str | None = None,
                min_snr_gamma: float = 5.0) -> jax.Array:
  """Per-example loss weights [B] that turn an MSE on ``prediction`` into the chosen weighting.

  ``weighting=None`` weights every timestep equally (L_simple when predicting epsilon).
  ``"min_snr"`` is Hang et al.'s Min-SNR-gamma: the effective weight on the x0-error is
  min(SNR, gamma); expressed on the network's own target this is min(SNR, gamma)/SNR for epsilon,
  min(SNR, gamma)/(SNR + 1) for v, and min(SNR, gamma) for x0.
  """
  prediction = check_prediction(prediction, flow=False)
  if weighting is None:
    return jnp.ones(t.shape, jnp.float32)
  if weighting != "min_snr":
    raise ValueError(f"unknown loss weighting {weighting!r}; expected None or 'min_snr'")
  abar = schedule.alphas_cumprod[t]
  snr = abar / (1.0 - abar)
  clipped = jnp.minimum(snr, min_snr_gamma)
  if prediction == "epsilon":
    return clipped / snr
  if prediction == "v":
    return clipped / (snr + 1.0)
  return clipped


def loss(model_fn: ModelFn, schedule: Schedule, x0: jax.Array, *, key: jax.Array,
         prediction: str = "epsilon", weighting: str | None = None, min_snr_gamma: float = 5.0,
         t: jax.Array | None = None, noise: jax.Array | None = None, noise_offset: float = 0.0,
         input_perturbation: float = 0.0, reduce: bool = True) -> jax.Array:
  """The denoising training loss (L_simple and its weighted variants).

  Draws t ~ U{0, ..., T-1} and eps ~ N(0, I) per example (unless given), forms x_t with
  :func:`q_sample` and regresses ``model_fn(x_t, t)`` on the target of ``prediction``.

  Args:
    model_fn: ``(x_t [B, ...], t [B] int32) -> prediction [B, ...]``.
    schedule: the noise schedule.
    x0: clean data [B, ...].
    key: PRNG key for t and noise.
    prediction: what the network predicts: "epsilon", "v" or "sample".
    weighting: None (uniform) or "min_snr".
    min_snr_gamma: gamma of Min-SNR weighting.
    t: optional fixed timesteps [B].
    noise: optional fixed noise, shape of x0.
    noise_offset: offset noise: ``noise_offset * N(0, 1)`` drawn per example and channel (shape
      [B, 1, ..., 1, C]) is added to the noise, so the model also learns to change an image's mean
      brightness. The target is the offset noise.
    input_perturbation: x_t is made from ``noise + input_perturbation * N(0, I)`` while the target
      keeps ``noise`` (Ning et al.'s input perturbation against exposure bias).
    reduce: mean over the batch (True) or per-example losses [B] (False).

  Returns:
    A scalar loss (or [B]).

  Example:
    >>> loss_value = diffusion.loss(lambda x, t: unet.apply(p, x, t, c), sched, latents, key=key)
  """
  k_t, k_n = jax.random.split(key)
  b = x0.shape[0]
  if t is None:
    t = jax.random.randint(k_t, (b,), 0, schedule.num_timesteps, dtype=jnp.int32)
  if noise is None:
    noise = jax.random.normal(k_n, x0.shape, jnp.float32).astype(x0.dtype)
  if noise_offset:
    shape = (b,) + (1,) * (x0.ndim - 2) + (x0.shape[-1],)
    noise = noise + noise_offset * jax.random.normal(jax.random.fold_in(key, 1), shape, noise.dtype)
  noised_with = noise
  if input_perturbation:
    noised_with = noise + input_perturbation * jax.random.normal(jax.random.fold_in(key, 2), noise.shape,
                                                                 noise.dtype)
  x_t = q_sample(schedule, x0, t, noised_with)
  out = model_fn(x_t, t)
  if out.shape != x0.shape:
    raise ValueError(f"model output shape {out.shape} != input shape {x0.shape}")
  a, s = q_mean_std(schedule, t, x0)
  tgt = target(x0.astype(jnp.float32), noise.astype(jnp.float32), a, s, prediction)
  err = jnp.mean(jnp.square(out.astype(jnp.float32) - tgt), axis=tuple(range(1, x0.ndim)))
  per_ex = err * loss_weight(schedule, t, prediction=prediction, weighting=weighting,
                             min_snr_gamma=min_snr_gamma)
  return jnp.mean(per_ex) if reduce else per_ex


# ----------------------------------------------------------------------------- ELBO


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _std_normal_cdf(x: jax.Array) -> jax.Array:
  return 0.5 * (1.0 + jax.lax.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: jax.Array, mean: jax.Array, log_scale: jax.Array, *,
                                        num_bins: int = 256) -> jax.Array:
  """log-probability of data ``x`` in [-1, 1] quantised to ``num_bins`` levels under N(mean, scale^2).

  Each level is the bin of width 2/(num_bins-1) centred on it; the outermost bins extend to
  -inf/+inf (Ho et al., 2020, eq. 13). Uses the exact normal CDF. Elementwise, in nats.
  """
  half = 1.0 / (num_bins - 1)
  centred = x - mean
  inv_std = jnp.exp(-log_scale)
  cdf_plus = _std_normal_cdf(inv_std * (centred + half))
  cdf_min = _std_normal_cdf(inv_std * (centred - half))
  # log Phi(upper) and log(1 - Phi(lower)) via log_ndtr keep the tails accurate.
  log_cdf_plus = jax.scipy.special.log_ndtr(inv_std * (centred + half))
  log_one_minus_cdf_min = jax.scipy.special.log_ndtr(-inv_std * (centred - half))
  delta = jnp.maximum(cdf_plus - cdf_min, 1e-12)
  mid = jnp.log(delta)
  # In the far tail of a narrow Gaussian the bin mass underflows; the density approximation is exact
  # to first order there.
  log_pdf_mid = (-0.5 * jnp.square(centred * inv_std) - log_scale - 0.5 * math.log(2 * math.pi)
                 + math.log(2 * half))
  mid = jnp.where(cdf_plus - cdf_min > 1e-10, mid, log_pdf_mid)
  return jnp.where(x < -1.0 + 1e-3, log_cdf_plus, jnp.where(x > 1.0 - 1e-3, log_one_minus_cdf_min, mid))


def _mean_flat(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def prior_bpd(schedule: Schedule, x0: jax.Array) -> jax.Array:
  """KL(q(x_T | x_0) || N(0, I)) in bits per dimension, per example [B]."""
  t = jnp.full((x0.shape[0],), schedule.num_timesteps - 1, jnp.int32)
  a, s = q_mean_std(schedule, t, x0)
  kl = normal_kl(a * x0, 2.0 * jnp.log(s), 0.0, 0.0)
  return _mean_flat(kl) / math.log(2.0)


def p_mean_variance(schedule: Schedule, output: jax.Array, x_t: jax.Array, t: jax.Array, *,
                    prediction: str = "epsilon", variance_type: str = "fixed_small",
                    clip_denoised: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mean, log-variance and predicted x0 of the model's reverse step p(x_{t-1} | x_t).

  ``variance_type`` is "fixed_small" (the posterior variance), "fixed_large" (beta_t, with the
  t = 0 value replaced by the posterior variance at t = 1 as in Ho et al.'s code) or
  "learned_range" (the network outputs twice the channels; the second half interpolates in log
  space between the two, Nichol & Dhariwal, 2021).
  """
  t = _check_t(schedule, x_t, t)
  if variance_type == "learned_range":
    if output.shape[-1] != 2 * x_t.shape[-1]:
      raise ValueError("learned_range needs a model output with twice the input channels")
    output, frac = jnp.split(output, 2, axis=-1)
    min_log = broadcast_to(schedule.posterior_log_variance_clipped[t], x_t)
    max_log = broadcast_to(jnp.log(schedule.betas)[t], x_t)
    frac = (frac + 1.0) / 2.0
    log_var = frac * max_log + (1.0 - frac) * min_log
  elif variance_type == "fixed_small":
    log_var = broadcast_to(schedule.posterior_log_variance_clipped[t], x_t)
  elif variance_type == "fixed_large":
    large = jnp.concatenate([schedule.posterior_variance[1:2], schedule.betas[1:]])
    log_var = broadcast_to(jnp.log(large)[t], x_t)
  else:
    raise ValueError(f"unknown variance_type {variance_type!r}")
  a, s = q_mean_std(schedule, t, x_t)
  x0 = to_x0(output, x_t, a, s, prediction)
  if clip_denoised:
    x0 = jnp.clip(x0, -1.0, 1.0)
  mean, _, _ = q_posterior(schedule, x0, x_t, t)
  return mean, log_var, x0


def vb_term_bpd(schedule: Schedule, output: jax.Array, x0: jax.Array, x_t: jax.Array, t: jax.Array, *,
                prediction: str = "epsilon", variance_type: str = "fixed_small") -> jax.Array:
  """One term of the variational bound, in bits/dim, per example [B].

  For t > 0: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) (the seed's L_{t-1}); for t = 0: the
  discretised-Gaussian decoder NLL -log p(x_0 | x_1) (L_0). ``x0`` must lie in [-1, 1].
  """
  true_mean, _, true_log_var = q_posterior(schedule, x0, x_t, t)
  mean, log_var, _ = p_mean_variance(schedule, output, x_t, t, prediction=prediction,
                                     variance_type=variance_type)
  kl = _mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
  nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
  return jnp.where(t == 0, nll, kl)


def bits_per_dim(model_fn: ModelFn, schedule: Schedule, x0: jax.Array, *, key: jax.Array,
                 prediction: str = "epsilon", variance_type: str = "fixed_small") -> dict[str, jax.Array]:
  """The full negative ELBO of x0 in bits/dim (one model call per timestep, in a lax.scan).

  Returns a dict of per-example arrays [B]: ``total`` = ``prior`` + sum of ``vb`` terms, and
  ``terms`` [T, B] with each timestep's term.
  """
  num_t = schedule.num_timesteps
  b = x0.shape[0]

  def body(_, inputs):
    t_i, k = inputs
    t = jnp.full((b,), t_i, jnp.int32)
    noise = jax.random.normal(k, x0.shape, jnp.float32)
    x_t = q_sample(schedule, x0, t, noise)
    out = model_fn(x_t, t).astype(jnp.float32)
    return None, vb_term_bpd(schedule, out, x0, x_t, t, prediction=prediction,
                             variance_type=variance_type)

  keys = jax.random.split(key, num_t)
  _, terms = jax.lax.scan(body, None, (jnp.arange(num_t), keys))
  prior = prior_bpd(schedule, x0)
  return {"total": prior + jnp.sum(terms, axis=0), "prior": prior, "terms": terms}


# ----------------------------------------------------------------------------- CFG training


def drop_condition(cond: Any, null_cond: Any, p: float, *, key: jax.Array) -> Any:
  """Replaces each example's condition by the null condition with probability ``p``.

  Used to train one network both conditionally and unconditionally for classifier-free guidance.
  ``cond`` is a pytree of arrays with a leading batch axis [B, ...]; ``null_cond`` has the same
  structure, each leaf broadcastable to the matching ``cond`` leaf (e.g. [1, ...] or [...]).
  The same per-example decision applies to every leaf.
  """
  leaves = jax.tree.leaves(cond)
  if not leaves:
    raise ValueError("cond has no arrays")
  b = leaves[0].shape[0]
  drop = jax.random.bernoulli(key, p, (b,))

  def pick(c, n):
    n = jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape)
    return jnp.where(drop.reshape((b,) + (1,) * (c.ndim - 1)), n, c)

  return jax.tree.map(pick, cond, null_cond)
