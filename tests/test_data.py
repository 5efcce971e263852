"""Data: the bundled digits TFDS dataset, TFDS by name, image folders, and the grain loader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jdiff import data
from jdiff.data import digits


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def digits_source(digits_dir):
  return data.tfds_source("jdiff_digits", data_dir=digits_dir)


class ArraySource:
  """An in-memory source whose image encodes the example index (to follow the order)."""

  def __init__(self, n: int):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    img = np.full((4, 4, 1), i % 256, np.uint8)
    img[0, 0, 0] = i // 256
    return {"image": img, "label": i, "caption": f"item {i}"}


def _ids(batch):
  pix = np.round((batch["image"] + 1.0) * 127.5).astype(np.int64)
  return pix[:, 0, 0, 0] * 256 + pix[:, 1, 1, 0]


def test_digits_dataset_matches_sklearn(digits_source):
  from sklearn.datasets import load_digits
  d = load_digits()
  assert len(digits_source) == 1797
  counts = np.zeros(10, np.int64)
  sums = np.zeros(10, np.float64)
  for i in range(len(digits_source)):
    ex = digits_source[i]
    assert ex["image"].shape == (32, 32, 1) and ex["image"].dtype == np.uint8
    assert ex["caption"] == f"a handwritten digit {digits.NUMBER_WORDS[ex['label']]}"
    counts[ex["label"]] += 1
    sums[ex["label"]] += ex["image"].astype(np.float64).sum()
  np.testing.assert_array_equal(counts, np.bincount(d.target, minlength=10))
  # Total ink per class equals the upscaled sklearn images of that class (order-free check).
  ref = digits.upscale(d.images, 32).astype(np.float64).sum(axis=(1, 2, 3))
  np.testing.assert_allclose(sums, np.bincount(d.target, weights=ref, minlength=10))


def test_digits_caption_words():
  assert digits.caption_for(7) == "a handwritten digit seven"
  assert digits.caption_for(0) == "a handwritten digit zero"
  assert digits.captions_for(3) == ("a handwritten digit three", "a handwritten digit 3")


def test_upscale_preserves_area_means():
  from sklearn.datasets import load_digits
  imgs = load_digits().images[:50]
  big = digits.upscale(imgs, 32).astype(np.float64) * (16.0 / 255.0)  # back to the 0..16 range
  small = big[..., 0].reshape(50, 8, 4, 8, 4).mean(axis=(2, 4))
  # bilinear up + area down blurs but keeps each image's mean ink and its pattern.
  np.testing.assert_allclose(small.mean(axis=(1, 2)), imgs.mean(axis=(1, 2)), rtol=0.05)
  assert np.corrcoef(small.ravel(), imgs.ravel())[0, 1] > 0.97


def test_tfds_by_name_reopens_without_builder_code(digits_dir, digits_source):
  import tensorflow_datasets as tfds
  ds = tfds.data_source("jdiff_digits", split="train", data_dir=digits_dir)
  src = data.TfdsSource(ds, image_key="image", label_key="label", caption_key=None)
  ex = src[3]
  np.testing.assert_array_equal(ex["image"], digits_source[3]["image"])
  assert ex["caption"] == ""


def test_missing_tfds_dataset_is_one_line(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    data.tfds_source("no_such_dataset_xyz", data_dir=str(tmp_path))
  msg = str(e.value)
  assert "no_such_dataset_xyz" in msg and "\n" not in msg


def test_missing_tfds_feature_is_one_line(digits_dir, digits_source):
  with pytest.raises(ValueError) as e:
    data.tfds_source("jdiff_digits", data_dir=digits_dir, caption_key="text")
  msg = str(e.value)
  assert "'text'" in msg and "caption_key" in msg and "'caption'" in msg and "\n" not in msg
  assert data.tfds_source("jdiff_digits", data_dir=digits_dir, label_key="digit")[0]["label"] == -1


def test_loader_epochs_are_permutations_and_deterministic():
  src = ArraySource(20)
  a = data.Loader(src, batch_size=5, seed=3, shard_index=0, shard_count=1)
  b = data.Loader(src, batch_size=5, seed=3, shard_index=0, shard_count=1)
  c = data.Loader(src, batch_size=5, seed=4, shard_index=0, shard_count=1)
  ids_a = np.concatenate([_ids(next(a)) for _ in range(8)])
  ids_b = np.concatenate([_ids(next(b)) for _ in range(8)])
  ids_c = np.concatenate([_ids(next(c)) for _ in range(8)])
  np.testing.assert_array_equal(ids_a, ids_b)
  assert not np.array_equal(ids_a, ids_c)
  for epoch in ids_a.reshape(2, 20):
    np.testing.assert_array_equal(np.sort(epoch), np.arange(20))
  assert not np.array_equal(ids_a[:20], ids_a[20:])  # a new permutation each epoch


def test_loader_state_resumes_exactly():
  src = ArraySource(30)
  a = data.Loader(src, batch_size=4, seed=0, shard_index=0, shard_count=1)
  for _ in range(9):  # crosses an epoch boundary
    next(a)
  state = json.loads(json.dumps(a.get_state()))  # survives JSON (as in checkpoints)
  expected = [_ids(next(a)) for _ in range(5)]
  b = data.Loader(src, batch_size=4, seed=0, shard_index=0, shard_count=1)
  b.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(_ids(next(b)), e)


def test_loader_host_shards_are_disjoint():
  src = ArraySource(24)
  shards = [data.Loader(src, batch_size=8, seed=1, shard_index=i, shard_count=2) for i in range(2)]
  seen = [np.concatenate([_ids(next(s)) for _ in range(3)]) for s in shards]
  assert all(s.shape == (12,) for s in seen)
  assert not set(seen[0]) & set(seen[1])
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(24))


def test_loader_tokens_labels_and_range(digits_source):
  loader = data.Loader(digits_source, batch_size=6, seed=0, shard_index=0, shard_count=1,
                       channels=3, image_size=16, tokenize=lambda c: np.frombuffer(c.encode()[:4], np.uint8))
  b = next(loader)
  assert b["image"].shape == (6, 16, 16, 3) and b["image"].dtype == np.float32
  assert b["image"].min() >= -1.0 and b["image"].max() <= 1.0
  np.testing.assert_array_equal(b["image"][..., 0], b["image"][..., 2])  # gray -> RGB repeats
  assert b["label"].dtype == np.int32
  np.testing.assert_array_equal(b["tokens"], np.tile(np.frombuffer(b"a ha", np.uint8), (6, 1)))


def test_to_float_and_resize():
  img = np.arange(16, dtype=np.uint8).reshape(4, 4, 1) * 17
  np.testing.assert_allclose(data.to_float(img), img.astype(np.float64) / 127.5 - 1.0, atol=1e-6)
  wide = np.zeros((4, 8, 3), np.uint8)
  wide[:, 2:6] = 200  # the centre square survives a center crop
  out = data.resize(wide, 4)
  assert out.shape == (4, 4, 3) and (out == 200).all()


def _png(path, value, size=(6, 5)):
  from PIL import Image
  Image.fromarray(np.full(size + (3,), value, np.uint8)).save(path)


def test_image_folder_captions(tmp_path):
  _png(tmp_path / "a.png", 10)
  (tmp_path / "a.txt").write_text("a red square\n")
  (tmp_path / "sub").mkdir()
  _png(tmp_path / "sub" / "b.png", 20)
  _png(tmp_path / "c.png", 30)
  (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "sub/b.png", "text": "blue"}) + "\n")
  src = data.ImageFolder(tmp_path, channels=3)
  got = {int(src[i]["image"][0, 0, 0]): src[i]["caption"] for i in range(len(src))}
  assert got == {10: "a red square", 20: "blue", 30: ""}
  assert src[0]["image"].shape == (6, 5, 3)


def test_image_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.ImageFolder(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="no images"):
    data.ImageFolder(tmp_path)
  _png(tmp_path / "ok.png", 1)
  (tmp_path / "broken.png").write_bytes(b"not a png at all")
  with pytest.raises(ValueError) as e:
    data.ImageFolder(tmp_path)
  assert str(tmp_path / "broken.png") in str(e.value) and "\n" not in str(e.value)
