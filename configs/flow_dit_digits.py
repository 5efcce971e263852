"""A rectified-flow diffusion transformer on the digits latents (``denoiser="mmdit"``, ``prediction="flow"``).

``python -m train.ldm --config configs/flow_dit_digits.py`` trains, on the same VAE path, data, text
encoder, batch, step count and optimiser as the default ``configs/ldm_digits.py``, a small SD3-style
MMDiT instead of the UNet: 2x2 patches of the 8x8x4 latents (16 image tokens) attend jointly with the
caption's tokens, and the encoder's pooled state conditions the adaLN modulation
(:class:`jdiff.models.text_dit.TextDiT`). The objective is the rectified-flow velocity eps - x0 with
SD3's logit-normal timestep density (:func:`jdiff.flow.loss`); samples use the flow Euler sampler
with classifier-free guidance on the EMA weights. ``vae.pretrained`` may name the VAE of an earlier
``train.ldm`` / ``train.vae`` run (``WORKDIR/vae``) to skip training one.

Example:
  $ python -m train.ldm --config configs/flow_dit_digits.py --workdir workdir/flow_dit_digits
  $ python -m sample.evaluate --workdir workdir/flow_dit_digits --num_steps 8
"""

from __future__ import annotations

import ml_collections

from configs import ldm_digits


def get_config() -> ml_collections.ConfigDict:
  config = ldm_digits.get_config()
  del config.unet
  config.denoiser = "mmdit"         # "unet" (configs/ldm_digits.py) or "mmdit"
  # Any SD3Config field; latent channels, text widths, sample size and position table follow the bundle.
  config.dit = ml_collections.ConfigDict(dict(
      patch_size=2,
      num_layers=4,
      num_attention_heads=4,
      attention_head_dim=24,        # width 96
      qk_norm="rms_norm",           # "" or "rms_norm"
  ))

  config.diffusion = ml_collections.ConfigDict(dict(
      prediction="flow",            # rectified flow: x_t = (1 - t) x0 + t eps, target eps - x0
      num_timesteps=1000,           # the model is told t * num_timesteps
      density="logit_normal",       # "uniform", "logit_normal" or "mode" (jdiff.flow.sample_t)
      logit_mean=0.0, logit_std=1.0,
      shift=1.0,                    # SD3's timestep shift of the training levels
      weighting="",                 # "" (uniform), "sigma_sqrt" or "cosmap"
      cond_drop=0.1,                # condition dropout probability (for CFG)
  ))

  config.sample = ml_collections.ConfigDict(dict(
      sampler="flow_euler", num_steps=25, guidance_scale=5.0, per_prompt=10,
  ))
  return config
