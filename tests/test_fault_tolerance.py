"""Preemption and crash safety of ``train.loop``: SIGKILL at random points + restart ends bit-identical
to an uninterrupted run, SIGTERM/SIGINT save a checkpoint at the next step boundary and exit with
143/130, a corrupt or partial latest checkpoint is skipped (warning naming it) for the previous one,
and gradient accumulation equals one step on the whole batch.

This file is also a tiny training program (``python tests/test_fault_tolerance.py --config
tests/test_fault_tolerance.py --workdir DIR``) that runs the real loop, loader, checkpointer and
``main_wrapper`` on a small MLP regression task, so subprocess tests start in seconds; the multi-host
test (tests/test_multihost.py) runs it too.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from jdiff import checkpoint, data  # noqa: E402
from train import loop  # noqa: E402


# ----------------------------------------------------------------------------- the worker program


def get_config() -> ml_collections.ConfigDict:
  """Config of the worker program (a real train section + a synthetic data section)."""
  from configs import vae_digits
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = ml_collections.ConfigDict(dict(examples=96, batch_size=8, seed=0, sleep=0.0))
  config.model = ml_collections.ConfigDict(dict(width=16))
  config.train = vae_digits.train_config(steps=12, learning_rate=3e-2, warmup_steps=2, lr_schedule="cosine",
                                         log_every=1, checkpoint_every=1, keep_checkpoints=3,
                                         ema_decay=0.9, grad_accum=1)
  return config


class ArraySource:
  """``n`` random uint8 images [4, 4, 1] with labels (deterministic)."""

  def __init__(self, n: int):
    rng = np.random.default_rng(123)
    self.images = rng.integers(0, 256, size=(n, 4, 4, 1), dtype=np.uint8)
    self.labels = rng.integers(0, 10, size=(n,))

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": int(self.labels[i]), "caption": ""}


class SlowLoader(data.Loader):
  """A Loader that sleeps before each batch (so signals can land mid-run)."""

  def __init__(self, *args, sleep: float = 0.0, **kwargs):
    super().__init__(*args, **kwargs)
    self.sleep = sleep

  def __next__(self):
    if self.sleep:
      time.sleep(self.sleep)
    return super().__next__()


def make_task(width: int = 16) -> loop.Task:
  """A 2-layer MLP regressing a fixed function of the image from a noised copy (uses the step key)."""
  import flax.linen as nn

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):  # [B, 16] -> [B, 1]
      return nn.Dense(1)(jnp.tanh(nn.Dense(width)(x)))

  model = MLP()

  def init_params(key):
    return model.init(key, jnp.zeros((1, 16), jnp.float32))["params"]

  def loss_fn(params, batch, key, frozen):
    del frozen
    x = batch["image"].reshape(batch["image"].shape[0], 16)  # [B, 16]
    target = jnp.sin(3.0 * jnp.mean(x, axis=1, keepdims=True))  # [B, 1]
    noisy = x + 0.05 * jax.random.normal(key, x.shape)
    err = jnp.square(model.apply({"params": params}, noisy) - target)
    return jnp.mean(err), {"mae": jnp.mean(jnp.sqrt(err))}

  return loop.Task(name="mlp", init_params=init_params, loss_fn=loss_fn, batch_keys=("image",))


def make_loader(config: ml_collections.ConfigDict) -> SlowLoader:
  d = config.data
  return SlowLoader(ArraySource(d.examples), batch_size=d.batch_size, seed=d.seed, sleep=float(d.sleep))


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  state = loop.train(config.train, make_task(int(config.model.width)), make_loader(config), workdir,
                     seed=config.seed)
  print(f"[mlp] finished at step {int(state.step)}", flush=True)


def main(argv=None) -> int:
  return loop.main_wrapper(run, default_config=HERE, default_workdir="/tmp/mlp", argv=argv)


# ----------------------------------------------------------------------------- helpers


def worker_cmd(workdir, *overrides: str) -> list[str]:
  return [sys.executable, HERE, "--config", HERE, "--workdir", str(workdir), *overrides]


def worker_env(devices: int = 1) -> dict[str, str]:
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  return env


def run_worker(workdir, *overrides: str, devices: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run(worker_cmd(workdir, *overrides), env=worker_env(devices), capture_output=True,
                        text=True, timeout=timeout)


def saved_state(workdir, step: int | None = None) -> tuple[int, dict, dict]:
  """(step, state as numpy, data state) of a checkpoint, read without a target (any device count)."""
  import orbax.checkpoint as ocp
  ck = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    step = ck.latest_step() if step is None else step
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=dev),
                          ck.saved_shapes(step))
    out = ck.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                           data=ocp.args.JsonRestore()))
  finally:
    ck.close()
  return step, jax.tree.map(np.asarray, dict(out["state"])), dict(out["data"])


def assert_states_equal(a: dict, b: dict) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def _cfg(**train) -> ml_collections.ConfigDict:
  config = get_config()
  config.train.update(train)
  return config


# ----------------------------------------------------------------------------- in-process tests


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted in-process run of 12 steps keeping every checkpoint."""
  workdir = tmp_path_factory.mktemp("reference")
  config = _cfg(keep_checkpoints=20)
  state = loop.train(config.train, make_task(), make_loader(config), str(workdir), seed=0)
  assert int(state.step) == 12
  return workdir


def _garble(step_dir, mode: str) -> None:
  """Damages the array files of one saved step."""
  files = sorted(os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs
                 if os.path.getsize(os.path.join(r, f)) > 64 and "/d/" in os.path.join(r, f))
  assert files, f"no array data files under {step_dir}"
  if mode == "truncate":
    for f in files:
      with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
  elif mode == "garble":  # same length, flipped bytes in the middle of every data file
    for f in files:
      size = os.path.getsize(f)
      with open(f, "r+b") as fh:
        fh.seek(size // 2)
        chunk = fh.read(16)
        fh.seek(size // 2)
        fh.write(bytes(b ^ 0x5A for b in chunk))
  elif mode == "delete":  # a partial step: array files missing
    for f in files:
      os.remove(f)
  else:
    raise ValueError(mode)


@pytest.mark.parametrize("mode", ["truncate", "garble", "delete"])
def test_corrupt_latest_checkpoint_falls_back_to_previous(reference, tmp_path, mode):
  import shutil
  workdir = tmp_path / "run"
  ckdir = workdir / "checkpoints"
  os.makedirs(ckdir)
  for s in (5, 6):  # a run killed after step 6 whose step-6 files got damaged
    shutil.copytree(reference / "checkpoints" / str(s), ckdir / str(s))
  _garble(str(ckdir / "6"), mode)
  config = _cfg(keep_checkpoints=20)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    state = loop.train(config.train, make_task(), make_loader(config), str(workdir), seed=0)
  msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
  assert any(str(ckdir / "6") in m and "resuming from step 5" in m for m in msgs), msgs
  assert (ckdir / "corrupt-6").is_dir()  # kept for inspection, out of Orbax's way
  assert int(state.step) == 12
  # Resumed from step 5 and ended bit-identical to the uninterrupted run (step 6 redone).
  assert_states_equal(saved_state(workdir)[1], saved_state(reference)[1])
  assert_states_equal(saved_state(workdir, 6)[1], saved_state(reference, 6)[1])


def test_all_checkpoints_corrupt_is_one_line_error(reference, tmp_path):
  import shutil
  ckdir = tmp_path / "checkpoints"
  os.makedirs(ckdir)
  shutil.copytree(reference / "checkpoints" / "3", ckdir / "3")
  _garble(str(ckdir / "3"), "truncate")
  ck = checkpoint.Checkpointer(ckdir)
  abstract = checkpoint.abstract_like(_fresh_state())
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with pytest.raises(checkpoint.CorruptCheckpointError) as e:
      ck.restore_latest(abstract)
  ck.close()
  assert "\n" not in str(e.value) and "all 1 checkpoints" in str(e.value) and str(ckdir) in str(e.value)


def _fresh_state():
  from jdiff import parallel, training
  config = get_config()
  t = config.train
  tx = training.make_optimizer(learning_rate=t.learning_rate, warmup_steps=t.warmup_steps, total_steps=t.steps,
                               schedule=t.lr_schedule, clip_norm=t.clip_norm)
  return training.create_train_state(make_task().init_params, tx, key=jax.random.key(0), mesh=parallel.make_mesh())


def test_fingerprint_detects_single_bit_flip():
  tree = {"a": jnp.arange(12, dtype=jnp.float32).reshape(3, 4), "b": jnp.arange(5, dtype=jnp.int32),
          "c": jnp.ones((2,), jnp.bfloat16)}
  base = checkpoint.fingerprint(tree)
  assert base == checkpoint.fingerprint(jax.tree.map(lambda x: x + 0, tree))
  flipped = np.asarray(tree["a"]).copy()
  flipped.view(np.uint32)[1, 2] ^= 1 << 7
  assert checkpoint.fingerprint({**tree, "a": jnp.asarray(flipped)}) != base
  swapped = np.asarray(tree["b"])[::-1].copy()  # same multiset, different positions
  assert checkpoint.fingerprint({**tree, "b": jnp.asarray(swapped)}) != base
  # Independent reference: wrapping uint32 sums in numpy (float64-free integer arithmetic).
  u = np.asarray(tree["a"]).view(np.uint32).reshape(-1).astype(np.uint64)
  pos = np.arange(u.size, dtype=np.uint64) * 2 + 1
  assert base[0] == [int(u.sum() % 2**32), int((u * pos).sum() % 2**32)]


class _SignalAt:
  """Wraps a loader; sends ``sig`` to this process while reading batch number ``at``."""

  def __init__(self, inner, at: int, sig: int):
    self.inner, self.at, self.sig, self.n = inner, at, sig, 0
    self.local_batch = inner.local_batch

  def __next__(self):
    self.n += 1
    if self.n == self.at:
      os.kill(os.getpid(), self.sig)
    return next(self.inner)

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, s):
    self.inner.set_state(s)


def test_sigint_in_process_saves_at_next_step_boundary(reference, tmp_path):
  config = _cfg(checkpoint_every=0, keep_checkpoints=20)
  loader = _SignalAt(make_loader(config), at=4, sig=signal.SIGINT)
  previous = signal.getsignal(signal.SIGINT)
  with pytest.raises(loop.Preempted) as e:
    loop.train(config.train, make_task(), loader, str(tmp_path), seed=0)
  assert signal.getsignal(signal.SIGINT) is previous  # handlers restored
  assert e.value.step == 4 and e.value.signum == signal.SIGINT
  assert loop.EXIT_PREEMPTED[signal.SIGINT] == 130
  step, state, data_state = saved_state(tmp_path)
  assert step == 4 and data_state["loader"]["next_index"] == 4
  assert_states_equal(state, saved_state(reference, 4)[1])
  # Resuming finishes bit-identical to the uninterrupted run.
  loop.train(config.train, make_task(), make_loader(config), str(tmp_path), seed=0)
  assert_states_equal(saved_state(tmp_path)[1], saved_state(reference)[1])


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
  """4 micro-batches of 4 == one batch of 16 (deterministic loss: the noise key is not used)."""

  def loss_fn(params, batch, key, frozen):
    del key, frozen
    x = batch["image"].reshape(batch["image"].shape[0], 16)  # [B, 16]
    pred = jnp.tanh(x @ params["w"]) @ params["v"]  # [B, 1]
    err = jnp.square(pred - jnp.mean(x, axis=1, keepdims=True))
    return jnp.mean(err), {"err_max": jnp.max(err)}

  init = lambda k: {"w": 0.3 * jax.random.normal(k, (16, 8)), "v": jnp.ones((8, 1)) * 0.1}  # noqa: E731
  batch = {"image": jnp.asarray(np.random.default_rng(0).normal(size=(16, 4, 4, 1)), jnp.float32)}
  params = init(jax.random.key(1))

  (l1, a1), g1 = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, jax.random.key(0), None)
  acc = loop.accumulate_gradients(loss_fn, 4)
  (l4, a4), g4 = jax.jit(jax.value_and_grad(acc, has_aux=True))(params, batch, jax.random.key(0), None)
  np.testing.assert_allclose(l4, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g4, g1)
  # Independent float64 reference of the full-batch gradient of v.
  x = np.asarray(batch["image"], np.float64).reshape(16, 16)
  h = np.tanh(x @ np.asarray(params["w"], np.float64))
  r = h @ np.asarray(params["v"], np.float64) - x.mean(1, keepdims=True)
  np.testing.assert_allclose(g4["v"], 2 * h.T @ r / 16, rtol=1e-5)
  assert float(a4["err_max"]) <= float(a1["err_max"]) + 1e-7  # mean over micro-batches of maxima

  # Through the whole loop: three steps with grad_accum=4 end where grad_accum=1 ends.
  task = loop.Task(name="acc", init_params=init, loss_fn=loss_fn, batch_keys=("image",))
  finals = []
  for k in (1, 4):
    config = _cfg(grad_accum=k, steps=3, checkpoint_every=0)
    config.data.batch_size = 16
    finals.append(loop.train(config.train, task, make_loader(config), str(tmp_path / f"acc{k}"), seed=0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               finals[0].params, finals[1].params)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), finals[0].params, init(jax.random.split(
      jax.random.key(0))[0]))
  assert max(jax.tree.leaves(moved)) > 1e-3


def test_grad_accum_must_divide_the_batch(tmp_path):
  config = _cfg(grad_accum=3)
  with pytest.raises(ValueError, match="grad_accum=3"):
    loop.train(config.train, make_task(), make_loader(config), str(tmp_path), seed=0)
  assert not os.path.exists(tmp_path / "checkpoints" / "1")


# ----------------------------------------------------------------------------- subprocess tests


def _read_until_step(proc, step: int, timeout: float = 240) -> list[str]:
  lines, t0 = [], time.time()
  while time.time() - t0 < timeout:
    line = proc.stdout.readline()
    if not line:
      break
    lines.append(line)
    if f"step {step}/" in line:
      return lines
  raise AssertionError(f"never reached step {step}: {''.join(lines)}")


@pytest.fixture(scope="module")
def subprocess_reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("sub_reference")
  res = run_worker(workdir, "--config.train.keep_checkpoints=20")
  assert res.returncode == 0, res.stderr
  return workdir


@pytest.mark.slow  # several fresh processes: ~1 min on 2 busy cores
def test_sigkill_at_random_points_then_restart_is_bit_identical(subprocess_reference, tmp_path):
  rng = random.Random(9)
  workdir = tmp_path / "killed"
  kills = []
  for _ in range(3):
    proc = subprocess.Popen(worker_cmd(workdir, "--config.data.sleep=0.05"), env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
      start = checkpoint.Checkpointer(workdir / "checkpoints")
      first = (start.latest_step() or 0) + 1
      start.close()
      target = min(11, first + rng.randrange(0, 3))
      _read_until_step(proc, target)
      time.sleep(rng.uniform(0.0, 0.08))  # sometimes mid-save
      proc.send_signal(signal.SIGKILL)
    finally:
      proc.wait(timeout=60)
    kills.append(target)
    assert proc.returncode == -signal.SIGKILL
  res = run_worker(workdir)
  assert res.returncode == 0, res.stderr
  step, state, data_state = saved_state(workdir)
  ref_step, ref_state, ref_data = saved_state(subprocess_reference)
  assert step == ref_step == 12 and data_state == ref_data, kills
  assert_states_equal(state, ref_state)


@pytest.mark.slow  # two fresh processes: ~25 s on 2 busy cores
def test_sigterm_saves_checkpoint_on_the_way_out(subprocess_reference, tmp_path):
  workdir = tmp_path / "term"
  proc = subprocess.Popen(worker_cmd(workdir, "--config.data.sleep=0.1", "--config.train.checkpoint_every=0"),
                          env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    _read_until_step(proc, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 143, err
  err_lines = [ln for ln in err.strip().splitlines() if ln.startswith("preempted:")]
  assert len(err_lines) == 1 and "SIGTERM" in err_lines[0], err
  step = int(err_lines[0].split("at step ")[1].split()[0])
  assert step >= 3
  ck = checkpoint.Checkpointer(workdir / "checkpoints")
  assert ck.all_steps() == [step]  # checkpoint_every=0: only the one written on the way out
  ck.close()
  got_step, state, data_state = saved_state(workdir)
  assert got_step == step and data_state["loader"]["next_index"] == step
  assert_states_equal(state, saved_state(subprocess_reference, step)[1])


if __name__ == "__main__":
  sys.exit(main())
