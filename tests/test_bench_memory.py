"""bench.memory's plumbing on the tiny UNet: floors from exact parameter counts, skip logic, table and JSON."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import memory
from jdiff import parallel, training


@pytest.fixture(scope="module")
def torch_params():
  from diffusers import UNet2DConditionModel

  model = UNet2DConditionModel.from_config(memory.unet_config("tiny", 8).to_diffusers_config())
  return sum(p.numel() for p in model.parameters())


def _state_bytes(case: memory.Case, n_params: int) -> int:
  """Bytes of the abstract jdiff train state's params, moments and EMA for ``case`` (nothing allocated)."""
  from jdiff.models import UNet

  cfg = memory.unet_config("tiny", 8)
  moments = jnp.dtype(case.moments)
  tx = training.make_optimizer(mu_dtype=moments, nu_dtype=moments)
  x, ctx = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1, memory.CONTEXT_LEN, 32))
  init = lambda k: UNet(cfg).init(k, x, jnp.zeros((1,), jnp.int32), ctx)["params"]
  st = jax.eval_shape(lambda k: training.create_train_state(init, tx, key=k, mesh=parallel.make_mesh(),
                                                            ema=case.ema is not None, ema_dtype=case.ema),
                      jax.random.key(0))
  adam = st.opt_state[-1][0]
  leaves = jax.tree.leaves((st.params, adam.mu, adam.nu, st.ema_params))
  assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(st.params)) == n_params
  return sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in leaves)


def test_floor_is_params_grads_moments_ema_of_the_real_state(torch_params):
  n = memory.count_params("tiny")
  assert n == torch_params  # the same network as diffusers' from_config
  for name in ("f32", "bf16", "bf16-noema-remat"):
    case = memory.CASES[name]
    # floor = the state the jdiff step holds (params, both moments, EMA) + one float32 gradient per parameter
    assert memory.floor_bytes(n, case) == _state_bytes(case, n) + 4 * n, name
  assert memory.floor_bytes(n, memory.CASES["torch"]) == 4 * 5 * torch_params


def test_skipped_case_and_table(tmp_path):
  case = memory.CASES["f32-remat"]
  r = memory.run_case(case, model="tiny", batch=2, size=8, steps=1, n_params=1000, need_bytes=2**60)
  assert r["status"] == "skipped" and "GiB available" in r["reason"]
  assert r["floor_bytes"] == memory.floor_bytes(1000, case) and r["batch"] == 2 and r["remat"] is True
  rows = memory.table_rows([r])
  assert rows[0]["peak RSS GiB"] is None and rows[0]["status"].startswith("skipped")
  md = memory.markdown(rows).splitlines()
  assert len(md) == 3 and md[0].count("|") == len(memory.COLUMNS) + 1
  with pytest.raises(ValueError, match="unknown case"):
    memory.main(["--cases", "nope"])


@pytest.mark.slow
def test_end_to_end_tiny(tmp_path):
  """Two real cases in subprocesses: XLA's analysis donates the whole state, RSS above the floor."""
  out = tmp_path / "mem.json"
  assert memory.main(["--model", "tiny", "--size", "8", "--cases", "bf16-noema-remat,torch", "--steps", "2",
                      "--need-gib", "0", "--out", str(out)]) == 0
  payload = json.loads(out.read_text())
  jd, tr = payload["results"]
  assert jd["status"] == "ok" and tr["status"] == "ok", (jd, tr)
  assert jd["params"] == tr["params"] == payload["params"]
  xla = jd["xla"]
  assert xla["alias"] == jd["state_bytes"]  # every state buffer donated
  assert jd["state_bytes"] <= xla["argument"] <= jd["state_bytes"] + 2**20  # + the batch
  for r in (jd, tr):
    assert r["peak_rss_bytes"] > r["floor_bytes"] and len(r["step_s"]) == 2
    assert all(np.isfinite(r["losses"]))
