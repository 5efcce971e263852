"""Parity of jdiff's UniPC with diffusers' UniPCMultistepScheduler over whole trajectories
(toy model, float32, <= 1e-5) for every solver type, order, parameterisation and sigma schedule."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from tests.parity import test_sampler_common as h

diffusers = pytest.importorskip("diffusers")

from jdiff.samplers import unipc  # noqa: E402

TOL = 1e-5


def _cases():
  out = []
  core = list(itertools.product(("bh1", "bh2"), (1, 2, 3), (True, False)))
  for i, (st, order, px0) in enumerate(core):
    for j, sig in enumerate((None, "karras", "exponential")):
      k = 3 * i + j
      final = "sigma_min" if not px0 or k % 4 == 1 else "zero"
      out.append(dict(solver_type=st, order=order, predict_x0=px0, sigma=sig, final=final,
                      spacing=("linspace", "leading", "trailing")[k % 3],
                      prediction=("epsilon", "v_prediction", "sample")[(k // 3) % 3],
                      n=(6, 10, 13, 17)[k % 4], lower_order_final=final == "zero" or k % 2 == 0,
                      disable=(2,) if k % 5 == 0 else (), schedule=("scaled_linear", "linear")[k % 2],
                      thresholding=False))
  for px0 in (True,):
    out.append(dict(solver_type="bh2", order=2, predict_x0=px0, sigma=None, final="zero", spacing="linspace",
                    prediction="epsilon", n=8, lower_order_final=True, disable=(), schedule="scaled_linear",
                    thresholding=True))
  return out


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_unipc_matches_diffusers(case):
  sched, cfg = h.schedule_pair(case["schedule"])
  n = case["n"]
  if (case["sigma"] is not None and case["final"] == "sigma_min" and not case["lower_order_final"]
      and case["order"] > 1):
    # a zero-length last step of order > 1: NaN in diffusers, a ValueError in jdiff
    with pytest.raises(ValueError, match="zero-length"):
      unipc(h.toy_jax, sched, jnp.zeros((1, 4)), num_steps=n, order=case["order"], sigma_schedule=case["sigma"],
            final_sigmas_type="sigma_min", lower_order_final=False, predict_x0=case["predict_x0"])
    return
  sch = diffusers.UniPCMultistepScheduler(
      **cfg, solver_order=case["order"], solver_type=case["solver_type"], predict_x0=case["predict_x0"],
      prediction_type=case["prediction"], use_karras_sigmas=case["sigma"] == "karras",
      use_exponential_sigmas=case["sigma"] == "exponential", final_sigmas_type=case["final"],
      timestep_spacing=case["spacing"], steps_offset=1 if case["spacing"] == "leading" else 0,
      lower_order_final=case["lower_order_final"], disable_corrector=list(case["disable"]),
      thresholding=case["thresholding"], sample_max_value=1.5)
  xT = h.x_T(seed=n, spatial=(2, 2) if case["thresholding"] else ())
  ref, ts = h.run_diffusers(sch, xT, n)
  if case["solver_type"] == "bh1" and case["final"] == "zero":
    # diffusers' last bh1 step to sigma = 0 multiplies B(h) = -inf by a zero residual (NaN);
    # jdiff's first-order last step omits the empty residual and returns the data prediction.
    assert np.all(np.isnan(ref[-1]))
  else:
    assert np.all(np.isfinite(ref))
  log = []
  _, traj = unipc(h.recording_model(h.toy_jax, log), sched, jnp.asarray(xT), num_steps=n, order=case["order"],
                  solver_type=case["solver_type"], predict_x0=case["predict_x0"], prediction=case["prediction"],
                  sigma_schedule=case["sigma"], final_sigmas_type=case["final"],
                  timestep_spacing=case["spacing"], steps_offset=1 if case["spacing"] == "leading" else 0,
                  lower_order_final=case["lower_order_final"], disable_corrector=case["disable"],
                  thresholding=case["thresholding"], sample_max_value=1.5, return_trajectory=True)
  np.testing.assert_array_equal(np.stack(log)[:, 0], ts)
  traj = np.asarray(traj)
  assert np.all(np.isfinite(traj))
  if case["solver_type"] == "bh1" and case["final"] == "zero":
    traj, ref = traj[:-1], ref[:-1]
  assert h.max_rel_diff(traj, ref) <= TOL


def test_unipc_rejects_bad_options():
  sched, _ = h.schedule_pair()
  x = jnp.zeros((1, 4))
  with pytest.raises(ValueError, match="solver_type"):
    unipc(h.toy_jax, sched, x, num_steps=4, solver_type="bh3")
  with pytest.raises(ValueError, match="predict_x0"):
    unipc(h.toy_jax, sched, x, num_steps=4, predict_x0=False)
  with pytest.raises(ValueError, match="lower_order_final"):
    unipc(h.toy_jax, sched, x, num_steps=6, order=2, lower_order_final=False)
