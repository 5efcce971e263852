"""Noise schedules of the discrete-time (variance-preserving) forward process.

A :class:`Schedule` is a frozen pytree of float32 arrays indexed by the training timestep ``t`` in
``[0, T)``. It holds everything the forward process q(x_t | x_0) and the posterior
q(x_{t-1} | x_t, x_0) need, precomputed once:

* ``betas[t]``            the per-step noise variance beta_t,
* ``alphas[t]``           1 - beta_t,
* ``alphas_cumprod[t]``   alpha-bar_t = prod_{i<=t} alpha_i,
* the posterior coefficients of q(x_{t-1} | x_t, x_0) (see :func:`jdiff.diffusion.q_posterior`).

Constructors are pure functions of their (possibly traced) float arguments; ``num_timesteps`` is
a Python int because it fixes the arrays' shape. The definitions follow diffusers'
``beta_schedule`` options so that a jdiff schedule and a diffusers scheduler configured alike hold
the same numbers.

Example:
  >>> from jdiff import schedules
  >>> s = schedules.scaled_linear(1000, 0.00085, 0.012)
  >>> s.num_timesteps
  1000
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Schedule",
    "from_betas",
    "linear",
    "scaled_linear",
    "cosine",
    "sigmoid",
    "rescale_zero_terminal_snr",
    "make",
    "snr",
    "log_snr",
    "sigmas",
    "lambdas",
]


@flax.struct.dataclass
class Schedule:
  """Precomputed per-timestep coefficients of a discrete VP diffusion process (all shape [T])."""

  betas: jax.Array
  alphas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def _cumprod_f32(x: jax.Array) -> jax.Array:
  """Cumulative product of float32 values, accumulated in float64 and rounded once.

  This is what PyTorch does on CPU (and so what diffusers' schedules hold). Under a trace without
  x64 enabled the product is accumulated left to right in float32 instead.
  """
  if not isinstance(x, jax.core.Tracer):
    return jnp.asarray(np.cumprod(np.asarray(x, np.float64)), jnp.float32)

  def step(carry, xi):
    carry = carry * xi
    return carry, carry

  _, out = jax.lax.scan(step, jnp.ones((), jnp.float32), x)
  return out


def from_betas(betas) -> Schedule:
  """Builds a :class:`Schedule` from a 1-D array of betas in (0, 1].

  Args:
    betas: array-like of shape [T].

  Returns:
    The schedule, all fields float32 of shape [T].
  """
  traced = isinstance(betas, jax.core.Tracer)
  betas = jnp.asarray(betas, jnp.float32)
  if betas.ndim != 1 or betas.shape[0] < 1:
    raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
  # Concrete betas: derive everything in float64 and round once (1 - abar_{t-1} cancels badly in
  # float32 near t = 0). Traced betas: float32 throughout.
  xp = jnp if traced else np
  b = betas if traced else np.asarray(betas, np.float64)
  if not traced and not (np.all(b >= 0) and np.all(b <= 1)):
    raise ValueError("betas must lie in [0, 1]")
  alphas = 1.0 - b
  abar = _cumprod_f32(alphas) if traced else np.cumprod(alphas)
  # ``alphas``/``alphas_cumprod`` are stored as PyTorch computes them (1 - beta rounded to float32,
  # then a float64 running product), so samplers see diffusers' numbers bit for bit; the derived
  # terms below use the exact float64 products.
  alphas_store = alphas if traced else (1.0 - np.asarray(betas))
  abar_store = abar if traced else np.cumprod(alphas_store.astype(np.float64))
  abar_prev = xp.concatenate([xp.ones((1,), abar.dtype), abar[:-1]])
  post_var = b * (1.0 - abar_prev) / (1.0 - abar)
  # log of the posterior variance, clipped because it is 0 at t = 0 (as in Ho et al.'s code).
  clipped = xp.concatenate([post_var[1:2], post_var[1:]]) if b.shape[0] > 1 else post_var
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  with np.errstate(divide="ignore", invalid="ignore"):
    return Schedule(
        betas=betas,
        alphas=f32(alphas_store),
        alphas_cumprod=f32(abar_store),
        alphas_cumprod_prev=f32(abar_prev),
        sqrt_alphas_cumprod=f32(xp.sqrt(abar)),
        sqrt_one_minus_alphas_cumprod=f32(xp.sqrt(1.0 - abar)),
        posterior_variance=f32(post_var),
        posterior_log_variance_clipped=f32(xp.log(clipped)),
        posterior_mean_coef1=f32(b * xp.sqrt(abar_prev) / (1.0 - abar)),
        posterior_mean_coef2=f32((1.0 - abar_prev) * xp.sqrt(alphas) / (1.0 - abar)),
    )


def _sqrt(x):
  return math.sqrt(x) if isinstance(x, (int, float)) else jnp.sqrt(jnp.asarray(x, jnp.float32))


def _check_t(num_timesteps: int) -> int:
  if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
    raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
  return int(num_timesteps)


def _linspace_f32(start, stop, num: int) -> jax.Array:
  """float32 linspace evaluated as torch.linspace does on CPU (fused multiply-add from both ends).

  Matching it bit for bit keeps jdiff's schedules equal to diffusers'. Traced endpoints fall back
  to plain float32 arithmetic.
  """
  i = np.arange(num)
  if isinstance(start, (int, float)) and isinstance(stop, (int, float)):
    a, b = np.float32(start), np.float32(stop)
    if num == 1:
      return jnp.asarray([a], jnp.float32)
    step = np.float64((b - a) / np.float32(num - 1))  # the step itself is a float32 value
    lo = step * i.astype(np.float64) + np.float64(a)  # exact product, one rounding: an FMA
    hi = -step * (num - 1 - i).astype(np.float64) + np.float64(b)
    return jnp.asarray(np.where(i < num // 2, lo, hi).astype(np.float32))
  start = jnp.asarray(start, jnp.float32)
  stop = jnp.asarray(stop, jnp.float32)
  if num == 1:
    return start[None]
  step = (stop - start) / (num - 1)
  fi = jnp.asarray(i, jnp.float32)
  return jnp.where(i < num // 2, start + step * fi, stop - step * (num - 1 - fi))


def linear(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, *,
           rescale_zero_snr: bool = False) -> Schedule:
  """Ho et al.'s linear schedule: betas evenly spaced from ``beta_start`` to ``beta_end``."""
  betas = _linspace_f32(beta_start, beta_end, _check_t(num_timesteps))
  return _finish(betas, rescale_zero_snr)


def scaled_linear(num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012, *,
                  rescale_zero_snr: bool = False) -> Schedule:
  """Stable Diffusion's schedule: sqrt(beta) evenly spaced, then squared."""
  betas = _linspace_f32(_sqrt(beta_start), _sqrt(beta_end), _check_t(num_timesteps)) ** 2
  return _finish(betas, rescale_zero_snr)


def cosine(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999, *,
           rescale_zero_snr: bool = False) -> Schedule:
  """Nichol & Dhariwal's cosine schedule (diffusers' ``squaredcos_cap_v2``).

  alpha-bar(u) = cos^2((u + s) / (1 + s) * pi / 2) on u in [0, 1]; beta_t = 1 - abar((t+1)/T) /
  abar(t/T), capped at ``max_beta``. Computed in float64 and rounded once to float32.
  """
  n = _check_t(num_timesteps)
  u = np.arange(n + 1, dtype=np.float64) / n
  if isinstance(s, (int, float)) and isinstance(max_beta, (int, float)):
    abar = np.cos((u + s) / (1.0 + s) * math.pi / 2) ** 2
    betas = np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)
    return _finish(jnp.asarray(betas, jnp.float32), rescale_zero_snr)
  u = jnp.asarray(u, jnp.float32)  # traced s or max_beta: stay in float32
  abar = jnp.cos((u + s) / (1.0 + s) * jnp.pi / 2) ** 2
  return _finish(jnp.minimum(1.0 - abar[1:] / abar[:-1], max_beta), rescale_zero_snr)


def sigmoid(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, *,
            rescale_zero_snr: bool = False) -> Schedule:
  """GeoDiff's sigmoid schedule (diffusers' ``sigmoid``)."""
  x = _linspace_f32(-6.0, 6.0, _check_t(num_timesteps))
  return _finish(jax.nn.sigmoid(x) * (beta_end - beta_start) + beta_start, rescale_zero_snr)


def _rescale_betas(betas: jax.Array) -> jax.Array:
  xp = jnp if isinstance(betas, jax.core.Tracer) else np  # numpy: IEEE float32 ops, as PyTorch
  betas = xp.asarray(betas, xp.float32)
  abar_sqrt = xp.sqrt(xp.asarray(_cumprod_f32(1.0 - betas)))
  first, last = abar_sqrt[0], abar_sqrt[-1]
  abar_sqrt = (abar_sqrt - last) * (first / (first - last))
  abar = abar_sqrt * abar_sqrt
  alphas = xp.concatenate([abar[:1], abar[1:] / abar[:-1]])
  return jnp.asarray(1.0 - alphas, jnp.float32)


def rescale_zero_terminal_snr(schedule: Schedule) -> Schedule:
  """Rescales a schedule so that the last timestep has zero SNR (Lin et al., 2023, Alg. 1).

  sqrt(alpha-bar) is shifted so its last value is 0 and scaled so its first value is unchanged.
  The last ``alphas_cumprod`` is then exactly 0: samplers that divide by it must use a
  v- or x0-predicting model (as the paper prescribes) or an epsilon-safe final step.
  """
  return from_betas(_rescale_betas(schedule.betas))


def _finish(betas, rescale_zero_snr: bool) -> Schedule:
  return from_betas(_rescale_betas(betas) if rescale_zero_snr else betas)


_BY_NAME = {
    "linear": linear,
    "scaled_linear": scaled_linear,
    "cosine": cosine,
    "squaredcos_cap_v2": cosine,
    "sigmoid": sigmoid,
}


def make(name: str, num_timesteps: int = 1000, *, beta_start: float = 1e-4, beta_end: float = 0.02,
         rescale_zero_snr: bool = False) -> Schedule:
  """Builds a schedule from diffusers' ``beta_schedule`` vocabulary (used by configs and loaders)."""
  if name not in _BY_NAME:
    raise ValueError(f"unknown beta schedule {name!r}; expected one of {sorted(_BY_NAME)}")
  if name in ("cosine", "squaredcos_cap_v2"):
    return cosine(num_timesteps, rescale_zero_snr=rescale_zero_snr)
  return _BY_NAME[name](num_timesteps, beta_start, beta_end, rescale_zero_snr=rescale_zero_snr)


def _alpha_sigma(schedule: Schedule, t):
  a = schedule.sqrt_alphas_cumprod if t is None else schedule.sqrt_alphas_cumprod[t]
  s = schedule.sqrt_one_minus_alphas_cumprod if t is None else schedule.sqrt_one_minus_alphas_cumprod[t]
  return a, s


# The helpers below use the stored sqrt(abar) and sqrt(1 - abar) (derived in float64), which keeps
# them accurate where 1 - abar cancels in float32 (small t).


def snr(schedule: Schedule, t=None) -> jax.Array:
  """Signal-to-noise ratio alpha-bar / (1 - alpha-bar), at ``t`` or for every timestep."""
  a, s = _alpha_sigma(schedule, t)
  return (a / s) ** 2


def log_snr(schedule: Schedule, t=None) -> jax.Array:
  """log SNR = log(alpha-bar) - log(1 - alpha-bar)."""
  return 2.0 * lambdas(schedule, t)


def sigmas(schedule: Schedule, t=None) -> jax.Array:
  """Variance-exploding noise level sigma = sqrt((1 - alpha-bar) / alpha-bar) (Karras et al.'s sigma)."""
  a, s = _alpha_sigma(schedule, t)
  return s / a


def lambdas(schedule: Schedule, t=None) -> jax.Array:
  """Half log-SNR lambda = log(alpha_t) - log(sigma_t), the time variable of DPM-Solver."""
  a, s = _alpha_sigma(schedule, t)
  return jnp.log(a) - jnp.log(s)
