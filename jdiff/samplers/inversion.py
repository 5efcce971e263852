"""DDIM inversion: the deterministic DDIM update run from data towards noise (image -> latent noise).

Each step takes a sample labelled with alpha-bar a_s to the next, noisier level a_t by
x_t = sqrt(a_t) x0_hat + sqrt(1 - a_t) eps_hat, where the model is evaluated at the *target*
timestep t on the current sample (the usual first-order approximation eps(x_s, s) ~ eps(x_s, t) that
makes the inversion explicit). The numbers are those of diffusers' ``DDIMInverseScheduler``:

* timesteps ascend: "leading" 0, r, 2r, ... (r = T // n) plus ``steps_offset``; "trailing"
  round(T / n, 2 T / n, ..., T) - 1;
* a step to timestep t starts from the level labelled ``min(t - T // n, T - 1)``, alpha-bar 1 (or
  alpha-bar_0 when ``set_alpha_to_one`` is False) when that is negative. With "trailing" spacing this
  label need not be the previous timestep of the grid, so the rule takes these source levels as data.

The inversion grid ascends (level 0 is the data end, level n the noisiest); :func:`ddim_inversion_rule`
runs on it with :func:`jdiff.samplers.solve` like any other rule.

Example:
  >>> z_T = jax.jit(lambda z0: samplers.ddim_inversion(model_fn, sched, z0, num_steps=50))(z0)
  >>> z0_again = samplers.ddim(model_fn, sched, z_T, num_steps=50)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion
from jdiff.samplers import base, levels
from jdiff.samplers.driver import Rule, solve
from jdiff.samplers.grids import Grid
from jdiff.schedules import Schedule

__all__ = ["ddim_inversion", "ddim_inversion_rule", "inversion_grid", "INVERSION_SPACINGS"]

# diffusers' DDIMInverseScheduler implements these two spacings only.
INVERSION_SPACINGS = ("leading", "trailing")


def inversion_grid(schedule: Schedule, num_steps: int, *, timestep_spacing: str = "leading", steps_offset: int = 0,
                   set_alpha_to_one: bool = True) -> tuple[Grid, jax.Array]:
  """The ascending grid of a DDIM inversion and the alpha-bar each step starts from.

  Args:
    schedule: the training noise schedule.
    num_steps: number of inversion steps n (model calls).
    timestep_spacing: "leading" or "trailing" (diffusers' ``DDIMInverseScheduler``).
    steps_offset: added to the "leading" timesteps (diffusers' ``steps_offset``).
    set_alpha_to_one: the first step starts from alpha-bar 1 (True) or from alpha-bar_0 (False).

  Returns:
    ``(grid, source_alpha_bar)``: the grid's ``timesteps`` [n] ascend (the model is told step i's
    target timestep) and its levels [n + 1] are the start level followed by alpha-bar at each
    timestep; ``source_alpha_bar`` [n] is the level diffusers labels the sample with at the start of
    each step (equal to the grid's levels 0..n-1 for "leading" spacing).

  Example:
    >>> g, src = inversion_grid(sched, 10, timestep_spacing="trailing")
    >>> g.timesteps[:3].tolist()  # [99, 199, 299]
  """
  if timestep_spacing not in INVERSION_SPACINGS:
    raise ValueError(f"DDIM inversion supports timestep_spacing in {INVERSION_SPACINGS} "
                     f"(as diffusers' DDIMInverseScheduler), got {timestep_spacing!r}")
  num_t = schedule.num_timesteps
  ts = levels.spaced_timesteps(num_t, num_steps, timestep_spacing, steps_offset)[::-1].copy()  # ascending
  src_t = np.minimum(ts - num_t // int(num_steps), num_t - 1)
  abar = schedule.alphas_cumprod
  start = jnp.float32(1.0) if set_alpha_to_one else abar[0]
  src = jnp.where(jnp.asarray(src_t >= 0), abar[np.maximum(src_t, 0)], start)
  lv = jnp.concatenate([src[:1], abar[ts]]).astype(jnp.float32)
  g = Grid(np.asarray(ts, np.int32), jnp.sqrt(lv), jnp.sqrt(1.0 - lv), lv, final="sigma_min", offset=0,
           total=int(ts.shape[0]))
  return g, src.astype(jnp.float32)


def ddim_inversion_rule(*, prediction: str = "epsilon", postprocess=None, source_alpha_bar=None) -> Rule:
  """The inverse DDIM update x_t = sqrt(a_t) x0_hat + sqrt(1 - a_t) eps_hat on an ascending grid.

  Args:
    prediction: what the model outputs ("epsilon", "v" or "sample").
    postprocess: ``x0 -> x0`` applied to the data estimate (clipping), or None. eps_hat is taken
      from the model output before it, as diffusers does.
    source_alpha_bar: [n] alpha-bars the samples are read at (x0_hat, eps_hat) instead of the grid's
      levels 0..n-1 (the second output of :func:`inversion_grid`); indexed by the uncut grid's step.

  Example:
    >>> g, src = inversion_grid(sched, 50)
    >>> z_T = solve(model_fn, g, z_0, ddim_inversion_rule(source_alpha_bar=src))
  """
  prediction = diffusion.check_prediction(prediction)
  post = postprocess or (lambda x0: x0)

  def step(model_fn, x, s):
    a_s = s.alpha_bar if source_alpha_bar is None else s.plan
    a_t = s.alpha_bar_to
    out = base.call_model(model_fn, x, s.t)
    alpha, sigma = a_s ** 0.5, (1.0 - a_s) ** 0.5
    x0 = post(diffusion.to_x0(out, x, alpha, sigma, prediction))
    eps = diffusion.to_epsilon(out, x, alpha, sigma, prediction)
    return a_t ** 0.5 * x0 + (1.0 - a_t) ** 0.5 * eps

  plan = (lambda g: None) if source_alpha_bar is None else (
      lambda g: jnp.asarray(source_alpha_bar, jnp.float32)[g.offset:g.offset + g.num_steps])
  return Rule(init=lambda x, g: x, step=step, sample=lambda x: x, plan=plan)


def ddim_inversion(model_fn, schedule: Schedule, x_0: jax.Array, *, num_steps: int, prediction: str = "epsilon",
                   timestep_spacing: str = "leading", steps_offset: int = 0, set_alpha_to_one: bool = True,
                   clip_sample: bool = False, clip_sample_range: float = 1.0, return_trajectory: bool = False):
  """Inverts DDIM: runs the deterministic update from data ``x_0`` to the noise ``x_T`` it came from.

  Args:
    model_fn: ``(x [B, ...], t [B] int32) -> output`` of type ``prediction`` (conditioning closed over;
      for an image under a prompt, the guided model function).
    schedule: the training noise schedule.
    x_0: the clean sample (latents) [B, ...] (NHWC for images).
    num_steps: number of model calls.
    prediction: "epsilon", "v" or "sample".
    timestep_spacing, steps_offset, set_alpha_to_one, clip_sample, clip_sample_range: as in diffusers'
      ``DDIMInverseScheduler`` (its deprecated ``set_alpha_to_zero`` is the same flag as
      ``set_alpha_to_one``; jdiff defaults ``clip_sample`` to False).
    return_trajectory: also return the sample after every step, [num_steps, B, ...].

  Returns:
    The inverted noise x_T in float32 (and the trajectory when asked). Sampling it back with
    ``samplers.ddim`` on the same number of steps and spacing approximately recovers ``x_0``.

  Example:
    >>> z_T = jax.jit(lambda z0: samplers.ddim_inversion(model_fn, sched, z0, num_steps=50))(z0)
  """
  g, src = inversion_grid(schedule, num_steps, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
                          set_alpha_to_one=set_alpha_to_one)
  post = functools.partial(base.process_x0, clip_sample=clip_sample, clip_sample_range=clip_sample_range)
  rule = ddim_inversion_rule(prediction=prediction, postprocess=post, source_alpha_bar=src)
  return solve(model_fn, g, x_0, rule, return_trajectory=return_trajectory)
