"""Frozen encoders run once over a dataset, stored as array_record, read back by the loader.

When the VAE and the text encoder are frozen, every training step recomputes the same latent
moments and text embeddings. :func:`precompute` runs the two encoders once over a source, with the
crop and flip of each example fixed (those of epoch 0, see :mod:`jdiff.data.transforms`), and writes
one array_record file per process (process k of P encodes the k-th contiguous block of the
examples, so a pod shares the work); :class:`PrecomputedSource` opens all the parts as one
random-access source that :class:`jdiff.data.Loader` shuffles and shards like any other (global
batches of indices, a per-process block of each, the position saved with the checkpoint). A train
step then draws the latent from the stored moments with its own key (:func:`sample_latents`), so
the noise of the latent sample still changes every step.

Each record holds ``latent_mean`` and ``latent_logvar`` (the encoder's posterior, [h, w, C]),
``text`` (the text encoder's output: an array, or a dict of arrays), ``label``, ``index`` (the
example's index in the original source), ``original_size`` and ``crops_coords_top_left`` (int32 [2]).
Unreadable examples are left out with a warning; ``part-K-of-P.json`` beside each part lists them.

Example:
  >>> precompute(folder, "/data/pokemon_sd15", encode_image=enc_img, encode_text=enc_txt,
  ...            tokenize=tok, image_size=512, crop="random", flip=True, batch_size=32)
  >>> loader = Loader(PrecomputedSource("/data/pokemon_sd15"), batch_size=64, seed=0)
  >>> latents = sample_latents(batch["latent_mean"], batch["latent_logvar"], key=key) * scaling_factor
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from typing import Any, Callable

import numpy as np

from jdiff.data.loader import Preprocess
from jdiff.data.sources import UnreadableExample

__all__ = ["precompute", "PrecomputedSource", "sample_latents", "FORMAT"]

FORMAT = "jdiff-precomputed-1"
_log = logging.getLogger("jdiff.data")
_PART = re.compile(r"part-(\d{5})-of-(\d{5})\.json$")


def _part_name(k: int, count: int) -> str:
  return f"part-{k:05d}-of-{count:05d}"


def _text_tree(out: Any) -> Any:
  """The text encoder's output as an array or a dict of arrays (a tuple/list becomes "0", "1", ...)."""
  if isinstance(out, (tuple, list)):
    return {str(i): np.asarray(v) for i, v in enumerate(out)}
  if isinstance(out, dict):
    return {str(k): np.asarray(v) for k, v in out.items()}
  return np.asarray(out)


def precompute(source, out_dir: str | os.PathLike, *,
               encode_image: Callable[[np.ndarray], tuple[Any, Any]],
               encode_text: Callable[[np.ndarray], Any] | None = None,
               tokenize: Callable[[str], np.ndarray] | None = None, batch_size: int = 16,
               image_size: int, crop: str = "center", flip: bool = False, seed: int = 0,
               channels: int | None = None, text_trainable: bool = False, tag: str = "",
               reuse: bool = True, shard_index: int | None = None, shard_count: int | None = None) -> str:
  """Encodes this process's block of ``source`` once and writes it under ``out_dir``.

  Args:
    source: a random-access source (:class:`jdiff.data.ImageFolder`, :func:`jdiff.data.tfds_source`).
    out_dir: the output folder (shared by all processes).
    encode_image: float32 images [B, S, S, C] in [-1, 1] -> (mean, logvar) [B, h, w, c].
    encode_text: token ids int32 [B, L] -> embeddings (an array or a tuple/dict of arrays, batch
      first); None stores no text.
    tokenize: caption -> token ids [L]; required with ``encode_text``.
    batch_size: examples per encoder call (the last call is padded, so shapes never change).
    image_size, crop, flip, seed, channels: the preprocessing (:class:`jdiff.data.Preprocess`);
      each example's crop and flip are those the loader would draw in epoch 0.
    text_trainable: whether the run trains its text encoder, which precomputing cannot serve.
    tag: names the encoders (e.g. the checkpoint path); stored with the settings.
    reuse: keep this process's part when it exists with the same settings and tag (a restarted
      run does not encode again).
    shard_index, shard_count: this process's block (default: ``jax.process_index/count``).

  With several JAX processes every process waits for the others' parts before returning, so
  :class:`PrecomputedSource` can open them all.

  Returns:
    ``out_dir``.

  Raises:
    ValueError: ``text_trainable``, ``encode_text`` without ``tokenize``, or no readable example.
  """
  if text_trainable:
    raise ValueError("precomputed text embeddings need a frozen text encoder, but the text encoder trains "
                     "(turn off text training or precomputing)")
  if encode_text is not None and tokenize is None:
    raise ValueError("precompute with encode_text needs tokenize")
  import jax
  shard_index = jax.process_index() if shard_index is None else int(shard_index)
  shard_count = jax.process_count() if shard_count is None else int(shard_count)
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} is not in [0, {shard_count})")
  out_dir = os.path.abspath(os.path.expanduser(os.fspath(out_dir)))
  os.makedirs(out_dir, exist_ok=True)
  prep = Preprocess(image_size=image_size, channels=channels, tokenize=tokenize, crop=crop, flip=flip, seed=seed)
  config = {"image_size": int(image_size), "crop": prep.crop, "flip": prep.flip, "seed": int(seed),
            "channels": channels, "source_len": len(source), "shard_count": shard_count, "tag": str(tag)}
  name = _part_name(shard_index, shard_count)
  if not (reuse and _part_config(os.path.join(out_dir, name)) == config):
    _write_part(source, os.path.join(out_dir, name), prep, config, encode_image=encode_image,
                encode_text=encode_text, batch_size=batch_size,
                block=np.array_split(np.arange(len(source)), shard_count)[shard_index])
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"jdiff precompute {out_dir}")
  return out_dir


def _part_config(name: str) -> dict[str, Any] | None:
  """The settings a complete part was written with (None: no complete part)."""
  if not (os.path.exists(name + ".json") and os.path.exists(name + ".array_record")):
    return None
  try:
    with open(name + ".json") as fh:
      meta = json.load(fh)
  except (OSError, ValueError):
    return None
  return meta.get("config") if meta.get("format") == FORMAT else None


def _write_part(source, name: str, prep: Preprocess, config: dict[str, Any], *, encode_image, encode_text,
                batch_size: int, block: np.ndarray) -> None:
  import jax
  from array_record.python.array_record_module import ArrayRecordWriter
  from flax import serialization
  out_dir, name = os.path.dirname(name), os.path.basename(name)
  if os.path.exists(os.path.join(out_dir, name + ".json")):  # the part is incomplete until rewritten
    os.remove(os.path.join(out_dir, name + ".json"))
  tmp = os.path.join(out_dir, f".{name}.array_record.tmp")
  writer = ArrayRecordWriter(tmp, "group_size:1")
  unreadable: list[str] = []
  count = 0

  def flush(items: list[tuple[int, dict[str, Any]]]) -> int:
    pad = [ex for _, ex in items] + [items[-1][1]] * (batch_size - len(items))
    mean, logvar = encode_image(np.stack([ex["image"] for ex in pad]))
    mean, logvar = np.asarray(mean, np.float32), np.asarray(logvar, np.float32)
    text = None
    if encode_text is not None:
      text = jax.tree.map(np.asarray, _text_tree(encode_text(np.stack([ex["tokens"] for ex in pad]))))
    for b, (i, ex) in enumerate(items):
      rec = {"latent_mean": mean[b], "latent_logvar": logvar[b], "label": np.asarray(ex["label"], np.int32),
             "index": np.asarray(i, np.int64)}
      if text is not None:
        rec["text"] = jax.tree.map(lambda t, b=b: t[b], text)
      if "original_size" in ex:
        rec["original_size"] = ex["original_size"]
        rec["crops_coords_top_left"] = ex["crops_coords_top_left"]
      writer.write(serialization.msgpack_serialize(rec))
    return len(items)

  try:
    items: list[tuple[int, dict[str, Any]]] = []
    for i in block:
      try:
        items.append((int(i), prep(source[int(i)], int(i), 0)))
      except UnreadableExample as e:
        unreadable.append(e.path)
        _log.warning("precompute: unreadable example left out: %s", e.path)
        continue
      if len(items) == batch_size:
        count += flush(items)
        items = []
    if items:
      count += flush(items)
  finally:
    writer.close()
  if not count and len(block):
    os.remove(tmp)
    raise ValueError(f"no readable example in {name} of the dataset (first unreadable: {unreadable[0]})")
  # The records first, then the JSON that marks the part complete.
  os.replace(tmp, os.path.join(out_dir, name + ".array_record"))
  meta = {"format": FORMAT, "count": count, "unreadable": unreadable, "config": config}
  with open(os.path.join(out_dir, f".{name}.json.tmp"), "w") as fh:
    json.dump(meta, fh)
  os.replace(os.path.join(out_dir, f".{name}.json.tmp"), os.path.join(out_dir, name + ".json"))


class PrecomputedSource:
  """The records :func:`precompute` wrote under ``path``, as one random-access source.

  ``source[i]`` is a dict of numpy arrays (see :mod:`jdiff.data.precompute`); :class:`jdiff.data.Loader`
  batches them as they are. ``config`` holds the preprocessing they were computed with.

  Raises:
    FileNotFoundError: no precomputed parts under ``path``, or some process's part is missing.
    ValueError: the parts disagree or do not match their records.

  Example:
    >>> src = PrecomputedSource("/data/pokemon_sd15"); src.config["image_size"]
    512
  """

  def __init__(self, path: str | os.PathLike):
    import grain
    self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    metas = sorted(p for p in glob.glob(os.path.join(self.path, "part-*-of-*.json")) if _PART.search(p))
    if not metas:
      raise FileNotFoundError(f"no precomputed data (part-*-of-*.json) in {self.path}")
    counts = {int(_PART.search(p).group(2)) for p in metas}
    if len(counts) != 1:
      raise ValueError(f"precomputed data in {self.path} mixes runs with {sorted(counts)} processes")
    total = counts.pop()
    parts, configs, self.counts, self.unreadable = [], [], [], []
    for k in range(total):
      name = os.path.join(self.path, _part_name(k, total))
      if not (os.path.exists(name + ".json") and os.path.exists(name + ".array_record")):
        raise FileNotFoundError(f"precomputed data in {self.path} lacks part {k} of {total} ({name}.array_record)")
      with open(name + ".json") as fh:
        meta = json.load(fh)
      if meta.get("format") != FORMAT:
        raise ValueError(f"{name}.json is not {FORMAT} data")
      configs.append(meta["config"])
      self.counts.append(int(meta["count"]))
      self.unreadable += meta.get("unreadable", [])
      parts.append(name + ".array_record")
    if any(c != configs[0] for c in configs):
      raise ValueError(f"precomputed parts in {self.path} were written with different settings")
    self.config = configs[0]
    self.records = grain.sources.ArrayRecordDataSource(parts)
    if len(self.records) != sum(self.counts):
      raise ValueError(f"precomputed data in {self.path} holds {len(self.records)} records, its parts list "
                       f"{sum(self.counts)}")

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i: int) -> dict[str, Any]:
    from flax import serialization
    rec = serialization.msgpack_restore(self.records[int(i)])
    rec["label"] = int(rec["label"])
    return rec


def sample_latents(mean, logvar, *, key):
  """A latent drawn from stored moments: ``mean + exp(logvar / 2) * N(0, 1)`` with ``key``, the same
  draw as :meth:`jdiff.models.vae.DiagonalGaussian.sample` of the live encoder (logvar clipped to
  [-30, 20] likewise)."""
  import jax.numpy as jnp
  from jdiff.models.vae import DiagonalGaussian
  post = DiagonalGaussian(mean=jnp.asarray(mean, jnp.float32),
                          logvar=jnp.clip(jnp.asarray(logvar, jnp.float32), -30.0, 20.0))
  return post.sample(key=key)
