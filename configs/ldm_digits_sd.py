"""The digits latent diffusion model in Stable Diffusion's layout, exportable as a diffusers folder.

Like the default (``configs/ldm_digits.py``: the same VAE, data and budget), but the text side is what a
``StableDiffusionPipeline`` holds: a CLIP BPE tokenizer whose small vocabulary is learned from the captions
(saved in ``WORKDIR/tokenizer``), a CLIP text encoder over it, and a UNet that reads the text through
cross-attention only. ``python -m train.export --workdir WORKDIR --out DIR`` then writes a folder that
``diffusers.StableDiffusionPipeline.from_pretrained(DIR)`` runs and that ``--config configs/sd_finetune.py
--config.pretrained=DIR`` fine-tunes.

  $ python -m train.ldm --config configs/ldm_digits_sd.py --workdir workdir/ldm_digits_sd
"""

from __future__ import annotations

import ml_collections

from configs import ldm_digits


def get_config() -> ml_collections.ConfigDict:
  config = ldm_digits.get_config()
  config.text.update(dict(tokenizer="bpe", max_length=16))
  config.unet.class_embed_type = ""  # cross-attention only (the pipeline passes no class labels)
  config.unet.down_block_types = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
  config.unet.up_block_types = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
  return config
