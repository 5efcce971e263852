"""AutoencoderKL on the bundled 32x32 digits: 8x8x4 latents (``python -m train.vae``)."""

from __future__ import annotations

import ml_collections


def data_config() -> ml_collections.ConfigDict:
  """The data section shared by the digits configs."""
  return ml_collections.ConfigDict(dict(
      kind="tfds",              # "tfds" (name + data_dir) or "folder" (path)
      name="jdiff_digits",
      data_dir="~/tensorflow_datasets",
      split="train",
      path="",                  # image folder for kind="folder"
      image_key="image",
      label_key="label",
      caption_key="caption",
      image_size=32,
      channels=1,
      batch_size=64,            # global batch
      seed=0,
      crop="",                  # "" (resize only), "center" or "random" crop after resizing the shorter side
      flip=False,               # random horizontal flips
      verify="header",          # build-time check of folder images: "header", "full" or "none"
      max_bad_fraction=0.01,    # unreadable examples per epoch (replaced by the next readable) before stopping
      precompute="",            # fine-tuning: a folder for the frozen encoders' outputs (configs/sd_finetune.py)
  ))


def train_config(**overrides) -> ml_collections.ConfigDict:
  """Optimizer / loop settings shared by the configs."""
  base = dict(steps=1000, learning_rate=1e-3, warmup_steps=50, lr_schedule="cosine", clip_norm=1.0,
              weight_decay=0.0, ema_decay=0.999, ema_warmup=True, max_bad_steps=10, log_every=50,
              checkpoint_every=500, sample_every=0, keep_checkpoints=2, fsdp=1, stop_at=0,
              batch_size=0, grad_accum=1,  # batch_size 0: data.batch_size; grad_accum: micro-batches
              # memory options: Adam moment dtypes ("" = the parameters' float32, or "bfloat16"), the sampling
              # EMA on/off and its dtype, attention ("" = XLA's, "cudnn", or "chunked": no whole score matrix),
              # conv_backward ("" = autodiff, or "late": the kernels' backward copies made when needed),
              # remat_backward ("" = nn.remat, or "late": each remat'd block recomputed within its own backward
              # step), cpu_scheduler (XLA:CPU's step schedule: "" = XLA's default, "memory" or "concurrency"),
              # update_in_backward (a second backward pass applies AdamW to each parameter as its gradient is
              # made: the gradients are never held together, one more forward and backward per step)
              mu_dtype="", nu_dtype="", ema=True, ema_dtype="", attention="", conv_backward="", remat_backward="",
              cpu_scheduler="", update_in_backward=False)
  base.update(overrides)
  return ml_collections.ConfigDict(base)


def vae_model_config() -> ml_collections.ConfigDict:
  """The digits AutoencoderKL: VAEConfig.digits with these overrides (any VAEConfig field may be set)."""
  return ml_collections.ConfigDict(dict(
      preset="digits",
      block_out_channels=(16, 32, 32),
      norm_num_groups=8,
      mid_block_add_attention=False,
      latent_channels=4,        # 32x32x1 images -> 8x8x4 latents
      kl_weight=1e-3,           # weight of the KL term (per latent element) vs the per-pixel MSE
      scaling_factor=0.0,       # 0: measure 1/std of the latents after training
  ))


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = data_config()
  config.vae = vae_model_config()
  config.train = train_config(steps=400, learning_rate=2e-3, batch_size=32, checkpoint_every=200)
  return config
