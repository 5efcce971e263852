"""Fault suite, hostile files: safetensors headers that lie about sizes, offsets, shapes or dtypes are
refused with one line naming the file and tensor before anything large is allocated (peak RSS of a
subprocess checked), valid files read lazily (memory-mapped) with the same numbers as the safetensors
library, and pickle-based files (.ckpt, .bin, .pt, .pth, .pkl) refused at every checkpoint entry point.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jdiff import convert, lora
from jdiff.convert import _io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TB = 10**12


def _write_raw(path, header: dict, data: bytes = b"") -> str:
  """A safetensors file with an arbitrary (possibly lying) header."""
  raw = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw + data)
  return str(path)


def _hostile_files(folder) -> dict[str, tuple[str, str]]:
  """name -> (path, a phrase the one-line error must contain)."""
  os.makedirs(folder, exist_ok=True)
  f = lambda name: os.path.join(folder, f"{name}.safetensors")  # noqa: E731
  files = {}
  with open(f("huge_header"), "wb") as fh:  # the length field claims a terabyte of header
    fh.write(struct.pack("<Q", TB) + b"{}")
  files["huge_header"] = (f("huge_header"), f"header claims {TB} bytes")
  files["huge_tensor"] = (_write_raw(f("huge_tensor"), {"w": {"dtype": "F32", "shape": [500_000, 500_000],
                                                               "data_offsets": [0, 4 * 500_000**2]}}, bytes(16)),
                          "'w' lies at bytes [0, 1000000000000)")
  files["absurd_shape"] = (_write_raw(f("absurd_shape"), {"w": {"dtype": "F32", "shape": [2**40, 2**40, 2**40],
                                                                 "data_offsets": [0, 16]}}, bytes(16)),
                           "'w' of shape (1099511627776, 1099511627776, 1099511627776)")
  files["overlap"] = (_write_raw(f("overlap"), {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                                "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}},
                                 bytes(24)), "tensors 'a' and 'b' overlap")
  files["past_end"] = (_write_raw(f("past_end"), {"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}},
                                  bytes(16)), "'a' lies at bytes [0, 32) outside the file's 16-byte")
  files["negative"] = (_write_raw(f("negative"), {"a": {"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]}},
                                  bytes(16)), "'a' lies at bytes [-16, 0)")
  files["dtype"] = (_write_raw(f("dtype"), {"q": {"dtype": "Q4_K", "shape": [4], "data_offsets": [0, 4]}},
                               bytes(4)), "'q' has unsupported dtype 'Q4_K'")
  files["shape_type"] = (_write_raw(f("shape_type"), {"s": {"dtype": "F32", "shape": [-1, 4],
                                                           "data_offsets": [0, 16]}}, bytes(16)),
                         "'s' has invalid shape [-1, 4]")
  files["not_object"] = (_write_raw(f("not_object"), [1, 2, 3]), "header must be a JSON object")
  with open(f("short"), "wb") as fh:
    fh.write(b"\x01\x02")
  files["short"] = (f("short"), "too short")
  return files


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
  return _hostile_files(tmp_path_factory.mktemp("hostile"))


@pytest.mark.parametrize("name", ["huge_header", "huge_tensor", "absurd_shape", "overlap", "past_end", "negative",
                                  "dtype", "shape_type", "not_object", "short"])
def test_hostile_safetensors_is_one_line_error_naming_file_and_key(hostile, name):
  path, phrase = hostile[name]
  with pytest.raises(ValueError) as e:
    _io.read_safetensors(path)
  msg = str(e.value)
  assert "\n" not in msg and path in msg and phrase in msg, msg


def test_hostile_file_through_every_loader(hostile, tmp_path):
  """The folder loaders (load_tensors, convert.load_vae) and the LoRA loader give the same one line."""
  folder = tmp_path / "vae"
  folder.mkdir()
  os.link(hostile["huge_tensor"][0], folder / "diffusion_pytorch_model.safetensors")
  _io.write_config(folder, {"_class_name": "AutoencoderKL"})
  for load in (lambda: _io.load_tensors(folder), lambda: convert.load_vae(folder),
               lambda: lora.load(hostile["huge_tensor"][0], {"unet": {}})):
    with pytest.raises(ValueError) as e:
      load()
    assert "\n" not in str(e.value) and "'w' lies at bytes" in str(e.value), str(e.value)


_RSS_PROBE = r"""
import resource, sys
from jdiff.convert import _io
import numpy as np
def peak_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = peak_mb()
for path in sys.argv[2:]:
  try:
    _io.read_safetensors(path)
    print("accepted", path)
  except ValueError as e:
    assert "\n" not in str(e)
hostile = peak_mb() - base
tensors = _io.load_tensors(sys.argv[1])
lazy = peak_mb() - base
total = float(sum(float(np.sum(a, dtype=np.float64)) for a in tensors.values()))
print(f"{hostile:.1f} {lazy:.1f} {total!r}")
"""


def test_hostile_files_allocate_nothing_large_and_valid_files_are_mapped(hostile, tmp_path):
  """In a fresh process: refusing every hostile file raises the peak RSS by < 16 MB, and loading a
  valid 96 MB checkpoint by < 48 MB (its tensors are memory-mapped views, read when used)."""
  rng = np.random.default_rng(0)
  big = {f"layer{i}.weight": rng.standard_normal((1024, 2048)).astype(np.float32) for i in range(12)}
  _io.save_tensors(big, tmp_path / "big")
  del big
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  res = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(tmp_path / "big"),
                        *(p for p, _ in hostile.values())], capture_output=True, text=True, env=env, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "accepted" not in res.stdout, res.stdout
  hostile_mb, lazy_mb, total = res.stdout.split()
  assert float(hostile_mb) < 16, res.stdout
  assert float(lazy_mb) < 48, res.stdout
  # The mapped tensors hold the written numbers (recomputed from the same seed).
  rng = np.random.default_rng(0)
  want = sum(float(np.sum(rng.standard_normal((1024, 2048)).astype(np.float32), dtype=np.float64))
             for _ in range(12))
  assert float(total) == want


def test_valid_files_read_the_same_numbers_as_safetensors(tmp_path):
  """Every supported dtype, empty and scalar tensors: equal to the safetensors library's own reader."""
  rng = np.random.default_rng(3)
  tensors = {
      "f64": rng.standard_normal((3, 2)),
      "f32": rng.standard_normal((2, 3, 4)).astype(np.float32),
      "i64": rng.integers(-2**62, 2**62, size=(5,)),
      "u64": rng.integers(0, 2**63, size=(2, 2), dtype=np.uint64),
      "i32": rng.integers(-9, 9, size=(4,)).astype(np.int32),
      "u32": rng.integers(0, 9, size=(4,)).astype(np.uint32),
      "i16": rng.integers(-9, 9, size=(3,)).astype(np.int16),
      "u16": rng.integers(0, 9, size=(3,)).astype(np.uint16),
      "i8": rng.integers(-9, 9, size=(7,)).astype(np.int8),
      "u8": rng.integers(0, 255, size=(7,)).astype(np.uint8),
      "bool": rng.integers(0, 2, size=(6,)).astype(bool),
      "f16": rng.standard_normal((4, 4)).astype(np.float16),
      "empty": np.zeros((0, 3), np.float32),
      "scalar": np.asarray(2.5, np.float32),
  }
  path = str(tmp_path / "all.safetensors")
  save_file(tensors, path, metadata={"format": "pt", "note": "x"})
  got, meta = _io.read_safetensors(path)
  want = load_file(path)
  assert meta == {"format": "pt", "note": "x"} and set(got) == set(want)
  for name, value in want.items():
    expect = value.astype(np.float32) if value.dtype == np.float16 else value
    assert got[name].dtype == expect.dtype and got[name].shape == expect.shape, name
    np.testing.assert_array_equal(got[name], expect)
  assert not got["f32"].flags.writeable  # a read-only map of the file, not a copy


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth", ".pkl"])
def test_pickle_formats_are_refused_everywhere(tmp_path, suffix):
  evil = tmp_path / f"model{suffix}"
  evil.write_bytes(b"\x80\x04\x95")  # a pickle protocol-4 prefix: never opened
  entries = [
      lambda: _io.read_safetensors(evil),
      lambda: _io.load_tensors(evil),
      lambda: convert.load_unet(evil),
      lambda: convert.load_vae(evil),
      lambda: convert.load_text_encoder(evil),
      lambda: lora.load(evil, {"unet": {}}),
  ]
  for load in entries:
    with pytest.raises(ValueError) as e:
      load()
    msg = str(e.value)
    assert "\n" not in msg and str(evil) in msg and f"pickle file ({suffix}" in msg, msg
  # A folder holding only pickles: FileNotFoundError naming them.
  with pytest.raises(FileNotFoundError, match=f"only pickle files .*model{suffix}"):
    _io.load_tensors(tmp_path)
