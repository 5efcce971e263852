"""DDIM inversion against a plain loop over diffusers' DDIMInverseScheduler on the same analytic model
function (float32; max relative difference over the trajectory <= 1e-5, derived as for the forward
samplers in ``tests/parity/__init__.py``: <= 50 steps of a few tens of float32 operations each)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jdiff import samplers  # noqa: E402
from tests.parity.test_ddim_ddpm import PRED_NAMES, SCHEDS, _rel, jax_model, torch_model  # noqa: E402

SHAPE = (2, 6, 6, 3)


def _x_0(seed=5):
  return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32) * 0.8


def _reference(*, pred, spacing, offset, alpha_one, clip, sched, num_steps):
  kw, _ = SCHEDS[sched]
  ref = diffusers.DDIMInverseScheduler(num_train_timesteps=1000, prediction_type=PRED_NAMES[pred],
                                       timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=alpha_one,
                                       clip_sample=clip, clip_sample_range=1.5, **kw)
  ref.set_timesteps(num_steps)
  x = torch.from_numpy(_x_0())
  traj = []
  for t in ref.timesteps:  # the model is told the step's target timestep, as diffusers' inversion pipelines do
    x = ref.step(torch_model(x, t), t, x).prev_sample
    traj.append(x.numpy())
  return np.asarray(ref.timesteps), np.stack(traj)


CASES = [
    # pred, spacing, offset, alpha_one, clip, sched, num_steps
    ("epsilon", "leading", 0, True, False, "scaled_linear", 10),
    ("epsilon", "leading", 1, False, False, "scaled_linear", 10),
    ("epsilon", "trailing", 0, True, False, "scaled_linear", 7),  # source levels off the grid
    ("v", "trailing", 0, False, False, "linear", 10),
    ("sample", "leading", 1, False, True, "cosine", 10),  # alpha-bar_0 start: eps from a finite sigma
    ("epsilon", "trailing", 0, True, True, "scaled_linear", 50),
]


@pytest.mark.parametrize("pred,spacing,offset,alpha_one,clip,sched,num_steps", CASES)
def test_ddim_inversion_matches_diffusers(pred, spacing, offset, alpha_one, clip, sched, num_steps):
  ts_ref, traj_ref = _reference(pred=pred, spacing=spacing, offset=offset, alpha_one=alpha_one, clip=clip,
                                sched=sched, num_steps=num_steps)
  g, _ = samplers.inversion_grid(SCHEDS[sched][1](), num_steps, timestep_spacing=spacing, steps_offset=offset)
  np.testing.assert_array_equal(np.asarray(g.timesteps), ts_ref)
  _, traj = samplers.ddim_inversion(jax_model, SCHEDS[sched][1](), jnp.asarray(_x_0()), num_steps=num_steps,
                                    prediction=pred, timestep_spacing=spacing, steps_offset=offset,
                                    set_alpha_to_one=alpha_one, clip_sample=clip, clip_sample_range=1.5,
                                    return_trajectory=True)
  traj = np.asarray(traj)
  assert traj.shape == traj_ref.shape
  assert max(_rel(traj[i], traj_ref[i]) for i in range(num_steps)) <= 1e-5


def test_ddim_inversion_jits_once_and_rule_composes_with_cut():
  sched = SCHEDS["scaled_linear"][1]()
  traces = []

  def run(z):
    traces.append(1)
    return samplers.ddim_inversion(jax_model, sched, z, num_steps=8, timestep_spacing="trailing")

  f = jax.jit(run)
  z0 = jnp.asarray(_x_0())
  full = f(z0)
  f(z0 + 1.0)
  assert len(traces) == 1
  # the grid + rule surface: the first 3 steps, then the remaining 5, equal the full run
  g, src = samplers.inversion_grid(sched, 8, timestep_spacing="trailing")
  rule = samplers.ddim_inversion_rule(source_alpha_bar=src)
  head = samplers.solve(jax_model, samplers.cut(g, stop=3), z0, rule)
  tail = samplers.solve(jax_model, samplers.cut(g, 3), head, rule)
  np.testing.assert_allclose(np.asarray(tail), np.asarray(full), rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(full))))


def test_ddim_inversion_refuses_linspace():
  with pytest.raises(ValueError, match="leading.*trailing"):
    samplers.ddim_inversion(jax_model, SCHEDS["linear"][1](), jnp.zeros(SHAPE), num_steps=4,
                            timestep_spacing="linspace")
