"""ControlNet against diffusers: ControlNetModel folders both ways, and the ControlNet pipeline.

A tiny random StableDiffusionPipeline is saved; ``ControlNetModel.from_unet`` copies its UNet
(hint encoder (8, 16): control images at the 32-pixel image size), every weight is perturbed so the
zero convolutions matter, and the net is saved with ``save_pretrained``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jdiff.convert.controlnet import load_controlnet, save_controlnet  # noqa: E402
from jdiff.pipelines import StableDiffusion  # noqa: E402
from tests.parity.test_pipeline import PROMPTS, SIZE, _latents, build_tiny_sd_pipeline  # noqa: E402
from tests.parity.test_unet import nchw, nhwc, perturb, rel_err  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """(pipeline folder, [controlnet folders]) with two differently perturbed ControlNets."""
  root = tmp_path_factory.mktemp("tiny_sd_cn")
  build_tiny_sd_pipeline(root / "sd")
  unet = diffusers.UNet2DConditionModel.from_pretrained(root / "sd" / "unet")
  folders = []
  for seed in (11, 12):
    torch.manual_seed(seed)
    net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).eval()
    perturb(net, seed)
    net.save_pretrained(root / f"cn{seed}")
    folders.append(root / f"cn{seed}")
  return root / "sd", folders


def _inputs(seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, SIZE // 2, SIZE // 2, 4)).astype(np.float32)
  t = np.array([7, 901], np.int64)
  ctx = rng.standard_normal((2, 5, 32)).astype(np.float32)
  cond = rng.uniform(0.0, 1.0, (2, SIZE, SIZE, 3)).astype(np.float32)
  return x, t, ctx, cond


def _torch_residuals(net, x, t, ctx, cond, **kw):
  with torch.no_grad():
    down, mid = net(nchw(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx),
                    controlnet_cond=nchw(cond), return_dict=False, **kw)
  return [nhwc(d) for d in down], nhwc(mid)


def _jdiff_residuals(module, params, x, t, ctx, cond, **kw):
  down, mid = module.apply({"params": params}, jnp.asarray(x), jnp.asarray(t, jnp.int32), jnp.asarray(ctx),
                           jnp.asarray(cond), **kw)
  return [np.asarray(d) for d in down], np.asarray(mid)


def _max_rel(got, want) -> float:
  (gd, gm), (wd, wm) = got, want
  assert len(gd) == len(wd)
  return max([rel_err(g, w) for g, w in zip(gd, wd)] + [rel_err(gm, wm)])


@pytest.mark.parametrize("kw", [dict(conditioning_scale=0.8), dict(conditioning_scale=1.3, guess_mode=True)])
def test_load_controlnet_matches_diffusers(saved, kw):
  _, folders = saved
  ref = diffusers.ControlNetModel.from_pretrained(folders[0]).eval()
  module, params = load_controlnet(folders[0])
  assert module.config.conditioning_embedding_out_channels == (8, 16)
  x, t, ctx, cond = _inputs()
  want = _torch_residuals(ref, x, t, ctx, cond, **kw)
  got = _jdiff_residuals(module, params, x, t, ctx, cond, **kw)
  assert _max_rel(got, want) <= 1e-4
  assert min(float(np.abs(w).max()) for w in want[0]) > 1e-3  # perturbed zero convs: non-trivial residuals


def test_save_controlnet_loads_in_diffusers(saved, tmp_path):
  _, folders = saved
  module, params = load_controlnet(folders[1])
  # move the weights so the round trip is not just a copy of the diffusers file
  params = jax.tree.map(lambda p: p * 1.01, params)
  out = save_controlnet(module, params, tmp_path / "cn")
  back = diffusers.ControlNetModel.from_pretrained(out).eval()
  x, t, ctx, cond = _inputs(1)
  want = _jdiff_residuals(module, params, x, t, ctx, cond)
  got = _torch_residuals(back, x, t, ctx, cond)
  assert _max_rel(got, want) <= 1e-4


# ---- the pipeline ----

@pytest.fixture(scope="module")
def pipes(saved):
  sd, folders = saved
  one = StableDiffusion.from_diffusers(sd, controlnet=folders[0])
  two = StableDiffusion.from_diffusers(sd, controlnet=folders)
  return one, two


def _reference(saved, nets, latents, scheduler=None, **kwargs) -> np.ndarray:
  sd, folders = saved
  cn = [diffusers.ControlNetModel.from_pretrained(folders[i]).eval() for i in nets]
  pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
      sd, controlnet=cn[0] if len(cn) == 1 else cn, safety_checker=None, requires_safety_checker=False)
  if scheduler is not None:
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
  pipe.set_progress_bar_config(disable=True)
  with torch.no_grad():
    return pipe(latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), height=SIZE, width=SIZE,
                output_type="np", **kwargs).images


def _pil(seed: int, size=(40, 48)):
  from PIL import Image
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3)).astype(np.uint8))


def test_pipeline_single_controlnet_matches_diffusers(saved, pipes):
  one, _ = pipes
  latents = _latents(len(PROMPTS))
  image = _pil(0)  # 40x48: both sides Lanczos-resize it to 32x32
  want = _reference(saved, [0], latents, prompt=PROMPTS, image=image, num_inference_steps=4, guidance_scale=5.0,
                    controlnet_conditioning_scale=0.8)
  got = one.generate(PROMPTS, key=jax.random.key(0), num_steps=4, guidance_scale=5.0, latents=jnp.asarray(latents),
                     control_images=image, controlnet_conditioning_scale=0.8)
  assert got.shape == want.shape == (2, SIZE, SIZE, 3)
  assert float(np.max(np.abs(np.asarray(got) - want))) <= 1e-3
  # the ControlNet matters: a different control image changes the output
  other = one.generate(PROMPTS, key=jax.random.key(0), num_steps=4, guidance_scale=5.0,
                       latents=jnp.asarray(latents), control_images=_pil(1), controlnet_conditioning_scale=0.8)
  assert float(np.max(np.abs(np.asarray(other) - want))) > 1e-2


@pytest.mark.parametrize("scheduler,sampler", [(None, "ddim"), ("DPMSolverMultistepScheduler", "dpm_solver")])
def test_pipeline_two_controlnets_guess_mode_and_schedule_match_diffusers(saved, pipes, scheduler, sampler):
  """Start/end windows on DDIM's grid and on DPM-Solver++ 2M's (any sampler's grid)."""
  _, two = pipes
  latents = _latents(len(PROMPTS))
  images = [_pil(2, (32, 32)), np.asarray(_pil(3, (32, 32)), np.float32)[None] / 255.0]
  kw = dict(controlnet_conditioning_scale=[0.6, 1.2], guess_mode=True, control_guidance_start=[0.0, 0.25],
            control_guidance_end=[0.75, 1.0])
  want = _reference(saved, [0, 1], latents, scheduler, prompt=PROMPTS, image=[images[0], images[1]],
                    num_inference_steps=4, guidance_scale=5.0, **kw)
  got = two.generate(PROMPTS, key=jax.random.key(0), num_steps=4, guidance_scale=5.0, latents=jnp.asarray(latents),
                     control_images=images, sampler=sampler, **kw)
  assert float(np.max(np.abs(np.asarray(got) - want))) <= 1e-3


def test_pipeline_errors(saved, pipes):
  one, two = pipes
  with pytest.raises(ValueError, match="pass control_images"):
    one.generate("x", key=jax.random.key(0), num_steps=2)
  with pytest.raises(ValueError, match="one control image .* per ControlNet"):
    two.generate("x", key=jax.random.key(0), num_steps=2, control_images=_pil(0))
  with pytest.raises(ValueError, match="controlnet_conditioning_scale has 3 entries"):
    two.generate("x", key=jax.random.key(0), num_steps=2, control_images=[_pil(0), _pil(1)],
                 controlnet_conditioning_scale=[1.0, 1.0, 1.0])
  with pytest.raises(ValueError, match="0 <= start < end <= 1"):
    one.generate("x", key=jax.random.key(0), num_steps=2, control_images=_pil(0), control_guidance_start=0.6,
                 control_guidance_end=0.5)
  with pytest.raises(ValueError, match="3 control images for 2 prompts"):
    one.generate(["a", "b"], key=jax.random.key(0), num_steps=2, control_images=[_pil(0)] * 3)
  with pytest.raises(FileNotFoundError, match="ControlNet folder"):
    StableDiffusion.from_diffusers(saved[0], controlnet=saved[0] / "nope")
