"""Noise levels: the timestep spacings and sigma schedules that the grids (:mod:`jdiff.samplers.grids`) are
built from.

Karras et al.'s ``sigma = sqrt((1 - alpha-bar) / alpha-bar)`` (the variance-exploding noise level of
a VP schedule) is the coordinate these samplers step in. This module builds the grids that
diffusers' schedulers build in ``set_timesteps``, as pure functions of the schedule:

* timestep spacings of the multistep solvers (``num_steps + 1`` points, last one dropped) and of
  the Euler family (``num_steps`` float timesteps);
* sigma schedules: linear interpolation of the training sigmas at (fractional) timesteps,
  Karras' rho-schedule, exponential (uniform in log sigma), uniform in log-SNR, and the beta
  schedule of Lee et al. (2024);
* the inverse map sigma -> fractional timestep (linear interpolation of log sigma), used to give a
  model the timestep of a sigma that is not on the training grid.

When the schedule is concrete the grids are computed with numpy in the precision diffusers uses
(float64 intermediates, float32 result), so jdiff and diffusers visit the same sigmas bit for bit.
When the schedule is traced (``jax.jit`` over the schedule) the same formulas run in jnp float32.

Example:
  >>> sig = levels.karras(0.0292, 14.6, 10)  # 10 descending noise levels
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "SIGMA_SCHEDULES",
    "xp_of",
    "train_sigmas",
    "sigma_to_t",
    "karras",
    "exponential",
    "logsnr_uniform",
    "beta",
    "spaced_timesteps",
    "multistep_timesteps",
    "euler_timesteps",
    "multistep_grid",
    "euler_grid",
    "alpha_sigma",
    "log_alpha_sigma_ratio",
    "check_sigma_schedule",
    "pick_sigma_schedule",
    "explicit_num_steps",
    "explicit_grid",
]

# "karras" (rho = 7), "exponential" (uniform in log sigma), "logsnr" (uniform in log-SNR with the
# jdiff end treatment, see `logsnr_uniform`) and "beta" (Beta(0.6, 0.6) quantiles); None keeps the
# timestep spacing's own sigmas.
SIGMA_SCHEDULES = (None, "karras", "exponential", "logsnr", "beta")
SPACINGS = ("leading", "trailing", "linspace")


def xp_of(schedule_array) -> object:
  """numpy for concrete schedules (diffusers' precision), jax.numpy for traced ones."""
  return jnp if isinstance(schedule_array, jax.core.Tracer) else np


def _hi(xp):
  """The dtype of diffusers' float64 intermediates under ``xp`` (float32 when traced)."""
  return np.float64 if xp is np else jnp.float32


def train_sigmas(alphas_cumprod, xp=None):
  """sigma_t = sqrt((1 - abar_t) / abar_t) for every training timestep, float32 [T]."""
  xp = xp or xp_of(alphas_cumprod)
  abar = xp.asarray(alphas_cumprod, xp.float32)
  return xp.sqrt((xp.float32(1.0) - abar) / abar)


def sigma_to_t(sigma, log_sigmas, xp=None):
  """Fractional timestep whose linearly interpolated log sigma equals ``sigma`` (diffusers' rule).

  Args:
    sigma: noise levels [N].
    log_sigmas: log of the training sigmas [T] (increasing with t).

  Returns:
    Timesteps [N] in [0, T - 1] (float64 for numpy inputs, float32 when traced).
  """
  xp = xp or xp_of(log_sigmas)
  hi = _hi(xp)
  sigma = xp.asarray(sigma, hi)
  log_sigmas = xp.asarray(log_sigmas)
  log_sigma = xp.log(xp.maximum(sigma, 1e-10))
  dists = log_sigma[None, :] - log_sigmas[:, None]  # [T, N]
  low = xp.argmax(xp.cumsum((dists >= 0).astype(xp.int32), axis=0), axis=0)
  low = xp.minimum(low, log_sigmas.shape[0] - 2)
  lo, up = log_sigmas[low], log_sigmas[low + 1]
  w = xp.clip((lo.astype(hi) - log_sigma) / (lo - up).astype(hi), 0, 1)
  return (1 - w) * low.astype(hi) + w * (low + 1).astype(hi)


def karras(sigma_min, sigma_max, num: int, rho: float = 7.0, xp=np):
  """Karras et al.'s schedule: sigma_i^(1/rho) evenly spaced from sigma_max down to sigma_min."""
  ramp = xp.linspace(0, 1, num).astype(_hi(xp))
  lo, up = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  return (up + ramp * (lo - up)) ** rho


def exponential(sigma_min, sigma_max, num: int, xp=np):
  """log sigma evenly spaced from log(sigma_max) down to log(sigma_min)."""
  if xp is np:
    return np.exp(np.linspace(math.log(float(sigma_max)), math.log(float(sigma_min)), num))
  return jnp.exp(jnp.linspace(jnp.log(sigma_max), jnp.log(sigma_min), num))


def logsnr_uniform(sigma_min, sigma_max, num: int, xp=np):
  """Steps uniform in log-SNR lambda = -log sigma over [sigma_min, sigma_max] (``num`` points).

  Same points as :func:`exponential`; kept as a name for the jdiff ``"logsnr"`` schedule, whose
  other half (the extrapolated final step to sigma = 0) lives in the solvers.
  """
  return exponential(sigma_min, sigma_max, num, xp)


def beta(sigma_min, sigma_max, num: int, a: float = 0.6, b: float = 0.6, xp=np):
  """sigma_min + q_i (sigma_max - sigma_min), q_i the Beta(a, b) quantiles of 1 - linspace(0, 1, num)
  (Lee et al., 2024: steps concentrated at both ends of the range; diffusers' ``use_beta_sigmas``)."""
  from scipy import stats  # the quantiles are static: computed once at trace time
  q = stats.beta.ppf(1.0 - np.linspace(0.0, 1.0, num), a, b)
  if xp is np:
    return np.asarray([sigma_min + p * (sigma_max - sigma_min) for p in q])
  return sigma_min + jnp.asarray(q, jnp.float32) * (sigma_max - sigma_min)


_SCHEDULE_FNS = {"karras": karras, "exponential": exponential, "logsnr": logsnr_uniform, "beta": beta}



def _checked_steps(num_steps, num_train) -> tuple[int, int]:
  """(n, T) as ints; refuses n < 1 or n > T (one line)."""
  n, big_t = int(num_steps), int(num_train)
  if n < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  if n > big_t:
    raise ValueError(f"num_steps={n} exceeds the schedule's {big_t} training timesteps")
  return n, big_t

def spaced_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "leading",
                     steps_offset: int = 0) -> np.ndarray:
  """The descending integer timesteps of diffusers' DDIM/DDPM schedulers (``timestep_spacing``).

  * ``"leading"``: 0, r, 2r, ... (r = T // n), reversed, plus ``steps_offset``;
  * ``"trailing"``: round(T, T - T/n, ...) - 1, so the first step is exactly T - 1;
  * ``"linspace"``: round(linspace(0, T - 1, n)), reversed.

  Example:
    >>> spaced_timesteps(1000, 4, "linspace").tolist()  # [999, 666, 333, 0]
  """
  n, big_t = _checked_steps(num_steps, num_train_timesteps)
  if spacing == "linspace":
    ts = np.linspace(0, big_t - 1, n).round()[::-1].astype(np.int64)
  elif spacing == "leading":
    ratio = big_t // n
    ts = (np.arange(0, n) * ratio).round()[::-1].astype(np.int64) + int(steps_offset)
  elif spacing == "trailing":
    ratio = big_t / n
    ts = np.round(np.arange(big_t, 0, -ratio)).astype(np.int64) - 1
  else:
    raise ValueError(f"unknown timestep_spacing {spacing!r}; expected one of {SPACINGS}")
  if ts.max() >= big_t or ts.min() < 0:
    raise ValueError(f"timesteps {ts.min()}..{ts.max()} fall outside [0, {big_t}) "
                     f"(timestep_spacing={spacing!r}, steps_offset={steps_offset})")
  return ts.copy()


def check_sigma_schedule(name) -> None:
  if name not in SIGMA_SCHEDULES:
    raise ValueError(f"unknown sigma_schedule {name!r}; expected one of {SIGMA_SCHEDULES}")


def pick_sigma_schedule(sigma_schedule, use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                        use_beta_sigmas: bool = False):
  """Merges diffusers' boolean flags (``use_karras_sigmas``, ...) into one sigma schedule name."""
  picked = [name for name, on in (("karras", use_karras_sigmas), ("exponential", use_exponential_sigmas),
                                  ("beta", use_beta_sigmas)) if on]
  if sigma_schedule is not None:
    check_sigma_schedule(sigma_schedule)
    picked.append(sigma_schedule)
  if len(set(picked)) > 1:
    raise ValueError(f"choose one sigma schedule, got {picked} (use_karras_sigmas, "
                     "use_exponential_sigmas, use_beta_sigmas and sigma_schedule are exclusive)")
  return picked[0] if picked else None


def explicit_num_steps(sigmas, timesteps, num_steps, sigma_schedule=None, *flags: bool) -> int:
  """Checks an explicit ``sigmas=`` list against the other grid options; returns the step count.

  ``flags`` are diffusers' boolean sigma-schedule options (``use_karras_sigmas``, ...), which an
  explicit list replaces.
  """
  if sigmas is None:
    if timesteps is not None:
      raise ValueError("timesteps= goes with sigmas= (pass the sigma list the timesteps belong to)")
    if num_steps is None:
      raise ValueError("num_steps is required unless sigmas= is given")
    return num_steps
  if sigma_schedule is not None or any(flags):
    raise ValueError("sigmas= replaces the sigma schedule: drop sigma_schedule, use_karras_sigmas and "
                     "use_exponential_sigmas")
  shape = np.shape(sigmas)
  if len(shape) != 1 or shape[0] < 2:
    raise ValueError(f"sigmas must be a 1-D list of at least 2 noise levels, got shape {shape}")
  if num_steps is not None and int(num_steps) != shape[0] - 1:
    raise ValueError(f"sigmas has {shape[0]} entries, so num_steps must be {shape[0] - 1} (got {num_steps})")
  return shape[0] - 1


def multistep_timesteps(num_train: int, num_steps: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
  """The integer timesteps of diffusers' multistep solvers (DPM-Solver, UniPC).

  ``"linspace"`` and ``"leading"`` place ``num_steps + 1`` points and drop the last (t = 0), so
  the final step goes from the smallest visited timestep to the end sigma; ``"trailing"``
  starts at T - 1 in steps of T / num_steps.
  """
  n, big_t = _checked_steps(num_steps, num_train)
  if spacing == "linspace":
    ts = np.linspace(0, big_t - 1, n + 1).round()[::-1][:-1].astype(np.int64)
  elif spacing == "leading":
    ratio = big_t // (n + 1)
    ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + int(steps_offset)
  elif spacing == "trailing":
    ts = np.arange(big_t, 0, -big_t / n).round().astype(np.int64) - 1
  else:
    raise ValueError(f"unknown timestep_spacing {spacing!r}; expected 'linspace', 'leading' or 'trailing'")
  if ts.max() >= big_t or ts.min() < 0:
    raise ValueError(f"timesteps {ts.min()}..{ts.max()} fall outside [0, {big_t}) "
                     f"(timestep_spacing={spacing!r}, steps_offset={steps_offset})")
  return ts.copy()


def euler_timesteps(num_train: int, num_steps: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
  """The float32 timesteps of diffusers' Euler/Heun schedulers (``num_steps`` points, not rounded
  for ``"linspace"``)."""
  n, big_t = _checked_steps(num_steps, num_train)
  if spacing == "linspace":
    ts = np.linspace(0, big_t - 1, n, dtype=np.float32)[::-1]
  elif spacing == "leading":
    ts = (np.arange(0, n) * (big_t // n)).round()[::-1].astype(np.float32) + np.float32(steps_offset)
  elif spacing == "trailing":
    ts = np.arange(big_t, 0, -big_t / n).round().astype(np.float32) - np.float32(1)
  else:
    raise ValueError(f"unknown timestep_spacing {spacing!r}; expected 'linspace', 'leading' or 'trailing'")
  if ts.max() > big_t - 1 or ts.min() < 0:
    raise ValueError(f"timesteps {ts.min()}..{ts.max()} fall outside [0, {big_t - 1}] "
                     f"(timestep_spacing={spacing!r}, steps_offset={steps_offset})")
  return ts.copy()


def _interp(ts, table, xp):
  idx = xp.arange(table.shape[0]).astype(_hi(xp))
  return xp.interp(xp.asarray(ts, _hi(xp)), idx, table.astype(_hi(xp)))


def multistep_grid(alphas_cumprod, num_steps: int, *, spacing: str = "linspace", steps_offset: int = 0,
                   sigma_schedule: str | None = None, final_sigmas_type: str = "zero",
                   round_timesteps: bool = True, karras_final_sigma_min: str = "train",
                   sigmas=None, timesteps=None):
  """Timesteps [n] and sigmas [n + 1] of a multistep solver (diffusers' DPM-Solver/UniPC rules).

  Args:
    alphas_cumprod: the schedule's alpha-bar [T].
    num_steps: number of solver steps n.
    spacing, steps_offset: diffusers' ``timestep_spacing`` and ``steps_offset``.
    sigma_schedule: None (the training sigmas at the spaced timesteps), "karras", "exponential"
      or "logsnr" (uniform log-SNR); the latter three span [sigma(0), sigma(T - 1)].
    final_sigmas_type: "zero" or "sigma_min": the sigma the last step lands on.
    round_timesteps: timesteps of a sigma schedule are the rounded fractional timesteps
      (DPM-Solver/UniPC with Karras sigmas) rather than truncated ones (exponential sigmas).
    karras_final_sigma_min: with a sigma schedule and ``final_sigmas_type="sigma_min"``, land on
      sigma(0) of the training table ("train", DPM-Solver) or on the schedule's own last sigma
      ("schedule", UniPC). Both are sigma(0) up to float rounding.
    sigmas, timesteps: a caller's grid instead (:func:`explicit_grid`; the spacing options are
      then unused).

  Returns:
    ``(timesteps, sigmas)``: int64 numpy timesteps (int32 jnp when traced) and float32 sigmas.
  """
  if sigmas is not None:
    return explicit_grid(alphas_cumprod, sigmas, timesteps, num_steps, final_sigmas_type=final_sigmas_type)
  check_sigma_schedule(sigma_schedule)
  if final_sigmas_type not in ("zero", "sigma_min"):
    raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
  xp = xp_of(alphas_cumprod)
  table = train_sigmas(alphas_cumprod, xp)  # [T] float32
  num_t = table.shape[0]
  ts = multistep_timesteps(num_t, num_steps, spacing, steps_offset)
  if sigma_schedule is None:
    sig = _interp(ts, table, xp)
    ts_out = xp.asarray(ts)
  else:
    lo, up = table[0].astype(_hi(xp)), table[-1].astype(_hi(xp))
    sig = _SCHEDULE_FNS[sigma_schedule](lo, up, num_steps, xp=xp)
    t_frac = sigma_to_t(sig, xp.log(table), xp)
    ts_out = xp.round(t_frac) if round_timesteps else xp.floor(t_frac)
  if final_sigmas_type == "zero":
    last = xp.zeros((1,), _hi(xp))
  elif sigma_schedule is not None and karras_final_sigma_min == "schedule":
    last = sig[-1:]
  else:
    last = table[:1].astype(_hi(xp))
  sig = xp.concatenate([sig, last]).astype(xp.float32)
  ts_out = ts_out.astype(np.int64 if xp is np else jnp.int32)
  return ts_out, sig


def euler_grid(alphas_cumprod, num_steps: int, *, spacing: str = "linspace", steps_offset: int = 0,
               sigma_schedule: str | None = None, final_sigmas_type: str = "zero",
               sigma_min: float | None = None, sigma_max: float | None = None):
  """Timesteps [n] (float32) and sigmas [n + 1] of diffusers' Euler-family schedulers.

  The sigma schedules span the interpolated sigmas of the spaced timesteps (or ``sigma_min``/
  ``sigma_max`` when given), as diffusers' EulerDiscreteScheduler does.
  """
  check_sigma_schedule(sigma_schedule)
  if final_sigmas_type not in ("zero", "sigma_min"):
    raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
  xp = xp_of(alphas_cumprod)
  table = train_sigmas(alphas_cumprod, xp)
  ts = euler_timesteps(table.shape[0], num_steps, spacing, steps_offset)
  sig = _interp(ts, table, xp)
  ts_out = xp.asarray(ts)
  if sigma_schedule is not None:
    lo = sig[-1] if sigma_min is None else sigma_min
    up = sig[0] if sigma_max is None else sigma_max
    sig = _SCHEDULE_FNS[sigma_schedule](lo, up, num_steps, xp=xp)
    ts_out = sigma_to_t(sig, xp.log(table), xp)
  if final_sigmas_type == "zero":
    last = xp.zeros((1,), _hi(xp))
  else:
    last = table[:1].astype(_hi(xp))
  sig = xp.concatenate([xp.asarray(sig, _hi(xp)), last]).astype(xp.float32)
  return ts_out.astype(xp.float32), sig


def explicit_grid(alphas_cumprod, sigmas, timesteps=None, num_steps: int | None = None, *,
                  final_sigmas_type: str = "zero"):
  """Timesteps [n] and float32 sigmas [n + 1] of a multistep solver from a caller's sigma list.

  The counterpart of diffusers' ``sigmas=`` argument: ``sigmas`` are the n + 1 descending VE noise
  levels the solver visits (the model is called at the first n; the last is the end point, 0 or
  sigma_min). The model's timesteps are ``timesteps`` when given (e.g. the integer timesteps of a
  default grid), else the fractional timesteps of ``sigmas`` (:func:`sigma_to_t`), in float32; so
  with a traced ``sigmas`` (inside ``jax.jit`` or ``jax.grad``) the grid stays a traced input.

  Args:
    alphas_cumprod: the schedule's alpha-bar [T].
    sigmas: descending noise levels [n + 1] (numpy, list or jax array; may be traced).
    timesteps: optional model timesteps [n] (integers are passed to the model as int32).
    num_steps: n, or None to take ``len(sigmas) - 1``.
    final_sigmas_type: "zero" or "sigma_min"; a concrete ``sigmas`` must agree (last entry 0 or > 0).

  Returns:
    ``(timesteps, sigmas)`` as :func:`multistep_grid` returns them.

  Example:
    >>> ts, sig = explicit_grid(sched.alphas_cumprod, [14.6, 3.0, 0.5, 0.0])
  """
  if final_sigmas_type not in ("zero", "sigma_min"):
    raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
  traced = isinstance(sigmas, jax.core.Tracer)
  sig = sigmas if traced else np.asarray(sigmas, np.float64)
  if sig.ndim != 1 or sig.shape[0] < 2:
    raise ValueError(f"sigmas must be a 1-D list of at least 2 noise levels, got shape {tuple(sig.shape)}")
  n = sig.shape[0] - 1
  if num_steps is not None and int(num_steps) != n:
    raise ValueError(f"sigmas has {n + 1} entries, so num_steps must be {n} (got {num_steps})")
  if not traced:
    if not np.all(np.isfinite(sig)) or np.any(sig[:-1] <= 0) or np.any(np.diff(sig) >= 0) or sig[-1] < 0:
      raise ValueError(f"sigmas must be finite, positive and strictly decreasing (the last may be 0), got {sig}")
    if (sig[-1] == 0) != (final_sigmas_type == "zero"):
      raise ValueError(f"sigmas end at {sig[-1]:g} but final_sigmas_type={final_sigmas_type!r} "
                       "(a last sigma of 0 means 'zero', a positive one 'sigma_min')")
  if timesteps is not None:
    ts = np.asarray(timesteps) if not isinstance(timesteps, jax.core.Tracer) else timesteps
    if ts.shape != (n,):
      raise ValueError(f"timesteps must have shape ({n},) to match sigmas, got {tuple(ts.shape)}")
  else:
    xp = jnp if traced or isinstance(alphas_cumprod, jax.core.Tracer) else np
    table = train_sigmas(alphas_cumprod, xp)
    ts = sigma_to_t(sig[:n], xp.log(table), xp).astype(xp.float32)
  if traced:
    return ts, sig.astype(jnp.float32)
  return ts, sig.astype(np.float32)


def alpha_sigma(sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
  """VP (alpha_t, sigma_t) of a VE noise level: alpha = 1 / sqrt(1 + sigma^2), sigma_t = sigma alpha."""
  alpha = 1.0 / jnp.sqrt(sigma * sigma + 1.0)
  return alpha, sigma * alpha


def log_alpha_sigma_ratio(alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  """DPM-Solver's lambda = log(alpha_t) - log(sigma_t) (half log-SNR)."""
  return jnp.log(alpha) - jnp.log(sigma)
