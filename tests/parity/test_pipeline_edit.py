"""Editing pipelines against diffusers on tiny random pipelines saved with ``save_pretrained``:
img2img with multistep solvers (a cut of any sampler's grid), inpainting with a 9-channel and with a
4-channel UNet, an LCM checkpoint guided through its w-embedding, guidance rescale, DDIM inversion
(against a loop over ``DDIMInverseScheduler``) and the single-file / textual-inversion methods.

Both sides encode with the VAE posterior mean (diffusers' ``retrieve_latents`` patched to the mode) and
use the same noise, so the runs are deterministic. Tolerance: the images of these float32 pipelines
agree to ~1e-6; 1e-4 of the image range (the issue's bound) leaves room for the differing summation
orders of two frameworks over ~30 layers (float32 epsilon 1.2e-7 times a growth of ~1e2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from jdiff import samplers  # noqa: E402
from jdiff.pipelines import StableDiffusion  # noqa: E402
from tests.parity.test_pipeline import PROMPTS, SIZE, _latents, build_tiny_sd_pipeline  # noqa: E402

TOL = 1e-4  # of the [0, 1] image range, see the module docstring
RETRIEVE = "retrieve_latents"


def _mode(out, generator=None, sample_mode="sample"):
  return out.latent_dist.mode()


def _nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _images(batch: int, seed: int = 3) -> np.ndarray:
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0.0, 1.0, (batch, SIZE // 8, SIZE // 8, 3))
  return np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2).astype(np.float32)


def _masks(batch: int) -> np.ndarray:
  """Masks in [0, 1] at 4-pixel granularity (not aligned to the 2x latent cells), [B, H, W, 1]."""
  rng = np.random.default_rng(7)
  coarse = rng.uniform(0.0, 1.0, (batch, SIZE // 4, SIZE // 4, 1))
  return np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2).astype(np.float32)


def _assert_close(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  assert float(np.max(np.abs(got - want))) <= TOL, float(np.max(np.abs(got - want)))
  assert float(np.std(want)) > 1e-3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny_sd_edit")
  build_tiny_sd_pipeline(root)
  return root


@pytest.fixture(scope="module")
def ours(folder):
  return StableDiffusion.from_diffusers(folder)


def _diffusers(cls, folder, scheduler=None, **scheduler_options):
  pipe = cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
  if scheduler is not None:
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config, **scheduler_options)
  pipe.set_progress_bar_config(disable=True)
  return pipe


# ---- img2img: any sampler starts at a cut of its grid ----

@pytest.mark.parametrize("scheduler,sampler,options", [
    ("DPMSolverMultistepScheduler", "dpm_solver", {"solver_order": 2}),
    ("UniPCMultistepScheduler", "unipc", {}),
    ("EulerDiscreteScheduler", "euler", {"use_karras_sigmas": True}),
])
def test_img2img_with_any_sampler_matches_diffusers(folder, ours, monkeypatch, scheduler, sampler, options):
  from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as mod

  images, noise = _images(2), _latents(2)
  monkeypatch.setattr(mod, RETRIEVE, _mode)
  monkeypatch.setattr(mod, "randn_tensor", lambda shape, **kw: _nchw(noise))
  pipe = _diffusers(diffusers.StableDiffusionImg2ImgPipeline, folder, scheduler, **options)
  with torch.no_grad():
    want = pipe(prompt=PROMPTS, image=images, strength=0.6, num_inference_steps=6, guidance_scale=6.0,
                output_type="np").images
  jd_options = {"order": 2} if sampler == "dpm_solver" else dict(options)
  got = ours.img2img(images, PROMPTS, key=jax.random.key(0), strength=0.6, num_steps=6, guidance_scale=6.0,
                     sampler=sampler, noise=jnp.asarray(noise), sample_posterior=False, **jd_options)
  _assert_close(got, want)


# ---- inpainting ----

@pytest.fixture(scope="module")
def inpaint_folder(tmp_path_factory, folder):
  """The tiny pipeline with a 9-channel (inpainting) UNet."""
  root = tmp_path_factory.mktemp("tiny_sd_inpaint")
  base = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
  torch.manual_seed(1)
  config = dict(base.unet.config)
  config["in_channels"] = 9
  unet = diffusers.UNet2DConditionModel.from_config(config).eval()
  pipe = diffusers.StableDiffusionInpaintPipeline(vae=base.vae, text_encoder=base.text_encoder,
                                                  tokenizer=base.tokenizer, unet=unet, scheduler=base.scheduler,
                                                  safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False)
  pipe.save_pretrained(root)
  return root


@pytest.mark.parametrize("kind,scheduler,sampler", [
    ("9-channel", None, "ddim"),
    ("4-channel", None, "ddim"),
    ("4-channel", "DPMSolverMultistepScheduler", "dpm_solver"),
])
def test_inpaint_matches_diffusers(folder, inpaint_folder, ours, monkeypatch, kind, scheduler, sampler):
  from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as mod

  root = inpaint_folder if kind == "9-channel" else folder
  jd = StableDiffusion.from_diffusers(root) if kind == "9-channel" else ours
  images, masks, noise = _images(2, seed=5), _masks(2), _latents(2)
  monkeypatch.setattr(mod, RETRIEVE, _mode)
  pipe = _diffusers(diffusers.StableDiffusionInpaintPipeline, root, scheduler)
  with torch.no_grad():
    want = pipe(prompt=PROMPTS, image=images, mask_image=masks, num_inference_steps=5, guidance_scale=6.0,
                latents=_nchw(noise), height=SIZE, width=SIZE, output_type="np").images
  got = jd.inpaint(images, masks, PROMPTS, key=jax.random.key(0), num_steps=5, guidance_scale=6.0, sampler=sampler,
                   noise=jnp.asarray(noise), sample_posterior=False)
  _assert_close(got, want)
  if kind == "4-channel":  # outside the mask the known latents are kept
    other = jd.inpaint(images, np.zeros_like(masks), PROMPTS, key=jax.random.key(0), num_steps=5,
                       guidance_scale=6.0, sampler=sampler, noise=jnp.asarray(noise), sample_posterior=False)
    z = ours.encode_images(ours.vae_params, jnp.asarray(images) * 2.0 - 1.0, sample=False)
    np.testing.assert_allclose(other, ours.decode(ours.vae_params, z) * 0.5 + 0.5, atol=1e-5)


def test_inpaint_errors(ours):
  images = _images(1)
  with pytest.raises(ValueError, match="the images' size"):
    ours.inpaint(images, np.ones((1, SIZE, SIZE - 8)), "x", key=jax.random.key(0), num_steps=2)
  with pytest.raises(ValueError, match="cannot keep the unmasked region"):
    ours.inpaint(images, np.ones((1, SIZE, SIZE)), "x", key=jax.random.key(0), num_steps=2, sampler="heun")
  with pytest.raises(ValueError, match="strength"):
    ours.inpaint(images, np.ones((1, SIZE, SIZE)), "x", key=jax.random.key(0), num_steps=2, strength=1.5)


# ---- LCM checkpoints: guided through the w-embedding, one batch ----

@pytest.fixture(scope="module")
def lcm_folder(tmp_path_factory, folder):
  root = tmp_path_factory.mktemp("tiny_lcm")
  base = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
  torch.manual_seed(2)
  config = dict(base.unet.config)
  config["time_cond_proj_dim"] = 8
  unet = diffusers.UNet2DConditionModel.from_config(config).eval()
  scheduler = diffusers.LCMScheduler.from_config(base.scheduler.config)
  pipe = diffusers.LatentConsistencyModelPipeline(vae=base.vae, text_encoder=base.text_encoder,
                                                   tokenizer=base.tokenizer, unet=unet, scheduler=scheduler,
                                                   safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
  pipe.save_pretrained(root)
  return root


def test_lcm_checkpoint_matches_diffusers(lcm_folder):
  from diffusers.schedulers import scheduling_lcm

  jd = StableDiffusion.from_diffusers(lcm_folder)
  assert jd.defaults["sampler"] == "lcm" and jd.guidance_embedding_dim == 8
  latents, key, steps = _latents(2), jax.random.key(4), 4
  # the noise LCM adds between steps: generate's sampler key is the second half of its key
  step_keys = jax.random.split(jax.random.split(key)[1], steps)
  noises = iter([_nchw(samplers.step_noise(k, latents.shape)) for k in step_keys[:-1]])
  pipe = diffusers.LatentConsistencyModelPipeline.from_pretrained(lcm_folder, safety_checker=None,
                                                                  requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  original = scheduling_lcm.randn_tensor
  scheduling_lcm.randn_tensor = lambda shape, **kw: next(noises)
  try:
    with torch.no_grad():
      want = pipe(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=8.0, latents=_nchw(latents),
                  output_type="np").images
  finally:
    scheduling_lcm.randn_tensor = original
  got = jd.generate(PROMPTS, key=key, num_steps=steps, guidance_scale=8.0, latents=jnp.asarray(latents))
  _assert_close(got, want)


# ---- guidance rescale ----

def test_guidance_rescale_matches_diffusers(folder, ours):
  latents = _latents(2)
  pipe = _diffusers(diffusers.StableDiffusionPipeline, folder)
  with torch.no_grad():
    want = pipe(prompt=PROMPTS, num_inference_steps=4, guidance_scale=6.0, guidance_rescale=0.7,
                latents=_nchw(latents), output_type="np").images
  got = ours.generate(PROMPTS, key=jax.random.key(0), num_steps=4, guidance_scale=6.0, guidance_rescale=0.7,
                      latents=jnp.asarray(latents))
  _assert_close(got, want)
  plain = ours.generate(PROMPTS, key=jax.random.key(0), num_steps=4, guidance_scale=6.0, latents=jnp.asarray(latents))
  assert float(np.max(np.abs(np.asarray(plain) - want))) > 10 * TOL  # the rescale matters


# ---- DDIM inversion ----

def test_invert_matches_a_loop_over_ddim_inverse_scheduler(folder, ours):
  images, steps = _images(2, seed=9), 6
  pipe = _diffusers(diffusers.StableDiffusionPipeline, folder)
  inverse = diffusers.DDIMInverseScheduler.from_config(pipe.scheduler.config)
  inverse.set_timesteps(steps)
  with torch.no_grad():
    z = pipe.vae.encode(_nchw(images * 2.0 - 1.0)).latent_dist.mode() * pipe.vae.config.scaling_factor
    emb, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    for t in inverse.timesteps:
      z = inverse.step(pipe.unet(z, t, encoder_hidden_states=emb).sample, t, z).prev_sample
  got = ours.invert(images, PROMPTS, num_steps=steps, guidance_scale=1.0)
  want = z.numpy().transpose(0, 2, 3, 1)
  scale = float(np.max(np.abs(want)))
  assert float(np.max(np.abs(np.asarray(got) - want))) <= TOL * scale


# ---- single-file and textual-inversion methods ----

def test_single_file_and_textual_inversion_methods(folder, ours, tmp_path):
  from safetensors.numpy import save_file

  path = ours.save_single_file(tmp_path / "model.safetensors", family="sd15")
  back = StableDiffusion.from_single_file(path, config=folder)
  for a, b in zip(jax.tree.leaves(ours.unet_params), jax.tree.leaves(back.unet_params)):
    np.testing.assert_array_equal(a, b)
  width = ours.text_encoder.config.hidden_size
  emb = np.random.default_rng(0).standard_normal((width,)).astype(np.float32)
  save_file({"<tiny-cat>": emb}, str(tmp_path / "learned_embeds.safetensors"))
  cat = ours.load_textual_inversion(tmp_path / "learned_embeds.safetensors")
  assert ours.tokenizer("a <tiny-cat>").tolist() != cat.tokenizer("a <tiny-cat>").tolist()
  ids = jnp.asarray(cat.tokenizer(["a <tiny-cat>"]))
  new_id = int(cat.tokenizer.added["<tiny-cat>"])
  assert new_id in ids.tolist()[0]
  (tmp_path / "model.ckpt").write_bytes(b"\x80\x02")
  with pytest.raises(ValueError, match="pickle"):
    StableDiffusion.from_single_file(tmp_path / "model.ckpt", config=folder)
