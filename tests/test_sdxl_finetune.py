"""Fine-tuning an SDXL base checkpoint with ``python -m train.ldm --config configs/sd_finetune.py:sdxl``.

A tiny random ``StableDiffusionXLPipeline`` saved with ``save_pretrained`` (``tests/parity/test_sdxl_models.py``)
stands in for SDXL: the step's loss equals the objective of diffusers' ``train_text_to_image_sdxl.py`` computed
with diffusers / transformers on the same tensors (both CLIP encoders' ``hidden_states[-2]``, the second's
projected pooled output, the per-example time ids, ``scheduler.add_noise``, MSE), with caption dropout to the
empty prompt; the loader's batches carry each image's original size and crop corner; a 2-step CLI run exports a
folder ``StableDiffusionXLPipeline.from_pretrained`` loads, whose UNet computes what jdiff's trained parameters
compute and whose frozen parts are the checkpoint's files byte for byte.

Tolerances: the loss is one pass through float32 networks (two 3-block text encoders, the 2-level VAE encoder,
the UNet), the setting where ``tests/test_finetune.py`` holds 1e-5 relative; the time ids here are image sizes
below 100 pixels, so their sinusoidal arguments carry an absolute rounding of < 100 * 2**-24 ~ 6e-6, well inside
it. The exported UNet is compared against diffusers' on the same inputs at 1e-5 of the output range, as the SD
fine-tune test does (float32 rounding, epsilon 1.2e-7, grown by ~1e2 through the tiny UNet's layers).
"""

from __future__ import annotations

import filecmp
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jdiff import ldm  # noqa: E402
from jdiff.pipelines import StableDiffusion  # noqa: E402
from jdiff.sdxl import StableDiffusionXL  # noqa: E402
from tests.parity.test_sdxl_models import build_tiny_sdxl  # noqa: E402
from tests.test_finetune import PHOTO_SIZES as SIZES  # noqa: E402
from tests.test_finetune import write_captioned_images  # noqa: E402
from train import ldm as train_ldm  # noqa: E402
from train import loop  # noqa: E402
from train import vae as vae_train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "sd_finetune.py")
SIZE = 32  # pixels: 16 x 16 latents with the tiny 2-level VAE
FROZEN = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tiny_sdxl_finetune")
  build_tiny_sdxl(folder)
  return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """Six captioned images of several sizes (:func:`tests.test_finetune.write_captioned_images`)."""
  return write_captioned_images(tmp_path_factory.mktemp("sdxl_photos"))


def unet_probe():
  """Fixed inputs of the tiny SDXL UNet ``(x, t, context, pooled text, time ids)`` for comparing outputs."""
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, SIZE // 2, SIZE // 2, 4)).astype(np.float32)
  ctx = rng.standard_normal((2, 20, 80)).astype(np.float32)
  pooled = rng.standard_normal((2, 40)).astype(np.float32)
  ids = np.array([[40, 36, 4, 0, 32, 32], [48, 64, 0, 10, 32, 32]], np.float32)
  return x, np.array([10, 700]), ctx, pooled, ids


def _config(pretrained, **diffusion):
  config = loop.load_config(CONFIG + ":sdxl")
  config.pretrained = str(pretrained)
  config.data.image_size = SIZE
  config.unet.dtype = "float32"
  config.unet.remat = ""
  config.diffusion.update({"cond_drop": 0.0, **diffusion})
  return config


def _nchw(a) -> "torch.Tensor":
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(a), -1, 1)))


def _diffusers_loss(folder, images, captions, time_ids, eps_z, t, noise, lora_file=None):
  """The objective of diffusers' ``train_text_to_image_sdxl.py`` on given tensors (NHWC in, NCHW inside):
  ``encode_prompt`` (each tokenizer, ``hidden_states[-2]`` concatenated, the last encoder's ``[0]`` pooled),
  the VAE posterior sample times the scaling factor, DDPM ``add_noise`` and an epsilon MSE. With
  ``lora_file`` the UNet carries that adapter (``load_lora_weights``: PEFT layers, unmerged), as in
  ``train_text_to_image_lora_sdxl.py``."""
  pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
  if lora_file is not None:
    pipe.load_lora_weights(str(lora_file))
  sched = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
  with torch.no_grad():
    embeds, pooled, ids = [], None, []
    for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
      input_ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
      ids.append(input_ids.numpy())
      out = enc(input_ids, output_hidden_states=True, return_dict=False)
      pooled = out[0]
      embeds.append(out[-1][-2])
    prompt_embeds = torch.cat(embeds, dim=-1)
    dist = pipe.vae.encode(_nchw(images)).latent_dist
    latents = (dist.mean + dist.std * _nchw(eps_z)) * pipe.vae.config.scaling_factor
    tt = torch.from_numpy(np.asarray(t)).long()
    noise_t = _nchw(noise)
    noisy = sched.add_noise(latents, noise_t, tt)
    pred = pipe.unet(noisy, tt, prompt_embeds, added_cond_kwargs={
        "text_embeds": pooled, "time_ids": torch.from_numpy(np.asarray(time_ids, np.float32))}).sample
    return float(torch.nn.functional.mse_loss(pred.float(), noise_t.float(), reduction="mean")), ids


@pytest.mark.parametrize("cond_drop", [0.0, 0.5])
def test_sdxl_objective_equals_diffusers_recipe(sdxl_folder, cond_drop):
  config = _config(sdxl_folder, cond_drop=cond_drop)
  bundle = ldm.finetune_bundle(config)
  assert isinstance(bundle, StableDiffusionXL) and bundle.prediction == "epsilon"
  assert bundle.vae.config.dtype == "float32"
  task = train_ldm.make_task(config, bundle)
  captions = ["a photo of a cat", "a dog", "an astronaut riding a horse", "red fox in snow"]
  b = len(captions)
  images = np.random.default_rng(1).uniform(-1, 1, (b, SIZE, SIZE, 3)).astype(np.float32)
  original = np.array([[40, 36], [64, 48], [33, 50], [32, 32]], np.int32)
  crops = np.array([[4, 0], [0, 8], [0, 9], [0, 0]], np.int32)
  tokens = bundle.batch_tokenize(captions)  # [B, 2, L]
  batch = {"image": jnp.asarray(images), "tokens": jnp.asarray(tokens), "original_size": jnp.asarray(original),
           "crops_coords_top_left": jnp.asarray(crops)}
  assert set(task.batch_keys) == set(batch)
  key = jax.random.key(7)
  loss, _ = jax.jit(task.loss_fn)(bundle.unet_params, batch, key, task.frozen)
  # The draws of the step's documented key split: (posterior, dropout, loss); the loss splits (t, noise);
  # dropout is one Bernoulli(cond_drop) per example (jdiff.diffusion.drop_condition).
  k_z, k_drop, k_loss = jax.random.split(key, 3)
  h = SIZE // bundle.vae_factor
  eps_z = jax.random.normal(k_z, (b, h, h, 4), jnp.float32)
  k_t, k_n = jax.random.split(k_loss)
  t = jax.random.randint(k_t, (b,), 0, 1000, dtype=jnp.int32)
  noise = jax.random.normal(k_n, (b, h, h, 4), jnp.float32)
  drop = np.asarray(jax.random.bernoulli(k_drop, cond_drop, (b,)))
  if cond_drop:
    assert 0 < drop.sum() < b  # both kinds of example in this batch
  used = ["" if d else c for c, d in zip(captions, drop)]  # diffusers' proportion_empty_prompts
  time_ids = np.concatenate([original, crops, np.full((b, 2), SIZE)], axis=1)
  want, ids = _diffusers_loss(sdxl_folder, images, used, time_ids, eps_z, t, noise)
  np.testing.assert_array_equal(np.stack(ids, axis=1)[~drop], tokens[~drop])  # the same tokenization
  assert abs(float(loss) - want) <= 1e-5 * abs(want), (float(loss), want)


def test_sdxl_sample_grid_is_the_pipelines_generate(sdxl_folder):
  """The run's sample grids (make_task's sample_fn: both tokenizers' ids, SDXL's zeroed negative conditioning
  and default time ids) are what ``StableDiffusionXL.generate`` draws from the same latents (images in
  [-1, 1] vs [0, 1]); ``generate`` itself is checked against diffusers in ``tests/parity/test_sdxl_pipeline.py``."""
  config = _config(sdxl_folder)
  config.sample.update(num_steps=2, sampler="ddim")
  bundle = ldm.finetune_bundle(config)
  key = jax.random.key(3)
  grid = np.asarray(train_ldm.make_task(config, bundle).sample_fn(bundle.unet_params, key))
  prompts = config.sample.prompts.split("|")
  noise = jax.random.normal(key, (len(prompts),) + bundle.latent_shape, jnp.float32)
  want = np.asarray(bundle.generate(prompts, key=jax.random.key(0), latents=noise, num_steps=2, sampler="ddim",
                                    guidance_scale=config.sample.guidance_scale))
  assert grid.shape == want.shape == (len(prompts), SIZE, SIZE, 3) and float(np.std(want)) > 1e-2
  np.testing.assert_allclose(grid * 0.5 + 0.5, want, atol=1e-6)


def test_sdxl_batches_carry_original_size_and_crop(sdxl_folder, image_folder):
  config = _config(sdxl_folder)
  config.data.path = str(image_folder)
  config.data.crop, config.data.flip = "random", True
  bundle = ldm.finetune_bundle(config)
  batch = next(vae_train.make_loader(config, tokenize=bundle.batch_tokenize, batch_size=len(SIZES)))
  assert batch["tokens"].shape == (len(SIZES), 2, 20) and batch["tokens"].dtype == np.int32
  assert sorted(map(tuple, batch["original_size"].tolist())) == sorted(SIZES)  # one epoch: every image once
  for (hh, ww), (top, left) in zip(batch["original_size"], batch["crops_coords_top_left"]):
    s = SIZE / min(hh, ww)  # the shorter side resized to SIZE: the crop lies inside the resized image
    assert 0 <= top <= round(hh * s) - SIZE and 0 <= left <= round(ww * s) - SIZE


def test_bad_sdxl_folders_are_one_line(tmp_path, sdxl_folder):
  config = _config(sdxl_folder)
  config.data.image_size = SIZE + 1
  with pytest.raises(ValueError, match="multiple of the VAE factor 2") as e:
    ldm.finetune_bundle(config)
  assert "\n" not in str(e.value)
  odd = tmp_path / "inpaint"
  shutil.copytree(sdxl_folder, odd)
  unet = diffusers.UNet2DConditionModel.from_pretrained(odd / "unet")
  diffusers.UNet2DConditionModel.from_config({**dict(unet.config), "in_channels": 9}).save_pretrained(odd / "unet")
  with pytest.raises(ValueError, match="inpainting") as e:
    ldm.finetune_bundle(_config(odd))
  assert "\n" not in str(e.value)
  for key, value, needle in [("data.crop", "", "data.crop is empty"), ("text.trainable", True, "frozen"),
                             ("data.precompute", str(tmp_path / "pre"), "data.precompute")]:
    config = _config(sdxl_folder)
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=needle):
      ldm.finetune_bundle(config)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, sdxl_folder, image_folder):
  """A 2-step CLI fine-tune (random crops and flips) with its exported folder."""
  workdir = tmp_path_factory.mktemp("sdxl_ft") / "run"
  argv = [f"--config={CONFIG}:sdxl", f"--config.pretrained={sdxl_folder}", f"--config.data.path={image_folder}",
          f"--config.data.image_size={SIZE}", "--config.unet.dtype=float32", "--config.unet.remat=",
          "--config.data.batch_size=2", "--config.train.steps=2", "--config.train.checkpoint_every=2",
          "--config.train.sample_every=0", "--config.train.log_every=1", "--config.train.warmup_steps=0",
          "--config.train.learning_rate=1e-3", "--config.data.flip=True", "--config.data.crop=random",
          "--config.export.ema=False", f"--workdir={workdir}"]
  assert train_ldm.main(["train.ldm", *argv]) == 0
  return workdir


@pytest.mark.slow  # a compiled 2-step run, its export and diffusers' pipeline: ~2 min on 2 busy cores
def test_cli_sdxl_fine_tune_exports_a_folder_diffusers_runs(finetuned, sdxl_folder, tmp_path):
  from tests.test_fault_tolerance import saved_state

  out = finetuned / "diffusers"
  for part in FROZEN:  # frozen: copied byte for byte
    cmp = filecmp.dircmp(sdxl_folder / part, out / part)
    assert not cmp.left_only and not cmp.right_only and not cmp.diff_files, part
  pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(out, add_watermarker=False)
  ours = StableDiffusion.from_diffusers(out)
  assert isinstance(ours, StableDiffusionXL)
  # the exported UNet is the run's online parameters (export.ema=False), moved away from the checkpoint's
  step, state, _ = saved_state(finetuned)
  assert step == 2
  for a, b in zip(jax.tree.leaves(ours.unet_params), jax.tree.leaves(state["params"])):
    np.testing.assert_array_equal(np.asarray(a), b)
  start = StableDiffusion.from_diffusers(sdxl_folder)
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(ours.unet_params),
                                                              jax.tree.leaves(start.unet_params)))
  assert moved > 1e-4
  # diffusers' UNet from the export computes what jdiff's trained parameters compute
  x, t, ctx, pooled, ids = unet_probe()
  mine = np.asarray(ours.unet.apply({"params": state["params"]}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx),
                                    text_embeds=jnp.asarray(pooled), time_ids=jnp.asarray(ids)))
  with torch.no_grad():
    theirs = pipe.unet(_nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), added_cond_kwargs={
        "text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(ids)}).sample.numpy()
  theirs = np.moveaxis(theirs, 1, -1)
  assert np.max(np.abs(mine - theirs)) <= 1e-5 * np.max(np.abs(theirs))
  # the run reloads from its workdir as an SDXL bundle; python -m train.export, reading the checkpoint back,
  # writes the same folder (the run's export.ema=False: the online parameters)
  from train import export
  assert isinstance(StableDiffusion.from_workdir(finetuned), StableDiffusionXL)
  assert export.main(["--workdir", str(finetuned), "--out", str(tmp_path / "again")]) == 0
  again = StableDiffusion.from_diffusers(tmp_path / "again")
  for a, b in zip(jax.tree.leaves(again.unet_params), jax.tree.leaves(state["params"])):
    np.testing.assert_array_equal(np.asarray(a), b)
  for part in FROZEN:
    cmp = filecmp.dircmp(sdxl_folder / part, tmp_path / "again" / part)
    assert not cmp.left_only and not cmp.right_only and not cmp.diff_files, part
  # and the whole diffusers pipeline runs
  pipe.set_progress_bar_config(disable=True)
  img = pipe("a photo of object number 1", num_inference_steps=2, height=SIZE, width=SIZE, output_type="np").images
  assert img.shape == (1, SIZE, SIZE, 3) and np.isfinite(img).all()
