"""Full Stable Diffusion pipeline parity: a tiny random diffusers StableDiffusionPipeline saved with
save_pretrained, loaded by StableDiffusion.from_diffusers, same latents / prompts / DDIM steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jdiff.pipelines import StableDiffusion
from tests.parity.test_tokenizer import write_clip_vocab

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PROMPTS = ["a photo of a cat", "an astronaut riding a horse on mars, high detail"]
SIZE = 32  # pixels; latents are 16x16 with the 2-level VAE


def build_tiny_sd_pipeline(folder) -> None:
  """Saves a tiny random StableDiffusionPipeline (DDIM scheduler with SD's defaults) into ``folder``."""
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(
      sample_size=16, block_out_channels=(32, 64), layers_per_block=1, in_channels=4, out_channels=4,
      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
      cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
  vae = diffusers.AutoencoderKL(
      block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
      norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
      sample_size=SIZE)
  vocab_size = write_clip_vocab(folder / "_vocab")
  tokenizer = transformers.CLIPTokenizer(vocab=str(folder / "_vocab" / "vocab.json"),
                                         merges=str(folder / "_vocab" / "merges.txt"), model_max_length=77)
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id))
  scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      clip_sample=False, set_alpha_to_one=False, steps_offset=1)
  pipe = diffusers.StableDiffusionPipeline(unet=unet.eval(), vae=vae.eval(), text_encoder=text.eval(),
                                           tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(folder)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tiny_sd")
  build_tiny_sd_pipeline(folder)
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                           requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  return folder, pipe


@pytest.fixture(scope="module")
def ours(saved):
  return StableDiffusion.from_diffusers(saved[0])


def _latents(batch: int) -> np.ndarray:
  return np.random.default_rng(0).standard_normal((batch, SIZE // 2, SIZE // 2, 4)).astype(np.float32)


def _reference(pipe, latents, **kwargs) -> np.ndarray:
  with torch.no_grad():
    return pipe(latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), height=SIZE, width=SIZE,
                output_type="np", **kwargs).images


def test_loads_pipeline_parts(ours):
  assert ours.prediction == "epsilon"
  assert ours.sampler_options["steps_offset"] == 1 and ours.sampler_options["set_alpha_to_one"] is False
  assert ours.tokenizer.max_length == 77
  assert ours.default_size == 32


@pytest.mark.parametrize("guidance_scale,negative", [
    (7.5, None), (3.0, ["blurry", "low quality, text"]),
    pytest.param(1.0, None, marks=pytest.mark.slow)])  # no guidance: a second program to compile
def test_txt2img_ddim_matches_diffusers(saved, ours, guidance_scale, negative):
  _, pipe = saved
  latents = _latents(len(PROMPTS))
  want = _reference(pipe, latents, prompt=PROMPTS, negative_prompt=negative, num_inference_steps=5,
                    guidance_scale=guidance_scale)
  got = ours.generate(PROMPTS, key=jax.random.key(0), num_steps=5, guidance_scale=guidance_scale,
                      negative_prompts=negative, latents=jnp.asarray(latents))
  assert got.shape == want.shape == (2, SIZE, SIZE, 3)
  assert float(np.max(np.abs(np.asarray(got) - want))) <= 1e-3
  assert float(np.std(want)) > 1e-3  # the images are not trivially constant


def test_one_program_per_shape(ours):
  latents = jnp.asarray(_latents(2))
  ours.generate(PROMPTS, key=jax.random.key(0), num_steps=5, latents=latents)
  guided = [k for k in ours._programs if k[2] == 5 and k[3]]
  assert len(guided) == 1
  program = ours._programs[guided[0]]
  before = program._cache_size()
  images = ours.generate(["other", "prompts"], key=jax.random.key(1), num_steps=5, guidance_scale=5.0)
  assert program._cache_size() == before  # new prompts / scale / latents from the key: no recompilation
  assert len([k for k in ours._programs if k[2] == 5 and k[3]]) == 1
  assert images.shape == (2, SIZE, SIZE, 3)  # default size: UNet sample_size x VAE factor
  assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0


def test_errors(ours, tmp_path):
  with pytest.raises(ValueError, match="negative_prompts"):
    ours.generate(PROMPTS, key=jax.random.key(0), num_steps=2, negative_prompts=["x"])
  with pytest.raises(ValueError, match="multiples of"):
    ours.generate(PROMPTS, key=jax.random.key(0), num_steps=2, height=30)
  with pytest.raises(ValueError, match="unknown sampler"):
    ours.generate(PROMPTS, key=jax.random.key(0), num_steps=2, sampler="nope")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    StableDiffusion.from_diffusers(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="model_index.json"):
    StableDiffusion.from_diffusers(tmp_path)
