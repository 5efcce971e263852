"""Training input through tensorflow-datasets and grain, with no TensorFlow at run time.

* :mod:`jdiff.data.digits`: the bundled default dataset (scikit-learn's digits, 32x32, captions);
* :func:`tfds_source`: any TFDS dataset prepared as array_record, by name and ``data_dir``;
* :class:`ImageFolder`: a folder of images with sidecar ``.txt`` captions or ``captions.jsonl``;
* :class:`Loader`: deterministic, checkpointable, host-sharded batches of any of them.

Example:
  >>> from jdiff import data
  >>> loader = data.Loader(data.tfds_source("jdiff_digits", data_dir=d), batch_size=64, seed=0)
"""

from jdiff.data import digits
from jdiff.data.loader import Loader, resize, to_float
from jdiff.data.sources import ImageFolder, TfdsSource, tfds_source

__all__ = ["digits", "Loader", "ImageFolder", "TfdsSource", "tfds_source", "resize", "to_float",
           "make_source"]


def make_source(*, kind: str, name: str = "jdiff_digits", data_dir: str | None = None, split: str = "train",
                path: str | None = None, image_key: str = "image", label_key: str | None = "label",
                caption_key: str | None = "caption", channels: int = 3):
  """Opens the source a data config names: ``kind`` is "tfds" (name, data_dir, split, keys) or
  "folder" (path).

  Example:
    >>> src = make_source(kind="tfds", name="jdiff_digits", data_dir="/tmp/tfds")
  """
  if kind == "tfds":
    return tfds_source(name, data_dir=data_dir, split=split, image_key=image_key, label_key=label_key,
                       caption_key=caption_key)
  if kind == "folder":
    if not path:
      raise ValueError("data.kind='folder' needs data.path")
    return ImageFolder(path, channels=channels)
  raise ValueError(f"unknown data.kind {kind!r}; expected 'tfds' or 'folder'")
