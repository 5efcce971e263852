"""Extra EMA trees of the train state (a consistency model's target network): the recursion against a
float64 recomputation, the loss sees the state before the update and is differentiated with respect
to the online parameters only, non-finite steps leave them unchanged, and checkpoints carry them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdiff import checkpoint, parallel, training
from tests.test_training import MODEL, init_params, make_batch  # the same tiny regression model and data


def loss_fn(params, batch, key, frozen, state):
  """Regression plus a pull towards the target network's output (a consistency-style target)."""
  noise = 0.1 * jax.random.normal(key, batch["y"].shape)
  pred = MODEL.apply({"params": params}, batch["x"])
  target = MODEL.apply({"params": state.extra_ema["target"]}, batch["x"])
  loss = jnp.mean(jnp.square(pred - batch["y"] - noise)) + frozen["w"] * jnp.mean(jnp.square(pred - target))
  return loss, {"step_seen": state.step.astype(jnp.float32)}


def mu(step):
  """A step-dependent decay (as a curriculum's mu(k))."""
  return 0.5 + 0.1 * jnp.mod(step, 4).astype(jnp.float32)


DECAYS = {"target": 0.95, "curriculum": mu}


@pytest.fixture(scope="module")
def setup():
  mesh = parallel.make_mesh()
  tx = training.make_optimizer(learning_rate=0.05, clip_norm=0.5)
  frozen = {"w": jnp.float32(0.5)}

  def fresh():
    return training.create_train_state(init_params, tx, key=jax.random.key(3), mesh=mesh, extra_ema=tuple(DECAYS))

  shardings = jax.tree.map(lambda x: x.sharding, fresh())
  step = training.make_train_step(loss_fn, tx, mesh=mesh, state_sharding=shardings, frozen=frozen,
                                  ema_decay=0.9, ema_warmup=False, max_bad_steps=3, extra_ema=DECAYS)
  return mesh, tx, frozen, fresh, step


def test_extra_emas_follow_their_recursions_in_float64(setup):
  mesh, tx, frozen, fresh, step = setup
  st = fresh()
  params0 = jax.tree.map(np.asarray, st.params)
  for name in DECAYS:  # every extra EMA starts at the initial parameters
    jax.tree.map(np.testing.assert_array_equal, st.extra_ema[name], params0)
  rng = jax.random.wrap_key_data(np.asarray(st.rng))
  f64 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)  # noqa: E731
  ref = {name: f64(params0) for name in DECAYS}
  p, opt = params0, tx.init(params0)
  n = 6
  for k in range(n):
    batch = make_batch(k)
    # Independent reference of the update: jax.grad with respect to the online parameters only, the
    # target (the state before the update) a constant.
    view = training.TrainState(step=jnp.int32(k), params=p, ema_params=p, opt_state=None, rng=st.rng,
                               bad_steps=jnp.int32(0), skipped_steps=jnp.int32(0),
                               extra_ema={name: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)
                                          for name, t in ref.items()})
    (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(p, batch, jax.random.fold_in(rng, k), frozen, view)
    upd, opt = tx.update(g, opt, p)
    p = optax.apply_updates(p, upd)
    decays = {"target": 0.95, "curriculum": 0.5 + 0.1 * (k % 4)}
    ref = {name: jax.tree.map(lambda e, q: decays[name] * e + (1.0 - decays[name]) * np.asarray(q, np.float64),
                              ref[name], p) for name in DECAYS}
    st, m = step(st, parallel.host_to_global(batch, mesh))
    assert float(m["step_seen"]) == k  # the loss saw the state before this update
    np.testing.assert_allclose(float(m["loss"]), float(loss), rtol=1e-5)
    for name in DECAYS:
      np.testing.assert_allclose(float(m[f"{name}_decay"]), decays[name], rtol=1e-7)
  # float32 recursion vs float64: each step rounds once per leaf (|x| < 1), so errors stay ~n eps32.
  tol = 4 * n * np.finfo(np.float32).eps
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6), st.params, p)
  for name in DECAYS:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol),
                 st.extra_ema[name], ref[name])
  # The two EMAs and the sampling EMA (decay 0.9) are distinct trees.
  a = np.asarray(st.extra_ema["target"]["Dense_0"]["kernel"])
  b = np.asarray(st.extra_ema["curriculum"]["Dense_0"]["kernel"])
  assert np.max(np.abs(a - b)) > 1e-4


def test_non_finite_step_keeps_extra_emas(setup):
  mesh, _, _, fresh, step = setup
  st, _ = step(fresh(), parallel.host_to_global(make_batch(0), mesh))
  good = jax.tree.map(np.asarray, st.extra_ema)
  st, m = step(st, parallel.host_to_global(make_batch(1, bad=True), mesh))
  assert not bool(m["finite"])
  jax.tree.map(np.testing.assert_array_equal, st.extra_ema, good)


def test_names_must_match_the_state(setup):
  mesh, tx, frozen, fresh, _ = setup
  st = fresh()
  shardings = jax.tree.map(lambda x: x.sharding, st)
  step = training.make_train_step(loss_fn, tx, mesh=mesh, state_sharding=shardings, frozen=frozen,
                                  extra_ema={"target": 0.9})
  with pytest.raises(ValueError, match="extra EMAs"):
    step(st, parallel.host_to_global(make_batch(0), mesh))
  with pytest.raises(ValueError, match="distinct"):
    training.create_train_state(init_params, tx, key=jax.random.key(0), mesh=mesh, extra_ema=("a", "a"))


def test_checkpoint_round_trip(setup, tmp_path):
  """Extra EMAs are saved and restored bit-identically; a state without them writes no such entry
  (the format of every other task is unchanged)."""
  mesh, tx, _, fresh, step = setup
  st, _ = step(fresh(), parallel.host_to_global(make_batch(0), mesh))
  with checkpoint.Checkpointer(str(tmp_path / "a"), async_save=False) as ck:
    ck.save(1, st, force=True)
    assert "extra_ema" in ck.saved_shapes(1)
    restored, _ = ck.restore(1, checkpoint.abstract_like(st))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored), jax.tree.map(np.asarray, st))
  plain = training.create_train_state(init_params, tx, key=jax.random.key(3), mesh=mesh)
  assert plain.extra_ema is None
  with checkpoint.Checkpointer(str(tmp_path / "b"), async_save=False) as ck:
    ck.save(0, plain, force=True)
    assert "extra_ema" not in ck.saved_shapes(0)
    back, _ = ck.restore(0, checkpoint.abstract_like(plain))
  assert back.extra_ema is None


def test_gradient_accumulation_passes_the_state(setup):
  """train.loop's micro-batch scan hands the state to every micro-batch's loss."""
  from train import loop

  _, _, frozen, fresh, _ = setup
  st = fresh()
  batch = {k: jnp.asarray(v) for k, v in make_batch(0).items()}
  key = jax.random.key(5)
  loss, aux = jax.jit(loop.accumulate_gradients(loss_fn, 2))(st.params, batch, key, frozen, st)
  keys = jax.random.split(key, 2)
  halves = [loss_fn(st.params, {k: v[j::2] for k, v in batch.items()}, keys[j], frozen, st)[0] for j in range(2)]
  np.testing.assert_allclose(float(loss), float(np.mean(halves)), rtol=1e-6)
  assert float(aux["step_seen"]) == 0.0
