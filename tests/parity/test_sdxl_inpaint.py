"""StableDiffusionXL's inherited inpaint and invert (the base class's programs with SDXL's conditioning: both
text encoders, pooled text, and the default micro-conditioning time ids of the image size) against diffusers on
the tiny random SDXL folder of ``test_sdxl_pipeline.py``: ``StableDiffusionXLInpaintPipeline`` with the ordinary
4-channel UNet (same noise, VAE posterior mean), and DDIM inversion against a loop over ``DDIMInverseScheduler``
with the SDXL UNet's added conditioning. Tolerance 1e-4 of the image range / of the latents' scale, as
``test_sdxl_pipeline.py`` argues.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from tests.parity.test_sdxl_pipeline import (PROMPTS, SIZE, TOL, _assert_close, _diffusers, _latents, _nchw,  # noqa: E402
                                             base, folders)  # noqa: F401  (module fixtures)


def _images(batch, seed):
  rng = np.random.default_rng(seed)
  return np.repeat(np.repeat(rng.uniform(0.0, 1.0, (batch, SIZE // 8, SIZE // 8, 3)), 8, 1), 8, 2).astype(np.float32)


def test_inpaint_matches_diffusers(folders, base, monkeypatch):  # noqa: F811
  from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_inpaint as mod

  images, noise = _images(2, 5), _latents(2, seed=6)
  rng = np.random.default_rng(7)
  masks = np.repeat(np.repeat(rng.uniform(0.0, 1.0, (2, SIZE // 4, SIZE // 4, 1)), 4, 1), 4, 2).astype(np.float32)
  monkeypatch.setattr(mod, "retrieve_latents", lambda out, generator=None, sample_mode="sample": out.latent_dist.mode())
  pipe = _diffusers(diffusers.StableDiffusionXLInpaintPipeline, folders[0])
  with torch.no_grad():
    want = pipe(prompt=PROMPTS, image=images, mask_image=masks, strength=1.0, num_inference_steps=4,
                guidance_scale=6.0, latents=_nchw(noise), height=SIZE, width=SIZE, output_type="np").images
  got = base.inpaint(images, masks, PROMPTS, key=jax.random.key(0), num_steps=4, guidance_scale=6.0, sampler="euler",
                     noise=jnp.asarray(noise), sample_posterior=False)
  _assert_close(got, want)


def test_invert_matches_a_loop_over_ddim_inverse_scheduler(folders, base):  # noqa: F811
  images, steps = _images(2, 9), 5
  pipe = _diffusers(diffusers.StableDiffusionXLPipeline, folders[0])
  inverse = diffusers.DDIMInverseScheduler.from_config(pipe.scheduler.config, clip_sample=False)
  inverse.set_timesteps(steps)
  ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2, dtype=torch.float32)
  with torch.no_grad():
    z = pipe.vae.encode(_nchw(images * 2.0 - 1.0)).latent_dist.mode() * pipe.vae.config.scaling_factor
    emb, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                           do_classifier_free_guidance=False)
    for t in inverse.timesteps:
      eps = pipe.unet(z, t, encoder_hidden_states=emb, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
      z = inverse.step(eps, t, z).prev_sample
  got = base.invert(images, PROMPTS, num_steps=steps, guidance_scale=1.0)
  want = z.numpy().transpose(0, 2, 3, 1)
  assert float(np.max(np.abs(np.asarray(got) - want))) <= TOL * float(np.max(np.abs(want)))
