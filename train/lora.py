"""``python -m train.lora --base DIR``: LoRA fine-tuning of a frozen latent diffusion model.

The base is a finished training workdir or a diffusers Stable Diffusion or SDXL base folder
(``model_index.json``), loaded as the library's bundle (:func:`jdiff.ldm.load_path`); its UNet, VAE and
text encoder(s) are frozen inputs of the train step and are never written. The trained parameters are only
the low-rank factors of :mod:`jdiff.lora` (the UNet kernels selected by ``lora.targets``), so the optimizer
state, the gradients, the EMA and the checkpoints hold the factors alone (plus optimizer state, rng and data
position). One step: encode images with the frozen VAE, drop each caption to the empty prompt with
probability ``diffusion.cond_drop``, condition on the captions with the frozen text encoder(s) (the
bundle's ``encode_batch``: for SDXL both encoders' penultimate states, the second's pooled output and time
ids from each example's ``original_size`` / ``crops_coords_top_left``, as diffusers'
``train_text_to_image_lora_sdxl.py``), merge the factors into the base UNet (the bundle's ``model_fn(...,
lora=...)``, :func:`jdiff.lora.merge` with rank dropout ``lora.dropout``) and regress the noise / v
target (:func:`jdiff.diffusion.loss`).

At the end the adapter is written in the diffusers/PEFT layout to
``WORKDIR/pytorch_lora_weights.safetensors`` (:func:`jdiff.lora.save_diffusers`), which
``StableDiffusion.generate(lora=...)`` / ``StableDiffusionXL.generate(lora=...)``, ``sample.txt2img --lora``
and diffusers' ``load_lora_weights`` (``StableDiffusionXLPipeline``'s for an SDXL base) read.

Example:
  $ python -m train.lora --base workdir/ldm_digits --workdir workdir/lora_digits
  $ python -m train.lora --base checkpoints/sd15 --data photos/ --config.lora.rank=16 --workdir /tmp/lora
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections

from jdiff import diffusion, ldm, lora, parallel
from jdiff.evaluation import digit_prompts
from jdiff.ldm import factors_to_tree, tree_to_lora
from jdiff.pipelines import StableDiffusion
from train import loop

__all__ = ["load_base", "data_config", "make_loader", "factors_to_tree", "tree_to_lora", "build", "make_task",
           "train_lora", "adapter_path", "parameter_report", "main"]

ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' save_lora_weights uses


def load_base(path: str, *, flag: str = "--base") -> StableDiffusion:
  """The frozen base: a training workdir or a diffusers Stable Diffusion / SDXL base folder
  (:func:`jdiff.ldm.load_path`).

  Raises:
    FileNotFoundError: ``path`` is empty, missing, or neither kind of folder.
    ValueError: an SDXL refiner (its batches would need aesthetic scores).
  """
  base = ldm.load_path(path, what="base", flag=flag)
  try:
    base.batch_condition_keys
  except ValueError as e:
    raise ValueError(f"{flag} {path!r}: {e}") from None
  return base


# ----------------------------------------------------------------------------- data


def data_config(config: ml_collections.ConfigDict, base: StableDiffusion,
                data: str | None = None) -> ml_collections.ConfigDict:
  """The data section to train on.

  ``data`` (the ``--data`` flag) is an image folder (captions from ``captions.jsonl`` or sidecar
  ``.txt`` files) or a TFDS dataset name; without it the base run's own data (``data.from_base``),
  else ``config.data``. Images are resized to the base's size and converted to its VAE's channels. A base
  whose conditioning reads the crop (SDXL's time ids: ``original_size`` / ``crops_coords_top_left``) gets
  ``crop="center"`` when the data section has none.

  Raises:
    FileNotFoundError: ``data`` looks like a path (has a separator or starts with "." / "~") and
      does not exist.
  """
  if data is None and config.data.get("from_base", True) and base.data_config is not None:
    return base.data_config
  d = ml_collections.ConfigDict(config.data.to_dict())
  if data is not None:
    p = os.path.expanduser(data)
    if os.path.isdir(p):
      d.kind, d.path = "folder", os.path.abspath(p)
    elif os.sep in data or data.startswith((".", "~")) or os.path.exists(p):
      raise FileNotFoundError(f"--data {data!r} is not an image folder (no such directory)")
    else:
      d.kind, d.name = "tfds", data
  d.channels = int(base.vae.config.in_channels)
  d.image_size = int(base.default_size)
  if "crops_coords_top_left" in base.batch_condition_keys and not d.get("crop"):
    d.crop = "center"
  return d


def make_loader(data: ml_collections.ConfigDict, base: StableDiffusion, *, batch_size: int | None = None):
  """The loader of ``data`` with captions tokenized as the base's batches hold them (``batch_tokenize``)."""
  from train import vae as vae_train
  return vae_train.make_loader(ml_collections.ConfigDict({"data": data}), tokenize=base.batch_tokenize,
                               batch_size=batch_size)


# ----------------------------------------------------------------------------- the adapter


def build(config: ml_collections.ConfigDict, base: StableDiffusion) -> tuple[tuple[tuple[str, float], ...],
                                                                            Callable[[jax.Array], Any]]:
  """The adapter's static scales and ``key -> trained tree`` (zero up-projections: starts as the base).

  Raises:
    ValueError: a bad ``lora.*`` value, or targets that select no kernel.
  """
  c = config.lora
  try:
    lcfg = lora.LoraConfig(rank=int(c.rank), alpha=float(c.alpha or c.rank), targets=ldm.lora_targets(c.targets),
                           dropout=float(c.dropout))
  except ValueError as e:
    raise ValueError(f"lora config: {e}") from None
  params = base.unet_params
  opts = dict(rank=lcfg.rank, alpha=lcfg.alpha, targets=lcfg.targets)
  try:
    scales = jax.eval_shape(lambda: lora.init(params, key=jax.random.key(0), **opts)).scales
  except ValueError as e:
    raise ValueError(f"lora.targets={c.targets!r}: {e}") from None

  def init_params(key):
    return factors_to_tree(lora.init(params, key=key, **opts).factors)

  return scales, init_params


def parameter_report(trainable: Any, base_params: Any) -> str:
  """``trainable params: N || all params: M || trainable%: P`` (PEFT's line; all = base + factors)."""
  n_train = lora.num_params(trainable)
  n_all = lora.num_params(base_params) + n_train
  return f"trainable params: {n_train:,} || all params: {n_all:,} || trainable%: {100.0 * n_train / n_all:.4f}"


# ----------------------------------------------------------------------------- training


def _sample_prompts(config: ml_collections.ConfigDict) -> list[str]:
  s = config.sample
  if s.get("prompt"):
    return [str(s.prompt)] * max(1, int(s.per_prompt))
  return digit_prompts(max(1, min(int(s.per_prompt), 4)))[0]


def make_task(config: ml_collections.ConfigDict, base: StableDiffusion, scales, init_params) -> loop.Task:
  """The LoRA task: loss over (factors, batch, key, frozen base), sample grids from the merged EMA factors.

  The key is split as ``(posterior, dropout, lora dropout, loss) = split(key, 4)``; caption dropout replaces
  a whole example's tokens by the base's ``batch_null_tokens`` before the frozen encoders (with frozen
  encoders the same as replacing its embedding by the empty prompt's).
  """
  d = config.diffusion
  dropout = float(config.lora.dropout)

  def loss_fn(params, batch, key, frozen):
    k_z, k_drop, k_lora, k_loss = jax.random.split(key, 4)
    z = base.encode_images(frozen["vae"], batch["image"], key=k_z)  # [B, h, w, c]
    tokens = diffusion.drop_condition(batch["tokens"], frozen["null_tokens"], float(d.cond_drop), key=k_drop)
    ctx = base.encode_batch(frozen["text"], tokens, batch)  # [B, L, D] (SDXL: text, text_embeds, time_ids)
    model_fn = base.model_fn(frozen["unet"], ctx, lora=tree_to_lora(params, scales), lora_dropout=dropout,
                             key=k_lora)
    loss = diffusion.loss(model_fn, base.schedule, z, key=k_loss, prediction=base.prediction,
                          weighting=d.weighting or None, min_snr_gamma=float(d.min_snr_gamma))
    return loss, {}

  s = config.sample
  prompts = _sample_prompts(config)

  def sample_fn(ema, key):
    images = base.generate(prompts, key=key, num_steps=int(s.num_steps), guidance_scale=float(s.guidance_scale),
                           sampler=s.sampler, height=base.default_size, width=base.default_size,
                           lora=tree_to_lora(ema, scales))
    return images * 2.0 - 1.0  # [N, H, W, C] in [-1, 1]

  frozen = {"unet": base.unet_params, "vae": base.vae_params, "text": base.all_text_params(),
            "null_tokens": base.batch_null_tokens()}
  return loop.Task(name="lora", init_params=init_params, loss_fn=loss_fn, frozen=frozen,
                   batch_keys=("image",) + base.batch_condition_keys, sample_fn=sample_fn, grid_cols=10)


def adapter_path(workdir: str) -> str:
  """Where :func:`train_lora` writes the final adapter."""
  return os.path.join(workdir, ADAPTER_FILE)


def train_lora(config: ml_collections.ConfigDict, workdir: str, *, data: str | None = None,
               stream=None) -> dict[str, Any]:
  """Trains (or resumes) LoRA factors over the frozen base of ``config.base``; writes the adapter file.

  Returns:
    ``{"step", "adapter", "trainable_params", "all_params", "total_seconds"}``.

  Example:
    >>> out = train_lora(config, "/tmp/lora", data="photos/")  # doctest: +SKIP
  """
  stream = stream or sys.stdout
  t0 = time.perf_counter()
  if config.base and not config.base.startswith(("gs://", "s3://")):
    config.base = os.path.abspath(os.path.expanduser(config.base))  # config.json stays valid from any cwd
  base = load_base(config.base)
  scales, init_params = build(config, base)
  dcfg = data_config(config, base, data)
  loader = make_loader(dcfg, base, batch_size=int(config.train.get("batch_size") or 0) or None)
  saved = ml_collections.ConfigDict(config.to_dict())
  saved.data = dcfg  # the data actually used
  loop.write_config(saved, workdir)
  task = make_task(config, base, scales, init_params)
  shapes = jax.eval_shape(init_params, jax.random.key(0))
  report = parameter_report(shapes, base.unet_params)
  if parallel.is_main_process():
    print(f"[lora] {report}", file=stream, flush=True)
  state = loop.train(config.train, task, loader, workdir, seed=config.seed, stream=stream)
  adapter = tree_to_lora(jax.device_get(state.sampling_params), scales)
  path = adapter_path(workdir)
  if parallel.is_main_process():
    lora.save_diffusers(path, {"unet": adapter})
    print(f"[lora] adapter ({os.path.getsize(path) / 1024:.1f} KiB) -> {path}", file=stream, flush=True)
  return {"step": int(state.step), "adapter": path, "trainable_params": lora.num_params(shapes),
          "all_params": lora.num_params(base.unet_params) + lora.num_params(shapes),
          "total_seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
  """``--base DIR`` and ``--data FOLDER|TFDS`` plus ``train.loop``'s ``--config FILE --config.a.b=v --workdir DIR``."""
  argv = list(sys.argv if argv is None else argv)
  argv, base = loop.pop_flag(argv, "base")
  argv, data = loop.pop_flag(argv, "data")

  def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    if base is not None:
      config.base = base
    out = train_lora(config, workdir, data=data)
    if parallel.is_main_process():
      print(f"[lora] done in {out['total_seconds'] / 60:.1f} min: python -m sample.txt2img ... --lora "
            f"{out['adapter']}", flush=True)

  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return loop.main_wrapper(run, default_config=os.path.join(here, "configs", "lora_digits.py"),
                           default_workdir="workdir/lora_digits", argv=argv)


if __name__ == "__main__":
  sys.exit(main())
