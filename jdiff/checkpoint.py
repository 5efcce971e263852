"""Orbax checkpointing of a whole run: train state (params, EMA, optimizer, step, rng) + data position.

Resume order (what a killed run does when restarted with the same workdir):

1. build the model, optimizer and an abstract TrainState with its shardings;
2. :meth:`Checkpointer.restore_latest` checks the saved shapes against the abstract state
   (a checkpoint of a different model raises one ValueError naming the first mismatching leaf),
   then restores the state straight into its shardings (``StandardRestore``) and the data
   iterator's position (JSON);
3. the data iterator is moved to that position and training continues at ``state.step``.

Saves are asynchronous; :meth:`Checkpointer.close` waits for them (always call it at exit).
A state containing NaN/inf is never written (:class:`ValueError`).

Example:
  >>> ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=3)
  >>> restored = ckpt.restore_latest(abstract_state)
  >>> ckpt.save(int(state.step), state, data_state={"next_index": 640})
  >>> ckpt.close()
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jdiff import training

__all__ = ["Checkpointer", "check_shapes"]


def _path_str(path) -> str:
  return "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def _state_dict(tree: Any) -> Any:
  if isinstance(tree, training.TrainState):
    return {f: getattr(tree, f) for f in tree.__dataclass_fields__}
  return tree


def check_shapes(saved: Any, expected: Any, *, what: str = "checkpoint") -> None:
  """Raises ValueError naming the first leaf whose saved shape differs from the expected one."""
  saved_flat = {_path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
  exp_flat = {_path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
  missing = sorted(set(exp_flat) - set(saved_flat))
  extra = sorted(set(saved_flat) - set(exp_flat))
  if missing or extra:
    detail = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
    raise ValueError(f"{what} does not match this model: {detail} "
                     f"({len(missing)} missing, {len(extra)} unexpected parameters)")
  for k, v in exp_flat.items():
    s_shape = tuple(getattr(saved_flat[k], "shape", ()))
    e_shape = tuple(getattr(v, "shape", ()))
    if s_shape != e_shape:
      raise ValueError(f"{what} does not match this model: {k!r} has shape {s_shape} in the "
                       f"checkpoint but {e_shape} in the model")


class Checkpointer:
  """A thin wrapper over ``ocp.CheckpointManager`` for TrainState + data position.

  Args:
    directory: where step folders are written (created if needed).
    max_to_keep: how many recent checkpoints to keep.
    async_save: write in a background thread (``wait_until_finished`` in :meth:`close`).
    save_interval_steps: ``should_save`` cadence (the loop always saves at the end).
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True,
               save_interval_steps: int = 1):
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           save_interval_steps=save_interval_steps)
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, *, data_state: dict | None = None, force: bool = False) -> bool:
    """Saves ``state`` (TrainState or pytree) and the data position at ``step``; async.

    Raises:
      ValueError: if any floating leaf of the state is NaN/inf (nothing is written).
    """
    if not training.check_finite(state):
      raise ValueError(f"refusing to checkpoint step {step}: the train state contains NaN/inf")
    args = ocp.args.Composite(state=ocp.args.StandardSave(_state_dict(state)),
                              data=ocp.args.JsonSave(data_state or {}))
    return self.manager.save(int(step), args=args, force=force)

  def saved_shapes(self, step: int | None = None) -> Any:
    """The saved state's tree of array metadata (shapes/dtypes) without reading the arrays."""
    step = self.latest_step() if step is None else step
    meta = self.manager.item_metadata(step)
    state_meta = meta["state"] if isinstance(meta, dict) or hasattr(meta, "__getitem__") else meta.state
    return getattr(state_meta, "tree", state_meta)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores ``step`` into the shapes/shardings of ``abstract_state`` (ShapeDtypeStructs with
    ``.sharding``, or concrete arrays); returns (state, data_state)."""
    expected = _state_dict(abstract_state)
    check_shapes(self.saved_shapes(step), expected,
                 what=f"checkpoint {os.path.join(self.directory, str(step))}")
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), expected)
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                             data=ocp.args.JsonRestore()))
    state = out["state"]
    if isinstance(abstract_state, training.TrainState):
      state = training.TrainState(**state)
    return state, dict(out["data"] or {})

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
    """Restores the newest checkpoint, or returns None when the directory holds none."""
    step = self.latest_step()
    if step is None:
      return None
    return self.restore(step, abstract_state)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending asynchronous saves and releases the manager."""
    self.manager.wait_until_finished()
    self.manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a concrete pytree, for :meth:`Checkpointer.restore`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                                     sharding=getattr(x, "sharding", None)), tree)
