"""The sampler benchmark runs end to end in quick mode: reference ODE solve, jdiff and diffusers
samplers, table/JSON/plot; jdiff matches its diffusers twins and the jdiff configuration beats
diffusers' best 10-step configuration on both mixtures."""

from __future__ import annotations

import json
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


def test_quick_bench(tmp_path):
  res = bench.main(["--quick", "--out", str(tmp_path)])
  data = json.loads((tmp_path / "samplers.json").read_text())
  assert set(data["results"]) == {"sharp", "second"}
  for prob, r in res["results"].items():
    for name, v in r.items():
      if v["diffusers"]:
        # the same sampler on the same problem: jdiff is at least as accurate (float32 noise aside)
        assert v["jdiff"][10] <= v["diffusers"][10] * 1.01 + 1e-6, (prob, name)
    assert res["summary"][prob]["improvement"] >= 2.0, (prob, res["summary"][prob])
  if bench.plot.__module__ and os.path.exists(tmp_path / "samplers.png"):
    assert (tmp_path / "samplers.png").stat().st_size > 1000
