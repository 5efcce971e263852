"""DDIM (Song et al., 2021): x_{s} = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z.

``eta`` = 0 is the deterministic sampler (the Euler method of the probability-flow ODE in the
variables x/alpha and sigma/alpha); ``eta`` = 1 recovers DDPM's posterior variance. Matches
diffusers' ``DDIMScheduler`` option for option: the previous timestep is t - T // num_steps, the
last step lands on alpha-bar = 1 (``set_alpha_to_one``) or alpha-bar_0, and noise is added on
every step when eta > 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion
from jdiff.samplers import base, levels
from jdiff.samplers.grids import cut, grid
from jdiff.samplers.driver import Rule, sample_is_state, solve
from jdiff.schedules import Schedule

__all__ = ["ddim", "ddim_rule"]


def ddim_rule(eta: float = 0.0, *, prediction: str = "epsilon", postprocess=None,
              use_clipped_model_output: bool = False, target_alpha_bar=None) -> Rule:
  """The DDIM update x_s = alpha_s x0_hat + sqrt(sigma_s^2 - std^2) eps_hat + std z (a VP rule).

  Args:
    eta: stochasticity: std = eta sqrt((1 - abar_s) / (1 - abar_t) (1 - abar_t / abar_s)).
    prediction: what the model outputs ("epsilon", "v" or "sample").
    postprocess: ``x0 -> x0`` applied to the data estimate (clipping, thresholding), or None.
    use_clipped_model_output: recompute eps_hat from the post-processed x0 (diffusers' option).
    target_alpha_bar: [n] alpha-bars to land on instead of the grid's next levels (diffusers'
      DDIMScheduler steps to t - T // n, off the grid for some spacings).

  Example:
    >>> x0 = solve(model_fn, grid(sched, 50, convention="discrete"), x_T, ddim_rule())
  """
  prediction = diffusion.check_prediction(prediction)
  stochastic = not (isinstance(eta, (int, float)) and eta == 0)
  post = postprocess or (lambda x0: x0)

  def step(model_fn, x, s):
    at = s.alpha_bar
    ap = s.alpha_bar_to if target_alpha_bar is None else s.plan
    out = base.call_model(model_fn, x, s.t)
    alpha, sigma = at ** 0.5, (1.0 - at) ** 0.5
    x0 = diffusion.to_x0(out, x, alpha, sigma, prediction)
    eps = diffusion.to_epsilon(out, x, alpha, sigma, prediction)
    x0 = post(x0)
    variance = ((1.0 - ap) / (1.0 - at)) * (1.0 - at / ap)
    std = eta * variance ** 0.5
    if use_clipped_model_output:
      eps = (x - alpha * x0) / sigma
    x_prev = ap ** 0.5 * x0 + (1.0 - ap - std ** 2) ** 0.5 * eps
    if stochastic:
      x_prev = x_prev + std * base.step_noise(s.key, x.shape)
    return x_prev

  plan = (lambda g: None) if target_alpha_bar is None else (
      lambda g: jnp.asarray(target_alpha_bar, jnp.float32)[g.offset:g.offset + g.num_steps])
  return Rule(init=lambda x, g: x, step=step, sample=lambda x: x, plan=plan, needs_key=lambda g: stochastic,
              with_sample=sample_is_state)


@base.register("ddim")
def ddim(model_fn, schedule: Schedule, x_T: jax.Array, *, num_steps: int, eta: float = 0.0,
         key: jax.Array | None = None, prediction: str = "epsilon", timestep_spacing: str = "leading",
         steps_offset: int = 0, set_alpha_to_one: bool = True, clip_sample: bool = False,
         clip_sample_range: float = 1.0, thresholding: bool = False,
         dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
         use_clipped_model_output: bool = False, prev_from_grid: bool = False,
         start_step: int = 0, return_trajectory: bool = False):
  """Samples with DDIM.

  Args:
    model_fn: ``(x [B, ...], t [B] int32) -> output`` of type ``prediction``.
    schedule: the training noise schedule.
    x_T: the starting noise [B, ...] (NHWC for images).
    num_steps: number of model calls.
    eta: stochasticity, 0 (deterministic) to 1 (DDPM-like); needs ``key`` when non-zero.
    key: PRNG key for the eta noise.
    prediction: "epsilon", "v" or "sample".
    timestep_spacing, steps_offset, set_alpha_to_one, clip_sample, clip_sample_range,
    thresholding, dynamic_thresholding_ratio, sample_max_value, use_clipped_model_output:
      as in diffusers' DDIMScheduler (note: jdiff defaults ``clip_sample`` to False).
    prev_from_grid: step to the next timestep of the grid. diffusers' DDIMScheduler always steps to
      ``t - T // num_steps``, which is off the grid when the spacing is "trailing"/"linspace" and
      ``num_steps`` does not divide T (the sample is then labelled with the wrong noise level).
      False (default) reproduces diffusers; True follows the DDIM paper's subsequence.
    start_step: skip the first ``start_step`` timesteps of the grid and start from ``x_T`` taken to
      be at timestep ``grid[start_step]`` (image-to-image, as diffusers' pipelines slice
      ``scheduler.timesteps[t_start:]``).
    return_trajectory: also return the state after every step, [num_steps, B, ...].

  Returns:
    The sample x_0 in float32 (and the trajectory when asked).

  Example:
    >>> x0 = jax.jit(lambda z: samplers.ddim(model_fn, sched, z, num_steps=50))(z)
  """
  num_t = schedule.num_timesteps
  g = grid(schedule, num_steps, spacing=timestep_spacing, steps_offset=steps_offset, convention="discrete",
           final="zero" if set_alpha_to_one else "sigma_min")
  ts = levels.spaced_timesteps(num_t, num_steps, timestep_spacing, steps_offset)
  prev = np.concatenate([ts[1:], [-1]]) if prev_from_grid else ts - num_t // num_steps
  target = None
  if np.any(prev[:-1] != ts[1:]) or prev[-1] >= 0:  # diffusers' DDIM steps off the grid
    final = jnp.float32(1.0) if set_alpha_to_one else schedule.alphas_cumprod[0]
    target = jnp.where(jnp.asarray(prev >= 0), schedule.alphas_cumprod[np.maximum(prev, 0)], final)
  if not 0 <= int(start_step) < num_steps:
    raise ValueError(f"start_step must be in [0, {num_steps}), got {start_step}")
  g = cut(g, int(start_step))
  post = functools.partial(base.process_x0, clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                           thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                           sample_max_value=sample_max_value)
  rule = ddim_rule(eta, prediction=prediction, postprocess=post, use_clipped_model_output=use_clipped_model_output,
                   target_alpha_bar=target)
  return solve(model_fn, g, x_T, rule, key=key, return_trajectory=return_trajectory)
