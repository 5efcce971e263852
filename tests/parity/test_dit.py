"""DiT and SD3 MMDiT parity with diffusers' DiTTransformer2DModel / SD3Transformer2DModel and DiTPipeline
(PyTorch, float32) on tiny random models.

Each reference is built by diffusers, its weights perturbed away from the default init (zero-initialised
gates and ones/zeros norms would hide a swapped shift/scale or a missing transpose), saved with
``save_pretrained`` and loaded by :mod:`jdiff.convert.dit` / :class:`jdiff.dit_pipeline.DiTPipeline`.

Tolerances (see tests/parity/__init__.py). Backbones: 2-3 blocks of K <= 128-long dot products plus
LayerNorms, the same depth class as the UNet tests: ``1e-4`` relative. Pipeline: the backbone's epsilon
error (a few 1e-6 relative) is amplified by the sampler: DDIM's first x_0 estimate divides by
sqrt(alpha_bar) (sqrt((1 - a) / a) ~ 6 at t = 800 of the scaled-linear schedule used here; ~25 on the
linear one, hence the fixture's schedule) and guidance at scale s multiplies epsilon differences by up
to 2s - 1 = 7; the clipping of x_0 and the VAE decode do not add to it. Both bounds were checked to pass
cut to 0.3x with PyTorch on 1 and on 2 threads.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jdiff import convert  # noqa: E402
from jdiff.convert import _io  # noqa: E402
from jdiff.convert.dit import POS_EMBED_KEY  # noqa: E402
from jdiff.convert.unet import params_to_torch  # noqa: E402
from jdiff.dit_pipeline import DiTPipeline, sampler_from_scheduler_config  # noqa: E402
from jdiff.models import DiTConfig, SD3Config  # noqa: E402
from jdiff.models.dit import DiT  # noqa: E402

RTOL = 1e-4
B = 2

DIT_CONFIGS = {
    # DiT-XL/2's layout: learned sigma, no affine norm3, tanh GELU, 1000 classes (+ the null class)
    "learned_sigma": dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                          sample_size=8, patch_size=2, num_embeds_ada_norm=1000),
    "affine_gelu": dict(num_attention_heads=4, attention_head_dim=8, in_channels=3, out_channels=None, num_layers=2,
                        sample_size=8, patch_size=4, num_embeds_ada_norm=10, activation_fn="gelu",
                        norm_elementwise_affine=True, attention_bias=False),
}
SD3_CONFIGS = {
    "sd3": dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                num_attention_heads=4, joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=16,
                pos_embed_max_size=12),
    # SD3.5's additions: RMS qk-norm on both streams, a dual-attention block
    "sd35": dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
                 num_attention_heads=4, joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=16,
                 pos_embed_max_size=12, dual_attention_layers=(0,), qk_norm="rms_norm"),
}


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def nchw(x: np.ndarray) -> "torch.Tensor":
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(x: "torch.Tensor") -> np.ndarray:
  return np.transpose(x.detach().numpy(), (0, 2, 3, 1))


def perturb(model, seed: int, scale: float = 0.1) -> None:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn(p.shape, generator=gen))


def torch_count(model) -> int:
  return sum(p.numel() for p in model.parameters())


def jdiff_count(params) -> int:
  return sum(int(np.size(v)) for v in jax.tree.leaves(params))


@pytest.fixture(scope="module")
def dit_ref(tmp_path_factory):
  """name -> (diffusers model, folder, jdiff module, params, jitted apply)."""
  out = {}
  for i, (name, kwargs) in enumerate(DIT_CONFIGS.items()):
    torch.manual_seed(i)
    model = diffusers.DiTTransformer2DModel(**kwargs).eval()
    perturb(model, i)
    folder = tmp_path_factory.mktemp(f"dit_{name}")
    model.save_pretrained(folder)
    net, params = convert.load_dit(folder)
    out[name] = (model, folder, net, params, jax.jit(net.apply))
  return out


@pytest.fixture(scope="module")
def sd3_ref(tmp_path_factory):
  """name -> (diffusers model, folder, jdiff module, params, apply jitted with static skip_layers)."""
  out = {}
  for i, (name, kwargs) in enumerate(SD3_CONFIGS.items()):
    torch.manual_seed(10 + i)
    model = diffusers.SD3Transformer2DModel(**kwargs).eval()
    perturb(model, 10 + i)
    folder = tmp_path_factory.mktemp(f"sd3_{name}")
    model.save_pretrained(folder)
    net, params = convert.load_sd3_transformer(folder)
    apply = jax.jit(net.apply, static_argnames=("skip_layers",))
    out[name] = (model, folder, net, params, apply)
  return out


def dit_inputs(kwargs, size, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, size, size, kwargs["in_channels"])).astype(np.float32)
  t = np.array([0.5, 811.25], np.float32)
  y = np.array([1, kwargs["num_embeds_ada_norm"]], np.int64)  # a class and the null class
  return x, t, y


def dit_torch(model, x, t, y):
  with torch.no_grad():
    return nhwc(model(nchw(x), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample)


@pytest.mark.parametrize("name", list(DIT_CONFIGS))
def test_dit_matches_diffusers(dit_ref, name):
  model, _, net, params, apply = dit_ref[name]
  kwargs = DIT_CONFIGS[name]
  # the training size, and (one config) a larger grid whose position embedding diffusers recomputes
  for size in (8, 16) if name == "learned_sigma" else (8,):
    x, t, y = dit_inputs(kwargs, size, seed=size)
    want = dit_torch(model, x, t, y)
    got = apply({"params": params}, x, t, y)
    assert got.shape == want.shape == (B, size, size, net.config.output_channels)
    assert rel_err(got, want) <= RTOL


def sd3_inputs(kwargs, height, width, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, height, width, kwargs["in_channels"])).astype(np.float32)
  t = np.array([3.5, 900.0], np.float32)
  ctx = rng.standard_normal((B, 5, kwargs["joint_attention_dim"])).astype(np.float32)
  pooled = rng.standard_normal((B, kwargs["pooled_projection_dim"])).astype(np.float32)
  return x, t, ctx, pooled


def sd3_torch(model, x, t, ctx, pooled, **kw):
  with torch.no_grad():
    return nhwc(model(nchw(x), encoder_hidden_states=torch.from_numpy(ctx), pooled_projections=torch.from_numpy(pooled),
                      timestep=torch.from_numpy(t), **kw).sample)


@pytest.mark.parametrize("name", list(SD3_CONFIGS))
def test_sd3_transformer_matches_diffusers(sd3_ref, name):
  model, _, _, params, apply = sd3_ref[name]
  kwargs = SD3_CONFIGS[name]
  # the training size, and (one config) a non-square input cropping another window of the position table
  for (h, w) in ((8, 8), (12, 20)) if name == "sd3" else ((8, 8),):
    x, t, ctx, pooled = sd3_inputs(kwargs, h, w, seed=h + w)
    want = sd3_torch(model, x, t, ctx, pooled)
    got = apply({"params": params}, x, t, ctx, pooled)
    assert got.shape == want.shape
    assert rel_err(got, want) <= RTOL
  if name == "sd35":  # skip-layer guidance's skipped block
    x, t, ctx, pooled = sd3_inputs(kwargs, 8, 8, seed=3)
    want = sd3_torch(model, x, t, ctx, pooled, skip_layers=[1])
    got = apply({"params": params}, x, t, ctx, pooled, skip_layers=(1,))
    assert rel_err(got, want) <= RTOL
    assert rel_err(apply({"params": params}, x, t, ctx, pooled), want) > 1e-2  # the skip matters


def test_parameter_counts_equal_diffusers(dit_ref, sd3_ref):
  for name, (model, _, net, params, _) in dit_ref.items():
    shapes = convert.dit_param_shapes(net.config)
    assert jdiff_count(params) == torch_count(model) == sum(int(np.prod(s)) for s in shapes.values()), name
  for name, (model, _, net, params, _) in sd3_ref.items():
    shapes = convert.sd3_param_shapes(net.config)
    assert jdiff_count(params) == torch_count(model) == sum(int(np.prod(s)) for s in shapes.values()), name


def _shifted(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: np.asarray(p) + np.float32(0.05) * rng.standard_normal(p.shape, np.float32), params)


@pytest.mark.parametrize("kind", ["dit", "sd3"])
def test_save_round_trips_through_diffusers(dit_ref, sd3_ref, tmp_path, kind):
  """jdiff params -> save -> diffusers from_pretrained holds exactly those tensors and computes jdiff's outputs."""
  if kind == "dit":
    _, _, net, params, apply = dit_ref["learned_sigma"]
    params = _shifted(params, 1)
    out = convert.save_dit(net, params, tmp_path / "transformer", max_shard_size="40KB")
    assert (out / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = diffusers.DiTTransformer2DModel.from_pretrained(out).eval()
    x, t, y = dit_inputs(DIT_CONFIGS["learned_sigma"], 8, seed=5)
    want, got = dit_torch(loaded, x, t, y), apply({"params": params}, x, t, y)
    net2, params2 = convert.load_dit(tmp_path)  # the pipeline root holding transformer/
  else:
    _, _, net, params, apply = sd3_ref["sd35"]
    params = _shifted(params, 2)
    out = convert.save_sd3_transformer(net, params, tmp_path / "transformer")
    loaded = diffusers.SD3Transformer2DModel.from_pretrained(out).eval()
    x, t, ctx, pooled = sd3_inputs(SD3_CONFIGS["sd35"], 8, 8, seed=5)
    want, got = sd3_torch(loaded, x, t, ctx, pooled), apply({"params": params}, x, t, ctx, pooled)
    net2, params2 = convert.load_sd3_transformer(tmp_path)
  state = {k: v.numpy() for k, v in loaded.state_dict().items() if k != POS_EMBED_KEY}
  mine = params_to_torch(params)
  assert sorted(state) == sorted(mine)
  for k in mine:
    np.testing.assert_array_equal(state[k], mine[k], err_msg=k)  # bit-identical
  assert rel_err(got, want) <= RTOL
  assert net2.config == net.config
  jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_remat_and_bfloat16_options():
  """remat changes memory, not values (gradients equal); bfloat16 compute stays near float32."""
  base = DiTConfig.tiny(num_layers=1, num_embeds_ada_norm=10)
  x, t, y = jnp.ones((1, 8, 8, 4)), jnp.array([20.0]), jnp.array([3])
  rng = np.random.default_rng(1)
  params = traverse_util.unflatten_dict({  # random everywhere: no zero adaLN gates
      k: np.float32(0.2) * rng.standard_normal(s, np.float32) for k, s in convert.dit_param_shapes(base).items()})

  def grad(config):  # (gradient of a loss, the forward output)
    def loss(p):
      out = DiT(config).apply({"params": p}, x, t, y)
      return jnp.mean(out ** 2), out

    return jax.jit(jax.grad(loss, has_aux=True))(params)

  (g0, full), (g1, _) = grad(base), grad(dataclasses.replace(base, remat="matmuls"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)
  low = jax.jit(DiT(dataclasses.replace(base, dtype="bfloat16")).apply)({"params": params}, x, t, y)
  assert low.dtype == jnp.float32
  assert rel_err(low, full) <= 0.05  # bfloat16 keeps 8 bits: ~4e-3 per rounding, a few dozen roundings deep


# ---- the DiTPipeline ----

PIPE_CASES = {
    # DiT's default guidance 4 through DDIM (diffusers' defaults: clip_sample, leading spacing)
    "ddim_cfg": (lambda: diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
                 4.0),
    # scale 1: no guidance; DPM-Solver++(2M) on the linear schedule
    "dpm_plain": (lambda: diffusers.DPMSolverMultistepScheduler(), 1.0),
}


@pytest.fixture(scope="module")
def dit_pipelines(dit_ref, tmp_path_factory):
  model = dit_ref["learned_sigma"][0]
  torch.manual_seed(3)
  vae = diffusers.AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                sample_size=16).eval()
  perturb(vae, 3)
  out = {}
  for name, (scheduler, _) in PIPE_CASES.items():
    pipe = diffusers.DiTPipeline(transformer=model, vae=vae, scheduler=scheduler())
    folder = tmp_path_factory.mktemp(f"ditpipe_{name}")
    pipe.save_pretrained(folder)
    out[name] = (pipe, folder)
  return out


@pytest.mark.parametrize("name", list(PIPE_CASES))
def test_dit_pipeline_matches_diffusers(dit_pipelines, name):
  pipe, folder = dit_pipelines[name]
  guidance_scale = PIPE_CASES[name][1]
  labels = [3, 999]
  # DiTPipeline draws its latents with torch.randn from the generator: the same draw, handed to jdiff
  latents = torch.randn((len(labels), 4, 8, 8), generator=torch.Generator().manual_seed(0))
  want = pipe(class_labels=labels, guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(0),
              num_inference_steps=5, output_type="np").images
  jp = DiTPipeline.from_diffusers(folder)
  assert jp.sampler == {"ddim_cfg": "ddim", "dpm_plain": "dpm_solver"}[name]
  got = jp.generate(labels, key=jax.random.key(1), num_steps=5, guidance_scale=guidance_scale,
                    latents=nhwc(latents))
  assert got.shape == want.shape == (2, 16, 16, 3)
  assert rel_err(got, want) <= RTOL


def test_dit_guidance_rescale_is_diffusers_rescale_noise_cfg(dit_pipelines):
  """``guidance_rescale`` on the DiT's guided epsilon equals diffusers' ``rescale_noise_cfg`` of the guided
  and conditional epsilons (DiTPipeline has no such option; the SD pipelines' function is the reference),
  and generate() runs it."""
  from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

  jp = DiTPipeline.from_diffusers(dit_pipelines["ddim_cfg"][1])
  labels = jnp.array([3, 999])
  rng = np.random.default_rng(5)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  t = jnp.array([500, 20])
  guided = np.asarray(jp.model_fn(jp.transformer_params, labels, guidance_scale=4.0)(x, t))
  cond = np.asarray(jp.model_fn(jp.transformer_params, labels)(x, t))
  got = np.asarray(jp.model_fn(jp.transformer_params, labels, guidance_scale=4.0, guidance_rescale=0.7)(x, t))
  want = rescale_noise_cfg(torch.from_numpy(guided).permute(0, 3, 1, 2), torch.from_numpy(cond).permute(0, 3, 1, 2),
                           guidance_rescale=0.7).permute(0, 2, 3, 1).numpy()
  assert rel_err(got, want) <= RTOL and rel_err(got, guided) > 1e-3
  images = jp.generate([3, 999], key=jax.random.key(1), num_steps=2, guidance_scale=4.0, guidance_rescale=0.7)
  assert images.shape == (2, 16, 16, 3) and bool(jnp.all(jnp.isfinite(images)))


# ---- bad input ----


def test_bad_input_one_line_errors(dit_ref, sd3_ref, dit_pipelines, tmp_path):
  _, folder, net, params, _ = dit_ref["learned_sigma"]
  config = _io.read_config(folder)
  with pytest.raises(ValueError, match="DiT config: unknown key 'frobnicate'"):
    DiTConfig.from_diffusers_config({**config, "frobnicate": 1})
  with pytest.raises(ValueError, match="norm_type='ada_norm_single' is not supported"):
    DiTConfig.from_diffusers_config({**config, "norm_type": "ada_norm_single"})
  with pytest.raises(ValueError, match="SD3 transformer config: unknown key 'frobnicate'"):
    SD3Config.from_diffusers_config({**_io.read_config(sd3_ref["sd3"][1]), "frobnicate": 1})
  with pytest.raises(ValueError, match="qk_norm='layer_norm' is not supported"):
    SD3Config.from_diffusers_config({**_io.read_config(sd3_ref["sd3"][1]), "qk_norm": "layer_norm"})
  # pickles are never opened: a .bin file named directly, or a folder holding only one
  pickled = tmp_path / "pickled"
  pickled.mkdir()
  (pickled / "diffusion_pytorch_model.bin").write_bytes(b"not opened")
  _io.write_config(pickled, config)
  with pytest.raises(ValueError, match="is a pickle file"):
    convert.load_dit(pickled / "diffusion_pytorch_model.bin")
  with pytest.raises(FileNotFoundError, match="found only pickle files"):
    convert.load_dit(pickled)
  # a folder of the other model class, a learned (non sin-cos) position table
  with pytest.raises(ValueError, match="holds a SD3Transformer2DModel, not a DiT"):
    convert.load_dit(sd3_ref["sd3"][1])
  sd3_folder = sd3_ref["sd3"][1]
  tensors = dict(_io.load_tensors(sd3_folder))
  tensors[POS_EMBED_KEY] = tensors[POS_EMBED_KEY] + np.float32(0.01)
  _io.write_config(tmp_path / "learned", _io.read_config(sd3_folder))
  _io.save_tensors(tensors, tmp_path / "learned")
  with pytest.raises(ValueError, match="differs from the 2-D sin-cos table"):
    convert.load_sd3_transformer(tmp_path / "learned")
  # the pipeline: labels outside [0, 1000], an unknown scheduler class
  jp = DiTPipeline.from_diffusers(dit_pipelines["dpm_plain"][1])
  with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 1000\]"):
    jp.generate([1001], key=jax.random.key(0), num_steps=2)
  with pytest.raises(ValueError, match="scheduler 'FancyScheduler' has no jdiff sampler"):
    sampler_from_scheduler_config({"_class_name": "FancyScheduler"})
  index = json.loads((dit_pipelines["dpm_plain"][1] / "model_index.json").read_text())
  assert index["transformer"] == ["diffusers", "DiTTransformer2DModel"]
