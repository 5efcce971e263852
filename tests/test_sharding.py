"""The train step on 8 CPU devices (data x FSDP) gives the 1-device loss; parameters are FSDP-sharded.

Runs in a subprocess because the device count is fixed when JAX starts
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

SCRIPT = textwrap.dedent("""
  import json
  import flax.linen as nn
  import jax, jax.numpy as jnp, numpy as np
  from jdiff import parallel, training

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Conv(16, (3, 3))(x))          # kernel [3, 3, 1, 16]
      h = h.reshape(h.shape[0], -1)                 # [B, 8*8*16]
      return nn.Dense(4)(nn.relu(nn.Dense(32)(h)))  # kernels [1024, 32], [32, 4]

  net = Net()
  init = lambda k: net.init(k, jnp.zeros((1, 8, 8, 1)))["params"]

  def loss_fn(p, b, key, frozen):
    noise = 0.01 * jax.random.normal(key, b["y"].shape)
    return jnp.mean(jnp.square(net.apply({"params": p}, b["x"]) - b["y"] - noise)), {}

  rng = np.random.default_rng(0)
  batches = [{"x": rng.normal(size=(16, 8, 8, 1)).astype(np.float32),
              "y": rng.normal(size=(16, 4)).astype(np.float32)} for _ in range(3)]
  out = {"n_devices": len(jax.devices())}
  for name, mesh, fsdp in [("one", parallel.make_mesh(devices=jax.devices()[:1]), False),
                           ("eight", parallel.make_mesh(fsdp=4), True)]:
    tx = training.make_optimizer(learning_rate=1e-2)
    st = training.create_train_state(init, tx, key=jax.random.key(0), mesh=mesh, fsdp=fsdp)
    shard = training.state_shardings(jax.eval_shape(lambda: st), mesh, fsdp=fsdp)
    step = training.make_train_step(loss_fn, tx, mesh=mesh, state_sharding=shard)
    losses = []
    for b in batches:
      st, m = step(st, parallel.host_to_global(b, mesh))
      losses.append(float(m["loss"]))
    k = st.params["Dense_1"]["kernel"]  # Dense(32): Dense(4) is built first
    out[name] = {"losses": losses,
                 "params": [np.asarray(x).tolist() for x in jax.tree.leaves(st.params)],
                 "spec": str(k.sharding.spec), "shard_shape": list(k.addressable_shards[0].data.shape),
                 "mu_spec": str(st.opt_state[1][0].mu["Dense_1"]["kernel"].sharding.spec),
                 "batch_spec": str(parallel.batch_sharding(mesh).spec),
                 "cache": step.jitted._cache_size()}
  print("RESULT" + json.dumps(out))
""")


def test_eight_devices_match_one_and_shard_params():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                        timeout=300, cwd=root)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
  out = json.loads(line[len("RESULT"):])
  assert out["n_devices"] == 8
  one, eight = out["one"], out["eight"]
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5)
  for a, b in zip(eight["params"], one["params"]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-5)  # Adam divides tiny grads: reduction order
  # [1024, 32] kernel: its largest axis divisible by 4 is split over "fsdp" -> 256 rows per shard.
  assert "fsdp" in eight["spec"] and eight["shard_shape"] == [256, 32]
  assert "fsdp" in eight["mu_spec"]  # Adam moments follow the parameters
  assert "fsdp" not in one["spec"] and "data" not in one["spec"]  # replicated
  assert "data" in eight["batch_spec"] and "fsdp" in eight["batch_spec"]
  assert eight["cache"] == 1  # three steps, one compilation


FSDP_SD15_SCRIPT = textwrap.dedent("""
  import json, math
  import jax, jax.numpy as jnp
  from jdiff import parallel, training
  from jdiff.models import UNet, UNetConfig

  unet = UNet(UNetConfig.sd15())
  init = lambda k: unet.init(k, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 77, 768)))["params"]
  mesh = parallel.make_mesh(fsdp=8)
  tx = training.make_optimizer()
  st = jax.eval_shape(lambda k: training.create_train_state(init, tx, key=k, mesh=mesh, fsdp=True), jax.random.key(0))
  state = (st.params, st.opt_state, st.ema_params)
  sh = training.state_shardings(state, mesh, fsdp=True)
  leaves = jax.tree.leaves(state)
  per_device = sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize for a, s in zip(leaves, jax.tree.leaves(sh)))
  # XLA's view: a donated program over the sharded state; its per-device argument bytes.
  touch = jax.jit(lambda s: jax.tree.map(lambda x: x + jnp.ones((), x.dtype), s), in_shardings=(sh,),
                  out_shardings=sh, donate_argnums=0)
  mem = touch.lower(state).compile().memory_analysis()
  print("RESULT" + json.dumps({"n_devices": len(jax.devices()), "total": sum(a.size * a.dtype.itemsize for a in leaves),
                               "params": sum(a.size for a in jax.tree.leaves(st.params)), "per_device": per_device,
                               "xla_argument": mem.argument_size_in_bytes, "xla_alias": mem.alias_size_in_bytes}))
""")


def test_fsdp_divides_sd15_state_over_eight_devices():
  """SD1.5's UNet parameters, AdamW moments and EMA (abstract: nothing allocated) FSDP-sharded over 8 CPU
  devices: per device at most 1/8 of the 1-device bytes + 5%, by the shardings and by XLA's memory analysis."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-c", FSDP_SD15_SCRIPT], env=env, capture_output=True, text=True,
                        timeout=600, cwd=root)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1][len("RESULT"):])
  assert out["n_devices"] == 8 and out["params"] == 859_520_964
  assert 16 * out["params"] <= out["total"] <= 16 * out["params"] + 64  # params, mu, nu, EMA (float32) + counters
  bound = out["total"] / 8 * 1.05
  assert out["per_device"] <= bound, (out["per_device"], bound)
  assert out["per_device"] <= out["xla_argument"] <= bound  # XLA holds what the shardings say, per device
  assert out["xla_alias"] == out["xla_argument"]  # donated: updated in place
