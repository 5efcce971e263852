"""Image folders: metadata.jsonl captions, hostile files (escaping names, outside links, huge
captions), build-time checks and unreadable images, on real files in tmp_path."""

from __future__ import annotations

import json
import os
import tracemalloc

import numpy as np
import pytest

from jdiff import data
from jdiff.data import sources


def _png(path, value, size=(6, 5)):
  from PIL import Image
  Image.fromarray(np.full(size + (3,), value, np.uint8)).save(path)


def _truncated_png(path, value=7):
  _png(path, value, size=(64, 64))
  raw = open(path, "rb").read()
  with open(path, "wb") as fh:
    fh.write(raw[:len(raw) // 2])  # the header survives, the pixel data does not


def _captions(src):
  return {int(src[i]["image"][0, 0, 0]): src[i]["caption"] for i in range(len(src))}


def _jsonl(path, *records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_metadata_jsonl_captions(tmp_path):
  _png(tmp_path / "a.png", 10)
  _png(tmp_path / "b.png", 20)
  (tmp_path / "b.txt").write_text("sidecar loses to metadata")
  _png(tmp_path / "c.png", 30)
  (tmp_path / "c.txt").write_text("  from the sidecar \n")
  _png(tmp_path / "d.png", 40)
  (tmp_path / "sub").mkdir()
  _png(tmp_path / "sub" / "e.png", 50)
  _jsonl(tmp_path / "metadata.jsonl", {"file_name": "a.png", "text": "first", "score": 3.5},
         {"file_name": "b.png", "text": "second", "tags": ["x"]})
  _jsonl(tmp_path / "sub" / "metadata.jsonl", {"file_name": "e.png", "text": "in a subfolder"})
  src = data.ImageFolder(tmp_path)
  assert _captions(src) == {10: "first", 20: "second", 30: "from the sidecar", 40: "", 50: "in a subfolder"}
  assert data.ImageFolder(tmp_path, caption_key="text").captions == src.captions


def test_missing_caption_column_is_one_line(tmp_path):
  _png(tmp_path / "a.png", 10)
  _jsonl(tmp_path / "metadata.jsonl", {"file_name": "a.png", "text": "a"})
  with pytest.raises(ValueError) as e:
    data.ImageFolder(tmp_path, caption_key="caption")
  msg = str(e.value)
  assert "'caption'" in msg and "metadata.jsonl:1" in msg and "file_name" in msg and "\n" not in msg
  with pytest.raises(ValueError, match="caption_key"):
    data.make_source(kind="folder", path=str(tmp_path), caption_key="prompt")


@pytest.mark.parametrize("name", ["../outside.png", "sub/../../outside.png", "/etc/passwd", "sub/../a.png"])
def test_escaping_file_name_is_refused(tmp_path, name):
  folder = tmp_path / "folder"
  folder.mkdir()
  _png(tmp_path / "outside.png", 1)
  _png(folder / "a.png", 10)
  _jsonl(folder / "metadata.jsonl", {"file_name": "a.png", "text": "ok"}, {"file_name": name, "text": "x"})
  with pytest.raises(ValueError) as e:
    data.ImageFolder(folder)
  msg = str(e.value)
  assert "metadata.jsonl:2" in msg and repr(name) in msg and "\n" not in msg


def test_symlinks_out_of_the_folder_are_not_followed(tmp_path):
  folder, outside = tmp_path / "folder", tmp_path / "outside"
  folder.mkdir()
  outside.mkdir()
  _png(outside / "secret.png", 99)
  _png(outside / "deep.png", 98)
  _png(folder / "a.png", 10)
  os.symlink(outside / "secret.png", folder / "link_out.png")
  os.symlink(folder / "a.png", folder / "link_in.png")  # inside the folder: followed
  os.symlink(outside, folder / "linked_dir")  # a linked folder is not walked
  os.symlink(outside / "secret.txt", folder / "a.txt")  # a sidecar link out is not read
  (outside / "secret.txt").write_text("do not read")
  _jsonl(outside / "meta.jsonl", {"file_name": "a.png", "text": "do not read either"})
  os.symlink(outside / "meta.jsonl", folder / "metadata.jsonl")
  with pytest.warns(RuntimeWarning, match="link_out.png"):
    src = data.ImageFolder(folder)
  assert [os.path.basename(f) for f in src.files] == ["a.png", "link_in.png"]
  assert {int(src[i]["image"][0, 0, 0]) for i in range(len(src))} == {10}
  assert src.caption(0) == ""
  # Only links out: no image left.
  os.remove(folder / "a.png")
  os.remove(folder / "link_in.png")
  with pytest.warns(RuntimeWarning), pytest.raises(FileNotFoundError, match="no images"):
    data.ImageFolder(folder)


def test_huge_captions_are_capped(tmp_path):
  from jdiff.tokenizers import ByteTokenizer
  cap = sources.CAPTION_MAX_BYTES
  _png(tmp_path / "a.png", 10)
  with open(tmp_path / "a.txt", "wb") as fh:  # 32 MB sidecar
    fh.write(b"cat " * (8 << 20))
  _png(tmp_path / "b.png", 20)
  _png(tmp_path / "c.png", 30)
  long_text = "\u00e9" * (3 * cap)  # 2-byte characters: the cut falls inside one on odd limits
  _jsonl(tmp_path / "metadata.jsonl", {"file_name": "b.png", "text": long_text})
  src = data.ImageFolder(tmp_path)
  tracemalloc.start()
  caption = src.caption(0)
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert peak < 8 * cap  # the sidecar is read up to the cap, not whole
  assert caption == ("cat " * (cap // 4)).strip()
  b = src.captions[src.files[1]]
  assert len(b.encode("utf-8")) <= cap and b == long_text[:len(b)] and len(b) == cap // 2
  tokens = ByteTokenizer(77)(caption)
  assert tokens.shape == (1, 77)  # the tokenizer, not the file, decides the length
  # A metadata line beyond the line limit is refused (one line), before any JSON parsing.
  with open(tmp_path / "metadata.jsonl", "w") as fh:
    fh.write(json.dumps({"file_name": "c.png", "text": "x" * (sources.METADATA_LINE_MAX_BYTES + 10)}) + "\n")
  with pytest.raises(ValueError) as e:
    data.ImageFolder(tmp_path)
  assert "metadata.jsonl:1" in str(e.value) and "longer than" in str(e.value) and "\n" not in str(e.value)


def test_build_time_checks_and_unreadable_images(tmp_path):
  for k in range(8):
    _png(tmp_path / f"good{k}.png", 10 + k)
  _truncated_png(tmp_path / "truncated.png")
  (tmp_path / "text.png").write_bytes(b"not an image at all")
  # "header" (the default) rejects the non-image but not the truncated file (its header is intact).
  with pytest.warns(RuntimeWarning, match="text.png"):
    src = data.ImageFolder(tmp_path, max_bad_fraction=0.2)
  assert src.rejected == [str(tmp_path / "text.png")] and len(src) == 9
  i = src.files.index(str(tmp_path / "truncated.png"))
  with pytest.raises(data.UnreadableExample) as e:
    src[i]
  assert e.value.path == str(tmp_path / "truncated.png") and "\n" not in str(e.value)
  # "full" decodes and rejects both; "none" opens nothing.
  with pytest.warns(RuntimeWarning):
    assert len(data.ImageFolder(tmp_path, verify="full", max_bad_fraction=0.25)) == 8
  assert len(data.ImageFolder(tmp_path, verify="none")) == 10
  # More rejected than the limit: one line naming the limit and a file.
  with pytest.raises(ValueError) as e:
    data.ImageFolder(tmp_path, verify="full", max_bad_fraction=0.1)
  assert "max_bad_fraction=0.1" in str(e.value) and "2 of 10" in str(e.value) and "\n" not in str(e.value)


def test_folder_without_readable_image_is_one_line(tmp_path):
  (tmp_path / "a.png").write_bytes(b"nope")
  _truncated_png(tmp_path / "b.png")
  with pytest.raises(ValueError) as e:
    data.ImageFolder(tmp_path, verify="full")
  assert "no readable image" in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(ValueError, match="unknown verify"):
    data.ImageFolder(tmp_path, verify="quick")


def test_special_files_are_not_opened(tmp_path):
  _png(tmp_path / "a.png", 10)
  os.mkfifo(tmp_path / "fifo.png")  # opening it would block forever
  os.mkfifo(tmp_path / "metadata.jsonl")
  src = data.ImageFolder(tmp_path)
  assert [os.path.basename(f) for f in src.files] == ["a.png"]
