"""Samplers: a grid (where the steps fall) plus a step rule (how one step moves), one ``lax.scan``.

Research code composes the pieces::

  g = samplers.grid(sched, 10, sigmas="karras")           # levels + model timesteps (a pytree)
  x0 = samplers.solve(model_fn, g, x_T, samplers.dpm_solver_rule(order=3))
  tail = samplers.cut(g, strength=0.6)                     # img2img: the last 6 steps

Rules: :func:`ddim_rule`, :func:`ddpm_rule`, :func:`euler_rule`, :func:`euler_ancestral_rule`,
:func:`heun_rule`, :func:`dpm_solver_rule`, :func:`unipc_rule`, :func:`lcm_rule`, or a custom
:class:`Rule`. Rectified-flow models (velocity prediction) sample on :func:`flow_grid` with
:func:`flow_euler_rule` / :func:`flow_heun_rule` (or DPM-Solver++ / UniPC): :mod:`jdiff.samplers.flow`.
``sample(method, model_fn, schedule, x_T, *, num_steps, key=None, **options)`` is the diffusers-named
facade that builds grid + rule (options keep diffusers' names and meanings:
``timestep_spacing``, ``steps_offset``, ``prediction``, ``eta``, ...); each method is also
importable directly (``samplers.ddim(...)``). ``calibrate_timesteps`` fits the ``sigmas=`` grid of
a multistep solver to a model (:mod:`jdiff.samplers.calibrate`).

Example:
  >>> x0 = jax.jit(lambda z: samplers.sample("ddim", model_fn, sched, z, num_steps=20))(z)
"""

from __future__ import annotations

import jax

from jdiff.samplers.base import (available, call_model, get, process_x0, register, step_noise,
                                 threshold_sample)
from jdiff.samplers.calibrate import calibrate_timesteps
from jdiff.samplers.ddim import ddim, ddim_rule
from jdiff.samplers.ddpm import ddpm, ddpm_rule
from jdiff.samplers.dpm_solver import dpm_solver, dpm_solver_rule
from jdiff.samplers.euler import euler, euler_ancestral, euler_ancestral_rule, euler_rule, heun, heun_rule
from jdiff.samplers.flow import flow_euler, flow_euler_rule, flow_grid, flow_heun, flow_heun_rule, flow_sigmas
from jdiff.samplers.grids import Grid, cut, grid
from jdiff.samplers.inversion import ddim_inversion, ddim_inversion_rule, inversion_grid
from jdiff.samplers.lcm import lcm, lcm_rule, lcm_timesteps
from jdiff.samplers.levels import (SIGMA_SCHEDULES, beta as beta_sigmas, exponential as exponential_sigmas,
                                   karras as karras_sigmas, logsnr_uniform as logsnr_sigmas, sigma_to_t,
                                   spaced_timesteps, train_sigmas)
from jdiff.samplers.orders import step_orders
from jdiff.samplers.driver import PLAN_REQUEST, Plan, Rule, Step, masked_rule, solve
from jdiff.samplers.unipc import unipc, unipc_rule

__all__ = ["sample", "available", "get", "register", "spaced_timesteps", "ddim", "ddpm", "dpm_solver", "euler",
           "euler_ancestral", "heun", "unipc", "lcm", "calibrate_timesteps", "flow_euler", "flow_heun",
           # the composable surface
           "Grid", "grid", "cut", "Rule", "Step", "solve", "step_orders", "ddim_rule", "ddpm_rule", "euler_rule",
           "euler_ancestral_rule", "heun_rule", "dpm_solver_rule", "unipc_rule", "lcm_rule", "lcm_timesteps",
           "flow_grid", "flow_sigmas", "flow_euler_rule", "flow_heun_rule",
           "call_model", "step_noise", "process_x0", "threshold_sample",
           "SIGMA_SCHEDULES", "karras_sigmas", "exponential_sigmas", "logsnr_sigmas", "beta_sigmas", "sigma_to_t",
           "train_sigmas"]
__all__ += ["ddim_inversion", "ddim_inversion_rule", "inversion_grid"]  # data -> noise (not a registered sampler)
__all__ += ["plan", "Plan", "masked_rule"]


def sample(method: str, model_fn, schedule, x_T: jax.Array, *, num_steps: int | None = None,
           key: jax.Array | None = None, **options):
  """Runs the sampler registered as ``method`` (see :func:`available`) from ``x_T`` to x_0."""
  fn = get(method)
  return fn(model_fn, schedule, x_T, num_steps=num_steps, key=key, **options)


def plan(method: str, schedule, num_steps: int | None = None, **options) -> Plan:
  """The grid and step rule the sampler registered as ``method`` runs for these (diffusers-named)
  options, without running it.

  The rule takes the sample at the grid's first level (x = alpha x_0 + sigma eps); the facade's own
  start-from-unit-noise convention (Euler's ``init_noise_sigma``) is not part of it. Starting at
  step k of any sampler is ``solve(model_fn, cut(p.grid, k), x_k, p.rule)``.

  Example:
    >>> p = samplers.plan("dpm_solver", sched, 20, use_karras_sigmas=True)
    >>> k = 8; x_k = p.grid.alpha[k] * z0 + p.grid.sigma[k] * noise
    >>> x0 = samplers.solve(model_fn, samplers.cut(p.grid, k), x_k, p.rule)
  """
  out = get(method)(PLAN_REQUEST, schedule, jax.numpy.zeros((1, 1), jax.numpy.float32), num_steps=num_steps,
                    key=jax.random.key(0), **options)
  if not isinstance(out, Plan):
    raise ValueError(f"sampler {method!r} does not run through samplers.solve, so it has no plan")
  return out
