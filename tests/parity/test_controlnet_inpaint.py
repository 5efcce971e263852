"""ControlNet inside inpainting and img2img against diffusers' ``StableDiffusionControlNetInpaintPipeline``
and ``StableDiffusionControlNetImg2ImgPipeline``: the tiny random pipeline and perturbed ControlNets of
``test_controlnet_interop`` (saved with ``save_pretrained``), its 9-channel inpainting variant from
``test_pipeline_edit``, same latents / noise / masks / control images.

Both sides encode with the VAE posterior mean (``retrieve_latents`` patched to the mode); below strength 1
diffusers' noise draw is patched to the same array. Tolerance: 1e-4 of the [0, 1] image range, as in
``test_pipeline_edit`` (float32 epsilon times the growth through ~30 layers of two frameworks' kernels).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jdiff.pipelines import StableDiffusion  # noqa: E402
from tests.parity.test_controlnet_interop import saved  # noqa: E402,F401  (module-scoped fixture)
from tests.parity.test_pipeline import PROMPTS, SIZE, _latents  # noqa: E402
from tests.parity.test_pipeline_edit import _images, _masks, _mode, _nchw, inpaint_folder  # noqa: E402,F401

TOL = 1e-4  # of the [0, 1] image range, see the module docstring


@pytest.fixture(scope="module")
def folder(saved):  # noqa: F811  (the base pipeline ``inpaint_folder`` derives its 9-channel UNet from)
  return saved[0]


@pytest.fixture(scope="module")
def pipes(saved, inpaint_folder):  # noqa: F811
  sd, nets = saved
  return {"4-channel": StableDiffusion.from_diffusers(sd, controlnet=nets),
          "9-channel": StableDiffusion.from_diffusers(inpaint_folder, controlnet=nets[0])}


def _control(seed: int) -> np.ndarray:
  return np.random.default_rng(seed).uniform(0.0, 1.0, (1, SIZE, SIZE, 3)).astype(np.float32)


def _reference(cls, module, root, nets, scheduler, noise, **kwargs) -> np.ndarray:
  cn = [diffusers.ControlNetModel.from_pretrained(n).eval() for n in nets]
  pipe = cls.from_pretrained(root, controlnet=cn[0] if len(cn) == 1 else cn, safety_checker=None,
                             requires_safety_checker=False)
  if scheduler is not None:
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
  pipe.set_progress_bar_config(disable=True)
  patch = pytest.MonkeyPatch()
  patch.setattr(module, "retrieve_latents", _mode)
  patch.setattr(module, "randn_tensor", lambda shape, **kw: _nchw(noise))
  try:
    with torch.no_grad():
      return pipe(prompt=PROMPTS, output_type="np", **kwargs).images
  finally:
    patch.undo()


def _assert_close(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  assert float(np.max(np.abs(got - want))) <= TOL, float(np.max(np.abs(got - want)))
  assert float(np.std(want)) > 1e-3


@pytest.mark.parametrize("kind,scheduler,sampler,strength,nets", [
    ("9-channel", None, "ddim", 1.0, 1),
    ("4-channel", "DPMSolverMultistepScheduler", "dpm_solver", 0.6, 2),
])
def test_controlnet_inpaint_matches_diffusers(saved, inpaint_folder, pipes,  # noqa: F811
                                              kind, scheduler, sampler, strength, nets):
  from diffusers.pipelines.controlnet import pipeline_controlnet_inpaint as mod

  sd, folders = saved
  root = inpaint_folder if kind == "9-channel" else sd
  images, masks, noise = _images(2, seed=5), _masks(2), _latents(2)
  controls = [_control(21), _control(22)][:nets]
  if nets == 1:  # one net, a window that ends before the last step
    kw = dict(controlnet_conditioning_scale=0.8, control_guidance_end=0.75)
  else:  # two nets, guess mode, windows on the 3 steps strength 0.6 keeps of 6
    kw = dict(controlnet_conditioning_scale=[0.6, 1.2], guess_mode=True, control_guidance_start=[0.0, 0.3],
              control_guidance_end=[0.7, 1.0])
  given = {"latents": _nchw(noise)} if strength == 1.0 else {}  # below 1 the patched draw is the noise
  want = _reference(diffusers.StableDiffusionControlNetInpaintPipeline, mod, root, folders[:nets], scheduler, noise,
                    image=images, mask_image=masks, control_image=controls[0] if nets == 1 else controls,
                    num_inference_steps=6, strength=strength, guidance_scale=6.0, height=SIZE, width=SIZE,
                    **given, **kw)
  jd = pipes[kind]
  if nets == 1 and len(jd.controlnets) != 1:
    raise AssertionError("the 9-channel pipeline holds one ControlNet")
  got = jd.inpaint(images, masks, PROMPTS, key=jax.random.key(0), num_steps=6, strength=strength,
                   guidance_scale=6.0, sampler=sampler, noise=jnp.asarray(noise), sample_posterior=False,
                   control_images=controls[0] if nets == 1 else controls, **kw)
  _assert_close(got, want)
  # the ControlNets matter: another control image moves the result far beyond the tolerance
  other = jd.inpaint(images, masks, PROMPTS, key=jax.random.key(0), num_steps=6, strength=strength,
                     guidance_scale=6.0, sampler=sampler, noise=jnp.asarray(noise), sample_posterior=False,
                     control_images=_control(23) if nets == 1 else [_control(23), _control(24)], **kw)
  assert float(np.max(np.abs(np.asarray(other) - want))) > 100 * TOL


def test_controlnet_img2img_matches_diffusers(saved, pipes):  # noqa: F811
  from diffusers.pipelines.controlnet import pipeline_controlnet_img2img as mod

  sd, folders = saved
  images, noise = _images(2), _latents(2)
  controls = [_control(31), _control(32)]
  kw = dict(controlnet_conditioning_scale=[0.7, 1.1], control_guidance_start=[0.0, 0.4],
            control_guidance_end=[0.6, 1.0])
  want = _reference(diffusers.StableDiffusionControlNetImg2ImgPipeline, mod, sd, folders, "UniPCMultistepScheduler",
                    noise, image=images, control_image=controls, num_inference_steps=6, strength=0.6,
                    guidance_scale=6.0, height=SIZE, width=SIZE, **kw)
  got = pipes["4-channel"].img2img(images, PROMPTS, key=jax.random.key(0), num_steps=6, strength=0.6,
                                   guidance_scale=6.0, sampler="unipc", noise=jnp.asarray(noise),
                                   sample_posterior=False, control_images=controls, **kw)
  _assert_close(got, want)


def test_controlnet_edit_errors(pipes):
  jd = pipes["4-channel"]
  images, masks = _images(1), _masks(1)
  with pytest.raises(ValueError, match="pass control_images"):
    jd.inpaint(images, masks, "x", key=jax.random.key(0), num_steps=2)
  with pytest.raises(ValueError, match="one control image .* per ControlNet"):
    jd.img2img(images, "x", key=jax.random.key(0), num_steps=2, control_images=_control(0))
  plain = StableDiffusion.from_diffusers(jd.source)
  with pytest.raises(ValueError, match="no ControlNet"):
    plain.inpaint(images, masks, "x", key=jax.random.key(0), num_steps=2, control_images=_control(0))
