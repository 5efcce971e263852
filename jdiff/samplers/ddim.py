"""DDIM (Song et al., 2021): x_{s} = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z.

``eta`` = 0 is the deterministic sampler (the Euler method of the probability-flow ODE in the
variables x/alpha and sigma/alpha); ``eta`` = 1 recovers DDPM's posterior variance. Matches
diffusers' ``DDIMScheduler`` option for option: the previous timestep is t - T // num_steps, the
last step lands on alpha-bar = 1 (``set_alpha_to_one``) or alpha-bar_0, and noise is added on
every step when eta > 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion
from jdiff.samplers import _common
from jdiff.schedules import Schedule

__all__ = ["ddim"]


@_common.register("ddim")
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
  ts = _common.spaced_timesteps(num_t, num_steps, timestep_spacing, steps_offset)
  prev = np.concatenate([ts[1:], [-1]]) if prev_from_grid else ts - num_t // num_steps
  ts, prev = _common.skip_steps(ts, prev, start_step)
  stochastic = not (isinstance(eta, (int, float)) and eta == 0)
  x, prediction, keys = _common.prepare(x_T, prediction, key, len(ts), stochastic)

  abar = schedule.alphas_cumprod
  final = jnp.float32(1.0) if set_alpha_to_one else abar[0]
  a_t = abar[ts]
  a_prev = jnp.where(jnp.asarray(prev >= 0), abar[np.maximum(prev, 0)], final)
  post = dict(clip_sample=clip_sample, clip_sample_range=clip_sample_range, thresholding=thresholding,
              dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value)

  def step(x, inputs):
    t, at, ap, k = inputs
    out = _common.call_model(model_fn, x, t)
    alpha, sigma = at ** 0.5, (1.0 - at) ** 0.5
    x0 = diffusion.to_x0(out, x, alpha, sigma, prediction)
    eps = diffusion.to_epsilon(out, x, alpha, sigma, prediction)
    x0 = _common.process_x0(x0, **post)
    variance = ((1.0 - ap) / (1.0 - at)) * (1.0 - at / ap)
    std = eta * variance ** 0.5
    if use_clipped_model_output:
      eps = (x - alpha * x0) / sigma
    x_prev = ap ** 0.5 * x0 + (1.0 - ap - std ** 2) ** 0.5 * eps
    if stochastic:
      x_prev = x_prev + std * _common.step_noise(k, x.shape)
    return x_prev, (x_prev if return_trajectory else None)

  x, traj = jax.lax.scan(step, x, (jnp.asarray(ts, jnp.int32), a_t, a_prev, keys))
  return (x, traj) if return_trajectory else x
