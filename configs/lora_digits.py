"""LoRA fine-tuning of the digits LDM (``python -m train.lora --base workdir/ldm_digits``).

The base is a finished ``train.ldm`` workdir (default ``workdir/ldm_digits``) or a diffusers Stable
Diffusion or SDXL base folder; it stays frozen (an SDXL base takes its time ids from each image's original
size and crop: ``data.crop`` "" becomes "center"; diffusers' ``metadata.jsonl`` captions need
``--config.data.caption_key=text``). Only the low-rank factors of the attention projections are
trained (rank 8, alpha 8: the seed's PEFT ``LoraConfig``). Without ``--data`` the base run's own data
is used; ``--data`` names an image folder with captions or a prepared TFDS dataset.
"""

from __future__ import annotations

import ml_collections

from configs import vae_digits


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.base = "workdir/ldm_digits"      # train.ldm workdir or diffusers folder (--base)

  config.data = vae_digits.data_config()  # used with --data, or when the base has no data section
  config.data.from_base = True            # train on the base run's data section when there is one

  config.lora = ml_collections.ConfigDict(dict(
      rank=8,
      alpha=8.0,                          # the update is (alpha / rank) * down @ up
      targets="to_q,to_k,to_v,to_out",    # module names or regexes over "/"-joined parameter paths
      dropout=0.0,                        # rank dropout on the LoRA path during training
  ))

  config.diffusion = ml_collections.ConfigDict(dict(
      weighting="",                       # "" (uniform) or "min_snr"
      min_snr_gamma=5.0,
      cond_drop=0.1,                      # caption dropout (keeps classifier-free guidance working)
  ))

  config.train = vae_digits.train_config(steps=500, learning_rate=1e-3, warmup_steps=20, lr_schedule="constant",
                                         checkpoint_every=250, sample_every=250, ema_decay=0.0, log_every=25)
  config.train.batch_size = 0             # 0: the data section's batch size

  config.sample = ml_collections.ConfigDict(dict(
      sampler="ddim", num_steps=25, guidance_scale=3.0, per_prompt=2,
      prompt="",                          # "": the ten digit prompts
  ))
  return config
