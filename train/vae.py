"""``python -m train.vae``: train an AutoencoderKL (reconstruction + small-weight KL).

Loss per example: mean squared error of the reconstruction (decoded from a posterior sample) plus
``kl_weight`` x the KL to N(0, I) averaged over latent elements. After training, the latent
scaling factor (1 / std of the scaled posterior means, as Stable Diffusion's 0.18215 was chosen)
is measured on data when ``vae.scaling_factor`` is 0 and written to ``WORKDIR/vae.json`` together
with the model config, so ``train.ldm`` and the samplers can rebuild the frozen VAE.

Example:
  $ python -m train.vae --config configs/vae_digits.py --workdir /tmp/vae --config.train.steps=300
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jdiff import data, parallel
from jdiff.ldm import load_vae, restore_checked_ema, restore_ema
from jdiff.models import AutoencoderKL, VAEConfig
from train import loop

# load_vae / restore_ema / restore_checked_ema are the library's (jdiff.ldm), re-exported for the programs
__all__ = ["vae_config", "make_task", "train_vae", "load_vae", "restore_ema", "restore_checked_ema",
           "measure_scaling_factor", "make_loader"]

_EXTRA_KEYS = ("preset", "kl_weight", "pretrained", "train")


def vae_config(section: ml_collections.ConfigDict, *, scaling_factor: float | None = None) -> VAEConfig:
  """The VAEConfig of a ``vae`` config section (preset + any VAEConfig field overrides)."""
  overrides = {k: v for k, v in section.items() if k not in _EXTRA_KEYS}
  if scaling_factor is not None:
    overrides["scaling_factor"] = scaling_factor
  elif not overrides.get("scaling_factor"):
    overrides["scaling_factor"] = 1.0
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
  try:
    return VAEConfig.preset(section.preset, **overrides)
  except TypeError as e:
    raise ValueError(f"vae config: {e}") from None


def make_loader(config: ml_collections.ConfigDict, *, tokenize=None, batch_size: int | None = None) -> data.Loader:
  """The data loader described by ``config.data``."""
  d = config.data
  bad = float(d.get("max_bad_fraction", 0.01))
  # a run that reads no captions (the VAE) also takes caption-less data
  source = data.make_source(kind=d.kind, name=d.name, data_dir=d.data_dir, split=d.split, path=d.path,
                            image_key=d.image_key, label_key=d.label_key or None,
                            caption_key=(d.caption_key or None) if tokenize is not None else None,
                            channels=d.channels, verify=d.get("verify", "header"), max_bad_fraction=bad)
  return data.Loader(source, batch_size=batch_size or d.batch_size, seed=d.seed, image_size=d.image_size,
                     channels=d.channels, tokenize=tokenize, crop=d.get("crop") or None,
                     flip=bool(d.get("flip", False)), max_bad_fraction=bad)


def make_task(cfg: VAEConfig, *, kl_weight: float, image_size: int) -> tuple[loop.Task, AutoencoderKL]:
  """The VAE training task: init, loss and reconstruction grids."""
  vae = AutoencoderKL(cfg)

  def init_params(key):
    return vae.init(key, jnp.zeros((1, image_size, image_size, cfg.in_channels), jnp.float32))["params"]

  def loss_fn(params, batch, key, frozen):
    del frozen
    x = batch["image"]  # [B, H, W, C] in [-1, 1]
    recon, post = vae.apply({"params": params}, x, key=key)
    mse = jnp.mean(jnp.square(recon - x))
    kl = jnp.mean(post.kl()) / float(np.prod(post.mean.shape[1:]))
    return mse + kl_weight * kl, {"mse": mse, "kl": kl}

  task = loop.Task(name="vae", init_params=init_params, loss_fn=loss_fn, batch_keys=("image",))
  return task, vae


def measure_scaling_factor(vae: AutoencoderKL, params: Any, loader: data.Loader, *, batches: int = 4) -> float:
  """1 / std of the posterior means over a few batches (so scaled latents have unit variance)."""
  encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=AutoencoderKL.encode).mean)
  zs = [np.asarray(encode(params, next(loader)["image"])) for _ in range(batches)]
  std = float(np.std(np.concatenate(zs).astype(np.float64)))
  return 1.0 / max(std, 1e-6)


def train_vae(config: ml_collections.ConfigDict, workdir: str, *, train_cfg: ml_collections.ConfigDict | None = None,
              stream=None) -> tuple[AutoencoderKL, Any]:
  """Trains (or resumes) the VAE in ``workdir``; returns (model, EMA params) with the scaling factor set."""
  train_cfg = train_cfg or config.train
  base_cfg = vae_config(config.vae)
  task, vae = make_task(base_cfg, kl_weight=config.vae.kl_weight, image_size=config.data.image_size)
  loader = make_loader(config, batch_size=train_cfg.get("batch_size") or None)
  if parallel.is_main_process():
    os.makedirs(workdir, exist_ok=True)
  state = loop.train(train_cfg, task, loader, workdir, seed=config.seed, stream=stream)
  params = state.sampling_params
  scale = float(config.vae.scaling_factor) or measure_scaling_factor(vae, params, make_loader(config))
  final = vae_config(config.vae, scaling_factor=scale)
  if parallel.is_main_process():
    meta = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(final).items()},
            "step": int(state.step)}
    with open(os.path.join(workdir, "vae.json"), "w") as fh:
      json.dump(meta, fh, indent=2)
  return AutoencoderKL(final), params


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  loop.write_config(config, workdir)
  train_vae(config, workdir)
  print(f"[vae] done: {workdir}", flush=True)


def main(argv: list[str] | None = None) -> int:
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return loop.main_wrapper(run, default_config=os.path.join(here, "configs", "vae_digits.py"),
                           default_workdir="workdir/vae_digits", argv=argv)


if __name__ == "__main__":
  sys.exit(main())
