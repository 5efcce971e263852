"""configs/sd_finetune.py at real size: SD 1.5 (512 px, epsilon), SD 2.1-v (768 px, v-prediction) and SDXL base
(1024 px, 128 x 128 latents, epsilon) train steps build and lower on 8 virtual CPU devices with bf16 compute,
float32 parameters, remat (each block recomputed late) and the FSDP axis, with no weights and no run; parameter counts equal diffusers' models
built from the same configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.abspath(__file__)


def lower_step(variant: str) -> dict:
  """Builds the fine-tune step of ``configs/sd_finetune.py:VARIANT`` abstractly and lowers it."""
  import jax.numpy as jnp

  from jdiff import ldm, parallel, training
  from jdiff.models import layers
  from train import ldm as train_ldm
  from train import loop

  config = loop.load_config(os.path.join(ROOT, "configs", f"sd_finetune.py:{variant}"))
  config.train.fsdp = jax.device_count()
  family, prediction = {"sd15": ("sd15", "epsilon"), "sd21v": ("sd21", "v"), "sdxl": ("sdxl", "epsilon")}[variant]
  size = int(config.data.image_size)
  bundle = ldm.abstract_bundle(family, dtype=config.unet.dtype, remat=config.unet.remat, prediction=prediction,
                               image_size=size)
  t = config.train
  tx = training.make_optimizer(learning_rate=t.learning_rate, warmup_steps=t.warmup_steps, total_steps=t.steps,
                               schedule=t.lr_schedule, clip_norm=t.clip_norm, weight_decay=t.weight_decay)
  mesh = parallel.make_mesh(fsdp=int(t.fsdp))
  key = jax.random.key(0)
  state = jax.eval_shape(lambda k: training.create_train_state(bundle.init_unet, tx, key=k, mesh=mesh, fsdp=True), key)
  shardings = training.state_shardings(state, mesh, fsdp=True)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
  img = jnp.zeros((1, size, size, 3), jnp.float32)
  ids = jnp.zeros((1, 77), jnp.int32)
  encoders = bundle.encoders if variant == "sdxl" else [bundle.text_encoder]
  texts = tuple(jax.eval_shape(lambda k, e=e: e.init(k, ids)["params"], key) for e in encoders)
  n = len(encoders)  # SDXL: both tokenizers' ids stacked per example (the bundle's batch_tokenize)
  tokens = (n, 77) if variant == "sdxl" else (77,)
  frozen = {"vae": jax.eval_shape(lambda k: bundle.vae.init(k, img)["params"], key),
            "text": texts if variant == "sdxl" else texts[0], "null_tokens": jax.ShapeDtypeStruct((1,) + tokens, jnp.int32)}
  b = int(config.data.batch_size)
  batch = {"image": jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32),
           "tokens": jax.ShapeDtypeStruct((b,) + tokens, jnp.int32)}
  if variant == "sdxl":  # the micro-conditioning the loader records with each crop
    batch.update({k: jax.ShapeDtypeStruct((b, 2), jnp.int32) for k in ("original_size", "crops_coords_top_left")})
  made = []  # the blocks rematerialised "late" (train.remat_backward) while the step is traced
  make_late = layers._late_remat_class
  layers._late_remat_class = lambda cls, static: made.append(cls.__name__) or make_late(cls, static)
  # traced under the train section's settings, as train.loop traces it
  with layers.attention_implementation(t.get("attention") or None), \
      layers.convolution_backward(t.get("conv_backward") or None), \
      layers.remat_backward(t.get("remat_backward") or None):
    step = training.make_train_step(train_ldm.make_loss(config, bundle), tx, mesh=mesh, state_sharding=shardings,
                                    frozen=frozen, ema_decay=t.ema_decay)
    text = step.jitted.lower(state, batch, frozen).as_text()
  layers._late_remat_class = make_late
  count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))  # noqa: E731
  per_device = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
                   for x in jax.tree.leaves((state.params, state.ema_params, state.opt_state)))
  total = sum(int(np.prod(x.shape)) * x.dtype.itemsize
              for x in jax.tree.leaves((state.params, state.ema_params, state.opt_state)))
  return {"unet": count(state.params), "vae": count(frozen["vae"]), "text": count(texts[0]),
          "texts": [count(t) for t in texts], "vae_dtype": str(bundle.vae.config.dtype),
          "param_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(state.params)}),
          "bf16_convolutions": text.count("stablehlo.convolution") and ("xbf16>" in text),
          "late_remat_blocks": sorted(set(made)), "latent": size // bundle.vae_factor,
          "per_device_state_bytes": per_device, "state_bytes": total, "devices": jax.device_count()}


def _diffusers_counts(family: str) -> dict:
  """Parameter counts of diffusers' / transformers' models built (on the meta device) from the configs
  jdiff's presets write."""
  import torch
  diffusers = pytest.importorskip("diffusers")
  transformers = pytest.importorskip("transformers")

  from jdiff.models import UNetConfig, VAEConfig
  from jdiff.models.text import CLIPTextConfig

  def strip(cfg):
    return {k: v for k, v in cfg.items() if not k.startswith("_")}

  text_cfg = getattr(CLIPTextConfig, family)()
  with torch.device("meta"):
    unet = diffusers.UNet2DConditionModel(**strip(getattr(UNetConfig, family)().to_diffusers_config()))
    vae = diffusers.AutoencoderKL(**strip(getattr(VAEConfig, family)().to_diffusers_config()))
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**strip(text_cfg.to_hf_config())))
  n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
  return {"unet": n(unet), "vae": n(vae), "text": n(text)}


def _lower_in_subprocess(*variants: str) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  res = subprocess.run([sys.executable, HERE, *variants], env=env, capture_output=True, text=True, timeout=900,
                       cwd=ROOT)
  assert res.returncode == 0, res.stderr[-3000:]
  line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def lowered():
  return _lower_in_subprocess("sd15", "sd21v")


@pytest.mark.parametrize("variant,family,latent", [("sd15", "sd15", 64), ("sd21v", "sd21", 96)])
def test_real_size_fine_tune_step_lowers(lowered, variant, family, latent):
  got = lowered[variant]
  assert got["devices"] == 8 and got["latent"] == latent
  assert {k: got[k] for k in ("unet", "vae", "text")} == _diffusers_counts(family)
  assert got["param_dtypes"] == ["float32"]  # float32 master weights under bf16 compute
  assert got["bf16_convolutions"] and got["late_remat_blocks"] == ["BasicTransformerBlock", "ResnetBlock2D"]
  # FSDP divides parameters, AdamW moments and EMA: at most 1/8 of the whole plus 5%
  assert got["per_device_state_bytes"] <= got["state_bytes"] / 8 * 1.05


@pytest.mark.slow  # lowering SDXL base's 2.6B-parameter UNet and both encoders at 1024 px: ~65 s on 2 busy cores
def test_real_size_sdxl_fine_tune_step_lowers():
  """``sd_finetune.py:sdxl``: the step lowers at 1024 px (128 x 128 latents) with SDXL base's real shapes. The
  UNet and bigG encoder counts are the ones ``tests/parity/test_sdxl_models.py::
  test_full_size_parameter_counts_equal_diffusers`` checks against diffusers / transformers on the meta device;
  the VAE and first encoder have SD 1.5's shapes, counted here against diffusers as above."""
  got = _lower_in_subprocess("sdxl")["sdxl"]
  assert got["devices"] == 8 and got["latent"] == 128
  sd15 = _diffusers_counts("sd15")
  assert got["unet"] == 2_567_463_684 and got["texts"] == [sd15["text"], 694_659_840] and got["vae"] == sd15["vae"]
  assert got["param_dtypes"] == ["float32"] and got["vae_dtype"] == "float32"  # force_upcast: float32 encode
  assert got["bf16_convolutions"] and got["late_remat_blocks"] == ["BasicTransformerBlock", "ResnetBlock2D"]
  assert got["per_device_state_bytes"] <= got["state_bytes"] / 8 * 1.05


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  variants = sys.argv[1:] or ["sd15", "sd21v"]
  print("RESULT " + json.dumps({v: lower_step(v) for v in variants}), flush=True)
