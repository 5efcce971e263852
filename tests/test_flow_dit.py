"""The rectified-flow text DiT of ``train.ldm`` (``denoiser="mmdit"``, ``prediction="flow"``).

A tiny flow config builds a bundle around a random VAE; train.ldm's loss is the flow velocity loss
recomputed here by hand from the same keys and decreases under a few optimiser steps on a fixed batch;
LoRA on the DiT's attention kernels is the parameter-tree transformation W + scale * down @ up
(a zero adapter changes nothing); a workdir written as train.ldm writes one loads with
``StableDiffusion.from_workdir`` and samples with flow Euler, equal to an Euler loop written out here.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import flow_dit_digits, ldm_tiny
from jdiff import checkpoint, ldm, lora
from jdiff.models import AutoencoderKL
from jdiff.models.text_dit import TextDiT, TextDiTConfig
from jdiff.pipelines import StableDiffusion
from train import ldm as ldm_train
from train import loop
from train import vae as vae_train

PROMPTS = ["a handwritten digit three", "a handwritten digit seven"]


def tiny_flow_config():
  config = ldm_tiny.get_config()
  del config.unet
  base = flow_dit_digits.get_config()
  config.denoiser = base.denoiser
  config.dit = base.dit
  config.dit.update(dict(num_layers=2, num_attention_heads=2, attention_head_dim=8))
  config.diffusion = base.diffusion
  config.sample = base.sample
  config.sample.update(dict(num_steps=2, per_prompt=1))
  return config


@pytest.fixture(scope="module")
def setup():
  config = tiny_flow_config()
  vcfg = vae_train.vae_config(config.vae, scaling_factor=0.9)
  vae = AutoencoderKL(vcfg)
  vae_params = jax.jit(lambda k: vae.init(k, jnp.zeros((1, 32, 32, 1)))["params"])(jax.random.key(0))
  bundle = ldm_train.build(config, vae, vae_params)
  params = jax.jit(ldm_train.init_params(config, bundle))(jax.random.key(1))  # {"unet", "text"}
  return config, vcfg, bundle, params


def test_configs_build_a_flow_dit_bundle(setup):
  config, _, bundle, params = setup
  assert isinstance(bundle.unet, TextDiT) and bundle.prediction == "flow"
  assert bundle.scheduler_config["_class_name"] == "FlowMatchEulerDiscreteScheduler"
  assert bundle.defaults["sampler"] == "flow_euler" and bundle.schedule.num_timesteps == 1000
  cfg = bundle.unet.config
  assert (cfg.in_channels, cfg.joint_attention_dim, cfg.pooled_projection_dim) == (4, 16, 16)
  assert set(params) == {"unet", "text"} and "transformer_blocks_1" in params["unet"]
  # the shipped config: its DiT over the digits' 8x8x4 latents and 64-wide text
  full = flow_dit_digits.get_config()
  net = ldm.denoiser_for(full, 4, 8, int(full.text.hidden_size))
  shapes = jax.eval_shape(lambda k: net.init(k, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
                                             jnp.zeros((1, 32, 64)))["params"], jax.random.key(0))
  assert shapes["proj_out"]["kernel"].shape == (96, 2 * 2 * 4)
  with pytest.raises(ValueError, match="denoiser"):
    ldm.denoiser_for({**full.to_dict(), "denoiser": "convnet"}, 4, 8, 64)
  with pytest.raises(ValueError, match="joint_attention_dim"):
    ldm.denoiser_for({**full.to_dict(), "dit": {**full.dit.to_dict(), "joint_attention_dim": 32}}, 4, 8, 64)


def _batch(bundle):
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 1)).astype(np.float32)
  return {"image": jnp.asarray(images), "tokens": jnp.asarray(bundle.tokenize(PROMPTS))}


def test_train_step_is_the_flow_loss_and_decreases_it(setup):
  config, _, bundle, params = setup
  config = config.copy_and_resolve_references()
  config.diffusion.cond_drop = 0.0  # every caption kept: the context is the captions' encoding
  loss_fn = ldm_train.make_loss(config, bundle)
  frozen = {"vae": bundle.vae_params, "null_tokens": bundle.null_ids()}
  batch, key = _batch(bundle), jax.random.key(3)
  opt = optax.adam(1e-3)

  @jax.jit
  def step(p, s):  # the loss at p, and one Adam step
    (value, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, batch, key, frozen)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, value

  p, s, got = step(params, opt.init(params))
  got = float(got)

  # by hand: latents from the posterior key, logit-normal t and noise from the loss key, target eps - z
  k_z, _, k_loss = jax.random.split(key, 3)
  k_t, k_n = jax.random.split(k_loss)
  z = np.asarray(bundle.encode_images(bundle.vae_params, batch["image"], key=k_z), np.float64)
  t = 1.0 / (1.0 + np.exp(-np.asarray(jax.random.normal(k_t, (2,), jnp.float32), np.float64)))
  eps = np.asarray(jax.random.normal(k_n, z.shape, jnp.float32), np.float64)
  tb = t[:, None, None, None]
  x_t = (1 - tb) * z + tb * eps
  ctx = bundle.encode_text(params["text"], batch["tokens"])
  v = np.asarray(jax.jit(bundle.unet.apply)({"params": params["unet"]}, jnp.asarray(x_t, jnp.float32),
                                            jnp.asarray(t * 1000, jnp.float32), ctx), np.float64)
  want = np.mean((v - (eps - z)) ** 2)
  np.testing.assert_allclose(got, want, rtol=1e-4)  # float32 network on O(1) inputs

  for _ in range(5):
    p, s, after = step(p, s)  # the loss after 5 steps
  assert np.isfinite(float(after)) and float(after) < 0.9 * got


def test_lora_on_the_dit_is_the_tree_transformation(setup):
  _, _, bundle, params = setup
  unet_params = params["unet"]
  adapter = lora.init(unet_params, key=jax.random.key(4), rank=2, alpha=4.0)
  assert "transformer_blocks_0/attn/to_q/kernel" in adapter.paths
  assert all(p.rsplit("/", 2)[-2].startswith(("to_q", "to_k", "to_v", "to_out")) for p in adapter.paths)
  ctx = bundle.encode_text(params["text"], jnp.asarray(bundle.tokenize(PROMPTS)))
  x = jax.random.normal(jax.random.key(5), (2,) + bundle.latent_shape)
  t = jnp.array([250.0, 800.0])
  base = np.asarray(bundle.model_fn(unet_params, ctx)(x, t))
  np.testing.assert_array_equal(np.asarray(bundle.model_fn(unet_params, ctx, lora=adapter)(x, t)), base)

  rng = np.random.default_rng(6)
  factors = {p: {"down": f["down"], "up": jnp.asarray(rng.normal(0, 0.1, f["up"].shape), jnp.float32)}
             for p, f in adapter.factors.items()}
  adapter = lora.LoRA(factors=factors, scales=adapter.scales)
  merged = lora.merge(unet_params, adapter)
  flat, flat_m = lora._flat(unet_params), lora._flat(merged)
  for path in flat:
    if path in factors:
      f = factors[path]
      want = np.asarray(flat[path], np.float64) + 2.0 * (np.asarray(f["down"], np.float64)
                                                          @ np.asarray(f["up"], np.float64))
      np.testing.assert_allclose(np.asarray(flat_m[path]), want, rtol=1e-6, atol=1e-6)
    else:
      np.testing.assert_array_equal(np.asarray(flat_m[path]), np.asarray(flat[path]))
  out = np.asarray(bundle.model_fn(unet_params, ctx, lora=adapter)(x, t))
  np.testing.assert_allclose(out, np.asarray(bundle.unet.apply({"params": merged}, x, t, ctx)), rtol=1e-6, atol=1e-6)
  assert np.max(np.abs(out - base)) > 1e-3


@pytest.mark.slow  # writes and reloads a flow DiT workdir: ~20 s
def test_workdir_samples_with_flow_euler(setup, tmp_path):
  config, vcfg, bundle, params = setup
  workdir = str(tmp_path)
  vdir = os.path.join(workdir, "vae")
  os.makedirs(vdir)
  with open(os.path.join(vdir, "vae.json"), "w") as fh:
    json.dump({"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(vcfg).items()}, "step": 1},
              fh)
  with checkpoint.Checkpointer(os.path.join(vdir, "checkpoints")) as ckpt:
    ckpt.save(1, {"ema_params": bundle.vae_params}, force=True)
  loop.write_config(config, workdir)
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    ckpt.save(1, {"ema_params": params}, force=True)

  pipe = StableDiffusion.from_workdir(workdir)
  assert isinstance(pipe.unet, TextDiT) and pipe.prediction == "flow" and pipe.defaults["sampler"] == "flow_euler"
  ids = jnp.asarray(pipe.tokenize(PROMPTS))
  noise = jax.random.normal(jax.random.key(7), (2,) + pipe.latent_shape)
  # the run's default sampler (flow_euler); a guidance scale <= 1 runs the conditional model alone
  got = np.asarray(pipe.generate(PROMPTS, key=jax.random.key(8), num_steps=2, guidance_scale=1.0, latents=noise))

  # diffusers' FlowMatchEuler levels for 2 steps (shift 1): linspace(1, 1/T, 2), then 0
  ctx = pipe.encode_text(pipe.text_params, ids)
  x, sigmas = np.asarray(noise, np.float64), [1.0, 1e-3, 0.0]
  apply = jax.jit(pipe.unet.apply)
  for s, s_next in zip(sigmas[:-1], sigmas[1:]):
    v = apply({"params": pipe.unet_params}, jnp.asarray(x, jnp.float32), jnp.full((2,), s * 1000.0), ctx)
    x = x + (s_next - s) * np.asarray(v, np.float64)
  want = (np.asarray(jax.jit(pipe.decode)(pipe.vae_params, jnp.asarray(x, jnp.float32))) + 1.0) / 2.0
  assert got.shape == (2, 32, 32, 1)
  np.testing.assert_allclose(got, want, atol=1e-4)  # float32 decoder of float32 latents


def test_text_dit_config_errors():
  with pytest.raises(ValueError, match="pooled_projection_dim"):
    TextDiTConfig.tiny(pooled_projection_dim=16)
  with pytest.raises(ValueError, match="power of 2"):
    TextDiTConfig.tiny(patch_size=3)
  from jdiff.pipelines import latent_multiple
  assert latent_multiple(TextDiTConfig.tiny(patch_size=4)) == 4
