"""Shared pieces of the multistep rules (DPM-Solver, UniPC): the history of model outputs with their
levels, and jdiff's extrapolated last step to sigma = 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdiff import diffusion
from jdiff.samplers import levels
from jdiff.samplers.grids import Grid

__all__ = ["history_init", "history_push", "extrapolated_final_step", "finite_target", "extrapolated_last_step"]


def history_init(x: jax.Array, g: Grid, size: int = 3):
  """Empty history of a multistep rule: ``size`` zero outputs, all at level 0 (alpha [size], sigma [size])."""
  return (jnp.zeros((size,) + x.shape, jnp.float32), jnp.full((size,), g.alpha[0]), jnp.full((size,), g.sigma[0]))


def history_push(hist, m: jax.Array, alpha: jax.Array, sigma: jax.Array):
  """Appends a model output (and its level) to a history, dropping the oldest entry."""
  out, a, s = hist
  return (jnp.concatenate([out[1:], m[None]]), jnp.concatenate([a[1:], alpha[None]]),
          jnp.concatenate([s[1:], sigma[None]]))


def extrapolated_final_step(x_s: jax.Array, sigma_s: jax.Array, x0_s: jax.Array, x_p: jax.Array,
                            sigma_p: jax.Array, x0_p: jax.Array) -> jax.Array:
  """The last step to sigma = 0 as a second-order (Adams-Bashforth) step in the VE noise level.

  In VE coordinates y = x / alpha the probability-flow ODE reads dy/dsigma = eps(y, sigma) with
  eps = (y - x0_hat) / sigma. The jump from the smallest sigma_s to 0 is infinitely long in
  lambda, so DPM-Solver takes it at first order (y_0 = x0_hat(sigma_s)); in sigma it has finite
  length and eps is smooth (linear in sigma near 0 for smooth data), so integrating the secant
  of eps through the last two evaluations is second-order accurate:
  y_0 = y_s - sigma_s eps_s + sigma_s^2 / 2 * (eps_p - eps_s) / (sigma_p - sigma_s).

  Args:
    x_s, x_p: VP states at the last (sigma_s) and the previous (sigma_p > sigma_s) evaluation.
    sigma_s, sigma_p: their VE noise levels.
    x0_s, x0_p: the data predictions there.

  Returns:
    The sample at sigma = 0 [B, ...].
  """
  y_s = x_s * jnp.sqrt(1.0 + sigma_s * sigma_s)
  y_p = x_p * jnp.sqrt(1.0 + sigma_p * sigma_p)
  eps_s = (y_s - x0_s) / sigma_s
  eps_p = (y_p - x0_p) / sigma_p
  slope = (eps_p - eps_s) / (sigma_p - sigma_s)
  return x0_s + 0.5 * sigma_s * sigma_s * slope


def finite_target(final, step):
  """The level a step aims at: its own, or half the current VE sigma on an extrapolated last step
  (that regular step is discarded; aiming it at a finite sigma keeps its gradients finite)."""
  a_half, s_half = levels.alpha_sigma(0.5 * step.sigma / step.alpha)
  return jnp.where(final, a_half, step.alpha_to), jnp.where(final, s_half, step.sigma_to)


def extrapolated_last_step(final, x: jax.Array, x_prev: jax.Array, hist, data_pred: bool) -> jax.Array:
  """:func:`extrapolated_final_step` from the last two history entries (taken at ``x`` and ``x_prev``;
  noise predictions when ``data_pred`` is False). Off the last step (``final`` False) the formula is
  evaluated at a finite stand-in level so that gradients through the caller's ``jnp.where`` stay finite.
  """
  ms, ah, sh = hist
  x0_s, x0_p = ms[2], ms[1]
  if not data_pred:  # noise predictions: x0 = (x - sigma eps) / alpha at the same points
    x0_s = diffusion.to_x0(ms[2], x, ah[2], sh[2], "epsilon")
    x0_p = diffusion.to_x0(ms[1], x_prev, ah[1], sh[1], "epsilon")
  s_0 = sh[2] / ah[2]
  s_p = jnp.where(final, sh[1] / ah[1], 2.0 * s_0 + 1.0)
  return extrapolated_final_step(x, s_0, x0_s, x_prev, s_p, x0_p)
