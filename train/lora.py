"""``python -m train.lora --base DIR``: LoRA fine-tuning of a frozen latent diffusion model.

The base is a finished ``train.ldm`` workdir or a diffusers Stable Diffusion folder
(``model_index.json``); its UNet, VAE and text encoder are frozen inputs of the train step and are
never written. The trained parameters are only the low-rank factors of :mod:`jdiff.lora` (the
kernels selected by ``lora.targets``), so the optimizer state, the gradients, the EMA and the
checkpoints hold the factors alone (plus optimizer state, rng and data position). One step:
encode images with the frozen VAE, captions with the frozen text encoder (caption dropout
``diffusion.cond_drop``), merge the factors into the base UNet (:func:`jdiff.lora.merge`, with
rank dropout ``lora.dropout``) and regress the noise / v target (:func:`jdiff.diffusion.loss`).

At the end the adapter is written in the diffusers/PEFT layout to
``WORKDIR/pytorch_lora_weights.safetensors`` (:func:`jdiff.lora.save_diffusers`), which
``StableDiffusion.generate(lora=...)``, ``sample.txt2img --lora`` and diffusers'
``load_lora_weights`` read.

Example:
  $ python -m train.lora --base workdir/ldm_digits --workdir workdir/lora_digits
  $ python -m train.lora --base checkpoints/sd15 --data photos/ --config.lora.rank=16 --workdir /tmp/lora
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from jdiff import diffusion, lora, parallel
from jdiff.models import AutoencoderKL
from jdiff.pipelines import StableDiffusion
from train import loop

__all__ = ["Base", "load_base", "data_config", "make_loader", "factors_to_tree", "tree_to_lora", "build",
           "make_task", "train_lora", "adapter_path", "parameter_report", "main"]

ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' save_lora_weights uses


# ----------------------------------------------------------------------------- the frozen base


@dataclasses.dataclass
class Base:
  """A frozen latent diffusion model as a :class:`~jdiff.pipelines.StableDiffusion` pipeline.

  Attributes:
    pipe: the pipeline (UNet, VAE, text encoder, tokenizer, schedule, prediction).
    data: the data section of the ``train.ldm`` run (None for a diffusers folder).
    source: the path it was loaded from.
    image_size: the pixel size the base generates (latent size times the VAE factor).
  """

  pipe: StableDiffusion
  data: ml_collections.ConfigDict | None
  source: str
  image_size: int

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    f = self.pipe.vae_factor
    return (self.image_size // f, self.image_size // f, self.pipe.latent_channels)

  def tokenize(self, text: str) -> np.ndarray:
    """caption -> token ids [L] (numpy)."""
    return np.asarray(self.pipe.tokenizer([text]))[0]

  def encode_text(self, text_params: Any, tokens: jax.Array) -> jax.Array:
    """tokens [B, L] -> context [B, L, D]."""
    return self.pipe._encode_text(text_params, tokens)

  def latents(self, vae_params: Any, images: jax.Array, key: jax.Array) -> jax.Array:
    """images [B, H, W, C] in [-1, 1] -> scaled posterior samples [B, h, w, c]."""
    vae = self.pipe.vae
    post = vae.apply({"params": vae_params}, images, method=AutoencoderKL.encode)
    return vae.apply({"params": vae_params}, post.sample(key), method=AutoencoderKL.scale_latents)

  def null_tokens(self) -> jax.Array:
    return jnp.asarray(self.tokenize(""))[None]  # [1, L]


def load_base(path: str, *, flag: str = "--base") -> Base:
  """Loads a ``train.ldm`` workdir or a diffusers Stable Diffusion folder as a frozen :class:`Base`.

  Raises:
    FileNotFoundError: ``path`` is empty, missing, or neither kind of folder.

  Example:
    >>> base = load_base("workdir/ldm_digits")  # doctest: +SKIP
  """
  path = os.path.expanduser(path or "")
  if not path:
    raise FileNotFoundError(f"no base model given: pass {flag} <train.ldm workdir or diffusers folder>")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"base model folder {path!r} does not exist")
  if os.path.exists(os.path.join(path, "model_index.json")):
    pipe = StableDiffusion.from_diffusers(path)
    return Base(pipe=pipe, data=None, source=path, image_size=pipe.default_size)
  if not os.path.exists(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"base {path!r} is neither a train.ldm workdir (config.json) nor a diffusers "
                            "folder (model_index.json)")
  from jdiff.tokenizers import ByteTokenizer
  from train import ldm as ldm_train
  config, ldm, params = ldm_train.load_from_workdir(path)
  if "vae" not in config or "unet" not in config:
    raise FileNotFoundError(f"{path!r} is not a train.ldm workdir (its config has no vae/unet sections)")
  pipe = StableDiffusion(unet=ldm.unet, unet_params=params, vae=ldm.vae, vae_params=ldm.vae_params,
                         text_encoder=ldm.text, text_params=ldm.text_params,
                         tokenizer=ByteTokenizer(ldm.max_length), schedule=ldm.schedule, prediction=ldm.prediction,
                         scaling_factor=float(ldm.vae.config.scaling_factor))
  return Base(pipe=pipe, data=config.data, source=path, image_size=int(config.data.image_size))


# ----------------------------------------------------------------------------- data


def data_config(config: ml_collections.ConfigDict, base: Base, data: str | None = None) -> ml_collections.ConfigDict:
  """The data section to train on.

  ``data`` (the ``--data`` flag) is an image folder (captions from ``captions.jsonl`` or sidecar
  ``.txt`` files) or a TFDS dataset name; without it the base run's own data (``data.from_base``),
  else ``config.data``. Images are resized to the base's size and converted to its VAE's channels.

  Raises:
    FileNotFoundError: ``data`` looks like a path (has a separator or starts with "." / "~") and
      does not exist.
  """
  if data is None and config.data.get("from_base", True) and base.data is not None:
    return base.data
  d = ml_collections.ConfigDict(config.data.to_dict())
  if data is not None:
    p = os.path.expanduser(data)
    if os.path.isdir(p):
      d.kind, d.path = "folder", os.path.abspath(p)
    elif os.sep in data or data.startswith((".", "~")) or os.path.exists(p):
      raise FileNotFoundError(f"--data {data!r} is not an image folder (no such directory)")
    else:
      d.kind, d.name = "tfds", data
  d.channels = int(base.pipe.vae.config.in_channels)
  d.image_size = int(base.image_size)
  return d


def make_loader(data: ml_collections.ConfigDict, base: Base, *, batch_size: int | None = None):
  """The loader of ``data`` with captions tokenized by the base's tokenizer."""
  from train import vae as vae_train
  return vae_train.make_loader(ml_collections.ConfigDict({"data": data}), tokenize=base.tokenize,
                               batch_size=batch_size)


# ----------------------------------------------------------------------------- factors <-> trained tree


def factors_to_tree(factors: dict[str, dict[str, jax.Array]]) -> dict[str, Any]:
  """``{"a/b/kernel": {"down", "up"}}`` -> nested ``{"a": {"b": {"kernel": {"down", "up"}}}}`` (the
  trained pytree: plain nested dicts checkpoint as they are)."""
  flat = {f"{p}/{n}": v for p, f in factors.items() for n, v in f.items()}
  return traverse_util.unflatten_dict(flat, sep="/")


def tree_to_lora(tree: Any, scales: tuple[tuple[str, float], ...]) -> lora.LoRA:
  """Inverse of :func:`factors_to_tree`, with the adapter's static alpha / r scales."""
  flat = traverse_util.flatten_dict(dict(tree), sep="/")
  paths = sorted({p.rsplit("/", 1)[0] for p in flat})
  return lora.LoRA(factors={p: {"down": flat[p + "/down"], "up": flat[p + "/up"]} for p in paths},
                   scales=scales)


def _targets(value) -> tuple[str, ...]:
  if isinstance(value, str):
    return tuple(v.strip() for v in value.split(",") if v.strip())
  return tuple(value)


def build(config: ml_collections.ConfigDict, base: Base) -> tuple[tuple[tuple[str, float], ...],
                                                                  Callable[[jax.Array], Any]]:
  """The adapter's static scales and ``key -> trained tree`` (zero up-projections: starts as the base).

  Raises:
    ValueError: a bad ``lora.*`` value, or targets that select no kernel.
  """
  c = config.lora
  try:
    lcfg = lora.LoraConfig(rank=int(c.rank), alpha=float(c.alpha or c.rank), targets=_targets(c.targets),
                           dropout=float(c.dropout))
  except ValueError as e:
    raise ValueError(f"lora config: {e}") from None
  params = base.pipe.unet_params
  opts = dict(rank=lcfg.rank, alpha=lcfg.alpha, targets=lcfg.targets)
  try:
    scales = jax.eval_shape(lambda: lora.init(jax.random.key(0), params, **opts)).scales
  except ValueError as e:
    raise ValueError(f"lora.targets={c.targets!r}: {e}") from None

  def init_params(key):
    return factors_to_tree(lora.init(key, params, **opts).factors)

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
  from train.ldm import digit_prompts
  return digit_prompts(max(1, min(int(s.per_prompt), 4)))[0]


def make_task(config: ml_collections.ConfigDict, base: Base, scales, init_params) -> loop.Task:
  """The LoRA task: loss over (factors, batch, key, frozen base), sample grids from the merged EMA factors."""
  d = config.diffusion
  dropout = float(config.lora.dropout)
  pipe = base.pipe

  def loss_fn(params, batch, key, frozen):
    k_z, k_drop, k_lora, k_loss = jax.random.split(key, 4)
    z = base.latents(frozen["vae"], batch["image"], k_z)  # [B, h, w, c]
    ctx = base.encode_text(frozen["text"], batch["tokens"])  # [B, L, D]
    null = base.encode_text(frozen["text"], frozen["null_tokens"])  # [1, L, D]
    ctx = diffusion.drop_condition(k_drop, ctx, null, float(d.cond_drop))
    unet_params = lora.merge(frozen["unet"], tree_to_lora(params, scales), dropout=dropout,
                             key=k_lora if dropout else None)

    def model_fn(x, t):
      return pipe.unet.apply({"params": unet_params}, x, t, ctx)

    loss = diffusion.loss(model_fn, pipe.schedule, z, k_loss, prediction=pipe.prediction,
                          weighting=d.weighting or None, min_snr_gamma=float(d.min_snr_gamma))
    return loss, {}

  s = config.sample
  prompts = _sample_prompts(config)

  def sample_fn(ema, key):
    images = pipe.generate(prompts, key=key, num_steps=int(s.num_steps), guidance_scale=float(s.guidance_scale),
                           sampler=s.sampler, height=base.image_size, width=base.image_size,
                           lora=tree_to_lora(ema, scales))
    return images * 2.0 - 1.0  # [N, H, W, C] in [-1, 1]

  frozen = {"unet": pipe.unet_params, "vae": pipe.vae_params, "text": pipe.text_params,
            "null_tokens": base.null_tokens()}
  return loop.Task(name="lora", init_params=init_params, loss_fn=loss_fn, frozen=frozen,
                   batch_keys=("image", "tokens"), sample_fn=sample_fn, grid_cols=10)


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
  report = parameter_report(shapes, base.pipe.unet_params)
  if parallel.is_main_process():
    print(f"[lora] {report}", file=stream, flush=True)
  state = loop.train(config.train, task, loader, workdir, seed=config.seed, stream=stream)
  adapter = tree_to_lora(jax.device_get(state.ema_params), scales)
  path = adapter_path(workdir)
  if parallel.is_main_process():
    lora.save_diffusers(path, {"unet": adapter})
    print(f"[lora] adapter ({os.path.getsize(path) / 1024:.1f} KiB) -> {path}", file=stream, flush=True)
  return {"step": int(state.step), "adapter": path, "trainable_params": lora.num_params(shapes),
          "all_params": lora.num_params(base.pipe.unet_params) + lora.num_params(shapes),
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
