"""A tiny autoencoder run for tests (``python -m train.vae --config configs/vae_tiny.py``)."""

from __future__ import annotations

import ml_collections

from configs import vae_digits


def get_config() -> ml_collections.ConfigDict:
  config = vae_digits.get_config()
  config.data.batch_size = 8
  config.vae.update(dict(block_out_channels=(8, 8), norm_num_groups=4, mid_block_add_attention=False,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2))
  config.train.update(dict(steps=4, batch_size=8, log_every=1, checkpoint_every=1, warmup_steps=0,
                           learning_rate=1e-3))
  return config
