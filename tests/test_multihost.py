"""Multi-host training through JAX's multi-controller runtime, proven with real local processes.

Two processes (127.0.0.1 coordinator, 2 CPU devices each) train for a few steps and must end with
the parameters of one process on 4 devices with the same global batch: host sharding of the data,
``make_array_from_process_local_data``, collective Orbax writes and process-0-only logs.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jdiff import data, parallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_fault_tolerance as worker  # noqa: E402  (the tiny training program)

ROOT = worker.ROOT
VAE_TINY = os.path.join(ROOT, "configs", "vae_tiny.py")


# ----------------------------------------------------------------------------- settings


def test_distributed_args_from_flags_and_environment():
  assert parallel.distributed_args(environ={}) is None
  assert parallel.distributed_args(num_processes=1, environ={}) is None
  assert parallel.distributed_args(coordinator="127.0.0.1:5", num_processes=2, process_id=1, environ={}) == {
      "coordinator_address": "127.0.0.1:5", "num_processes": 2, "process_id": 1}
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:99", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert parallel.distributed_args(environ=env) == {
      "coordinator_address": "10.0.0.1:99", "num_processes": 4, "process_id": 3}
  # Flags win over the environment.
  assert parallel.distributed_args(process_id=0, environ=env)["process_id"] == 0
  # SLURM with several tasks / a TPU pod: JAX detects the cluster (no explicit arguments).
  assert parallel.distributed_args(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}) == {}
  assert parallel.distributed_args(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
  assert parallel.distributed_args(environ={"TPU_WORKER_HOSTNAMES": "h0,h1"}) == {}


@pytest.mark.parametrize("kwargs, env, needle", [
    (dict(num_processes=2), {}, "missing coordinator, process_id"),
    (dict(coordinator="127.0.0.1:5", num_processes=2, process_id=2), {}, "process_id=2"),
    (dict(coordinator="localhost", num_processes=2, process_id=0), {}, "HOST:PORT"),
    ({}, {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two'"),
])
def test_distributed_args_errors_are_one_line(kwargs, env, needle):
  with pytest.raises(ValueError) as e:
    parallel.distributed_args(environ=env, **kwargs)
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_multihost_flags_exit_2(tmp_path, capsys):
  rc = worker.main(["prog", "--config", worker.HERE, "--workdir", str(tmp_path), "--num_processes", "2"])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1 and "--coordinator" in err


def test_host_blocks_reassemble_the_single_host_batch():
  """Each host's batch is its contiguous block of the global batch, whatever the host count."""
  src = worker.ArraySource(40)
  single = data.Loader(src, batch_size=12, seed=5, shard_index=0, shard_count=1)
  hosts = [data.Loader(src, batch_size=12, seed=5, shard_index=i, shard_count=3) for i in range(3)]
  for _ in range(7):  # crosses epoch boundaries
    whole = next(single)
    parts = [next(h) for h in hosts]
    assert all(p["image"].shape == (4, 4, 4, 1) for p in parts)
    for k in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
  # Positions are in global batches: a restored host continues in step with the others.
  state = hosts[1].get_state()
  again = data.Loader(src, batch_size=12, seed=5, shard_index=1, shard_count=3)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["image"], next(hosts[1])["image"])


# ----------------------------------------------------------------------------- real processes


def _launch_pair(cmd_for, workdir, *, devices_each: int = 2, timeout: float = 480) -> list:
  import portpicker
  port = portpicker.pick_unused_port()
  procs = []
  for pid in range(2):
    cmd = cmd_for(workdir) + ["--coordinator", f"127.0.0.1:{port}", "--num_processes", "2",
                              "--process_id", str(pid)]
    procs.append(subprocess.Popen(cmd, env=worker.worker_env(devices_each), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


def _run_single(cmd_for, workdir, *, devices: int = 4, timeout: float = 480):
  res = subprocess.run(cmd_for(workdir), env=worker.worker_env(devices), capture_output=True, text=True,
                       timeout=timeout)
  return res.returncode, res.stdout, res.stderr


def _check_pair_equals_single(pair, single, two_dir, one_dir, name: str):
  (rc0, out0, err0), (rc1, out1, err1) = pair
  assert rc0 == 0 and rc1 == 0, (err0[-3000:], err1[-3000:])
  assert single[0] == 0, single[2][-3000:]
  # Logs from process 0 only. Every line the program prints starts with its "[name] " prefix; native
  # libraries (gloo's connection messages, in whatever spelling) share the stream, so lines are selected
  # by our prefix rather than by excluding theirs.
  ours = [[ln for ln in out.splitlines() if ln.startswith(f"[{name}] ")] for out in (out0, out1)]
  assert any(ln.startswith(f"[{name}] step") for ln in ours[0]) and ours[1] == [], ours
  step2, s2, d2 = worker.saved_state(two_dir)
  step1, s1, d1 = worker.saved_state(one_dir)
  assert step2 == step1 and d2["loader"] == d1["loader"]
  # Same global batches and keys; only the gradient all-reduce differs (gloo across processes vs
  # in-process), so float32 sums may round differently: equal to float32 precision.
  for key in ("step", "rng", "bad_steps", "skipped_steps"):
    np.testing.assert_array_equal(s2[key], s1[key])
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b) / (np.abs(b) + 1e-3))), s2["params"], s1["params"])
  print(f"max relative param difference 2 processes vs 1: {max(jax.tree.leaves(diffs)):.3g}")
  for key in ("params", "ema_params", "opt_state"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), s2[key], s1[key])
  return s2


def test_two_processes_equal_one_process_on_four_devices(tmp_path):
  """The tiny MLP program: 2 processes x 2 CPU devices vs 1 process x 4 devices, 6 steps."""
  def cmd_for(workdir):
    return worker.worker_cmd(workdir, "--config.train.steps=6", "--config.train.checkpoint_every=3")

  pair = _launch_pair(cmd_for, tmp_path / "two")
  single = _run_single(cmd_for, tmp_path / "one")
  state = _check_pair_equals_single(pair, single, tmp_path / "two", tmp_path / "one", "mlp")
  assert int(state["step"]) == 6
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["3", "6"]


@pytest.mark.slow  # two VAE compilations at once plus a third: several minutes on 2 busy cores
def test_two_processes_train_vae_tiny_like_one_process(tmp_path):
  """``python -m train.vae`` on configs/vae_tiny.py: the real program, 3 steps, same final params."""
  data_dir = tmp_path / "tfds"
  from jdiff.data import digits
  digits.prepare(str(data_dir))

  def cmd_for(workdir):
    return [sys.executable, "-m", "train.vae", "--config", VAE_TINY, "--workdir", str(workdir),
            f"--config.data.data_dir={data_dir}", "--config.train.steps=3",
            "--config.vae.scaling_factor=0.5"]

  pair = _launch_pair(cmd_for, tmp_path / "two")
  single = _run_single(cmd_for, tmp_path / "one")
  state = _check_pair_equals_single(pair, single, tmp_path / "two", tmp_path / "one", "vae")
  assert int(state["step"]) == 3
