"""Model-calibrated step schedules: the noise levels of a few-step solver, fitted to the model.

A multistep solver's error at a small budget depends mostly on where its steps fall. Uniform steps
in log-SNR, Karras' rho = 7 grid and diffusers' spacings are fixed guesses; the best grid depends
on the model (how sharply its denoiser changes with the noise level). Since jdiff samplers are pure
JAX functions of an explicit sigma list (``sigmas=``), the grid itself can be optimised by gradient
descent: :func:`calibrate_timesteps` solves the probability-flow ODE of ``model_fn`` finely once
(a many-step solver, the "teacher") from a small set of calibration noises, then moves the interior
noise levels of the few-step solver (the "student", any multistep method and options) to minimise
its relative error against the teacher's end points, in the spirit of Align Your Steps
(Sabour et al., 2024), GITS (Chen et al., 2024) and LD3 (Tong et al., 2024).

The result is a plain sigma list: it costs no model call at sampling time, needs nothing but the
model function (not the data), and is used as ``samplers.sample(method, ..., sigmas=sigmas)`` on
fresh noises. Parameterisation: the first sigma (the top of the schedule, where ``x_T`` lives) and
the end point (0 or sigma_min) are fixed; the ``n - 1`` interior levels and the last evaluated one
are ``log sigma_max - cumsum(softmax(logits)) * (log sigma_max - log sigma_min)``, so every
iterate is a strictly decreasing grid inside the training range. With ``shift_timesteps=True``
the noise level the model is told at each step (its fractional timestep) is fitted too, as a
per-step factor exp(delta_i) on sigma_i: a learned correction of the solver's truncation error
(the model is still called once per step).

The model is called at fractional timesteps (the exact noise levels of the grid), so it must
accept float timesteps; diffusers' sigma schedules instead round them to integers, which caps their
accuracy (with sharp data, around 2e-3 relative error however many steps are taken).

Example:
  >>> sig = calibrate_timesteps("unipc", model_fn, sched, x_calib, num_steps=10, order=3,
  ...                           final_step="extrapolate")
  >>> x0 = samplers.sample("unipc", model_fn, sched, x_T, sigmas=sig, order=3, final_step="extrapolate")
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdiff.samplers import base, levels
from jdiff.schedules import Schedule

__all__ = ["calibrate_timesteps", "sigma_range", "sigmas_from_logits", "logits_from_sigmas", "initial_sigmas",
           "DEFAULT_REFERENCE", "LOSSES"]

# the teacher: UniPC order 3 on uniform log-SNR steps over the calibration range (explicit sigmas,
# so the model is called at the exact noise levels, not at rounded timesteps) with the
# second-order last step in sigma
DEFAULT_REFERENCE = ("unipc", {"order": 3, "final_step": "extrapolate"})
_CALIBRATABLE = ("dpm_solver", "unipc")
LOSSES = ("log", "mean", "relative")


def sigma_range(schedule: Schedule, sigma_min: float | None = None,
                sigma_max: float | None = None) -> tuple[float, float]:
  """(sigma_min, sigma_max) of a calibrated grid: the schedule's first and last training sigmas
  (float32-rounded) unless given.

  Example:
    >>> lo, hi = sigma_range(schedules.scaled_linear(1000, 0.00085, 0.012))  # (0.0292, 14.61)
  """
  table = np.sqrt((1.0 - np.asarray(schedule.alphas_cumprod, np.float64))
                  / np.asarray(schedule.alphas_cumprod, np.float64))
  lo = float(np.float32(table[0])) if sigma_min is None else float(sigma_min)
  hi = float(np.float32(table[-1])) if sigma_max is None else float(sigma_max)
  if not 0.0 < lo < hi:
    raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={lo}, sigma_max={hi}")
  return lo, hi


def sigmas_from_logits(logits: jax.Array, sigma_min: float, sigma_max: float, final_sigmas_type: str = "zero"):
  """The grid [n + 1] of ``n = len(logits)`` steps encoded by ``logits`` [n] (see the module docstring).

  ``softmax(logits)`` splits [log sigma_min, log sigma_max] into n gaps; the first n - 1 place the
  evaluated levels below sigma_max, the last is the room left above sigma_min.

  Example:
    >>> sigmas_from_logits(jnp.zeros(4), 0.03, 14.6)  # 14.6, 5.1, 1.8, 0.6, 0.0
  """
  n = logits.shape[0]
  u_hi, u_lo = math.log(sigma_max), math.log(sigma_min)
  gaps = jax.nn.softmax(logits.astype(jnp.float32)) * (u_hi - u_lo)  # [n]
  inner = jnp.exp(u_hi - jnp.cumsum(gaps)[: n - 1])  # [n - 1]
  end = jnp.zeros((1,), jnp.float32) if final_sigmas_type == "zero" else jnp.full((1,), sigma_min, jnp.float32)
  return jnp.concatenate([jnp.full((1,), sigma_max, jnp.float32), inner, end])


def logits_from_sigmas(sigmas, sigma_min: float, sigma_max: float, slack: float = 0.1) -> np.ndarray:
  """Logits [n] whose :func:`sigmas_from_logits` grid is close to ``sigmas`` [n + 1].

  The gap left above sigma_min is at least ``slack`` times the mean gap (a grid that ends exactly
  at sigma_min has no room there and would need an infinitely negative logit).
  """
  sig = np.asarray(sigmas, np.float64)
  n = sig.shape[0] - 1
  u = np.log(np.clip(sig[:n], sigma_min, sigma_max))
  gaps = np.concatenate([-np.diff(u), [u[-1] - math.log(sigma_min)]])  # [n]
  floor = slack * (math.log(sigma_max) - math.log(sigma_min)) / n
  gaps = np.maximum(gaps, floor)
  return np.log(gaps / gaps.sum()).astype(np.float32)


def initial_sigmas(init, num_steps: int, sigma_min: float, sigma_max: float) -> np.ndarray:
  """The evaluated levels [n] of a named starting grid ("logsnr", "karras") or of an explicit list."""
  if isinstance(init, str):
    fns = {"logsnr": levels.logsnr_uniform, "karras": levels.karras}
    if init not in fns:
      raise ValueError(f"unknown init {init!r}; expected one of {sorted(fns)} or a list of sigmas")
    return np.asarray(fns[init](sigma_min, sigma_max, num_steps, xp=np), np.float64)  # descending
  sig = np.asarray(init, np.float64)
  if sig.shape not in ((num_steps,), (num_steps + 1,)):
    raise ValueError(f"init sigmas must have {num_steps} or {num_steps + 1} entries, got shape {sig.shape}")
  return sig[:num_steps]


def calibrate_timesteps(method: str, model_fn: Callable[[jax.Array, jax.Array], jax.Array], schedule: Schedule,
                        x_calib: jax.Array, *, num_steps: int, reference_steps: int = 256,
                        reference: tuple[str, dict] | None = None, x_ref: jax.Array | None = None,
                        init: Any = ("logsnr", "karras"), loss: str = "log", iterations: int = 200,
                        learning_rate: float = 0.02, sigma_min: float | None = None,
                        sigma_max: float | None = None, shift_timesteps: bool = False,
                        return_info: bool = False, **options):
  """Fits the noise levels of a ``num_steps``-call solver to ``model_fn`` (see the module docstring).

  Args:
    method: the student solver, "unipc" or "dpm_solver" (a registered multistep sampler that takes
      ``sigmas=``).
    model_fn: ``(x [B, ...], t [B] float32) -> output`` of type ``options["prediction"]``; it must
      accept fractional timesteps (the grid moves continuously).
    schedule: the training noise schedule.
    x_calib: calibration noises [B, ...] (unit variance, as ``x_T``); use other noises to sample.
    num_steps: the student's model calls n.
    reference_steps: model calls of the teacher solve.
    reference: ``(method, options)`` of the teacher (``num_steps`` defaults to
      ``reference_steps``); default :data:`DEFAULT_REFERENCE` on ``reference_steps`` uniform
      log-SNR levels of the calibration range. Its ``prediction`` follows ``options``.
    x_ref: the teacher's end points [B, ...] when already known (skips the teacher solve).
    init: a starting grid ("logsnr", "karras", or sigmas [n] / [n + 1]) or a tuple of them: each is
      optimised and the best result kept.
    loss: "log" (the mean over calibration samples of the log of each sample's squared relative
      error: robust to the few trajectories near a boundary between modes, whose errors would
      otherwise decide the grid), "mean" (log of the mean per-sample relative error) or "relative"
      (log of the batch's squared relative error, which those few samples dominate).
    iterations: Adam steps per starting grid.
    learning_rate: Adam's initial step size on the logits (cosine-decayed to 0).
    sigma_min, sigma_max: the range of the grid (default: the schedule's training sigmas); the
      first sigma is always ``sigma_max``, where ``x_T`` lives.
    shift_timesteps: also fit, per step, the noise level the model is told (a multiplicative
      shift exp(delta_i) of sigma_i, passed as its fractional timestep) apart from the level the
      solver steps from: a learned correction of the solver's truncation error in the spirit of
      time-shift samplers. The result is then ``(sigmas, timesteps)`` for
      ``sample(..., sigmas=sigmas, timesteps=timesteps)``.
    return_info: also return a dict with the calibration errors before and after.
    **options: the student's options (``order``, ``final_step``, ``algorithm``, ``prediction``,
      ``final_sigmas_type``, ...), used unchanged when sampling with the result.

  Returns:
    The calibrated sigmas, float32 numpy [n + 1] (descending; last 0 or sigma_min), for
    ``samplers.sample(method, ..., sigmas=...)`` (with ``shift_timesteps``, the pair
    ``(sigmas, timesteps [n] float32)``); with ``return_info`` also the info dict
    (``initial_error`` per starting grid, ``error`` of the result: the relative error against the
    teacher, as a geometric mean over the samples for ``loss="log"``).

  Example:
    >>> sig = calibrate_timesteps("dpm_solver", model_fn, sched, jax.random.normal(key, (64, 32)),
    ...                           num_steps=10, order=3, final_step="extrapolate")
  """
  import optax

  if method not in _CALIBRATABLE:
    raise ValueError(f"calibrate_timesteps supports methods {_CALIBRATABLE}, got {method!r}")
  for bad in ("sigmas", "timesteps", "sigma_schedule", "use_karras_sigmas", "use_exponential_sigmas",
              "num_steps", "return_trajectory"):
    if bad in options:
      raise ValueError(f"option {bad!r} is set by calibrate_timesteps; do not pass it")
  n = int(num_steps)
  if n < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  lo, hi = sigma_range(schedule, sigma_min, sigma_max)
  final_type = options.get("final_sigmas_type", "zero")
  if final_type not in ("zero", "sigma_min"):
    raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_type!r}")
  x_calib = jnp.asarray(x_calib, jnp.float32)
  if x_calib.ndim < 2:
    raise ValueError(f"x_calib must have a batch axis and at least one data axis, got shape {x_calib.shape}")
  student = base.get(method)
  if loss not in LOSSES:
    raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
  inits = init if isinstance(init, (tuple, list)) and (not init or isinstance(init[0], str)) else (init,)
  if not inits:
    raise ValueError("init must name at least one starting grid")
  starts = [initial_sigmas(i, n, lo, hi) for i in inits] if n > 1 else []

  if x_ref is None:
    ref_method, ref_opts = reference or DEFAULT_REFERENCE
    ref_opts = dict(ref_opts)
    if "prediction" in options:
      ref_opts.setdefault("prediction", options["prediction"])
    if reference is None:
      ref_opts["sigmas"] = np.concatenate([levels.logsnr_uniform(lo, hi, int(reference_steps)), [0.0]])
    else:
      ref_opts.setdefault("num_steps", int(reference_steps))
    x_ref = jax.jit(lambda z: base.get(ref_method)(model_fn, schedule, z, **ref_opts))(x_calib)
  x_ref = jnp.asarray(x_ref, jnp.float32)
  if x_ref.shape != x_calib.shape:
    raise ValueError(f"x_ref shape {x_ref.shape} does not match x_calib shape {x_calib.shape}")
  b = x_calib.shape[0]
  ref_sq = jnp.sum((x_ref * x_ref).reshape(b, -1), axis=1)  # [B]

  log_table = jnp.log(levels.train_sigmas(jnp.asarray(schedule.alphas_cumprod, jnp.float32), jnp))

  def grid(params):
    logits, shift = params
    sig = sigmas_from_logits(logits, lo, hi, final_type)
    if not shift_timesteps:
      return sig, None
    return sig, levels.sigma_to_t(sig[:-1] * jnp.exp(shift), log_table, jnp).astype(jnp.float32)

  def loss_fn(params):
    sig, ts = grid(params)
    out = student(model_fn, schedule, x_calib, sigmas=sig, timesteps=ts, **options)
    err_sq = jnp.sum(((out - x_ref) ** 2).reshape(b, -1), axis=1)  # [B]
    if loss == "relative":
      return jnp.log(jnp.sum(err_sq) / jnp.sum(ref_sq))
    if loss == "mean":
      return 2.0 * jnp.log(jnp.mean(jnp.sqrt(err_sq / ref_sq + 1e-24)))
    return jnp.mean(jnp.log(err_sq / ref_sq + 1e-12))

  if n == 1 and not shift_timesteps:  # nothing to move: sigma_max, then the end point
    sig = np.asarray(sigmas_from_logits(jnp.zeros((1,)), lo, hi, final_type))
    err = float(np.sqrt(np.exp(jax.jit(loss_fn)((jnp.zeros((1,)), jnp.zeros((1,)))))))
    return (sig, {"initial_error": {str(i): err for i in inits}, "error": err}) if return_info else sig
  if n == 1:
    starts = [np.full((1,), hi)]

  value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
  opt = optax.adam(optax.cosine_decay_schedule(learning_rate, max(int(iterations), 1)))
  update = jax.jit(opt.update)
  best_loss, best_logits, initial = math.inf, None, {}
  for start, start_sig in zip(inits, starts):
    logits = (jnp.asarray(logits_from_sigmas(np.concatenate([start_sig, [0.0]]), lo, hi)),
              jnp.zeros((n,), jnp.float32))  # (step logits [n], model-level log shifts [n])
    state = opt.init(logits)
    for it in range(int(iterations) + 1):
      val, grad = value_and_grad(logits)
      val = float(val)
      if it == 0:
        name = start if isinstance(start, str) else "explicit"
        initial[name] = math.sqrt(math.exp(val)) if math.isfinite(val) else math.inf
      if math.isfinite(val) and val < best_loss:
        best_loss, best_logits = val, logits
      finite = all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grad))
      if it == int(iterations) or not (math.isfinite(val) and finite):
        break
      upd, state = update(grad, state)
      logits = optax.apply_updates(logits, upd)
  if best_logits is None:
    raise FloatingPointError("calibration diverged from every starting grid (non-finite error)")
  sig, ts = grid(best_logits)
  out = np.asarray(sig, np.float32) if ts is None else (np.asarray(sig, np.float32), np.asarray(ts, np.float32))
  if return_info:
    return out, {"initial_error": initial, "error": math.sqrt(math.exp(best_loss))}
  return out
