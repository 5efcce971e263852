"""Stable Diffusion XL: its conditioning as pure functions (the text conditioning of both encoders, the
micro-conditioning time ids that the "text_time" UNet embeds) and the :class:`StableDiffusionXL` pipeline.

The UNet (``UNetConfig.sdxl_base()`` / ``sdxl_refiner()``) is called as
``unet.apply(params, x, t, prompt_embeds, text_embeds=pooled, time_ids=ids)``; the parts of a diffusers
folder load with :func:`jdiff.convert.sdxl.load_sdxl_parts`. :class:`StableDiffusionXL` is the
:class:`~jdiff.pipelines.StableDiffusion` bundle with SDXL's text conditioning: text-to-image,
image-to-image and the base-to-refiner handoff with every registered sampler.

Example:
  >>> embeds, pooled = sdxl_text_conditioning(parts.encoders, [tok(prompts) for tok in parts.tokenizers])
  ... # doctest: +SKIP
  >>> ids = time_ids((1024, 1024), (0, 0), (1024, 1024), batch_size=len(prompts))  # doctest: +SKIP
  >>> images = StableDiffusionXL.from_diffusers("sdxl-base").generate("a fox", key=jax.random.key(0))
  ... # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import samplers
from jdiff.models.text import sdxl_text_conditioning
from jdiff.pipelines import (SCHEDULER_SAMPLERS, StableDiffusion, prompt_lists, sampler_options_from_config,
                             schedule_from_config, static_key, strength_start)
from jdiff.tokenizers import CLIPTokenizer

__all__ = ["StableDiffusionXL", "sdxl_text_conditioning", "time_ids", "batch_time_ids"]


def time_ids(original_size: Sequence[float], crops_coords_top_left: Sequence[float] = (0, 0),
             target_size: Sequence[float] | None = None, *, aesthetic_score: float | None = None,
             batch_size: int = 1) -> jax.Array:
  """SDXL's micro-conditioning as diffusers' pipelines build it, one row per batch element.

  The base model's six ids are ``original_size + crops_coords_top_left + target_size`` (each (height,
  width) / (top, left) in pixels); the refiner (``requires_aesthetics_score``) takes five:
  ``original_size + crops_coords_top_left + (aesthetic_score,)``.

  Args:
    original_size: (height, width) of the training image the output should look like.
    crops_coords_top_left: (top, left) of the crop.
    target_size: (height, width) of the output (base model); defaults to ``original_size``.
    aesthetic_score: the refiner's score (diffusers' defaults: 6.0, and 2.5 for the negative side); when
      given, it replaces ``target_size``.
    batch_size: rows of the result.

  Returns:
    float32 ``[batch_size, 6]`` (or ``[batch_size, 5]`` with ``aesthetic_score``).

  Raises:
    ValueError: a size or corner that is not a pair, or ``batch_size`` < 1.

  Example:
    >>> time_ids((1024, 1024), (0, 0), (1024, 1024)).tolist()
    [[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]
    >>> time_ids((1024, 768), aesthetic_score=6.0, batch_size=2).shape
    (2, 5)
  """
  target = original_size if target_size is None else target_size
  for name, value in (("original_size", original_size), ("crops_coords_top_left", crops_coords_top_left),
                      ("target_size", target)):
    if len(tuple(value)) != 2:
      raise ValueError(f"{name} must be a pair, got {value!r}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  tail = (aesthetic_score,) if aesthetic_score is not None else tuple(target)
  row = jnp.asarray(tuple(original_size) + tuple(crops_coords_top_left) + tail, jnp.float32)  # [N]
  return jnp.broadcast_to(row.reshape(1, -1), (batch_size, row.shape[0]))


def batch_time_ids(original_size: Any, crops_coords_top_left: Any, target_size: Sequence[int]) -> jax.Array:
  """The base model's time ids of a training batch, one row per example, as diffusers'
  ``train_text_to_image_sdxl.py`` builds them: ``original_size + crops_coords_top_left + target_size``.

  Args:
    original_size: int ``[B, 2]``, each image's (height, width) before resizing (the data loader's
      ``original_size``, :func:`jdiff.data.transforms.crop_and_flip`).
    crops_coords_top_left: int ``[B, 2]``, the (top, left) of each crop in the resized image.
    target_size: the (height, width) trained at, the same for every example.

  Returns:
    float32 ``[B, 6]``.

  Example:
    >>> batch_time_ids(np.array([[768, 1024]]), np.array([[0, 128]]), (1024, 1024)).tolist()
    [[768.0, 1024.0, 0.0, 128.0, 1024.0, 1024.0]]
  """
  original = jnp.asarray(original_size, jnp.float32)  # [B, 2]
  crops = jnp.asarray(crops_coords_top_left, jnp.float32)  # [B, 2]
  if original.ndim != 2 or original.shape[1] != 2 or crops.shape != original.shape or len(tuple(target_size)) != 2:
    raise ValueError(f"original_size and crops_coords_top_left must be [B, 2] and target_size a pair, got "
                     f"{original.shape}, {crops.shape} and {target_size!r}")
  target = jnp.broadcast_to(jnp.asarray(tuple(target_size), jnp.float32), original.shape)  # [B, 2]
  return jnp.concatenate([original, crops, target], axis=1)  # [B, 6]


def _pair(value: Sequence[float] | None, default: tuple[int, int]) -> tuple:
  return tuple(default) if value is None else tuple(value)


def _cut_index(timesteps: np.ndarray, fraction: float, num_train_timesteps: int, name: str) -> int:
  """How many of ``timesteps`` lie at or above diffusers' cutoff ``round(T - fraction T)``."""
  if not 0.0 < float(fraction) < 1.0:
    raise ValueError(f"{name} must be in (0, 1), got {fraction}")
  cutoff = int(round(num_train_timesteps - float(fraction) * num_train_timesteps))
  return int(np.sum(np.asarray(timesteps) >= cutoff))


@dataclasses.dataclass(eq=False)
class StableDiffusionXL(StableDiffusion):
  """Stable Diffusion XL (base or refiner) as a :class:`~jdiff.pipelines.StableDiffusion` whose text
  conditioning is SDXL's: two text encoders (the refiner: only the second), their penultimate hidden
  states concatenated (:func:`sdxl_text_conditioning`), the second encoder's projected pooled output as
  the UNet's ``text_embeds`` and the micro-conditioning :func:`time_ids` as its ``time_ids``. The UNet
  receives them through :meth:`~jdiff.pipelines.StableDiffusion.model_fn`'s dict context.

  Numerics follow diffusers' ``StableDiffusionXLPipeline`` and ``StableDiffusionXLImg2ImgPipeline``:
  without ``negative_prompts`` the unconditional embeddings are zeros when
  ``force_zeros_for_empty_prompt`` (else the encoded empty prompt; negative embeddings always take the
  penultimate hidden states, whatever ``clip_skip``); a refiner (``requires_aesthetics_score``) ends its
  time ids with an aesthetic score. ``generate(..., denoising_end=f, output="latents")`` stops the
  sampler's grid at the first step whose timestep is below ``round(T (1 - f))`` and returns the latents
  there; ``img2img(latents, ..., denoising_start=f)`` runs the rest of the same grid (the
  base-to-refiner handoff: :func:`jdiff.samplers.cut`).

  ``inpaint``, ``invert`` and ``sample`` are the base class's: SDXL's hooks (:meth:`encode_text` of
  conditioning dicts, :meth:`guidance_kwargs`' null conditioning, :meth:`model_fn`'s default time ids of
  the latents' size) give them SDXL's conditioning with the default micro-conditioning
  (``StableDiffusionXLInpaintPipeline`` at its default sizes). LoRA adapters (``lora=``,
  :meth:`load_lora`) adapt the UNet and both text encoders ("text_encoder_2" too); :meth:`save_pretrained`
  writes a diffusers SDXL folder.

  Attributes (beyond :class:`~jdiff.pipelines.StableDiffusion`'s; ``text_encoder``, ``text_params`` and
  ``tokenizer`` are the first encoder's, None for a refiner):
    text_encoder_2, text_params_2, tokenizer_2: the second encoder (with ``text_projection``), its
      parameters and tokenizer.
    force_zeros_for_empty_prompt: zeros as the negative conditioning when no negative prompt is given.
    requires_aesthetics_score: the time ids are ``original_size + crops + (aesthetic_score,)``.

  Example:
    >>> base = StableDiffusionXL.from_diffusers("sdxl-base")  # doctest: +SKIP
    >>> refiner = StableDiffusionXL.from_diffusers("sdxl-refiner")  # doctest: +SKIP
    >>> z = base.generate("a lion", key=key, num_steps=40, denoising_end=0.8, output="latents")  # doctest: +SKIP
    >>> images = refiner.img2img(z, "a lion", key=key, num_steps=40, denoising_start=0.8)  # doctest: +SKIP
  """
  text_encoder_2: Any = None
  text_params_2: Any = None
  tokenizer_2: CLIPTokenizer | None = None
  force_zeros_for_empty_prompt: bool = True
  requires_aesthetics_score: bool = False

  def __post_init__(self):
    super().__post_init__()
    if self.text_encoder_2 is None or self.tokenizer_2 is None:
      raise ValueError("StableDiffusionXL needs text_encoder_2 and tokenizer_2")
    if (self.text_encoder is None) != (self.tokenizer is None):
      raise ValueError("text_encoder and tokenizer come together (both None for a refiner)")
    self.text_params_2 = jax.tree.map(jnp.asarray, self.text_params_2)

  @classmethod
  def from_diffusers(cls, path: str | os.PathLike, *, dtype: str | None = None, clip_skip: int = 0,
                     controlnet: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> StableDiffusionXL:
    """Loads a diffusers SDXL folder (``StableDiffusionXLPipeline``, or a refiner's
    ``StableDiffusionXLImg2ImgPipeline``) with :func:`jdiff.convert.sdxl.load_sdxl_parts`.

    Args:
      path: the pipeline folder.
      dtype: compute dtype of the networks ("bfloat16"); parameters stay float32, and under "float16" a
        VAE with ``force_upcast`` computes in float32.
      clip_skip: diffusers' ``clip_skip`` for the prompt embeddings.
      controlnet: an SDXL ``ControlNetModel`` folder (``addition_embed_type="text_time"``), or a list of
        them (diffusers' ``StableDiffusionXLControlNetPipeline``; see :meth:`generate`'s ``control_images``).

    Raises:
      FileNotFoundError: the folder or a part (``text_encoder_2``, ``scheduler``, ...) is missing.
      ValueError: an unsupported config or a missing / mis-shaped tensor (named).

    Example:
      >>> pipe = StableDiffusionXL.from_diffusers("checkpoints/sdxl-base", dtype="bfloat16")  # doctest: +SKIP
    """
    from jdiff.convert.sdxl import load_sdxl_parts

    parts = load_sdxl_parts(path, dtype=dtype)
    nets, net_params = (), ()
    if controlnet is not None:
      from jdiff.convert.controlnet import load_controlnets
      nets, net_params = load_controlnets(controlnet, parts.unet.config, dtype=dtype)
    if parts.scheduler_config is None:
      raise FileNotFoundError(f"SDXL pipeline folder {os.fspath(path)!r} has no scheduler/scheduler_config.json")
    sched = parts.scheduler_config
    method, implied = SCHEDULER_SAMPLERS.get(sched.get("_class_name"), ("ddim", {}))
    return cls(unet=parts.unet, unet_params=parts.unet_params, vae=parts.vae, vae_params=parts.vae_params,
               text_encoder=parts.text_encoder, text_params=parts.text_encoder_params, tokenizer=parts.tokenizer,
               schedule=schedule_from_config(sched), prediction=sched.get("prediction_type", "epsilon"),
               scaling_factor=float(parts.vae.config.scaling_factor),
               shift_factor=float(parts.vae.config.shift_factor or 0.0),
               sampler_options={**sampler_options_from_config(sched), **implied}, clip_skip=clip_skip,
               controlnets=nets, controlnet_params=net_params, scheduler_config=sched, defaults={"sampler": method, "guidance_scale": 5.0},
               source=os.fspath(path), text_encoder_2=parts.text_encoder_2,
               text_params_2=parts.text_encoder_2_params, tokenizer_2=parts.tokenizer_2,
               force_zeros_for_empty_prompt=parts.force_zeros_for_empty_prompt,
               requires_aesthetics_score=parts.requires_aesthetics_score)

  @classmethod
  def from_single_file(cls, path: str | os.PathLike, *, family: str | None = None,
                       config: str | os.PathLike | None = None, tokenizer: Any = None, tokenizer_2: Any = None,
                       dtype: str | None = None) -> StableDiffusionXL:
    """Loads an original-layout (SGM) SDXL single ``.safetensors`` checkpoint (``conditioner.embedders.*``
    text encoders), given its model ``family`` ("sdxl", "sdxl-refiner"; then the tokenizers) or a local
    diffusers SDXL folder ``config`` (:func:`jdiff.convert.single_file.load_sdxl_single_file_bundle`).
    Pickled ``.ckpt`` files are refused; :meth:`save_single_file` writes the layout.

    Example:
      >>> pipe = StableDiffusionXL.from_single_file("sd_xl_base_1.0.safetensors", config="sdxl-base")  # doctest: +SKIP
    """
    from jdiff.convert.single_file import load_sdxl_single_file_bundle

    return load_sdxl_single_file_bundle(path, family=family, config=config, tokenizer=tokenizer,
                                        tokenizer_2=tokenizer_2, dtype=dtype)

  # ---- text ----

  @property
  def tokenizers(self) -> list[CLIPTokenizer]:
    """The tokenizers in pipeline order (the refiner's: only ``tokenizer_2``)."""
    return ([self.tokenizer] if self.tokenizer is not None else []) + [self.tokenizer_2]

  @property
  def encoders(self) -> list[Any]:
    """The text encoder modules in pipeline order."""
    return ([self.text_encoder] if self.text_encoder is not None else []) + [self.text_encoder_2]

  def all_text_params(self, text_params: Any = None) -> tuple:
    """The encoders' parameter trees in pipeline order (``text_params`` replaces the first encoder's)."""
    first = self.text_params if text_params is None else text_params
    return ((first,) if self.text_encoder is not None else ()) + (self.text_params_2,)

  def tokenize(self, text: str | Sequence[str]) -> tuple[np.ndarray, ...]:
    """Token ids per tokenizer (pipeline order): ``[L]`` each for one string, ``[B, L]`` for a list."""
    if isinstance(text, str):
      return tuple(np.asarray(tok([text]))[0] for tok in self.tokenizers)
    return tuple(np.asarray(tok(list(text))) for tok in self.tokenizers)

  def encode_text(self, text_params: Any, ids: Sequence[jax.Array] | Mapping[str, Any], *,
                  clip_skip: int | None = None) -> dict[str, jax.Array]:
    """Token ids per encoder -> the UNet's context ``{"text": [B, L, D], "text_embeds": [B, P], ...}``.

    Args:
      text_params: the encoders' parameters in pipeline order (a tuple: :meth:`all_text_params`), or the
        first encoder's tree alone (the second's are the bundle's; None for a refiner).
      ids: token ids ``[B, L]`` from each encoder's tokenizer (:meth:`tokenize`), or a conditioning dict
        ``{"ids": those, "time_ids": [B, N]}`` whose other entries are passed on into the context.
      clip_skip: default the bundle's ``clip_skip``.
    """
    if not isinstance(text_params, (tuple, list)):
      text_params = self.all_text_params(text_params)
    extra = {}
    if isinstance(ids, Mapping):
      extra = {k: v for k, v in ids.items() if k != "ids"}
      ids = ids["ids"]
    encoders = list(zip(self.encoders, text_params))
    embeds, pooled = sdxl_text_conditioning(encoders, list(ids),
                                            clip_skip=self.clip_skip if clip_skip is None else clip_skip)
    return {"text": embeds, "text_embeds": pooled, **extra}

  def encode_prompts(self, prompts: Sequence[str]) -> dict[str, jax.Array]:
    """``{"text": [B, L, D], "text_embeds": [B, P]}`` of prompts."""
    return self.encode_text(self.all_text_params(), [jnp.asarray(i) for i in self.tokenize(list(prompts))])

  def null_ids(self) -> tuple[jax.Array, ...]:
    """Token ids ``[1, L]`` per tokenizer of the empty prompt."""
    return tuple(jnp.asarray(i)[None] for i in self.tokenize(""))

  # ---- the text conditioning of training batches ----

  @property
  def batch_condition_keys(self) -> tuple[str, ...]:
    """``tokens`` and the loader's ``original_size`` / ``crops_coords_top_left`` (a data section with a
    ``crop``), from which :meth:`encode_batch` builds the base model's time ids.

    Raises:
      ValueError: a refiner (its aesthetic-score time ids are not in training batches).
    """
    if self.text_encoder is None or self.requires_aesthetics_score:
      raise ValueError("an SDXL refiner's time ids hold aesthetic scores, which training batches do not carry; "
                       "SDXL training takes a base model")
    return ("tokens", "original_size", "crops_coords_top_left")

  def batch_tokenize(self, text: str | Sequence[str]) -> np.ndarray:
    """Both tokenizers' ids stacked as a training batch holds them: ``[2, L]`` for one string, ``[B, 2, L]``
    for a list (diffusers' ``train_text_to_image_sdxl.py`` tokenizes each caption with both)."""
    return np.stack(self.tokenize(text), axis=-2)

  def batch_null_tokens(self) -> jax.Array:
    """The empty prompt's ids ``[1, 2, L]`` (:meth:`batch_tokenize`'s layout): caption dropout replaces
    both tokenizers' ids together, as diffusers' ``proportion_empty_prompts`` does."""
    return jnp.stack(self.null_ids(), axis=-2)

  def encode_batch(self, text_params: Any, tokens: jax.Array, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    """SDXL's context of a training batch as diffusers' ``train_text_to_image_sdxl.py`` /
    ``train_text_to_image_lora_sdxl.py`` build it: both encoders' penultimate hidden states of ``tokens``
    ``[B, 2, L]`` concatenated, the second's projected pooled output, and per-example time ids
    ``original_size + crops_coords_top_left + (H, W)`` (:func:`batch_time_ids` of the batch's entries, H, W
    of ``batch["image"]``).

    Returns:
      ``{"text": [B, L, D1 + D2], "text_embeds": [B, P], "time_ids": [B, 6]}``.
    """
    ids = tuple(tokens[:, i] for i in range(tokens.shape[1]))
    ids_time = batch_time_ids(batch["original_size"], batch["crops_coords_top_left"], batch["image"].shape[1:3])
    return self.encode_text(text_params, {"ids": ids, "time_ids": ids_time})

  def init_unet(self, key: jax.Array) -> Any:
    """Fresh UNet parameters for this bundle's latents, text width, pooled width and time ids."""
    h, w, _ = self.latent_shape
    cfg = self.unet.config
    ctx = jnp.zeros((1, 1, cfg.per_block("cross_attention_dim")[0]), jnp.float32)
    pooled = jnp.zeros((1, int(self.text_encoder_2.config.projection_dim)), jnp.float32)
    ids = jnp.zeros((1, 5 if self.requires_aesthetics_score else 6), jnp.float32)
    return self.unet.init(key, jnp.zeros((1, h, w, int(cfg.in_channels)), jnp.float32), jnp.zeros((1,), jnp.int32),
                          ctx, text_embeds=pooled, time_ids=ids)["params"]

  def _prompt_ids(self, prompts, negative_prompts):
    """The conditioning dicts ``{"ids": token ids per tokenizer}`` of the prompts and of the negative
    prompts (``{"ids": None}`` when none is given: :meth:`guidance_kwargs` then gives the null
    conditioning)."""
    prompts, negative = prompt_lists(prompts, negative_prompts)
    ids = {"ids": tuple(jnp.asarray(i) for i in self.tokenize(prompts))}
    if negative_prompts is None:
      return ids, {"ids": None}
    return ids, {"ids": tuple(jnp.asarray(i) for i in self.tokenize(negative))}

  def guidance_kwargs(self, text_params: Any, batch: int, guidance_scale: float | jax.Array | None,
                      neg_ids: Any = None) -> dict[str, Any]:
    """:meth:`~jdiff.pipelines.StableDiffusion.guidance_kwargs` with SDXL's null conditioning, as
    diffusers' SDXL pipelines build it: without negative ids (None, or a conditioning dict whose ``"ids"``
    is None) zeros when ``force_zeros_for_empty_prompt``, else the encoded empty prompt; negative prompts
    are encoded at the penultimate layer whatever ``clip_skip``. A ``"time_ids"`` entry of ``neg_ids``
    becomes the null context's (without one, :meth:`model_fn` supplies them)."""
    if guidance_scale is None or self.guidance_embedding_dim or not self.cfg:
      return super().guidance_kwargs(text_params, batch, guidance_scale)
    neg = dict(neg_ids) if isinstance(neg_ids, Mapping) else {"ids": neg_ids}
    if neg["ids"] is None:
      null = self.encode_text(text_params, {**neg, "ids": self.null_ids()}, clip_skip=0)
      if self.force_zeros_for_empty_prompt:  # [1, ...] rows, broadcast over the batch by guidance.cfg
        null = {**null, "text": jnp.zeros_like(null["text"]), "text_embeds": jnp.zeros_like(null["text_embeds"])}
    else:
      null = self.encode_text(text_params, neg, clip_skip=0)
    return {"null_context": null, "guidance_scale": guidance_scale}

  def model_fn(self, unet_params: Any, context: Any, *, null_context: Any = None,
               **kwargs: Any) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """:meth:`~jdiff.pipelines.StableDiffusion.model_fn` for SDXL's context ``{"text", "text_embeds",
    "time_ids"}``. Missing time ids take the defaults of :meth:`micro_conditioning` for the latents' size
    (original and target size = the image's, crop (0, 0); a refiner's aesthetic scores 6 and 2.5);
    a ``null_context`` without them takes the context's when it has its own."""
    parent = super().model_fn
    if not isinstance(context, Mapping):
      return parent(unet_params, context, null_context=null_context, **kwargs)

    def with_ids(pos, neg):
      null = null_context
      if isinstance(null, Mapping) and "time_ids" not in null:
        null = {**null, "time_ids": neg}
      return parent(unet_params, {**context, "time_ids": pos}, null_context=null, **kwargs)

    if "time_ids" in context:
      return with_ids(context["time_ids"], context["time_ids"])

    def fn(x, t):  # the default micro-conditioning of x's size (static under jit)
      pos, neg = self.micro_conditioning(x.shape[0], x.shape[1] * self.vae_factor, x.shape[2] * self.vae_factor)
      return with_ids(pos, neg)(x, t)
    return fn

  def _lora_targets(self) -> dict[str, Any]:
    """LoRA adapters adapt the UNet and each text encoder ("text_encoder", absent in a refiner, and
    "text_encoder_2")."""
    first = {"text_encoder": self.text_params} if self.text_encoder is not None else {}
    return {"unet": self.unet_params, **first, "text_encoder_2": self.text_params_2}

  def _params(self, lora: Any, lora_scale: float) -> tuple:
    trees = self._lora_trees(lora, lora_scale)
    text = ((trees["text_encoder"],) if self.text_encoder is not None else ()) + (trees["text_encoder_2"],)
    return trees["unet"], self.vae_params, text, tuple(self.controlnet_params)

  def _model_fn(self, params, ids, neg_ids, scale, guided: bool, *, rescale=0.0, control=None,
                guess_mode: bool = False, timesteps=None, concat=None) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``ids`` / ``neg_ids``: conditioning dicts ``{"ids": token ids per encoder (None in ``neg_ids``: no
    negative prompt), "time_ids": [B, N] (absent: :meth:`model_fn`'s defaults)}``."""
    unet_params, _, text_params, cn_params = params
    cond = self.encode_text(text_params, ids)
    kwargs: dict[str, Any] = {"concat": concat}
    if self.guidance_embedding_dim:  # a guidance-distilled UNet takes the scale as its embedding
      kwargs.update(self.guidance_kwargs(text_params, cond["text"].shape[0], scale))
    elif guided:
      kwargs.update(self.guidance_kwargs(text_params, cond["text"].shape[0], scale, neg_ids),
                    guidance_rescale=rescale)
    if control is not None:  # the nets see each branch's text, pooled text and time ids
      kwargs["controls"] = self._controls(cn_params, control, guess_mode, timesteps)
    return self.model_fn(unet_params, cond, **kwargs)

  # ---- micro-conditioning ----

  def micro_conditioning(self, batch: int, height: int, width: int, *, img2img: bool = False,
                         original_size: Sequence[int] | None = None,
                         crops_coords_top_left: Sequence[int] = (0, 0), target_size: Sequence[int] | None = None,
                         negative_original_size: Sequence[int] | None = None,
                         negative_crops_coords_top_left: Sequence[int] = (0, 0),
                         negative_target_size: Sequence[int] | None = None, aesthetic_score: float = 6.0,
                         negative_aesthetic_score: float = 2.5) -> tuple[jax.Array, jax.Array]:
    """The time ids ``[B, N]`` of the prompts and of the negative prompts, as diffusers' pipelines build
    them for an image of ``height`` x ``width`` pixels.

    Sizes default to (height, width). Text-to-image (base model): the negative ids are the prompts'
    unless both ``negative_original_size`` and ``negative_target_size`` are given. Image-to-image and
    any refiner (``requires_aesthetics_score``): the negative sizes default to the positive ones; a
    refiner's ids end with ``aesthetic_score`` / ``negative_aesthetic_score``; a base model's negative
    ids take the positive crop corner (as diffusers' img2img pipeline does).
    """
    original = _pair(original_size, (height, width))
    target = _pair(target_size, (height, width))
    crops, neg_crops = tuple(crops_coords_top_left), tuple(negative_crops_coords_top_left)
    if not img2img and not self.requires_aesthetics_score:
      pos = time_ids(original, crops, target, batch_size=batch)
      if negative_original_size is None or negative_target_size is None:
        return pos, pos
      return pos, time_ids(negative_original_size, neg_crops, negative_target_size, batch_size=batch)
    neg_original = _pair(negative_original_size, original)
    neg_target = _pair(negative_target_size, target)
    if self.requires_aesthetics_score:
      return (time_ids(original, crops, aesthetic_score=float(aesthetic_score), batch_size=batch),
              time_ids(neg_original, neg_crops, aesthetic_score=float(negative_aesthetic_score), batch_size=batch))
    return (time_ids(original, crops, target, batch_size=batch),
            time_ids(neg_original, crops, neg_target, batch_size=batch))

  # ---- generation ----

  def _grid_cuts(self, method: str, num_steps: int, options: dict[str, Any], denoising_start: float | None,
                 denoising_end: float | None) -> tuple[int, int]:
    """(first step, end step) of the sampler's ``num_steps`` grid that ``denoising_start`` /
    ``denoising_end`` keep, as diffusers' SDXL pipelines cut their timesteps (whole steps)."""
    if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
      raise ValueError(f"denoising_start={denoising_start} must be below denoising_end={denoising_end}")
    ts = samplers.plan(method, self.schedule, num_steps, prediction=self.prediction, **options).grid.timesteps
    ts, total, n = np.asarray(ts), self.schedule.num_timesteps, int(num_steps)
    start = 0 if denoising_start is None else _cut_index(ts, denoising_start, total, "denoising_start")
    stop = n if denoising_end is None else _cut_index(ts, denoising_end, total, "denoising_end")
    if not 0 <= start < stop:
      raise ValueError(f"denoising_start={denoising_start} / denoising_end={denoising_end} with num_steps={n} "
                       "leave no step; raise num_steps or widen the range")
    return start, stop

  def _sdxl_program(self, kind: str, method: str, num_steps: int, guided: bool, options: dict[str, Any],
                    start: int, stop: int, output: str, guess_mode: bool = False) -> Callable[..., jax.Array]:
    """The jitted SDXL program: "txt2img" from noise (with ControlNets when its ``control`` argument is
    given), "img2img" from images (encoded, noised unless ``denoising_start``) or from latents, over steps
    ``start..stop-1`` of the sampler's grid."""
    cache_key = ("sdxl", kind, method, num_steps, guided, static_key(options), start, stop, output, guess_mode)
    if cache_key in self._programs:
      return self._programs[cache_key]
    full = start == 0 and stop == num_steps

    def finish(params, z):
      return z if output == "latents" else self.decode(params[1], z) * 0.5 + 0.5  # [B, H, W, 3] in [0, 1]

    if kind == "txt2img":
      def run(params, schedule, ids, neg_ids, latents, scale, rescale, key, control=None):
        timesteps = None
        if control is not None:  # ControlNet windows are fractions of the whole grid (before denoising_end)
          timesteps = samplers.plan(method, schedule, num_steps, prediction=self.prediction, **options).grid.timesteps
        model_fn = self._model_fn(params, ids, neg_ids, scale, guided, rescale=rescale, control=control,
                                  guess_mode=guess_mode, timesteps=timesteps)
        if full:  # the facade, as StableDiffusion.generate runs it
          z = samplers.sample(method, model_fn, schedule, latents, num_steps=num_steps, key=key,
                              prediction=self.prediction, **options)
        else:
          plan = samplers.plan(method, schedule, num_steps, prediction=self.prediction, **options)
          z = samplers.solve(model_fn, samplers.cut(plan.grid, 0, stop), latents * plan.noise_scale, plan.rule,
                             key=key)
        return finish(params, z)
    else:
      def run(params, schedule, ids, neg_ids, inputs, noise, scale, rescale, key, sample_posterior, add_noise):
        encode_key, sample_key = jax.random.split(key)
        if inputs.shape[-1] == self.latent_channels:  # latents (a base model's handoff)
          z = inputs
        else:
          z = self.encode_images(params[1], inputs * 2.0 - 1.0, key=encode_key, sample=sample_posterior)
        plan = samplers.plan(method, schedule, num_steps, prediction=self.prediction, **options)
        g = samplers.cut(plan.grid, start, stop)
        x = jnp.where(add_noise, g.alpha[0] * z + g.sigma[0] * noise, z)
        model_fn = self._model_fn(params, ids, neg_ids, scale, guided, rescale=rescale)
        return finish(params, samplers.solve(model_fn, g, x, plan.rule, key=sample_key))
    program = jax.jit(run)
    self._programs[cache_key] = program
    return program

  def generate(self, prompts: str | Sequence[str], *, key: jax.Array, num_steps: int | None = None,
               guidance_scale: float | None = None, guidance_rescale: float = 0.0, sampler: str | None = None,
               negative_prompts: str | Sequence[str] | None = None, height: int | None = None,
               width: int | None = None, latents: jax.Array | None = None,
               original_size: Sequence[int] | None = None, crops_coords_top_left: Sequence[int] = (0, 0),
               target_size: Sequence[int] | None = None, negative_original_size: Sequence[int] | None = None,
               negative_crops_coords_top_left: Sequence[int] = (0, 0),
               negative_target_size: Sequence[int] | None = None, denoising_end: float | None = None,
               output: str = "images", lora: Any = None, lora_scale: float = 1.0, control_images: Any = None,
               controlnet_conditioning_scale: float | Sequence[float] = 1.0, guess_mode: bool = False,
               control_guidance_start: float | Sequence[float] = 0.0,
               control_guidance_end: float | Sequence[float] = 1.0, **sampler_options: Any) -> jax.Array:
    """Text-to-image generation (diffusers' ``StableDiffusionXLPipeline``, and with ControlNets its
    ``StableDiffusionXLControlNetPipeline``), any registered sampler.

    Args:
      prompts, key, num_steps, guidance_rescale, sampler, height, width, latents, lora, lora_scale,
      **sampler_options: as in :meth:`jdiff.pipelines.StableDiffusion.generate` (the defaults: the
        folder's scheduler, 50 steps).
      guidance_scale: classifier-free guidance weight (> 1 guides); default 5.0 as diffusers' SDXL.
      negative_prompts: the unconditional prompts (default: zeros when ``force_zeros_for_empty_prompt``,
        else the empty prompt).
      original_size, crops_coords_top_left, target_size, negative_original_size,
      negative_crops_coords_top_left, negative_target_size: SDXL's micro-conditioning in pixels, see
        :meth:`micro_conditioning`.
      denoising_end: in (0, 1): stop where the grid's timesteps fall below ``round(T (1 - denoising_end))``
        (the base half of a base-to-refiner handoff).
      output: "images" (float32 ``[B, H, W, 3]`` in [0, 1]) or "latents" (``[B, h, w, C]`` at the level
        where sampling stopped, x = alpha z_0 + sigma eps in the UNet's latent scale).
      control_images, controlnet_conditioning_scale, guess_mode, control_guidance_start,
      control_guidance_end: with ControlNets (``from_diffusers(..., controlnet=...)``), as in
        :meth:`jdiff.pipelines.StableDiffusion.generate`; the nets take the UNet's pooled text and time
        ids, and ``height`` / ``width`` (so the default ``original_size``) default to the first control
        image's size.

    Raises:
      ValueError: a bad size, output, denoising_end, or a sampler name that is not registered.

    Example:
      >>> imgs = pipe.generate("a cabin in the woods", key=jax.random.key(0), num_steps=30,
      ...                      original_size=(2048, 2048))  # doctest: +SKIP
    """
    if output not in ("images", "latents"):
      raise ValueError(f"output must be 'images' or 'latents', got {output!r}")
    num_steps, guidance_scale, sampler = self._defaults(num_steps, guidance_scale, sampler)
    ids, neg_ids = self._prompt_ids(prompts, negative_prompts)
    batch = ids["ids"][0].shape[0]
    noise_key, sample_key = jax.random.split(key)
    if latents is not None:
      latents = jnp.asarray(latents, jnp.float32)
      if latents.ndim != 4 or latents.shape[0] != batch or latents.shape[-1] != self.latent_channels:
        raise ValueError(f"latents must be [B={batch}, h, w, {self.latent_channels}], got {latents.shape}")
      height, width = latents.shape[1] * self.vae_factor, latents.shape[2] * self.vae_factor
    elif self.controlnets and control_images is not None and (height is None or width is None):
      h0, w0 = self._image_size(self._per_net_images(control_images)[0])
      height = h0 if height is None else height
      width = w0 if width is None else width
    shape = self._latent_shape(batch, height, width)
    if latents is None:
      latents = jax.random.normal(noise_key, shape, jnp.float32)
    height, width = shape[1] * self.vae_factor, shape[2] * self.vae_factor
    options = self._options(sampler, sampler_options)
    start, stop = self._grid_cuts(sampler, num_steps, options, None, denoising_end)
    control, extra = None, ()
    if self.controlnets:
      control = (self._control_inputs(control_images, batch, height, width, controlnet_conditioning_scale,
                                      control_guidance_start, control_guidance_end, num_steps),)
      extra = (bool(guess_mode or self.controlnets[0].config.global_pool_conditions),)
    elif control_images is not None:
      raise ValueError("control_images given but the pipeline has no ControlNet (from_diffusers(..., controlnet=...))")
    pos, neg = self.micro_conditioning(
        batch, height, width, original_size=original_size, crops_coords_top_left=crops_coords_top_left,
        target_size=target_size, negative_original_size=negative_original_size,
        negative_crops_coords_top_left=negative_crops_coords_top_left, negative_target_size=negative_target_size)
    program = self._sdxl_program("txt2img", sampler, num_steps, self._guided(guidance_scale), options, start, stop,
                                 output, *extra)
    return program(self._params(lora, lora_scale), self.schedule, {**ids, "time_ids": pos},
                   {**neg_ids, "time_ids": neg}, latents, jnp.float32(guidance_scale),
                   jnp.float32(guidance_rescale), sample_key, *(control or ()))

  def img2img(self, images: Any, prompts: str | Sequence[str], *, key: jax.Array, strength: float = 0.3,
              num_steps: int = 50, guidance_scale: float | None = None, guidance_rescale: float = 0.0,
              sampler: str | None = None, negative_prompts: str | Sequence[str] | None = None,
              noise: jax.Array | None = None, sample_posterior: bool = True, denoising_start: float | None = None,
              denoising_end: float | None = None, original_size: Sequence[int] | None = None,
              crops_coords_top_left: Sequence[int] = (0, 0), target_size: Sequence[int] | None = None,
              negative_original_size: Sequence[int] | None = None,
              negative_crops_coords_top_left: Sequence[int] = (0, 0),
              negative_target_size: Sequence[int] | None = None, aesthetic_score: float = 6.0,
              negative_aesthetic_score: float = 2.5, output: str = "images", lora: Any = None,
              lora_scale: float = 1.0, **sampler_options: Any) -> jax.Array:
    """Image-to-image generation and the refiner half of a handoff (diffusers'
    ``StableDiffusionXLImg2ImgPipeline``), any registered sampler.

    ``images`` are pictures (encoded with the VAE) or latents with the VAE's channel count (used as
    they are). Without ``denoising_start`` the last ``min(int(num_steps * strength), num_steps)`` steps
    of the sampler's grid run from the latents noised to their first level; with it, the steps whose
    timesteps lie below ``round(T (1 - denoising_start))`` run from the latents as given (no noise is
    added: a base model's ``generate(..., denoising_end=f, output="latents")`` stopped there).

    Args:
      images: ``[B, H, W, 3]`` (or ``[H, W, 3]``) in [0, 1], or latents ``[B, h, w, C]``; one is repeated
        for every prompt.
      prompts, key, num_steps, guidance_rescale, negative_prompts, noise, sample_posterior, lora,
      lora_scale, **sampler_options: as in :meth:`jdiff.pipelines.StableDiffusion.img2img`.
      strength: in (0, 1]; ignored with ``denoising_start``.
      guidance_scale, sampler: default 5.0 and the folder's scheduler.
      denoising_start, denoising_end: in (0, 1), see above and :meth:`generate`.
      original_size, ..., negative_target_size, aesthetic_score, negative_aesthetic_score: the
        micro-conditioning (:meth:`micro_conditioning`, ``img2img=True``; sizes default to the image's).
      output: "images" or "latents", as in :meth:`generate`.

    Example:
      >>> z = base.generate(prompt, key=key, num_steps=40, denoising_end=0.8, output="latents")  # doctest: +SKIP
      >>> images = refiner.img2img(z, prompt, key=key, num_steps=40, denoising_start=0.8)  # doctest: +SKIP
    """
    if output not in ("images", "latents"):
      raise ValueError(f"output must be 'images' or 'latents', got {output!r}")
    num_steps, guidance_scale, sampler = self._defaults(num_steps, guidance_scale, sampler)
    options = self._options(sampler, sampler_options)
    if denoising_start is None:
      n, first = strength_start(num_steps, strength)
      _, stop = self._grid_cuts(sampler, n, options, None, denoising_end)
      if first >= stop:
        raise ValueError(f"strength={strength} and denoising_end={denoising_end} leave no step")
    else:
      n = int(num_steps)
      first, stop = self._grid_cuts(sampler, n, options, denoising_start, denoising_end)
    inputs = jnp.asarray(images, jnp.float32)
    inputs = inputs[None] if inputs.ndim == 3 else inputs
    c, f = self.latent_channels, self.vae_factor
    if inputs.ndim != 4 or inputs.shape[-1] not in (3, c):
      raise ValueError(f"images must be [B, H, W, 3] in [0, 1] or latents [B, h, w, {c}], got {inputs.shape}")
    ids, neg_ids = self._prompt_ids([prompts] * inputs.shape[0] if isinstance(prompts, str) else prompts,
                                    negative_prompts)
    batch = ids["ids"][0].shape[0]
    if inputs.shape[0] == 1 and batch > 1:
      inputs = jnp.broadcast_to(inputs, (batch,) + inputs.shape[1:])
    if inputs.shape[0] != batch:
      raise ValueError(f"{inputs.shape[0]} images for {batch} prompts")
    is_latent = inputs.shape[-1] == c and c != 3
    height, width = (inputs.shape[1] * f, inputs.shape[2] * f) if is_latent else inputs.shape[1:3]
    self._check_size(height, width)
    shape = (batch, height // f, width // f, c)
    noise_key, run_key = jax.random.split(key)
    if noise is None:
      noise = jax.random.normal(noise_key, shape, jnp.float32)
    noise = jnp.asarray(noise, jnp.float32)
    if noise.shape != shape:
      raise ValueError(f"noise must have shape {shape}, got {noise.shape}")
    pos, neg = self.micro_conditioning(
        batch, height, width, img2img=True, original_size=original_size,
        crops_coords_top_left=crops_coords_top_left, target_size=target_size,
        negative_original_size=negative_original_size,
        negative_crops_coords_top_left=negative_crops_coords_top_left, negative_target_size=negative_target_size,
        aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score)
    program = self._sdxl_program("img2img", sampler, n, self._guided(guidance_scale), options, first, stop, output)
    return program(self._params(lora, lora_scale), self.schedule, {**ids, "time_ids": pos},
                   {**neg_ids, "time_ids": neg}, inputs, noise, jnp.float32(guidance_scale),
                   jnp.float32(guidance_rescale), run_key, jnp.asarray(bool(sample_posterior)),
                   jnp.asarray(denoising_start is None))

  def save_pretrained(self, folder: str | os.PathLike, *, max_shard_size: int | str | None = None,
                      copy_from: str | os.PathLike | None = None, copy_parts: Sequence[str] = ()) -> Path:
    """Writes a diffusers SDXL folder that ``StableDiffusionXLPipeline.from_pretrained`` (a refiner:
    ``StableDiffusionXLImg2ImgPipeline``) and :meth:`from_diffusers` load: ``unet/``, ``vae/``, the text
    encoders and tokenizers, ``scheduler/`` (:attr:`scheduler_config`) and ``model_index.json`` with
    ``force_zeros_for_empty_prompt`` (and a refiner's ``requires_aesthetics_score``), through
    :func:`jdiff.convert.sdxl.save_sdxl_parts`.

    Args:
      folder: the output folder (created; parts already there are replaced).
      max_shard_size: shard each network's weights above this size (``"5GB"``).
      copy_from: an SDXL folder (default :attr:`source`) whose ``copy_parts`` are copied byte for byte
        instead of written (a fine-tune's frozen VAE, text encoders and tokenizers).
      copy_parts: which of "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
        "scheduler" to copy.

    Raises:
      ValueError: ControlNets in the bundle (save them with
        :func:`jdiff.convert.controlnet.save_controlnet`), no scheduler config, an unknown part, or
        ``copy_parts`` without a folder to copy from.

    Example:
      >>> pipe.save_pretrained("out/sdxl-finetuned", max_shard_size="5GB")  # doctest: +SKIP
    """
    from jdiff.convert.sdxl import SKIPPABLE, SDXLParts, save_sdxl_parts

    if self.controlnets:
      raise ValueError("save the ControlNets on their own (jdiff.convert.controlnet.save_controlnet)")
    if not self.scheduler_config:
      raise ValueError("the bundle has no scheduler_config to write")
    unet = self.unet
    if self.image_size:  # diffusers' default resolution is the UNet's sample_size times the VAE factor
      unet = unet.clone(config=dataclasses.replace(unet.config, sample_size=int(self.image_size) // self.vae_factor))
    refiner = self.text_encoder is None
    index = {"_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
             "force_zeros_for_empty_prompt": bool(self.force_zeros_for_empty_prompt)}
    if refiner or self.requires_aesthetics_score:
      index["requires_aesthetics_score"] = bool(self.requires_aesthetics_score)
    parts = SDXLParts(unet=unet, unet_params=self.unet_params, vae=self.vae, vae_params=self.vae_params,
                      text_encoder_2=self.text_encoder_2, text_encoder_2_params=self.text_params_2,
                      tokenizer_2=self.tokenizer_2, text_encoder=self.text_encoder,
                      text_encoder_params=self.text_params, tokenizer=self.tokenizer,
                      scheduler_config=dict(self.scheduler_config), model_index=index)
    copy_parts = tuple(copy_parts)
    unknown = sorted(set(copy_parts) - set(SKIPPABLE))
    if unknown:
      raise ValueError(f"unknown SDXL pipeline parts {unknown}; expected some of {SKIPPABLE}")
    src = copy_from if copy_from is not None else self.source
    if copy_parts and not src:
      raise ValueError("copy_parts needs copy_from (or a bundle loaded from a diffusers folder)")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for part in copy_parts:
      if (Path(src) / part).is_dir():
        shutil.rmtree(out / part, ignore_errors=True)
        shutil.copytree(Path(src) / part, out / part)
    return save_sdxl_parts(parts, out, max_shard_size=max_shard_size, skip=copy_parts)
