"""Control images: Canny edges against OpenCV's cv2.Canny, resizing against diffusers' VaeImageProcessor."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from jdiff import control_images
from jdiff.control_images import canny, load_control_image, prepare


def _test_images() -> list[np.ndarray]:
  """Handwritten digits (sklearn), upscaled, plus blurred random colour images of odd sizes."""
  cv2 = pytest.importorskip("cv2")
  from sklearn.datasets import load_digits
  digits = load_digits().images[:12]
  out = [cv2.resize(np.clip(d * 16, 0, 255).astype(np.uint8), (64, 64), interpolation=cv2.INTER_CUBIC)
         for d in digits]
  rng = np.random.default_rng(0)
  for shape in [(40, 53, 3), (31, 17, 3), (48, 48)]:
    out.append(cv2.GaussianBlur(rng.integers(0, 256, shape).astype(np.uint8), (5, 5), 1.5))
  return out


@pytest.mark.parametrize("low,high,l2", [(50, 100, False), (100, 200, False), (150, 60, False),
                                         (20, 60, True), (0.5, 30.7, False)])
def test_canny_matches_opencv(low, high, l2):
  cv2 = pytest.importorskip("cv2")
  agree = total = 0
  for img in _test_images():
    want = cv2.Canny(img, low, high, L2gradient=l2)
    got = canny(img, low, high, l2_gradient=l2, keep_channels=False)
    assert got.shape == want.shape and got.dtype == np.uint8
    agree += int((got == want).sum())
    total += want.size
    np.testing.assert_array_equal(got, want)
  assert agree == total


def test_canny_float_input_and_channels():
  cv2 = pytest.importorskip("cv2")
  img = _test_images()[13]  # colour
  want = cv2.Canny(img, 40, 120)
  got = canny(img.astype(np.float32) / 255.0, 40, 120)  # floats in [0, 1] round back to the same uint8
  assert got.shape == img.shape[:2] + (3,) and got.dtype == np.float32
  np.testing.assert_array_equal(got[..., 0] * 255, want)
  np.testing.assert_array_equal(got[..., 0], got[..., 2])
  with pytest.raises(ValueError, match="shape"):
    canny(np.zeros((2, 3, 4, 5)), 1, 2)
  with pytest.raises(ValueError, match="dtype"):
    canny(np.zeros((4, 4), np.int32), 1, 2)


def _processor():
  diffusers = pytest.importorskip("diffusers")
  pytest.importorskip("torch")
  return diffusers.image_processor.VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)


def test_prepare_matches_diffusers_control_image_processor(tmp_path):
  proc = _processor()
  rng = np.random.default_rng(1)
  pil = Image.fromarray(rng.integers(0, 256, (45, 70, 3)).astype(np.uint8))
  want = proc.preprocess(pil, height=32, width=48).numpy()[0].transpose(1, 2, 0)
  np.testing.assert_allclose(prepare(pil, 32, 48), want, atol=1e-6)  # Lanczos via PIL on both sides
  pil.save(tmp_path / "c.png")
  np.testing.assert_allclose(load_control_image(tmp_path / "c.png", (32, 48)), want, atol=1e-6)
  grey = Image.fromarray(rng.integers(0, 256, (20, 20)).astype(np.uint8))
  want = proc.preprocess(grey, height=16, width=24).numpy()[0].transpose(1, 2, 0)
  np.testing.assert_allclose(prepare(grey, 16, 24), want, atol=1e-6)  # do_convert_rgb
  arr = rng.uniform(0, 1, (1, 20, 28, 3)).astype(np.float32)
  want = proc.preprocess(arr, height=32, width=40).numpy()[0].transpose(1, 2, 0)
  np.testing.assert_allclose(prepare(arr[0], 32, 40), want, atol=1e-6)  # arrays: nearest neighbour


def test_load_control_image_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.png"):
    load_control_image(tmp_path / "nope.png")
  (tmp_path / "bad.png").write_bytes(b"definitely not an image")
  with pytest.raises(ValueError, match="bad.png.*not a readable image"):
    load_control_image(tmp_path / "bad.png")
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "ok.png")
  with pytest.raises(ValueError, match="size must be positive"):
    load_control_image(tmp_path / "ok.png", (0, 4))
  assert load_control_image(tmp_path / "ok.png").shape == (4, 4, 3)
  with pytest.raises(ValueError, match="in \\[0, 1\\]"):
    prepare(np.full((4, 4, 3), 2.0, np.float32), 4, 4)
  with pytest.raises(ValueError, match="shape"):
    prepare(np.zeros((4, 4, 2), np.float32), 4, 4)
  assert control_images.to_uint8(np.array([0.0, 0.5, 1.0])).tolist() == [0, 128, 255]
