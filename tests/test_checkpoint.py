"""Orbax checkpointing of the whole train state + data position; shape mismatch errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import checkpoint, parallel, training


def _state(width: int, seed: int = 0):
  model = nn.Dense(width)
  tx = training.make_optimizer(learning_rate=1e-2)
  init = lambda k: model.init(k, jnp.zeros((1, 3)))["params"]  # noqa: E731
  return training.create_train_state(init, tx, key=jax.random.key(seed), mesh=parallel.make_mesh())


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def test_roundtrip_is_bit_identical_with_data_state(tmp_path):
  st = _state(4)
  st = st.replace(params=jax.tree.map(lambda p: p + 0.25, st.params), step=jnp.int32(5))
  with checkpoint.Checkpointer(tmp_path, max_to_keep=2) as ck:
    ck.save(5, st, data_state={"loader": {"next_index": 17}})
  ck2 = checkpoint.Checkpointer(tmp_path)
  restored, data_state = ck2.restore_latest(_abstract(_state(4, seed=1)))
  ck2.close()
  assert isinstance(restored, training.TrainState)
  assert data_state == {"loader": {"next_index": 17}}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, st)
  assert restored.params["kernel"].sharding == st.params["kernel"].sharding


def test_keeps_the_last_n(tmp_path):
  st = _state(2)
  ck = checkpoint.Checkpointer(tmp_path, max_to_keep=2)
  for s in (1, 2, 3):
    ck.save(s, st, data_state={})
  ck.close()
  assert checkpoint.Checkpointer(tmp_path).all_steps() == [2, 3]


def test_empty_dir_restores_none(tmp_path):
  ck = checkpoint.Checkpointer(tmp_path / "none")
  assert ck.restore_latest(_abstract(_state(2))) is None
  ck.close()


def test_different_model_shape_is_one_line_error(tmp_path):
  with checkpoint.Checkpointer(tmp_path) as ck:
    ck.save(1, _state(4), data_state={})
  ck = checkpoint.Checkpointer(tmp_path)
  with pytest.raises(ValueError) as e:
    ck.restore_latest(_abstract(_state(6)))
  ck.close()
  msg = str(e.value)
  assert "\n" not in msg and "(4,)" in msg and "(6,)" in msg and "bias" in msg


def test_check_shapes_missing_key():
  with pytest.raises(ValueError, match="missing"):
    checkpoint.check_shapes({"a": np.zeros(2)}, {"a": np.zeros(2), "b": np.zeros(1)})
  checkpoint.check_shapes({"a": np.zeros((2, 3))}, {"a": jax.ShapeDtypeStruct((2, 3), jnp.float32)})
