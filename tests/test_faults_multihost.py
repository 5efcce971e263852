"""Fault suite, multi-host: two real local processes (127.0.0.1 coordinator) train the tiny MLP program
of tests/test_fault_tolerance.py; one is SIGKILLed mid-run (a worker, then the coordinator). The
survivor must exit with :data:`jdiff.parallel.EXIT_PEER_LOST` (a code, not a signal) within the
liveness bound, its last line naming the lost process; relaunching both resumes from the last complete
checkpoint and ends with the state of an uninterrupted two-process run. A step that not every process
finished writing (Orbax's temporary folder) is never restored.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings

import jax
import numpy as np
import pytest

from jdiff import checkpoint, parallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_fault_tolerance as worker  # noqa: E402  (the tiny training program)

LIVENESS = 15  # seconds; the watchdog's heartbeat interval is then 1.5 s
BOUND = LIVENESS + 3 * 1.5 + 8  # worker death: timeout + heartbeats + slack for 2 busy cores
STEPS = 8


def _env() -> dict[str, str]:
  return dict(worker.worker_env(2), **{parallel.ENV_LIVENESS_TIMEOUT: str(LIVENESS)})


class _Pair:
  """Two processes of one job; their output is drained by threads (lines with arrival times)."""

  def __init__(self, workdir, *overrides: str, program: list[str] | None = None):
    """``program``: the command without ``--workdir`` (default: the MLP worker with STEPS steps)."""
    import portpicker
    self.port = portpicker.pick_unused_port()
    self.procs, self.out, self.err = [], [[], []], [[], []]
    base = (program + ["--workdir", str(workdir)] if program
            else worker.worker_cmd(workdir, f"--config.train.steps={STEPS}"))
    for pid in range(2):
      cmd = base + list(overrides) + [
          "--coordinator", f"127.0.0.1:{self.port}", "--num_processes", "2", "--process_id", str(pid)]
      self.procs.append(subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True))
    streams = [(p.stdout, o) for p, o in zip(self.procs, self.out)] + [
        (p.stderr, e) for p, e in zip(self.procs, self.err)]
    self.threads = [threading.Thread(target=self._drain, args=pair, daemon=True) for pair in streams]
    for t in self.threads:
      t.start()

  @staticmethod
  def _drain(stream, sink):
    for line in stream:
      sink.append((time.monotonic(), line.rstrip("\n")))

  def wait_for(self, text: str, timeout: float = 900) -> None:
    t0 = time.monotonic()
    while not any(text in line for _, line in self.out[0]):
      if time.monotonic() - t0 > timeout or any(p.poll() is not None for p in self.procs):
        raise AssertionError(f"never saw {text!r}: {self.lines(0)[-20:]} {self.lines(0, err=True)[-20:]}")
      time.sleep(0.05)

  def lines(self, pid: int, *, err: bool = False) -> list[str]:
    return [line for _, line in (self.err if err else self.out)[pid]]

  def finish(self, timeout: float = 900) -> list[int]:
    try:
      for p in self.procs:
        p.wait(timeout=timeout)
    finally:
      self.kill()
    for t in self.threads:
      t.join(timeout=10)
    return [p.returncode for p in self.procs]

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted two-process run."""
  workdir = tmp_path_factory.mktemp("pair_reference")
  pair = _Pair(workdir)
  rcs = pair.finish()
  assert rcs == [0, 0], (pair.lines(0, err=True)[-20:], pair.lines(1, err=True)[-20:])
  return workdir


def _kill_and_check_survivor(workdir, victim: int, *overrides: str, program: list[str] | None = None
                             ) -> tuple[float, str]:
  pair = _Pair(workdir, *overrides, program=program)
  try:
    pair.wait_for("step 3/")
    pair.procs[victim].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    survivor = pair.procs[1 - victim]
    survivor.wait(timeout=BOUND + 60)
    elapsed = time.monotonic() - killed
  finally:
    pair.finish(timeout=60)
  errs = [ln for ln in pair.lines(1 - victim, err=True) if ln.strip()]
  assert survivor.returncode == parallel.EXIT_PEER_LOST, (survivor.returncode, errs[-15:])
  assert pair.procs[victim].returncode == -signal.SIGKILL
  return elapsed, errs[-1]


def _relaunch_and_compare(workdir, reference, *, program: list[str] | None = None, steps: int = STEPS) -> None:
  assert not any(name.startswith("corrupt-") for name in os.listdir(workdir / "checkpoints"))
  pair = _Pair(workdir, program=program)
  rcs = pair.finish()
  assert rcs == [0, 0], (pair.lines(0, err=True)[-20:], pair.lines(1, err=True)[-20:])
  resumed = [ln for ln in pair.lines(0) if "resuming from step" in ln]
  assert resumed, pair.lines(0)
  assert not any("corrupt" in ln for ln in pair.lines(0, err=True) + pair.lines(1, err=True))
  assert not any("orbax-checkpoint-tmp" in name for name in os.listdir(workdir / "checkpoints"))
  step, state, data_state = worker.saved_state(workdir)
  ref_step, ref_state, ref_data = worker.saved_state(reference)
  assert step == ref_step == steps and data_state["loader"] == ref_data["loader"]
  for key in ("step", "rng", "bad_steps", "skipped_steps"):
    np.testing.assert_array_equal(state[key], ref_state[key])
  # Same processes, batches and keys; float32 tolerance of the cross-process all-reduce.
  for key in ("params", "ema_params", "opt_state"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), state[key], ref_state[key])


@pytest.mark.slow  # a reference run and a liveness timeout: ~1.5 min; the coordinator case runs in the quick suite
def test_worker_death_stops_the_coordinator_within_the_bound(reference, tmp_path):
  workdir = tmp_path / "run"
  elapsed, last = _kill_and_check_survivor(workdir, 1, "--config.data.sleep=0.3")
  assert last.startswith("error: lost process 1 of 2: no heartbeat for "), last
  assert "stopping process 0" in last and "relaunch" in last
  assert LIVENESS - 1 <= elapsed <= BOUND, elapsed
  _relaunch_and_compare(workdir, reference)


def test_coordinator_death_stops_the_worker_within_the_bound(reference, tmp_path):
  workdir = tmp_path / "run"
  elapsed, last = _kill_and_check_survivor(workdir, 0, "--config.data.sleep=0.3")
  assert last.startswith("error: lost process 0 of 2 (the coordinator at 127.0.0.1:"), last
  assert "stopping process 1" in last
  assert elapsed <= BOUND, elapsed
  _relaunch_and_compare(workdir, reference)


@pytest.mark.slow  # three pairs of VAE compilations: many minutes on 2 busy cores
def test_vae_tiny_worker_death_then_relaunch_equals_uninterrupted(tmp_path):
  """The real program: ``python -m train.vae`` on configs/vae_tiny.py, worker SIGKILLed mid-run."""
  from jdiff.data import digits
  data_dir = tmp_path / "tfds"
  digits.prepare(str(data_dir))
  steps = 30
  program = [sys.executable, "-m", "train.vae", "--config", os.path.join(worker.ROOT, "configs", "vae_tiny.py"),
             f"--config.data.data_dir={data_dir}", f"--config.train.steps={steps}",
             "--config.vae.scaling_factor=0.5", "--config.train.keep_checkpoints=3"]
  pair = _Pair(tmp_path / "reference", program=program)
  assert pair.finish(timeout=900) == [0, 0], pair.lines(0, err=True)[-20:]
  elapsed, last = _kill_and_check_survivor(tmp_path / "run", 1, program=program)
  assert last.startswith("error: lost process 1 of 2: no heartbeat for "), last
  assert elapsed <= BOUND, elapsed
  _relaunch_and_compare(tmp_path / "run", tmp_path / "reference", program=program, steps=steps)


def test_half_written_step_is_never_restored(reference, tmp_path):
  """A step folder left where not every process finished (Orbax's temporary name) is ignored and
  removed; the newest complete step is restored, fingerprint-checked."""
  ckdir = tmp_path / "checkpoints"
  shutil.copytree(reference / "checkpoints", ckdir)
  latest = max(int(n) for n in os.listdir(ckdir) if n.isdigit())
  os.rename(ckdir / str(latest), ckdir / f"{latest + 1}.orbax-checkpoint-tmp")  # a whole step, unfinalized
  ck = checkpoint.Checkpointer(ckdir, max_to_keep=10)
  try:
    assert ck.all_steps() and latest + 1 not in ck.all_steps()
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev),
                          worker.saved_state(reference, latest - 1)[1])
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # no corrupt-step fallback either
      state, _ = ck.restore_latest(target)
  finally:
    ck.close()
  assert not (ckdir / f"{latest + 1}.orbax-checkpoint-tmp").exists()
  worker.assert_states_equal(jax.tree.map(np.asarray, state), worker.saved_state(reference, latest - 1)[1])


def test_liveness_timeout_setting():
  assert parallel.liveness_timeout(environ={}) == parallel.DEFAULT_LIVENESS_TIMEOUT
  assert parallel.liveness_timeout(environ={parallel.ENV_LIVENESS_TIMEOUT: "20"}) == 20.0
  assert parallel.liveness_timeout(7, environ={parallel.ENV_LIVENESS_TIMEOUT: "20"}) == 7.0
  for bad in ("soon", "0", "nan", "inf"):
    with pytest.raises(ValueError, match=parallel.ENV_LIVENESS_TIMEOUT) as e:
      parallel.liveness_timeout(environ={parallel.ENV_LIVENESS_TIMEOUT: bad})
    assert "\n" not in str(e.value)


def test_signal_delivered_twice_counts_once():
  """A supervised child may get SIGTERM both directly and forwarded by its parent: one request, no exit."""
  from train import loop
  guard = loop._PreemptionGuard()
  guard.install()
  try:
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    assert guard.requested and guard.signum == signal.SIGTERM
  finally:
    guard.uninstall(force=True)


@pytest.mark.slow  # a pair of fresh processes: ~40 s on 2 busy cores
def test_sigterm_to_both_supervisors_saves_and_exits_143(tmp_path):
  """Preemption of a supervised job: the parents forward SIGTERM, both children save the same step."""
  pair = _Pair(tmp_path / "run", "--config.data.sleep=0.3", "--config.train.checkpoint_every=0")
  try:
    pair.wait_for("step 3/")
    for p in pair.procs:
      p.send_signal(signal.SIGTERM)
  finally:
    rcs = pair.finish(timeout=120)
  assert rcs == [143, 143], (pair.lines(0, err=True)[-10:], pair.lines(1, err=True)[-10:])
  last = [[ln for ln in pair.lines(i, err=True) if ln.startswith("preempted:")] for i in range(2)]
  assert all(len(x) == 1 and "SIGTERM" in x[0] for x in last), last
  step = int(last[0][0].split("at step ")[1].split()[0])
  assert step >= 3 and last[1][0] == last[0][0]
  assert worker.saved_state(tmp_path / "run")[0] == step
