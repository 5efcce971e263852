"""The composable sampler surface: a grid plus a step rule run by ``samplers.solve``.

Research-style composition equals the diffusers-named facade and diffusers itself; cutting a grid
equals diffusers' img2img cut of a multistep solver (warm-up restarted, final-step rules of the
whole schedule); a grid of explicit sigmas is differentiable; a hand-written grid and rule run in
``jax.jit``; the loop is one XLA program.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.parity import test_sampler_common as h

diffusers = pytest.importorskip("diffusers")

from jdiff import samplers  # noqa: E402

TOL = 1e-5  # the parity tolerance of the facade's tests (float32 trajectories of the toy model)
SCHED, CFG = h.schedule_pair()


def _diffusers_dpm(order: int, **cfg):
  return diffusers.DPMSolverMultistepScheduler(**CFG, solver_order=order, **cfg)


class ComposeVariantsTest(chex.TestCase):
  """The same rule on the same grid, with and without ``jax.jit``, equals the facade."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_unipc_rule_equals_facade(self):
    xT = jnp.asarray(h.x_T(seed=6))
    g = samplers.grid(SCHED, 8, sigmas="exponential", convention="unipc")
    run = self.variant(lambda z: samplers.solve(h.toy_jax, g, z, samplers.unipc_rule(order=3)))
    facade = samplers.unipc(h.toy_jax, SCHED, xT, num_steps=8, order=3, use_exponential_sigmas=True)
    chex.assert_trees_all_close(run(xT), facade, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sigmas,order", [("karras", 3), (None, 2), ("beta", 2)])
def test_research_composition_equals_facade_and_diffusers(sigmas, order):
  xT = h.x_T(seed=3)
  g = samplers.grid(SCHED, 10, sigmas=sigmas)
  rule = samplers.dpm_solver_rule(order=order)
  x0, traj = samplers.solve(h.toy_jax, g, jnp.asarray(xT), rule, return_trajectory=True)
  jit_x0 = jax.jit(lambda z: samplers.solve(h.toy_jax, g, z, rule))(jnp.asarray(xT))
  flag = {"karras": {"use_karras_sigmas": True}, "beta": {"use_beta_sigmas": True}, None: {}}[sigmas]
  facade = samplers.dpm_solver(h.toy_jax, SCHED, jnp.asarray(xT), num_steps=10, order=order, **flag)
  chex.assert_trees_all_close(x0, facade, rtol=0, atol=0)  # the facade is this composition
  chex.assert_trees_all_close(jit_x0, x0, rtol=1e-6, atol=1e-6)
  ref, ts = h.run_diffusers(_diffusers_dpm(order, **flag), xT, 10)
  np.testing.assert_array_equal(np.asarray(g.timesteps), ts)
  assert h.max_rel_diff(traj, ref) <= TOL


@pytest.mark.parametrize("strength", [0.6, 0.35])
def test_cut_grid_equals_diffusers_img2img(strength):
  n, order = 10, 2
  sch = _diffusers_dpm(order)
  sch.set_timesteps(n)
  t_start = n - min(int(n * strength), n)
  sch.set_begin_index(t_start)
  x_start = h.x_T(seed=5)  # the (noised) sample at level t_start
  x = h.torch.from_numpy(x_start)
  ref = []
  for t in sch.timesteps[t_start:]:
    x = sch.step(h.toy_torch(sch.scale_model_input(x, t), t), t, x).prev_sample
    ref.append(x.numpy().copy())
  g = samplers.cut(samplers.grid(SCHED, n), strength=strength)
  assert g.num_steps == n - t_start and g.offset == t_start
  np.testing.assert_array_equal(np.asarray(g.timesteps), sch.timesteps[t_start:].numpy())
  # warm-up restarts at the cut; lower-order final steps follow the whole 10-step schedule
  np.testing.assert_array_equal(samplers.step_orders(g, order), [1] + [2] * (g.num_steps - 2) + [1])
  _, traj = samplers.solve(h.toy_jax, g, jnp.asarray(x_start), samplers.dpm_solver_rule(order=order),
                           return_trajectory=True)
  assert h.max_rel_diff(traj, np.stack(ref)) <= TOL


def test_refiner_handoff_is_two_cuts():
  """Base on levels 0..k, refiner on k..n: with a one-step rule (no history) this is one run."""
  g = samplers.grid(SCHED, 12, sigmas="karras", convention="euler")
  xT = jnp.asarray(h.x_T(seed=7))
  rule = samplers.euler_rule()
  whole = samplers.solve(h.toy_jax, g, xT, rule)
  mid = samplers.solve(h.toy_jax, samplers.cut(g, stop=5), xT, rule)
  end = samplers.solve(h.toy_jax, samplers.cut(g, 5), mid, rule)
  chex.assert_trees_all_close(end, whole, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="start"):
    samplers.cut(g, 12)


def test_explicit_grid_is_differentiable():
  """d(loss)/d(interior levels) through grid + rule (the end levels are fixed, as in calibration)."""
  xT = jnp.asarray(h.x_T(seed=2))
  rule = samplers.unipc_rule(order=2)
  inner = jnp.asarray([4.0, 1.0, 0.25, 0.05], jnp.float32)

  def loss(mid):
    sig = jnp.concatenate([jnp.full((1,), 14.6), mid, jnp.zeros((1,))])
    return jnp.sum(samplers.solve(h.toy_jax, samplers.grid(SCHED, sigmas=sig), xT, rule) ** 2)

  grad = jax.jit(jax.grad(loss))(inner)
  assert bool(jnp.all(jnp.isfinite(grad))) and bool(jnp.any(grad != 0))
  # against a central difference along a direction (step 1e-3 relative: truncation ~1e-6,
  # float32 rounding ~1e-7 / 1e-3 = 1e-4 of the loss scale)
  v = jnp.asarray([1.0, -1.0, 0.5, 1.0]) * inner * 1e-3
  fd = (loss(inner + v) - loss(inner - v)) / 2.0
  np.testing.assert_allclose(float(jnp.dot(grad, v)), float(fd), rtol=2e-2)


def test_hand_built_grid_and_custom_rule_in_jit():
  """A list of sigmas and a five-line DDIM rule: deterministic DDIM is Euler in the VE variables,
  so it equals ``euler_rule`` on the same grid."""
  g = samplers.grid(SCHED, sigmas=[14.6, 6.0, 2.0, 0.6, 0.1, 0.0])

  def ddim_step(model_fn, x, s):
    eps = samplers.call_model(model_fn, x, s.t)
    x0 = (x - s.sigma * eps) / s.alpha
    return s.alpha_to * x0 + s.sigma_to * eps

  ddim = samplers.Rule(init=lambda x, g: x, step=ddim_step, sample=lambda x: x)
  xT = jnp.asarray(h.x_T(seed=4))
  mine = jax.jit(lambda z: samplers.solve(h.toy_jax, g, z, ddim))(xT)
  ref = samplers.solve(h.toy_jax, g, xT, samplers.euler_rule())
  chex.assert_trees_all_close(mine, ref, rtol=1e-5, atol=1e-5)
  assert g.timesteps.dtype == jnp.float32  # fractional timesteps of the listed sigmas


def test_solve_is_one_program():
  g = samplers.grid(SCHED, 10, sigmas="karras")
  traces = []

  def model(x, t):
    traces.append(1)
    return h.toy_jax(x, t)

  run = jax.jit(lambda z: samplers.solve(model, g, z, samplers.dpm_solver_rule(order=3)))
  z = jnp.asarray(h.x_T(seed=1))
  run(z)
  run(z + 1.0)
  assert run._cache_size() == 1 and len(traces) == 1  # traced once, compiled once
  assert "while" in run.lower(z).as_text()  # one XLA loop, not 10 dispatches


def test_rule_that_changes_the_state_fails_at_trace_time():
  g = samplers.grid(SCHED, 4)
  bad = samplers.Rule(init=lambda x, g: x, step=lambda m, x, s: x.astype(jnp.bfloat16), sample=lambda x: x)
  with pytest.raises(AssertionError):
    samplers.solve(h.toy_jax, g, jnp.ones((2, h.DIM)), bad)


def test_euler_on_cut_grid_equals_diffusers_img2img():
  """Euler from the VP sample at level 4 of a cut Karras grid equals diffusers'
  EulerDiscreteScheduler begun at index 4 from the same sample in its VE variable y = x / alpha."""
  n, k = 10, 4
  sch = diffusers.EulerDiscreteScheduler(**CFG, use_karras_sigmas=True)
  sch.set_timesteps(n)
  sch.set_begin_index(k)
  x_start = h.x_T(seed=8)  # the VP sample at level k
  s_k = float(sch.sigmas[k])
  x = h.torch.from_numpy(x_start) * float(np.sqrt(1.0 + s_k * s_k))  # y = x / alpha_k
  ref = []
  for t in sch.timesteps[k:]:
    x = sch.step(h.toy_torch(sch.scale_model_input(x, t), t), t, x).prev_sample
    ref.append(x.numpy().copy())
  g = samplers.cut(samplers.grid(SCHED, n, sigmas="karras", convention="euler"), k)
  np.testing.assert_allclose(np.asarray(g.timesteps), sch.timesteps[k:].numpy(), rtol=1e-6)
  _, traj = samplers.solve(h.toy_jax, g, jnp.asarray(x_start), samplers.euler_rule(), return_trajectory=True)
  ve_traj = np.asarray(traj) / np.asarray(g.alpha[1:])[:, None, None]  # the trajectory in diffusers' variable
  assert h.max_rel_diff(ve_traj, np.stack(ref)) <= TOL
