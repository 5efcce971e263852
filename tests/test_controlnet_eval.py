"""ControlNet evaluation: the edge-agreement metric (jdiff.evaluation) against a brute-force distance computation,
and the whole evaluation (sample.evaluate CLI dispatch, grid) on a tiny trained run."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jdiff import evaluation
from train import controlnet as cn_train


def _brute_force(edges: np.ndarray, ref: np.ndarray, tol: int) -> dict[str, np.ndarray]:
  out = {k: [] for k in ("precision", "recall", "f1", "iou")}
  for e, r in zip(edges, ref):
    pe, pr = np.argwhere(e), np.argwhere(r)

    def near(points, others):
      if len(points) == 0:
        return 0.0
      if len(others) == 0:
        return 0.0
      d = np.abs(points[:, None, :] - others[None, :, :]).max(axis=-1).min(axis=1)  # Chebyshev distance
      return float(np.mean(d <= tol))

    p, rc = near(pe, pr), near(pr, pe)
    out["precision"].append(p)
    out["recall"].append(rc)
    out["f1"].append(2 * p * rc / (p + rc) if p + rc else 0.0)
    union = np.sum(e | r)
    out["iou"].append(np.sum(e & r) / union if union else 0.0)
  return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("tol", [0, 1, 2])
def test_edge_agreement_matches_brute_force(tol):
  rng = np.random.default_rng(tol)
  edges = rng.random((6, 12, 10)) < 0.12
  ref = rng.random((6, 12, 10)) < 0.08
  edges[0] = False  # an empty sample
  ref[1] = False    # an empty reference
  got = evaluation.edge_agreement(edges, ref, tolerance=tol)
  want = _brute_force(edges, ref, tol)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=0, err_msg=k)


def test_edge_agreement_closed_forms():
  line = np.zeros((1, 16, 16), bool)
  line[0, 8, 3:13] = True
  shifted = np.roll(line, 1, axis=1)  # one pixel down
  one = evaluation.edge_agreement(shifted, line, tolerance=1)
  zero = evaluation.edge_agreement(shifted, line, tolerance=0)
  assert float(one["f1"][0]) == 1.0 and float(one["iou"][0]) == 0.0
  assert float(zero["f1"][0]) == 0.0
  same = evaluation.edge_agreement(line, line, tolerance=0)
  assert float(same["f1"][0]) == 1.0 and float(same["iou"][0]) == 1.0
  half = line.copy()
  half[0, 8, 8:13] = False  # 5 of the 10 reference pixels: precision 1, recall 1/2, F1 2/3
  got = evaluation.edge_agreement(half, line, tolerance=0)
  np.testing.assert_allclose([got["precision"][0], got["recall"][0], got["f1"][0], got["iou"][0]],
                             [1.0, 0.5, 2.0 / 3.0, 0.5], rtol=1e-12)
  with pytest.raises(ValueError, match=r"\[N, H, W\]"):
    evaluation.edge_agreement(line[0], line[0])


@pytest.mark.slow
def test_evaluate_a_tiny_run_through_the_cli(tmp_path, capsys):
  from sample import evaluate as ev
  from tests.test_train_controlnet import tiny_config
  from tests.test_train_lora import save_random_base
  base_dir = save_random_base(str(tmp_path / "base"))
  workdir = str(tmp_path / "cn")
  config = tiny_config(base_dir)
  config.train.steps = 1
  cn_train.train_controlnet(config, workdir, stream=open(os.devnull, "w"))
  assert ev.workdir_kind(workdir) == "controlnet"
  grid = str(tmp_path / "grid.png")
  assert ev.main(["--workdir", workdir, "--per_digit", "1", "--num_steps", "2", "--grid", grid,
                  "--guidance_rescale", "0.5"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["num_controls"] == 10 and result["guidance_rescale"] == 0.5
  assert set(result["conditions"]) == {"matching", "conflicting", "empty"}
  for name, runs in result["conditions"].items():
    assert set(runs) == {"with", "without"}
    for row in runs.values():
      for k in ("follows_control", "edge_f1", "edge_iou"):
        assert 0.0 <= row[k] <= 1.0, (name, k, row[k])
      assert ("follows_prompt" in row) == (name == "conflicting")
  from PIL import Image
  size = 32 * 10 + 9  # 10 columns of 32 px with 1-px gaps
  assert Image.open(grid).size == (size * 3, (32 * 5 + 4) * 3)
  assert ev.main(["--workdir", workdir, "--sampler", "ddim"]) == 2
  assert "--sampler is fixed" in capsys.readouterr().err
