"""``python -m train.ldm``: latent diffusion (frozen VAE + small CLIP text encoder + trained UNet).

With no arguments it trains the default of ``configs/ldm_digits.py`` on the bundled digits: the
autoencoder first (in ``WORKDIR/vae``, unless ``vae.pretrained`` names a trained one), then the
latent UNet. One training step: encode images with the frozen VAE, sample the posterior, scale by
the VAE's scaling factor, replace each caption (byte tokens) by the empty caption with probability
``cond_drop`` (:func:`jdiff.diffusion.drop_condition`, for classifier-free guidance), encode the
captions with the CLIP text encoder (trained jointly with the UNet when ``text.trainable``, else
frozen at its random initialisation) and regress the UNet on the epsilon or v target, with
optional min-SNR weighting (:func:`jdiff.diffusion.loss`). The UNet reads the text through
cross-attention and, when ``unet.class_embed_type`` is "projection" or "simple_projection", also
through the pooled text (the causal encoder's last state) added to its time embedding
(:class:`jdiff.ldm.TextUNet`). The model is the library's latent diffusion bundle
(:func:`jdiff.ldm.from_config`, a :class:`jdiff.pipelines.StableDiffusion`): the step composes its
``encode_images``, ``encode_text`` and ``model_fn``. Sample grids use classifier-free guidance on the
EMA weights; a finished run loads with ``StableDiffusion.from_workdir(WORKDIR)``.

Example:
  $ python -m train.ldm                                   # the whole default, ~15 min on 2 CPU cores
  $ python -m train.ldm --config configs/ldm_digits.py --config.train.steps=500 --workdir /tmp/ldm
  $ python -m train.ldm --config configs/flow_dit_digits.py --workdir /tmp/flow_dit   # rectified-flow MMDiT
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jdiff import data, diffusion, flow, ldm, parallel
from jdiff.evaluation import digit_prompts
from jdiff.models import AutoencoderKL
from jdiff.pipelines import StableDiffusion
from jdiff.sdxl import StableDiffusionXL
from jdiff.tokenizers import ByteTokenizer
from train import loop
from train import vae as vae_train

__all__ = ["byte_tokenize", "BYTE_VOCAB", "build", "init_params", "split_params",
           "make_loss", "make_task", "train_ldm", "main"]

BOS, EOS, PAD = ByteTokenizer.bos_token_id, ByteTokenizer.eos_token_id, ByteTokenizer.pad_token_id
BYTE_VOCAB = ByteTokenizer.vocab_size


def byte_tokenize(text: str, max_length: int) -> np.ndarray:
  """Token ids [max_length] of :class:`jdiff.tokenizers.ByteTokenizer`: bos, UTF-8 bytes, eos, pad.

  Example:
    >>> byte_tokenize("ab", 6).tolist()
    [257, 97, 98, 258, 256, 256]
  """
  return ByteTokenizer(max_length)(text)[0]


def build(config: ml_collections.ConfigDict, vae: AutoencoderKL, vae_params: Any) -> StableDiffusion:
  """The latent diffusion bundle of ``config`` around a trained VAE (UNet parameters not yet set;
  :func:`jdiff.ldm.from_config`)."""
  return ldm.from_config(config, vae, vae_params)


def _text_trainable(config: ml_collections.ConfigDict) -> bool:
  return bool(config.text.get("trainable", False))


def init_params(config: ml_collections.ConfigDict, bundle: StableDiffusion):
  """``key -> trained parameters``: the UNet's, with the text encoder's when ``text.trainable``."""
  return lambda key: ldm.trained_params(config, bundle, bundle.init_unet(key))


def split_params(config: ml_collections.ConfigDict, params: Any, text_params: Any) -> tuple[Any, Any]:
  """(UNet params, text params) of the trained tree (``text_params`` when the encoder is frozen)."""
  if _text_trainable(config):
    return params["unet"], params["text"]
  return params, text_params


def make_loss(config: ml_collections.ConfigDict, bundle: StableDiffusion):
  """The training objective ``(params, batch, key, frozen) -> (loss, {})`` of a latent diffusion run.

  One step: encode ``batch["image"]`` with the frozen VAE (a posterior sample, shifted and scaled), drop
  each caption to the empty prompt with probability ``diffusion.cond_drop``, encode the token ids with
  the text encoder (trained or frozen), and regress the denoiser on its prediction type's target
  (:func:`jdiff.diffusion.loss`: min-SNR weighting, offset noise and input perturbation from
  ``config.diffusion``; with ``prediction="flow"`` the rectified-flow velocity of :func:`jdiff.flow.loss`,
  timestep density, shift and weighting from ``config.diffusion``). The key is split as
  ``(posterior, dropout, loss) = split(key, 3)``.

  The context is the bundle's ``encode_batch`` of the (dropped) tokens and the batch: an SDXL bundle is
  conditioned as diffusers' ``train_text_to_image_sdxl.py`` does: ``batch["tokens"]`` ``[B, 2, L]`` holds
  both tokenizers' ids, dropped together to the empty prompt's; the context is both encoders' penultimate
  hidden states concatenated, the second's projected pooled output and the time ids
  ``original_size + crops_coords_top_left + (H, W)`` of each example
  (:func:`jdiff.sdxl.batch_time_ids` of the batch's ``original_size`` / ``crops_coords_top_left``).
  """
  d = config.diffusion
  weighting = d.weighting or None
  if bundle.prediction == "flow":  # rectified flow (jdiff.flow.loss): the bundle's denoiser predicts eps - x0
    options = dict(density=str(d.get("density", "uniform")), logit_mean=float(d.get("logit_mean", 0.0)),
                   logit_std=float(d.get("logit_std", 1.0)), shift=float(d.get("shift", 1.0)))

    def objective(fn, z, key):
      return flow.loss(fn, z, key=key, weighting=weighting, num_train_timesteps=bundle.schedule.num_timesteps,
                       **options)
  else:
    options = dict(min_snr_gamma=d.min_snr_gamma, noise_offset=float(d.get("noise_offset", 0.0)),
                   input_perturbation=float(d.get("input_perturbation", 0.0)))

    def objective(fn, z, key):
      return diffusion.loss(fn, bundle.schedule, z, key=key, prediction=bundle.prediction, weighting=weighting,
                            **options)

  def loss_fn(params, batch, key, frozen):
    k_z, k_drop, k_loss = jax.random.split(key, 3)
    unet_params, text_params = split_params(config, params, frozen.get("text"))
    if "latent_mean" in batch:  # precomputed frozen encoders (jdiff.data.precompute): the same draws
      z = bundle.scale_latents(data.sample_latents(batch["latent_mean"], batch["latent_logvar"], key=k_z))
      ctx = diffusion.drop_condition(batch["text"], frozen["null_text"], d.cond_drop, key=k_drop)  # [B, L, D]
    else:
      z = bundle.encode_images(frozen["vae"], batch["image"], key=k_z)  # [B, h, w, c]
      # Dropping the caption (not its embedding) trains the null embedding of a trainable encoder too.
      tokens = diffusion.drop_condition(batch["tokens"], frozen["null_tokens"], d.cond_drop, key=k_drop)  # [B, L]
      # [B, L, D]; SDXL (tokens [B, 2, L]): {"text" [B, L, D1 + D2], "text_embeds" [B, P], "time_ids" [B, 6]}
      ctx = bundle.encode_batch(text_params, tokens, batch)
    loss = objective(bundle.model_fn(unet_params, ctx), z, k_loss)
    return loss, {}

  return loss_fn


def make_task(config: ml_collections.ConfigDict, bundle: StableDiffusion) -> loop.Task:
  """The latent UNet training task (loss, frozen inputs, CFG sample grids)."""
  trainable = _text_trainable(config)
  loss_fn = make_loss(config, bundle)
  s = config.sample
  prompts = [p for p in str(s.get("prompts", "") or "").split("|") if p]
  if not prompts:
    prompts, _ = digit_prompts(max(1, min(int(s.per_prompt), 4)))
  ids = jax.tree.map(jnp.asarray, bundle.tokenize(prompts))  # [B, L] (SDXL: one [B, L] per tokenizer)

  @jax.jit
  def sample_fn(ema, key):
    unet_params, text_params = split_params(config, ema, bundle.text_params)
    noise = jax.random.normal(key, (len(prompts),) + bundle.latent_shape, jnp.float32)
    return bundle.sample(unet_params, ids, noise, text_params=text_params, sampler=s.sampler,
                         num_steps=s.num_steps, guidance_scale=s.guidance_scale)

  frozen = {"vae": bundle.vae_params, "null_tokens": bundle.batch_null_tokens()}
  if not trainable:
    frozen["text"] = bundle.all_text_params()
  # A fine-tune starts from the checkpoint's UNet; a run from scratch from a seeded initialisation.
  start = ldm.trained_params(config, bundle, bundle.unet_params) if _pretrained(config) else init_params(config, bundle)
  return loop.Task(name="ldm", init_params=start, loss_fn=loss_fn, frozen=frozen,
                   batch_keys=("image",) + bundle.batch_condition_keys,
                   sample_fn=sample_fn, grid_cols=min(10, len(prompts) * max(1, int(s.get("per_prompt", 1)))))


def _pretrained(config: ml_collections.ConfigDict) -> str:
  return os.path.expanduser(str(config.get("pretrained", "") or ""))


def _vae_config_for(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  vc = ml_collections.ConfigDict({"seed": config.seed, "data": config.data, "vae": config.vae,
                                  "train": config.vae.train})
  return vc


def train_ldm(config: ml_collections.ConfigDict, workdir: str, *, stream=None) -> dict[str, Any]:
  """Trains the VAE if needed, then the latent UNet; returns timings and the final step.

  With ``config.pretrained`` (a diffusers Stable Diffusion or SDXL base folder) it fine-tunes that checkpoint's UNet
  with its VAE (and, unless ``text.trainable``, its text encoder) frozen, and writes the result as a
  diffusers folder at the end (``export.dir``, default ``WORKDIR/diffusers``).
  """
  if _pretrained(config):
    return finetune(config, workdir, stream=stream)
  t0 = time.perf_counter()
  loop.write_config(config, workdir)
  if config.vae.pretrained:
    vae, vae_params = vae_train.load_vae(os.path.expanduser(config.vae.pretrained))
  else:
    vdir = os.path.join(workdir, "vae")
    vcfg = _vae_config_for(config)
    if os.path.exists(os.path.join(vdir, "vae.json")) and _finished(vdir, int(config.vae.train.steps)):
      vae, vae_params = vae_train.load_vae(vdir)
    else:
      vae, vae_params = vae_train.train_vae(vcfg, vdir, train_cfg=config.vae.train, stream=stream)
  t_vae = time.perf_counter() - t0
  bundle = build(config, vae, vae_params)
  if not isinstance(bundle.tokenizer, ByteTokenizer) and parallel.is_main_process():
    bundle.tokenizer.save_pretrained(os.path.join(workdir, "tokenizer"))  # what from_workdir reads back
  task = make_task(config, bundle)
  loader = vae_train.make_loader(config, tokenize=bundle.tokenize,
                                 batch_size=config.train.get("batch_size") or None)
  state = loop.train(config.train, task, loader, workdir, seed=config.seed, stream=stream)
  return {"step": int(state.step), "vae_seconds": t_vae, "total_seconds": time.perf_counter() - t0}


def finetune(config: ml_collections.ConfigDict, workdir: str, *, stream=None) -> dict[str, Any]:
  """Fine-tunes the UNet of the diffusers folder ``config.pretrained`` on ``config.data`` and exports the
  result (:func:`export`); returns timings, the final step and the export folder."""
  t0 = time.perf_counter()
  bundle = ldm.finetune_bundle(config)  # one-line errors before anything is written or compiled
  loop.write_config(config, workdir)
  task = make_task(config, bundle)
  batch_size = config.train.get("batch_size") or None
  if config.data.get("precompute"):
    loader = precomputed_loader(config, bundle, batch_size=batch_size)
    null_text = bundle.encode_text(bundle.text_params, bundle.null_ids())  # [1, L, D]
    task = dataclasses.replace(task, batch_keys=("latent_mean", "latent_logvar", "text"),
                               frozen={**task.frozen, "null_text": null_text})
  else:
    loader = vae_train.make_loader(config, tokenize=bundle.batch_tokenize, batch_size=batch_size)
  state = loop.train(config.train, task, loader, workdir, seed=config.seed, stream=stream)
  out = None
  if int(state.step) >= int(config.train.steps):
    out = export(workdir, None, ema=bool(config.export.ema), bundle=bundle, state=state)
  return {"step": int(state.step), "total_seconds": time.perf_counter() - t0, "export": out}


def precomputed_loader(config: ml_collections.ConfigDict, bundle: StableDiffusion, *,
                       batch_size: int | None = None) -> data.Loader:
  """Runs the frozen VAE and text encoder once over ``config.data`` (each example at its epoch-0 crop and
  flip), stores the latent moments and text embeddings under ``data.precompute`` (reused when the
  settings and checkpoint match) and returns a loader over them. Refused when the text encoder trains."""
  d = config.data
  source = data.make_source(kind=d.kind, name=d.name, data_dir=d.data_dir, split=d.split, path=d.path,
                            image_key=d.image_key, label_key=d.label_key or None, caption_key=d.caption_key or None,
                            channels=d.channels, verify=d.get("verify", "header"),
                            max_bad_fraction=float(d.get("max_bad_fraction", 0.01)))
  vae_params, text_params = bundle.vae_params, bundle.text_params
  out = data.precompute(source, os.path.expanduser(d.precompute),
                        encode_image=jax.jit(lambda x: bundle.encode_moments(vae_params, x)),
                        encode_text=jax.jit(lambda ids: bundle.encode_text(text_params, ids)),
                        tokenize=bundle.tokenize, image_size=d.image_size, crop=d.get("crop") or "center",
                        flip=bool(d.get("flip", False)), seed=d.seed, channels=d.channels,
                        text_trainable=_text_trainable(config), tag=_pretrained(config))
  return data.Loader(data.PrecomputedSource(out), batch_size=batch_size or d.batch_size, seed=d.seed)


def export(workdir: str, out: str | None = None, *, ema: bool | None = None, bundle: StableDiffusion | None = None,
           state: Any = None) -> str:
  """Writes a fine-tune workdir's model as a diffusers Stable Diffusion folder: the trained UNet (EMA or
  online weights), the trained text encoder or the checkpoint's own, and the checkpoint's frozen VAE,
  tokenizer and scheduler copied byte for byte. Only process 0 writes.

  Args:
    workdir: a ``train.ldm`` workdir of a run with ``pretrained`` set.
    out: the output folder (default ``export.dir`` of the run, else ``WORKDIR/diffusers``).
    ema: export the EMA weights (default: the run's ``export.ema``).
    bundle, state: the run's bundle and final TrainState (else read from the workdir).
  """
  config = loop.read_config(workdir)
  if not _pretrained(config):
    if ema is False:
      raise ValueError("--no-ema applies to fine-tune runs; a run from scratch exports its EMA weights")
    out = out or os.path.join(workdir, "diffusers")
    bundle = StableDiffusion.from_workdir(workdir)  # one line for a layout diffusers cannot hold
    if parallel.is_main_process():
      bundle.save_pretrained(out)
    return out
  ema = bool(config.export.ema) if ema is None else bool(ema)
  out = out or config.export.get("dir") or os.path.join(workdir, "diffusers")
  bundle = bundle or ldm.finetune_bundle(config)
  if state is None:
    params = ldm.restore_checked_ema(workdir, jax.eval_shape(
        lambda: ldm.trained_params(config, bundle, bundle.unet_params)), what="UNet checkpoint", ema=ema)
  else:
    params = state.sampling_params if ema else state.params
  params = jax.tree.map(parallel.global_to_host, params)
  unet_params, text_params = split_params(config, params, bundle.text_params)
  trained = dataclasses.replace(bundle, unet_params=unet_params, text_params=text_params)
  if parallel.is_main_process():
    copy = ("vae", "tokenizer", "scheduler") + (() if _text_trainable(config) else ("text_encoder",))
    if isinstance(bundle, StableDiffusionXL):  # both text encoders stay frozen
      copy += ("tokenizer_2", "text_encoder_2")
    trained.save_pretrained(out, copy_from=bundle.source, copy_parts=copy)
  return out


def _finished(workdir: str, steps: int) -> bool:
  from jdiff import checkpoint

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    return (ckpt.latest_step() or 0) >= steps
  finally:
    ckpt.close()


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  out = train_ldm(config, workdir)
  if not parallel.is_main_process():
    return
  if "vae_seconds" in out:
    print(f"[ldm] done in {out['total_seconds'] / 60:.1f} min (VAE {out['vae_seconds'] / 60:.1f} min); "
          f"evaluate with: python -m sample.evaluate --workdir {workdir}", flush=True)
  elif out.get("export"):
    print(f"[ldm] done in {out['total_seconds'] / 60:.1f} min; diffusers folder: {out['export']}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return loop.main_wrapper(run, default_config=os.path.join(here, "configs", "ldm_digits.py"),
                           default_workdir="workdir/ldm_digits", argv=None if argv is None else list(argv))


if __name__ == "__main__":
  sys.exit(main())
