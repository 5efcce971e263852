"""Text-to-image and image-to-image generation built from jdiff's pieces.

:class:`StableDiffusion` bundles a UNet, a KL autoencoder, a CLIP text encoder (modules and parameter trees),
a tokenizer and the training noise schedule. ``generate`` is tokenize -> encode text -> classifier-free
guidance (:func:`jdiff.guidance.cfg`) -> a registered sampler (:func:`jdiff.samplers.sample`) -> VAE decode,
compiled as ONE XLA program per static configuration (sampler, steps, options) and input shape.

Numerics follow diffusers' ``StableDiffusionPipeline``: unconditional embeddings from the empty prompt
(or the negative prompt), guidance only when ``guidance_scale > 1``, latents divided by the VAE's
``scaling_factor`` before decoding, images mapped from [-1, 1] to [0, 1] and clipped.

Example:
  >>> pipe = StableDiffusion.from_diffusers("checkpoints/sd15")  # doctest: +SKIP
  >>> images = pipe.generate(["a red fox in snow"], key=jax.random.key(0), num_steps=20)  # doctest: +SKIP
  >>> images.shape  # doctest: +SKIP
  (1, 512, 512, 3)
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion, guidance, samplers, schedules
from jdiff.convert import _io
from jdiff.convert.text import load_text_encoder
from jdiff.schedules import Schedule
from jdiff.tokenizers import ByteTokenizer, CLIPTokenizer

__all__ = ["StableDiffusion", "schedule_from_config", "sampler_options_from_config"]

# scheduler_config.json keys that define the training schedule rather than a sampler option
_SCHEDULE_KEYS = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "rescale_betas_zero_snr", "prediction_type", "_class_name", "_diffusers_version"}
# diffusers scheduler option name -> jdiff sampler option name, where they differ
_OPTION_ALIASES = {"solver_order": "order", "algorithm_type": "algorithm"}


def schedule_from_config(config: Mapping[str, Any]) -> Schedule:
  """The training noise schedule described by a diffusers ``scheduler_config.json`` dict.

  Example:
    >>> sched = schedule_from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085,
    ...                               "beta_end": 0.012, "num_train_timesteps": 1000})
  """
  rescale = bool(config.get("rescale_betas_zero_snr", False))
  if config.get("trained_betas") is not None:
    sched = schedules.from_betas(np.asarray(config["trained_betas"], np.float64))
    return schedules.rescale_zero_terminal_snr(sched) if rescale else sched
  return schedules.make(config.get("beta_schedule", "linear"), int(config.get("num_train_timesteps", 1000)),
                        beta_start=float(config.get("beta_start", 1e-4)),
                        beta_end=float(config.get("beta_end", 0.02)), rescale_zero_snr=rescale)


def sampler_options_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """Sampler options (diffusers names, e.g. ``steps_offset``, ``timestep_spacing``, ``clip_sample``) of a
  scheduler config, renamed where jdiff's names differ (``solver_order`` -> ``order``)."""
  return {_OPTION_ALIASES.get(k, k): v for k, v in config.items() if k not in _SCHEDULE_KEYS}


def _accepted(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
  """The subset of ``options`` that sampler ``method`` takes as keyword arguments."""
  params = inspect.signature(samplers._common.get(method)).parameters
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
    return dict(options)
  return {k: v for k, v in options.items() if k in params}


def _hashable(value: Any) -> Any:
  if isinstance(value, (list, tuple)):
    return tuple(_hashable(v) for v in value)
  if isinstance(value, dict):
    return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
  return value


@dataclasses.dataclass(eq=False)
class StableDiffusion:
  """A latent text-to-image model: modules, parameter trees, tokenizer and schedule.

  Attributes:
    unet, unet_params: the denoiser (:class:`jdiff.models.UNet`) and its parameters.
    vae, vae_params: the autoencoder (:class:`jdiff.models.AutoencoderKL`) and its parameters.
    text_encoder, text_params: the text encoder (:class:`jdiff.models.CLIPTextModel`) and its parameters.
    tokenizer: a :class:`~jdiff.tokenizers.CLIPTokenizer` or :class:`~jdiff.tokenizers.ByteTokenizer`.
    schedule: the training noise schedule.
    prediction: what the UNet predicts: "epsilon", "v" or "sample".
    scaling_factor: latents are divided by this before decoding (0.18215 for SD 1.x/2.x).
    sampler_options: default sampler options (diffusers names) from the scheduler config; each sampler
      receives the ones it accepts, and ``generate``'s own keyword options override them.
    clip_skip: use the text encoder's output this many blocks before the last (diffusers' ``clip_skip``).

  Example:
    >>> pipe = StableDiffusion.from_diffusers("sd15")  # doctest: +SKIP
    >>> imgs = pipe.generate(["a cat"], key=jax.random.key(1), num_steps=25, sampler="dpm_solver")  # doctest: +SKIP
  """
  unet: Any
  unet_params: Any
  vae: Any
  vae_params: Any
  text_encoder: Any
  text_params: Any
  tokenizer: CLIPTokenizer | ByteTokenizer
  schedule: Schedule
  prediction: str = "epsilon"
  scaling_factor: float = 0.18215
  sampler_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  clip_skip: int = 0
  _programs: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

  def __post_init__(self):
    self.prediction = diffusion.check_prediction(self.prediction)

  @classmethod
  def from_diffusers(cls, path: str | os.PathLike, *, dtype: str | None = None,
                     clip_skip: int = 0) -> StableDiffusion:
    """Loads a diffusers Stable Diffusion folder (``model_index.json`` with ``unet/``, ``vae/``,
    ``text_encoder/``, ``tokenizer/``, ``scheduler/``); safetensors only, no torch.

    Args:
      path: the pipeline folder.
      dtype: compute dtype of the three networks ("bfloat16"); parameters stay float32.
      clip_skip: see the class attributes.

    Raises:
      FileNotFoundError: the folder or one of its parts is missing.
      ValueError: an unsupported config or a missing / mis-shaped tensor (named).

    Example:
      >>> pipe = StableDiffusion.from_diffusers("checkpoints/sd21", dtype="bfloat16")  # doctest: +SKIP
    """
    from jdiff.convert import load_unet, load_vae  # the model converters import heavier modules

    root = Path(path)
    if not root.is_dir():
      raise FileNotFoundError(f"diffusers pipeline folder {str(root)!r} does not exist")
    index = _io.read_config(root, name="model_index.json")
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
      if part not in index:
        raise ValueError(f"{str(root / 'model_index.json')!r} lists no {part!r}; is this a Stable Diffusion "
                         "pipeline?")
      if not (root / part).is_dir():
        raise FileNotFoundError(f"pipeline part {str(root / part)!r} does not exist")
    sched_config = _io.read_config(root / "scheduler", name="scheduler_config.json")
    unet, unet_params = load_unet(root / "unet", dtype=dtype)
    vae, vae_params = load_vae(root / "vae", dtype=dtype)
    text, text_params = load_text_encoder(root / "text_encoder", dtype=dtype)
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    return cls(unet=unet, unet_params=unet_params, vae=vae, vae_params=vae_params, text_encoder=text,
               text_params=text_params, tokenizer=tokenizer, schedule=schedule_from_config(sched_config),
               prediction=sched_config.get("prediction_type", "epsilon"),
               scaling_factor=float(vae.config.scaling_factor),
               sampler_options=sampler_options_from_config(sched_config), clip_skip=clip_skip)

  # ---- pieces ----

  @property
  def latent_channels(self) -> int:
    return int(self.unet.config.in_channels)

  @property
  def vae_factor(self) -> int:
    return int(self.vae.config.downsample_factor)

  @property
  def default_size(self) -> int:
    """Default image height/width: the UNet's ``sample_size`` times the VAE's downsampling factor."""
    return int(self.unet.config.sample_size) * self.vae_factor

  def _encode_text(self, text_params, ids: jax.Array) -> jax.Array:
    out = self.text_encoder.apply({"params": text_params}, ids, clip_skip=self.clip_skip)
    return out.last_hidden_state  # [B, L, D]

  def encode_prompts(self, prompts: Sequence[str]) -> jax.Array:
    """Text embeddings ``[B, L, D]`` of prompts (the UNet's ``encoder_hidden_states``)."""
    return self._encode_text(self.text_params, jnp.asarray(self.tokenizer(list(prompts))))

  def _model_fn(self, params, ids, neg_ids, scale, guided: bool) -> Callable[[jax.Array, jax.Array], jax.Array]:
    unet_params, _, text_params = params
    cond = self._encode_text(text_params, ids)
    apply = lambda x, t, c: self.unet.apply({"params": unet_params}, x, t, c)
    if guided:
      return guidance.cfg(apply, cond, self._encode_text(text_params, neg_ids), scale)
    return lambda x, t: apply(x, t, cond)

  def _decode(self, vae_params, z: jax.Array) -> jax.Array:
    images = self.vae.apply({"params": vae_params}, z / self.scaling_factor, method=self.vae.decode)
    return jnp.clip(images.astype(jnp.float32) / 2.0 + 0.5, 0.0, 1.0)  # [B, H, W, 3] in [0, 1]

  def _program(self, kind: str, method: str, num_steps: int, guided: bool, options: dict[str, Any],
               extra: tuple = ()) -> Callable[..., jax.Array]:
    """The jitted program for one static configuration (jax.jit adds one compilation per shape)."""
    cache_key = (kind, method, num_steps, guided, _hashable(options), extra)
    if cache_key in self._programs:
      return self._programs[cache_key]

    if kind == "txt2img":
      def run(params, schedule, ids, neg_ids, latents, scale, key):
        model_fn = self._model_fn(params, ids, neg_ids, scale, guided)
        z0 = samplers.sample(method, model_fn, schedule, latents, num_steps=num_steps, key=key,
                             prediction=self.prediction, **options)
        return self._decode(params[1], z0)
    else:
      raise ValueError(f"unknown program kind {kind!r}")
    program = jax.jit(run)
    self._programs[cache_key] = program
    return program

  def _options(self, sampler: str, user: Mapping[str, Any]) -> dict[str, Any]:
    samplers._common.get(sampler)  # a clear error for an unknown sampler name
    return {**_accepted(sampler, self.sampler_options), **dict(user)}

  def _prompt_ids(self, prompts: str | Sequence[str], negative_prompts: str | Sequence[str] | None):
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
      raise ValueError("prompts is empty")
    if negative_prompts is None:
      negative = [""] * len(prompts)
    elif isinstance(negative_prompts, str):
      negative = [negative_prompts] * len(prompts)
    else:
      negative = list(negative_prompts)
      if len(negative) != len(prompts):
        raise ValueError(f"{len(negative)} negative_prompts for {len(prompts)} prompts")
    return jnp.asarray(self.tokenizer(prompts)), jnp.asarray(self.tokenizer(negative))

  def _latent_shape(self, batch: int, height: int | None, width: int | None) -> tuple[int, int, int, int]:
    height = self.default_size if height is None else int(height)
    width = self.default_size if width is None else int(width)
    f = self.vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
    if height % f or width % f or height <= 0 or width <= 0:
      raise ValueError(f"height and width must be positive multiples of {f}, got {height}x{width}")
    return (batch, height // self.vae_factor, width // self.vae_factor, self.latent_channels)

  # ---- generation ----

  def generate(self, prompts: str | Sequence[str], *, key: jax.Array, num_steps: int = 50,
               guidance_scale: float = 7.5, sampler: str = "ddim",
               negative_prompts: str | Sequence[str] | None = None, height: int | None = None,
               width: int | None = None, latents: jax.Array | None = None,
               **sampler_options: Any) -> jax.Array:
    """Text-to-image generation.

    Args:
      prompts: one prompt or a list (one image each; repeat a prompt for several images).
      key: PRNG key for the initial latents (when ``latents`` is None) and stochastic samplers.
      num_steps: sampler steps (model evaluations for first-order samplers).
      guidance_scale: classifier-free guidance weight; <= 1 runs the conditional model alone.
      sampler: a registered sampler name (``jdiff.samplers.available()``).
      negative_prompts: the unconditional prompts (default: the empty prompt).
      height, width: image size in pixels (default: the UNet's sample size times the VAE factor).
      latents: initial noise ``[B, h, w, C]`` (NHWC, unit variance) instead of drawing it from ``key``.
      **sampler_options: override the scheduler-config defaults (``eta``, ``order``, ...).

    Returns:
      float32 images ``[B, H, W, 3]`` in [0, 1].

    Example:
      >>> imgs = pipe.generate(["a cat", "a dog"], key=jax.random.key(0), num_steps=20)  # doctest: +SKIP
    """
    ids, neg_ids = self._prompt_ids(prompts, negative_prompts)
    batch = ids.shape[0]
    noise_key, sample_key = jax.random.split(key)
    if latents is None:
      latents = jax.random.normal(noise_key, self._latent_shape(batch, height, width), jnp.float32)
    else:
      latents = jnp.asarray(latents, jnp.float32)
      if latents.ndim != 4 or latents.shape[0] != batch or latents.shape[-1] != self.latent_channels:
        raise ValueError(f"latents must be [B={batch}, h, w, {self.latent_channels}], got {latents.shape}")
    guided = float(guidance_scale) > 1.0
    program = self._program("txt2img", sampler, int(num_steps), guided, self._options(sampler, sampler_options))
    params = (self.unet_params, self.vae_params, self.text_params)
    return program(params, self.schedule, ids, neg_ids, latents, jnp.float32(guidance_scale), sample_key)
