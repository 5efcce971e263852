"""Per-step orders of the multistep solvers, in one place: warm-up (a k-step formula needs k - 1
earlier outputs) and diffusers' lower-order final steps.

The rules are those of diffusers' schedulers over the uncut grid (``Grid.total`` steps, absolute
step indices); :func:`step_orders` then applies them to a grid that may have been cut, restarting
the warm-up at its first step as a scheduler does after ``set_begin_index``.

Example:
  >>> step_orders(grid(sched, 10), 3, kind="multistep")  # [1, 2, 3, ..., 3, 2, 1]
"""

from __future__ import annotations

import numpy as np

__all__ = ["step_orders", "multistep_orders", "singlestep_orders", "unipc_orders", "KINDS"]

KINDS = ("multistep", "singlestep", "unipc")


def multistep_orders(num_steps: int, order: int, *, lower_order_final: bool, euler_at_final: bool,
                     final_sigmas_type: str) -> np.ndarray:
  """The order diffusers' multistep solver uses at each step (warm-up and final-step rules)."""
  n = int(num_steps)
  out = []
  for i in range(n):
    low_final = i == n - 1 and (euler_at_final or (lower_order_final and n < 15)
                                or final_sigmas_type == "zero")
    low_second = i == n - 2 and lower_order_final and n < 15
    if order == 1 or i < 1 or low_final:
      out.append(1)
    elif order == 2 or i < 2 or low_second:
      out.append(2)
    else:
      out.append(3)
  return np.asarray(out, np.int32)


def singlestep_orders(num_steps: int, order: int, *, lower_order_final: bool,
                      final_sigmas_type: str) -> np.ndarray:
  """The per-step orders of diffusers' singlestep solver (groups 1, 2, [3] restarting each group).

  As in diffusers, ``lower_order_final`` is forced on when ``num_steps`` is not a multiple of the
  order or when the last step lands on sigma = 0.
  """
  n = int(num_steps)
  lof = lower_order_final or n % order != 0 or final_sigmas_type == "zero"
  if lof:
    if order == 3:
      tail = {0: [1, 2] + [1], 1: [1], 2: [1, 2]}[n % 3]
      orders = [1, 2, 3] * (n // 3 - (1 if n % 3 == 0 else 0)) + tail
    elif order == 2:
      orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
    else:
      orders = [1] * n
  else:
    orders = ([1, 2, 3] * (n // 3)) if order == 3 else ([1, 2] * (n // 2) if order == 2 else [1] * n)
  if final_sigmas_type == "zero":
    orders[-1] = 1
  return np.asarray(orders[:n], np.int32)


def unipc_orders(num_steps: int, order: int, lower_order_final: bool,
                 disable_corrector=()) -> tuple[np.ndarray, np.ndarray]:
  """Per-step predictor orders and corrector orders (0 = no corrector) of diffusers' UniPC."""
  n = int(num_steps)
  pred, corr = [], []
  for i in range(n):
    corr.append(pred[-1] if i > 0 and (i - 1) not in set(disable_corrector) else 0)
    this = min(order, n - i) if lower_order_final else order
    pred.append(min(this, min(i, order) + 1))
  return np.asarray(pred, np.int32), np.asarray(corr, np.int32)


def step_orders(g, order: int, *, kind: str = "multistep", lower_order_final: bool = True,
                euler_at_final: bool = False, disable_corrector=()) -> np.ndarray:
  """The order of each step of grid ``g`` (int32 [n]; for ``kind="unipc"`` [n, 2]: predictor and
  corrector order, 0 = no corrector).

  Args:
    g: a :class:`~jdiff.samplers.grids.Grid` (its ``final``, ``offset`` and ``total`` are read).
    order: the solver's order (1, 2 or 3).
    kind: "multistep" (DPM-Solver), "singlestep" (DPM-Solver's groups) or "unipc".
    lower_order_final, euler_at_final, disable_corrector: diffusers' options.
  """
  if kind not in KINDS:
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
  if order not in (1, 2, 3):
    raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
  total, lo, n = g.total, g.offset, g.num_steps
  rel = np.arange(n)
  if kind == "multistep":
    full = multistep_orders(total, order, lower_order_final=lower_order_final, euler_at_final=euler_at_final,
                            final_sigmas_type=g.final)
    return np.minimum(full[lo:lo + n], rel + 1).astype(np.int32)
  if kind == "singlestep":
    full = singlestep_orders(total, order, lower_order_final=lower_order_final, final_sigmas_type=g.final)
    return full[lo:lo + n].astype(np.int32)
  pred, _ = unipc_orders(total, order, lower_order_final)
  pred = np.minimum(pred[lo:lo + n], rel + 1)
  skip = set(int(i) for i in disable_corrector)
  corr = np.asarray([pred[i - 1] if i > 0 and (lo + i - 1) not in skip else 0 for i in range(n)])
  return np.stack([pred, corr], axis=1).astype(np.int32)
