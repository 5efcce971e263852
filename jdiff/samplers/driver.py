"""The driver: one ``lax.scan`` that runs a step rule over a grid.

A :class:`Rule` is a few pure functions: ``init(x, grid)`` makes the rule's state (the sample
plus whatever history the rule keeps) from the sample at level 0, ``step(model_fn, state, step)``
moves it one step, ``sample(state)`` reads the current sample x_t = alpha x_0 + sigma eps back.
``plan(grid)`` gives per-step static data (orders, targets) and ``needs_key(grid)`` says whether
the rule draws noise. :func:`solve` slices the grid into one :class:`Step` per iteration and scans.

Example:
  >>> g = samplers.grid(sched, 10, sigmas="karras")
  >>> x0 = samplers.solve(model_fn, g, x_T, samplers.dpm_solver_rule(order=3))
  >>> # a custom rule: deterministic DDIM in a few lines
  >>> def step(model_fn, x, s):
  ...   eps = samplers.call_model(model_fn, x, s.t)
  ...   x0 = (x - s.sigma * eps) / s.alpha
  ...   return s.alpha_to * x0 + s.sigma_to * eps
  >>> rule = samplers.Rule(init=lambda x, g: x, step=step, sample=lambda x: x)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jdiff.samplers.grids import Grid

__all__ = ["Rule", "Step", "Plan", "solve", "PLAN_REQUEST", "masked_rule", "sample_is_state", "sample_is_first"]


class Step(NamedTuple):
  """What a rule sees at one step (scalars; leaves of ``plan`` keep their trailing shape).

  Attributes:
    t: the model's timestep at the level the step starts from.
    alpha, sigma, alpha_bar: that level.
    alpha_to, sigma_to, alpha_bar_to: the level the step lands on.
    plan: this step's slice of ``rule.plan(grid)`` (e.g. the solver order), or None.
    last: whether the step lands on the last level of the uncut grid.
    key: this step's PRNG key (``jax.random.split(key, n)[i]``); zeros for rules that draw no noise.
  """
  t: jax.Array
  alpha: jax.Array
  sigma: jax.Array
  alpha_bar: jax.Array
  alpha_to: jax.Array
  sigma_to: jax.Array
  alpha_bar_to: jax.Array
  plan: Any
  last: jax.Array
  key: jax.Array


def _no_plan(g: Grid):
  return None


def _no_key(g: Grid) -> bool:
  return False


def _same(steps: Step) -> Step:
  return steps


class Rule(NamedTuple):
  """A step rule: pure functions the driver calls (see the module docstring).

  Attributes:
    init: ``(x [B, ...] float32, grid) -> state``.
    step: ``(model_fn, state, step: Step) -> state``.
    sample: ``state -> x`` (the current sample, float32, the shape of ``x_T``).
    plan: ``grid -> pytree of [n, ...] arrays`` sliced into ``Step.plan`` (static per-step data).
    needs_key: ``grid -> bool``: whether :func:`solve` must be given a key.
    calls: ``steps -> steps``: rewrites the per-step inputs into per-call inputs (Heun revisits
      each level once more: 2 n - 1 model calls).
    with_sample: ``(state, x) -> state`` with the current sample replaced by ``x`` (the history
      kept), or None where a step is not a single move between levels (Heun); used by
      :func:`masked_rule`.
  """
  init: Callable[[jax.Array, Grid], Any]
  step: Callable[..., Any]
  sample: Callable[[Any], jax.Array]
  plan: Callable[[Grid], Any] = _no_plan
  needs_key: Callable[[Grid], bool] = _no_key
  calls: Callable[[Step], Step] = _same
  with_sample: Callable[[Any, jax.Array], Any] | None = None


def sample_is_state(state: Any, x: jax.Array) -> jax.Array:
  """``Rule.with_sample`` of a rule whose state is the sample itself."""
  del state
  return x


def sample_is_first(state: tuple, x: jax.Array) -> tuple:
  """``Rule.with_sample`` of a rule whose state is a tuple led by the sample."""
  return (x,) + tuple(state[1:])


def masked_rule(rule: Rule, known: jax.Array, noise: jax.Array, mask: jax.Array) -> Rule:
  """``rule`` with the sample outside ``mask`` pinned to known data after every step.

  Where ``mask`` is 0 the sample is replaced by ``alpha' known + sigma' noise`` at the level the
  step lands on (the known data itself after the grid's last step); where it is 1 the rule's
  sample is kept. This is inpainting with an ordinary (non-inpainting) denoiser, as diffusers'
  inpainting pipeline does for 4-channel UNets. The rule's history is left as the rule made it.

  Args:
    rule: a rule with ``with_sample``.
    known: the data to keep [B, ...] (e.g. image latents).
    noise: the noise that data is noised with [B, ...].
    mask: 1 where the rule generates, 0 where ``known`` is kept; broadcastable to ``known``.
  """
  if rule.with_sample is None:
    raise ValueError("this step rule cannot keep known data between steps (its steps are not single moves "
                     "between levels, e.g. Heun); choose another sampler")

  def step(model_fn, state, st: Step):
    new = rule.step(model_fn, state, st)
    x = rule.sample(new)
    pinned = jnp.where(st.last, known, st.alpha_to * known + st.sigma_to * noise)
    return rule.with_sample(new, (mask * x + (1.0 - mask) * pinned).astype(x.dtype))

  return rule._replace(step=step)


class Plan(NamedTuple):
  """The grid and step rule a sampler facade runs (:func:`jdiff.samplers.plan`).

  The rule takes the sample at the grid's first level, x = alpha x_0 + sigma eps, so
  ``solve(model_fn, cut(p.grid, k), alpha_k x_0 + sigma_k eps, p.rule)`` starts at step k
  (image-to-image, inpainting, a refiner handoff) with any sampler. ``noise_scale`` is what the
  facade multiplies unit-variance noise by to make the sample at level 0 (1, or diffusers'
  ``init_noise_sigma`` times alpha_0 for the Euler family).
  """
  grid: Grid
  rule: Rule
  noise_scale: Any = 1.0


class _PlanRequest:
  """The model function :func:`jdiff.samplers.plan` hands a facade: :func:`solve` then returns the
  facade's :class:`Plan` instead of running it."""

  def __call__(self, x, t):
    raise TypeError("PLAN_REQUEST is not a model function")


PLAN_REQUEST = _PlanRequest()


def steps_of(g: Grid, plan, keys) -> Step:
  """The per-step inputs [n] of grid ``g`` (leaves with a leading step axis)."""
  n = g.num_steps
  last = jnp.asarray(g.offset + np.arange(n) == g.total - 1)
  return Step(g.timesteps, g.alpha[:-1], g.sigma[:-1], g.alpha_bar[:-1], g.alpha[1:], g.sigma[1:], g.alpha_bar[1:],
              plan, last, keys)


def solve(model_fn: Callable[[jax.Array, jax.Array], jax.Array], g: Grid, x_T: jax.Array, rule: Rule, *,
          key: jax.Array | None = None, return_trajectory: bool = False):
  """Runs ``rule`` over grid ``g`` from ``x_T`` (the sample at level 0); one XLA loop.

  Args:
    model_fn: ``(x [B, ...], t [B]) -> output``; ``t`` has the dtype of ``g.timesteps``.
    g: the grid (:func:`jdiff.samplers.grid`).
    x_T: the sample at level 0 [B, ...] (any float dtype; the state is float32).
    rule: the step rule.
    key: PRNG key, required when the rule is stochastic (step i uses ``split(key, n)[i]``).
    return_trajectory: also return the sample after every model call [calls, B, ...].

  Returns:
    The sample at the last level (float32), and the trajectory when asked.

  Example:
    >>> x0 = solve(model_fn, grid(sched, 10), x_T, dpm_solver_rule(order=2))
  """
  if model_fn is PLAN_REQUEST:
    return Plan(g, rule)
  x = jnp.asarray(x_T)
  if x.ndim < 2:
    raise ValueError(f"x_T must have a batch axis and at least one data axis, got shape {x.shape}")
  x = x.astype(jnp.float32)
  n = g.num_steps
  if rule.needs_key(g):
    if key is None:
      raise ValueError("this sampler configuration is stochastic: pass key=jax.random.key(...)")
    keys = jax.random.split(key, n)
  else:
    keys = jnp.zeros((n,), jnp.uint32)  # never read: deterministic rules get no key, the scan still carries one entry per step
  plan = rule.plan(g)
  if plan is not None:
    plan = jax.tree.map(jnp.asarray, plan)
  steps = rule.calls(steps_of(g, plan, keys))
  state = rule.init(x, g)

  def body(state, step):
    new = rule.step(model_fn, state, step)
    # a rule keeps its state's structure, shapes and dtypes (one scan carry)
    chex.assert_trees_all_equal_shapes_and_dtypes(new, state)
    return new, (rule.sample(new) if return_trajectory else None)

  state, traj = jax.lax.scan(body, state, steps)
  out = rule.sample(state)
  return (out, traj) if return_trajectory else out
