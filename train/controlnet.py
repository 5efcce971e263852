"""``python -m train.controlnet --base DIR``: train a ControlNet over a frozen latent diffusion model.

The base is a finished ``train.ldm`` workdir (default ``workdir/ldm_digits``) or a diffusers Stable
Diffusion folder. The parameter tree is split by :mod:`jdiff.partition` labels
``{"unet": frozen, "controlnet": trainable}``: only ``{"controlnet": ...}`` is the train state's
parameters (so gradients, optimizer state, EMA and checkpoints hold ControlNet leaves only), while
the UNet (with the VAE and text encoder) is a frozen input of the step and is never written. The
ControlNet starts from the UNet's encoder (:func:`jdiff.models.controlnet.init_from_unet`) with its
zero convolutions at zero, so step 0 reproduces the base exactly.

Control images are the Canny edges of the training images (:func:`jdiff.control_images.canny`,
``controlnet.canny_low/high``), computed on the host for every batch. One step: encode images with
the frozen VAE, captions with the frozen text encoder, replace the caption by the empty prompt with
probability ``controlnet.empty_prompt_rate``, run the ControlNet on (noisy latent, t, caption,
edges) and the frozen UNet with its residuals, and regress the noise / v target. The final
ControlNet is written as a diffusers ``ControlNetModel`` folder ``WORKDIR/controlnet``
(:func:`jdiff.convert.controlnet.save_controlnet`). Sample grids show the control edges (top row)
and the generated images under them.

Example:
  $ python -m train.ldm --workdir workdir/ldm_digits
  $ python -m train.controlnet --base workdir/ldm_digits --workdir workdir/controlnet_digits
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jdiff import control_images, diffusion, guidance, parallel, partition, samplers
from jdiff.models.controlnet import ControlNet, ControlNetConfig, init_from_unet
from train import loop
from train.lora import Base, data_config, load_base, make_loader

__all__ = ["RULES", "ControlLoader", "edges_of", "build", "make_task", "generate", "train_controlnet",
           "controlnet_path", "edge_agreement", "load_from_workdir", "evaluate", "main"]

RULES = ((r"^controlnet/", partition.TRAINABLE), (r"^unet/", partition.FROZEN))
CONTROLNET_DIR = "controlnet"


# ----------------------------------------------------------------------------- control images


def edges_of(images: np.ndarray, low: float, high: float) -> np.ndarray:
  """Canny control images [B, H, W, 3] in {0, 1} of images [B, H, W, C] in [-1, 1]."""
  pix = np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
  return np.stack([control_images.canny(p, low, high) for p in pix]).astype(np.float32)


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


def _hint_channels(config: ml_collections.ConfigDict, vae_factor: int) -> tuple[int, ...]:
  widths = tuple(int(c) for c in config.controlnet.conditioning_embedding_out_channels)
  n = int(round(math.log2(vae_factor))) + 1
  if 2 ** (n - 1) != vae_factor:
    raise ValueError(f"the VAE's downsampling factor {vae_factor} is not a power of 2")
  if not widths:
    return tuple(16 * 2 ** i for i in range(n))
  if len(widths) != n:
    raise ValueError(f"controlnet.conditioning_embedding_out_channels={widths} halves the control image "
                     f"{len(widths) - 1} times; the VAE downsamples {vae_factor}x, so {n} widths are needed")
  return widths


def class_kwargs(unet_config, context: jax.Array) -> dict[str, jax.Array]:
  """The ControlNet's ``class_labels`` for a base UNet that adds its pooled text embedding to the time
  embedding (train.ldm's "projection" digits default, :func:`train.ldm.pooled_text`), else nothing."""
  if unet_config.class_embed_type in ("projection", "simple_projection"):
    from train.ldm import pooled_text
    return {"class_labels": pooled_text(context)}  # [B, D]
  return {}


def build(config: ml_collections.ConfigDict, base: Base):
  """The ControlNet, the partition labels of ``{"unet", "controlnet"}`` and ``key -> {"controlnet": params}``.

  Returns:
    ``(controlnet, labels, init_params, frozen_part)`` where ``frozen_part`` is ``{"unet": params}``.
  """
  pipe = base.pipe
  cfg = ControlNetConfig(unet=pipe.unet.config, conditioning_channels=3,
                         conditioning_embedding_out_channels=_hint_channels(config, pipe.vae_factor))
  net = ControlNet(cfg)
  h, w, c = base.latent_shape
  x = jnp.zeros((1, h, w, c), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  ctx = jnp.zeros((1, 1, pipe.unet.config.per_block("cross_attention_dim")[0]), jnp.float32)
  hint = jnp.zeros((1, base.image_size, base.image_size, 3), jnp.float32)
  unet_params = pipe.unet_params

  def init_cn(key):
    return init_from_unet(unet_params, key, net, x, t, ctx, hint, **class_kwargs(pipe.unet.config, ctx))

  abstract = {"unet": jax.eval_shape(lambda: unet_params), "controlnet": jax.eval_shape(init_cn, jax.random.key(0))}
  labels = partition.labels(abstract, RULES)
  _, frozen_part = partition.split({"unet": unet_params, "controlnet": abstract["controlnet"]}, labels)

  def init_params(key):
    return {"controlnet": init_cn(key)}

  return net, labels, init_params, frozen_part


def generate(base: Base, net: ControlNet, unet_params: Any, cn_params: Any, tokens: jax.Array, control: jax.Array,
             key: jax.Array, *, sampler: str = "ddim", num_steps: int = 25, guidance_scale: float = 3.0,
             conditioning_scale: float = 1.0) -> jax.Array:
  """Images [B, H, W, C] in [-1, 1] for token rows [B, L] and control images [B, H, W, 3] (jit this).

  Under guidance both halves get the control residuals (diffusers' default, no guess mode).
  """
  pipe = base.pipe
  b = tokens.shape[0]
  ctx = base.encode_text(pipe.text_params, tokens)  # [B, L, D]
  null = base.encode_text(pipe.text_params, base.null_tokens())  # [1, L, D]

  def apply(x, tt, c):
    text, hint = c
    down, mid = net.apply({"params": cn_params}, x, tt, text, hint, conditioning_scale=conditioning_scale,
                          **class_kwargs(pipe.unet.config, text))
    return pipe.unet.apply({"params": unet_params}, x, tt, text, down_residuals=down, mid_residual=mid)

  model_fn = guidance.cfg(apply, (ctx, control), (null, control), guidance_scale)
  x_T = jax.random.normal(key, (b,) + tuple(base.latent_shape), jnp.float32)
  z0 = samplers.sample(sampler, model_fn, pipe.schedule, x_T, num_steps=num_steps, prediction=pipe.prediction)
  images = pipe.vae.apply({"params": pipe.vae_params}, z0 / pipe.scaling_factor, method=pipe.vae.decode)
  return jnp.clip(images, -1.0, 1.0)


def make_task(config: ml_collections.ConfigDict, base: Base, net: ControlNet, init_params, frozen_part,
              sample_batch: dict[str, np.ndarray] | None = None) -> loop.Task:
  """The ControlNet task: loss over ({"controlnet"}, batch, key, frozen), grids of edges over samples."""
  d = config.diffusion
  rate = float(config.controlnet.empty_prompt_rate)
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"controlnet.empty_prompt_rate must be in [0, 1], got {rate}")
  pipe = base.pipe

  def loss_fn(params, batch, key, frozen):
    k_z, k_drop, k_loss = jax.random.split(key, 3)
    full = partition.combine(params, frozen["base"])  # {"unet": frozen, "controlnet": trained}
    z = base.latents(frozen["vae"], batch["image"], k_z)  # [B, h, w, c]
    ctx = base.encode_text(frozen["text"], batch["tokens"])  # [B, L, D]
    null = base.encode_text(frozen["text"], frozen["null_tokens"])  # [1, L, D]
    ctx = diffusion.drop_condition(k_drop, ctx, null, rate)
    hint = batch["control"]  # [B, H, W, 3]

    def model_fn(x, t):
      down, mid = net.apply({"params": full["controlnet"]}, x, t, ctx, hint, **class_kwargs(pipe.unet.config, ctx))
      return pipe.unet.apply({"params": full["unet"]}, x, t, ctx, down_residuals=down, mid_residual=mid)

    loss = diffusion.loss(model_fn, pipe.schedule, z, k_loss, prediction=pipe.prediction,
                          weighting=d.weighting or None, min_snr_gamma=float(d.min_snr_gamma))
    return loss, {}

  sample_fn = None
  if sample_batch is not None:
    s = config.sample
    n = min(int(s.num_images), sample_batch["image"].shape[0])
    tokens = jnp.asarray(sample_batch["tokens"][:n])
    control = jnp.asarray(sample_batch["control"][:n])  # [n, H, W, 3]
    channels = int(pipe.vae.config.out_channels)
    shown = jnp.broadcast_to(jnp.mean(control, axis=-1, keepdims=True), control.shape[:3] + (channels,))
    gen = jax.jit(lambda p, k: generate(base, net, frozen_part["unet"], p["controlnet"], tokens, control, k,
                                        sampler=s.sampler, num_steps=int(s.num_steps),
                                        guidance_scale=float(s.guidance_scale)))

    def sample_fn(ema, key):
      return jnp.concatenate([shown * 2.0 - 1.0, gen(ema, key)])  # edges row, then samples

  frozen = {"base": frozen_part, "vae": pipe.vae_params, "text": pipe.text_params, "null_tokens": base.null_tokens()}
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
    save_controlnet(net, jax.device_get(state.ema_params["controlnet"]), out)
    print(f"[controlnet] diffusers ControlNetModel -> {out}", file=stream, flush=True)
  return {"step": int(state.step), "controlnet": out, "trainable_params": n_train, "frozen_params": n_frozen,
          "total_seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- evaluation


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
  """Boolean masks [..., H, W] grown by ``radius`` pixels in the max (Chebyshev) norm."""
  out = mask.copy()
  h, w = mask.shape[-2:]
  for dy in range(-radius, radius + 1):
    for dx in range(-radius, radius + 1):
      shifted = np.zeros_like(mask)
      shifted[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
          mask[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
      out |= shifted
  return out


def edge_agreement(edges: np.ndarray, reference: np.ndarray, *, tolerance: int = 1) -> dict[str, np.ndarray]:
  """Per-image agreement of binary edge maps [N, H, W] with reference edge maps [N, H, W].

  ``precision``: the fraction of ``edges`` pixels within ``tolerance`` pixels (max norm) of a
  reference edge; ``recall``: the fraction of reference pixels within ``tolerance`` of an edge;
  ``f1`` their harmonic mean (0 where both are 0); ``iou``: the exact-pixel intersection over union.
  An image with no edges at all scores 0 (an empty map never "agrees").

  Example:
    >>> m = np.zeros((1, 8, 8), bool); m[0, 4, 2:6] = True
    >>> float(edge_agreement(np.roll(m, 1, axis=1), m)["f1"][0])
    1.0
  """
  e, r = np.asarray(edges) > 0, np.asarray(reference) > 0
  if e.shape != r.shape or e.ndim != 3:
    raise ValueError(f"edge maps must both be [N, H, W], got {e.shape} and {r.shape}")
  n_e, n_r = e.sum(axis=(1, 2)), r.sum(axis=(1, 2))
  hit_e = (e & _dilate(r, tolerance)).sum(axis=(1, 2))
  hit_r = (r & _dilate(e, tolerance)).sum(axis=(1, 2))
  precision = np.where(n_e > 0, hit_e / np.maximum(n_e, 1), 0.0)
  recall = np.where(n_r > 0, hit_r / np.maximum(n_r, 1), 0.0)
  f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
  union = (e | r).sum(axis=(1, 2))
  iou = np.where(union > 0, (e & r).sum(axis=(1, 2)) / np.maximum(union, 1), 0.0)
  return {"precision": precision, "recall": recall, "f1": f1, "iou": iou}


def load_from_workdir(workdir: str):
  """(config, base, ControlNet module, ControlNet EMA params) of a ``train.controlnet`` run."""
  from train import vae as vae_train
  config = loop.read_config(workdir)
  if "controlnet" not in config:
    raise ValueError(f"{workdir} is not a train.controlnet workdir (its config has no 'controlnet' section)")
  base = load_base(config.base)
  net, _, init_params, _ = build(config, base)
  trained = vae_train.restore_checked_ema(workdir, jax.eval_shape(init_params, jax.random.key(0)),
                                          what="ControlNet checkpoint")
  return config, base, net, trained["controlnet"]


def evaluate(workdir: str, *, per_digit: int = 10, guidance_scale: float | None = None,
             num_steps: int | None = None, seed: int = 0, batch: int = 100, tolerance: int = 1,
             grid: str | None = None) -> dict[str, Any]:
  """Does the digits ControlNet make samples follow the control edges? With and without it.

  Controls are the Canny edges of ``per_digit`` real scikit-learn digits of each class (upscaled
  as in the training data). Every control is sampled under three prompts: the control's own digit
  ("matching"), a different random digit ("conflicting") and the empty prompt ("empty"), each with
  the ControlNet (conditioning scale 1) and without it (scale 0: exactly the frozen base, same
  noise). Scores: ``follows_control`` = the independent digit classifier of :mod:`sample.evaluate`
  names the control's digit; ``follows_prompt`` = it names the prompted digit; edge F1 / IoU of the
  samples' Canny edges against the control (:func:`edge_agreement`).

  Returns:
    JSON-ready ``{"conditions": {name: {"with": {...}, "without": {...}}}, ...}``; writes a grid
    (rows: control, then without / with ControlNet for the conflicting and the empty prompt) when
    ``grid`` is a path.
  """
  from sklearn.datasets import load_digits
  from jdiff.data import digits as digits_data
  from sample import evaluate as ev

  t0 = time.perf_counter()
  config, base, net, cn_params = load_from_workdir(workdir)
  s, c = config.sample, config.controlnet
  scale = float(s.guidance_scale if guidance_scale is None else guidance_scale)
  steps = int(s.num_steps if num_steps is None else num_steps)
  rng = np.random.default_rng(seed)
  d = load_digits()
  picks = np.stack([rng.choice(np.flatnonzero(d.target == k), per_digit, replace=False)
                    for k in range(10)], axis=1).reshape(-1)  # digit-major rows 0..9
  labels = d.target[picks]
  size = base.image_size
  images = digits_data.upscale(d.images[picks], size).astype(np.float32) / 127.5 - 1.0  # [N, S, S, 1]
  control = edges_of(images, c.canny_low, c.canny_high)  # [N, S, S, 3]
  other = (labels + rng.integers(1, 10, size=labels.shape)) % 10
  prompts = {"matching": [digits_data.caption_for(int(k)) for k in labels],
             "conflicting": [digits_data.caption_for(int(k)) for k in other],
             "empty": [""] * len(labels)}
  clf, _, _ = ev.digit_classifier(seed)
  unet_params = base.pipe.unet_params

  def make_gen(cond_scale):
    return jax.jit(lambda tok, ctl, k: generate(base, net, unet_params, cn_params, tok, ctl, k, num_steps=steps,
                                                guidance_scale=scale, sampler=s.sampler,
                                                conditioning_scale=cond_scale))

  gens = {"with": make_gen(1.0), "without": make_gen(0.0)}
  result: dict[str, Any] = {"workdir": workdir, "num_controls": int(len(labels)), "guidance_scale": scale,
                            "sampler": s.sampler, "num_steps": steps, "edge_tolerance_px": tolerance,
                            "controls": "Canny edges of real scikit-learn digits (the training set)",
                            "conditions": {}}
  shown: dict[str, np.ndarray] = {}
  key = jax.random.key(seed)
  for name, texts in prompts.items():
    tokens = np.stack([base.tokenize(t) for t in texts])
    result["conditions"][name] = {}
    for which, gen in gens.items():
      out, seconds = ev.generate_batched(gen, tokens, control, key=key, batch=batch)  # same noise both ways
      pred = clf.predict(ev.downscale_to_8x8(out))
      agree = edge_agreement(edges_of(out, c.canny_low, c.canny_high)[..., 0], control[..., 0], tolerance=tolerance)
      row = {"follows_control": float(np.mean(pred == labels)),
             "edge_f1": float(np.mean(agree["f1"])), "edge_iou": float(np.mean(agree["iou"])),
             "seconds_per_image": seconds / len(labels)}
      if name == "conflicting":
        row["follows_prompt"] = float(np.mean(pred == other))
      result["conditions"][name][which] = row
      shown[f"{name}/{which}"] = out[:10]
  if grid:
    rows = [np.broadcast_to(control[:10, ..., :1] * 2.0 - 1.0, shown["empty/with"].shape)]
    rows += [shown[k] for k in ("conflicting/without", "conflicting/with", "empty/without", "empty/with")]
    result["grid"] = loop.save_grid(np.concatenate(rows), grid, cols=10, scale=3)
    result["grid_rows"] = ["control edges", "conflicting prompt, without ControlNet",
                           "conflicting prompt, with ControlNet", "empty prompt, without", "empty prompt, with"]
    result["grid_conflicting_prompts"] = [int(k) for k in other[:10]]
  result["seconds"] = time.perf_counter() - t0
  return result


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
