"""Latent consistency distillation of the digits LDM (``python -m train.lcm --teacher DIR``).

The teacher is a finished ``train.ldm`` workdir (default ``workdir/ldm_digits``) or a diffusers
folder; the data defaults to the teacher run's own. The student is the full teacher UNet with a
32-wide guidance-scale embedding (``lcm.lora=True`` / ``--lora``: an LCM-LoRA over the frozen
teacher instead). The teacher's CFG scale in the distillation is 1 + w with w ~ U[w_min, w_max]
(the digits LDM samples at guidance 3, i.e. w = 2); sampling with guidance_scale g embeds g - 1.
"""

from __future__ import annotations

import ml_collections

from configs import vae_digits


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.teacher = "workdir/ldm_digits"   # train.ldm workdir or diffusers folder (--teacher)

  config.data = vae_digits.data_config()
  config.data.from_teacher = True         # train on the teacher run's data section; False: use this one

  config.lcm = ml_collections.ConfigDict(dict(
      num_ddim_timesteps=50,              # skipping-step grid N (k = T // N); LCMScheduler's original_inference_steps
      w_min=1.0, w_max=4.0,               # teacher guidance cond + w (cond - uncond), w drawn per example
      solver="ddim",                      # teacher ODE step: "ddim" or "dpm_solver_2"
      loss_type="huber",                  # "huber" (pseudo-Huber) or "l2"
      huber_c=0.001,
      timestep_scaling=10.0,              # boundary-condition scaling (c_skip, c_out)
      w_embedding_dim=32,                 # time_cond_proj_dim of the full student (0: no w input)
      lora=False,                         # LCM-LoRA instead of the full UNet (--lora)
      lora_rank=8, lora_alpha=8.0,
      lora_targets="to_q,to_k,to_v,to_out,proj_in,proj_out,ff/net_0/proj,ff/net_2,conv1,conv2,time_emb_proj",
      target_decay=0.95,                  # target network = EMA of the student (LCM paper); 0: stop-gradient copy
  ))

  # ema_decay is the sampling EMA of the train state (the target network's EMA is lcm.target_decay).
  config.train = vae_digits.train_config(steps=1000, learning_rate=2e-4, warmup_steps=50, lr_schedule="constant",
                                         checkpoint_every=250, sample_every=500, ema_decay=0.999)
  config.train.batch_size = 0             # 0: the data section's batch size

  config.sample = ml_collections.ConfigDict(dict(num_steps=4, guidance_scale=3.0, per_prompt=4))
  return config
