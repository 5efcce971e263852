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

Integrity: Orbax writes each step into a temporary folder and renames it when complete, so a
process killed mid-save (SIGKILL) leaves no half step behind (leftover temporary folders are
removed on the next start). Each save also records a fingerprint of the state (two wrapping uint32
sums of the raw bits of every leaf) next to the data position; :meth:`Checkpointer.restore_latest`
verifies it, and a latest step that cannot be read or does not match (truncated or garbled files)
is moved aside to ``corrupt-<step>`` with a warning naming it, and the previous step is used.
On several processes a step is renamed into place by process 0 only after every process finished
writing its part, so a job that loses a process mid-save leaves only a temporary folder behind.

Storage failures: a save that cannot be written (disk full, permission denied) leaves the latest
complete step as it was and raises :class:`CheckpointSaveError`, one line naming the step, the
operating system's reason and the step that remains the latest; ``retries`` (or
``$JDIFF_CHECKPOINT_RETRIES``) retries it first. :func:`check_writable` reports a workdir that
cannot be written before anything is built.

Example:
  >>> ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=3)
  >>> restored = ckpt.restore_latest(abstract_state)
  >>> ckpt.save(int(state.step), state, data_state={"next_index": 640})
  >>> ckpt.close()
"""

from __future__ import annotations

import os
from typing import Any

import logging
import re
import shutil
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jdiff import parallel

from jdiff import training

__all__ = ["Checkpointer", "check_shapes", "fingerprint", "CorruptCheckpointError", "CheckpointSaveError",
           "check_writable", "abstract_like", "ENV_RETRIES"]

_FINGERPRINT_KEY = "_fingerprint"


ENV_RETRIES = "JDIFF_CHECKPOINT_RETRIES"


class CorruptCheckpointError(ValueError):
  """A saved step cannot be read back or does not match its recorded fingerprint."""


class CheckpointSaveError(OSError):
  """A checkpoint could not be written (disk full, permission denied, ...); the message is one line
  naming the step, the directory and the latest complete checkpoint, which is left untouched."""


def check_writable(directory: str | os.PathLike, *, what: str = "workdir") -> str:
  """Creates ``directory`` if needed and checks that this process can write, sync and delete a file in it.

  Meant to run before anything expensive (model building, compilation), so a read-only or missing
  mount is reported at once rather than at the first checkpoint. Each process of a multi-process
  job probes with its own file name.

  Returns:
    The absolute path.

  Raises:
    CheckpointSaveError: one line naming the directory and the operating system's reason.

  Example:
    >>> check_writable("/tmp/run")  # doctest: +SKIP
    '/tmp/run'
  """
  path = os.path.abspath(os.fspath(directory))
  probe = os.path.join(path, f".jdiff-write-probe-{jax.process_index()}-{os.getpid()}")
  try:
    os.makedirs(path, exist_ok=True)
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
      os.write(fd, b"jdiff")
      os.fsync(fd)
    finally:
      os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise _storage_error(f"{what} {path} is not writable: {e.strerror or _one_line(e)}", e) from None
  return path


def _leaf_bits(x: jax.Array) -> jax.Array:
  """The raw bits of an array as uint32 (floats/ints bitcast, 8/16-bit widened, bool cast)."""
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = x.dtype.itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size == 2:
    return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  if size == 1:
    return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)  # [..., 2] -> flat
  raise ValueError(f"cannot fingerprint dtype {x.dtype}")


@jax.jit
def _fingerprint_leaves(leaves: list[jax.Array]) -> jax.Array:
  sums = []
  for leaf in leaves:
    u = _leaf_bits(leaf).reshape(-1)  # [N] uint32
    pos = jnp.arange(u.shape[0], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
    sums.append(jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(u * pos, dtype=jnp.uint32)]))
  return jnp.stack(sums) if sums else jnp.zeros((0, 2), jnp.uint32)  # [L, 2]


def fingerprint(tree: Any) -> list[list[int]]:
  """Two wrapping uint32 sums (plain and position-weighted) of the raw bits of every leaf.

  Integer arithmetic, so the result is exact, independent of sharding and reduction order, and
  changes when any bit of a leaf is garbled. Computed on device; only [num_leaves, 2] comes back.

  Example:
    >>> fingerprint({"w": jnp.ones(3)})
    [[3196059648, 998244352]]
  """
  leaves = [leaf for leaf in jax.tree.leaves(tree) if hasattr(leaf, "dtype")]
  return np.asarray(_fingerprint_leaves(leaves)).astype(np.int64).tolist()



def _path_str(path) -> str:
  return "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def _state_dict(tree: Any) -> Any:
  if isinstance(tree, training.TrainState):  # fields that are None (no extra EMAs) are not written
    return {f: getattr(tree, f) for f in tree.__dataclass_fields__ if getattr(tree, f) is not None}
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

  Failed saves: a save that cannot be written (disk full, permission denied) never replaces the
  latest complete checkpoint (Orbax renames a step's temporary folder only once every file of
  every process is written). Its error is raised as :class:`CheckpointSaveError` by the call that
  finds it: :meth:`save` itself, or, for an asynchronous write, the next :meth:`save`,
  :meth:`wait` or :meth:`close`. With ``retries > 0`` each save is retried up to that many times
  (``retry_wait_s`` apart) before the error is raised; such saves block until written, so a
  retry rewrites the same state.

  Args:
    directory: where step folders are written (created if needed).
    max_to_keep: how many recent checkpoints to keep.
    async_save: write in a background thread (``wait_until_finished`` in :meth:`close`).
    save_interval_steps: ``should_save`` cadence (the loop always saves at the end).
    retries: attempts after a failed save; None reads ``$JDIFF_CHECKPOINT_RETRIES`` (default 0).
    retry_wait_s: pause before each retry.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True,
               save_interval_steps: int = 1, retries: int | None = None, retry_wait_s: float = 5.0):
    self.directory = os.path.abspath(os.fspath(directory))
    if retries is None:
      raw = os.environ.get(ENV_RETRIES, "0") or "0"
      try:
        retries = int(raw)
      except ValueError:
        raise ValueError(f"environment variable {ENV_RETRIES}={raw!r} is not an integer") from None
    if retries < 0:
      raise ValueError(f"checkpoint retries must be >= 0, got {retries}")
    self.retries, self.retry_wait_s = int(retries), float(retry_wait_s)
    self._pending: int | None = None  # step of an asynchronous save not yet known to be written
    self._failed = False
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           save_interval_steps=save_interval_steps,
                                           cleanup_tmp_directories=True)
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
      CheckpointSaveError: this save, or the previous asynchronous one, could not be written
        (after the configured retries); the latest complete checkpoint is unchanged.
    """
    if not training.check_finite(state):
      raise ValueError(f"refusing to checkpoint step {step}: the train state contains NaN/inf")
    self._finish_pending()
    data = dict(data_state or {})
    data[_FINGERPRINT_KEY] = fingerprint(_state_dict(state))
    args = ocp.args.Composite(state=ocp.args.StandardSave(_state_dict(state)),
                              data=ocp.args.JsonSave(data))
    attempt = 0
    while True:
      try:
        saved = self.manager.save(int(step), args=args, force=force)
        if self.retries:
          self.manager.wait_until_finished()  # a retry must rewrite this same state
        elif saved:
          self._pending = int(step)
        return saved
      except Exception as e:  # tensorstore/OS errors of several types
        if attempt == self.retries:
          raise self._save_error(int(step), e) from None
        attempt += 1
        msg = (f"checkpoint step {step} could not be written to {self.directory} ({_storage_reason(e)}); "
               f"retrying in {self.retry_wait_s:g} s ({attempt} of {self.retries})")
        logging.warning(msg)
        print(f"warning: {msg}", file=sys.stderr, flush=True)
        self._discard_partial(int(step))
        time.sleep(self.retry_wait_s)

  def _finish_pending(self) -> None:
    """Waits for the pending asynchronous save; its failure becomes CheckpointSaveError."""
    if self._failed:
      return
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      step, self._pending = self._pending, None
      raise self._save_error(step, e) from None
    self._pending = None

  def _save_error(self, step: int | None, e: BaseException) -> CheckpointSaveError:
    self._failed = True
    try:
      self.manager.reload()
      latest = self.manager.latest_step()
    except Exception:  # the directory itself may be gone
      latest = None
    what = f"checkpoint step {step}" if step is not None else "a checkpoint"
    tail = (f"the latest complete checkpoint, step {latest}, is unchanged" if latest is not None
            else "there is no complete checkpoint yet")
    return _storage_error(f"{what} could not be written to {self.directory}: {_storage_reason(e)}; {tail}", e)

  def _discard_partial(self, step: int) -> None:
    """Removes what a failed attempt left of ``step`` (process 0; its temporary folder)."""
    if parallel.is_main_process():
      for name in os.listdir(self.directory):
        if name == str(step) or name.startswith(f"{step}.orbax-checkpoint-tmp"):
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
    self.manager.reload()

  def saved_shapes(self, step: int | None = None) -> Any:
    """The saved state's tree of array metadata (shapes/dtypes) without reading the arrays."""
    step = self.latest_step() if step is None else step
    meta = self.manager.item_metadata(step)
    state_meta = meta["state"] if isinstance(meta, dict) or hasattr(meta, "__getitem__") else meta.state
    return getattr(state_meta, "tree", state_meta)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores ``step`` into the shapes/shardings of ``abstract_state`` (ShapeDtypeStructs with
    ``.sharding``, or concrete arrays); returns (state, data_state).

    Raises:
      ValueError: the checkpoint is of a different model (names the first mismatching leaf).
      CorruptCheckpointError: the step's files cannot be read or fail the fingerprint check.
    """
    where = os.path.join(self.directory, str(step))
    expected = _state_dict(abstract_state)
    try:
      saved = self.saved_shapes(step)
    except Exception as e:  # orbax/tensorstore raise many types for unreadable metadata
      raise CorruptCheckpointError(f"checkpoint {where} is unreadable: {_one_line(e)}") from None
    check_shapes(saved, expected, what=f"checkpoint {where}")
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), expected)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                               data=ocp.args.JsonRestore()))
      state, data = out["state"], dict(out["data"] or {})
    except Exception as e:  # truncated/garbled array files: tensorstore errors of several types
      raise CorruptCheckpointError(f"checkpoint {where} is unreadable: {_one_line(e)}") from None
    recorded = data.pop(_FINGERPRINT_KEY, None)
    if recorded is not None and fingerprint(state) != recorded:
      raise CorruptCheckpointError(f"checkpoint {where} is corrupt: its arrays do not match the "
                                   "fingerprint recorded when it was saved")
    if isinstance(abstract_state, training.TrainState):
      state = training.TrainState(**state)
    return state, data

  def restore_latest(self, abstract_state: Any, *, fallback: bool = True) -> tuple[Any, dict] | None:
    """Restores the newest readable checkpoint, or returns None when the directory holds none.

    A newest step that is corrupt (:class:`CorruptCheckpointError`) is moved aside to
    ``corrupt-<step>`` (kept for inspection, ignored by Orbax) with a warning naming it, and the
    previous step is tried, down to the oldest.

    Raises:
      CorruptCheckpointError: every saved step is corrupt (or ``fallback=False``).
      ValueError: the checkpoint is of a different model.
    """
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      return None
    errors = []
    for step in steps:
      try:
        return self.restore(step, abstract_state)
      except CorruptCheckpointError as e:
        if not fallback:
          raise
        errors.append(str(e))
        moved = self._quarantine(step)
        nxt = [s for s in steps if s < step]
        what = f"resuming from step {nxt[0]}" if nxt else "no earlier checkpoint left"
        msg = f"{e}; moved it to {moved}; {what}"
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        logging.warning(msg)
        if parallel.is_main_process():
          print(f"warning: {msg}", file=sys.stderr, flush=True)
    raise CorruptCheckpointError(f"all {len(steps)} checkpoints in {self.directory} are corrupt "
                                 f"(moved to corrupt-<step>); first error: {errors[0]}")

  def _quarantine(self, step: int) -> str:
    """Renames step ``step`` to ``corrupt-<step>`` (process 0; all processes wait)."""
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(self.directory, f"corrupt-{step}")
    if parallel.is_main_process():
      if os.path.exists(dst):
        shutil.rmtree(dst)
      os.rename(src, dst)
    parallel.barrier(f"jdiff_quarantine_{step}")
    self.manager.reload()
    return dst

  def wait(self) -> None:
    """Waits for the pending asynchronous save (CheckpointSaveError if it could not be written)."""
    self._finish_pending()

  def close(self) -> None:
    """Waits for pending asynchronous saves and releases the manager.

    Raises:
      CheckpointSaveError: the last asynchronous save could not be written (the manager is
        released all the same); nothing is raised again after an earlier CheckpointSaveError.
    """
    try:
      self._finish_pending()
    finally:
      try:
        self.manager.close()
      except Exception:  # a manager whose save failed may fail to close: already reported
        if not self._failed:
          raise

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def _os_errno(e: BaseException) -> int | None:
  """The operating system's error number of ``e``: an OSError's, or the one tensorstore quotes."""
  if isinstance(getattr(e, "errno", None), int):
    return e.errno
  match = _OS_ERROR_CODE.search(str(e))
  return int(match.group(1)) if match else None


def _storage_reason(e: BaseException) -> str:
  """A short reason for a failed write: the OS error (``No space left on device [errno 28]``) when
  there is one, else the error's own first line."""
  code = _os_errno(e)
  if code is not None and not isinstance(e, OSError):
    return f"{os.strerror(code)} [errno {code}] ({_one_line(e)[:160]})"
  return _one_line(e)


def _storage_error(message: str, cause: BaseException) -> CheckpointSaveError:
  err = CheckpointSaveError(message)
  err.errno = _os_errno(cause)  # ENOSPC, EACCES, ... when the OS gave one
  return err


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a concrete pytree, for :meth:`Checkpointer.restore`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                                     sharding=getattr(x, "sharding", None)), tree)


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= 300 else text[:297] + "..."
