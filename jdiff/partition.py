"""Trainable/frozen splits of parameter trees, expressed as data.

A split is a tree of labels with the parameters' structure, made from ``(regex, label)`` rules over
"/"-joined parameter paths (first match wins, and every parameter must be covered). The labels
drive :func:`optimizer` (``optax.multi_transform`` with ``optax.set_to_zero`` for frozen
leaves, which keep no optimizer state), and :func:`split` / :func:`combine` let a train step
differentiate only the trainable part, so the frozen part is never written.

Example:
  >>> labels = partition.labels(params, [(r"^controlnet/", "trainable"), (r"^unet/", "frozen")])
  >>> train, frozen = partition.split(params, labels)
  >>> tx = optax.adamw(1e-4)                  # state for the trainable leaves only
  >>> loss = lambda tr: loss_fn(partition.combine(tr, frozen))
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax
import optax
from flax import traverse_util

__all__ = ["labels", "split", "combine", "optimizer", "count"]

TRAINABLE, FROZEN = "trainable", "frozen"


def labels(params: Mapping[str, Any], rules: Sequence[tuple[str, str]]) -> dict[str, Any]:
  """A tree of labels: each leaf gets the label of the first rule whose regex searches its path.

  Raises:
    ValueError: naming the first parameter no rule covers.
  """
  compiled = [(re.compile(p), lab) for p, lab in rules]
  flat = traverse_util.flatten_dict(dict(params), sep="/")
  out = {}
  for path in flat:
    for rx, lab in compiled:
      if rx.search(path):
        out[path] = lab
        break
    else:
      raise ValueError(f"parameter {path!r} is covered by no partition rule {[p for p, _ in rules]}")
  return traverse_util.unflatten_dict(out, sep="/")


def split(params: Mapping[str, Any], label_tree: Mapping[str, Any],
          label: str = TRAINABLE) -> tuple[dict[str, Any], dict[str, Any]]:
  """Splits ``params`` into (leaves labelled ``label``, all other leaves), as two nested dicts."""
  flat = traverse_util.flatten_dict(dict(params), sep="/")
  labs = traverse_util.flatten_dict(dict(label_tree), sep="/")
  if set(flat) != set(labs):
    missing = sorted(set(flat) ^ set(labs))[0]
    raise ValueError(f"label tree does not match the parameters at {missing!r}")
  chosen = {k: v for k, v in flat.items() if labs[k] == label}
  rest = {k: v for k, v in flat.items() if labs[k] != label}
  return (traverse_util.unflatten_dict(chosen, sep="/") if chosen else {},
          traverse_util.unflatten_dict(rest, sep="/") if rest else {})


def combine(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of :func:`split`: merges two disjoint partial trees."""
  fa = traverse_util.flatten_dict(dict(a), sep="/")
  fb = traverse_util.flatten_dict(dict(b), sep="/")
  both = set(fa) & set(fb)
  if both:
    raise ValueError(f"partial trees overlap at {sorted(both)[0]!r}")
  return traverse_util.unflatten_dict({**fa, **fb}, sep="/")


def optimizer(tx: optax.GradientTransformation, label_tree: Mapping[str, Any]) -> optax.GradientTransformation:
  """``tx`` on trainable leaves, zero updates (and no state) on frozen ones."""
  return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, label_tree)


def count(tree: Any) -> int:
  """Number of scalars in a tree."""
  return int(sum(x.size for x in jax.tree.leaves(tree)))
