"""AutoencoderKL parity with diffusers (PyTorch, float32) on a tiny random model saved by diffusers."""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jdiff import convert  # noqa: E402
from jdiff.convert import _io  # noqa: E402
from jdiff.models import AutoencoderKL, VAEConfig  # noqa: E402

RTOL = 1e-4
TINY = dict(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4, norm_num_groups=8, sample_size=32, scaling_factor=0.3)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(x):
  return np.transpose(x.detach().numpy(), (0, 2, 3, 1))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(diffusers model, folder, jdiff module, params, jitted encode, jitted decode), built once."""
  torch.manual_seed(0)
  model = diffusers.AutoencoderKL(**TINY).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  folder = tmp_path_factory.mktemp("vae")
  model.save_pretrained(folder)
  vae, params = convert.load_vae(folder)
  encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=AutoencoderKL.encode))
  decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=AutoencoderKL.decode))
  return model, folder, vae, params, encode, decode


def images(seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)


def test_vae_encode_matches_diffusers(reference):
  model, _, vae, params, encode, _ = reference
  x = images()
  with torch.no_grad():
    dist = model.encode(nchw(x)).latent_dist
  post = encode(params, x)
  assert post.mean.shape == (2, 16, 16, 4)
  assert rel_err(post.mean, nhwc(dist.mean)) <= RTOL
  assert rel_err(post.logvar, nhwc(dist.logvar)) <= RTOL
  assert rel_err(post.kl(), dist.kl().numpy()) <= RTOL
  assert vae.config.scaling_factor == 0.3


def test_vae_decode_matches_diffusers(reference):
  model, _, _, params, _, decode = reference
  z = np.random.default_rng(1).standard_normal((2, 16, 16, 4)).astype(np.float32)
  with torch.no_grad():
    want = nhwc(model.decode(nchw(z)).sample)
  got = decode(params, z)
  assert got.shape == (2, 32, 32, 3)
  assert rel_err(got, want) <= RTOL


def test_vae_forward_with_mode_matches_diffusers(reference):
  model, _, vae, params, _, _ = reference
  x = images(2)
  with torch.no_grad():
    want = nhwc(model(nchw(x), sample_posterior=False).sample)
  recon, post = jax.jit(lambda p, x: vae.apply({"params": p}, x))(params, x)
  assert rel_err(recon, want) <= RTOL
  # a sampled reconstruction is the decode of mean + std * noise for the key's noise
  key = jax.random.key(3)
  z = post.sample(key=key)
  noise = jax.random.normal(key, post.mean.shape)
  np.testing.assert_allclose(z, post.mean + np.exp(0.5 * np.asarray(post.logvar)) * noise,
                             rtol=1e-5, atol=1e-6)


def test_vae_loads_legacy_attention_names(reference, tmp_path):
  """Checkpoints from before diffusers' rename (query/key/value/proj_attn as 1x1 convs) still load."""
  _, folder, _, params, _, _ = reference
  tensors = _io.load_tensors(folder)
  legacy = {}
  for name, value in tensors.items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
      if f".attentions.0.{new}." in name:
        name = name.replace(f".{new}.", f".{old}.")
        value = value[:, :, None, None] if value.ndim == 2 else value
    legacy[name] = value
  assert "encoder.mid_block.attentions.0.query.weight" in legacy
  _io.write_config(tmp_path, _io.read_config(folder))
  _io.save_tensors(legacy, tmp_path)
  _, params2 = convert.load_vae(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_save_vae_round_trips_through_diffusers(reference, tmp_path):
  _, _, vae, params, encode, decode = reference
  rng = np.random.default_rng(4)
  params = jax.tree.map(
      lambda p: np.asarray(p) + np.float32(0.05) * rng.standard_normal(p.shape, np.float32), params)
  convert.save_vae(vae, params, tmp_path / "vae")
  loaded = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
  assert loaded.config.scaling_factor == 0.3
  x = images(5)
  z = np.random.default_rng(6).standard_normal((2, 16, 16, 4)).astype(np.float32)
  with torch.no_grad():
    dist = loaded.encode(nchw(x)).latent_dist
    want = nhwc(loaded.decode(nchw(z)).sample)
  post = encode(params, x)
  assert rel_err(post.mean, nhwc(dist.mean)) <= RTOL
  assert rel_err(decode(params, z), want) <= RTOL


def test_vae_config_from_diffusers(reference):
  _, folder, _, _, _, _ = reference
  config = _io.read_config(folder)
  assert VAEConfig.from_diffusers_config(config) == VAEConfig(**TINY)
  with pytest.raises(ValueError, match="act_fn='gelu' is not supported"):
    VAEConfig.from_diffusers_config({**config, "act_fn": "gelu"})
  with pytest.raises(ValueError, match="unknown key 'spatial_norm'"):
    VAEConfig.from_diffusers_config({**config, "spatial_norm": True})
