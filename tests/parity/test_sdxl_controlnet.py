"""ControlNet for SDXL against diffusers: a ``ControlNetModel`` with the text-time embedding (made with
``ControlNetModel.from_unet`` from the tiny SDXL UNet of ``test_sdxl_models.py``, every weight perturbed so
the zero convolutions and the additional embedding matter) loaded and saved both ways, and
:class:`jdiff.sdxl.StableDiffusionXL` with ControlNets against ``StableDiffusionXLControlNetPipeline`` from
the same latents: DDIM and DPM-Solver++ guided, Euler unguided, one net and two (guess mode, start/end
windows, per-net scales).

Tolerances: the residuals are one encoder pass of the tiny UNet plus the hint encoder, covered by the 1e-4
relative network bound of ``tests/parity/__init__.py`` (its time ids reach 1024, bounded as in
``test_sdxl_models.py``); the images are the SDXL pipeline's computation plus one such pass per net and
step, bounded like ``test_sdxl_pipeline.py``'s (1e-4 of the [0, 1] range, a factor of ten above the
float32 rounding of ~1e-5 that the layers and steps accumulate).
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
from jdiff.sdxl import StableDiffusionXL  # noqa: E402
from tests.parity.test_sdxl_models import (PROJ, TIME_IDS, UNET, WIDTH_1, WIDTH_2, build_tiny_sdxl, nchw,  # noqa: E402
                                           perturb, rel_err)

TOL = 1e-4  # of the [0, 1] image range; residuals: relative (see the module docstring)
SIZE = 32  # pixels: 16 x 16 latents with the 2-level VAE; the hint encoder (8, 16) halves once
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on mars"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """(SDXL pipeline folder, [two ControlNet folders], an SD-style ControlNet folder without the text-time
  embedding)."""
  root = tmp_path_factory.mktemp("tiny_sdxl_cn")
  build_tiny_sdxl(root / "sdxl")
  unet = diffusers.UNet2DConditionModel.from_pretrained(root / "sdxl" / "unet")
  folders = []
  for seed in (21, 22):
    torch.manual_seed(seed)
    net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).eval()
    assert net.config.addition_embed_type == "text_time"
    perturb(net, seed)
    net.save_pretrained(root / f"cn{seed}")
    folders.append(root / f"cn{seed}")
  plain = {k: v for k, v in UNET.items() if k not in ("addition_embed_type", "addition_time_embed_dim",
                                                         "projection_class_embeddings_input_dim", "sample_size",
                                                         "out_channels", "up_block_types")}
  diffusers.ControlNetModel(**plain, conditioning_embedding_out_channels=(8, 16)).save_pretrained(root / "cn_sd")
  return root / "sdxl", folders, root / "cn_sd"


def _inputs(seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, SIZE // 2, SIZE // 2, 4)).astype(np.float32)
  t = np.array([7, 901], np.int64)
  ctx = rng.standard_normal((2, 5, WIDTH_1 + WIDTH_2)).astype(np.float32)
  pooled = rng.standard_normal((2, PROJ)).astype(np.float32)
  cond = rng.uniform(0.0, 1.0, (2, SIZE, SIZE, 3)).astype(np.float32)
  return x, t, ctx, pooled, cond


def _torch_residuals(net, x, t, ctx, pooled, cond, **kw):
  with torch.no_grad():
    down, mid = net(nchw(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx),
                    controlnet_cond=nchw(cond), return_dict=False,
                    added_cond_kwargs={"text_embeds": torch.from_numpy(pooled),
                                       "time_ids": torch.from_numpy(TIME_IDS)}, **kw)
  return [np.transpose(d.numpy(), (0, 2, 3, 1)) for d in down] + [np.transpose(mid.numpy(), (0, 2, 3, 1))]


def _jdiff_residuals(module, params, x, t, ctx, pooled, cond, **kw):
  down, mid = jax.jit(lambda p: module.apply({"params": p}, x, t.astype(np.int32), ctx, cond, text_embeds=pooled,
                                             time_ids=TIME_IDS, **kw))(params)
  return [np.asarray(d) for d in down] + [np.asarray(mid)]


def test_text_time_controlnet_loads_and_saves_like_diffusers(saved, tmp_path):
  _, folders, _ = saved
  ref = diffusers.ControlNetModel.from_pretrained(folders[0]).eval()
  module, params = load_controlnet(folders[0])
  assert module.config.unet.addition_embed_type == "text_time" and "add_embedding" in params
  x, t, ctx, pooled, cond = _inputs()
  want = _torch_residuals(ref, x, t, ctx, pooled, cond, conditioning_scale=0.8)
  got = _jdiff_residuals(module, params, x, t, ctx, pooled, cond, conditioning_scale=0.8)
  assert len(got) == len(want) == 5
  assert max(rel_err(g, w) for g, w in zip(got, want)) <= 1e-4
  assert min(float(np.abs(w).max()) for w in want) > 1e-3  # perturbed zero convs: non-trivial residuals
  # the text-time embedding matters: other time ids give other residuals
  other = jax.jit(lambda p: module.apply({"params": p}, x, t.astype(np.int32), ctx, cond, text_embeds=pooled,
                                         time_ids=TIME_IDS[::-1]))(params)
  assert rel_err(other[1], want[-1]) > 1e-3
  # jdiff -> diffusers: moved weights survive save_controlnet
  moved = jax.tree.map(lambda p: p * 1.01, params)
  back = diffusers.ControlNetModel.from_pretrained(save_controlnet(module, moved, tmp_path / "cn")).eval()
  assert back.config.addition_embed_type == "text_time"
  want = _jdiff_residuals(module, moved, x, t, ctx, pooled, cond)
  got = _torch_residuals(back, x, t, ctx, pooled, cond)
  assert max(rel_err(g, w) for g, w in zip(got, want)) <= 1e-4


# ---- the pipeline ----

@pytest.fixture(scope="module")
def pipes(saved):
  sdxl, folders, _ = saved
  one = StableDiffusion.from_diffusers(sdxl, controlnet=folders[0])  # SDXL folders go to the subclass
  two = StableDiffusionXL.from_diffusers(sdxl, controlnet=folders)
  return one, two


# DDIM with the options SD's scheduler configs set (from the folder's Euler config diffusers would clip x0)
DDIM = {"clip_sample": False, "set_alpha_to_one": False}


def _reference(saved, nets, latents, scheduler, options, **kwargs) -> np.ndarray:
  sdxl, folders, _ = saved
  cn = [diffusers.ControlNetModel.from_pretrained(folders[i]).eval() for i in nets]
  pipe = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(
      sdxl, controlnet=cn[0] if len(cn) == 1 else cn, add_watermarker=False)
  pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config, **options)
  pipe.set_progress_bar_config(disable=True)
  with torch.no_grad():
    return pipe(latents=nchw(latents), height=SIZE, width=SIZE, output_type="np", **kwargs).images


def _pil(seed: int, size=(40, 48)):
  from PIL import Image
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3)).astype(np.uint8))


MICRO = dict(original_size=(48, 64), crops_coords_top_left=(4, 8), target_size=(SIZE, SIZE))


# (scheduler, sampler, guidance, nets, extra): DDIM guided with one net (zeros as the negative
# conditioning), Euler unguided with micro-conditioning, DPM-Solver++ guided with two nets in guess mode
# with start/end windows and a negative prompt
CASES = [
    ("DDIMScheduler", "ddim", 5.0, [0], dict(controlnet_conditioning_scale=0.8)),
    ("EulerDiscreteScheduler", "euler", 1.0, [0], dict(controlnet_conditioning_scale=1.2, **MICRO)),
    ("DPMSolverMultistepScheduler", "dpm_solver", 5.0, [0, 1],
     dict(controlnet_conditioning_scale=[0.6, 1.2], guess_mode=True, control_guidance_start=[0.0, 0.25],
          control_guidance_end=[0.75, 1.0])),
]
# The quick suite runs the two-net DPM-Solver++ case (guidance, guess mode, windows); ~20 s per case.
QUICK = {"dpm_solver"}


@pytest.mark.parametrize("scheduler,sampler,guidance_scale,nets,extra",
                         [pytest.param(*c, marks=() if c[1] in QUICK else pytest.mark.slow) for c in CASES],
                         ids=[c[1] for c in CASES])
def test_pipeline_matches_diffusers(saved, pipes, scheduler, sampler, guidance_scale, nets, extra):
  latents, steps = np.random.default_rng(0).standard_normal((2, SIZE // 2, SIZE // 2, 4)).astype(np.float32), 4
  images = [_pil(0), _pil(1, (SIZE, SIZE))][:len(nets)]  # the 40x48 one: both sides Lanczos-resize it
  control = images[0] if len(nets) == 1 else images
  negative = ["blurry, low quality"] * 2 if len(nets) == 2 else None
  options = DDIM if sampler == "ddim" else {}
  want = _reference(saved, nets, latents, scheduler, options, prompt=PROMPTS, image=control, negative_prompt=negative,
                    num_inference_steps=steps, guidance_scale=guidance_scale, **extra)
  pipe = pipes[len(nets) - 1]
  got = pipe.generate(PROMPTS, key=jax.random.key(0), num_steps=steps, guidance_scale=guidance_scale,
                      sampler=sampler, negative_prompts=negative, latents=jnp.asarray(latents),
                      control_images=control, **extra, **options)
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape == (2, SIZE, SIZE, 3)
  assert float(np.max(np.abs(got - want))) <= TOL, float(np.max(np.abs(got - want)))
  assert float(np.std(want)) > 1e-3


def test_control_changes_the_image_and_errors_are_one_line(saved, pipes):
  sdxl, folders, plain = saved
  one, _ = pipes
  latents = jnp.asarray(np.random.default_rng(1).standard_normal((1, SIZE // 2, SIZE // 2, 4)), jnp.float32)
  run = lambda image: np.asarray(one.generate(  # noqa: E731
      "a cat", key=jax.random.key(0), num_steps=2, guidance_scale=1.0, sampler="euler", latents=latents,
      control_images=image))
  assert float(np.max(np.abs(run(_pil(0)) - run(_pil(1))))) > 10 * TOL  # far above the parity bound
  with pytest.raises(ValueError, match="pass control_images"):
    one.generate("x", key=jax.random.key(0), num_steps=2)
  with pytest.raises(ValueError, match="addition_embed_type=None .* SD 1.x/2.x ControlNet on SDXL") as err:
    StableDiffusionXL.from_diffusers(sdxl, controlnet=plain)
  assert "\n" not in str(err.value)
  with pytest.raises(FileNotFoundError, match="ControlNet folder"):
    StableDiffusionXL.from_diffusers(sdxl, controlnet=folders[0].parent / "nope")
