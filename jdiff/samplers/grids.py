"""The grid of a sampler: where its steps fall.

A :class:`Grid` is the list of noise levels a sampler visits, each as the (alpha, sigma) of
x_t = alpha x_0 + sigma eps, and the timestep the model is told at every level but the last.
:func:`grid` builds one from a process (an alpha-bar :class:`~jdiff.schedules.Schedule`), a
timestep spacing, a sigma schedule by name or an explicit list, and the final level;
:func:`cut` takes a contiguous part of it (img2img strength, refiner handoff). Step rules
(:mod:`jdiff.samplers.driver`) move a sample from one level to the next.

Levels are stored as float32 arrays, so a grid built from a traced ``sigmas`` (inside ``jax.jit`` or
``jax.grad``) stays traced and differentiable; its static part (``final``, ``offset``, ``total``) says
how the grid ends and where it sits in the grid it was cut from, which the per-step order rules read.

Example:
  >>> g = samplers.grid(sched, 10, sigmas="karras")
  >>> g.timesteps.shape, g.sigma.shape  # (10,), (11,)
  >>> img2img = samplers.cut(g, strength=0.6)  # the last 6 steps
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jdiff.samplers import levels
from jdiff.schedules import Schedule

__all__ = ["Grid", "grid", "cut", "CONVENTIONS", "FINALS"]

# diffusers' families of timestep rules: "multistep" (DPMSolver*: n + 1 spaced points, the last
# dropped; Karras sigmas at rounded timesteps, the sigma_min end from the training table), "unipc"
# (the same, but a sigma schedule's sigma_min end is the schedule's own last sigma), "euler"
# (Euler/Heun: n float timesteps, a sigma schedule spans the spaced sigmas) and "discrete"
# (DDIM/DDPM/LCM: n integer timesteps, levels read from the alpha-bar table).
CONVENTIONS = ("multistep", "unipc", "euler", "discrete")
FINALS = ("zero", "sigma_min")


@struct.dataclass
class Grid:
  """Noise levels 0..n of a sampler and the model timesteps of levels 0..n-1.

  Attributes:
    timesteps: [n] what the model is told at each level (int32 or float32).
    alpha: [n + 1] signal scale of each level (1 at a final level of zero noise).
    sigma: [n + 1] noise scale of each level (0 at a final level of zero noise).
    alpha_bar: [n + 1] alpha^2, exact when read from the schedule's table (DDPM's posterior
      variance 1 - alpha_bar_t / alpha_bar_s cancels catastrophically for adjacent levels).
    final: static, "zero" or "sigma_min": how the uncut grid ends.
    offset: static, index of level 0 in the uncut grid (0 unless :func:`cut`).
    total: static, number of steps of the uncut grid.
  """
  timesteps: jax.Array
  alpha: jax.Array
  sigma: jax.Array
  alpha_bar: jax.Array
  final: str = struct.field(pytree_node=False, default="zero")
  offset: int = struct.field(pytree_node=False, default=0)
  total: int = struct.field(pytree_node=False, default=-1)

  @property
  def num_steps(self) -> int:
    return int(self.timesteps.shape[0])

  @property
  def ve_sigma(self) -> jax.Array:
    """The variance-exploding noise level sigma / alpha of each level [n + 1] (Karras' sigma)."""
    return self.sigma / self.alpha

  @property
  def ends_at_zero(self) -> bool:
    """Whether the last level is the uncut grid's zero-noise end (True unless cut before it)."""
    return self.final == "zero" and self.offset + self.num_steps == self.total


def _vp_levels(ve):
  """VP (alpha, sigma, alpha_bar) of variance-exploding levels: alpha = 1 / sqrt(1 + ve^2)."""
  ve = jnp.asarray(ve, jnp.float32)
  alpha, sigma = levels.alpha_sigma(ve)
  return alpha, sigma, 1.0 / (1.0 + ve * ve)


def _table_levels(abar):
  """(alpha, sigma, alpha_bar) of alpha-bar values read from a schedule's table."""
  abar = jnp.asarray(abar, jnp.float32)
  return jnp.sqrt(abar), jnp.sqrt(1.0 - abar), abar


def _make(ts, level_fn, values, final: str) -> Grid:
  alpha, sigma, abar = level_fn(values)
  xp = np if isinstance(ts, np.ndarray) else jnp  # static timesteps stay numpy (readable under jit)
  ts = xp.asarray(ts)
  ts = ts.astype(xp.int32 if jnp.issubdtype(ts.dtype, jnp.integer) else xp.float32)
  return Grid(ts, alpha, sigma, abar, final=final, offset=0, total=int(ts.shape[0]))


def grid(schedule: Schedule, num_steps: int | None = None, *, spacing: str = "linspace", steps_offset: int = 0,
         sigmas=None, final: str = "zero", timesteps=None, convention: str = "multistep",
         sigma_range: tuple[float, float] | None = None) -> Grid:
  """Builds the grid of ``num_steps`` steps over the process ``schedule``.

  Args:
    schedule: the process: an alpha-bar schedule (variance preserving). A rectified-flow path
      (alpha = 1 - sigma) enters as another level map next to ``_vp_levels``.
    num_steps: number of steps n (None when ``sigmas`` is an explicit list or ``timesteps`` given).
    spacing, steps_offset: diffusers' ``timestep_spacing`` ("leading", "trailing", "linspace")
      and ``steps_offset``.
    sigmas: the sigma schedule: None (the training sigmas at the spaced timesteps), a name
      ("karras", "exponential", "logsnr", "beta"), or an explicit list of n + 1 descending VE noise
      levels (may be traced: then the grid is differentiable in them).
    final: "zero" (the last step lands on the data) or "sigma_min" (on the schedule's first sigma).
    timesteps: explicit model timesteps [n]. With an explicit ``sigmas`` list they go with it;
      alone (integers) the levels are read from the schedule's table at them (as "discrete").
    convention: which diffusers scheduler family's spacing rule to follow (``CONVENTIONS``).
    sigma_range: (sigma_min, sigma_max) of a named sigma schedule ("euler" convention; defaults
      to the range of the spaced sigmas).

  Returns:
    A :class:`Grid`.

  Example:
    >>> g = grid(sched, 10, sigmas="karras")
    >>> g = grid(sched, sigmas=jnp.array([14.6, 3.0, 0.5, 0.0]))  # explicit, differentiable
  """
  if final not in FINALS:
    raise ValueError(f"final must be one of {FINALS}, got {final!r}")
  if convention not in CONVENTIONS:
    raise ValueError(f"unknown convention {convention!r}; expected one of {CONVENTIONS}")
  abar = schedule.alphas_cumprod
  named = sigmas is None or isinstance(sigmas, str)
  if not named:
    ts, sig = levels.explicit_grid(abar, sigmas, timesteps, num_steps, final_sigmas_type=final)
    return _make(ts, _vp_levels, sig, final)
  if sigmas is not None:
    levels.check_sigma_schedule(sigmas)
  if num_steps is None and timesteps is None:
    raise ValueError("num_steps is required unless sigmas= is a list or timesteps= is given")
  if convention == "discrete" or timesteps is not None:
    if sigmas is not None:
      raise ValueError(f"levels read from the alpha-bar table (convention='discrete' or timesteps=) do not "
                       f"take a sigma schedule, got sigmas={sigmas!r}")
    if timesteps is None:
      ts = levels.spaced_timesteps(schedule.num_timesteps, num_steps, spacing, steps_offset)
    else:
      ts = np.asarray(timesteps, np.int64)
      if ts.ndim != 1 or (num_steps is not None and ts.shape[0] != int(num_steps)):
        raise ValueError(f"timesteps must have shape ({num_steps},), got {ts.shape}")
    end = jnp.ones((1,), jnp.float32) if final == "zero" else abar[:1]
    return _make(ts, _table_levels, jnp.concatenate([abar[ts], end]), final)
  if convention == "euler":
    lo, hi = (None, None) if sigma_range is None else sigma_range
    ts, sig = levels.euler_grid(abar, num_steps, spacing=spacing, steps_offset=steps_offset, sigma_schedule=sigmas,
                                final_sigmas_type=final, sigma_min=lo, sigma_max=hi)
    return _make(ts, _vp_levels, sig, final)
  if sigma_range is not None:
    raise ValueError("sigma_range applies to convention='euler'; pass an explicit sigmas list instead")
  ts, sig = levels.multistep_grid(abar, num_steps, spacing=spacing, steps_offset=steps_offset, sigma_schedule=sigmas,
                                  final_sigmas_type=final, round_timesteps=sigmas not in ("exponential", "beta"),
                                  karras_final_sigma_min="schedule" if convention == "unipc" else "train")
  return _make(ts, _vp_levels, sig, final)


def cut(g: Grid, start: int | None = None, stop: int | None = None, *, strength: float | None = None) -> Grid:
  """The steps ``start..stop-1`` of a grid (levels ``start..stop``): a sampler run on it starts from a
  sample at level ``start`` and stops at level ``stop``.

  ``strength`` (img2img) keeps the last ``min(int(n * strength), n)`` steps, as diffusers' pipelines
  cut ``scheduler.timesteps``; a refiner handoff at step k is ``cut(g, stop=k)`` for the base and
  ``cut(g, k)`` for the refiner.

  Example:
    >>> tail = cut(grid(sched, 20), strength=0.3)  # 6 steps, from level 14
  """
  n = g.num_steps
  if strength is not None:
    if start is not None:
      raise ValueError("pass start or strength, not both")
    if not 0.0 < float(strength) <= 1.0:
      raise ValueError(f"strength must be in (0, 1], got {strength}")
    start = n - min(int(n * float(strength)), n)
  start = 0 if start is None else int(start)
  stop = n if stop is None else int(stop)
  if not 0 <= start < stop <= n:
    raise ValueError(f"cut needs 0 <= start < stop <= {n}, got start={start}, stop={stop}"
                     + (f" (strength={strength} leaves no step)" if strength is not None else ""))
  return Grid(g.timesteps[start:stop], g.alpha[start:stop + 1], g.sigma[start:stop + 1],
              g.alpha_bar[start:stop + 1], final=g.final, offset=g.offset + start, total=g.total)
