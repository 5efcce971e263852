"""Fault suite, storage: a checkpoint that cannot be written (a real operating-system write error in
a training process, injected failures in-process) leaves the previous checkpoint as the latest, stops
with one line (or succeeds after retries, by option), and the previous checkpoint restores
bit-identically; a workdir that is not writable is reported before anything is compiled.

The disk-full run uses ``RLIMIT_FSIZE``: once set, every write that would grow a regular file past the
limit fails with EFBIG inside tensorstore's own writer, as ENOSPC does on a full disk. This file is
also that training program (``python tests/test_faults_storage.py --config tests/test_fault_tolerance.py
--workdir DIR`` with ``JDIFF_TEST_FILE_LIMIT=BATCH:BYTES``): the tiny MLP worker of
tests/test_fault_tolerance.py whose loader sets the limit when batch BATCH is read.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

HERE = os.path.abspath(__file__)
sys.path.insert(0, os.path.dirname(HERE))
import test_fault_tolerance as worker  # noqa: E402  (the tiny training program)

from jdiff import checkpoint, training  # noqa: E402
from train import loop  # noqa: E402

ENV_LIMIT = "JDIFF_TEST_FILE_LIMIT"
WIDTH = 256  # every saved step then holds an array file of > 16 KB; logs stay below it
LIMIT = 16 * 1024


class _FileLimitAt:
  """Wraps a loader; from batch ``at`` on, no file of this process may grow past ``limit`` bytes."""

  def __init__(self, inner, at: int, limit: int):
    self.inner, self.at, self.limit, self.n = inner, at, limit, 0
    self.local_batch = inner.local_batch

  def __next__(self):
    self.n += 1
    if self.n == self.at:
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a signal
      resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return next(self.inner)

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, s):
    self.inner.set_state(s)


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  loader = worker.make_loader(config)
  if os.environ.get(ENV_LIMIT):
    at, limit = (int(v) for v in os.environ[ENV_LIMIT].split(":"))
    loader = _FileLimitAt(loader, at, limit)
  state = loop.train(config.train, worker.make_task(int(config.model.width)), loader, workdir, seed=config.seed)
  print(f"[mlp] finished at step {int(state.step)}", flush=True)


def _config(**train) -> ml_collections.ConfigDict:
  config = worker.get_config()
  config.model.width = WIDTH
  config.train.update(dict(keep_checkpoints=20, **train))
  return config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted in-process run of 12 steps keeping every checkpoint."""
  workdir = tmp_path_factory.mktemp("reference")
  config = _config()
  loop.train(config.train, worker.make_task(WIDTH), worker.make_loader(config), str(workdir), seed=0)
  return workdir


def _steps(workdir) -> list[int]:
  ck = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    return ck.all_steps()
  finally:
    ck.close()


@pytest.mark.slow  # a reference run with a filling disk: ~35 s
def test_disk_full_mid_run_keeps_previous_checkpoint(reference, tmp_path):
  """A real write error (EFBIG from tensorstore) from step 6 on: one line, exit 2, the latest complete
  checkpoint untouched and bit-identical to the uninterrupted run's; a rerun finishes identically."""
  workdir = tmp_path / "run"
  env = dict(worker.worker_env(), JDIFF_COMPILATION_CACHE="0", **{ENV_LIMIT: f"6:{LIMIT}"})
  cmd = [sys.executable, HERE, "--config", worker.HERE, "--workdir", str(workdir),
         f"--config.model.width={WIDTH}", "--config.train.keep_checkpoints=20"]
  res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 2, res.stderr[-3000:]
  last = res.stderr.strip().splitlines()[-1]
  assert last.startswith("error: checkpoint step ") and "File too large [errno 27]" in last, last
  failed = int(last.split("checkpoint step ")[1].split()[0])
  latest = int(last.split("the latest complete checkpoint, step ")[1].split(",")[0])
  assert 4 <= latest < failed <= 7, last  # step 5's asynchronous write may be the one that failed
  assert _steps(workdir) == list(range(1, latest + 1))
  step, state, data_state = worker.saved_state(workdir)
  assert step == latest and data_state["loader"]["next_index"] == latest
  worker.assert_states_equal(state, worker.saved_state(reference, latest)[1])
  # Space back: the same command resumes from the kept step and ends where the uninterrupted run did.
  env.pop(ENV_LIMIT)
  res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert f"resuming from step {latest}" in res.stdout
  worker.assert_states_equal(worker.saved_state(workdir)[1], worker.saved_state(reference)[1])


class _FailingSaves:
  """Makes ``CheckpointManager.save`` raise ENOSPC for steps >= ``from_step``, ``times`` times."""

  def __init__(self, monkeypatch, from_step: int, times: int):
    self.from_step, self.left, self.calls = from_step, times, []
    original = ocp.CheckpointManager.save

    def save(manager, step, *args, **kwargs):
      self.calls.append(step)
      if step >= self.from_step and self.left > 0:
        self.left -= 1
        raise OSError(errno.ENOSPC, "No space left on device")
      return original(manager, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)


def test_failed_save_stops_training_and_resume_is_identical(reference, tmp_path, monkeypatch):
  config = _config()
  failing = _FailingSaves(monkeypatch, from_step=7, times=1)
  with pytest.raises(checkpoint.CheckpointSaveError) as e:
    loop.train(config.train, worker.make_task(WIDTH), worker.make_loader(config), str(tmp_path), seed=0)
  msg = str(e.value)
  assert "\n" not in msg and e.value.errno == errno.ENOSPC
  assert msg.startswith(f"checkpoint step 7 could not be written to {tmp_path / 'checkpoints'}: ")
  assert msg.endswith("the latest complete checkpoint, step 6, is unchanged"), msg
  assert failing.calls[-1] == 7 and _steps(tmp_path) == list(range(1, 7))
  worker.assert_states_equal(worker.saved_state(tmp_path)[1], worker.saved_state(reference, 6)[1])
  monkeypatch.undo()
  state = loop.train(config.train, worker.make_task(WIDTH), worker.make_loader(config), str(tmp_path), seed=0)
  assert int(state.step) == 12
  worker.assert_states_equal(worker.saved_state(tmp_path)[1], worker.saved_state(reference)[1])


def test_retries_by_option(reference, tmp_path, monkeypatch, capsys):
  """Two failures with two retries allowed: saved; the same with one retry: the one-line error."""
  ref_step, ref_state, _ = worker.saved_state(reference, 3)
  state = jax.tree.map(np.asarray, ref_state)
  ck = checkpoint.Checkpointer(tmp_path / "a", retries=2, retry_wait_s=0)
  ck.save(2, state, force=True)
  _FailingSaves(monkeypatch, from_step=3, times=2)
  ck.save(3, state, force=True)
  ck.close()
  warned = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning: checkpoint step 3")]
  assert len(warned) == 2 and "No space left on device" in warned[0] and "(2 of 2)" in warned[1], warned
  ck = checkpoint.Checkpointer(tmp_path / "a")
  got, _ = ck.restore_latest(checkpoint.abstract_like(state))
  assert ck.all_steps() == [2, 3]
  ck.close()
  worker.assert_states_equal(jax.tree.map(np.asarray, got), state)

  monkeypatch.setenv(checkpoint.ENV_RETRIES, "1")
  ck = checkpoint.Checkpointer(tmp_path / "b", retry_wait_s=0)
  assert ck.retries == 1
  ck.save(2, state, force=True)
  _FailingSaves(monkeypatch, from_step=3, times=2)
  with pytest.raises(checkpoint.CheckpointSaveError, match="step 3 .* step 2, is unchanged"):
    ck.save(3, state, force=True)
  ck.close()
  ck = checkpoint.Checkpointer(tmp_path / "b")
  assert ck.all_steps() == [2]
  ck.close()
  monkeypatch.setenv(checkpoint.ENV_RETRIES, "lots")
  with pytest.raises(ValueError, match="JDIFF_CHECKPOINT_RETRIES='lots'"):
    checkpoint.Checkpointer(tmp_path / "c")


def _unwritable(tmp_path):
  """A workdir that cannot be created, even by root: its parent is a regular file."""
  blocker = tmp_path / "file"
  blocker.write_text("x")
  return blocker / "run"


def test_unwritable_workdir_is_one_line_before_anything_runs(tmp_path, capsys, monkeypatch):
  workdir = _unwritable(tmp_path)

  def run_never(config, wd):
    raise AssertionError("the program ran although its workdir is not writable")

  rc = loop.main_wrapper(run_never, default_config=worker.HERE, default_workdir="/tmp/x",
                         argv=["prog", "--config", worker.HERE, "--workdir", str(workdir)])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1, err
  assert err == f"error: workdir {workdir} is not writable: Not a directory", err
  # The library entry point refuses before building or compiling the step.
  monkeypatch.setattr(training, "make_train_step", run_never)
  config = _config()
  with pytest.raises(checkpoint.CheckpointSaveError, match="is not writable") as e:
    loop.train(config.train, worker.make_task(WIDTH), worker.make_loader(config), str(workdir), seed=0)
  assert e.value.errno == errno.ENOTDIR


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_workdir_is_permission_denied(tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o500)
  try:
    with pytest.raises(checkpoint.CheckpointSaveError, match="Permission denied"):
      checkpoint.check_writable(ro)
  finally:
    ro.chmod(0o700)


if __name__ == "__main__":
  sys.exit(loop.main_wrapper(run, default_config=worker.HERE, default_workdir="/tmp/mlp"))
