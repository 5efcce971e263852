"""``python -m train.lora --base SDXL_FOLDER``: LoRA on an SDXL base UNet, everything else frozen.

The tiny random SDXL pipeline and the captioned image folder are ``tests/test_sdxl_finetune.py``'s fixtures;
its diffusers recomputation of ``train_text_to_image_sdxl.py``'s objective, given the adapter through
``load_lora_weights`` (PEFT layers, not merged), is the reference of the LoRA step's loss: both CLIP encoders'
``hidden_states[-2]``, the second's projected pooled output, per-example time ids, ``add_noise``, MSE, with
caption dropout to the empty prompt. A 2-step CLI run over the image folder writes an adapter that
``StableDiffusionXLPipeline.load_lora_weights`` takes in full (every written module becomes a PEFT layer),
whose UNet then computes what jdiff's base UNet with the trained factors merged computes. Without compiling:
the task's batch keys, frozen text and null ids, the center-crop default and the loader's batches (token ids
checked against transformers' tokenizers); a refiner base is refused in one line.

Tolerances: the loss at 1e-5 relative as in ``tests/test_sdxl_finetune.py`` (one float32 pass; jdiff merges
``W + s A B`` into the kernel where PEFT adds ``s B (A x)``, a float32 reassociation of rank-2 terms); the
UNet output at 1e-4 of its range (float32 through the tiny UNet's layers with merged vs unmerged factors).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from jdiff import lora  # noqa: E402
from jdiff.pipelines import StableDiffusion  # noqa: E402
from jdiff.sdxl import StableDiffusionXL  # noqa: E402
from tests import test_sdxl_finetune as sdxl_ft  # noqa: E402
from tests.test_sdxl_finetune import SIZE, _diffusers_loss, _nchw  # noqa: E402
from train import lora as lora_train  # noqa: E402
from train import loop  # noqa: E402

sdxl_folder = sdxl_ft.sdxl_folder  # the module-scoped fixtures: the tiny SDXL folder, captioned images
image_folder = sdxl_ft.image_folder

BATCH_KEYS = {"image", "tokens", "original_size", "crops_coords_top_left"}


def _config(base, **diffusion):
  config = loop.load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                         "lora_digits.py"))
  config.base = str(base)
  config.lora.update(dict(rank=2, alpha=4.0))
  config.diffusion.update({"cond_drop": 0.0, **diffusion})
  return config


def _random_factors(tree, seed):
  """Every factor drawn N(0, 0.3^2): a nonzero adapter (a fresh one has zero up-projections)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


@pytest.mark.slow  # compiling the SDXL step (two encoders, VAE, UNet) plus diffusers + PEFT: 30-45 s on 2 busy cores
def test_sdxl_lora_loss_equals_diffusers_peft(sdxl_folder, tmp_path):
  base = lora_train.load_base(str(sdxl_folder))
  assert isinstance(base, StableDiffusionXL) and base.default_size == SIZE and base.prediction == "epsilon"
  config = _config(sdxl_folder, cond_drop=0.5)
  scales, init_params = lora_train.build(config, base)
  params = _random_factors(init_params(jax.random.key(0)), 1)
  task = lora_train.make_task(config, base, scales, init_params)
  assert set(task.batch_keys) == BATCH_KEYS
  captions = ["a photo of a cat", "a dog", "an astronaut riding a horse", "red fox in snow"]
  b = len(captions)
  images = np.random.default_rng(1).uniform(-1, 1, (b, SIZE, SIZE, 3)).astype(np.float32)
  original = np.array([[40, 36], [64, 48], [33, 50], [32, 32]], np.int32)
  crops = np.array([[4, 0], [0, 8], [0, 9], [0, 0]], np.int32)
  tokens = base.batch_tokenize(captions)  # [B, 2, L]
  batch = {"image": jnp.asarray(images), "tokens": jnp.asarray(tokens), "original_size": jnp.asarray(original),
           "crops_coords_top_left": jnp.asarray(crops)}
  key = jax.random.key(7)
  loss_fn = jax.jit(task.loss_fn)
  loss, _ = loss_fn(params, batch, key, task.frozen)
  plain, _ = loss_fn(jax.tree.map(jnp.zeros_like, params), batch, key, task.frozen)
  # The documented key split (posterior, dropout, lora dropout, loss); the loss splits (t, noise).
  k_z, k_drop, _, k_loss = jax.random.split(key, 4)
  h = SIZE // base.vae_factor
  eps_z = jax.random.normal(k_z, (b, h, h, 4), jnp.float32)
  k_t, k_n = jax.random.split(k_loss)
  t = jax.random.randint(k_t, (b,), 0, 1000, dtype=jnp.int32)
  noise = jax.random.normal(k_n, (b, h, h, 4), jnp.float32)
  drop = np.asarray(jax.random.bernoulli(k_drop, 0.5, (b,)))
  assert 0 < drop.sum() < b  # both kinds of example in this batch
  used = ["" if d else c for c, d in zip(captions, drop)]
  time_ids = np.concatenate([original, crops, np.full((b, 2), SIZE)], axis=1)
  file = tmp_path / "adapter.safetensors"
  lora.save_diffusers(file, {"unet": lora_train.tree_to_lora(params, scales)})
  want, ids = _diffusers_loss(sdxl_folder, images, used, time_ids, eps_z, t, noise, lora_file=file)
  np.testing.assert_array_equal(np.stack(ids, axis=1)[~drop], tokens[~drop])  # the same tokenization
  assert abs(float(loss) - want) <= 1e-5 * abs(want), (float(loss), want)
  assert abs(float(plain) - want) > 1e-3 * abs(want)  # the adapter matters at this tolerance


def test_sdxl_task_batches_and_data(sdxl_folder, image_folder):
  """Without compiling: the task reads the loader's micro-conditioning, the frozen text is both encoders',
  a data section without a crop gets a center crop, and the loader's batches hold what the task reads
  (both tokenizers' ids, as diffusers' tokenizers give them)."""
  import transformers

  base = lora_train.load_base(str(sdxl_folder))
  config = _config(sdxl_folder)
  config.data.caption_key = "text"
  scales, init_params = lora_train.build(config, base)
  task = lora_train.make_task(config, base, scales, init_params)
  assert set(task.batch_keys) == BATCH_KEYS and len(task.frozen["text"]) == 2
  assert task.frozen["null_tokens"].shape == (1, 2, 20)
  data = lora_train.data_config(config, base, str(image_folder))
  assert data.crop == "center" and data.image_size == SIZE and data.channels == 3
  batch = next(lora_train.make_loader(data, base, batch_size=3))
  assert BATCH_KEYS <= set(batch) and batch["tokens"].shape == (3, 2, 20)
  captions = ["a photo of object number 1", ""]
  for i, sub in enumerate(("tokenizer", "tokenizer_2")):
    tok = transformers.CLIPTokenizer.from_pretrained(sdxl_folder / sub)
    want = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    np.testing.assert_array_equal(base.batch_tokenize(captions)[:, i], np.asarray(want))
    np.testing.assert_array_equal(np.asarray(task.frozen["null_tokens"])[0, i], np.asarray(want[1]))


def test_sdxl_refiner_base_is_one_line(sdxl_folder, tmp_path):
  """A refiner's time ids hold aesthetic scores, which batches do not carry: refused when loaded."""
  import json
  import shutil

  refiner = tmp_path / "refiner"
  shutil.copytree(sdxl_folder, refiner)
  index = json.loads((refiner / "model_index.json").read_text())
  index["requires_aesthetics_score"] = True
  (refiner / "model_index.json").write_text(json.dumps(index))
  assert StableDiffusion.from_diffusers(refiner).requires_aesthetics_score
  with pytest.raises(ValueError, match="refiner") as e:
    lora_train.load_base(str(refiner))
  assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sdxl_folder, image_folder):
  """A 2-step ``python -m train.lora`` run on the SDXL folder (random crops and flips, a sample grid)."""
  workdir = tmp_path_factory.mktemp("sdxl_lora") / "run"
  rc = lora_train.main(["train.lora", "--base", str(sdxl_folder), "--data", str(image_folder),
                        f"--workdir={workdir}", "--config.lora.rank=2", "--config.lora.alpha=4",
                        "--config.data.batch_size=2", "--config.data.caption_key=text", "--config.data.crop=random",
                        "--config.data.flip=True",
                        "--config.train.steps=2", "--config.train.log_every=1", "--config.train.sample_every=2",
                        "--config.train.learning_rate=1e-2", "--config.sample.num_steps=2",
                        "--config.sample.per_prompt=1"])
  assert rc == 0
  return workdir


@pytest.mark.slow  # a compiled 2-step run with an SDXL sample grid, then diffusers' pipeline: ~1 min on 2 busy cores
def test_cli_sdxl_lora_adapter_loads_in_diffusers(trained, sdxl_folder):
  from jdiff import checkpoint
  from train import vae as vae_train

  file = lora_train.adapter_path(str(trained))
  assert os.path.exists(file) and os.path.exists(trained / "samples" / "lora_000002.png")
  saved = loop.read_config(str(trained))
  assert saved.data.kind == "folder" and saved.data.image_size == SIZE and saved.data.crop == "random"
  base = lora_train.load_base(str(sdxl_folder))
  with checkpoint.Checkpointer(os.path.join(trained, "checkpoints")) as ckpt:
    factors = vae_train.restore_ema(ckpt)
  scales, _ = lora_train.build(saved, base)
  adapter = lora_train.tree_to_lora(factors, scales)
  assert max(float(jnp.max(jnp.abs(f["up"]))) for f in adapter.factors.values()) > 0  # trained

  pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder, add_watermarker=False)
  pipe.load_lora_weights(file)
  from safetensors.numpy import load_file
  written = {k.rsplit(".lora_", 1)[0] for k in load_file(file)}
  assert len(written) == len(adapter.factors)
  wrapped = {"unet." + name for name, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
  assert wrapped == written  # every module of the file became a PEFT layer, and nothing else
  x, t, ctx, pooled, ids = sdxl_ft.unet_probe()
  merged = lora.merge(base.unet_params, adapter)
  mine = np.asarray(base.unet.apply({"params": merged}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx),
                                    text_embeds=jnp.asarray(pooled), time_ids=jnp.asarray(ids)))
  plain = np.asarray(base.unet.apply({"params": base.unet_params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx),
                                     text_embeds=jnp.asarray(pooled), time_ids=jnp.asarray(ids)))
  with torch.no_grad():
    theirs = pipe.unet(_nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), added_cond_kwargs={
        "text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(ids)}).sample.numpy()
  theirs = np.moveaxis(theirs, 1, -1)
  scale = float(np.max(np.abs(theirs)))
  assert np.max(np.abs(mine - theirs)) <= 1e-4 * scale
  assert np.max(np.abs(plain - theirs)) > 1e-3 * scale  # the trained adapter changes the UNet
