"""Text-to-image generation with Stable Diffusion 3's MMDiT, as diffusers' ``StableDiffusion3Pipeline``
runs it without its T5 encoder.

:class:`SD3Pipeline` bundles the :class:`~jdiff.models.MMDiT` (``transformer/``), the two CLIP text
encoders with projection heads and their tokenizers (``text_encoder/``, ``text_encoder_2/``,
``tokenizer/``, ``tokenizer_2/``), the 16-channel KL autoencoder (``vae/``) and the flow sampler of the
folder's ``scheduler/`` config. ``generate`` is one XLA program per static configuration (sampler,
steps, guided or not, options, shapes): text encoding, the sampler loop (:func:`jdiff.samplers.sample`)
over the model function, then the VAE decode.

Numerics follow ``StableDiffusion3Pipeline`` with ``text_encoder_3=None``:

* each CLIP encoder reads its tokenizer's ids (both padded to the first tokenizer's length L); the
  penultimate hidden states [B, L, D_1] and [B, L, D_2] are concatenated on features and zero-padded to
  ``joint_attention_dim``; the T5 part, absent here, is ``max_sequence_length`` (256) rows of zeros of
  that width, appended along the sequence axis: ``prompt_embeds`` [B, L + 256, joint_attention_dim].
  The pooled vector is the concatenation of both projected pooled outputs [B, P_1 + P_2].
* classifier-free guidance only when ``guidance_scale > 1``, on one doubled batch, against the encoded
  negative prompt (the empty prompt "" by default, encoded like any other prompt):
  ``uncond + guidance_scale * (cond - uncond)`` on the velocity.
* the model is told ``1000 * sigma`` and predicts the flow velocity; the default sampler is the
  scheduler's (``FlowMatchEulerDiscreteScheduler`` -> ``"flow_euler"`` with its ``shift``, dynamic
  shifting with mu from the latent sequence length, ...).
* latents are mapped ``z / scaling_factor + shift_factor`` before decoding; images from [-1, 1] to [0, 1].

Not supported: a T5 ``text_encoder_3`` (jdiff has no T5 encoder; such folders are refused rather than
run without it), skip-layer guidance, IP-adapters (``image_encoder``), ``clip_skip`` and separate
``prompt_2`` texts.

Example:
  >>> pipe = SD3Pipeline.from_diffusers("sd3-medium-no-t5")  # doctest: +SKIP
  >>> images = pipe.generate(["a red fox in snow"], key=jax.random.key(0), height=1024, width=1024)
  ... # doctest: +SKIP
  >>> images.shape  # doctest: +SKIP
  (1, 1024, 1024, 3)
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

from jdiff import guidance, samplers
from jdiff.convert import _io
from jdiff.models.mmdit import MMDiT
from jdiff.models.text import CLIPTextModel
from jdiff.models.vae import AutoencoderKL
from jdiff.pipelines import accepted_options, prompt_lists, sampler_from_scheduler_config, static_key
from jdiff.tokenizers import CLIPTokenizer

__all__ = ["SD3Pipeline", "FLOW_SCHEDULERS"]

# diffusers scheduler classes an SD3 folder may name (the flow-matching ones jdiff runs)
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
# the dynamic shift's defaults in diffusers' SD3 pipeline (used when the scheduler config omits them)
_DYNAMIC_DEFAULTS = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.16}


def _listed(entry: Any) -> bool:
  """Whether a ``model_index.json`` entry names a component (diffusers writes ``[null, null]`` for None)."""
  if entry is None:
    return False
  if isinstance(entry, (list, tuple)):
    return any(e is not None for e in entry)
  return True


@dataclasses.dataclass(eq=False)
class SD3Pipeline:
  """An SD3 transformer, its two CLIP text encoders and tokenizers, autoencoder and flow sampler.

  Attributes:
    transformer, transformer_params: the :class:`~jdiff.models.MMDiT` and its parameters.
    vae, vae_params: the :class:`~jdiff.models.AutoencoderKL` (16 latent channels) and its parameters.
    text_encoders, text_params: the two CLIP text encoders with projection (``text_encoder``,
      ``text_encoder_2``) and their parameters.
    tokenizers: their tokenizers; both pad to the first one's ``max_length``.
    sampler: default sampler name (from the scheduler class).
    sampler_options: default sampler options (from the scheduler config, diffusers' names).
    max_sequence_length: rows of the (zero) T5 part of the text tokens (diffusers' default 256).
    scaling_factor, shift_factor: latents are mapped ``z / scaling_factor + shift_factor`` before decoding.
    scheduler_config: the scheduler config it was built from.
  """

  transformer: MMDiT
  transformer_params: Any
  vae: AutoencoderKL
  vae_params: Any
  text_encoders: tuple[CLIPTextModel, CLIPTextModel]
  text_params: tuple[Any, Any]
  tokenizers: tuple[CLIPTokenizer, CLIPTokenizer]
  sampler: str = "flow_euler"
  sampler_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  max_sequence_length: int = 256
  scaling_factor: float = 1.5305
  shift_factor: float = 0.0609
  scheduler_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  _programs: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

  def __post_init__(self):
    cfg = self.transformer.config
    self.text_encoders, self.text_params = tuple(self.text_encoders), tuple(self.text_params)
    self.tokenizers = tuple(self.tokenizers)
    if not len(self.text_encoders) == len(self.text_params) == len(self.tokenizers) == 2:
      raise ValueError("an SD3 pipeline takes two CLIP text encoders, their parameters and two tokenizers")
    for i, enc in enumerate(self.text_encoders):
      if enc.config.projection_dim is None:
        raise ValueError(f"SD3 text encoder {i + 1} has no text_projection; SD3 needs CLIPTextModelWithProjection")
    width = sum(enc.config.hidden_size for enc in self.text_encoders)
    if width > cfg.joint_attention_dim:
      raise ValueError(f"the CLIP encoders' widths add up to {width}, more than the transformer's "
                       f"joint_attention_dim {cfg.joint_attention_dim}")
    pooled = sum(enc.config.projection_dim for enc in self.text_encoders)
    if pooled != cfg.pooled_projection_dim:
      raise ValueError(f"the CLIP projections add up to {pooled}, the transformer's pooled_projection_dim is "
                       f"{cfg.pooled_projection_dim}")
    if self.vae.config.latent_channels != cfg.in_channels:
      raise ValueError(f"the VAE has {self.vae.config.latent_channels} latent channels, the transformer takes "
                       f"{cfg.in_channels}")
    if int(self.max_sequence_length) < 0:
      raise ValueError(f"max_sequence_length must be >= 0, got {self.max_sequence_length}")
    self.transformer_params = jax.tree.map(jnp.asarray, self.transformer_params)
    self.vae_params = jax.tree.map(jnp.asarray, self.vae_params)
    self.text_params = tuple(jax.tree.map(jnp.asarray, p) for p in self.text_params)

  @classmethod
  def from_diffusers(cls, path: str | os.PathLike, *, dtype: str | None = None) -> SD3Pipeline:
    """Loads a diffusers ``StableDiffusion3Pipeline`` folder saved without T5 (``text_encoder_3`` and
    ``tokenizer_3`` absent or null in ``model_index.json``); safetensors only, no torch.

    Args:
      path: the pipeline folder.
      dtype: compute dtype of the networks ("bfloat16"); parameters stay float32.

    Raises:
      FileNotFoundError: the folder or one of its parts is missing.
      ValueError: a folder with a T5 ``text_encoder_3`` (not supported), a scheduler that is not a
        flow-matching one, an unsupported config or a missing / mis-shaped tensor (named).

    Example:
      >>> pipe = SD3Pipeline.from_diffusers("sd3-medium-no-t5", dtype="bfloat16")  # doctest: +SKIP
    """
    from jdiff.convert.dit import load_sd3_transformer
    from jdiff.convert.text import load_text_encoder
    from jdiff.convert.vae import load_vae

    root = Path(path)
    _io.refuse_pickle(root, what="pipeline")
    if not root.is_dir():
      raise FileNotFoundError(f"diffusers pipeline folder {str(root)!r} does not exist")
    index = _io.read_config(root, name="model_index.json")
    for part in ("text_encoder_3", "tokenizer_3"):
      if _listed(index.get(part)):
        raise ValueError(f"{str(root)!r} has a T5 {part} ({index[part]!r}); T5 is not supported by jdiff: "
                         "load an SD3 folder saved with text_encoder_3=None and tokenizer_3=None")
    for part in _PARTS:
      if not _listed(index.get(part)):
        raise ValueError(f"{str(root / 'model_index.json')!r} lists no {part!r}; is this an SD3 pipeline?")
      if not (root / part).is_dir():
        raise FileNotFoundError(f"pipeline part {str(root / part)!r} does not exist")
    sched_config = _io.read_config(root / "scheduler", name="scheduler_config.json")
    sampler, options = cls._flow_sampler(sched_config)
    transformer, transformer_params = load_sd3_transformer(root / "transformer", dtype=dtype)
    vae, vae_params = load_vae(root / "vae", dtype=dtype)
    encoders, params = zip(*(load_text_encoder(root / part, dtype=dtype) for part in ("text_encoder",
                                                                                   "text_encoder_2")))
    tokenizers = tuple(CLIPTokenizer.from_pretrained(root / part) for part in ("tokenizer", "tokenizer_2"))
    return cls(transformer=transformer, transformer_params=transformer_params, vae=vae, vae_params=vae_params,
               text_encoders=tuple(encoders), text_params=tuple(params), tokenizers=tokenizers, sampler=sampler,
               sampler_options=options, scaling_factor=float(vae.config.scaling_factor),
               shift_factor=float(vae.config.shift_factor or 0.0), scheduler_config=sched_config)

  @staticmethod
  def _flow_sampler(config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(sampler, options) of a flow-matching scheduler config; other schedulers are refused."""
    name = config.get("_class_name")
    if name not in FLOW_SCHEDULERS:
      raise ValueError(f"SD3 pipeline: scheduler {name!r} is not a flow-matching scheduler jdiff runs "
                       f"(supported: {', '.join(FLOW_SCHEDULERS)})")
    if config.get("invert_sigmas"):
      raise ValueError("SD3 pipeline: the scheduler's invert_sigmas=True is not supported")
    sampler, options = sampler_from_scheduler_config(config)
    if "num_train_timesteps" in config:
      options.update(accepted_options(sampler, {"num_train_timesteps": int(config["num_train_timesteps"])}))
    if options.get("use_dynamic_shifting"):
      options.update({k: config.get(k, v) for k, v in _DYNAMIC_DEFAULTS.items()})
    return sampler, options

  # ---- pieces ----

  @property
  def vae_scale_factor(self) -> int:
    """Pixels per latent cell (2 ** (number of VAE blocks - 1))."""
    return 2 ** (len(self.vae.config.block_out_channels) - 1)

  @property
  def default_size(self) -> int:
    """Default image height and width in pixels (the transformer's ``sample_size`` in latent cells)."""
    return self.transformer.config.sample_size * self.vae_scale_factor

  def tokenize(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``[B, L]`` of each tokenizer, both padded to the first tokenizer's length L.

    Example:
      >>> ids_1, ids_2 = pipe.tokenize(["a red fox"])  # doctest: +SKIP
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    length = self.tokenizers[0].max_length
    return self.tokenizers[0](prompts, max_length=length), self.tokenizers[1](prompts, max_length=length)

  def encode(self, text_params: Sequence[Any], input_ids: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Pure text conditioning (jit it): ids of both tokenizers -> ``(prompt_embeds, pooled)``.

    Args:
      text_params: parameters of the two encoders.
      input_ids: ``[B, L]`` ids per encoder (:meth:`tokenize`).

    Returns:
      float32 ``prompt_embeds`` [B, L + max_sequence_length, joint_attention_dim] (the CLIP penultimate
      states side by side, zero-padded on features, then the zero T5 rows) and ``pooled``
      [B, pooled_projection_dim].

    Example:
      >>> embeds, pooled = pipe.encode(pipe.text_params, pipe.tokenize(["a red fox"]))  # doctest: +SKIP
    """
    hidden, pooled = [], []
    for module, params, ids in zip(self.text_encoders, text_params, input_ids):
      out = module.apply({"params": params}, jnp.asarray(ids), output_hidden_states=True)
      hidden.append(out.hidden_states[-2].astype(jnp.float32))  # [B, L, D_i]
      pooled.append(out.text_embeds.astype(jnp.float32))  # [B, P_i]
    clip = jnp.concatenate(hidden, axis=-1)  # [B, L, D_1 + D_2]
    b, length, width = clip.shape
    dim = self.transformer.config.joint_attention_dim
    clip = jnp.pad(clip, ((0, 0), (0, 0), (0, dim - width)))  # [B, L, joint_attention_dim]
    t5 = jnp.zeros((b, int(self.max_sequence_length), dim), jnp.float32)  # no T5 encoder: zeros
    return jnp.concatenate([clip, t5], axis=1), jnp.concatenate(pooled, axis=-1)

  def model_fn(self, transformer_params: Any, prompt_embeds: jax.Array, pooled: jax.Array, *,
               null_embeds: jax.Array | None = None, null_pooled: jax.Array | None = None,
               guidance_scale: float | jax.Array | None = None) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The velocity model ``model_fn(x_t [B, h, w, C], t [B]) -> v [B, h, w, C]`` for text ``prompt_embeds``
    [B, L', joint_attention_dim] and ``pooled`` [B, P].

    With ``guidance_scale`` it is classifier-free guided against ``(null_embeds, null_pooled)``
    (:func:`jdiff.guidance.cfg`, one doubled batch).

    Example:
      >>> fn = pipe.model_fn(pipe.transformer_params, embeds, pooled, null_embeds=ne, null_pooled=npool,
      ...                    guidance_scale=7.0)  # doctest: +SKIP
      >>> z0 = samplers.sample("flow_euler", fn, None, z, num_steps=28, shift=3.0)  # doctest: +SKIP
    """

    def apply(x, t, c):
      t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
      return self.transformer.apply({"params": transformer_params}, x, t, c["text"], c["pooled"])

    cond = {"text": prompt_embeds, "pooled": pooled}
    if guidance_scale is None:
      return lambda x, t: apply(x, t, cond)
    if null_embeds is None or null_pooled is None:
      raise ValueError("guidance needs null_embeds and null_pooled (the encoded negative prompt)")
    return guidance.cfg(apply, cond, {"text": null_embeds, "pooled": null_pooled}, guidance_scale)

  def decode(self, vae_params: Any, latents: jax.Array) -> jax.Array:
    """Latents [B, h, w, 16] (as the transformer sees them) -> float32 images [B, H, W, 3] in [0, 1]."""
    z = latents / self.scaling_factor + self.shift_factor
    images = self.vae.apply({"params": vae_params}, z, method=self.vae.decode)
    return jnp.clip(images.astype(jnp.float32) * 0.5 + 0.5, 0.0, 1.0)

  # ---- generation ----

  def generate(self, prompts: str | Sequence[str], *, key: jax.Array, num_steps: int = 28,
               guidance_scale: float = 7.0, negative_prompts: str | Sequence[str] | None = None,
               latents: jax.Array | None = None, height: int | None = None, width: int | None = None,
               sampler: str | None = None, **sampler_options: Any) -> jax.Array:
    """Generates one image per prompt, as diffusers' ``StableDiffusion3Pipeline.__call__`` without T5.

    Args:
      prompts: one prompt or a list [B].
      key: PRNG key for the initial latents (when ``latents`` is None) and stochastic samplers.
      num_steps: sampler steps.
      guidance_scale: classifier-free guidance weight; guidance runs only when it is > 1 (diffusers).
      negative_prompts: the unconditional prompts (default: the empty prompt, encoded).
      latents: initial noise [B, h, w, 16] (NHWC, unit variance) instead of drawing it from ``key``.
      height, width: image size in pixels (default: from ``latents``, else :attr:`default_size`); a
        multiple of ``vae_scale_factor * patch_size``.
      sampler: a registered sampler name; default the scheduler config's (:attr:`sampler`). Other
        samplers must run on flow levels (e.g. ``"dpm_solver"`` with ``use_flow_sigmas=True``); they get
        none of the scheduler config's options.
      **sampler_options: override the scheduler-config options (``shift``, ``stochastic_sampling``, ...).

    Returns:
      float32 images [B, H, W, 3] in [0, 1].

    Raises:
      ValueError: empty prompts, a negative-prompt count that differs, a size that is not a multiple
        of ``vae_scale_factor * patch_size``, or latents of the wrong shape.

    Example:
      >>> imgs = pipe.generate(["a red fox"], key=jax.random.key(0), num_steps=28, guidance_scale=7.0)
      ... # doctest: +SKIP
    """
    prompts, negative = prompt_lists(prompts, negative_prompts)
    cfg = self.transformer.config
    b, c, f = len(prompts), cfg.in_channels, self.vae_scale_factor
    if latents is not None:
      latents = jnp.asarray(latents, jnp.float32)
      if latents.ndim != 4 or latents.shape[0] != b or latents.shape[-1] != c:
        raise ValueError(f"latents must be [B={b}, h, w, {c}], got {latents.shape}")
      height = latents.shape[1] * f if height is None else height
      width = latents.shape[2] * f if width is None else width
    height = self.default_size if height is None else int(height)
    width = self.default_size if width is None else int(width)
    step = f * cfg.patch_size
    if height % step or width % step or height <= 0 or width <= 0:
      raise ValueError(f"height and width must be positive multiples of {step}, got {height} and {width}")
    shape = (b, height // f, width // f, c)
    noise_key, sample_key = jax.random.split(key)
    if latents is None:
      latents = jax.random.normal(noise_key, shape, jnp.float32)
    elif latents.shape != shape:
      raise ValueError(f"latents of shape {latents.shape} do not match height={height}, width={width} "
                       f"(expected {shape})")
    sampler = sampler or self.sampler
    samplers.get(sampler)  # a clear error for an unknown name
    options = {"prediction": "flow", **(dict(self.sampler_options) if sampler == self.sampler else {}),
               **sampler_options}
    if options.get("use_dynamic_shifting") and "mu" not in options and "image_seq_len" not in options:
      options["image_seq_len"] = (shape[1] // cfg.patch_size) * (shape[2] // cfg.patch_size)
    guided = float(guidance_scale) > 1.0
    ids = [jnp.asarray(i) for i in self.tokenize(prompts)]
    neg_ids = [jnp.asarray(i) for i in self.tokenize(negative)] if guided else None
    program = self._program(sampler, int(num_steps), guided, options)
    return program(self.transformer_params, self.vae_params, self.text_params, ids, neg_ids, latents,
                   jnp.float32(guidance_scale), sample_key)

  def _program(self, method: str, num_steps: int, guided: bool, options: dict[str, Any]) -> Callable[..., jax.Array]:
    cache_key = (method, num_steps, guided, static_key(options))
    if cache_key not in self._programs:
      def run(transformer_params, vae_params, text_params, ids, neg_ids, latents, scale, key):
        embeds, pooled = self.encode(text_params, ids)
        if guided:
          null_embeds, null_pooled = self.encode(text_params, neg_ids)
          fn = self.model_fn(transformer_params, embeds, pooled, null_embeds=null_embeds, null_pooled=null_pooled,
                             guidance_scale=scale)
        else:
          fn = self.model_fn(transformer_params, embeds, pooled)
        z0 = samplers.sample(method, fn, None, latents, num_steps=num_steps, key=key, **options)
        return self.decode(vae_params, z0)

      self._programs[cache_key] = jax.jit(run)
    return self._programs[cache_key]
