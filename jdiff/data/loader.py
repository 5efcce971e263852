"""Deterministic, checkpointable, host-sharded batching of a random-access source with grain.

The example order is a function of the seed only: grain's ``MapDataset`` shuffles the indices
with a fresh permutation every epoch and cuts them into GLOBAL batches, the same on every host;
each host then reads only its contiguous block of each global batch, so the global batch that
:func:`jdiff.parallel.host_to_global` assembles does not depend on the number of hosts; the iterator's
position (``get_state()``, a small JSON-able dict) is saved with the model checkpoint and
``set_state`` puts a restored run on exactly the batch it would have read next.

Batches are numpy dicts: ``image`` float32 [B, H, W, C] in [-1, 1], ``label`` int32 [B] and, when a
``tokenize`` function is given, ``tokens`` int32 [B, L]. ``B`` is the host-local batch
(global batch / number of hosts); :func:`jdiff.parallel.host_to_global` assembles the global one.

Example:
  >>> loader = Loader(tfds_source("jdiff_digits", data_dir=d), batch_size=64, seed=0)
  >>> batch = next(loader)
  >>> saved = loader.get_state(); ...; loader.set_state(saved)
"""

from __future__ import annotations

from typing import Any, Callable

import grain
import numpy as np

__all__ = ["Loader", "to_float", "resize"]


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, C] -> uint8 [size, size, C]: center crop to a square, then bicubic resize (PIL)."""
  from PIL import Image
  h, w, c = image.shape
  if (h, w) == (size, size):
    return image
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  image = image[top:top + s, left:left + s]
  mode = "L" if c == 1 else "RGB"
  pil = Image.fromarray(image[:, :, 0] if c == 1 else image, mode=mode)
  out = np.asarray(pil.resize((size, size), Image.BICUBIC), np.uint8)
  return out[:, :, None] if c == 1 else out


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8 [..., C] in 0..255 -> float32 in [-1, 1]."""
  return image.astype(np.float32) * (2.0 / 255.0) - 1.0


def _channels(image: np.ndarray, channels: int) -> np.ndarray:
  c = image.shape[-1]
  if c == channels:
    return image
  if c == 1:
    return np.repeat(image, channels, axis=-1)
  if channels == 1:  # ITU-R 601 luma
    luma = image[..., :3].astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None]
  if c == 4 and channels == 3:
    return image[..., :3]
  raise ValueError(f"cannot convert an image with {c} channels to {channels}")


class Loader:
  """An endless, deterministic iterator of host-local batches.

  Args:
    source: random access ``len(source)``, ``source[i] -> {"image", "label", "caption"}``.
    batch_size: the GLOBAL batch size (divided by ``shard_count``).
    seed: shuffling seed.
    image_size: images are center-cropped and resized to this square size (None: keep).
    channels: convert images to this many channels (None: keep).
    tokenize: optional ``caption -> int array [L]``; adds ``tokens`` to each batch.
    shard_index, shard_count: this host's shard (default: ``jax.process_index/count``).
    shuffle: shuffle each epoch.

  Example:
    >>> it = Loader(src, batch_size=128, seed=0, image_size=32, channels=1)
  """

  def __init__(self, source, *, batch_size: int, seed: int = 0, image_size: int | None = None,
               channels: int | None = None, tokenize: Callable[[str], np.ndarray] | None = None,
               shard_index: int | None = None, shard_count: int | None = None, shuffle: bool = True):
    import jax
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if batch_size % shard_count:
      raise ValueError(f"batch_size={batch_size} is not divisible by the {shard_count} hosts")
    self.local_batch = batch_size // shard_count
    self.image_size, self.channels, self.tokenize = image_size, channels, tokenize
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"shard_index={shard_index} is not in [0, {shard_count})")
    if len(source) < shard_count * self.local_batch:
      raise ValueError(f"dataset of {len(source)} examples is smaller than one global batch ({batch_size})")
    self.shard_index, self.shard_count = shard_index, shard_count
    self.source = source
    # Shuffle and batch INDICES globally (the same on every host), then each host reads only its
    # contiguous block [shard_index * B_local, (shard_index + 1) * B_local) of every global batch:
    # the global batch (and so training) does not depend on the number of hosts.
    ds = grain.MapDataset.range(len(source))
    if shuffle:
      ds = ds.seed(seed).shuffle()
    ds = ds.repeat(None).batch(batch_size, drop_remainder=True).map(self._local_batch)
    self.dataset = ds
    self._iter = iter(ds.to_iter_dataset())

  def _local_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    lo = self.shard_index * self.local_batch
    examples = [self._example(self.source[int(i)]) for i in indices[lo:lo + self.local_batch]]
    return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}

  def _example(self, ex: dict[str, Any]) -> dict[str, np.ndarray]:
    image = np.asarray(ex["image"], np.uint8)
    if image.ndim == 2:
      image = image[:, :, None]
    if self.channels is not None:
      image = _channels(image, self.channels)
    if self.image_size is not None:
      image = resize(image, self.image_size)
    out = {"image": to_float(image), "label": np.int32(ex.get("label", -1))}
    if self.tokenize is not None:
      out["tokens"] = np.asarray(self.tokenize(ex.get("caption", "")), np.int32)
    return out

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iter)

  def get_state(self) -> dict[str, Any]:
    """The iterator position (JSON-able), saved with the checkpoint."""
    return dict(self._iter.get_state())

  def set_state(self, state: dict[str, Any]) -> None:
    """Moves to a position returned by :meth:`get_state` (an empty dict means the start)."""
    if state:
      self._iter.set_state(dict(state))
