"""jdiff.evaluation's pieces: the Frechet distance against its closed form for diagonal Gaussians,
the 8x8 reduction against a direct loop, and batched generation (padding, keys, timing)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jdiff import evaluation as ev


def test_frechet_distance_of_diagonal_gaussians():
  # For N(m1, diag(a)) and N(m2, diag(b)): FD = |m1 - m2|^2 + sum (sqrt(a) - sqrt(b))^2.
  rng = np.random.default_rng(0)
  d, n = 4, 400_000
  m1, m2 = rng.normal(size=d), rng.normal(size=d)
  a, b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
  x = m1 + np.sqrt(a) * rng.standard_normal((n, d))
  y = m2 + np.sqrt(b) * rng.standard_normal((n, d))
  # Closed form on the samples' own moments (what the estimator computes, up to the 1e-6 ridge).
  mx, my = x.mean(0), y.mean(0)
  cx, cy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  from scipy.linalg import sqrtm
  want = np.sum((mx - my) ** 2) + np.trace(cx + cy - 2 * np.real(sqrtm(cx @ cy)))
  got = ev.frechet_distance(x, y)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got, np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rtol=0.02)
  assert abs(ev.frechet_distance(x[: n // 2], x[n // 2:])) < 1e-3


def test_downscale_to_8x8_is_area_average_in_digit_units():
  rng = np.random.default_rng(1)
  img = rng.uniform(-1, 1, (3, 32, 32, 2))
  got = ev.downscale_to_8x8(img)
  want = np.empty((3, 64))
  for i in range(3):
    for r in range(8):
      for c in range(8):
        want[i, r * 8 + c] = (img[i, 4 * r:4 * r + 4, 4 * c:4 * c + 4].mean() + 1.0) * 8.0
  np.testing.assert_allclose(got, want, rtol=1e-12)
  with pytest.raises(ValueError, match="multiple of 8"):
    ev.downscale_to_8x8(np.zeros((1, 12, 12, 1)))


def test_generate_batched_pads_and_folds_keys():
  calls = []

  def gen(rows, scale, key):
    calls.append(rows.shape[0])
    noise = jax.random.normal(key, (rows.shape[0],))
    return rows * scale[:, None] + noise[:, None]  # [B, 2]

  rows = np.arange(10, dtype=np.float32).reshape(5, 2)
  scale = np.arange(5, dtype=np.float32) + 1
  key = jax.random.key(3)
  out, seconds = ev.generate_batched(gen, rows, scale, key=key, batch=2)
  assert out.shape == (5, 2) and seconds >= 0
  assert calls == [2, 2, 2, 2]  # one compile-warmup call, then three batches of the same shape
  for i in range(0, 5, 2):
    k = jax.random.fold_in(key, i)
    b = rows[i:i + 2]
    noise = np.asarray(jax.random.normal(k, (2,)))[:b.shape[0]]
    np.testing.assert_allclose(out[i:i + 2], b * scale[i:i + 2, None] + noise[:, None], rtol=1e-6)
