"""The bundled default dataset: scikit-learn's handwritten digits as a TFDS dataset.

scikit-learn ships 1,797 8x8 grayscale digits (values 0..16) inside its wheel, so this builder
needs no download. Each image is upscaled to ``size`` x ``size`` (bilinear, 32 by default) and
stored as an 8-bit grayscale PNG together with its label and a caption such as
"a handwritten digit seven". The dataset is written in the ``array_record`` format and read back with ``tfds.data_source`` (random
access), which needs neither TensorFlow nor a network: PNG encoding/decoding goes through PIL.

Example:
  >>> source = digits.load(data_dir="~/tensorflow_datasets")["train"]
  >>> source[0]["caption"]
  b'a handwritten digit zero'
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

__all__ = ["JdiffDigits", "NUMBER_WORDS", "caption_for", "captions_for", "upscale", "prepare", "load"]

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def caption_for(label: int, *, numeral: bool = False) -> str:
  """The caption of a digit: ``caption_for(7) == "a handwritten digit seven"``,
  ``caption_for(7, numeral=True) == "a handwritten digit 7"``."""
  return f"a handwritten digit {int(label) if numeral else NUMBER_WORDS[int(label)]}"


def captions_for(label: int) -> tuple[str, str]:
  """Both spellings of a digit's caption: (number word, numeral). The dataset trains the first;
  vocabularies learned from captions (``jdiff.ldm.bpe_tokenizer``) cover both."""
  return caption_for(label), caption_for(label, numeral=True)


def upscale(images8: np.ndarray, size: int = 32) -> np.ndarray:
  """8x8 digits with values 0..16 [N, 8, 8] -> uint8 [N, size, size, 1] (bilinear, via PIL)."""
  from PIL import Image
  out = np.empty((images8.shape[0], size, size, 1), np.uint8)
  for i, im in enumerate(np.asarray(images8, np.float64)):
    pil = Image.fromarray(np.clip(im * (255.0 / 16.0), 0, 255).astype(np.float32), mode="F")
    big = np.asarray(pil.resize((size, size), Image.BILINEAR), np.float64)
    out[i, :, :, 0] = np.clip(np.round(big), 0, 255).astype(np.uint8)
  return out


class JdiffDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's digits, upscaled, with captions and labels (one "train" split)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  SIZE = 32

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="scikit-learn handwritten digits (UCI optdigits test set), upscaled to 32x32.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(self.SIZE, self.SIZE, 1), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=list(NUMBER_WORDS)),
            "caption": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the data ships with scikit-learn
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    from PIL import Image
    from sklearn.datasets import load_digits
    d = load_digits()
    images = upscale(d.images, self.SIZE)
    for i, (img, label) in enumerate(zip(images, d.target)):
      # A PIL image is PNG-encoded by PIL, so building the dataset needs no TensorFlow.
      yield i, {"image": Image.fromarray(img[:, :, 0], mode="L"), "label": int(label),
                "caption": caption_for(int(label))}


def prepare(data_dir: str | os.PathLike) -> str:
  """Builds the dataset under ``data_dir`` if it is not there yet; returns the data_dir."""
  data_dir = os.path.expanduser(os.fspath(data_dir))
  builder = JdiffDigits(data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
  return data_dir


def load(data_dir: str | os.PathLike):
  """Prepares (once) and opens the dataset: ``{"train": random-access source}``."""
  data_dir = prepare(data_dir)
  return JdiffDigits(data_dir=data_dir, file_format="array_record").as_data_source()
