"""Random-access example sources: any TFDS dataset (array_record) and image folders with captions.

Every source has ``len(source)`` and ``source[i] -> {"image": uint8 [H, W, C], "label": int,
"caption": str}``; the loader (:mod:`jdiff.data.loader`) shuffles, resizes and batches them.

Example:
  >>> src = tfds_source("jdiff_digits", data_dir="~/tensorflow_datasets")
  >>> src = ImageFolder("photos/")   # photos/a.png + photos/a.txt, or photos/captions.jsonl
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import numpy as np

__all__ = ["TfdsSource", "tfds_source", "ImageFolder", "UnreadableExample", "IMAGE_EXTENSIONS",
           "METADATA_FILES", "CAPTION_MAX_BYTES", "METADATA_LINE_MAX_BYTES", "VERIFY_MODES"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
METADATA_FILES = ("metadata.jsonl", "captions.jsonl")
CAPTION_MAX_BYTES = 8192  # bytes of UTF-8 kept per caption: CLIP reads 77 tokens, T5 encoders a few hundred
METADATA_LINE_MAX_BYTES = 1 << 20  # a longer metadata.jsonl line is refused
VERIFY_MODES = ("header", "full", "none")


def _text(x: Any) -> str:
  if isinstance(x, bytes):
    return x.decode("utf-8")
  if isinstance(x, np.ndarray) and x.dtype.kind in "SO" and x.ndim == 0:
    return _text(x.item())
  return "" if x is None else str(x)


class TfdsSource:
  """A TFDS split read with ``tfds.data_source`` with its keys mapped to image/label/caption.

  Args:
    data_source: the object returned by ``tfds.data_source(...)[split]``.
    image_key, label_key, caption_key: feature names in the dataset (label/caption may be None).
  """

  def __init__(self, data_source, *, image_key: str = "image", label_key: str | None = "label",
               caption_key: str | None = "caption"):
    self.source = data_source
    self.image_key, self.label_key, self.caption_key = image_key, label_key, caption_key

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict[str, Any]:
    ex = self.source[int(i)]
    if self.image_key not in ex:  # sources opened without tfds_source's feature check
      raise KeyError(f"dataset has no feature {self.image_key!r} (data.image_key); "
                     f"features are {sorted(ex)}")
    image = np.asarray(ex[self.image_key])
    if image.ndim == 2:
      image = image[:, :, None]
    label = int(ex[self.label_key]) if self.label_key and self.label_key in ex else -1
    caption = _text(ex[self.caption_key]) if self.caption_key and self.caption_key in ex else ""
    return {"image": image, "label": label, "caption": caption}


def tfds_source(name: str, *, data_dir: str | os.PathLike | None = None, split: str = "train",
                image_key: str = "image", label_key: str | None = "label",
                caption_key: str | None = "caption") -> TfdsSource:
  """Opens a prepared TFDS dataset (array_record) by name for random access; no TensorFlow needed.

  The bundled ``jdiff_digits`` dataset is built on first use. Other datasets must already be
  prepared in ``data_dir`` in the array_record format (``tfds build NAME --file_format=array_record``).

  Raises:
    FileNotFoundError: the dataset (or split) is not prepared in ``data_dir``.

  Example:
    >>> src = tfds_source("jdiff_digits", data_dir="/tmp/tfds")
  """
  import tensorflow_datasets as tfds
  from jdiff.data import digits

  data_dir = None if data_dir is None else os.path.expanduser(os.fspath(data_dir))
  if name.split(":")[0] == "jdiff_digits":
    if data_dir is None:
      data_dir = os.path.expanduser("~/tensorflow_datasets")
    digits.prepare(data_dir)
  try:
    ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises several types (DatasetNotFoundError, AssertionError, ...)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise FileNotFoundError(f"TFDS dataset {name!r} split {split!r} is not available in data_dir="
                            f"{data_dir!r} (prepare it in the array_record format): {first}") from None
  _check_features(ds, name, image_key=image_key, caption_key=caption_key)  # a missing label reads as -1
  return TfdsSource(ds, image_key=image_key, label_key=label_key, caption_key=caption_key)


def _check_features(ds, name: str, **keys: str | None) -> None:
  """Refuses configured keys the dataset's features lack (one line, before anything compiles)."""
  info = getattr(ds, "dataset_info", None)
  features = getattr(info, "features", None)
  if features is None:
    return
  names = sorted(features.keys())
  for option, key in keys.items():
    if key and key not in names:
      raise ValueError(f"TFDS dataset {name!r} has no feature {key!r} (data.{option}); features are {names}")


class UnreadableExample(ValueError):
  """An example that cannot be read or decoded; ``path`` names the file.

  :class:`jdiff.data.Loader` replaces such examples (see its ``max_bad_fraction``).
  """

  def __init__(self, path: str, reason: str):
    super().__init__(f"unreadable image {path}: {reason}")
    self.path = path


def _inside(path: str, root: str) -> bool:
  return path == root or path.startswith(root + os.sep)


def _truncate_utf8(raw: bytes, limit: int) -> str:
  """At most ``limit`` bytes of UTF-8 text; a character cut at the end is dropped."""
  if len(raw) <= limit:
    return raw.decode("utf-8", errors="replace")
  return raw[:limit].decode("utf-8", errors="ignore")


class ImageFolder:
  """Images in a folder (recursively), each with a caption.

  Captions, first match wins:

  * ``metadata.jsonl`` (diffusers' / 🤗 datasets' imagefolder convention) or ``captions.jsonl``, in the
    folder or any subfolder: one JSON object a line naming an image relative to that file's folder
    (``file_name``; ``file`` and ``image`` are accepted too) and its caption (the ``caption_key``
    column; with ``caption_key=None``, ``text`` or else ``caption``). Other columns are ignored. An
    image name that is absolute or contains ``..`` is refused; a line longer than
    ``METADATA_LINE_MAX_BYTES`` is refused.
  * a sidecar ``a.txt`` next to ``a.png``, read when the example is read;
  * otherwise the empty caption.

  Every caption is cut to ``CAPTION_MAX_BYTES`` bytes of UTF-8 (far beyond any text encoder's
  context; the tokenizer truncates further), so no caption file can make the reader hold megabytes.
  Symbolic links whose target lies outside the folder are not followed (their images, metadata and
  captions are left out), nor are linked subfolders; only regular files are read.

  At construction each image is checked by ``verify``: "header" (opens it and reads the header,
  cheap), "full" (decodes it) or "none" (for very large folders). Images that fail are left out with
  a warning; more than ``max_bad_fraction`` of them, or none readable, is one error. Images that fail
  later, when read, raise :class:`UnreadableExample`, which :class:`jdiff.data.Loader` replaces by
  the next readable example. Labels are -1.

  Raises:
    FileNotFoundError: the folder does not exist or holds no images.
    ValueError: no image is readable, too many are, a metadata line is malformed, names an image
      outside the folder, or lacks the caption column.

  Example:
    >>> src = ImageFolder("data/pokemon", channels=3, caption_key="text")
  """

  def __init__(self, path: str | os.PathLike, *, channels: int = 3, caption_key: str | None = None,
               verify: str | bool = "header", max_bad_fraction: float = 0.01):
    if verify is True or verify is False:
      verify = "full" if verify else "none"
    if verify not in VERIFY_MODES:
      raise ValueError(f"unknown verify {verify!r}; expected one of {VERIFY_MODES}")
    self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.isdir(self.path):
      raise FileNotFoundError(f"image folder {self.path} does not exist")
    self.root = os.path.realpath(self.path)
    self.channels, self.caption_key = channels, caption_key
    files, metadata, self.outside_links = [], [], []
    for root, dirs, names in os.walk(self.path, followlinks=False):
      dirs.sort()
      for n in sorted(names):
        f = os.path.join(root, n)
        if n not in METADATA_FILES and not n.lower().endswith(IMAGE_EXTENSIONS):
          continue
        if not _inside(os.path.realpath(f), self.root):
          self.outside_links.append(f)
        elif os.path.isfile(f):  # regular files only (a FIFO would block the reader)
          (metadata if n in METADATA_FILES else files).append(f)
    if self.outside_links:
      warnings.warn(f"image folder {self.path}: {len(self.outside_links)} symbolic link(s) pointing outside "
                    f"it are not followed (first: {self.outside_links[0]})", RuntimeWarning, stacklevel=2)
    if not files:
      raise FileNotFoundError(f"image folder {self.path} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    files.sort()
    self.captions = self._read_metadata(metadata, set(files))
    self.rejected = []
    if verify != "none":
      from concurrent.futures import ThreadPoolExecutor
      with ThreadPoolExecutor(max_workers=8) as pool:  # file opens overlap (network storage)
        ok = list(pool.map(lambda f: _check_image(f, verify), files, chunksize=64))
      self.rejected = [f for f, good in zip(files, ok) if not good]
    if self.rejected:
      bad = set(self.rejected)
      files = [f for f in files if f not in bad]
      n = len(files) + len(bad)
      if not files:
        raise ValueError(f"image folder {self.path} has no readable image ({n} unreadable, first: "
                         f"{self.rejected[0]})")
      if len(bad) > max_bad_fraction * n:
        raise ValueError(f"unreadable image {self.rejected[0]}: {len(bad)} of {n} images in {self.path} "
                         f"fail the {verify} check, more than max_bad_fraction={max_bad_fraction}")
      warnings.warn(f"image folder {self.path}: {len(bad)} of {n} images fail the {verify} check and are "
                    f"left out (first: {self.rejected[0]})", RuntimeWarning, stacklevel=2)
    self.files = files

  def _read_metadata(self, metadata: list[str], files: set[str]) -> dict[str, str]:
    caps: dict[str, str] = {}
    for jsonl in metadata:
      base = os.path.dirname(jsonl)
      with open(jsonl, "rb") as fh:
        n = 0
        while True:
          line = fh.readline(METADATA_LINE_MAX_BYTES + 1)
          if not line:
            break
          n += 1
          if len(line) > METADATA_LINE_MAX_BYTES:
            raise ValueError(f"{jsonl}:{n}: line longer than {METADATA_LINE_MAX_BYTES} bytes")
          if not line.strip():
            continue
          name, text = self._record(jsonl, n, line)
          if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
            raise ValueError(f"{jsonl}:{n}: image name {name!r} is outside the folder (absolute or with '..')")
          f = os.path.normpath(os.path.join(base, name))
          if f in files:
            caps[f] = _truncate_utf8(text.encode("utf-8"), CAPTION_MAX_BYTES)
    return caps

  def _record(self, jsonl: str, n: int, line: bytes) -> tuple[str, str]:
    try:
      rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
      rec = None
    if not isinstance(rec, dict):
      raise ValueError(f"{jsonl}:{n}: expected a JSON object with 'file_name' and a caption")
    name = next((rec[k] for k in ("file_name", "file", "image") if k in rec), None)
    if not isinstance(name, str):
      raise ValueError(f"{jsonl}:{n}: no image name ('file_name') in {sorted(rec)}")
    keys = (self.caption_key,) if self.caption_key else ("text", "caption")
    text = next((rec[k] for k in keys if k in rec), None)
    if text is None:
      what = (f"caption column {self.caption_key!r} (data.caption_key)" if self.caption_key
              else "'text' or 'caption'")
      raise ValueError(f"{jsonl}:{n}: no {what}; columns are {sorted(rec)}")
    return name, str(text)

  def __len__(self) -> int:
    return len(self.files)

  def caption(self, i: int) -> str:
    """The caption of example ``i`` (metadata, else sidecar ``.txt``, else empty)."""
    f = self.files[int(i)]
    if f in self.captions:
      return self.captions[f]
    side = os.path.splitext(f)[0] + ".txt"
    if os.path.isfile(side) and _inside(os.path.realpath(side), self.root):
      with open(side, "rb") as fh:
        return _truncate_utf8(fh.read(CAPTION_MAX_BYTES + 1), CAPTION_MAX_BYTES).strip()
    return ""

  def __getitem__(self, i: int) -> dict[str, Any]:
    from PIL import Image
    f = self.files[int(i)]
    if not _inside(os.path.realpath(f), self.root):
      raise UnreadableExample(f, "now links outside the folder")
    try:
      with Image.open(f) as im:
        im = im.convert("L" if self.channels == 1 else "RGB")
        image = np.asarray(im, np.uint8)
    except Exception as e:  # PIL raises many types for broken files
      raise UnreadableExample(f, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if image.ndim == 2:
      image = image[:, :, None]
    return {"image": image, "label": -1, "caption": self.caption(i), "path": f}


def _check_image(path: str, mode: str) -> bool:
  from PIL import Image
  try:
    with Image.open(path) as im:
      if mode == "full":
        im.load()
      return im.size[0] > 0 and im.size[1] > 0
  except Exception:  # PIL raises many types for broken files
    return False
