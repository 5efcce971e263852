"""The loader with unreadable examples (replacement, counting, limit, processes, resume) and the
fine-tuning crop/flip preprocessing."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from jdiff import data
from jdiff.data import transforms


class FlakySource:
  """In-memory examples whose image and label encode the index; indices in ``bad`` are unreadable."""

  def __init__(self, n: int, bad=(), size=(4, 4)):
    self.n, self.bad, self.size = n, set(bad), size

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if i in self.bad:
      raise data.UnreadableExample(f"/data/img{i}.png", "truncated")
    img = np.full(self.size + (1,), i % 256, np.uint8)
    img[0, 0, 0] = i // 256
    return {"image": img, "label": i, "caption": f"item {i}"}


def _take(loader, steps):
  return [next(loader)["label"] for _ in range(steps)]


def _slices(n, batch, count, steps, seed=3, bad=()):
  out = []
  for k in range(count):
    loader = data.Loader(FlakySource(n, bad), batch_size=batch, seed=seed, shard_index=k, shard_count=count,
                         max_bad_fraction=0.5)
    out.append(np.stack(_take(loader, steps)))  # [steps, local batch]
  return out


def test_unreadable_examples_are_replaced_within_the_process_slice(caplog):
  n, batch, count, steps = 24, 8, 2, 9  # three epochs
  clean = _slices(n, batch, count, steps)
  bad = {int(clean[0][0, 3]), int(clean[0][0, 2]), int(clean[1][1, 3])}  # a run of two, one at a block end
  with caplog.at_level(logging.WARNING, logger="jdiff.data"):
    dirty = _slices(n, batch, count, steps, bad=bad)
  for k in range(count):
    c, d = clean[k], dirty[k]
    assert d.shape == c.shape
    stream = c.reshape(-1)  # this process's slice of the example stream, in order
    for pos, (want, got) in enumerate(zip(stream, d.reshape(-1))):
      if want in bad:  # the next readable example of the same slice
        nxt = next(x for x in stream[pos + 1:] if x not in bad)
        assert got == nxt
      else:  # everything else (and so the other process's reads) unchanged
        assert got == want
  assert not set(dirty[0].ravel()) & bad and not set(dirty[1].ravel()) & bad
  assert "/data/img" in caplog.text


def test_bad_example_counter_limit_and_messages():
  n = 100
  bad = {5, 50, 77}
  loader = data.Loader(FlakySource(n, bad), batch_size=10, seed=0, shard_index=0, shard_count=1,
                       max_bad_fraction=0.03)
  _take(loader, 20)  # two epochs at 3 (the limit) each
  assert loader.bad_examples == 6 and loader.metrics() == {"data/bad_examples": 6}
  strict = data.Loader(FlakySource(n, bad), batch_size=10, seed=0, shard_index=0, shard_count=1,
                       max_bad_fraction=0.02)
  with pytest.raises(ValueError) as e:
    _take(strict, 10)
  msg = str(e.value)
  assert "max_bad_fraction=0.02" in msg and "/data/img" in msg and "\n" not in msg
  assert strict.bad_examples == 3


def test_resume_with_unreadable_examples_is_identical():
  n, bad = 30, {1, 2, 17, 28}
  def make():
    return data.Loader(FlakySource(n, bad), batch_size=6, seed=1, shard_index=1, shard_count=2,
                       max_bad_fraction=0.5, crop="random", flip=True, image_size=3)
  a = make()
  for _ in range(7):  # crosses epoch boundaries
    next(a)
  state = json.loads(json.dumps(a.get_state()))
  expected = [next(a) for _ in range(6)]
  b = make()
  b.set_state(state)
  assert b.bad_examples == state["jdiff_bad_examples"][0] > 0
  for e in expected:
    got = next(b)
    assert set(got) == set(e)
    for k in e:
      np.testing.assert_array_equal(got[k], e[k])
  assert b.bad_examples == a.bad_examples


def test_all_unreadable_slice_is_one_line():
  loader = data.Loader(FlakySource(8, bad=range(8)), batch_size=4, seed=0, shard_index=0, shard_count=1,
                       max_bad_fraction=1.0)
  with pytest.raises(ValueError) as e:
    next(loader)
  assert "no readable example" in str(e.value) and "\n" not in str(e.value)


def test_real_folder_with_bad_files_trains_through(tmp_path):
  from PIL import Image
  for k in range(10):
    Image.fromarray(np.full((8, 8, 3), 10 * k, np.uint8)).save(tmp_path / f"{k}.png")
  raw = (tmp_path / "3.png").read_bytes()
  (tmp_path / "3.png").write_bytes(raw[:40])  # truncated after the header
  (tmp_path / "4.png").write_bytes(b"garbage")
  src = data.ImageFolder(tmp_path, verify="none")
  loader = data.Loader(src, batch_size=5, seed=0, shard_index=0, shard_count=1, max_bad_fraction=0.2)
  values = np.concatenate([np.round((next(loader)["image"][:, 0, 0, 0] + 1) * 127.5) for _ in range(4)])
  assert loader.bad_examples == 4 and not {30, 40} & set(values.astype(int))


def test_crop_and_flip_against_numpy():
  img = np.arange(8 * 12 * 3, dtype=np.uint8).reshape(8, 12, 3)  # shorter side 8: no resampling
  c = transforms.crop_and_flip(img, 8, crop="center")
  assert c.original_size == (8, 12) and c.crop_top_left == (0, 2) and not c.flipped
  np.testing.assert_array_equal(c.image, img[:, 2:10])
  lefts, flips = set(), set()
  for k in range(64):
    c = transforms.crop_and_flip(img, 8, crop="random", flip=True, rng=transforms.example_rng(0, k, 0))
    top, left = c.crop_top_left
    ref = (img[:, ::-1] if c.flipped else img)[top:top + 8, left:left + 8]
    np.testing.assert_array_equal(c.image, ref)
    lefts.add(left)
    flips.add(c.flipped)
  assert lefts == set(range(5)) and flips == {False, True}
  tall = np.zeros((24, 16, 1), np.uint8)
  c = transforms.crop_and_flip(tall, 8, crop="center")
  assert c.image.shape == (8, 8, 1) and c.original_size == (24, 16) and c.crop_top_left == (2, 0)


def test_crop_is_a_function_of_seed_index_epoch():
  n = 12
  def run(seed):
    loader = data.Loader(FlakySource(n, size=(6, 9)), batch_size=4, seed=seed, shard_index=0, shard_count=1,
                         image_size=4, crop="random", flip=True)
    return [next(loader) for _ in range(6)]  # two epochs
  for step, b in enumerate(run(5)):
    assert b["image"].shape == (4, 4, 4, 1)
    assert b["crops_coords_top_left"].dtype == np.int32 and b["original_size"].dtype == np.int32
    np.testing.assert_array_equal(b["original_size"], np.tile([6, 9], (4, 1)))
    epoch = step * 4 // n
    for i, tl in zip(b["label"], b["crops_coords_top_left"]):
      ex = FlakySource(n, size=(6, 9))[int(i)]["image"]
      want = transforms.crop_and_flip(ex, 4, crop="random", flip=True, rng=transforms.example_rng(5, int(i), epoch))
      assert tuple(tl) == want.crop_top_left
  again = run(5)
  for x, y in zip(run(5), again):
    np.testing.assert_array_equal(x["crops_coords_top_left"], y["crops_coords_top_left"])


def test_check_resolution_and_bad_options():
  assert data.check_resolution(512, 8) == 512
  for res, f in [(500, 8), (0, 8), (64, 0)]:
    with pytest.raises(ValueError) as e:
      data.check_resolution(res, f)
    assert str(res) in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(ValueError, match="crop"):
    data.Loader(FlakySource(8), batch_size=4, shard_index=0, shard_count=1, image_size=4, crop="left")
  with pytest.raises(ValueError, match="image_size"):
    data.Loader(FlakySource(8), batch_size=4, shard_index=0, shard_count=1, crop="random")


def test_large_folder_with_one_percent_corrupt_files(tmp_path):
  """2,000 images, 1% truncated after the header (they pass the cheap build-time check): an epoch
  goes through at a 1% limit with every one counted, and stops at a 0.5% limit with one line."""
  from PIL import Image
  n, bad = 2000, set(range(7, 2000, 100))
  for k in range(n):
    Image.fromarray(np.full((4, 4, 1), k % 251, np.uint8)[:, :, 0]).save(tmp_path / f"{k:04d}.png")
  for k in bad:
    raw = (tmp_path / f"{k:04d}.png").read_bytes()
    (tmp_path / f"{k:04d}.png").write_bytes(raw[:raw.index(b"IDAT") + 6])  # cut inside the pixel data
  src = data.ImageFolder(tmp_path)  # header check: all 2,000 pass
  assert len(src) == n and not src.rejected
  loader = data.Loader(src, batch_size=50, seed=0, shard_index=0, shard_count=1, max_bad_fraction=0.01)
  for _ in range(n // 50):
    assert next(loader)["image"].shape == (50, 4, 4, 3)
  assert loader.metrics()["data/bad_examples"] == len(bad) == 20
  strict = data.Loader(src, batch_size=50, seed=0, shard_index=0, shard_count=1, max_bad_fraction=0.005)
  with pytest.raises(ValueError) as e:
    for _ in range(n // 50):
      next(strict)
  assert "max_bad_fraction=0.005" in str(e.value) and "\n" not in str(e.value)
  assert strict.bad_examples == 11
