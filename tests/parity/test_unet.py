"""UNet parity with diffusers' UNet2DConditionModel (PyTorch, float32) on tiny random models.

Each reference model is built by diffusers, its weights perturbed away from the default init (so a
swapped scale/bias or a missing transpose cannot hide behind ones and zeros), saved with
``save_pretrained`` and loaded by ``jdiff.convert.load_unet``.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jdiff import convert  # noqa: E402
from jdiff.convert import _io  # noqa: E402
from jdiff.models import UNetConfig  # noqa: E402

RTOL = 1e-4
B, H, L = 2, 16, 5

SD1_LIKE = dict(
    sample_size=H, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24, attention_head_dim=4,
    norm_num_groups=8)
SD2_LIKE = dict(
    sample_size=H, in_channels=4, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
    attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
    transformer_layers_per_block=(1, 2), flip_sin_to_cos=False, freq_shift=1, norm_num_groups=16,
    norm_eps=1e-6)
CLASS_COND = dict(SD1_LIKE, num_class_embeds=10, layers_per_block=(1, 2))
# label "timestep" embedding plus LCM's guidance-scale embedding (time_cond_proj_dim)
TIMESTEP_CLASS = dict(SD1_LIKE, class_embed_type="timestep", mid_block_scale_factor=2.0,
                      time_cond_proj_dim=8)
CONFIGS = {"sd1": SD1_LIKE, "sd2": SD2_LIKE, "class": CLASS_COND, "timestep_class": TIMESTEP_CLASS}


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def nchw(x: np.ndarray) -> "torch.Tensor":
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(x: "torch.Tensor") -> np.ndarray:
  return np.transpose(x.detach().numpy(), (0, 2, 3, 1))


def perturb(model, seed: int) -> None:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """name -> (diffusers model, saved folder); built once for the module."""
  torch.manual_seed(0)
  out = {}
  for i, (name, kwargs) in enumerate(CONFIGS.items()):
    model = diffusers.UNet2DConditionModel(**kwargs).eval()
    perturb(model, i)
    folder = tmp_path_factory.mktemp(f"unet_{name}")
    model.save_pretrained(folder)
    out[name] = (model, folder)
  return out


@pytest.fixture(scope="module")
def loaded(reference):
  """name -> (jdiff UNet, params, jitted apply), loaded from the saved reference folders once."""
  out = {}
  for name, (_, folder) in reference.items():
    unet, params = convert.load_unet(folder)
    out[name] = (unet, params, jax.jit(unet.apply))
  return out


def inputs(kwargs, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, H, H, kwargs["in_channels"])).astype(np.float32)
  # SD2-like runs on fractional timesteps (as Karras-sigma samplers pass them), the others on ints
  t = np.array([0.25, 642.5], np.float32) if kwargs is SD2_LIKE else np.array([3, 811], np.int32)
  ctx = rng.standard_normal((B, L, kwargs["cross_attention_dim"])).astype(np.float32)
  return x, t, ctx


def extras_for(name):
  """Extra inputs of a config as numpy: class labels and the timestep condition."""
  if name == "class":
    return {"class_labels": np.array([7, 2], np.int32)}
  if name == "timestep_class":
    cond = np.random.default_rng(9).standard_normal((B, 8)).astype(np.float32)
    return {"class_labels": np.array([0.5, 120.0], np.float32), "timestep_cond": cond}
  return {}


def torch_forward(model, x, t, ctx, **kw):
  with torch.no_grad():
    return nhwc(model(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), **kw).sample)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unet_matches_diffusers(reference, loaded, name):
  model, _ = reference[name]
  _, params, apply = loaded[name]
  x, t, ctx = inputs(CONFIGS[name])
  extras = extras_for(name)
  kw = {k: torch.from_numpy(v) for k, v in extras.items()}
  want = torch_forward(model, x, t, ctx, **kw)
  got = apply({"params": params}, x, t, ctx, **extras)
  assert got.shape == want.shape
  assert rel_err(got, want) <= RTOL


def test_unet_controlnet_residuals_match_diffusers(reference, loaded):
  model, _ = reference["sd1"]
  _, params, apply = loaded["sd1"]
  x, t, ctx = inputs(SD1_LIKE, seed=1)
  # skips: conv_in, down0 resnet, down0 downsample (16x16, 16x16, 8x8 at 32 ch), down1 resnet (8x8, 64)
  shapes = [(B, 16, 16, 32), (B, 16, 16, 32), (B, 8, 8, 32), (B, 8, 8, 64)]
  rng = np.random.default_rng(5)
  down = [rng.standard_normal(s).astype(np.float32) for s in shapes]
  mid = rng.standard_normal((B, 8, 8, 64)).astype(np.float32)
  want = torch_forward(model, x, t, ctx, down_block_additional_residuals=tuple(nchw(d) for d in down),
                       mid_block_additional_residual=nchw(mid))
  got = apply({"params": params}, x, t, ctx, down_residuals=down, mid_residual=mid)
  plain = apply({"params": params}, x, t, ctx)
  assert rel_err(got, want) <= RTOL
  assert rel_err(plain, want) > 1e-2  # the residuals matter


@pytest.mark.parametrize("shard", [None, "100KB"])
def test_save_unet_round_trips_through_diffusers(loaded, tmp_path, shard):
  """jdiff params -> save_unet -> diffusers from_pretrained gives jdiff's outputs."""
  name = "class" if shard else "sd2"
  kwargs = CONFIGS[name]
  unet, params, apply = loaded[name]
  # Make the parameters jdiff's own: shift every leaf so nothing is diffusers' original.
  rng = np.random.default_rng(1)
  params = jax.tree.map(
      lambda p: np.asarray(p) + np.float32(0.05) * rng.standard_normal(p.shape, np.float32), params)
  out = tmp_path / "unet"
  convert.save_unet(unet, params, out, max_shard_size=shard)
  if shard:
    assert (out / "diffusion_pytorch_model.safetensors.index.json").is_file()
  loaded = diffusers.UNet2DConditionModel.from_pretrained(out).eval()
  x, t, ctx = inputs(kwargs, seed=3)
  extras = extras_for(name)
  kw = {k: torch.from_numpy(v) for k, v in extras.items()}
  want = torch_forward(loaded, x, t, ctx, **kw)
  got = apply({"params": params}, x, t, ctx, **extras)
  assert rel_err(got, want) <= RTOL
  # and jdiff reads back exactly what it wrote, also given the pipeline root holding unet/
  unet2, params2 = convert.load_unet(tmp_path)
  assert unet2.config == unet.config
  jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_load_unet_names_missing_and_misshaped_tensors(reference, tmp_path):
  _, folder = reference["sd1"]
  tensors = _io.load_tensors(folder)
  config = _io.read_config(folder)
  name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
  broken = dict(tensors)
  del broken[name]
  _io.write_config(tmp_path / "missing", config)
  _io.save_tensors(broken, tmp_path / "missing")
  with pytest.raises(ValueError, match=f"missing tensor '{name}'"):
    convert.load_unet(tmp_path / "missing")
  broken = dict(tensors)
  broken["conv_in.weight"] = broken["conv_in.weight"][:, :3]
  _io.write_config(tmp_path / "shape", config)
  _io.save_tensors(broken, tmp_path / "shape")
  with pytest.raises(ValueError, match=r"'conv_in.weight' has shape \(32, 3, 3, 3\)"):
    convert.load_unet(tmp_path / "shape")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    convert.load_unet(tmp_path / "nowhere")


def test_unet_config_from_diffusers_rejects_unsupported(reference):
  _, folder = reference["sd1"]
  config = _io.read_config(folder)
  assert UNetConfig.from_diffusers_config(config) == UNetConfig(**{
      k: v for k, v in SD1_LIKE.items()})
  with pytest.raises(ValueError, match="unknown key 'frobnicate'"):
    UNetConfig.from_diffusers_config({**config, "frobnicate": 1})
  with pytest.raises(ValueError, match="addition_embed_type='text' is not supported"):
    UNetConfig.from_diffusers_config({**config, "addition_embed_type": "text"})
  with pytest.raises(ValueError, match="down block type 'AttnDownBlock2D'"):
    UNetConfig.from_diffusers_config({**config, "down_block_types": ["AttnDownBlock2D", "DownBlock2D"]})
  # the config jdiff writes is one diffusers accepts and reads back to the same jdiff config
  written = UNetConfig(**SD2_LIKE).to_diffusers_config()
  json.dumps(written)
  assert UNetConfig.from_diffusers_config(written) == UNetConfig(**SD2_LIKE)
