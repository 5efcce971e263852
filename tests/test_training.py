"""The train state, the jitted step (EMA, clipping, non-finite guard, rng) and sharding rules."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jdiff import checkpoint, parallel, training


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.tanh(nn.Dense(8)(x)))


MODEL = MLP()


def init_params(key):
  return MODEL.init(key, jnp.zeros((1, 5), jnp.float32))["params"]


def loss_fn(params, batch, key, frozen):
  noise = 0.1 * jax.random.normal(key, batch["y"].shape)  # uses the step key
  pred = MODEL.apply({"params": params}, batch["x"]) * frozen["scale"]
  loss = jnp.mean(jnp.square(pred - batch["y"] - noise))
  return loss, {"pred_mean": jnp.mean(pred)}


def make_batch(seed, bad=False):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(4, 5)).astype(np.float32)
  if bad:
    x[0, 0] = np.nan
  return {"x": x, "y": rng.normal(size=(4, 3)).astype(np.float32)}


@pytest.fixture(scope="module")
def setup():
  mesh = parallel.make_mesh()
  tx = training.make_optimizer(learning_rate=0.05, clip_norm=0.5)
  frozen = {"scale": jnp.float32(1.5)}

  def fresh():
    return training.create_train_state(init_params, tx, key=jax.random.key(7), mesh=mesh)

  st = fresh()
  shardings = jax.tree.map(lambda x: x.sharding, st)
  step = training.make_train_step(loss_fn, tx, mesh=mesh, state_sharding=shardings, frozen=frozen,
                                  ema_decay=0.9, ema_warmup=False, max_bad_steps=3)
  return mesh, tx, frozen, fresh, step


def test_step_matches_manual_optax_and_ema(setup):
  mesh, tx, frozen, fresh, step = setup
  st = fresh()
  params0 = jax.tree.map(np.asarray, st.params)
  rng = jax.random.wrap_key_data(np.asarray(st.rng))
  # Independent reference: plain jax.grad + optax chain (clip + adamw) + EMA in float64 numpy.
  p, opt, ema = params0, tx.init(params0), jax.tree.map(lambda a: np.asarray(a, np.float64), params0)
  for i in range(3):
    batch = make_batch(i)
    key = jax.random.fold_in(rng, i)
    (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(p, batch, key, frozen)
    upd, opt = tx.update(g, opt, p)
    p = optax.apply_updates(p, upd)
    ema = jax.tree.map(lambda e, q: 0.9 * e + 0.1 * np.asarray(q, np.float64), ema, p)
    st, m = step(st, parallel.host_to_global(batch, mesh))
    np.testing.assert_allclose(float(m["loss"]), float(loss), rtol=1e-5)
    gnorm = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(g)))
    np.testing.assert_allclose(float(m["grad_norm"]), gnorm, rtol=1e-5)
  assert int(st.step) == 3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
               st.params, p)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6),
               st.ema_params, ema)


def test_clipping_bounds_the_update():
  tx = training.make_optimizer(learning_rate=1.0, clip_norm=1e-3, b1=0.0, b2=0.0)
  g = {"w": jnp.full((4,), 100.0)}
  upd, _ = tx.update(g, tx.init({"w": jnp.zeros(4)}), {"w": jnp.zeros(4)})
  # With b1 = b2 = 0 Adam normalises per element, so clipping shows in the clipped gradient instead:
  clip = optax.clip_by_global_norm(1e-3)
  clipped, _ = clip.update(g, clip.init(g))
  np.testing.assert_allclose(float(optax.tree.norm(clipped)), 1e-3, rtol=1e-5)
  assert np.all(np.isfinite(np.asarray(upd["w"])))


def test_second_step_does_not_recompile(setup):
  mesh, _, _, fresh, step = setup
  st = fresh()
  st, _ = step(st, parallel.host_to_global(make_batch(0), mesh))
  n = step.jitted._cache_size()
  st, _ = step(st, parallel.host_to_global(make_batch(1), mesh))
  st, _ = step(st, parallel.host_to_global(make_batch(2), mesh))
  assert step.jitted._cache_size() == n


def test_non_finite_steps_are_skipped_then_stop(setup):
  mesh, _, _, fresh, step = setup
  st = fresh()
  st, m = step(st, parallel.host_to_global(make_batch(0), mesh))
  good = jax.tree.map(np.asarray, st)
  for k in range(1, 4):
    st, m = step(st, parallel.host_to_global(make_batch(k, bad=True), mesh))
    assert not bool(m["finite"]) and int(m["bad_steps"]) == k
    jax.tree.map(np.testing.assert_array_equal, st.params, good.params)
    jax.tree.map(np.testing.assert_array_equal, st.ema_params, good.ema_params)
    jax.tree.map(np.testing.assert_array_equal, st.opt_state, good.opt_state)
    if k < 3:
      step.raise_if_diverged(m)
  with pytest.raises(training.NonFiniteError, match="3 consecutive"):
    step.raise_if_diverged(m)
  assert training.check_finite(st.params)
  st, m = step(st, parallel.host_to_global(make_batch(9), mesh))
  assert bool(m["finite"]) and int(m["bad_steps"]) == 0 and int(m["skipped_steps"]) == 3


def test_checkpoint_refuses_nan(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path / "ck")
  with pytest.raises(ValueError, match="NaN"):
    ckpt.save(1, {"w": jnp.array([1.0, jnp.nan])})
  ckpt.close()
  assert ckpt.latest_step() is None


def test_ema_warmup_decay():
  steps = jnp.arange(5)
  np.testing.assert_allclose(training.ema_decay_at(steps, 0.999, True), (1.0 + np.arange(5)) / (10.0 + np.arange(5)),
                             rtol=1e-6)
  assert float(training.ema_decay_at(jnp.int32(10**6), 0.999, True)) == pytest.approx(0.999)
  assert float(training.ema_decay_at(jnp.int32(0), 0.99, False)) == pytest.approx(0.99)


def test_fsdp_spec_rules():
  assert parallel.fsdp_spec((3, 3, 64, 128), 4) == P(None, None, None, "fsdp")
  assert parallel.fsdp_spec((256, 64), 4) == P("fsdp", None)
  assert parallel.fsdp_spec((7, 5), 4) == P()
  assert parallel.fsdp_spec((128,), 4, min_size=1000) == P()
  assert parallel.fsdp_spec((128,), 1) == P()


def test_make_mesh_errors():
  n = len(jax.devices())
  with pytest.raises(ValueError, match="fsdp"):
    parallel.make_mesh(fsdp=n + 1)
  mesh = parallel.make_mesh()
  assert mesh.axis_names == ("data", "fsdp") and mesh.shape["data"] == n


def test_optimizer_schedule_errors():
  with pytest.raises(ValueError, match="total_steps"):
    training.make_optimizer(schedule="cosine")
  with pytest.raises(ValueError, match="learning-rate schedule"):
    training.make_optimizer(schedule="bogus")
