"""The sampler benchmark runs end to end in quick mode: reference ODE solve, jdiff and diffusers
samplers, the best-against-best race over a sweep of diffusers configurations, table/JSON/plot."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

pytest.importorskip("scipy")
pytest.importorskip("diffusers")

from bench import samplers as bench  # noqa: E402


def test_reference_solver_is_exact_for_a_single_gaussian():
  # one component N(m, s^2): the PF-ODE maps y at sigma to m + (y - m) s / sqrt(s^2 + sigma^2)
  mix = bench.Mixture("g", np.array([1.0]), np.full((1, 3), 0.4), np.array([0.3]))
  y0 = np.array([[1.0, -2.0, 0.5]]) * 5.0
  out = bench.reference(mix, y0, 5.0, sigma_end=1e-9)
  expected = 0.4 + (y0 - 0.4) * 0.3 / np.sqrt(0.09 + 25.0)
  np.testing.assert_allclose(out, expected, rtol=1e-8)
  # the generic Problem path gives the same answer
  from jdiff import schedules
  prob = bench.mixture_problem(mix, schedules.scaled_linear(1000, 0.00085, 0.012))
  np.testing.assert_allclose(bench.reference_problem(prob, y0, 5.0, sigma_end=1e-9), expected, rtol=1e-8)


def test_diffusers_sweep_names_are_unique_and_cover_every_family():
  cfgs = bench.diffusers_sweep()
  names = [bench.config_name(c, o) for c, o in cfgs]
  assert len(set(names)) == len(names)
  families = {c for c, _ in cfgs}
  assert {"DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler",
          "DEISMultistepScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler"} <= families
  assert len(cfgs) > 500


def test_sample_errors_against_a_per_sample_loop():
  rng = np.random.default_rng(3)
  ref = rng.standard_normal((50, 7))
  x = ref + 0.01 * rng.standard_normal((50, 7))
  x[4] = -ref[4]  # one sample at another mode: relative error 2
  x[9] = ref[9] * 1.2  # relative error 0.2
  got = bench.sample_errors(x, ref)
  rel = [math.sqrt(sum((a - b) ** 2 for a, b in zip(x[i], ref[i])) / sum(b * b for b in ref[i])) for i in range(50)]
  total = math.sqrt(sum(sum((a - b) ** 2 for a, b in zip(x[i], ref[i])) for i in range(50))
                    / sum(sum(b * b for b in ref[i]) for i in range(50)))
  assert got["far"] == 2 and math.isclose(got["error"], total, rel_tol=1e-12)
  assert math.isclose(got["median"], sorted(rel)[24] / 2 + sorted(rel)[25] / 2, rel_tol=1e-12)
  x[0, 0] = np.nan
  assert bench.sample_errors(x, ref) == {"error": math.inf, "median": math.inf, "far": 50}


def test_flips_and_the_error_without_them():
  means = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
  rng = np.random.default_rng(5)
  lab = rng.integers(0, 3, 40)
  ref = means[lab] + 0.1 * rng.standard_normal((40, 2))
  x = ref + 0.01 * rng.standard_normal((40, 2))
  x[[3, 17]] = means[(lab[[3, 17]] + 1) % 3]  # two samples end at another component
  x[21] = ref[21] + np.array([1.5, -1.5])  # far (relative error > 0.1) but at its own component
  got = bench.sample_errors(x, ref, means)
  nearest = [min(range(3), key=lambda k: sum((x[i, d] - means[k, d]) ** 2 for d in range(2))) for i in range(40)]
  kept = [i for i in range(40) if nearest[i] == lab[i]]
  assert got["flips"] == 2 and len(kept) == 38
  want = math.sqrt(sum(((x[i] - ref[i]) ** 2).sum() for i in kept) / sum((ref[i] ** 2).sum() for i in kept))
  assert math.isclose(got["kept_error"], want, rel_tol=1e-12)
  assert got["error"] > got["kept_error"] and got["far"] >= 3
  # without means the keys of the plain score
  assert set(bench.sample_errors(x, ref)) == {"error", "median", "far"}


def test_flip_study_rows_converge_with_steps():
  mix = bench.sharp_mixture(8)
  rows = bench.flip_study(mix, steps=(10, 40), orders=(1, 3), batch=64, log=lambda *_: None)
  assert [(r["steps"], r["order"]) for r in rows] == [(10, 1), (10, 3), (40, 1), (40, 3)]
  by = {(r["steps"], r["order"]): r for r in rows}
  for r in rows:
    assert 0 <= r["flips"] <= r["far"] <= 64 and r["kept_error"] <= r["error"] + 1e-15
  # the typical trajectory converges: order 3 beats order 1, and 40 steps beat 10
  assert by[(10, 3)]["median"] < by[(10, 1)]["median"] and by[(40, 3)]["median"] < by[(10, 3)]["median"] / 4
  assert "flips" in bench.format_flips(rows)


@pytest.mark.slow
def test_quick_bench(tmp_path):
  from jdiff import schedules
  sched = schedules.scaled_linear(1000, 0.00085, 0.012)
  res = bench.main(["--quick", "--out", str(tmp_path)])
  data = json.loads((tmp_path / "samplers.json").read_text())
  assert set(data["results"]) == {"sharp", "second"}
  for prob, r in res["results"].items():
    for name, v in r.items():
      if v["diffusers"]:
        # the same sampler on the same problem: jdiff is at least as accurate (float32 noise aside)
        assert v["jdiff"][10] <= v["diffusers"][10] * 1.01 + 1e-6, (prob, name)
  for prob, per in res["best"].items():
    r = per[10]
    # the reported bests are the minima over everything that ran, by name
    assert r["diffusers_best_error"] == min(v["error"] for v in r["diffusers"].values())
    assert r["diffusers"][r["diffusers_best"]]["error"] == r["diffusers_best_error"]
    assert r["jdiff"][r["jdiff_best"]]["error"] == r["jdiff_best_error"]
    assert math.isclose(r["ratio"], r["diffusers_best_error"] / r["jdiff_best_error"])
    assert r["jdiff_best_median"] == r["jdiff"][r["jdiff_best"]]["median"]
    assert 0 <= r["diffusers_best_far"] <= r["batch"] == 8
    # the no-flip comparison: the best pair's errors over the samples neither flips
    fd, fj = r["diffusers_best_flips"], r["jdiff_best_flips"]
    assert 8 - fd - fj <= r["common_samples"] <= 8 - max(fd, fj)
    assert r["diffusers_best_flips"] == r["diffusers"][r["diffusers_best"]]["flips"]
    if fd == 0 and fj == 0:
      assert r["common_samples"] == 8 and math.isclose(r["common_ratio"], r["ratio"])
    assert all(v["calls"] <= 10 for v in r["diffusers"].values())
    # jdiff's twin of diffusers' DPM-Solver 3M (noise prediction, Karras, sigma_min) matches it
    twin = r["diffusers"][bench.config_name("DPMSolverMultistepScheduler", dict(
        algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_order=3, solver_type="midpoint",
        timestep_spacing="linspace", steps_offset=0, use_karras_sigmas=True))]["error"]
    assert r["jdiff"]["dpm3m_eps_karras_sigma_min"]["error"] <= twin * 1.01 + 1e-6, prob
    assert data["summary"][prob]["10"]["diffusers_best"] == r["diffusers_best"]
    # the calibrated grid (fitted on other noises) is an explicit, descending 10-call grid
    cal = r["jdiff"]["jdiff_calshift_unipc3_extrap"]
    sig, ts = np.asarray(cal["sigmas"]), np.asarray(cal["timesteps"])
    assert sig.shape == (11,) and np.all(np.diff(sig) < 0) and sig[-1] == 0.0 and np.isfinite(cal["error"])
    assert ts.shape == (10,) and np.all((ts >= 0) & (ts <= 999))
    # the exact-time Karras grid is the Karras grid, its model called at fractional timesteps
    exact = np.asarray(r["jdiff"]["jdiff_exact_dpm3m_eps_karras_extrap"]["sigmas"])
    from jdiff.samplers import levels
    table = np.sqrt((1 - np.asarray(sched.alphas_cumprod, np.float64)) / np.asarray(sched.alphas_cumprod, np.float64))
    np.testing.assert_allclose(exact[:-1], levels.karras(np.float32(table[0]), np.float32(table[-1]), 10), rtol=1e-6)
  if os.path.exists(tmp_path / "samplers.png"):
    assert (tmp_path / "samplers.png").stat().st_size > 1000
