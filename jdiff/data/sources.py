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
from typing import Any

import numpy as np

__all__ = ["TfdsSource", "tfds_source", "ImageFolder", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


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
    if self.image_key not in ex:
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
  return TfdsSource(ds, image_key=image_key, label_key=label_key, caption_key=caption_key)


class ImageFolder:
  """Images in a folder (recursively), each with a caption.

  Captions come from ``captions.jsonl`` in the folder (lines ``{"file": "a.png", "text": "..."}``,
  ``file`` relative to the folder; ``image``/``file_name`` and ``caption``/``text`` keys are
  accepted) or, failing that, from a sidecar ``a.txt`` next to ``a.png``; images without either get
  an empty caption. Every image is opened once at construction so an unreadable one is reported by
  path before training starts. Labels are -1.

  Raises:
    FileNotFoundError: the folder does not exist or holds no images.
    ValueError: some images cannot be decoded (the message names them).

  Example:
    >>> src = ImageFolder("data/pokemon", channels=3)
  """

  def __init__(self, path: str | os.PathLike, *, channels: int = 3, verify: bool = True):
    from PIL import Image
    self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.isdir(self.path):
      raise FileNotFoundError(f"image folder {self.path} does not exist")
    files = []
    for root, _, names in os.walk(self.path):
      files += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    self.files = sorted(files)
    if not self.files:
      raise FileNotFoundError(f"image folder {self.path} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    self.channels = channels
    self.captions = self._read_captions()
    if verify:
      bad = []
      for f in self.files:
        try:
          with Image.open(f) as im:
            im.load()
        except Exception:  # PIL raises many types for broken files
          bad.append(f)
      if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise ValueError(f"unreadable image {bad[0]}{more} in image folder {self.path}")

  def _read_captions(self) -> dict[str, str]:
    caps: dict[str, str] = {}
    jsonl = os.path.join(self.path, "captions.jsonl")
    if os.path.exists(jsonl):
      with open(jsonl, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
          if not line.strip():
            continue
          try:
            rec = json.loads(line)
            name = rec.get("file", rec.get("image", rec.get("file_name")))
            text = rec.get("text", rec.get("caption"))
            if name is None or text is None:
              raise KeyError("file/text")
          except (json.JSONDecodeError, KeyError, AttributeError):
            raise ValueError(f"{jsonl}:{n}: expected a JSON object with 'file' and 'text'") from None
          caps[os.path.normpath(os.path.join(self.path, name))] = str(text)
    for f in self.files:
      if f not in caps:
        side = os.path.splitext(f)[0] + ".txt"
        if os.path.exists(side):
          with open(side, encoding="utf-8") as fh:
            caps[f] = fh.read().strip()
    return caps

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i: int) -> dict[str, Any]:
    from PIL import Image
    f = self.files[int(i)]
    try:
      with Image.open(f) as im:
        im = im.convert("L" if self.channels == 1 else "RGB")
        image = np.asarray(im, np.uint8)
    except Exception as e:
      raise ValueError(f"unreadable image {f}: {e}") from None
    if image.ndim == 2:
      image = image[:, :, None]
    return {"image": image, "label": -1, "caption": self.captions.get(f, "")}
