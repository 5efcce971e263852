"""A tiny consistency-training run for tests: a few steps of a minute model (``configs/ldm_tiny.py``'s
text encoder and UNet) on the bundled digits."""

from __future__ import annotations

import ml_collections

from configs import ct_digits, ldm_tiny


def get_config() -> ml_collections.ConfigDict:
  config = ct_digits.get_config()
  tiny = ldm_tiny.get_config()
  config.data.batch_size = 8
  config.text = tiny.text
  config.unet = tiny.unet
  config.ct.update(dict(s0=2, s1=10))
  config.train.update(dict(steps=3, log_every=1, checkpoint_every=1, sample_every=0, warmup_steps=0,
                           learning_rate=1e-3))
  config.sample.update(dict(num_steps=2, per_prompt=1))
  return config
