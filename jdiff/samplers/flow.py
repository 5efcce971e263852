"""Samplers of the rectified-flow path x_t = (1 - sigma) x0 + sigma eps (:mod:`jdiff.flow`).

A flow grid is an ordinary :class:`~jdiff.samplers.grids.Grid` with alpha = 1 - sigma; the model is
told ``sigma * num_train_timesteps`` and predicts the velocity eps - x0. :func:`flow_grid` builds the
grids of diffusers' flow schedulers level for level: ``"euler"`` (``FlowMatchEulerDiscreteScheduler``
and ``FlowMatchHeunDiscreteScheduler``: static or dynamic shift, ``shift_terminal``, Karras /
exponential / beta sigmas, float timesteps), ``"multistep"`` (``DPMSolverMultistepScheduler`` with
``use_flow_sigmas``) and ``"unipc"`` (``UniPCMultistepScheduler`` with ``use_flow_sigmas``); the
last two give the model integer (truncated) timesteps as those schedulers do.

Rules: :func:`flow_euler_rule` (Euler on dx/dsigma = v, or diffusers' stochastic sampling that
re-noises the x0 estimate at every level) and :func:`flow_heun_rule`. DPM-Solver++ and UniPC run
unchanged on a flow grid (``dpm_solver(..., use_flow_sigmas=True, prediction="flow_prediction")``).

Example:
  >>> g = samplers.flow_grid(28, shift=3.0)
  >>> x0 = samplers.solve(model_fn, g, noise, samplers.flow_euler_rule())
  >>> x0 = samplers.sample("flow_euler", model_fn, None, noise, num_steps=28, shift=3.0)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion, flow
from jdiff.samplers import base, levels
from jdiff.samplers.driver import Rule, Step, sample_is_state, solve
from jdiff.samplers.euler import _heun_calls
from jdiff.samplers.grids import Grid

__all__ = ["FLOW_CONVENTIONS", "flow_sigmas", "flow_grid", "solver_flow_grid", "flow_euler_rule", "flow_heun_rule",
           "flow_euler", "flow_heun"]

FLOW_CONVENTIONS = ("euler", "multistep", "unipc")
_FLOW_SCHEDULES = (None, "karras", "exponential", "beta")


def _num_train(schedule, num_train_timesteps) -> int:
  """T: ``num_train_timesteps`` if given, else the schedule's length, else diffusers' 1000."""
  if num_train_timesteps is not None:
    big_t = int(num_train_timesteps)
  else:
    big_t = 1000 if schedule is None else int(schedule.num_timesteps)
  if big_t < 1:
    raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
  return big_t


def _shifted(sig, shift, mu, time_shift_type):
  if mu is not None:
    return flow.time_shift(sig, mu, kind=time_shift_type)
  return flow.shift_time(sig, shift)


def flow_sigmas(num_steps: int | None = None, *, shift: float = 1.0, mu: float | None = None,
                time_shift_type: str = "exponential", shift_terminal: float | None = None,
                sigma_schedule: str | None = None, sigmas=None, num_train_timesteps: int = 1000,
                convention: str = "euler") -> tuple[np.ndarray, np.ndarray]:
  """Model timesteps [n] and flow noise levels [n + 1] (float32, the last 0) of a diffusers flow scheduler.

  Computed with numpy in diffusers' precision (float64 intermediates), so that both visit the same
  levels bit for bit.

  Args:
    num_steps: number of steps n (None with an explicit ``sigmas`` list).
    shift: the static shift s (diffusers' ``shift``, or ``flow_shift`` of the multistep solvers).
    mu: the dynamic shift's mu (``use_dynamic_shifting``; see :func:`jdiff.flow.dynamic_shift_mu`);
      replaces ``shift`` when given.
    time_shift_type: "exponential" or "linear" (the dynamic shift's form; "euler" and "unipc").
    shift_terminal: stretch the shifted levels so that the last nonzero one is this ("euler", "unipc").
    sigma_schedule: None, "karras", "exponential" or "beta": respace the shifted levels between their
      ends ("euler").
    sigmas: explicit unshifted levels [n] (diffusers' ``set_timesteps(sigmas=...)``, as Flux's pipeline
      passes them; "euler"); they go through the shift like the default ones.
    num_train_timesteps: T; the model is told sigma * T.
    convention: "euler" (FlowMatchEuler/Heun: float32 timesteps), "multistep" (DPM-Solver with
      ``use_flow_sigmas``) or "unipc" (UniPC with ``use_flow_sigmas``): int64 truncated timesteps.

  Returns:
    ``(timesteps, sigmas)``.
  """
  if convention not in FLOW_CONVENTIONS:
    raise ValueError(f"unknown flow convention {convention!r}; expected one of {FLOW_CONVENTIONS}")
  if sigma_schedule not in _FLOW_SCHEDULES:
    raise ValueError(f"unknown sigma_schedule {sigma_schedule!r} for a flow grid; expected one of {_FLOW_SCHEDULES}")
  if time_shift_type not in flow.TIME_SHIFTS:
    raise ValueError(f"unknown time_shift_type {time_shift_type!r}; expected one of {flow.TIME_SHIFTS}")
  if convention != "euler" and (sigma_schedule is not None or sigmas is not None):
    raise ValueError(f"sigma_schedule and sigmas= apply to the flow Euler grid, not convention={convention!r}")
  if convention == "multistep" and (shift_terminal or (mu is not None and time_shift_type != "exponential")):
    raise ValueError("the multistep flow grid (DPM-Solver) takes neither shift_terminal nor a linear time shift")
  if mu is None and not shift > 0:
    raise ValueError(f"shift must be > 0, got {shift}")
  big_t = int(num_train_timesteps)
  if sigmas is not None:
    sig = np.asarray(sigmas).astype(np.float32)
    if sig.ndim != 1 or sig.shape[0] < 1 or (num_steps is not None and sig.shape[0] != int(num_steps)):
      raise ValueError(f"sigmas must be a 1-D list of num_steps={num_steps} levels, got shape {sig.shape}")
    n = sig.shape[0]
  else:
    if num_steps is None:
      raise ValueError("num_steps is required unless sigmas= is given")
    n = int(num_steps)
    if n < 1:
      raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  if convention == "multistep":
    s = float(np.exp(mu)) if mu is not None else shift  # DPM-Solver: flow_shift = exp(mu)
    sig = 1.0 - np.linspace(1, 1 / big_t, n + 1)
    sig = np.flip(flow.shift_time(sig, s))[:-1].copy()
    ts = (sig * big_t).astype(np.int64)
  elif convention == "unipc":
    sig = _shifted(np.linspace(1, 1 / big_t, n + 1)[:-1], shift, mu, time_shift_type)
    if shift_terminal:
      sig = flow.stretch_to_terminal(sig, shift_terminal)
    if np.fabs(sig[0] - 1) < 1e-6:
      sig[0] -= 1e-6  # UniPC's log(alpha) at sigma = 1
    ts = (sig * big_t).astype(np.int64)
  else:
    if sigmas is None:
      # the constructor's table range (statically shifted in float32 unless the shift is dynamic) ...
      ends = np.asarray([1.0, 1.0 / big_t], np.float32)
      if mu is None:
        ends = flow.shift_time(ends, float(shift)).astype(np.float32)
      hi, lo = float(ends[0]), float(ends[1])
      # ... spaced in float64 and shifted once more, as set_timesteps does
      sig = np.linspace(hi * big_t, lo * big_t, n) / big_t
    sig = _shifted(sig, shift, mu, time_shift_type)
    if shift_terminal:
      sig = flow.stretch_to_terminal(sig, shift_terminal)
    if sigma_schedule is not None:
      lo, hi = float(sig[-1]), float(sig[0])
      sig = {"karras": levels.karras, "exponential": levels.exponential, "beta": levels.beta}[sigma_schedule](
          lo, hi, n)
    sig = np.asarray(sig).astype(np.float32)
    ts = sig * np.float32(big_t)
  sig = np.concatenate([np.asarray(sig, np.float64), [0.0]]).astype(np.float32)
  if not (np.all(np.isfinite(sig)) and np.all(sig[:-1] > 0) and np.all(sig[:-1] <= 1)):
    raise ValueError(f"the flow levels must lie in (0, 1]; these options give {sig[:-1]}")
  return ts, sig


def flow_grid(num_steps: int | None = None, *, shift: float = 1.0, mu: float | None = None,
              time_shift_type: str = "exponential", shift_terminal: float | None = None,
              sigma_schedule: str | None = None, sigmas=None, num_train_timesteps: int = 1000,
              convention: str = "euler") -> Grid:
  """The :class:`~jdiff.samplers.grids.Grid` of a diffusers flow scheduler: alpha = 1 - sigma, sigma
  the flow levels of :func:`flow_sigmas` (same arguments), timesteps = sigma * T (float32 for
  ``"euler"``, int32 truncated for ``"multistep"`` and ``"unipc"``).

  Example:
    >>> g = flow_grid(28, shift=3.0)                                    # SD3's default
    >>> g = flow_grid(28, mu=flow.dynamic_shift_mu(4096))              # Flux-style dynamic shift
    >>> g = flow_grid(10, shift=3.0, convention="multistep")            # DPM-Solver++ on flow sigmas
  """
  ts, sig = flow_sigmas(num_steps, shift=shift, mu=mu, time_shift_type=time_shift_type, shift_terminal=shift_terminal,
                        sigma_schedule=sigma_schedule, sigmas=sigmas, num_train_timesteps=num_train_timesteps,
                        convention=convention)
  alpha = np.float32(1.0) - sig
  ts = ts.astype(np.float32) if convention == "euler" else ts.astype(np.int32)
  return Grid(ts, jnp.asarray(alpha), jnp.asarray(sig), jnp.asarray(alpha * alpha), final="zero", offset=0,
              total=int(ts.shape[0]))


def _resolve_mu(use_dynamic_shifting: bool, mu, image_seq_len, base_image_seq_len, max_image_seq_len, base_shift,
                max_shift):
  """mu of the dynamic shift: given, or from the image's sequence length (diffusers' pipelines)."""
  if not use_dynamic_shifting:
    if mu is not None or image_seq_len is not None:
      raise ValueError("mu= and image_seq_len= need use_dynamic_shifting=True")
    return None
  if mu is not None:
    if image_seq_len is not None:
      raise ValueError("pass mu= or image_seq_len=, not both")
    return mu
  if image_seq_len is None:
    raise ValueError("use_dynamic_shifting=True needs mu= or image_seq_len=")
  return flow.dynamic_shift_mu(image_seq_len, base_seq_len=base_image_seq_len, max_seq_len=max_image_seq_len,
                               base_shift=base_shift, max_shift=max_shift)


def solver_flow_grid(schedule, num_steps, *, convention: str, flow_shift: float = 1.0,
                     use_dynamic_shifting: bool = False, mu=None, time_shift_type: str = "exponential",
                     shift_terminal=None, final_sigmas_type: str = "zero", sigma_schedule=None, sigmas=None,
                     timesteps=None) -> Grid:
  """The flow grid of DPM-Solver (``convention="multistep"``) or UniPC (``"unipc"``) with diffusers'
  ``use_flow_sigmas=True`` options; refuses the options that do not combine with flow sigmas here."""
  if sigma_schedule is not None or sigmas is not None or timesteps is not None:
    raise ValueError("use_flow_sigmas=True takes no sigma schedule, sigmas= or timesteps=")
  if final_sigmas_type != "zero":
    raise ValueError("use_flow_sigmas=True lands on sigma = 0: final_sigmas_type must be 'zero'")
  if use_dynamic_shifting and mu is None:
    raise ValueError("use_dynamic_shifting=True needs mu=")
  if not use_dynamic_shifting and mu is not None:
    raise ValueError("mu= needs use_dynamic_shifting=True")
  return flow_grid(num_steps, shift=flow_shift, mu=mu, time_shift_type=time_shift_type,
                   shift_terminal=shift_terminal, num_train_timesteps=_num_train(schedule, None),
                   convention=convention)


# ----------------------------------------------------------------------------- rules


def flow_euler_rule(*, prediction: str = "flow", stochastic: bool = False) -> Rule:
  """Euler's method on dx/dsigma = v along a flow grid: x' = x + (sigma' - sigma) v.

  With ``stochastic`` (diffusers' ``stochastic_sampling``) each step instead re-noises the x0
  estimate x - sigma v to the next level with fresh noise: x' = (1 - sigma') x0 + sigma' z (needs a
  key; step i draws ``samplers.step_noise(split(key, n)[i], shape)``).

  Args:
    prediction: what the model outputs ("flow", or any of :mod:`jdiff.diffusion`'s types, converted).
    stochastic: re-noise at every step.

  Example:
    >>> x0 = solve(model_fn, flow_grid(28, shift=3.0), noise, flow_euler_rule())
  """
  prediction = diffusion.check_prediction(prediction)

  def step(model_fn, x, st: Step):
    out = base.call_model(model_fn, x, st.t)
    if stochastic:
      x0 = base.to_x0(out, x, st.alpha, st.sigma, prediction)
      return st.alpha_to * x0 + st.sigma_to * base.step_noise(st.key, x.shape)
    return x + (st.sigma_to - st.sigma) * base.to_flow(out, x, st.alpha, st.sigma, prediction)

  return Rule(init=lambda x, g: x, step=step, sample=lambda x: x, needs_key=lambda g: stochastic,
              with_sample=sample_is_state)


def flow_heun_rule(*, prediction: str = "flow") -> Rule:
  """Heun's method along a flow grid: an Euler predictor to the next level, then a trapezoidal
  corrector with the velocity there (2 n - 1 model calls; the step to sigma = 0 is plain Euler).

  Example:
    >>> x0 = solve(model_fn, flow_grid(10, shift=3.0), noise, flow_heun_rule())
  """
  prediction = diffusion.check_prediction(prediction)

  def init(x, g):
    return x, x, jnp.zeros_like(x)

  def step(model_fn, state, st: Step):
    x, x_saved, d_saved = state
    corr = st.plan
    a_in, s_in = jnp.where(corr, st.alpha_to, st.alpha), jnp.where(corr, st.sigma_to, st.sigma)
    d = base.to_flow(base.call_model(model_fn, x, st.t), x, a_in, s_in, prediction)
    dt = st.sigma_to - st.sigma
    x_next = jnp.where(corr, x_saved + 0.5 * (d_saved + d) * dt, x + d * dt)
    return x_next, jnp.where(corr, x_saved, x), jnp.where(corr, d_saved, d)

  return Rule(init=init, step=step, sample=lambda state: state[0], calls=_heun_calls)


# ----------------------------------------------------------------------------- facades


def _facade_grid(schedule, num_steps, shift, use_dynamic_shifting, mu, image_seq_len, base_shift, max_shift,
                 base_image_seq_len, max_image_seq_len, time_shift_type, shift_terminal, use_karras_sigmas,
                 use_exponential_sigmas, use_beta_sigmas, sigma_schedule, sigmas, num_train_timesteps) -> Grid:
  mu = _resolve_mu(use_dynamic_shifting, mu, image_seq_len, base_image_seq_len, max_image_seq_len, base_shift,
                   max_shift)
  sigma_schedule = levels.pick_sigma_schedule(sigma_schedule, use_karras_sigmas, use_exponential_sigmas,
                                              use_beta_sigmas)
  return flow_grid(num_steps, shift=shift, mu=mu, time_shift_type=time_shift_type, shift_terminal=shift_terminal,
                   sigma_schedule=sigma_schedule, sigmas=sigmas,
                   num_train_timesteps=_num_train(schedule, num_train_timesteps), convention="euler")


@base.register("flow_euler")
def flow_euler(model_fn, schedule, x_T: jax.Array, *, num_steps: int | None = None, key: jax.Array | None = None,
               prediction: str = "flow", shift: float = 1.0, use_dynamic_shifting: bool = False,
               mu: float | None = None, image_seq_len: int | None = None, base_shift: float = 0.5,
               max_shift: float = 1.15, base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
               time_shift_type: str = "exponential", shift_terminal: float | None = None,
               use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
               sigma_schedule: str | None = None, stochastic_sampling: bool = False, sigmas=None,
               num_train_timesteps: int | None = None, return_trajectory: bool = False):
  """Samples a flow model with Euler's method (diffusers' FlowMatchEulerDiscreteScheduler).

  Args:
    model_fn: ``(x [B, ...], t [B] float32) -> velocity``; t = sigma * num_train_timesteps.
    schedule: None (the flow path needs no alpha-bar table) or a Schedule, whose length then sets
      ``num_train_timesteps``.
    x_T: standard normal noise [B, ...] (the sample at sigma = 1).
    num_steps: number of model calls (None with ``sigmas``).
    key: PRNG key, needed with ``stochastic_sampling``.
    prediction: "flow" (diffusers' flow_prediction), or "epsilon" / "v" / "sample" converted.
    shift: the static shift (SD3: 3.0).
    use_dynamic_shifting, mu, image_seq_len, base_shift, max_shift, base_image_seq_len,
      max_image_seq_len: the dynamic shift: ``mu``, or mu from ``image_seq_len`` as the SD3/Flux
      pipelines compute it (:func:`jdiff.flow.dynamic_shift_mu`).
    time_shift_type: "exponential" or "linear" (dynamic shift).
    shift_terminal: the last nonzero level after stretching (LTX-Video).
    use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, sigma_schedule: respace the levels.
    stochastic_sampling: diffusers' stochastic sampling (:func:`flow_euler_rule`).
    sigmas: explicit unshifted levels [n] (diffusers' ``set_timesteps(sigmas=...)``).
    num_train_timesteps: T (default: the schedule's length, else 1000).
    return_trajectory: also return the sample after every step [n, B, ...].

  Returns:
    x_0 in float32 (and the trajectory when asked).

  Example:
    >>> x0 = samplers.flow_euler(model_fn, None, z, num_steps=28, shift=3.0)
  """
  g = _facade_grid(schedule, num_steps, shift, use_dynamic_shifting, mu, image_seq_len, base_shift, max_shift,
                   base_image_seq_len, max_image_seq_len, time_shift_type, shift_terminal, use_karras_sigmas,
                   use_exponential_sigmas, use_beta_sigmas, sigma_schedule, sigmas, num_train_timesteps)
  rule = flow_euler_rule(prediction=prediction, stochastic=stochastic_sampling)
  return solve(model_fn, g, x_T, rule, key=key, return_trajectory=return_trajectory)


@base.register("flow_heun")
def flow_heun(model_fn, schedule, x_T: jax.Array, *, num_steps: int | None = None, key: jax.Array | None = None,
              prediction: str = "flow", shift: float = 1.0, use_dynamic_shifting: bool = False,
              mu: float | None = None, image_seq_len: int | None = None, base_shift: float = 0.5,
              max_shift: float = 1.15, base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
              time_shift_type: str = "exponential", shift_terminal: float | None = None,
              use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
              sigma_schedule: str | None = None, sigmas=None, num_train_timesteps: int | None = None,
              return_trajectory: bool = False):
  """Samples a flow model with Heun's method (diffusers' FlowMatchHeunDiscreteScheduler).

  ``num_steps`` levels cost 2 n - 1 model calls. diffusers' Heun scheduler has only ``shift``; the
  other grid options (dynamic shift, ``shift_terminal``, sigma schedules, ``sigmas``) are those of
  :func:`flow_euler`, whose grid this sampler shares.

  Args:
    model_fn, schedule, x_T, num_steps, prediction, shift, ...: as in :func:`flow_euler`.
    key: unused (deterministic); accepted for a uniform signature.
    return_trajectory: also return the sample after every model call [2 n - 1, B, ...].

  Returns:
    x_0 in float32 (and the trajectory when asked).

  Example:
    >>> x0 = samplers.flow_heun(model_fn, None, z, num_steps=14, shift=3.0)
  """
  del key
  g = _facade_grid(schedule, num_steps, shift, use_dynamic_shifting, mu, image_seq_len, base_shift, max_shift,
                   base_image_seq_len, max_image_seq_len, time_shift_type, shift_terminal, use_karras_sigmas,
                   use_exponential_sigmas, use_beta_sigmas, sigma_schedule, sigmas, num_train_timesteps)
  return solve(model_fn, g, x_T, flow_heun_rule(prediction=prediction), return_trajectory=return_trajectory)
