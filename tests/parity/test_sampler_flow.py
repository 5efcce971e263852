"""Parity of jdiff's rectified-flow samplers with diffusers' FlowMatchEulerDiscrete and FlowMatchHeunDiscrete
schedulers, and of DPM-Solver++ / UniPC on flow sigmas (``use_flow_sigmas=True``,
``prediction_type="flow_prediction"``), over whole trajectories of the same toy velocity model (float32,
<= 1e-5: the bound of ``tests/parity/__init__.py``); stochastic sampling with the same noise injected
into both. The grids themselves are compared bit for bit."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.parity import test_sampler_common as h

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from jdiff import flow  # noqa: E402
from jdiff import samplers  # noqa: E402
from jdiff.samplers import dpm_solver, flow_euler, flow_heun, flow_sigmas, unipc  # noqa: E402

TOL = 1e-5
SEQ_LEN = 1024  # a 512px image in SD3's latent space (64x64 latents, patch 2)


def _run_diffusers(sch, xT: np.ndarray, n: int, set_kw=None, step_kw=None):
  """Runs a flow scheduler as the SD3/Flux pipelines do (no input scaling, x_T is the sample at
  sigma = 1); returns every state [calls, B, D] and the timesteps the model was told."""
  sch.set_timesteps(n, **(set_kw or {}))
  x = torch.from_numpy(xT)
  traj, ts = [], []
  for i, t in enumerate(sch.timesteps):
    out = h.toy_torch(x, t)
    kw = {k: (v[i] if isinstance(v, list) else v) for k, v in (step_kw or {}).items()}
    x = sch.step(out, t, x, **kw).prev_sample
    traj.append(x.numpy().copy())
    ts.append(t.numpy().copy())
  return np.stack(traj), np.stack(ts)


def _run_jdiff(fn, xT, n, **kw):
  log = []
  _, traj = fn(h.recording_model(h.toy_jax, log), None, jnp.asarray(xT), num_steps=n, return_trajectory=True, **kw)
  return np.asarray(traj), np.stack(log)[:, 0]


def _mu():
  return flow.dynamic_shift_mu(SEQ_LEN, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15)


# (diffusers config, set_timesteps kwargs, jdiff options, steps)
EULER_CASES = {
    "shift1-4": ({}, {}, {}, 4),
    "shift3-10": (dict(shift=3.0), {}, dict(shift=3.0), 10),
    "shift3-28": (dict(shift=3.0), {}, dict(shift=3.0), 28),
    "dynamic-exp-10": (dict(use_dynamic_shifting=True), "mu",
                       dict(use_dynamic_shifting=True, image_seq_len=SEQ_LEN), 10),
    "dynamic-linear-28": (dict(use_dynamic_shifting=True, time_shift_type="linear"), "mu",
                          dict(use_dynamic_shifting=True, image_seq_len=SEQ_LEN, time_shift_type="linear"), 28),
    "flux-sigmas-10": (dict(use_dynamic_shifting=True, max_shift=1.15), "mu-sigmas",
                       dict(use_dynamic_shifting=True, image_seq_len=SEQ_LEN), 10),
    "karras-10": (dict(shift=3.0, use_karras_sigmas=True), {}, dict(shift=3.0, use_karras_sigmas=True), 10),
    "exponential-10": (dict(shift=3.0, use_exponential_sigmas=True), {}, dict(shift=3.0, use_exponential_sigmas=True),
                       10),
    "beta-28": (dict(shift=3.0, use_beta_sigmas=True), {}, dict(shift=3.0, use_beta_sigmas=True), 28),
    "terminal-10": (dict(shift=3.0, shift_terminal=0.1), {}, dict(shift=3.0, shift_terminal=0.1), 10),
}


def _set_kw(spec, n):
  if spec == "mu":
    return dict(mu=_mu())
  if spec == "mu-sigmas":
    return dict(mu=_mu(), sigmas=np.linspace(1.0, 1 / n, n))
  return {}


@pytest.mark.parametrize("name", list(EULER_CASES))
def test_flow_euler_matches_diffusers(name):
  cfg, set_spec, opts, n = EULER_CASES[name]
  xT = h.x_T(seed=n)
  set_kw = _set_kw(set_spec, n)
  ref, ts = _run_diffusers(diffusers.FlowMatchEulerDiscreteScheduler(**cfg), xT, n, set_kw=set_kw)
  if "sigmas" in set_kw:
    opts = dict(opts, sigmas=set_kw["sigmas"], num_steps=None)
  traj, t_seen = _run_jdiff(flow_euler, xT, opts.pop("num_steps", n), **opts)
  assert t_seen.dtype == np.float32
  np.testing.assert_array_equal(t_seen, ts)  # the same float32 timesteps, bit for bit
  assert np.all(np.isfinite(ref))
  assert h.max_rel_diff(traj, ref) <= TOL


@pytest.mark.parametrize("shift,n", [(3.0, 10), (1.0, 28)])
def test_flow_euler_stochastic_matches_diffusers_with_same_noise(shift, n):
  key = jax.random.key(n)
  xT = h.x_T(seed=n)
  noises = h.jdiff_noises(key, n, xT.shape)
  sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift, stochastic_sampling=True)
  with h.injected_noise("diffusers.schedulers.scheduling_flow_match_euler_discrete", noises):
    ref, _ = _run_diffusers(sch, xT, n)
  traj, _ = _run_jdiff(flow_euler, xT, n, key=key, shift=shift, stochastic_sampling=True)
  assert h.max_rel_diff(traj, ref) <= TOL
  # the noise matters: a different key gives a different trajectory
  other, _ = _run_jdiff(flow_euler, xT, n, key=jax.random.key(n + 1), shift=shift, stochastic_sampling=True)
  assert h.max_rel_diff(other, ref) > 1e-2


def _heun_reference_rounding(sch) -> float:
  """The extra rounding of diffusers' Heun corrector, relative to the state's scale.

  diffusers recovers the velocity at level s' as (x - (x - s' v)) / s', which loses u |x| / s'
  (u = 2^-24); the step multiplies it by |s' - s|. Summed over the correctors, with a factor 4 for
  the two roundings of each difference, this bounds what the reference adds to the trajectory:
  3e-6 to 8e-6 for shift 3, but 8e-5 for 4 steps at shift 1, whose last corrector sits at s' = 0.001
  after a step of 0.33. jdiff uses v itself.
  """
  sig = sch.sigmas.numpy().astype(np.float64)[::2]  # levels 0..n-1 (the last, 0, has no corrector)
  ratios = np.abs(np.diff(sig)) / sig[1:]  # the corrector of step k lands on level k + 1
  return 4 * 2.0 ** -24 * float(ratios.sum())


@pytest.mark.parametrize("shift,n", [(1.0, 4), (3.0, 10), (3.0, 28)])
def test_flow_heun_matches_diffusers(shift, n):
  xT = h.x_T(seed=n)
  sch = diffusers.FlowMatchHeunDiscreteScheduler(shift=shift)
  ref, ts = _run_diffusers(sch, xT, n)
  assert ref.shape[0] == 2 * n - 1
  traj, t_seen = _run_jdiff(flow_heun, xT, n, shift=shift)
  np.testing.assert_array_equal(t_seen, ts)
  assert h.max_rel_diff(traj, ref) <= TOL + _heun_reference_rounding(sch)


def test_flow_euler_on_a_cut_grid_matches_sd3_img2img():
  # SD3's img2img pipeline: start index int(n - n * strength), x = scale_noise(x0, t_start, noise), then steps
  n, strength = 28, 0.6
  start = int(max(n - min(n * strength, n), 0))
  x0, noise = h.x_T(seed=1), h.x_T(seed=2)
  sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
  sch.set_timesteps(n)
  timesteps = sch.timesteps[start:]
  sch.set_begin_index(start)
  x = sch.scale_noise(torch.from_numpy(x0), timesteps[:1], torch.from_numpy(noise))
  x_start, ref = x.numpy().copy(), []
  for t in timesteps:
    x = sch.step(h.toy_torch(x, t), t, x).prev_sample
    ref.append(x.numpy().copy())
  g = samplers.cut(samplers.flow_grid(n, shift=3.0), start)
  x_j = g.alpha[0] * jnp.asarray(x0) + g.sigma[0] * jnp.asarray(noise)
  # two products and a sum in float32 (XLA may fuse them): a few roundings of the inputs' scale
  scale = max(np.abs(x0).max(), np.abs(noise).max())
  np.testing.assert_allclose(np.asarray(x_j), x_start, rtol=0, atol=4 * 2.0 ** -24 * scale)
  _, traj = samplers.solve(h.toy_jax, g, x_j, samplers.flow_euler_rule(), return_trajectory=True)
  assert traj.shape[0] == n - start == len(ref)
  assert h.max_rel_diff(np.asarray(traj), np.stack(ref)) <= TOL


DPM_CASES = {
    "o1-shift1-4": (dict(solver_order=1, flow_shift=1.0), {}, 4),
    "o2-shift3-10": (dict(solver_order=2, flow_shift=3.0), {}, 10),
    "o3-heun-shift3-28": (dict(solver_order=3, flow_shift=3.0, solver_type="heun"), {}, 28),
    "o2-dynamic-10": (dict(solver_order=2, use_dynamic_shifting=True), "mu", 10),
    "sde-o2-shift3-10": (dict(solver_order=2, flow_shift=3.0, algorithm_type="sde-dpmsolver++"), {}, 10),
}


@pytest.mark.parametrize("name", list(DPM_CASES))
def test_dpm_solver_on_flow_sigmas_matches_diffusers(name):
  cfg, set_spec, n = DPM_CASES[name]
  xT = h.x_T(seed=n)
  set_kw = _set_kw(set_spec, n)
  stochastic = cfg.get("algorithm_type") == "sde-dpmsolver++"
  key = jax.random.key(n)
  step_kw = {}
  if stochastic:
    step_kw = dict(variance_noise=[torch.from_numpy(z) for z in h.jdiff_noises(key, n, xT.shape)])
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    sch = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", **cfg)
    ref, ts = _run_diffusers(sch, xT, n, set_kw=set_kw, step_kw=step_kw)
  opts = dict(order=cfg["solver_order"], solver_type=cfg.get("solver_type", "midpoint"),
              algorithm=cfg.get("algorithm_type", "dpmsolver++"), use_flow_sigmas=True,
              flow_shift=cfg.get("flow_shift", 1.0), use_dynamic_shifting=cfg.get("use_dynamic_shifting", False),
              mu=set_kw.get("mu"), key=key if stochastic else None)
  traj, t_seen = _run_jdiff(dpm_solver, xT, n, prediction="flow_prediction", **opts)
  assert t_seen.dtype == np.int32
  np.testing.assert_array_equal(t_seen, ts)
  assert np.all(np.isfinite(ref))
  assert h.max_rel_diff(traj, ref) <= TOL


UNIPC_CASES = {
    "o3-shift1-4": (dict(solver_order=3, flow_shift=1.0), {}, 4),
    "o3-shift3-28": (dict(solver_order=3, flow_shift=3.0), {}, 28),
    "o2-dynamic-terminal-10": (dict(solver_order=2, use_dynamic_shifting=True, shift_terminal=0.1), "mu", 10),
}


@pytest.mark.parametrize("name", list(UNIPC_CASES))
def test_unipc_on_flow_sigmas_matches_diffusers(name):
  cfg, set_spec, n = UNIPC_CASES[name]
  xT = h.x_T(seed=n)
  set_kw = _set_kw(set_spec, n)
  sch = diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", **cfg)
  ref, ts = _run_diffusers(sch, xT, n, set_kw=set_kw)
  traj, t_seen = _run_jdiff(unipc, xT, n, prediction="flow_prediction", order=cfg["solver_order"],
                            use_flow_sigmas=True, flow_shift=cfg.get("flow_shift", 1.0),
                            use_dynamic_shifting=cfg.get("use_dynamic_shifting", False), mu=set_kw.get("mu"),
                            shift_terminal=cfg.get("shift_terminal"))
  np.testing.assert_array_equal(t_seen, ts)
  assert np.all(np.isfinite(ref))
  assert h.max_rel_diff(traj, ref) <= TOL


def test_flow_grids_equal_diffusers_bit_for_bit():
  # the levels and timesteps of every option above, without running a model
  for n in (4, 10, 28):
    for cfg, set_spec, opts, _ in EULER_CASES.values():
      set_kw = _set_kw(set_spec, n)
      sch = diffusers.FlowMatchEulerDiscreteScheduler(**cfg)
      sch.set_timesteps(n, **set_kw)
      mu = set_kw.get("mu")
      sched_name = next((k[4:-7] for k, v in opts.items() if k.startswith("use_") and k.endswith("_sigmas") and v),
                        None)
      ts, sig = flow_sigmas(None if "sigmas" in set_kw else n, shift=opts.get("shift", 1.0), mu=mu,
                            time_shift_type=opts.get("time_shift_type", "exponential"),
                            shift_terminal=opts.get("shift_terminal"), sigma_schedule=sched_name,
                            sigmas=set_kw.get("sigmas"))
      np.testing.assert_array_equal(sig, sch.sigmas.numpy())
      np.testing.assert_array_equal(ts, sch.timesteps.numpy())
    for shift in (1.0, 3.0):
      for cls, conv in ((diffusers.DPMSolverMultistepScheduler, "multistep"),
                        (diffusers.UniPCMultistepScheduler, "unipc")):
        sch = cls(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)
        sch.set_timesteps(n)
        ts, sig = flow_sigmas(n, shift=shift, convention=conv)
        np.testing.assert_array_equal(sig, sch.sigmas.numpy())
        np.testing.assert_array_equal(ts, sch.timesteps.numpy())


def test_flow_samplers_reject_bad_options():
  x = jnp.zeros((1, 4))
  with pytest.raises(ValueError, match="image_seq_len"):
    flow_euler(h.toy_jax, None, x, num_steps=4, use_dynamic_shifting=True)
  with pytest.raises(ValueError, match="use_dynamic_shifting"):
    flow_euler(h.toy_jax, None, x, num_steps=4, mu=0.5)
  with pytest.raises(ValueError, match="key"):
    flow_euler(h.toy_jax, None, x, num_steps=4, stochastic_sampling=True)
  with pytest.raises(ValueError, match="one sigma schedule"):
    flow_euler(h.toy_jax, None, x, num_steps=4, use_karras_sigmas=True, use_beta_sigmas=True)
  with pytest.raises(ValueError, match="time_shift_type"):
    flow_heun(h.toy_jax, None, x, num_steps=4, use_dynamic_shifting=True, mu=0.5, time_shift_type="cosine")
  with pytest.raises(ValueError, match="final_sigmas_type"):
    dpm_solver(h.toy_jax, None, x, num_steps=4, use_flow_sigmas=True, final_sigmas_type="sigma_min")
  with pytest.raises(ValueError, match="sigma schedule"):
    unipc(h.toy_jax, None, x, num_steps=4, use_flow_sigmas=True, use_karras_sigmas=True)
  with pytest.raises(ValueError, match="prediction"):
    flow_euler(h.toy_jax, None, x, num_steps=4, prediction="score")
