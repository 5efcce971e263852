"""Training input through tensorflow-datasets and grain, with no TensorFlow at run time.

* :mod:`jdiff.data.digits`: the bundled default dataset (scikit-learn's digits, 32x32, captions);
* :func:`tfds_source`: any TFDS dataset prepared as array_record, by name and ``data_dir``;
* :class:`ImageFolder`: a folder of images with ``metadata.jsonl`` / ``captions.jsonl`` or sidecar
  ``.txt`` captions;
* :mod:`jdiff.data.transforms`: resize + center/random crop + flip, recorded per example;
* :func:`precompute` / :class:`PrecomputedSource`: frozen encoders' outputs stored once as array_record;
* :class:`Loader`: deterministic, checkpointable, host-sharded batches of any of them, replacing
  unreadable examples.

Example:
  >>> from jdiff import data
  >>> loader = data.Loader(data.tfds_source("jdiff_digits", data_dir=d), batch_size=64, seed=0)
"""

from jdiff.data import digits, transforms
from jdiff.data.loader import Loader, Preprocess, resize, to_float
from jdiff.data.precompute import PrecomputedSource, precompute, sample_latents
from jdiff.data.sources import ImageFolder, TfdsSource, UnreadableExample, tfds_source
from jdiff.data.transforms import check_resolution, crop_and_flip, example_rng

__all__ = ["digits", "transforms", "Loader", "Preprocess", "ImageFolder", "TfdsSource", "UnreadableExample",
           "tfds_source", "resize", "to_float", "make_source", "check_resolution", "crop_and_flip",
           "example_rng", "precompute", "PrecomputedSource", "sample_latents"]


def make_source(*, kind: str, name: str = "jdiff_digits", data_dir: str | None = None, split: str = "train",
                path: str | None = None, image_key: str = "image", label_key: str | None = "label",
                caption_key: str | None = "caption", channels: int = 3, verify: str = "header",
                max_bad_fraction: float = 0.01):
  """Opens the source a data config names: ``kind`` is "tfds" (name, data_dir, split, keys),
  "folder" (path; ``caption_key`` is the metadata.jsonl caption column, ``verify`` the build-time
  check) or "precomputed" (path written by :func:`precompute`).

  Example:
    >>> src = make_source(kind="tfds", name="jdiff_digits", data_dir="/tmp/tfds")
    >>> src = make_source(kind="folder", path="photos/", caption_key="text")
  """
  if kind == "tfds":
    return tfds_source(name, data_dir=data_dir, split=split, image_key=image_key, label_key=label_key,
                       caption_key=caption_key)
  if kind in ("folder", "precomputed") and not path:
    raise ValueError(f"data.kind={kind!r} needs data.path")
  if kind == "folder":
    return ImageFolder(path, channels=channels, caption_key=caption_key, verify=verify,
                       max_bad_fraction=max_bad_fraction)
  if kind == "precomputed":
    return PrecomputedSource(path)
  raise ValueError(f"unknown data.kind {kind!r}; expected 'tfds', 'folder' or 'precomputed'")
