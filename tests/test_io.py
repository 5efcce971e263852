"""Checkpoint-folder I/O: safetensors read/write (single and sharded), half-precision upcasts, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file as torch_save_file

from jdiff.convert import _io


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
      "conv_in.weight": rng.standard_normal((8, 4, 3, 3)).astype(np.float32),
      "conv_in.bias": rng.standard_normal((8,)).astype(np.float32),
      "blocks.0.proj.weight": rng.standard_normal((16, 8)).astype(np.float32),
      "position_ids": np.arange(7, dtype=np.int64)[None],
  }


def test_roundtrip_single_file(tmp_path):
  tensors = _tensors()
  written = _io.save_tensors(tensors, tmp_path)
  assert [p.name for p in written] == ["diffusion_pytorch_model.safetensors"]
  got = _io.load_tensors(tmp_path)
  assert set(got) == set(tensors)
  for name, value in tensors.items():
    assert got[name].dtype == value.dtype
    np.testing.assert_array_equal(got[name], value)


def test_roundtrip_sharded_matches_transformers_layout(tmp_path):
  tensors = _tensors(1)
  written = _io.save_tensors(tensors, tmp_path, prefix="model", max_shard_size=600)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) >= 2 and len(written) == len(shards) + 1
  assert all(name.startswith("model-") and "-of-" in name for name in shards)
  assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
  assert set(index["weight_map"]) == set(tensors)
  got = _io.load_tensors(tmp_path, prefix="model")
  for name, value in tensors.items():
    np.testing.assert_array_equal(got[name], value)
  # torch's own reader (what diffusers/transformers use) sees the same tensors in each shard.
  from safetensors.torch import load_file
  merged = {}
  for shard in shards:
    merged.update(load_file(str(tmp_path / shard)))
  for name, value in tensors.items():
    np.testing.assert_array_equal(merged[name].numpy(), value)


def test_reads_diffusers_sharded_checkpoint(tmp_path):
  """A sharded checkpoint written by diffusers itself loads back to the same tensors."""
  from diffusers import AutoencoderKL
  torch.manual_seed(0)
  vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                      up_block_types=("UpDecoderBlock2D",), latent_channels=2, norm_num_groups=4,
                      layers_per_block=1)
  vae.save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
  got = _io.load_tensors(tmp_path)
  want = vae.state_dict()
  assert set(got) == set(want)
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value.numpy())
  assert _io.read_config(tmp_path)["latent_channels"] == 2


def test_half_precision_upcast_to_float32(tmp_path):
  ref = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
  torch_save_file({"bf": ref.to(torch.bfloat16), "fp": ref.to(torch.float16),
                   "i": torch.arange(4, dtype=torch.int32)}, str(tmp_path / "model.safetensors"))
  got = _io.load_tensors(tmp_path, prefix="model")
  assert got["bf"].dtype == np.float32 and got["fp"].dtype == np.float32
  np.testing.assert_array_equal(got["bf"], ref.to(torch.bfloat16).float().numpy())
  np.testing.assert_array_equal(got["fp"], ref.to(torch.float16).float().numpy())
  np.testing.assert_array_equal(got["i"], np.arange(4, dtype=np.int32))


def test_corrupt_file_names_the_file(tmp_path):
  _io.save_tensors(_tensors(), tmp_path)
  path = tmp_path / "diffusion_pytorch_model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])  # truncated download
  with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors"):
    _io.load_tensors(tmp_path)
  path.write_bytes(b"not a safetensors file at all")
  with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors"):
    _io.load_tensors(tmp_path)


def test_missing_files_and_pickles(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    _io.load_tensors(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="config.json"):
    _io.read_config(tmp_path)
  (tmp_path / "config.json").write_text("[1, 2")
  with pytest.raises(ValueError, match="config.json"):
    _io.read_config(tmp_path)
  (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
  with pytest.raises(FileNotFoundError, match="pickle"):
    _io.load_tensors(tmp_path)
  other = tmp_path / "other"
  _io.save_tensors(_tensors(), other, prefix="model")
  with pytest.raises(FileNotFoundError, match=r"no diffusion_pytorch_model.safetensors .*model.safetensors"):
    _io.load_tensors(other)


def test_missing_shard(tmp_path):
  _io.save_tensors(_tensors(), tmp_path, max_shard_size=600)
  next(tmp_path.glob("diffusion_pytorch_model-00002-of-*.safetensors")).unlink()
  with pytest.raises(FileNotFoundError, match="00002"):
    _io.load_tensors(tmp_path)


def test_config_roundtrip(tmp_path):
  config = {"block_out_channels": [32, 64], "act_fn": "silu", "sample_size": 8}
  _io.write_config(tmp_path / "unet", config)
  assert _io.read_config(tmp_path / "unet") == config


def test_check_tensors_names_first_problem():
  expected = {"a.weight": (2, 3), "b.weight": (4,), "c.bias": (1,)}
  good = {name: np.zeros(shape) for name, shape in expected.items()}
  _io.check_tensors(expected, good)
  with pytest.raises(ValueError, match=r"missing tensor 'b.weight'"):
    _io.check_tensors(expected, {"a.weight": good["a.weight"]}, source="x")
  with pytest.raises(ValueError, match=r"'a.weight' has shape \(3, 2\), expected \(2, 3\)"):
    _io.check_tensors(expected, {**good, "a.weight": np.zeros((3, 2))})
  with pytest.raises(ValueError, match="unexpected tensor 'z'"):
    _io.check_tensors(expected, {**good, "z": np.zeros(1)})
  _io.check_tensors(expected, {**good, "z": np.zeros(1)}, allow_unexpected=True)


def test_parse_size():
  assert _io.parse_size("5GB") == 5 * 10**9
  assert _io.parse_size("2MiB") == 2 * 2**20
  assert _io.parse_size(1000) == 1000
  with pytest.raises(ValueError, match="cannot parse"):
    _io.parse_size("lots")
