"""Image-to-image and LoRA generation against diffusers on the tiny random Stable Diffusion pipeline.

img2img: diffusers' ``StableDiffusionImg2ImgPipeline`` with its VAE posterior sample replaced by the
mean and its noise draw replaced by our noise (monkeypatched), so both sides are deterministic.
LoRA: PEFT adapters on the UNet and text encoder saved with diffusers' ``save_lora_weights``, loaded
by ``pipe.load_lora_weights`` and applied with ``cross_attention_kwargs={"scale": s}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jdiff.pipelines import StableDiffusion  # noqa: E402
from tests.parity.test_pipeline import PROMPTS, SIZE, _latents, _reference, build_tiny_sd_pipeline  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tiny_sd_extras")
  build_tiny_sd_pipeline(folder)
  return folder


@pytest.fixture(scope="module")
def ours(saved):
  return StableDiffusion.from_diffusers(saved)


def _images(batch: int) -> np.ndarray:
  """Smooth random images in [0, 1]: [B, SIZE, SIZE, 3]."""
  rng = np.random.default_rng(3)
  coarse = rng.uniform(0.0, 1.0, (batch, SIZE // 8, SIZE // 8, 3))
  return np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2).astype(np.float32)


# ---- image-to-image ----

def test_img2img_ddim_matches_diffusers(saved, ours, monkeypatch):
  from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as mod

  images = _images(len(PROMPTS))
  noise = _latents(len(PROMPTS))
  monkeypatch.setattr(mod, "retrieve_latents", lambda out, generator=None: out.latent_dist.mode())
  monkeypatch.setattr(mod, "randn_tensor", lambda shape, **kw: torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()))
  pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(saved, safety_checker=None,
                                                                  requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  with torch.no_grad():
    want = pipe(prompt=PROMPTS, image=images, strength=0.6, num_inference_steps=5, guidance_scale=6.0,
                output_type="np").images
  got = ours.img2img(images, PROMPTS, key=jax.random.key(0), strength=0.6, num_steps=5, guidance_scale=6.0,
                     noise=jnp.asarray(noise), sample_posterior=False)
  assert got.shape == want.shape == (2, SIZE, SIZE, 3)
  assert float(np.max(np.abs(np.asarray(got) - want))) <= 1e-3
  assert float(np.std(want)) > 1e-3


def test_img2img_sampled_posterior_and_errors(ours):
  images = _images(2)  # same shapes and statics as the parity test: the program is reused
  kw = dict(strength=0.6, num_steps=5, guidance_scale=6.0)
  a = ours.img2img(images, PROMPTS, key=jax.random.key(1), **kw)
  programs = len(ours._programs)
  b = ours.img2img(images, PROMPTS, key=jax.random.key(1), **kw)
  c = ours.img2img(images, PROMPTS, key=jax.random.key(2), **kw)
  mean = ours.img2img(images, PROMPTS, key=jax.random.key(1), sample_posterior=False, **kw)
  assert len(ours._programs) == programs
  np.testing.assert_array_equal(a, b)  # keyed: reproducible
  assert float(jnp.abs(a - c).max()) > 1e-3  # and the key matters
  assert float(jnp.abs(a - mean).max()) > 1e-4  # the posterior sample is not its mean
  with pytest.raises(ValueError, match="strength"):
    ours.img2img(images, "a cat", key=jax.random.key(0), strength=0.0, num_steps=5)
  with pytest.raises(ValueError, match="no denoising step"):
    ours.img2img(images, "a cat", key=jax.random.key(0), strength=0.1, num_steps=5)
  with pytest.raises(ValueError, match="multiples of"):
    ours.img2img(images[:, :30], "a cat", key=jax.random.key(0), num_steps=5)
  with pytest.raises(ValueError, match="2 images for 3 prompts"):
    ours.img2img(_images(2), ["a", "b", "c"], key=jax.random.key(0), num_steps=5)


# ---- LoRA ----

def _add_lora(model, targets, seed: int, rank: int = 4, alpha: float = 8.0) -> dict:
  """Injects a PEFT LoRA (B randomised) into a torch module; returns its config as a dict."""
  peft = pytest.importorskip("peft")
  config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian")
  peft.inject_adapter_in_model(config, model)  # transformers' add_adapter wants a newer peft
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_B" in name:  # B starts at zero: give it values so the adapter matters
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))
  return config.to_dict()


@pytest.fixture(scope="module")
def lora_file(saved, tmp_path_factory):
  """A UNet + text-encoder LoRA made with PEFT and written by diffusers' save_lora_weights."""
  pytest.importorskip("peft")
  from diffusers.utils import convert_state_dict_to_diffusers
  from peft.utils import get_peft_model_state_dict

  pipe = diffusers.StableDiffusionPipeline.from_pretrained(saved, safety_checker=None, requires_safety_checker=False)
  unet_meta = _add_lora(pipe.unet, TARGETS, 1)
  text_meta = _add_lora(pipe.text_encoder, TEXT_TARGETS, 2, rank=2, alpha=3.0)
  out = tmp_path_factory.mktemp("lora")
  diffusers.StableDiffusionPipeline.save_lora_weights(
      out, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
      text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder)),
      unet_lora_adapter_metadata=unet_meta, text_encoder_lora_adapter_metadata=text_meta)
  return out / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def lora_reference(saved, lora_file):
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(saved, safety_checker=None, requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  pipe.load_lora_weights(str(lora_file))
  return pipe


def test_lora_file_loads_both_components(ours, lora_file):
  adapters = ours.load_lora(lora_file)  # text-encoder keys as diffusers + transformers 5 write them
  assert set(adapters) == {"unet", "text_encoder"}
  assert {s for _, s in adapters["unet"].scales} == {2.0} and {s for _, s in adapters["text_encoder"].scales} == {1.5}


@pytest.mark.parametrize("scale", [0.7])
def test_generate_with_lora_matches_diffusers(ours, lora_file, lora_reference, scale):
  latents = _latents(len(PROMPTS))
  want = _reference(lora_reference, latents, prompt=PROMPTS, num_inference_steps=4, guidance_scale=5.0,
                    cross_attention_kwargs={"scale": scale})
  plain = np.asarray(ours.generate(PROMPTS, key=jax.random.key(0), num_steps=4, guidance_scale=5.0,
                                   latents=jnp.asarray(latents)))
  programs = dict(ours._programs)
  sizes = {k: p._cache_size() for k, p in programs.items()}
  got = np.asarray(ours.generate(PROMPTS, key=jax.random.key(0), num_steps=4, guidance_scale=5.0,
                                 latents=jnp.asarray(latents), lora=str(lora_file), lora_scale=scale))
  assert float(np.max(np.abs(got - want))) <= 1e-3
  assert float(np.max(np.abs(plain - want))) > 1e-2  # the adapter changes the images
  # parameters are program arguments: adding a LoRA compiles nothing new
  assert ours._programs.keys() == programs.keys()
  assert {k: p._cache_size() for k, p in ours._programs.items()} == sizes
  # several adapters with separate scales add up: (f, 0.3) + (f, 0.4) == (f, 0.7)
  split = np.asarray(ours.generate(PROMPTS, key=jax.random.key(0), num_steps=4, guidance_scale=5.0,
                                   latents=jnp.asarray(latents), lora=[(lora_file, 0.3), (lora_file, 0.4)]))
  assert float(np.max(np.abs(split - got))) <= 1e-4
  # base parameters are untouched
  again = np.asarray(ours.generate(PROMPTS, key=jax.random.key(0), num_steps=4, guidance_scale=5.0,
                                   latents=jnp.asarray(latents)))
  np.testing.assert_array_equal(again, plain)


def test_lora_errors(ours, tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.safetensors"):
    ours.generate("x", key=jax.random.key(0), num_steps=2, lora=tmp_path / "missing.safetensors")
  (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(ValueError, match="junk.safetensors"):
    ours.lora_params(tmp_path / "junk.safetensors")
  with pytest.raises(ValueError, match="lora must be"):
    ours.lora_params(3.0)


# ---- the bundle's pure pieces (what a trainer composes) ----

def test_pieces_match_diffusers_modules(saved, ours):
  """encode_images (posterior mean), encode_text and model_fn of a from_diffusers bundle against the
  diffusers / transformers modules of the same folder on the same inputs."""
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(saved, safety_checker=None, requires_safety_checker=False)
  images = _images(2) * 2.0 - 1.0  # [-1, 1]
  with torch.no_grad():
    post = pipe.vae.encode(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).latent_dist
    want_z = post.mode().numpy().transpose(0, 2, 3, 1) * pipe.vae.config.scaling_factor
  got_z = ours.encode_images(ours.vae_params, jnp.asarray(images), sample=False)
  np.testing.assert_allclose(np.asarray(got_z), want_z, rtol=1e-4, atol=1e-4 * float(np.abs(want_z).max()))

  ids = ours.tokenize(PROMPTS)
  with torch.no_grad():
    want_ctx = pipe.text_encoder(torch.from_numpy(ids.astype(np.int64)))[0].numpy()
  ctx = ours.encode_text(ours.text_params, jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(ctx), want_ctx, rtol=1e-4, atol=1e-4)

  x = _latents(2)
  t = np.array([10, 700])
  with torch.no_grad():
    want = pipe.unet(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
                     torch.from_numpy(want_ctx)).sample.numpy().transpose(0, 2, 3, 1)
  got = ours.model_fn(ours.unet_params, jnp.asarray(want_ctx))(jnp.asarray(x), jnp.asarray(t))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
