"""ControlNet on the digits LDM (``python -m train.controlnet --base workdir/ldm_digits``).

The base (a finished ``train.ldm`` workdir, or a diffusers folder) is frozen; a ControlNet copied
from its UNet encoder learns to follow the Canny edges of each training digit
(:func:`jdiff.control_images.canny`, OpenCV's algorithm). As in ControlNet training, the caption is
replaced by the empty prompt with probability ``controlnet.empty_prompt_rate`` so the net learns to
read the control image alone.
"""

from __future__ import annotations

import ml_collections

from configs import vae_digits


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.base = "workdir/ldm_digits"      # train.ldm workdir or diffusers folder (--base)

  config.data = vae_digits.data_config()  # used when the base has no data section (diffusers base)
  config.data.from_base = True

  config.controlnet = ml_collections.ConfigDict(dict(
      conditioning_embedding_out_channels=(),  # hint encoder widths; (): 16, 32, ... one per VAE halving + 1
      canny_low=100.0, canny_high=200.0,       # Canny hysteresis thresholds on the uint8 image
      empty_prompt_rate=0.5,                   # P(caption -> "") during training
  ))

  config.diffusion = ml_collections.ConfigDict(dict(
      weighting="",                       # "" (uniform) or "min_snr"
      min_snr_gamma=5.0,
  ))

  config.train = vae_digits.train_config(steps=1000, learning_rate=5e-4, warmup_steps=20, lr_schedule="constant",
                                         checkpoint_every=250, sample_every=500, ema_decay=0.0, log_every=25)
  config.train.batch_size = 0             # 0: the data section's batch size

  config.sample = ml_collections.ConfigDict(dict(sampler="ddim", num_steps=25, guidance_scale=3.0, num_images=10))
  return config
