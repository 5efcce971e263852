"""Text-to-image generation with Stable Diffusion 3's MMDiT, as diffusers' ``StableDiffusion3Pipeline``
runs it without its T5 encoder.

:class:`StableDiffusion3` is the :class:`~jdiff.pipelines.StableDiffusion` bundle holding the
:class:`~jdiff.models.MMDiT` (``transformer/``, as its ``unet``), the two CLIP text encoders with
projection heads and their tokenizers (``text_encoder/``, ``text_encoder_2/``,
``tokenizer/``, ``tokenizer_2/``), the 16-channel KL autoencoder (``vae/``) and the flow sampler of the
folder's ``scheduler/`` config (``prediction="flow"``). Its text conditioning enters the base class's
``model_fn`` as the dict context ``{"text", "pooled_projections"}``; generation, guidance, sampler
plumbing, latent scaling (with the shift factor) and decoding are the base class's.

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
  >>> pipe = StableDiffusion3.from_diffusers("sd3-medium-no-t5")  # doctest: +SKIP
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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff.convert import _io
from jdiff.pipelines import StableDiffusion, accepted_options, prompt_lists, sampler_from_scheduler_config
from jdiff.tokenizers import CLIPTokenizer

__all__ = ["StableDiffusion3", "FLOW_SCHEDULERS"]

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
class StableDiffusion3(StableDiffusion):
  """Stable Diffusion 3 as a :class:`~jdiff.pipelines.StableDiffusion`: ``unet`` is the
  :class:`~jdiff.models.MMDiT`, ``text_encoder`` / ``tokenizer`` the first CLIP encoder with projection,
  ``prediction`` "flow", ``schedule`` None (flow grids need only ``num_train_timesteps``, a sampler option).

  Token ids are ``[B, 2, L]``: both tokenizers' ids, padded to the first tokenizer's length L.

  Attributes (beyond :class:`~jdiff.pipelines.StableDiffusion`'s):
    text_encoder_2, text_params_2, tokenizer_2: the second CLIP encoder with projection.
    max_sequence_length: rows of the (zero) T5 part of the text tokens (diffusers' default 256).
  """
  text_encoder_2: Any = None
  text_params_2: Any = None
  tokenizer_2: CLIPTokenizer | None = None
  max_sequence_length: int = 256

  def __post_init__(self):
    super().__post_init__()
    cfg = self.unet.config
    encoders = (self.text_encoder, self.text_encoder_2)
    if any(e is None for e in encoders) or self.tokenizer is None or self.tokenizer_2 is None:
      raise ValueError("an SD3 pipeline takes two CLIP text encoders, their parameters and two tokenizers")
    for i, enc in enumerate(encoders):
      if enc.config.projection_dim is None:
        raise ValueError(f"SD3 text encoder {i + 1} has no text_projection; SD3 needs CLIPTextModelWithProjection")
    width = sum(enc.config.hidden_size for enc in encoders)
    if width > cfg.joint_attention_dim:
      raise ValueError(f"the CLIP encoders' widths add up to {width}, more than the transformer's "
                       f"joint_attention_dim {cfg.joint_attention_dim}")
    pooled = sum(enc.config.projection_dim for enc in encoders)
    if pooled != cfg.pooled_projection_dim:
      raise ValueError(f"the CLIP projections add up to {pooled}, the transformer's pooled_projection_dim is "
                       f"{cfg.pooled_projection_dim}")
    if self.latent_channels != cfg.in_channels:
      raise ValueError(f"the VAE has {self.latent_channels} latent channels, the transformer takes {cfg.in_channels}")
    if int(self.max_sequence_length) < 0:
      raise ValueError(f"max_sequence_length must be >= 0, got {self.max_sequence_length}")
    self.text_params_2 = jax.tree.map(jnp.asarray, self.text_params_2)

  @classmethod
  def from_diffusers(cls, path: str | os.PathLike, *, dtype: str | None = None, clip_skip: int = 0,
                     controlnet: Any = None) -> StableDiffusion3:
    """Loads a diffusers ``StableDiffusion3Pipeline`` folder saved without T5 (``text_encoder_3`` and
    ``tokenizer_3`` absent or null in ``model_index.json``); safetensors only, no torch.

    Args:
      path: the pipeline folder.
      dtype: compute dtype of the networks ("bfloat16"); parameters stay float32.
      clip_skip, controlnet: not supported for SD3 (0 and None only).

    Raises:
      FileNotFoundError: the folder or one of its parts is missing.
      ValueError: a folder with a T5 ``text_encoder_3`` (not supported), a scheduler that is not a
        flow-matching one, an unsupported config or a missing / mis-shaped tensor (named).

    Example:
      >>> pipe = StableDiffusion3.from_diffusers("sd3-medium-no-t5", dtype="bfloat16")  # doctest: +SKIP
    """
    from jdiff.convert.dit import load_sd3_transformer
    from jdiff.convert.text import load_text_encoder
    from jdiff.convert.vae import load_vae

    if controlnet is not None or clip_skip:
      raise ValueError("SD3 pipelines take no controlnet and no clip_skip")
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
    (enc, params), (enc_2, params_2) = (load_text_encoder(root / part, dtype=dtype)
                                        for part in ("text_encoder", "text_encoder_2"))
    return cls(unet=transformer, unet_params=transformer_params, vae=vae, vae_params=vae_params, text_encoder=enc,
               text_params=params, tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"), schedule=None,
               prediction="flow", scaling_factor=float(vae.config.scaling_factor),
               shift_factor=float(vae.config.shift_factor or 0.0), sampler_options=options,
               scheduler_config=sched_config, source=os.fspath(root),
               defaults={"sampler": sampler, "num_steps": 28, "guidance_scale": 7.0}, text_encoder_2=enc_2,
               text_params_2=params_2, tokenizer_2=CLIPTokenizer.from_pretrained(root / "tokenizer_2"))

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

  # ---- text ----

  @property
  def guidance_embedding_dim(self) -> None:
    """SD3 transformers have no guidance-scale embedding."""
    return None

  def all_text_params(self, text_params: Any = None) -> tuple[Any, Any]:
    """Both encoders' parameter trees (``text_params`` replaces the first encoder's)."""
    return (self.text_params if text_params is None else text_params), self.text_params_2

  def tokenize(self, text: str | Sequence[str]) -> np.ndarray:
    """Token ids of both tokenizers, padded to the first one's length L: ``[2, L]`` for one string,
    ``[B, 2, L]`` for a list."""
    texts = [text] if isinstance(text, str) else list(text)
    length = self.tokenizer.max_length
    ids = np.stack([np.asarray(self.tokenizer(texts, max_length=length)),
                    np.asarray(self.tokenizer_2(texts, max_length=length))], axis=1)  # [B, 2, L]
    return ids[0] if isinstance(text, str) else ids

  def encode_text(self, text_params: Any, ids: jax.Array) -> dict[str, jax.Array]:
    """Pure text conditioning: ids ``[B, 2, L]`` -> ``{"text": [B, L + max_sequence_length,
    joint_attention_dim], "pooled_projections": [B, pooled_projection_dim]}`` (float32): the CLIP
    penultimate states side by side, zero-padded on features, then the zero T5 rows; the pooled vector
    is both projected pooled outputs. ``text_params``: both trees (:meth:`all_text_params`) or the first's.
    """
    if not isinstance(text_params, tuple):
      text_params = self.all_text_params(text_params)
    ids = jnp.asarray(ids)
    hidden, pooled = [], []
    for k, (module, params) in enumerate(zip((self.text_encoder, self.text_encoder_2), text_params)):
      out = module.apply({"params": params}, ids[:, k], output_hidden_states=True)
      hidden.append(out.hidden_states[-2].astype(jnp.float32))  # [B, L, D_k]
      pooled.append(out.text_embeds.astype(jnp.float32))  # [B, P_k]
    clip = jnp.concatenate(hidden, axis=-1)  # [B, L, D_1 + D_2]
    b, _, width = clip.shape
    dim = self.unet.config.joint_attention_dim
    clip = jnp.pad(clip, ((0, 0), (0, 0), (0, dim - width)))
    t5 = jnp.zeros((b, int(self.max_sequence_length), dim), jnp.float32)  # no T5 encoder: zeros
    return {"text": jnp.concatenate([clip, t5], axis=1), "pooled_projections": jnp.concatenate(pooled, axis=-1)}

  def encode_prompts(self, prompts: Sequence[str]) -> dict[str, jax.Array]:
    """:meth:`encode_text` of prompts."""
    return self.encode_text(self.all_text_params(), jnp.asarray(self.tokenize(list(prompts))))

  def _prompt_ids(self, prompts, negative_prompts):
    prompts, negative = prompt_lists(prompts, negative_prompts)
    return jnp.asarray(self.tokenize(prompts)), jnp.asarray(self.tokenize(negative))

  def _params(self, lora: Any, lora_scale: float) -> tuple:
    unet, vae, text, controlnets = super()._params(lora, lora_scale)
    return unet, vae, self.all_text_params(text), controlnets

  # ---- generation ----

  def generate(self, prompts: str | Sequence[str], *, key: jax.Array, height: int | None = None,
               width: int | None = None, latents: jax.Array | None = None, sampler: str | None = None,
               **kwargs: Any) -> jax.Array:
    """:meth:`jdiff.pipelines.StableDiffusion.generate` (defaults: the folder's flow sampler, 28 steps,
    guidance 7.0; guidance only above 1), with the dynamic shift's ``image_seq_len`` taken from the
    latent size when the options ask for dynamic shifting and give neither ``mu`` nor ``image_seq_len``.

    Example:
      >>> imgs = pipe.generate(["a red fox"], key=jax.random.key(0), num_steps=28)  # doctest: +SKIP
    """
    f, p = self.vae_factor, self.unet.config.patch_size
    if latents is not None and np.ndim(latents) == 4:
      h, w = np.shape(latents)[1:3]
    else:
      h = (self.default_size if height is None else int(height)) // f
      w = (self.default_size if width is None else int(width)) // f
    name = self._defaults(None, None, sampler)[2]
    options = {**accepted_options(name, self.sampler_options), **kwargs}
    if options.get("use_dynamic_shifting") and "mu" not in options and "image_seq_len" not in options:
      kwargs["image_seq_len"] = (h // p) * (w // p)
    return super().generate(prompts, key=key, height=height, width=width, latents=latents, sampler=sampler,
                            **kwargs)

  def img2img(self, images: Any, prompts: str | Sequence[str], *, key: jax.Array, sampler: str | None = None,
              guidance_scale: float | None = None, **kwargs: Any) -> jax.Array:
    """:meth:`jdiff.pipelines.StableDiffusion.img2img` with the folder's flow sampler and guidance 7.0 as
    defaults (diffusers' ``StableDiffusion3Img2ImgPipeline`` with a static shift). The steps kept are
    the last ``min(int(num_steps * strength), num_steps)``; diffusers' SD3 keeps
    ``num_steps - int(num_steps - num_steps * strength)``, the same count where ``num_steps * strength``
    is a whole number."""
    _, guidance_scale, sampler = self._defaults(None, guidance_scale, sampler)
    return super().img2img(images, prompts, key=key, sampler=sampler, guidance_scale=guidance_scale, **kwargs)
