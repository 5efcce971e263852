"""Latent-consistency / consistency-model multistep sampling (diffusers' ``LCMScheduler``).

Each step maps x_t to the model's consistency estimate of x_0,
``denoised = c_out(t) x0_hat + c_skip(t) x_t`` with the boundary-condition scalings of Song et
al. (sigma_data = 0.5, timestep scaled by ``timestep_scaling``), then re-noises it to the next
timestep with fresh noise (no noise after the last step). The timesteps are a subset of the
``original_inference_steps``-point skipping schedule the model was distilled on. The same
function serves consistency-model sampling.

Example:
  >>> x0 = samplers.lcm(model_fn, sched, z, num_steps=4, key=jax.random.key(0))
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import consistency, diffusion
from jdiff.samplers import base
from jdiff.samplers.grids import grid
from jdiff.samplers.driver import Rule, sample_is_state, solve
from jdiff.schedules import Schedule

__all__ = ["lcm", "lcm_rule", "lcm_timesteps", "boundary_scalings"]

# one definition, in jdiff.consistency; kept importable from here
boundary_scalings = consistency.boundary_scalings


def lcm_timesteps(num_train: int, num_steps: int, original_inference_steps: int = 50) -> np.ndarray:
  """The descending integer timesteps of LCMScheduler.set_timesteps (strength 1)."""
  n, big_t, orig = int(num_steps), int(num_train), int(original_inference_steps)
  if orig > big_t:
    raise ValueError(f"original_inference_steps={orig} exceeds the schedule's {big_t} training timesteps")
  if n < 1 or n > orig:
    raise ValueError(f"num_steps must be in [1, original_inference_steps={orig}], got {num_steps}")
  k = big_t // orig
  origin = (np.arange(1, orig + 1) * k - 1)[::-1]
  idx = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
  return origin[idx].copy()


def lcm_rule(*, prediction: str = "epsilon", timestep_scaling: float = 10.0, postprocess=None) -> Rule:
  """The multistep consistency step: denoise to c_out x0_hat + c_skip x_t, then re-noise to the next
  level with fresh noise (not after the last step of the grid; a VP rule).

  Example:
    >>> x0 = solve(model_fn, grid(sched, timesteps=lcm_timesteps(1000, 4), convention="discrete"), x_T,
    ...            lcm_rule(), key=key)
  """
  prediction = diffusion.check_prediction(prediction)
  post = postprocess or (lambda x0: x0)

  def step(model_fn, x, s):
    at, ap = s.alpha_bar, s.alpha_bar_to
    out = base.call_model(model_fn, x, s.t)
    x0 = post(diffusion.to_x0(out, x, jnp.sqrt(at), jnp.sqrt(1.0 - at), prediction))
    c_skip, c_out = consistency.boundary_scalings(s.t, timestep_scaling=timestep_scaling)
    denoised = c_out * x0 + c_skip * x
    if not jax.dtypes.issubdtype(s.key.dtype, jax.dtypes.prng_key):  # a one-step grid draws no noise
      return denoised
    renoised = jnp.sqrt(ap) * denoised + jnp.sqrt(1.0 - ap) * base.step_noise(s.key, x.shape)
    return jnp.where(s.last, denoised, renoised)

  return Rule(init=lambda x, g: x, step=step, sample=lambda x: x, needs_key=lambda g: g.total > 1,
              with_sample=sample_is_state)


@base.register("lcm")
def lcm(model_fn, schedule: Schedule, x_T: jax.Array, *, num_steps: int, key: jax.Array | None = None,
        prediction: str = "epsilon", original_inference_steps: int = 50, timestep_scaling: float = 10.0,
        set_alpha_to_one: bool = True, clip_sample: bool = False, clip_sample_range: float = 1.0,
        thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
        return_trajectory: bool = False):
  """Samples with LCM multistep consistency sampling.

  Args:
    model_fn: ``(x [B, ...], t [B] int32) -> output`` of type ``prediction``.
    schedule: the training noise schedule.
    x_T: unit-variance starting noise [B, ...].
    num_steps: number of model calls (1 to ``original_inference_steps``).
    key: PRNG key; needed when num_steps > 1 (step i re-noises with
      ``samplers.step_noise(split(key, num_steps)[i], shape)``).
    prediction: "epsilon", "v" or "sample".
    original_inference_steps, timestep_scaling, set_alpha_to_one, clip_sample, clip_sample_range,
    thresholding, dynamic_thresholding_ratio, sample_max_value: as in diffusers' LCMScheduler.
    LCMScheduler's ``timestep_spacing`` / ``steps_offset`` are not options: its timesteps come from
    ``original_inference_steps`` alone.
    return_trajectory: also return the state after every step.

  Returns:
    x_0 in float32 (and the trajectory when asked).

  Example:
    >>> x0 = samplers.lcm(model_fn, sched, z, num_steps=4, key=jax.random.key(0))
  """
  ts = lcm_timesteps(schedule.num_timesteps, num_steps, original_inference_steps)
  g = grid(schedule, timesteps=ts, convention="discrete", final="zero" if set_alpha_to_one else "sigma_min")
  post = functools.partial(base.process_x0, clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                           thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                           sample_max_value=sample_max_value)
  rule = lcm_rule(prediction=prediction, timestep_scaling=timestep_scaling, postprocess=post)
  return solve(model_fn, g, x_T, rule, key=key, return_trajectory=return_trajectory)
