"""The fast samplers are single XLA programs: a jitted 10-step DPM-Solver++ call traces the model
once (the scan body) and compiles once; a second call with new noise reuses the executable."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import samplers, schedules


def _model(counter):
  def fn(x, t):
    counter.append(1)  # Python side effect: runs only while tracing
    return 0.1 * x * jnp.cos(t.astype(jnp.float32) / 500.0).reshape(-1, 1, 1, 1)
  return fn


def test_dpm_solver_compiles_once_without_per_step_dispatch():
  sched = schedules.scaled_linear(1000, 0.00085, 0.012)
  traces = []
  run = jax.jit(lambda z: samplers.sample("dpm_solver", _model(traces), sched, z, num_steps=10, order=2))
  z = jax.random.normal(jax.random.key(0), (2, 16, 16, 4))  # a tiny UNet-sized latent, NHWC
  out1 = run(z)
  assert len(traces) == 1  # the model is traced once: the 10 steps live in one lax.scan
  out2 = run(z + 1.0)
  assert len(traces) == 1  # no retrace on the second call
  assert run._cache_size() == 1
  assert out1.shape == z.shape and out1.dtype == jnp.float32
  assert not np.allclose(np.asarray(out1), np.asarray(out2))
  hlo = run.lower(z).as_text()
  assert hlo.count("while") >= 1  # the loop is an XLA while, not 10 unrolled dispatches


@pytest.mark.parametrize("method,opts", [
    ("euler", {}), ("euler_ancestral", {"key": jax.random.key(1)}), ("heun", {}), ("unipc", {"order": 3}),
    ("lcm", {"key": jax.random.key(1)}), ("dpm_solver", {"singlestep": True, "order": 3})])
def test_every_sampler_is_one_program_with_float32_state(method, opts):
  sched = schedules.scaled_linear(1000, 0.00085, 0.012)
  traces = []

  def bf16_model(x, t):
    traces.append(1)
    return (0.1 * x).astype(jnp.bfloat16)  # a bfloat16 network: the sampler state stays float32

  out = jax.jit(lambda z: samplers.sample(method, bf16_model, sched, z, num_steps=6, **opts))(
      jnp.ones((1, 4, 4, 2), jnp.bfloat16))
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
  assert len(traces) == 1


def test_samplers_registered():
  for name in ("dpm_solver", "euler", "euler_ancestral", "heun", "unipc", "lcm"):
    assert name in samplers.available()


def test_traced_schedule_matches_concrete():
  # the grids are jnp computations when the schedule itself is a jit argument
  sched = schedules.scaled_linear(1000, 0.00085, 0.012)
  model = lambda x, t: 0.5 * x * jnp.cos(t.astype(jnp.float32) / 400.0).reshape(-1, 1)
  z = jax.random.normal(jax.random.key(0), (2, 5))
  for method, opts in (("dpm_solver", {"use_karras_sigmas": True}), ("euler", {"use_karras_sigmas": True}),
                       ("unipc", {})):
    a = samplers.sample(method, model, sched, z, num_steps=8, **opts)
    b = jax.jit(lambda s, zz: samplers.sample(method, model, s, zz, num_steps=8, **opts))(sched, z)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-4)
