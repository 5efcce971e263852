"""A tiny latent diffusion run for tests: a few steps of a minute model on the bundled digits."""

from __future__ import annotations

import ml_collections

from configs import ldm_digits


def get_config() -> ml_collections.ConfigDict:
  config = ldm_digits.get_config()
  config.data.batch_size = 8
  config.vae.update(dict(block_out_channels=(8, 8), norm_num_groups=4, mid_block_add_attention=False,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2))
  config.vae.train.update(dict(steps=1, batch_size=8, log_every=1, checkpoint_every=1, warmup_steps=0))
  config.text.update(dict(max_length=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2))
  config.unet.update(dict(block_out_channels=(16, 16), cross_attention_dim=16, attention_head_dim=2,
                          norm_num_groups=4,
                          class_embed_type=""))  # a plain UNet (train.lcm builds its student from it)
  config.train.update(dict(steps=1, log_every=1, checkpoint_every=1, sample_every=1, warmup_steps=0))
  config.sample.update(dict(num_steps=2, per_prompt=1))
  return config
