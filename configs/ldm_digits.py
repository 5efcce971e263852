"""The default: a small text-conditioned latent diffusion model on the bundled digits.

``python -m train.ldm`` with no arguments uses this file: it trains the autoencoder of
``configs/vae_digits.py`` first (in ``WORKDIR/vae``) unless ``vae.pretrained`` names a trained
VAE workdir, then the latent UNet on 8x8x4 latents together with a small CLIP text encoder over
byte tokens (trained jointly from a random initialisation). The UNet reads the caption through
cross-attention and through the token-mean text embedding added to its time embedding
(``class_embed_type="projection"``); condition dropout trains the unconditional branch for
classifier-free guidance; samples use the EMA weights.
Budget: at most 15 minutes on an idle 2-core CPU (VAE + UNet).
"""

from __future__ import annotations

import ml_collections

from configs import vae_digits


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = vae_digits.data_config()

  config.vae = vae_digits.vae_model_config()
  config.vae.pretrained = ""        # a train.vae workdir; "" trains one in WORKDIR/vae first
  config.vae.train = vae_digits.train_config(steps=400, learning_rate=2e-3, batch_size=32,
                                             checkpoint_every=200)

  config.text = ml_collections.ConfigDict(dict(
      tokenizer="bytes",            # "bytes" (UTF-8 bytes) or "bpe" (CLIP BPE learned from the captions)
      num_merges=200,               # BPE merges learned (tokenizer="bpe")
      max_length=32,                # tokens incl. begin/end markers
      hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      seed=1,                       # the encoder's init seed
      trainable=True,               # train the encoder with the UNet (False: frozen random encoder)
  ))

  # Any UNetConfig field can be overridden here; the preset gives the rest.
  config.unet = ml_collections.ConfigDict(dict(
      preset="digits",
      block_out_channels=(32, 64),
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      layers_per_block=1,
      attention_head_dim=4,
      cross_attention_dim=64,
      norm_num_groups=16,
      class_embed_type="projection",  # "" (cross-attention only) or "[simple_]projection" of the pooled text
  ))

  config.diffusion = ml_collections.ConfigDict(dict(
      schedule="scaled_linear", num_timesteps=1000, beta_start=0.00085, beta_end=0.012,
      prediction="epsilon",         # "epsilon" or "v"
      weighting="min_snr",          # "" (uniform) or "min_snr"
      min_snr_gamma=5.0,
      cond_drop=0.1,                # condition dropout probability (for CFG)
  ))

  config.train = vae_digits.train_config(steps=1500, learning_rate=1e-3, warmup_steps=100,
                                         checkpoint_every=500, sample_every=1000)

  config.sample = ml_collections.ConfigDict(dict(
      sampler="ddim", num_steps=25, guidance_scale=5.0, per_prompt=10,
  ))
  return config
