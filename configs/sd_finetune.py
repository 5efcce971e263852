"""Full fine-tune of a Stable Diffusion checkpoint on a captioned image folder (``python -m train.ldm``).

  $ python -m train.ldm --config configs/sd_finetune.py --config.pretrained=checkpoints/sd15 \
      --config.data.path=my_photos --workdir workdir/sd15_photos
  $ python -m train.ldm --config configs/sd_finetune.py:sd21v --config.pretrained=checkpoints/sd21 ...

The UNet starts from the diffusers folder ``pretrained`` and is trained; its VAE and CLIP text encoder stay
frozen (``text.trainable=True`` trains the encoder too) and its CLIP BPE tokenizer reads the captions. The
target (epsilon or v) is the checkpoint scheduler's ``prediction_type``. The data is an image folder with
captions in diffusers' ``metadata.jsonl`` (``file_name`` + ``text``), ``captions.jsonl`` or ``.txt``
sidecars, resized to ``data.image_size`` on the shorter side and center- (or randomly) cropped, optionally
flipped. Compute runs in bfloat16 with float32 parameters, AdamW moments and EMA; blocks are
rematerialised, each within its own step of the backward pass (``train.remat_backward``), and the
convolutions' backward reads their kernels late (``train.conv_backward``); ``train.fsdp`` shards parameters,
optimizer state and EMA over that many devices, and ``train.update_in_backward=True`` applies AdamW to each
parameter during a second backward pass, so that the gradients are never held together (one more forward and
backward pass per step). At the
end the run writes a diffusers folder (``export.dir``, default ``WORKDIR/diffusers``) that
``StableDiffusionPipeline.from_pretrained`` loads; ``python -m train.export`` writes one from any
checkpoint.

Variants (``FILE:VARIANT``): ``sd15`` (default: 512 px, epsilon), ``sd21v`` (768 px, v-prediction),
``sdxl`` (SDXL base, 1024 px, epsilon). An SDXL fine-tune conditions its UNet as diffusers'
``train_text_to_image_sdxl.py``: both CLIP encoders' penultimate hidden states, the second's projected
pooled output and per-example time ids (original size, crop corner, ``data.image_size``) from the crop;
caption dropout swaps both encoders' ids for the empty prompt's. Its VAE encodes in float32
(``force_upcast``), both text encoders stay frozen, and the export loads with
``StableDiffusionXLPipeline.from_pretrained``.

  $ python -m train.ldm --config configs/sd_finetune.py:sdxl --config.pretrained=checkpoints/sdxl-base \
      --config.data.path=my_photos --config.train.fsdp=8 --workdir workdir/sdxl_photos
"""

from __future__ import annotations

import ml_collections

from configs import vae_digits

VARIANTS = {"sd15": dict(image_size=512, guidance_scale=7.5), "sd21v": dict(image_size=768, guidance_scale=7.5),
            "sdxl": dict(image_size=1024, guidance_scale=5.0)}


def get_config(variant: str = "sd15") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"unknown sd_finetune variant {variant!r}; expected one of {sorted(VARIANTS)}")
  v = VARIANTS[variant]
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.pretrained = ""                # the diffusers Stable Diffusion folder to start from (required)

  config.data = vae_digits.data_config()
  config.data.update(dict(
      kind="folder",                    # "folder" (path) or "tfds" (name + keys)
      path="",
      caption_key="text",               # metadata.jsonl column (diffusers' imagefolder convention)
      label_key="",
      image_size=v["image_size"],
      channels=3,
      batch_size=8,                     # global batch
      crop="center",                    # "center" or "random" after resizing the shorter side
      flip=False,                       # random horizontal flips
      verify="header",                  # build-time check of the images: "header", "full" or "none"
      max_bad_fraction=0.01,            # unreadable images met in an epoch before the run stops
      precompute="",                    # a folder: encode every image and caption once with the frozen
                                        # VAE / text encoder (crop and flip fixed per example), then train
                                        # on the stored latent moments and embeddings
  ))

  config.text = ml_collections.ConfigDict(dict(trainable=False))
  config.unet = ml_collections.ConfigDict(dict(
      dtype="bfloat16",                 # compute dtype; parameters stay float32
      remat="full",                     # "" (off), "full", "matmuls" or "weights"
  ))

  config.diffusion = ml_collections.ConfigDict(dict(
      prediction="",                    # "": the checkpoint scheduler's prediction_type
      weighting="",                     # "" (uniform) or "min_snr"
      min_snr_gamma=5.0,
      cond_drop=0.1,                    # caption dropout to the empty prompt (classifier-free guidance)
      noise_offset=0.0,                 # offset noise (e.g. 0.05)
      input_perturbation=0.0,           # input perturbation (e.g. 0.1)
  ))

  config.train = vae_digits.train_config(steps=10000, learning_rate=1e-5, warmup_steps=500, lr_schedule="constant",
                                         weight_decay=1e-2, ema_decay=0.9999, checkpoint_every=1000,
                                         sample_every=1000, log_every=50,
                                         # same gradients: kernels' copies made late, each remat'd block
                                         # recomputed within its own backward step
                                         conv_backward="late", remat_backward="late")
  config.export = ml_collections.ConfigDict(dict(dir="", ema=True))  # dir "": WORKDIR/diffusers

  config.sample = ml_collections.ConfigDict(dict(
      sampler="dpm_solver", num_steps=25, guidance_scale=v["guidance_scale"], per_prompt=1,
      prompts="a photo of a cat|a painting of a lighthouse at dusk",  # "|"-separated
  ))
  return config
