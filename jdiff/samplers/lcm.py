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

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion
from jdiff.samplers import _common
from jdiff.schedules import Schedule

__all__ = ["lcm", "lcm_timesteps", "boundary_scalings"]

SIGMA_DATA = 0.5


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


def boundary_scalings(t: jax.Array, timestep_scaling: float = 10.0) -> tuple[jax.Array, jax.Array]:
  """c_skip(t), c_out(t) of the consistency parameterisation (sigma_data = 0.5)."""
  scaled = jnp.asarray(t, jnp.float32) * timestep_scaling
  c_skip = SIGMA_DATA ** 2 / (scaled * scaled + SIGMA_DATA ** 2)
  c_out = scaled / jnp.sqrt(scaled * scaled + SIGMA_DATA ** 2)
  return c_skip, c_out


@_common.register("lcm")
def lcm(model_fn, schedule: Schedule, x_T: jax.Array, *, num_steps: int, key: jax.Array | None = None,
        prediction: str = "epsilon", original_inference_steps: int = 50, timestep_scaling: float = 10.0,
        set_alpha_to_one: bool = True, timestep_spacing: str = "leading", steps_offset: int = 0,
        clip_sample: bool = False, clip_sample_range: float = 1.0, thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
        return_trajectory: bool = False):
  """Samples with LCM multistep consistency sampling.

  Args:
    model_fn: ``(x [B, ...], t [B] int32) -> output`` of type ``prediction``.
    schedule: the training noise schedule.
    x_T: unit-variance starting noise [B, ...].
    num_steps: number of model calls (1 to ``original_inference_steps``).
    key: PRNG key; needed when num_steps > 1 (step i re-noises with
      ``_common.step_noise(split(key, num_steps)[i], shape)``).
    prediction: "epsilon", "v" or "sample".
    original_inference_steps, timestep_scaling, set_alpha_to_one, clip_sample, clip_sample_range,
    thresholding, dynamic_thresholding_ratio, sample_max_value: as in diffusers' LCMScheduler.
    timestep_spacing, steps_offset: accepted for a uniform signature; LCMScheduler's timesteps
      come from ``original_inference_steps`` and ignore them, so only the defaults are allowed.
    return_trajectory: also return the state after every step.

  Returns:
    x_0 in float32 (and the trajectory when asked).

  Example:
    >>> x0 = samplers.lcm(model_fn, sched, z, num_steps=4, key=jax.random.key(0))
  """
  if timestep_spacing != "leading" or steps_offset != 0:
    raise ValueError("lcm's timesteps come from original_inference_steps: timestep_spacing and steps_offset "
                     f"cannot be changed (got {timestep_spacing!r}, {steps_offset})")
  ts = lcm_timesteps(schedule.num_timesteps, num_steps, original_inference_steps)
  n = len(ts)
  x, prediction, keys = _common.prepare(x_T, prediction, key, n, n > 1)
  abar = schedule.alphas_cumprod
  final = jnp.float32(1.0) if set_alpha_to_one else abar[0]
  prev = np.concatenate([ts[1:], ts[-1:]])  # the last step's "previous" timestep is itself (unused)
  a_t = abar[ts]
  a_prev = jnp.where(jnp.asarray(prev >= 0), abar[np.maximum(prev, 0)], final)
  last = jnp.asarray(np.arange(n) == n - 1)
  post = dict(clip_sample=clip_sample, clip_sample_range=clip_sample_range, thresholding=thresholding,
              dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value)

  def step(x, inputs):
    t, at, ap, is_last, k = inputs
    out = _common.call_model(model_fn, x, t)
    x0 = _common.process_x0(diffusion.to_x0(out, x, jnp.sqrt(at), jnp.sqrt(1.0 - at), prediction), **post)
    c_skip, c_out = boundary_scalings(t, timestep_scaling)
    denoised = c_out * x0 + c_skip * x
    if n > 1:
      renoised = jnp.sqrt(ap) * denoised + jnp.sqrt(1.0 - ap) * _common.step_noise(k, x.shape)
      x_next = jnp.where(is_last, denoised, renoised)
    else:
      x_next = denoised
    return x_next, (x_next if return_trajectory else None)

  x, traj = jax.lax.scan(step, x, (jnp.asarray(ts, jnp.int32), a_t, a_prev, last, keys))
  return (x, traj) if return_trajectory else x
