"""The latent diffusion bundle from training workdirs (StableDiffusion.from_workdir, jdiff.ldm).

A tiny random train.ldm workdir (written as train.ldm writes one) loads with its EMA parameters read
from the checkpoint, and ``generate`` equals a composition written out here from the raw modules:
byte tokens, the text encoder, the conditional and unconditional UNet calls combined by hand, a DDIM
loop in float64 numpy, the VAE decoder. A train.lora workdir loads as the base with its factors merged.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lora_digits
from jdiff import checkpoint, ldm, lora
from jdiff.pipelines import StableDiffusion
from jdiff.tokenizers import ByteTokenizer
from tests.test_train_lora import save_random_base
from train import loop


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  return save_random_base(str(tmp_path_factory.mktemp("ldm_base")))


@pytest.fixture(scope="module")
def pipe(base_dir):
  return StableDiffusion.from_workdir(base_dir)


def _saved_ema(workdir):
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    return ldm.restore_ema(ckpt)


def test_workdir_bundle_parts(base_dir, pipe):
  config = ldm.read_config(base_dir)
  ema = _saved_ema(base_dir)
  assert config.text.trainable  # the checkpoint holds {"unet", "text"}
  jax.tree.map(np.testing.assert_array_equal, pipe.unet_params, ema["unet"])
  jax.tree.map(np.testing.assert_array_equal, pipe.text_params, ema["text"])
  assert isinstance(pipe.unet, ldm.TextUNet) and isinstance(pipe.tokenizer, ByteTokenizer)
  assert pipe.tokenizer.max_length == config.text.max_length
  assert pipe.default_size == config.data.image_size and pipe.latent_shape == (16, 16, 4)
  assert pipe.scaling_factor == 0.9 and pipe.shift_factor == 0.0
  assert pipe.prediction == config.diffusion.prediction
  assert pipe.defaults == {"sampler": config.sample.sampler, "num_steps": config.sample.num_steps,
                           "guidance_scale": config.sample.guidance_scale}
  assert pipe.data_config.image_size == 32
  np.testing.assert_array_equal(pipe.tokenize("ab")[:4], [257, 97, 98, 258])
  assert pipe.tokenize(["a", "b"]).shape == (2, config.text.max_length)


def _ddim_reference(eps_fn, abar: np.ndarray, x: np.ndarray, num_steps: int) -> np.ndarray:
  """DDIM (eta 0, leading spacing, final alpha 1) in float64, eps from ``eps_fn``."""
  n_train = len(abar)
  ts = (np.arange(num_steps) * (n_train // num_steps))[::-1]
  for t in ts:
    prev = t - n_train // num_steps
    a_t = abar[t]
    a_prev = abar[prev] if prev >= 0 else 1.0
    eps = eps_fn(x, t).astype(np.float64)
    x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
  return x


def test_generate_equals_the_hand_composition(base_dir, pipe):
  """generate() (CFG, DDIM, decode, [0, 1] range) against the raw modules composed here."""
  config = ldm.read_config(base_dir)
  prompts = ["a handwritten digit three", "a handwritten digit seven"]
  scale, steps = 3.0, 3
  latents = np.random.default_rng(0).standard_normal((2, 16, 16, 4)).astype(np.float32)
  got = np.asarray(pipe.generate(prompts, key=jax.random.key(0), num_steps=steps, guidance_scale=scale,
                                 latents=jnp.asarray(latents)))
  assert got.shape == (2, 32, 32, 1)

  ema = _saved_ema(base_dir)
  tok = ByteTokenizer(config.text.max_length)
  text = jax.jit(lambda ids: pipe.text_encoder.apply({"params": ema["text"]}, ids).last_hidden_state)
  cond, uncond = text(jnp.asarray(tok(prompts))), text(jnp.asarray(tok(["", ""])))
  unet = jax.jit(lambda x, t, c: pipe.unet.apply({"params": ema["unet"]}, x, t, c))

  def eps_fn(x, t):
    tt = jnp.full((2,), t, jnp.int32)
    xx = jnp.asarray(x, jnp.float32)
    c, u = np.asarray(unet(xx, tt, cond), np.float64), np.asarray(unet(xx, tt, uncond), np.float64)
    return u + scale * (c - u)

  d = config.diffusion
  assert d.schedule == "scaled_linear" and d.prediction == "epsilon"
  betas = np.linspace(np.sqrt(d.beta_start), np.sqrt(d.beta_end), d.num_timesteps, dtype=np.float64) ** 2
  z0 = _ddim_reference(eps_fn, np.cumprod(1.0 - betas), latents.astype(np.float64), steps)
  images = pipe.vae.apply({"params": pipe.vae_params}, jnp.asarray(z0 / 0.9, jnp.float32), method=pipe.vae.decode)
  want = np.clip(np.asarray(images, np.float64) / 2 + 0.5, 0, 1)
  # float32 network evaluations inside a float64 recursion: differences of a few float32 ulps of the
  # latents, amplified by at most 1/sqrt(alpha_bar) per step and the decoder's gain
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
  assert float(np.std(want)) > 1e-3

  # The pure pieces give the same numbers: sample() with the same noise, [-1, 1] range.
  ids = jnp.asarray(pipe.tokenize(prompts))
  signed = jax.jit(lambda p, n: pipe.sample(p, ids, n, sampler="ddim", num_steps=steps, guidance_scale=scale))
  np.testing.assert_allclose(np.asarray(signed(pipe.unet_params, jnp.asarray(latents))) * 0.5 + 0.5, got,
                             rtol=0, atol=1e-6)


def test_pieces_encode_decode_and_model_fn(pipe):
  images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 1)), jnp.float32)
  post = pipe.vae.apply({"params": pipe.vae_params}, images, method=pipe.vae.encode)
  z = pipe.encode_images(pipe.vae_params, images, key=jax.random.key(3))
  np.testing.assert_allclose(z, post.sample(key=jax.random.key(3)) * 0.9, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(pipe.encode_images(pipe.vae_params, images, sample=False), post.mode() * 0.9,
                             rtol=1e-6, atol=1e-6)
  ctx = pipe.encode_text(pipe.text_params, jnp.asarray(pipe.tokenize(["a", "b"])))
  x = jax.random.normal(jax.random.key(4), (2, 16, 16, 4))
  t = jnp.array([10, 900])
  plain = pipe.unet.apply({"params": pipe.unet_params}, x, t, ctx)
  np.testing.assert_array_equal(pipe.model_fn(pipe.unet_params, ctx)(x, t), plain)
  null = pipe.encode_text(pipe.text_params, pipe.null_ids())
  uncond = pipe.unet.apply({"params": pipe.unet_params}, x, t, jnp.broadcast_to(null, ctx.shape))
  guided = pipe.model_fn(pipe.unet_params, ctx, null_context=null, guidance_scale=2.5)(x, t)
  np.testing.assert_allclose(guided, uncond + 2.5 * (plain - uncond), rtol=1e-5, atol=1e-5)
  # LoRA as a transformation: the same as merging by hand.
  adapter = lora.init(pipe.unet_params, key=jax.random.key(5), rank=2, targets=("to_q",))
  adapter = lora.LoRA(factors=jax.tree.map(lambda a: a + 0.1, adapter.factors), scales=adapter.scales)
  merged = lora.merge(pipe.unet_params, adapter)
  np.testing.assert_array_equal(pipe.model_fn(pipe.unet_params, ctx, lora=adapter)(x, t),
                                pipe.unet.apply({"params": merged}, x, t, ctx))
  assert float(jnp.max(jnp.abs(pipe.model_fn(pipe.unet_params, ctx, lora=adapter)(x, t) - plain))) > 1e-5
  decoded = pipe.decode(pipe.vae_params, z)
  want = pipe.vae.apply({"params": pipe.vae_params}, z / 0.9, method=pipe.vae.decode)
  np.testing.assert_array_equal(decoded, jnp.clip(want, -1, 1))


def test_lora_workdir_loads_with_the_factors_merged(base_dir, pipe, tmp_path):
  workdir = str(tmp_path / "lora")
  config = lora_digits.get_config()
  config.base = base_dir
  config.lora.update(dict(rank=2, alpha=4.0))
  adapter = lora.init(pipe.unet_params, key=jax.random.key(0), rank=2, alpha=4.0, targets=ldm.lora_targets(config.lora.targets))
  adapter = lora.LoRA(factors=jax.tree.map(lambda a: a + 0.05, adapter.factors), scales=adapter.scales)
  loop.write_config(config, workdir)
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    ckpt.save(1, {"ema_params": ldm.factors_to_tree(adapter.factors)}, force=True)
  loaded = StableDiffusion.from_workdir(workdir)
  want = lora.merge(pipe.unet_params, adapter)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), loaded.unet_params, want)
  assert loaded.defaults["sampler"] == config.sample.sampler


def test_bad_workdirs_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    StableDiffusion.from_workdir(tmp_path)
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="not a train.ldm"):
    StableDiffusion.from_workdir(tmp_path)
  with pytest.raises(FileNotFoundError, match="neither"):
    ldm.load_path(str(tmp_path / "missing"), what="base")


def test_controlnet_for_copies_the_unet_encoder_and_starts_as_the_plain_unet(pipe):
  """ldm.controlnet_for: the init takes the key as init_from_unet's key (not as a module input); the
  encoder is the UNet's, and the zero convolutions make the augmented model equal the plain one."""
  from flax import traverse_util

  from jdiff.models.controlnet import ENCODER_PARAMS
  from jdiff.pipelines import Control

  net, init = ldm.controlnet_for(pipe)
  params = init(jax.random.key(0))
  flat, unet = (traverse_util.flatten_dict(dict(p), sep="/") for p in (params, pipe.unet_params))
  copied = [k for k in flat if k.startswith(ENCODER_PARAMS)]
  assert copied and all(np.array_equal(flat[k], unet[k]) for k in copied)
  ctx = pipe.encode_text(pipe.text_params, jnp.asarray(pipe.tokenize(["a", "b"])))
  x = jax.random.normal(jax.random.key(4), (2, 16, 16, 4))
  t = jnp.array([10, 900])
  hint = jax.random.uniform(jax.random.key(5), (2, 32, 32, 3))
  with_net = pipe.model_fn(pipe.unet_params, ctx, controls=[Control(net, params, hint)])(x, t)
  np.testing.assert_array_equal(with_net, pipe.model_fn(pipe.unet_params, ctx)(x, t))
