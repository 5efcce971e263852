"""``python -m sample.evaluate --workdir DIR``: score a digits model; prints JSON.

The workdir may be a ``train.ldm`` run, a ``train.lora`` or ``train.lcm`` run (a distilled student is
scored at ``--num_steps``, default 4), or a ``train.controlnet`` run (how often samples follow the
control edges, with and without the ControlNet; ``--grid out.png`` writes a side-by-side grid); the
kind is read from the run's config. The model is loaded with
:meth:`jdiff.pipelines.StableDiffusion.from_workdir` and scored by :mod:`jdiff.evaluation`:

* ``accuracy``: an independent classifier (scikit-learn SVC, RBF kernel) trained on scikit-learn's
  real 8x8 digits labels CFG samples of every prompted digit ("a handwritten digit seven", ...);
  generated 32x32 images are reduced to 8x8 by 4x4 area averaging and mapped to the digits' 0..16
  range. ``classifier_holdout_accuracy`` is the classifier's accuracy on held-out real digits and
  ``classifier_roundtrip_accuracy`` on real digits sent through the 8 -> 32 -> 8 resizing.
* ``frechet_distance``: the Frechet distance between Gaussians fitted to real and generated images
  in a fixed feature space: the 64 pixel values of the 8x8 image (0..16);
  ``frechet_distance_real_halves`` is the same distance between two random halves of the real
  digits, for scale.

Example:
  $ python -m sample.evaluate --workdir workdir/ldm_digits --per_digit 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

__all__ = ["evaluate", "evaluate_controlnet", "workdir_kind", "main"]

GRID_ROWS = ("control", "conflicting/without", "conflicting/with", "empty/without", "empty/with")


def workdir_kind(workdir: str) -> str:
  """"ldm", "lora", "lcm", "ct" or "controlnet": which training CLI wrote ``workdir`` (from its config.json)."""
  from jdiff.ldm import read_config

  config = read_config(workdir)
  for kind in ("ct", "lcm", "controlnet", "lora"):
    if kind in config:
      return kind
  return "ldm"


def evaluate(workdir: str, *, per_digit: int = 20, guidance_scale: float | None = None,
             num_steps: int | None = None, sampler: str | None = None, seed: int = 0,
             batch: int = 100, guidance_rescale: float = 0.0) -> dict[str, Any]:
  """Generates ``per_digit`` samples of each digit from the run's EMA model and scores them
  (:func:`jdiff.evaluation.evaluate_digits`); defaults from the run's sample section."""
  from jdiff.evaluation import evaluate_digits
  from jdiff.pipelines import StableDiffusion

  t0 = time.perf_counter()
  pipe = StableDiffusion.from_workdir(workdir)
  result = {"workdir": workdir, **evaluate_digits(pipe, per_digit=per_digit, guidance_scale=guidance_scale,
                                                  num_steps=num_steps, sampler=sampler, seed=seed, batch=batch,
                                                  guidance_rescale=guidance_rescale)}
  result["seconds"] = time.perf_counter() - t0
  return result


def evaluate_controlnet(workdir: str, *, per_digit: int = 10, guidance_scale: float | None = None,
                        num_steps: int | None = None, seed: int = 0, batch: int = 100, tolerance: int = 1,
                        grid: str | None = None, guidance_rescale: float = 0.0) -> dict[str, Any]:
  """:func:`jdiff.evaluation.evaluate_controlnet` of a ``train.controlnet`` run (its Canny thresholds);
  writes a grid (rows: control, then without / with ControlNet for the conflicting and the empty
  prompt) when ``grid`` is a path."""
  from jdiff.evaluation import evaluate_controlnet as score
  from jdiff.ldm import read_config
  from jdiff.pipelines import StableDiffusion

  t0 = time.perf_counter()
  c = read_config(workdir).controlnet
  pipe = StableDiffusion.from_workdir(workdir)
  result, shown = score(pipe, canny_low=c.canny_low, canny_high=c.canny_high, per_digit=per_digit,
                        guidance_scale=guidance_scale, num_steps=num_steps, seed=seed, batch=batch,
                        tolerance=tolerance, guidance_rescale=guidance_rescale)
  result = {"workdir": workdir, **result}
  if grid:
    from sample import _cli

    like = shown["empty/with"]
    rows = np.concatenate([np.broadcast_to(shown[k], like.shape) for k in GRID_ROWS])  # [-1, 1]
    tiles = _cli.make_grid(rows * 0.5 + 0.5, cols=10, pad=1)
    result["grid"] = str(_cli.save_png(grid, np.repeat(np.repeat(tiles, 3, axis=0), 3, axis=1)))
    result["grid_rows"] = ["control edges", "conflicting prompt, without ControlNet",
                           "conflicting prompt, with ControlNet", "empty prompt, without", "empty prompt, with"]
    result["grid_conflicting_prompts"] = result.pop("conflicting_prompts")
  result["seconds"] = time.perf_counter() - t0
  return result


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m sample.evaluate", description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a train.ldm / train.lora / train.lcm / train.controlnet workdir")
  p.add_argument("--per_digit", type=int, default=20, help="samples per prompted digit")
  p.add_argument("--guidance_scale", type=float, default=None, help="default: the run's config")
  p.add_argument("--guidance_rescale", "--guidance-rescale", type=float, default=0.0,
                 help="blend of the guided output rescaled to the conditional one's standard deviation (0: off)")
  p.add_argument("--num_steps", type=int, default=None, help="sampler steps (default: the run's config)")
  p.add_argument("--sampler", default=None, help="sampler name (default: the run's config)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--grid", default=None, help="train.controlnet runs: write the side-by-side grid PNG here")
  args = p.parse_args(argv)
  try:
    kind = workdir_kind(args.workdir)
    if kind != "controlnet" and args.grid:
      raise ValueError("--grid is only for train.controlnet workdirs")
    if kind in ("lcm", "ct", "controlnet") and args.sampler:
      raise ValueError(f"--sampler is fixed for a train.{kind} workdir")
    if kind == "controlnet":
      result = evaluate_controlnet(args.workdir, per_digit=args.per_digit, guidance_scale=args.guidance_scale,
                                   num_steps=args.num_steps, seed=args.seed, grid=args.grid,
                                   guidance_rescale=args.guidance_rescale)
    else:
      steps = (args.num_steps or 4) if kind in ("lcm", "ct") else args.num_steps
      result = evaluate(args.workdir, per_digit=args.per_digit, guidance_scale=args.guidance_scale,
                        num_steps=steps, sampler=args.sampler, seed=args.seed,
                        guidance_rescale=args.guidance_rescale)
  except (FileNotFoundError, ValueError, KeyError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  print(json.dumps(result, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
