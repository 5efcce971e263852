"""Scoring generated digits: an independent classifier, a Frechet distance, edge agreement for
ControlNets, and batched generation from a latent diffusion bundle.

* :func:`digit_classifier`: scikit-learn's SVC (RBF kernel) fitted on scikit-learn's real 8x8 digits;
  generated images are reduced to 8x8 by area averaging (:func:`downscale_to_8x8`).
* :func:`frechet_distance`: between Gaussians fitted to two sets of feature rows.
* :func:`edge_agreement`: precision / recall / F1 within a pixel tolerance and exact IoU of edge maps.
* :func:`evaluate_digits` / :func:`evaluate_controlnet`: the whole evaluation of a bundle
  (:class:`jdiff.pipelines.StableDiffusion`, e.g. ``from_workdir``) as a JSON-ready dict.

Example:
  >>> pipe = StableDiffusion.from_workdir("workdir/ldm_digits")  # doctest: +SKIP
  >>> evaluate_digits(pipe, per_digit=20)["accuracy"]  # doctest: +SKIP
  0.93
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["downscale_to_8x8", "frechet_distance", "digit_classifier", "generate_batched", "digit_prompts",
           "edges_of", "edge_agreement", "sampling_fn", "evaluate_digits", "evaluate_controlnet"]


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
  from scipy import linalg

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


def digit_prompts(per_prompt: int) -> tuple[list[str], np.ndarray]:
  """Prompts "a handwritten digit zero" ... "nine", each repeated ``per_prompt`` times (digit-major
  columns: one row holds 0..9), and their labels."""
  from jdiff.data import digits

  labels = np.tile(np.arange(10), per_prompt)
  return [digits.caption_for(int(d)) for d in labels], labels


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


def sampling_fn(pipe, *, sampler: str | None = None, num_steps: int | None = None,
                guidance_scale: float | None = None, guidance_rescale: float = 0.0,
                with_control: bool = False) -> Callable[..., jax.Array]:
  """A jitted ``(unet_params, ids [B, L], (control [B, H, W, 3], control_scale,) key) -> images`` in
  [-1, 1] of ``pipe`` (:meth:`~jdiff.pipelines.StableDiffusion.sample`): x_T from the first half of
  ``split(key)``, the sampler's key from the second; with ``with_control`` the bundle's first
  ControlNet is applied with the given scale; ``guidance_rescale`` as in ``sample``."""
  from jdiff.pipelines import Control

  def run(unet_params, ids, *rest):
    if with_control:
      control, scale, key = rest
      controls = [Control(pipe.controlnets[0], pipe.controlnet_params[0], control, scale)]
    else:
      (key,), controls = rest, ()
    noise_key, sample_key = jax.random.split(key)
    noise = jax.random.normal(noise_key, (ids.shape[0],) + tuple(pipe.latent_shape), jnp.float32)
    return pipe.sample(unet_params, ids, noise, key=sample_key, sampler=sampler, num_steps=num_steps,
                       guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, controls=controls)

  return jax.jit(run)


def evaluate_digits(pipe, *, per_digit: int = 20, guidance_scale: float | None = None,
                    num_steps: int | None = None, sampler: str | None = None, seed: int = 0,
                    batch: int = 100, guidance_rescale: float = 0.0) -> dict[str, Any]:
  """Generates ``per_digit`` samples of each digit prompt from ``pipe`` and scores them.

  * ``accuracy``: the independent classifier (:func:`digit_classifier`) names the prompted digit;
    ``classifier_holdout_accuracy`` is its accuracy on held-out real digits and
    ``classifier_roundtrip_accuracy`` on real digits sent through the 8 -> 32 -> 8 resizing.
  * ``frechet_distance``: real vs generated 8x8 pixel features; ``frechet_distance_real_halves`` the
    same between two random halves of the real digits, for scale.

  Sampler, steps and guidance default to ``pipe.defaults`` (a trained run's sample section);
  ``guidance_rescale`` (0: off) blends the guided output toward the conditional one's scale.
  """
  from sklearn.datasets import load_digits

  t0 = time.perf_counter()
  scale = float(pipe.defaults.get("guidance_scale", 3.0) if guidance_scale is None else guidance_scale)
  steps = int(pipe.defaults.get("num_steps", 25) if num_steps is None else num_steps)
  method = str(pipe.defaults.get("sampler", "ddim") if sampler is None else sampler)
  prompts, labels = digit_prompts(per_digit)
  ids = pipe.tokenize(prompts)
  gen = sampling_fn(pipe, sampler=method, num_steps=steps, guidance_scale=scale, guidance_rescale=guidance_rescale)
  params = pipe.unet_params
  images, seconds = generate_batched(lambda tok, k: gen(params, tok, k), ids, key=jax.random.key(seed), batch=batch)
  feats = downscale_to_8x8(images)
  clf, holdout, roundtrip = digit_classifier(seed)
  pred = clf.predict(feats)
  real = load_digits().data
  rng = np.random.default_rng(seed)
  perm = rng.permutation(len(real))
  half = len(real) // 2
  return {
      "accuracy": float(np.mean(pred == labels)),
      "per_digit_accuracy": [float(np.mean(pred[labels == k] == k)) for k in range(10)],
      "frechet_distance": frechet_distance(real, feats),
      "frechet_distance_real_halves": frechet_distance(real[perm[:half]], real[perm[half:]]),
      "feature_space": "8x8 pixels (64-d, 0..16)",
      "num_samples": int(len(labels)),
      "guidance_scale": scale,
      "guidance_rescale": float(guidance_rescale),
      "sampler": method,
      "num_steps": steps,
      "seconds_per_image": seconds / len(labels),
      "classifier": "sklearn SVC(gamma=0.001, C=10) on real 8x8 digits",
      "classifier_holdout_accuracy": holdout,
      "classifier_roundtrip_accuracy": roundtrip,
      "seconds": time.perf_counter() - t0,
  }


# ----------------------------------------------------------------------------- ControlNet


def edges_of(images: np.ndarray, low: float, high: float) -> np.ndarray:
  """Canny control images [B, H, W, 3] in {0, 1} of images [B, H, W, C] in [-1, 1]."""
  from jdiff import control_images

  pix = np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
  return np.stack([control_images.canny(p, low, high) for p in pix]).astype(np.float32)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
  """Boolean masks [..., H, W] grown by ``radius`` pixels in the max (Chebyshev) norm."""
  out = mask.copy()
  h, w = mask.shape[-2:]
  for dy in range(-radius, radius + 1):
    for dx in range(-radius, radius + 1):
      shifted = np.zeros_like(mask)
      shifted[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
          mask[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
      out |= shifted
  return out


def edge_agreement(edges: np.ndarray, reference: np.ndarray, *, tolerance: int = 1) -> dict[str, np.ndarray]:
  """Per-image agreement of binary edge maps [N, H, W] with reference edge maps [N, H, W].

  ``precision``: the fraction of ``edges`` pixels within ``tolerance`` pixels (max norm) of a
  reference edge; ``recall``: the fraction of reference pixels within ``tolerance`` of an edge;
  ``f1`` their harmonic mean (0 where both are 0); ``iou``: the exact-pixel intersection over union.
  An image with no edges at all scores 0 (an empty map never "agrees").

  Example:
    >>> m = np.zeros((1, 8, 8), bool); m[0, 4, 2:6] = True
    >>> float(edge_agreement(np.roll(m, 1, axis=1), m)["f1"][0])
    1.0
  """
  e, r = np.asarray(edges) > 0, np.asarray(reference) > 0
  if e.shape != r.shape or e.ndim != 3:
    raise ValueError(f"edge maps must both be [N, H, W], got {e.shape} and {r.shape}")
  n_e, n_r = e.sum(axis=(1, 2)), r.sum(axis=(1, 2))
  hit_e = (e & _dilate(r, tolerance)).sum(axis=(1, 2))
  hit_r = (r & _dilate(e, tolerance)).sum(axis=(1, 2))
  precision = np.where(n_e > 0, hit_e / np.maximum(n_e, 1), 0.0)
  recall = np.where(n_r > 0, hit_r / np.maximum(n_r, 1), 0.0)
  f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
  union = (e | r).sum(axis=(1, 2))
  iou = np.where(union > 0, (e & r).sum(axis=(1, 2)) / np.maximum(union, 1), 0.0)
  return {"precision": precision, "recall": recall, "f1": f1, "iou": iou}


def evaluate_controlnet(pipe, *, canny_low: float, canny_high: float, per_digit: int = 10,
                        guidance_scale: float | None = None, num_steps: int | None = None,
                        sampler: str | None = None, seed: int = 0, batch: int = 100,
                        tolerance: int = 1, guidance_rescale: float = 0.0) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Does ``pipe``'s (first) ControlNet make digit samples follow the control edges? With and without it.

  Controls are the Canny edges of ``per_digit`` real scikit-learn digits of each class (upscaled
  to the bundle's size). Every control is sampled under three prompts: the control's own digit
  ("matching"), a different random digit ("conflicting") and the empty prompt ("empty"), each with
  the ControlNet (conditioning scale 1) and without it (scale 0: exactly the frozen base, same
  noise). Scores: ``follows_control`` = the independent digit classifier names the control's
  digit; ``follows_prompt`` = it names the prompted digit; edge F1 / IoU of the samples' Canny
  edges against the control (:func:`edge_agreement`).

  Returns:
    ``(result, shown)``: the JSON-ready ``{"conditions": {name: {"with": {...}, "without": {...}}},
    ...}`` and the first 10 images ``[10, H, W, C]`` in [-1, 1] of ``"control"`` and of every
    ``"<condition>/<with|without>"`` (for a grid).
  """
  from sklearn.datasets import load_digits

  from jdiff.data import digits as digits_data

  if not pipe.controlnets:
    raise ValueError("the model has no ControlNet to evaluate")
  scale = float(pipe.defaults.get("guidance_scale", 3.0) if guidance_scale is None else guidance_scale)
  steps = int(pipe.defaults.get("num_steps", 25) if num_steps is None else num_steps)
  method = str(pipe.defaults.get("sampler", "ddim") if sampler is None else sampler)
  rng = np.random.default_rng(seed)
  d = load_digits()
  picks = np.stack([rng.choice(np.flatnonzero(d.target == k), per_digit, replace=False)
                    for k in range(10)], axis=1).reshape(-1)  # digit-major rows 0..9
  labels = d.target[picks]
  images = digits_data.upscale(d.images[picks], pipe.default_size).astype(np.float32) / 127.5 - 1.0  # [N, S, S, 1]
  control = edges_of(images, canny_low, canny_high)  # [N, S, S, 3]
  other = (labels + rng.integers(1, 10, size=labels.shape)) % 10
  prompts = {"matching": [digits_data.caption_for(int(k)) for k in labels],
             "conflicting": [digits_data.caption_for(int(k)) for k in other],
             "empty": [""] * len(labels)}
  clf, _, _ = digit_classifier(seed)
  gen = sampling_fn(pipe, sampler=method, num_steps=steps, guidance_scale=scale, guidance_rescale=guidance_rescale,
                    with_control=True)
  params = pipe.unet_params
  result: dict[str, Any] = {"num_controls": int(len(labels)), "guidance_scale": scale,
                            "guidance_rescale": float(guidance_rescale), "sampler": method,
                            "num_steps": steps, "edge_tolerance_px": tolerance,
                            "controls": "Canny edges of real scikit-learn digits (the training set)",
                            "conditions": {}}
  shown: dict[str, np.ndarray] = {"control": control[:10, ..., :1] * 2.0 - 1.0}
  key = jax.random.key(seed)
  for name, texts in prompts.items():
    ids = pipe.tokenize(texts)
    result["conditions"][name] = {}
    for which, cond_scale in (("with", 1.0), ("without", 0.0)):
      out, seconds = generate_batched(lambda tok, ctl, k, s=cond_scale: gen(params, tok, ctl, jnp.float32(s), k),
                                      ids, control, key=key, batch=batch)  # same noise both ways
      pred = clf.predict(downscale_to_8x8(out))
      agree = edge_agreement(edges_of(out, canny_low, canny_high)[..., 0], control[..., 0], tolerance=tolerance)
      row = {"follows_control": float(np.mean(pred == labels)),
             "edge_f1": float(np.mean(agree["f1"])), "edge_iou": float(np.mean(agree["iou"])),
             "seconds_per_image": seconds / len(labels)}
      if name == "conflicting":
        row["follows_prompt"] = float(np.mean(pred == other))
      result["conditions"][name][which] = row
      shown[f"{name}/{which}"] = out[:10]
  result["conflicting_prompts"] = [int(k) for k in other[:10]]
  return result, shown
