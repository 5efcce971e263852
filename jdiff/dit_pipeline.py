"""Class-conditional image generation with a DiT, as diffusers' ``DiTPipeline`` runs it.

:class:`DiTPipeline` bundles a :class:`~jdiff.models.DiT` (``transformer/``), a KL autoencoder
(``vae/``) and the training noise schedule plus the sampler of the folder's ``scheduler/`` config.
``generate`` is one XLA program per static configuration (sampler, steps, guided or not, options) and
input shape: the sampler loop (:func:`jdiff.samplers.sample`) over the model function, then the VAE
decode.

Numerics follow ``DiTPipeline``: the process is variance-preserving with epsilon prediction; with a
learned variance (``out_channels = 2 * in_channels``) only the first ``in_channels`` output channels
(the epsilon) reach the sampler; classifier-free guidance (only when ``guidance_scale > 1``) runs the
labels and the null class on one doubled batch and mixes the epsilon channels
``uncond + guidance_scale * (cond - uncond)``; latents are divided by the VAE's ``scaling_factor``
before decoding and images mapped from [-1, 1] to [0, 1]. The null class is the transformer's
``num_embeds_ada_norm`` (diffusers writes the literal 1000, the same label for its 1000-class models).

Example:
  >>> pipe = DiTPipeline.from_diffusers("DiT-XL-2-256")  # doctest: +SKIP
  >>> images = pipe.generate(pipe.label_ids(["white shark", "umbrella"]), key=jax.random.key(0),
  ...                        num_steps=25)  # doctest: +SKIP
  >>> images.shape  # doctest: +SKIP
  (2, 256, 256, 3)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion, guidance, pipelines, samplers
from jdiff.convert import _io
from jdiff.models.dit import DiT
from jdiff.models.vae import AutoencoderKL
from jdiff.pipelines import accepted_options, schedule_from_config, static_key
from jdiff.schedules import Schedule

__all__ = ["DiTPipeline", "sampler_from_scheduler_config"]

def sampler_from_scheduler_config(config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
  """The jdiff sampler and its options for a DiT pipeline's ``scheduler_config.json`` dict
  (:func:`jdiff.pipelines.sampler_from_scheduler_config`).

  Raises:
    ValueError: an unknown scheduler class, or a DDPM scheduler with a learned variance (DiT pipelines
      hand the scheduler the epsilon channels only).
  """
  if config.get("_class_name") == "DDPMScheduler" and str(config.get("variance_type", "fixed_small")).startswith(
      "learned"):
    raise ValueError(f"DDPMScheduler variance_type={config['variance_type']!r} needs the model's variance "
                     "channels, which a DiT pipeline does not pass to the scheduler; use a fixed variance type")
  return pipelines.sampler_from_scheduler_config(config)


@dataclasses.dataclass(eq=False)
class DiTPipeline:
  """A class-conditional DiT, its autoencoder, schedule and sampler.

  Attributes:
    transformer, transformer_params: the :class:`~jdiff.models.DiT` and its parameters.
    vae, vae_params: the :class:`~jdiff.models.AutoencoderKL` and its parameters.
    schedule: the training noise schedule (:class:`~jdiff.schedules.Schedule`).
    sampler: default sampler name (from the scheduler class).
    sampler_options: default sampler options (from the scheduler config, diffusers' names).
    prediction: what the epsilon channels are ("epsilon" for DiT).
    scaling_factor: latents are divided by it before decoding.
    labels: class name -> label id (from ``model_index.json``'s ``id2label``, may be empty).
    scheduler_config: the scheduler config it was built from.
  """

  transformer: DiT
  transformer_params: Any
  vae: AutoencoderKL
  vae_params: Any
  schedule: Schedule
  sampler: str = "ddim"
  sampler_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  prediction: str = "epsilon"
  scaling_factor: float = 0.18215
  labels: Mapping[str, int] = dataclasses.field(default_factory=dict)
  scheduler_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  _programs: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

  def __post_init__(self):
    self.prediction = diffusion.check_prediction(self.prediction)
    cfg = self.transformer.config
    c = cfg.in_channels
    if cfg.output_channels not in (c, 2 * c):
      raise ValueError(f"a DiT pipeline needs out_channels {c} or {2 * c} (learned variance) for {c} input "
                       f"channels, got {cfg.output_channels}")
    if self.vae.config.latent_channels != c:
      raise ValueError(f"the VAE has {self.vae.config.latent_channels} latent channels, the transformer takes {c}")
    self.transformer_params = jax.tree.map(jnp.asarray, self.transformer_params)
    self.vae_params = jax.tree.map(jnp.asarray, self.vae_params)

  @classmethod
  def from_diffusers(cls, path: str | os.PathLike, *, dtype: str | None = None) -> DiTPipeline:
    """Loads a diffusers ``DiTPipeline`` folder (``model_index.json`` with ``transformer/``, ``vae/``,
    ``scheduler/``); safetensors only, no torch.

    Args:
      path: the pipeline folder.
      dtype: compute dtype of both networks ("bfloat16"); parameters stay float32.

    Raises:
      FileNotFoundError: the folder or one of its parts is missing.
      ValueError: an unsupported config or scheduler, or a missing / mis-shaped tensor (named).

    Example:
      >>> pipe = DiTPipeline.from_diffusers("DiT-XL-2-256", dtype="bfloat16")  # doctest: +SKIP
    """
    from jdiff.convert.dit import load_dit
    from jdiff.convert.vae import load_vae

    root = Path(path)
    _io.refuse_pickle(root, what="pipeline")
    if not root.is_dir():
      raise FileNotFoundError(f"diffusers pipeline folder {str(root)!r} does not exist")
    index = _io.read_config(root, name="model_index.json")
    for part in ("transformer", "vae", "scheduler"):
      if part not in index:
        raise ValueError(f"{str(root / 'model_index.json')!r} lists no {part!r}; is this a DiT pipeline?")
      if not (root / part).is_dir():
        raise FileNotFoundError(f"pipeline part {str(root / part)!r} does not exist")
    sched_config = _io.read_config(root / "scheduler", name="scheduler_config.json")
    sampler, options = sampler_from_scheduler_config(sched_config)
    transformer, transformer_params = load_dit(root / "transformer", dtype=dtype)
    vae, vae_params = load_vae(root / "vae", dtype=dtype)
    labels: dict[str, int] = {}
    for key, value in dict(index.get("id2label") or {}).items():
      for name in str(value).split(","):
        labels[name.strip()] = int(key)
    return cls(transformer=transformer, transformer_params=transformer_params, vae=vae, vae_params=vae_params,
               schedule=schedule_from_config(sched_config), sampler=sampler, sampler_options=options,
               prediction=sched_config.get("prediction_type", "epsilon"),
               scaling_factor=float(vae.config.scaling_factor), labels=dict(sorted(labels.items())),
               scheduler_config=sched_config)

  # ---- pieces ----

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    """(h, w, C) of the latents the transformer was trained on."""
    cfg = self.transformer.config
    return cfg.sample_size, cfg.sample_size, cfg.in_channels

  def label_ids(self, names: str | Sequence[str]) -> list[int]:
    """Label ids of class names (``id2label`` of the folder), e.g. ``["white shark"]`` -> ``[2]``.

    Raises:
      ValueError: a name that is not a class of this model.
    """
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
      if name not in self.labels:
        raise ValueError(f"{name!r} is not a class name of this model ({len(self.labels)} names known)")
    return [self.labels[n] for n in names]

  def model_fn(self, transformer_params: Any, class_labels: jax.Array, *,
               guidance_scale: float | jax.Array | None = None,
               guidance_rescale: float | jax.Array = 0.0) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The epsilon model ``model_fn(x_t [B, h, w, C], t [B]) -> eps [B, h, w, C]`` for labels [B].

    With ``guidance_scale`` it is classifier-free guided against the null class
    (:func:`jdiff.guidance.cfg`, one doubled batch) on the epsilon channels, with ``guidance_rescale``
    (0: off) blending toward the conditional output's standard deviation.

    Example:
      >>> fn = pipe.model_fn(pipe.transformer_params, jnp.array([207]), guidance_scale=4.0)  # doctest: +SKIP
      >>> z0 = samplers.sample("ddim", fn, pipe.schedule, z, num_steps=25)  # doctest: +SKIP
    """
    cfg = self.transformer.config
    c = cfg.in_channels

    def apply(x, t, labels):
      t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
      return self.transformer.apply({"params": transformer_params}, x, t, labels)[..., :c]

    labels = jnp.asarray(class_labels, jnp.int32)
    if guidance_scale is None:
      return lambda x, t: apply(x, t, labels)
    null = jnp.full(labels.shape, cfg.null_class, jnp.int32)
    return guidance.cfg(apply, labels, null, guidance_scale, guidance_rescale=guidance_rescale)

  def decode(self, vae_params: Any, latents: jax.Array) -> jax.Array:
    """Latents [B, h, w, C] (as the transformer sees them) -> float32 images [B, H, W, 3] in [0, 1]."""
    images = self.vae.apply({"params": vae_params}, latents / self.scaling_factor, method=self.vae.decode)
    return jnp.clip(images.astype(jnp.float32) * 0.5 + 0.5, 0.0, 1.0)

  def sample(self, transformer_params: Any, class_labels: jax.Array, noise: jax.Array, *,
             key: jax.Array | None = None, guidance_scale: float | jax.Array | None = None,
             guidance_rescale: float | jax.Array = 0.0, sampler: str | None = None, num_steps: int = 50,
             vae_params: Any = None, **options: Any) -> jax.Array:
    """Pure generation (jit it): labels [B] and x_T [B, h, w, C] -> images [B, H, W, 3] in [0, 1].

    ``guidance_scale`` None samples the conditional model alone; any value guides (see :meth:`generate`
    for diffusers' ``> 1`` rule). ``options`` override the scheduler config's sampler options.
    """
    sampler = sampler or self.sampler
    vae_params = self.vae_params if vae_params is None else vae_params
    fn = self.model_fn(transformer_params, class_labels, guidance_scale=guidance_scale,
                       guidance_rescale=guidance_rescale)
    z0 = samplers.sample(sampler, fn, self.schedule, noise, num_steps=num_steps, key=key, prediction=self.prediction,
                         **{**self._defaults(sampler), **options})
    return self.decode(vae_params, z0)

  def _defaults(self, sampler: str) -> dict[str, Any]:
    samplers.get(sampler)  # a clear error for an unknown name
    return accepted_options(sampler, self.sampler_options) if sampler == self.sampler else {}

  # ---- generation ----

  def generate(self, class_labels: Sequence[int] | jax.Array, *, key: jax.Array, num_steps: int = 50,
               guidance_scale: float = 4.0, guidance_rescale: float = 0.0, latents: jax.Array | None = None,
               sampler: str | None = None, **sampler_options: Any) -> jax.Array:
    """Generates one image per class label, as diffusers' ``DiTPipeline.__call__``.

    Args:
      class_labels: label ids [B] (see :meth:`label_ids`).
      key: PRNG key for the initial latents (when ``latents`` is None) and stochastic samplers.
      num_steps: sampler steps.
      guidance_scale: classifier-free guidance weight; guidance runs only when it is > 1 (diffusers).
      guidance_rescale: guidance-rescale weight in [0, 1] (0: off) when guiding.
      latents: initial noise [B, h, w, C] (NHWC, unit variance) instead of drawing it from ``key``.
      sampler: a registered sampler name; default the scheduler config's (:attr:`sampler`).
      **sampler_options: override the scheduler-config options (``eta``, ``order``, ...).

    Returns:
      float32 images [B, H, W, 3] in [0, 1].

    Raises:
      ValueError: labels outside [0, num_embeds_ada_norm] or latents of the wrong shape.

    Example:
      >>> imgs = pipe.generate([207, 360], key=jax.random.key(0), num_steps=25)  # doctest: +SKIP
    """
    labels = np.asarray(class_labels).reshape(-1)
    if labels.size == 0:
      raise ValueError("class_labels is empty")
    if not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"class_labels must be integer label ids, got dtype {labels.dtype}")
    n = self.transformer.config.num_embeds_ada_norm
    if labels.min() < 0 or labels.max() > n:
      raise ValueError(f"class_labels must lie in [0, {n}] ({n} is the null class), got {labels.tolist()}")
    b = labels.shape[0]
    h, w, c = self.latent_shape
    noise_key, sample_key = jax.random.split(key)
    if latents is None:
      latents = jax.random.normal(noise_key, (b, h, w, c), jnp.float32)
    latents = jnp.asarray(latents, jnp.float32)
    if latents.ndim != 4 or latents.shape[0] != b or latents.shape[-1] != c:
      raise ValueError(f"latents must be [B={b}, h, w, {c}], got {latents.shape}")
    sampler = sampler or self.sampler
    options = {**self._defaults(sampler), **sampler_options}
    guided = float(guidance_scale) > 1.0
    program = self._program(sampler, int(num_steps), guided, options)
    return program(self.transformer_params, self.vae_params, self.schedule, jnp.asarray(labels, jnp.int32), latents,
                   jnp.float32(guidance_scale), jnp.float32(guidance_rescale), sample_key)

  def _program(self, method: str, num_steps: int, guided: bool, options: dict[str, Any]) -> Callable[..., jax.Array]:
    cache_key = (method, num_steps, guided, static_key(options))
    if cache_key not in self._programs:
      def run(transformer_params, vae_params, schedule, labels, latents, scale, rescale, key):
        fn = self.model_fn(transformer_params, labels, guidance_scale=scale if guided else None,
                           guidance_rescale=rescale)
        z0 = samplers.sample(method, fn, schedule, latents, num_steps=num_steps, key=key, prediction=self.prediction,
                             **options)
        return self.decode(vae_params, z0)

      self._programs[cache_key] = jax.jit(run)
    return self._programs[cache_key]
