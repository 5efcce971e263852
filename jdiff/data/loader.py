"""Deterministic, checkpointable, host-sharded batching of a random-access source with grain.

The example order is a function of the seed only: grain's ``MapDataset`` shuffles the indices
with a fresh permutation every epoch and cuts them into GLOBAL batches, the same on every host;
each host then reads only its contiguous block of each global batch, so the global batch that
:func:`jdiff.parallel.host_to_global` assembles does not depend on the number of hosts; the iterator's
position (``get_state()``, a small JSON-able dict) is saved with the model checkpoint and
``set_state`` puts a restored run on exactly the batch it would have read next. Random crops and
flips are drawn from (seed, example index, epoch), and an unreadable example is replaced by a pure
function of its stream position, so a resumed run reads bit-identical batches.

Batches are numpy dicts: ``image`` float32 [B, H, W, C] in [-1, 1], ``label`` int32 [B], when a
``tokenize`` function is given ``tokens`` int32 [B, L], and with a crop ``original_size`` and
``crops_coords_top_left`` int32 [B, 2]. Over a :class:`jdiff.data.PrecomputedSource` the batch holds its
stored arrays instead of ``image``/``tokens``. ``B`` is the host-local batch
(global batch / number of hosts); :func:`jdiff.parallel.host_to_global` assembles the global one.

Example:
  >>> loader = Loader(tfds_source("jdiff_digits", data_dir=d), batch_size=64, seed=0)
  >>> batch = next(loader)
  >>> saved = loader.get_state(); ...; loader.set_state(saved)
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import grain
import numpy as np

from jdiff.data import transforms
from jdiff.data.sources import UnreadableExample

__all__ = ["Loader", "Preprocess", "to_float", "resize"]

_log = logging.getLogger("jdiff.data")
_BAD_KEY = "jdiff_bad_examples"  # per-batch list of (stream position, unreadable file); state counters


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


class Preprocess:
  """One example -> arrays: channels, resize or crop/flip, [-1, 1] floats, tokens.

  Args:
    image_size: the output side; with ``crop=None`` and no flip the image is center-cropped to a
      square and resized (:func:`resize`), else see ``crop``.
    channels: convert images to this many channels (None: keep).
    tokenize: optional ``caption -> int array [L]``; adds ``tokens``.
    crop: "center" or "random": the shorter side is resized to ``image_size`` and a square cropped
      (:func:`jdiff.data.transforms.crop_and_flip`); the example then also holds ``original_size``
      and ``crops_coords_top_left`` (int32 [2], (height, width) and (top, left)).
    flip: mirror left-right with probability 1/2 (implies ``crop="center"`` when crop is None).
    seed: with the example index and epoch, seeds the random crop and flip.

  Examples without ``image`` (a :class:`jdiff.data.PrecomputedSource`) pass through unchanged but
  for their label.
  """

  def __init__(self, *, image_size: int | None = None, channels: int | None = None,
               tokenize: Callable[[str], np.ndarray] | None = None, crop: str | None = None,
               flip: bool = False, seed: int = 0):
    if crop is None and flip:
      crop = "center"
    if crop is not None:
      if crop not in transforms.CROPS:
        raise ValueError(f"unknown data crop {crop!r}; expected one of {transforms.CROPS}")
      if not image_size:
        raise ValueError("a crop or flip needs image_size (the resolution)")
    self.image_size, self.channels, self.tokenize = image_size, channels, tokenize
    self.crop, self.flip, self.seed = crop, bool(flip), int(seed)

  def __call__(self, ex: dict[str, Any], index: int, epoch: int) -> dict[str, Any]:
    if "image" not in ex:
      out = {k: v for k, v in ex.items() if k not in ("caption", "path", "index")}
      out["label"] = np.int32(ex.get("label", -1))
      return out
    image = np.asarray(ex["image"], np.uint8)
    if image.ndim == 2:
      image = image[:, :, None]
    if self.channels is not None:
      image = _channels(image, self.channels)
    extra = {}
    if self.crop is not None:
      rng = transforms.example_rng(self.seed, index, epoch) if (self.crop == "random" or self.flip) else None
      c = transforms.crop_and_flip(image, self.image_size, crop=self.crop, flip=self.flip, rng=rng)
      image = c.image
      extra = {"original_size": np.asarray(c.original_size, np.int32),
               "crops_coords_top_left": np.asarray(c.crop_top_left, np.int32)}
    elif self.image_size is not None:
      image = resize(image, self.image_size)
    out = {"image": to_float(image), "label": np.int32(ex.get("label", -1)), **extra}
    if self.tokenize is not None:
      out["tokens"] = np.asarray(self.tokenize(ex.get("caption", "")), np.int32)
    return out


class Loader:
  """An endless, deterministic iterator of host-local batches.

  Unreadable examples (:class:`jdiff.data.UnreadableExample`, or an ``OSError`` from the source) are
  replaced by the next readable example of this process's slice of the example stream (so batch
  shapes stay fixed and the other processes read what they would have read), each with a warning
  naming the file; :attr:`bad_examples` counts them (it is part of the saved state, and
  :meth:`metrics` reports it). When more than ``max_bad_fraction`` of the examples this process reads
  in one epoch are unreadable, iteration stops with a one-line ``ValueError``.

  Args:
    source: random access ``len(source)``, ``source[i] -> {"image", "label", "caption"}``.
    batch_size: the GLOBAL batch size (divided by ``shard_count``).
    seed: shuffling seed (and, with the example index and epoch, the random crop/flip seed).
    image_size: images are center-cropped and resized to this square size (None: keep).
    channels: convert images to this many channels (None: keep).
    tokenize: optional ``caption -> int array [L]``; adds ``tokens`` to each batch.
    shard_index, shard_count: this host's shard (default: ``jax.process_index/count``).
    shuffle: shuffle each epoch.
    crop, flip: fine-tuning preprocessing (:class:`Preprocess`); batches gain ``original_size`` and
      ``crops_coords_top_left`` (int32 [B, 2]).
    max_bad_fraction: the share of unreadable examples per epoch and process that is tolerated.
    prefetch: batches prepared ahead by background threads (bounds the memory they hold).

  Example:
    >>> it = Loader(src, batch_size=128, seed=0, image_size=32, channels=1)
    >>> it = Loader(folder, batch_size=64, image_size=512, crop="random", flip=True)
  """

  def __init__(self, source, *, batch_size: int, seed: int = 0, image_size: int | None = None,
               channels: int | None = None, tokenize: Callable[[str], np.ndarray] | None = None,
               shard_index: int | None = None, shard_count: int | None = None, shuffle: bool = True,
               crop: str | None = None, flip: bool = False, max_bad_fraction: float = 0.01,
               prefetch: int = 8):
    import jax
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if batch_size % shard_count:
      raise ValueError(f"batch_size={batch_size} is not divisible by the {shard_count} hosts")
    self.local_batch = batch_size // shard_count
    self.batch_size = batch_size
    self.image_size, self.channels, self.tokenize = image_size, channels, tokenize
    self.preprocess = Preprocess(image_size=image_size, channels=channels, tokenize=tokenize, crop=crop,
                                 flip=flip, seed=seed)
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"shard_index={shard_index} is not in [0, {shard_count})")
    if len(source) < shard_count * self.local_batch:
      raise ValueError(f"dataset of {len(source)} examples is smaller than one global batch ({batch_size})")
    if not 0.0 <= max_bad_fraction <= 1.0:
      raise ValueError(f"max_bad_fraction={max_bad_fraction} is not in [0, 1]")
    self.shard_index, self.shard_count = shard_index, shard_count
    self.source = source
    self.max_bad_fraction = float(max_bad_fraction)
    # Unreadable examples this process may meet per epoch before iteration stops.
    self.max_bad_per_epoch = int(np.floor(self.max_bad_fraction * len(source) / shard_count + 1e-9))
    self.bad_examples, self._bad_epoch, self._bad_in_epoch = 0, -1, 0
    # Shuffle and batch INDICES globally (the same on every host), then each host reads only its
    # contiguous block [shard_index * B_local, (shard_index + 1) * B_local) of every global batch:
    # the global batch (and so training) does not depend on the number of hosts. The stream of
    # indices is random-access: position p of the stream is example stream[p] of epoch p // len.
    stream = grain.MapDataset.range(len(source))
    if shuffle:
      stream = stream.seed(seed).shuffle()
    self._stream = stream.repeat(None)
    ds = self._stream.batch(batch_size, drop_remainder=True).map_with_index(self._local_batch)
    self.dataset = ds
    prefetch = max(1, int(prefetch))
    options = grain.ReadOptions(num_threads=min(prefetch, 4), prefetch_buffer_size=prefetch)
    self._iter = iter(ds.to_iter_dataset(options))

  def _read(self, position: int) -> tuple[dict[str, Any], list[str]]:
    """The example at stream ``position`` of this host's slice (or its replacement) and the
    unreadable files met on the way (the first is the example's own)."""
    lo = self.shard_index * self.local_batch
    bad: list[str] = []
    p = position
    for _ in range(len(self.source) + 1):
      i = int(self._stream[p])
      try:
        return self.preprocess(self.source[i], i, p // len(self.source)), bad
      except UnreadableExample as e:
        bad.append(e.path)
      except OSError as e:
        bad.append(f"example {i}: {e}")
      # The next position of this host's slice: the rest of its block, then the next global batch's.
      off = p % self.batch_size - lo
      p = p + 1 if off + 1 < self.local_batch else p - off + self.batch_size
    raise ValueError(f"no readable example in process {self.shard_index}'s slice of {len(self.source)} "
                     f"examples (first unreadable: {bad[0]})")

  def _local_batch(self, step: int, indices: np.ndarray) -> dict[str, Any]:
    del indices  # re-read from the stream by position, so replacements can look ahead
    import jax
    lo = step * self.batch_size + self.shard_index * self.local_batch
    examples, bad = [], []
    for p in range(lo, lo + self.local_batch):
      ex, met = self._read(p)
      examples.append(ex)
      if met:
        bad.append((p, met[0]))
    batch = jax.tree.map(lambda *xs: np.stack(xs), *examples)
    batch[_BAD_KEY] = bad
    return batch

  def _count_bad(self, bad: list[tuple[int, str]]) -> None:
    for position, what in bad:
      epoch = position // len(self.source)
      if epoch != self._bad_epoch:
        self._bad_epoch, self._bad_in_epoch = epoch, 0
      self._bad_in_epoch += 1
      self.bad_examples += 1
      _log.warning("unreadable example replaced by the next readable one (%d so far): %s",
                   self.bad_examples, what)
      if self._bad_in_epoch > self.max_bad_per_epoch:
        raise ValueError(f"{self._bad_in_epoch} unreadable examples in epoch {epoch} on process "
                         f"{self.shard_index}, more than max_bad_fraction={self.max_bad_fraction} of its "
                         f"{len(self.source) // self.shard_count} examples (last: {what})")

  def metrics(self) -> dict[str, int]:
    """Counters a trainer logs: ``data/bad_examples`` (unreadable examples replaced so far)."""
    return {"data/bad_examples": self.bad_examples}

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iter)
    self._count_bad(batch.pop(_BAD_KEY))
    return batch

  def get_state(self) -> dict[str, Any]:
    """The iterator position and the unreadable-example counters (JSON-able), saved with the checkpoint."""
    state = dict(self._iter.get_state())
    state[_BAD_KEY] = [self.bad_examples, self._bad_epoch, self._bad_in_epoch]
    return state

  def set_state(self, state: dict[str, Any]) -> None:
    """Moves to a position returned by :meth:`get_state` (an empty dict means the start)."""
    state = dict(state or {})
    self.bad_examples, self._bad_epoch, self._bad_in_epoch = (int(v) for v in state.pop(_BAD_KEY, (0, -1, 0)))
    if state:
      self._iter.set_state(state)
