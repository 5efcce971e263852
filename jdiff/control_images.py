"""Control images for ControlNet: Canny edge maps and the resizing / normalisation diffusers applies.

:func:`canny` is a numpy implementation of OpenCV's ``cv2.Canny`` (3x3 Sobel with replicated borders,
L1 or L2 gradient magnitude, non-maximum suppression in four directions with OpenCV's fixed-point
angle test, hysteresis through 8-connected weak pixels), so edge maps made here match the ones
ControlNet checkpoints were trained on without an OpenCV dependency.

:func:`prepare` turns a control image (path, PIL image or array) into float32 ``[H, W, 3]`` in [0, 1]
at the generation size, as diffusers' ControlNet pipelines do (``VaeImageProcessor`` with
``do_convert_rgb=True, do_normalize=False``): PIL images are resized with Lanczos, arrays with
nearest-neighbour sampling (``torch.nn.functional.interpolate``'s default).

Example:
  >>> img = load_control_image("fox.png", (512, 512))  # doctest: +SKIP
  >>> edges = canny(img, 100, 200)  # [512, 512, 3] in {0, 1}  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["canny", "load_control_image", "prepare", "to_uint8"]

_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _SHIFT) + 0.5)  # tan(22.5 deg) in Q15


def to_uint8(image: Any) -> np.ndarray:
  """An image as uint8: uint8 passes through, floats in [0, 1] are scaled by 255 and rounded."""
  a = np.asarray(image)
  if a.dtype == np.uint8:
    return a
  if a.dtype == np.bool_:
    return a.astype(np.uint8) * 255
  if not np.issubdtype(a.dtype, np.floating):
    raise ValueError(f"image must be uint8 or float in [0, 1], got dtype {a.dtype}")
  return np.clip(np.round(a.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)


def _sobel(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """3x3 Sobel derivatives (int32) of an [H, W] image with replicated borders (OpenCV's choice)."""
  p = np.pad(img.astype(np.int32), 1, mode="edge")
  smooth_y = p[:-2] + 2 * p[1:-1] + p[2:]            # [H, W + 2]: [1, 2, 1] down the rows
  dx = smooth_y[:, 2:] - smooth_y[:, :-2]            # [H, W]
  smooth_x = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]   # [H + 2, W]
  dy = smooth_x[2:] - smooth_x[:-2]                  # [H, W]
  return dx, dy


def canny(image: Any, low: float, high: float, *, l2_gradient: bool = False, keep_channels: bool = True) -> np.ndarray:
  """Canny edges, equal to ``cv2.Canny(image, low, high, apertureSize=3, L2gradient=l2_gradient)``.

  Args:
    image: ``[H, W]`` grey or ``[H, W, C]`` colour image, uint8 or float in [0, 1] (floats are
      rounded to uint8 first). For colour images each pixel uses the channel with the largest
      gradient magnitude, as OpenCV does.
    low, high: hysteresis thresholds on the gradient magnitude (swapped if ``low > high``).
    l2_gradient: use sqrt(dx^2 + dy^2) instead of |dx| + |dy|.
    keep_channels: return ``[H, W, 3]`` float32 in {0, 1} (a ControlNet control image); False
      returns OpenCV's ``[H, W]`` uint8 in {0, 255}.

  Example:
    >>> img = np.zeros((16, 16), np.uint8); img[4:12, 4:12] = 255
    >>> edges = canny(img, 100, 200, keep_channels=False)
    >>> int(edges.max()), edges.shape
    (255, (16, 16))
  """
  img = to_uint8(image)
  if img.ndim == 3 and img.shape[-1] == 1:
    img = img[..., 0]
  if img.ndim not in (2, 3) or min(img.shape[:2]) < 1:
    raise ValueError(f"canny expects an [H, W] or [H, W, C] image, got shape {img.shape}")
  low, high = float(low), float(high)
  if low > high:
    low, high = high, low
  channels = [img] if img.ndim == 2 else [img[..., c] for c in range(img.shape[-1])]
  dx = dy = mag = None
  for ch in channels:
    cx, cy = _sobel(ch)
    cm = (cx * cx + cy * cy) if l2_gradient else (np.abs(cx) + np.abs(cy))
    if mag is None:
      dx, dy, mag = cx, cy, cm
    else:
      better = cm > mag  # strictly larger: the first channel wins ties, as in OpenCV
      dx, dy, mag = np.where(better, cx, dx), np.where(better, cy, dy), np.where(better, cm, mag)
  if l2_gradient:
    low, high = min(32767.0, low), min(32767.0, high)
    if low > 0:
      low *= low
    if high > 0:
      high *= high
  lo, hi = int(np.floor(low)), int(np.floor(high))

  # Non-maximum suppression; magnitudes outside the image count as 0.
  m = np.pad(mag, 1)
  c = m[1:-1, 1:-1]
  left, right = m[1:-1, :-2], m[1:-1, 2:]
  up, down = m[:-2, 1:-1], m[2:, 1:-1]
  ax = np.abs(dx).astype(np.int64)
  ay = np.abs(dy).astype(np.int64) << _SHIFT
  tg22 = ax * _TG22
  tg67 = tg22 + (ax << (_SHIFT + 1))
  horizontal = ay < tg22
  vertical = ~horizontal & (ay > tg67)
  diagonal = ~horizontal & ~vertical
  same_sign = (dx ^ dy) >= 0  # s = +1: up-left / down-right; s = -1: up-right / down-left
  diag_a = np.where(same_sign, m[:-2, :-2], m[:-2, 2:])    # row above, column j - s
  diag_b = np.where(same_sign, m[2:, 2:], m[2:, :-2])      # row below, column j + s
  is_max = ((horizontal & (c > left) & (c >= right)) | (vertical & (c > up) & (c >= down))
            | (diagonal & (c > diag_a) & (c > diag_b)))
  weak = is_max & (mag > lo)
  strong = weak & (mag > hi)

  # Hysteresis: keep the weak pixels 8-connected to a strong one.
  labels, n = ndimage.label(weak, structure=np.ones((3, 3), bool))
  keep = np.zeros(n + 1, bool)
  keep[np.unique(labels[strong])] = True
  keep[0] = False
  edges = keep[labels]
  if not keep_channels:
    return edges.astype(np.uint8) * 255
  return np.repeat(edges[..., None], 3, axis=-1).astype(np.float32)


def _resize_nearest(a: np.ndarray, height: int, width: int) -> np.ndarray:
  """``torch.nn.functional.interpolate(mode="nearest")`` on an [H, W, C] array."""
  h, w = a.shape[:2]
  rows = np.minimum(np.floor(np.arange(height) * (h / height)).astype(np.int64), h - 1)
  cols = np.minimum(np.floor(np.arange(width) * (w / width)).astype(np.int64), w - 1)
  return a[rows][:, cols]


def prepare(image: Any, height: int, width: int) -> np.ndarray:
  """A control image as float32 ``[height, width, 3]`` in [0, 1], resized as diffusers does.

  Args:
    image: a path, a PIL image (converted to RGB, Lanczos-resized), or an array ``[H, W]``,
      ``[H, W, 1]`` or ``[H, W, 3]`` (uint8, or float in [0, 1]; nearest-neighbour resized).
    height, width: the generation size in pixels.

  Example:
    >>> prepare(np.zeros((8, 8), np.uint8), 16, 16).shape
    (16, 16, 3)
  """
  from PIL import Image

  if isinstance(image, (str, os.PathLike)):
    return load_control_image(image, (height, width))
  if isinstance(image, Image.Image):
    img = image.convert("RGB").resize((int(width), int(height)), resample=Image.LANCZOS)
    return np.asarray(img, np.float32) / 255.0
  a = np.asarray(image)
  if a.ndim == 2:
    a = a[..., None]
  if a.ndim != 3 or a.shape[-1] not in (1, 3):
    raise ValueError(f"control image must be [H, W], [H, W, 1] or [H, W, 3], got shape {a.shape}")
  if a.dtype == np.uint8:
    a = a.astype(np.float32) / 255.0
  elif np.issubdtype(a.dtype, np.floating):
    a = a.astype(np.float32)
    if a.size and (a.min() < 0.0 or a.max() > 1.0):
      raise ValueError(f"float control images must be in [0, 1], got values in [{a.min()}, {a.max()}]")
  else:
    raise ValueError(f"control image must be uint8 or float in [0, 1], got dtype {a.dtype}")
  if a.shape[-1] == 1:
    a = np.repeat(a, 3, axis=-1)
  if a.shape[:2] != (height, width):
    a = _resize_nearest(a, int(height), int(width))
  return a


def load_control_image(path: str | os.PathLike, size: int | tuple[int, int] | None = None) -> np.ndarray:
  """Reads an image file as float32 ``[H, W, 3]`` in [0, 1] (RGB), Lanczos-resized to ``size``.

  Args:
    path: any format PIL reads (PNG, JPEG, ...).
    size: ``(height, width)``, one int for a square, or None to keep the file's size.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: the file is not a readable image, or ``size`` is not positive.

  Example:
    >>> hint = load_control_image("edges.png", (512, 512))  # doctest: +SKIP
  """
  from PIL import Image, UnidentifiedImageError

  p = Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"control image {str(p)!r} does not exist")
  try:
    with Image.open(p) as im:
      im.load()
      img = im.convert("RGB")
  except (UnidentifiedImageError, OSError, SyntaxError) as err:
    raise ValueError(f"control image {str(p)!r} is not a readable image ({err})") from err
  if size is not None:
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h < 1 or w < 1:
      raise ValueError(f"control image size must be positive, got {size}")
    img = img.resize((w, h), resample=Image.LANCZOS)
  return np.asarray(img, np.float32) / 255.0
