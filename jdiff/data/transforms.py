"""Fine-tuning preprocessing: resize the shorter side, flip, crop, and record what was done.

:func:`crop_and_flip` is the one image transform of fine-tuning recipes (shorter side resized to the
resolution, optional horizontal flip, then a center or random square crop). Every random choice
comes from :func:`example_rng`, a generator seeded by ``(seed, example index, epoch)``, so an
example gets the same crop and flip wherever and whenever it is read (a resumed run, another
number of hosts). The original size and the crop's top-left corner are returned with the image:
SDXL's micro-conditioning reads them as ``original_size`` and ``crops_coords_top_left``.

Example:
  >>> out = crop_and_flip(np.zeros((768, 1024, 3), np.uint8), 512)   # center crop
  >>> out.image.shape, out.original_size, out.crop_top_left
  ((512, 512, 3), (768, 1024), (0, 85))
  >>> out = crop_and_flip(image, 512, crop="random", flip=True, rng=example_rng(seed, index, epoch))
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["CROPS", "Cropped", "crop_and_flip", "example_rng", "check_resolution", "resize_shorter"]

CROPS = ("center", "random")


@dataclasses.dataclass(frozen=True)
class Cropped:
  """An image after :func:`crop_and_flip`.

  Attributes:
    image: uint8 [resolution, resolution, C].
    original_size: (height, width) of the image before resizing.
    crop_top_left: (top, left) of the crop in the resized (and flipped) image.
    flipped: whether the image was mirrored left-right.
  """

  image: np.ndarray
  original_size: tuple[int, int]
  crop_top_left: tuple[int, int]
  flipped: bool


def example_rng(seed: int, index: int, epoch: int) -> np.random.Generator:
  """The generator of one example's random choices: a pure function of (seed, index, epoch)."""
  return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index), int(epoch)]))


def check_resolution(resolution: int, factor: int) -> int:
  """Refuses a resolution the model's downsampling factor (a VAE's 8) does not divide.

  Raises:
    ValueError: ``resolution`` is not a positive multiple of ``factor``.

  Example:
    >>> check_resolution(512, 8)
    512
  """
  resolution, factor = int(resolution), int(factor)
  if resolution <= 0 or factor <= 0 or resolution % factor:
    raise ValueError(f"resolution {resolution} is not a positive multiple of the VAE factor {factor}")
  return resolution


def resize_shorter(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, C] -> uint8 with the shorter side ``size`` and the aspect ratio kept (bicubic, PIL).

  The longer side is rounded to the nearest pixel and never below ``size``.
  """
  from PIL import Image
  h, w, c = image.shape
  if min(h, w) == size:
    return image
  if h <= w:
    nh, nw = size, max(size, int(round(w * size / h)))
  else:
    nh, nw = max(size, int(round(h * size / w))), size
  pil = Image.fromarray(image[:, :, 0] if c == 1 else image, mode="L" if c == 1 else "RGB")
  out = np.asarray(pil.resize((nw, nh), Image.BICUBIC), np.uint8)
  return out[:, :, None] if c == 1 else out


def crop_and_flip(image: np.ndarray, resolution: int, *, crop: str = "center", flip: bool = False,
                  rng: np.random.Generator | None = None) -> Cropped:
  """Shorter side to ``resolution``, mirror with probability 1/2 (``flip``), then a square crop.

  Args:
    image: uint8 [H, W, C] with C in (1, 3).
    resolution: the output side.
    crop: "center" (the middle square, rounded down) or "random" (uniform over all positions).
    flip: mirror left-right with probability 1/2; the crop is taken in the mirrored image.
    rng: the source of the random choices (:func:`example_rng`); needed for a random crop or flip.

  Returns:
    :class:`Cropped`: the image, its original (height, width) and the crop's (top, left).
  """
  if crop not in CROPS:
    raise ValueError(f"unknown crop {crop!r}; expected one of {CROPS}")
  if (crop == "random" or flip) and rng is None:
    raise ValueError("a random crop or flip needs rng (data.transforms.example_rng)")
  image = np.asarray(image, np.uint8)
  h, w = image.shape[:2]
  resized = resize_shorter(image, resolution)
  rh, rw = resized.shape[:2]
  # The draws are made in a fixed order (flip, top, left) whatever the options, so turning one
  # option on does not change the other's choices.
  flip_draw = rng.random() if rng is not None else 1.0
  flipped = bool(flip and flip_draw < 0.5)
  if flipped:
    resized = resized[:, ::-1]
  if crop == "random":
    top = int(rng.integers(0, rh - resolution + 1))
    left = int(rng.integers(0, rw - resolution + 1))
  else:
    top, left = (rh - resolution) // 2, (rw - resolution) // 2
  out = np.ascontiguousarray(resized[top:top + resolution, left:left + resolution])
  return Cropped(image=out, original_size=(int(h), int(w)), crop_top_left=(top, left), flipped=flipped)
