"""Samplers: pure functions of a model function, each one XLA program (``lax.scan``).

``sample(method, model_fn, schedule, x_T, *, num_steps, key=None, **options)`` dispatches by name;
each method is also importable directly (``samplers.ddim(...)``). Options keep diffusers' names
and meanings (``timestep_spacing``, ``steps_offset``, ``prediction``, ``eta``, ...).
``calibrate_timesteps`` fits the ``sigmas=`` grid of a multistep solver to a model
(:mod:`jdiff.samplers.calibrate`).

Example:
  >>> x0 = jax.jit(lambda z: samplers.sample("ddim", model_fn, sched, z, num_steps=20))(z)
"""

from __future__ import annotations

import jax

from jdiff.samplers._common import available, get, register, spaced_timesteps
from jdiff.samplers.calibrate import calibrate_timesteps
from jdiff.samplers.ddim import ddim
from jdiff.samplers.ddpm import ddpm
from jdiff.samplers.dpm_solver import dpm_solver
from jdiff.samplers.euler import euler, euler_ancestral, heun
from jdiff.samplers.lcm import lcm
from jdiff.samplers.unipc import unipc

__all__ = ["sample", "available", "register", "spaced_timesteps", "ddim", "ddpm", "dpm_solver", "euler",
           "euler_ancestral", "heun", "unipc", "lcm", "calibrate_timesteps"]


def sample(method: str, model_fn, schedule, x_T: jax.Array, *, num_steps: int | None = None,
           key: jax.Array | None = None, **options):
  """Runs the sampler registered as ``method`` (see :func:`available`) from ``x_T`` to x_0."""
  fn = get(method)
  return fn(model_fn, schedule, x_T, num_steps=num_steps, key=key, **options)
