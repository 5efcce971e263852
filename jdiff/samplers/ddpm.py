"""Ancestral DDPM sampling (Ho et al., 2020): x_{t-1} ~ N(mu~(x_t, x0_hat), var_t).

With ``num_steps`` below the training length the chain runs on a spaced subset of timesteps,
each step using the posterior between consecutive visited timesteps (as diffusers'
``DDPMScheduler`` does). Noise is added on every step whose timestep is > 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion
from jdiff.samplers import base
from jdiff.samplers.grids import cut, grid
from jdiff.samplers.driver import Rule, sample_is_state, solve
from jdiff.schedules import Schedule

__all__ = ["ddpm", "ddpm_rule", "VARIANCE_TYPES"]

# diffusers also lists "fixed_large_log", whose step takes the square root of log(beta_t) < 0 and
# so yields NaN; it is not offered here.
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")


def ddpm_rule(variance_type: str = "fixed_small", *, prediction: str = "epsilon", postprocess=None) -> Rule:
  """The ancestral DDPM step: x_s ~ N(posterior mean(x_t, x0_hat), var) between grid levels (a VP rule).

  Noise is added on every step whose model timestep is > 0 (diffusers' rule). For "learned" and
  "learned_range" the model output has twice the channels (last axis): prediction, then variance.

  Example:
    >>> x0 = solve(model_fn, grid(sched, 1000, convention="discrete"), x_T, ddpm_rule(), key=key)
  """
  if variance_type not in VARIANCE_TYPES:
    raise ValueError(f"unknown variance_type {variance_type!r}; expected one of {VARIANCE_TYPES}")
  prediction = diffusion.check_prediction(prediction)
  post = postprocess or (lambda x0: x0)
  learned = variance_type in ("learned", "learned_range")

  def step(model_fn, x, s):
    t, at, ap = s.t, s.alpha_bar, s.alpha_bar_to
    out = base.call_model(model_fn, x, t)
    channels = x.shape[-1]
    pred_var = None
    if learned:
      if out.shape[-1] != 2 * channels:
        raise ValueError(f"variance_type={variance_type!r} needs {2 * channels} output channels, "
                         f"got {out.shape[-1]}")
      out, pred_var = out[..., :channels], out[..., channels:]
    beta_prod_t, beta_prod_prev = 1.0 - at, 1.0 - ap
    cur_alpha = at / ap
    cur_beta = 1.0 - cur_alpha
    x0 = post(diffusion.to_x0(out, x, at ** 0.5, beta_prod_t ** 0.5, prediction))
    mean = (ap ** 0.5 * cur_beta / beta_prod_t) * x0 + (cur_alpha ** 0.5 * beta_prod_prev / beta_prod_t) * x
    var = jnp.maximum(beta_prod_prev / beta_prod_t * cur_beta, 1e-20)
    if variance_type == "fixed_small":
      std = var ** 0.5
    elif variance_type == "fixed_small_log":
      std = jnp.exp(0.5 * jnp.log(var))
    elif variance_type == "fixed_large":
      std = cur_beta ** 0.5
    elif variance_type == "learned":
      std = pred_var ** 0.5
    else:  # learned_range
      frac = (pred_var + 1.0) / 2.0
      std = jnp.exp(0.5 * (frac * jnp.log(cur_beta) + (1.0 - frac) * jnp.log(var)))
    noise = base.step_noise(s.key, x.shape)
    return mean + jnp.where(t > 0, std * noise, 0.0)

  return Rule(init=lambda x, g: x, step=step, sample=lambda x: x, needs_key=lambda g: True, with_sample=sample_is_state)


@base.register("ddpm")
def ddpm(model_fn, schedule: Schedule, x_T: jax.Array, *, key: jax.Array | None = None,
         num_steps: int | None = None, variance_type: str = "fixed_small", prediction: str = "epsilon",
         timestep_spacing: str = "leading", steps_offset: int = 0, clip_sample: bool = False,
         clip_sample_range: float = 1.0, thresholding: bool = False,
         dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
         start_step: int = 0, return_trajectory: bool = False):
  """Samples with the DDPM ancestral sampler.

  Args:
    model_fn: ``(x [B, ...], t [B] int32) -> output``; for ``variance_type`` "learned" or
      "learned_range" the output has twice the channels (last axis): prediction, then variance.
    schedule: the training noise schedule.
    x_T: starting noise [B, ...].
    key: PRNG key (required: the sampler is stochastic).
    num_steps: number of steps; None runs all T training timesteps.
    variance_type: one of ``VARIANCE_TYPES`` with diffusers' meaning.
    prediction, timestep_spacing, steps_offset, clip_sample, clip_sample_range, thresholding,
    dynamic_thresholding_ratio, sample_max_value: as in diffusers' DDPMScheduler (jdiff defaults
      ``clip_sample`` to False).
    start_step: skip the first ``start_step`` timesteps of the grid and start from ``x_T`` taken to
      be at timestep ``grid[start_step]`` (image-to-image, as diffusers' pipelines slice
      ``scheduler.timesteps[t_start:]``).
    return_trajectory: also return the state after every step.

  Returns:
    x_0 in float32 (and the trajectory when asked).
  """
  num_t = schedule.num_timesteps
  if num_steps is None:
    g = grid(schedule, timesteps=np.arange(num_t)[::-1].copy(), convention="discrete")
  else:
    g = grid(schedule, num_steps, spacing=timestep_spacing, steps_offset=steps_offset, convention="discrete")
  if not 0 <= int(start_step) < g.num_steps:
    raise ValueError(f"start_step must be in [0, {g.num_steps}), got {start_step}")
  post = functools.partial(base.process_x0, clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                           thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                           sample_max_value=sample_max_value)
  rule = ddpm_rule(variance_type, prediction=prediction, postprocess=post)
  return solve(model_fn, cut(g, int(start_step)), x_T, rule, key=key, return_trajectory=return_trajectory)
