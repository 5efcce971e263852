"""``python -m sample.evaluate --workdir DIR``: score a digits ``train.ldm`` run; prints JSON.

The same command scores a ``train.lcm`` workdir (:func:`train.lcm.evaluate`: accuracy and
distance of the distilled student at ``--num_steps``, default 4) and a ``train.controlnet`` workdir
(:func:`train.controlnet.evaluate`: how often samples follow the control edges, with and without
the ControlNet; ``--grid out.png`` writes a side-by-side grid); the kind is read from the run's
config.

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
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

__all__ = ["downscale_to_8x8", "frechet_distance", "digit_classifier", "generate_batched", "evaluate", "workdir_kind", "main"]


def downscale_to_8x8(images: np.ndarray) -> np.ndarray:
  """Images [N, H, W, C] in [-1, 1] (H, W multiples of 8) -> [N, 64] in the digits' 0..16 range."""
  images = np.asarray(images, np.float64)
  n, h, w, _ = images.shape
  if h % 8 or w % 8:
    raise ValueError(f"image size {h}x{w} is not a multiple of 8")
  gray = images.mean(axis=-1)  # [N, H, W]
  small = gray.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4))  # [N, 8, 8]
  return ((small + 1.0) * 8.0).reshape(n, 64)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)) between Gaussians fitted to rows of a, b."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  mu_a, mu_b = a.mean(0), b.mean(0)
  c_a, c_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  eps = 1e-6 * np.eye(a.shape[1])  # constant pixels (the digits' borders) make C singular
  covmean = np.real(linalg.sqrtm((c_a + eps) @ (c_b + eps)))
  return float(np.sum(np.square(mu_a - mu_b)) + np.trace(c_a + c_b - 2.0 * covmean))


def digit_classifier(seed: int = 0):
  """(classifier fitted on all real digits, held-out accuracy of one fitted on 80%, round-trip accuracy)."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  from sklearn.svm import SVC
  from jdiff.data import digits as digits_data

  d = load_digits()
  x_tr, x_te, y_tr, y_te = train_test_split(d.data, d.target, test_size=0.2, random_state=seed,
                                            stratify=d.target)
  holdout = float(SVC(gamma=0.001, C=10.0).fit(x_tr, y_tr).score(x_te, y_te))
  clf = SVC(gamma=0.001, C=10.0).fit(d.data, d.target)
  big = digits_data.upscale(d.images, 32).astype(np.float64) / 127.5 - 1.0  # [N, 32, 32, 1]
  roundtrip = float(clf.score(downscale_to_8x8(big), d.target))
  return clf, holdout, roundtrip


def generate_batched(gen: Callable[..., Any], *inputs: np.ndarray, key: jax.Array,
                     batch: int = 100) -> tuple[np.ndarray, float]:
  """Runs ``gen(*input_rows, key) -> images`` over the rows of ``inputs`` in fixed-size batches.

  The last batch is padded with copies of the first row (one compiled shape), the first call
  compiles outside the timing, and batch ``i`` uses ``fold_in(key, i)``.

  Returns:
    ``(images [N, ...] as numpy, seconds spent generating, compile excluded)``.
  """
  n = inputs[0].shape[0]
  images, seconds = [], 0.0
  for i in range(0, n, batch):
    rows = [x[i:i + batch] for x in inputs]
    pad = batch - rows[0].shape[0]
    if pad:
      rows = [np.concatenate([r, np.repeat(r[:1], pad, axis=0)]) for r in rows]
    rows = [jnp.asarray(r) for r in rows]
    if i == 0:  # compile outside the timing
      jax.block_until_ready(gen(*rows, key))
    t0 = time.perf_counter()
    out = np.asarray(gen(*rows, jax.random.fold_in(key, i)))
    seconds += time.perf_counter() - t0
    images.append(out[:batch - pad] if pad else out)
  return np.concatenate(images), seconds


def evaluate(workdir: str, *, per_digit: int = 20, guidance_scale: float | None = None,
             num_steps: int | None = None, sampler: str | None = None, seed: int = 0,
             batch: int = 100) -> dict:
  """Generates ``per_digit`` CFG samples of each digit from the run's EMA UNet and scores them."""
  from sklearn.datasets import load_digits
  from train import ldm as ldm_train

  t0 = time.perf_counter()
  config, ldm, params = ldm_train.load_from_workdir(workdir)
  s = config.sample
  scale = float(s.guidance_scale if guidance_scale is None else guidance_scale)
  steps = int(s.num_steps if num_steps is None else num_steps)
  method = s.sampler if sampler is None else sampler
  prompts, labels = ldm_train.digit_prompts(per_digit)
  tokens = np.stack([ldm.tokenize(p) for p in prompts])
  gen = jax.jit(lambda p, tok, k: ldm.generate(p, tok, k, sampler=method, num_steps=steps,
                                               guidance_scale=scale))
  images, seconds = generate_batched(lambda tok, k: gen(params, tok, k), tokens,
                                     key=jax.random.key(seed), batch=batch)
  feats = downscale_to_8x8(images)
  clf, holdout, roundtrip = digit_classifier(seed)
  pred = clf.predict(feats)
  real = load_digits().data
  rng = np.random.default_rng(seed)
  perm = rng.permutation(len(real))
  half = len(real) // 2
  per_class = [float(np.mean(pred[labels == k] == k)) for k in range(10)]
  return {
      "workdir": workdir,
      "accuracy": float(np.mean(pred == labels)),
      "per_digit_accuracy": per_class,
      "frechet_distance": frechet_distance(real, feats),
      "frechet_distance_real_halves": frechet_distance(real[perm[:half]], real[perm[half:]]),
      "feature_space": "8x8 pixels (64-d, 0..16)",
      "num_samples": int(len(labels)),
      "guidance_scale": scale,
      "sampler": method,
      "num_steps": steps,
      "seconds_per_image": seconds / len(labels),
      "classifier": "sklearn SVC(gamma=0.001, C=10) on real 8x8 digits",
      "classifier_holdout_accuracy": holdout,
      "classifier_roundtrip_accuracy": roundtrip,
      "seconds": time.perf_counter() - t0,
  }


def workdir_kind(workdir: str) -> str:
  """"ldm", "lcm" or "controlnet": which training CLI wrote ``workdir`` (from its config.json)."""
  from train import loop
  config = loop.read_config(workdir)
  for kind in ("lcm", "controlnet"):
    if kind in config:
      return kind
  return "ldm"


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m sample.evaluate", description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a train.ldm workdir")
  p.add_argument("--per_digit", type=int, default=20, help="samples per prompted digit")
  p.add_argument("--guidance_scale", type=float, default=None, help="default: the run's config")
  p.add_argument("--num_steps", type=int, default=None, help="sampler steps (default: the run's config)")
  p.add_argument("--sampler", default=None, help="sampler name (default: the run's config)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--grid", default=None, help="train.controlnet runs: write the side-by-side grid PNG here")
  args = p.parse_args(argv)
  try:
    kind = workdir_kind(args.workdir)
    if kind != "controlnet" and args.grid:
      raise ValueError("--grid is only for train.controlnet workdirs")
    if kind != "ldm" and args.sampler:
      raise ValueError(f"--sampler is fixed for a train.{kind} workdir")
    if kind == "lcm":
      from train import lcm
      result = lcm.evaluate(args.workdir, num_steps=args.num_steps or 4, per_digit=args.per_digit,
                            guidance_scale=args.guidance_scale, seed=args.seed)
    elif kind == "controlnet":
      from train import controlnet
      result = controlnet.evaluate(args.workdir, per_digit=args.per_digit, guidance_scale=args.guidance_scale,
                                   num_steps=args.num_steps, seed=args.seed, grid=args.grid)
    else:
      result = evaluate(args.workdir, per_digit=args.per_digit, guidance_scale=args.guidance_scale,
                        num_steps=args.num_steps, sampler=args.sampler, seed=args.seed)
  except (FileNotFoundError, ValueError, KeyError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  print(json.dumps(result, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
