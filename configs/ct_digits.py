"""Consistency training of a text-conditioned latent model on the digits, without a teacher
(``python -m train.ct --vae DIR``).

The VAE is a finished ``train.vae`` workdir or the one a ``train.ldm`` run trained (default
``workdir/ldm_digits``, whose VAE lies in ``workdir/ldm_digits/vae``); the byte-level text encoder and
the UNet are those of ``configs/ldm_digits.py``, trained from scratch together. The loss is
:func:`jdiff.consistency.training_loss` with the "ect" curriculum (``ct.curriculum``): t uniform in
[1, T - 1], the target at s = t - ceil(t / D(k)), the divisor D(k) doubling from s0 = 1 (the denoising
loss f(x_t, t) ~ x_0 at every t: the first stage is a one-step denoiser) to s1 = 16 in five equal stages,
the target the stop-gradient online network (Geng et al., 2024, on the discrete schedule). "ct" (Song et
al., 2023: the skipping-step grid of N(k) - 1 intervals growing to s1 = 200, target EMA decay mu(k)) and
"ict" (doubling grid, target decay 0) remain options ("ct" did not learn the digits in 3000 steps:
docs/RESULTS.md). The network predicts v (``diffusion.prediction="v"``), wrapped in the
boundary-condition scalings: its x0 = alpha_t x_t - sigma_t v is Song et al.'s skip parameterisation with
sigma_data = 1 (the latents have unit variance), so f(x_t, t) -> x_t as t -> 0 whatever the UNet outputs
(with "sample" and LCM's c_skip, which vanishes from t = 1 on, a model is not tied to its input there;
:func:`train.ct.check_anchored`). Samples use the LCM sampler, unguided, on every training timestep (one
step starts at t = 999).
"""

from __future__ import annotations

import ml_collections

from configs import ldm_digits


def get_config() -> ml_collections.ConfigDict:
  base = ldm_digits.get_config()
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = base.data
  config.vae = ml_collections.ConfigDict(dict(
      source="workdir/ldm_digits",  # a train.vae workdir, or a train.ldm workdir (its VAE) (--vae)
      pretrained="",                # set by train.ct: the train.vae workdir the source resolves to
  ))
  config.text = base.text           # trained with the UNet (text.trainable)
  config.unet = base.unet
  config.diffusion = ml_collections.ConfigDict(dict(
      schedule="scaled_linear", num_timesteps=1000, beta_start=0.00085, beta_end=0.012,
      prediction="v",               # what the UNet outputs before the boundary scalings: "v" or "epsilon" (train.ct
                                    # refuses "sample" with timestep scaling 10: f(x_t, t) not tied to x_t near t = 0)
  ))

  config.ct = ml_collections.ConfigDict(dict(
      curriculum="ect",             # "ect" (proportional gaps), "ct" (Song et al. 2023) or "ict" (doubling grid)
      s0=1, s1=16,                  # first / last gap divisor ("ect") or grid intervals ("ct", "ict"; s1 <= 1000)
      mu0=0.95,                     # target EMA decay at N = s0 ("ct" only); mu(k) = exp(s0 log(mu0) / N(k))
      loss_type="huber",            # "huber" (pseudo-Huber) or "l2"
      huber_c=0.00864,              # 0.00054 sqrt(d), d = 8 * 8 * 4 latent dimensions (iCT's rule)
      timestep_scaling=10.0,        # boundary-condition scaling (c_skip, c_out), as the LCM sampler uses
  ))

  config.train = base.train
  config.train.update(dict(steps=3000, learning_rate=5e-4, warmup_steps=100, lr_schedule="constant",
                           checkpoint_every=500, sample_every=1000, ema_decay=0.999))

  config.sample = ml_collections.ConfigDict(dict(sampler="lcm", num_steps=2, guidance_scale=1.0, per_prompt=10))
  return config
