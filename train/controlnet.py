"""``python -m train.controlnet --base DIR``: train a ControlNet over a frozen latent diffusion model.

The base is a finished training workdir (default ``workdir/ldm_digits``) or a diffusers Stable
Diffusion folder, loaded as the library's bundle (:func:`jdiff.ldm.load_path`). The parameter tree is split by :mod:`jdiff.partition` labels
``{"unet": frozen, "controlnet": trainable}``: only ``{"controlnet": ...}`` is the train state's
parameters (so gradients, optimizer state, EMA and checkpoints hold ControlNet leaves only), while
the UNet (with the VAE and text encoder) is a frozen input of the step and is never written. The
ControlNet starts from the UNet's encoder (:func:`jdiff.models.controlnet.init_from_unet`) with its
zero convolutions at zero, so step 0 reproduces the base exactly.

Control images are the Canny edges of the training images (:func:`jdiff.control_images.canny`,
``controlnet.canny_low/high``), computed on the host for every batch. One step: encode images with
the frozen VAE, captions with the frozen text encoder, replace the caption by the empty prompt with
probability ``controlnet.empty_prompt_rate``, run the ControlNet on (noisy latent, t, caption,
edges) and the frozen UNet with its residuals (the bundle's ``model_fn(..., controls=[Control(...)])``),
and regress the noise / v target. The final
ControlNet is written as a diffusers ``ControlNetModel`` folder ``WORKDIR/controlnet``
(:func:`jdiff.convert.controlnet.save_controlnet`). Sample grids show the control edges (top row)
and the generated images under them. A finished run loads with ``StableDiffusion.from_workdir`` and is
scored by ``python -m sample.evaluate --workdir WORKDIR``.

Example:
  $ python -m train.ldm --workdir workdir/ldm_digits
  $ python -m train.controlnet --base workdir/ldm_digits --workdir workdir/controlnet_digits
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jdiff import diffusion, ldm, parallel, partition
from jdiff.evaluation import edges_of
from jdiff.models.controlnet import ControlNet
from jdiff.pipelines import Control, StableDiffusion
from train import loop
from train.lora import data_config, load_base, make_loader

__all__ = ["RULES", "ControlLoader", "edges_of", "build", "make_task", "train_controlnet", "controlnet_path", "main"]

RULES = ((r"^controlnet/", partition.TRAINABLE), (r"^unet/", partition.FROZEN))
CONTROLNET_DIR = "controlnet"


# ----------------------------------------------------------------------------- control images


class ControlLoader:
  """Wraps a :class:`jdiff.data.Loader`: every batch gains ``control`` (the Canny edges of ``image``).

  The position is the wrapped loader's (``get_state`` / ``set_state``), so resuming is exact.
  """

  def __init__(self, loader, *, low: float, high: float):
    self.loader, self.low, self.high = loader, float(low), float(high)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = dict(next(self.loader))
    batch["control"] = edges_of(batch["image"], self.low, self.high)  # [B, H, W, 3]
    return batch

  def get_state(self) -> dict[str, Any]:
    return self.loader.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self.loader.set_state(state)


# ----------------------------------------------------------------------------- the model


def build(config: ml_collections.ConfigDict, base: StableDiffusion):
  """The ControlNet, the partition labels of ``{"unet", "controlnet"}`` and ``key -> {"controlnet": params}``.

  Returns:
    ``(controlnet, labels, init_params, frozen_part)`` where ``frozen_part`` is ``{"unet": params}``.
  """
  net, init_cn = ldm.controlnet_for(base, config.controlnet.conditioning_embedding_out_channels)
  unet_params = base.unet_params
  abstract = {"unet": jax.eval_shape(lambda: unet_params), "controlnet": jax.eval_shape(init_cn, jax.random.key(0))}
  labels = partition.labels(abstract, RULES)
  _, frozen_part = partition.split({"unet": unet_params, "controlnet": abstract["controlnet"]}, labels)

  def init_params(key):
    return {"controlnet": init_cn(key)}

  return net, labels, init_params, frozen_part


def make_task(config: ml_collections.ConfigDict, base: StableDiffusion, net: ControlNet, init_params, frozen_part,
              sample_batch: dict[str, np.ndarray] | None = None) -> loop.Task:
  """The ControlNet task: loss over ({"controlnet"}, batch, key, frozen), grids of edges over samples."""
  d = config.diffusion
  rate = float(config.controlnet.empty_prompt_rate)
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"controlnet.empty_prompt_rate must be in [0, 1], got {rate}")

  def loss_fn(params, batch, key, frozen):
    k_z, k_drop, k_loss = jax.random.split(key, 3)
    full = partition.combine(params, frozen["base"])  # {"unet": frozen, "controlnet": trained}
    z = base.encode_images(frozen["vae"], batch["image"], key=k_z)  # [B, h, w, c]
    ctx = base.encode_text(frozen["text"], batch["tokens"])  # [B, L, D]
    null = base.encode_text(frozen["text"], frozen["null_tokens"])  # [1, L, D]
    ctx = diffusion.drop_condition(ctx, null, rate, key=k_drop)
    model_fn = base.model_fn(full["unet"], ctx, controls=[Control(net, full["controlnet"], batch["control"])])
    loss = diffusion.loss(model_fn, base.schedule, z, key=k_loss, prediction=base.prediction,
                          weighting=d.weighting or None, min_snr_gamma=float(d.min_snr_gamma))
    return loss, {}

  sample_fn = None
  if sample_batch is not None:
    s = config.sample
    n = min(int(s.num_images), sample_batch["image"].shape[0])
    tokens = jnp.asarray(sample_batch["tokens"][:n])
    control = jnp.asarray(sample_batch["control"][:n])  # [n, H, W, 3]
    channels = int(base.vae.config.out_channels)
    shown = jnp.broadcast_to(jnp.mean(control, axis=-1, keepdims=True), control.shape[:3] + (channels,))

    @jax.jit
    def gen(ema, key):
      noise = jax.random.normal(key, (n,) + base.latent_shape, jnp.float32)
      return base.sample(frozen_part["unet"], tokens, noise, sampler=s.sampler, num_steps=int(s.num_steps),
                         guidance_scale=float(s.guidance_scale), controls=[Control(net, ema["controlnet"], control)])

    def sample_fn(ema, key):
      return jnp.concatenate([shown * 2.0 - 1.0, gen(ema, key)])  # edges row, then samples

  frozen = {"base": frozen_part, "vae": base.vae_params, "text": base.text_params, "null_tokens": base.null_ids()}
  return loop.Task(name="controlnet", init_params=init_params, loss_fn=loss_fn, frozen=frozen,
                   batch_keys=("image", "tokens", "control"), sample_fn=sample_fn,
                   grid_cols=max(1, min(int(config.sample.num_images), 10)))


def controlnet_path(workdir: str) -> str:
  """Where :func:`train_controlnet` writes the final diffusers ControlNet folder."""
  return os.path.join(workdir, CONTROLNET_DIR)


def train_controlnet(config: ml_collections.ConfigDict, workdir: str, *, stream=None) -> dict[str, Any]:
  """Trains (or resumes) a ControlNet over the frozen base of ``config.base``; writes the diffusers folder.

  Returns:
    ``{"step", "controlnet", "trainable_params", "frozen_params", "total_seconds"}``.

  Example:
    >>> out = train_controlnet(config, "/tmp/cn")  # doctest: +SKIP
  """
  from jdiff.convert.controlnet import save_controlnet
  stream = stream or sys.stdout
  t0 = time.perf_counter()
  if config.base and not config.base.startswith(("gs://", "s3://")):
    config.base = os.path.abspath(os.path.expanduser(config.base))
  base = load_base(config.base)
  net, labels, init_params, frozen_part = build(config, base)
  dcfg = data_config(config, base)
  c = config.controlnet
  loader = ControlLoader(make_loader(dcfg, base, batch_size=int(config.train.get("batch_size") or 0) or None),
                         low=c.canny_low, high=c.canny_high)
  sample_batch = None
  if config.train.sample_every:
    sample_batch = next(ControlLoader(make_loader(dcfg, base, batch_size=max(int(dcfg.batch_size),
                                                                             int(config.sample.num_images))),
                                      low=c.canny_low, high=c.canny_high))
  saved = ml_collections.ConfigDict(config.to_dict())
  saved.data = dcfg
  loop.write_config(saved, workdir)
  task = make_task(config, base, net, init_params, frozen_part, sample_batch)
  n_train = partition.count(jax.eval_shape(init_params, jax.random.key(0)))
  n_frozen = partition.count(frozen_part)
  if parallel.is_main_process():
    print(f"[controlnet] trainable params: {n_train:,} || frozen params: {n_frozen:,} || "
          f"trainable%: {100.0 * n_train / (n_train + n_frozen):.4f}", file=stream, flush=True)
  state = loop.train(config.train, task, loader, workdir, seed=config.seed, stream=stream)
  out = controlnet_path(workdir)
  if parallel.is_main_process():
    save_controlnet(net, jax.device_get(state.sampling_params["controlnet"]), out)
    print(f"[controlnet] diffusers ControlNetModel -> {out}", file=stream, flush=True)
  return {"step": int(state.step), "controlnet": out, "trainable_params": n_train, "frozen_params": n_frozen,
          "total_seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
  """``--base DIR`` plus ``train.loop``'s ``--config FILE --config.a.b=v --workdir DIR``."""
  argv = list(sys.argv if argv is None else argv)
  argv, base = loop.pop_flag(argv, "base")

  def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    if base is not None:
      config.base = base
    out = train_controlnet(config, workdir)
    if parallel.is_main_process():
      print(f"[controlnet] done in {out['total_seconds'] / 60:.1f} min: {out['controlnet']}", flush=True)

  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return loop.main_wrapper(run, default_config=os.path.join(here, "configs", "controlnet_digits.py"),
                           default_workdir="workdir/controlnet_digits", argv=argv)


if __name__ == "__main__":
  sys.exit(main())
