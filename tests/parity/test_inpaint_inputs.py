"""Image inputs of the editing methods (img2img / inpaint / invert): grayscale, RGBA, uint8 and float
images (:func:`jdiff.pipelines.image_batch`), uint8 masks, and the size multiple the denoiser asks for
(:func:`jdiff.pipelines.latent_multiple`), on the tiny random diffusers pipeline of ``test_pipeline``.

A gray image and its RGB replication (an RGBA image and its RGB part, uint8 pixels and their float
values) are the same array once converted, so the methods' outputs are compared for equality.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

pytest.importorskip("diffusers")

from jdiff.models.configs import UNetConfig  # noqa: E402
from jdiff.models.text_dit import TextDiTConfig  # noqa: E402
from jdiff.pipelines import StableDiffusion, image_batch, latent_multiple  # noqa: E402
from tests.parity.test_pipeline import SIZE, build_tiny_sd_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny_sd_inputs")
  build_tiny_sd_pipeline(root)
  return StableDiffusion.from_diffusers(root)


def _gray_uint8() -> np.ndarray:
  rng = np.random.default_rng(1)
  return np.repeat(np.repeat(rng.integers(0, 256, (SIZE // 8, SIZE // 8), dtype=np.uint8), 8, 0), 8, 1)


def test_image_batch_conversions():
  gray = _gray_uint8()
  rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.float32) / 255.0
  np.testing.assert_array_equal(image_batch(gray), rgb[None])
  np.testing.assert_array_equal(image_batch(gray[..., None].astype(np.float32) / 255.0), rgb[None])
  rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 0.25, np.float32)], axis=-1)
  np.testing.assert_array_equal(image_batch(rgba[None]), rgb[None])  # alpha is not used
  luma = image_batch(rgb, channels=1)  # a one-channel model: PIL's "L" weights sum to 1
  np.testing.assert_allclose(luma, gray[None, ..., None] / 255.0, rtol=1e-6, atol=1e-6)
  from PIL import Image
  np.testing.assert_array_equal(image_batch(Image.fromarray(gray)), rgb[None])
  for bad, message in [(gray.astype(np.int32), "uint8 .* or float"), (np.zeros((8, 8, 2), np.float32), "C = 1"),
                       (np.zeros((1, 1, 8, 8, 3), np.float32), "got shape")]:
    with pytest.raises(ValueError, match=message):
      image_batch(bad)


def test_gray_rgba_and_uint8_inputs_equal_their_rgb_float_versions(ours):
  gray = _gray_uint8()
  rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.float32) / 255.0
  mask = np.zeros((SIZE, SIZE), np.uint8)
  mask[4:20, 8:28] = 255
  kw = dict(key=jax.random.key(3), num_steps=2, guidance_scale=3.0)
  want = ours.inpaint(rgb, mask.astype(np.float32) / 255.0, "a cat", **kw)
  got = ours.inpaint(gray, mask, "a cat", **kw)  # [H, W] uint8 image and mask
  np.testing.assert_array_equal(got, want)
  assert float(np.std(want)) > 1e-3
  rgba = np.concatenate([(rgb * 255).round().astype(np.uint8), np.full((SIZE, SIZE, 1), 7, np.uint8)], axis=-1)
  np.testing.assert_array_equal(ours.invert(rgba, "a cat", num_steps=2), ours.invert(rgb, "a cat", num_steps=2))


def test_size_multiple_comes_from_the_denoiser(ours):
  assert latent_multiple(ours.unet.config) == 2  # two UNet levels: one halving
  assert ours.size_multiple == ours.vae_factor * 2 == 4
  four_levels = UNetConfig.tiny(block_out_channels=(32, 32, 64, 64), down_block_types=("DownBlock2D",) * 4,
                                up_block_types=("UpBlock2D",) * 4)
  assert latent_multiple(four_levels) == 8
  assert latent_multiple(TextDiTConfig.tiny(patch_size=4)) == 4  # a transformer: its patch size
  with pytest.raises(ValueError, match=r"multiples of 4 \(the VAE factor 2 times the denoiser's downsampling 2\)"):
    ours.img2img(np.zeros((SIZE, SIZE - 2, 3), np.float32), "x", key=jax.random.key(0), num_steps=2)
