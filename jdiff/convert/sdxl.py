"""Stable Diffusion XL diffusers folders <-> jdiff modules and parameters (safetensors, no torch).

An SDXL folder (``StableDiffusionXLPipeline``, or the refiner's ``StableDiffusionXLImg2ImgPipeline``) holds
``model_index.json`` and the parts ``unet/`` (``addition_embed_type="text_time"``, often sharded),
``vae/``, ``text_encoder_2/`` (``CLIPTextModelWithProjection``) with ``tokenizer_2/``, ``scheduler/``, and,
for the base model, ``text_encoder/`` (``CLIPTextModel``) with ``tokenizer/`` (the refiner has none).
:func:`load_sdxl_parts` reads them all; :func:`save_sdxl_parts` writes a folder diffusers loads.

Example:
  >>> parts = load_sdxl_parts("checkpoints/sdxl-base")  # doctest: +SKIP
  >>> embeds, pooled = sdxl_text_conditioning(parts.encoders, [tok(prompts) for tok in parts.tokenizers])
  ... # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

from jdiff.convert import _io
from jdiff.convert.text import load_text_encoder, save_text_encoder
from jdiff.convert.unet import load_unet, save_unet
from jdiff.convert.vae import load_vae, save_vae
from jdiff.models.text import CLIPTextModel
from jdiff.models.unet import UNet
from jdiff.models.vae import AutoencoderKL
from jdiff.tokenizers import CLIPTokenizer

__all__ = ["SDXLParts", "load_sdxl_parts", "save_sdxl_parts"]

_DIFFUSERS_VERSION = "0.30.0"
SKIPPABLE = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


@dataclasses.dataclass(frozen=True)
class SDXLParts:
  """The networks, parameters, tokenizers and configs of one SDXL folder.

  Attributes:
    unet, unet_params: the UNet (its ``config``) and float32 parameters.
    vae, vae_params: the autoencoder and its parameters.
    text_encoder_2, text_encoder_2_params: the second encoder (with projection) and its parameters.
    tokenizer_2: the second encoder's tokenizer.
    text_encoder, text_encoder_params, tokenizer: the first encoder; None for a refiner.
    scheduler_config: ``scheduler/scheduler_config.json`` (None when the folder has no scheduler).
    model_index: ``model_index.json`` (pipeline class, ``force_zeros_for_empty_prompt``,
      ``requires_aesthetics_score``, ...).
  """

  unet: UNet
  unet_params: Any
  vae: AutoencoderKL
  vae_params: Any
  text_encoder_2: CLIPTextModel
  text_encoder_2_params: Any
  tokenizer_2: CLIPTokenizer
  text_encoder: CLIPTextModel | None = None
  text_encoder_params: Any = None
  tokenizer: CLIPTokenizer | None = None
  scheduler_config: dict[str, Any] | None = None
  model_index: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def encoders(self) -> list[tuple[CLIPTextModel, Any]]:
    """``(module, params)`` per text encoder in pipeline order, for
    :func:`jdiff.models.text.sdxl_text_conditioning`."""
    out = [(self.text_encoder, self.text_encoder_params)] if self.text_encoder is not None else []
    return out + [(self.text_encoder_2, self.text_encoder_2_params)]

  @property
  def tokenizers(self) -> list[CLIPTokenizer]:
    """The tokenizers in the order of :attr:`encoders`."""
    return ([self.tokenizer] if self.tokenizer is not None else []) + [self.tokenizer_2]

  @property
  def force_zeros_for_empty_prompt(self) -> bool:
    """Zeros (not an encoded "") as the negative conditioning when no negative prompt is given."""
    return bool(self.model_index.get("force_zeros_for_empty_prompt", True))

  @property
  def requires_aesthetics_score(self) -> bool:
    """The refiner's time ids end with an aesthetic score instead of the target size."""
    return bool(self.model_index.get("requires_aesthetics_score", False))


def _listed(index: dict[str, Any], part: str) -> bool:
  entry = index.get(part)
  return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None


def load_sdxl_parts(path: str | os.PathLike, *, dtype: str | None = None) -> SDXLParts:
  """Loads every part of a diffusers SDXL folder (base or refiner).

  Args:
    path: the pipeline folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder_2/``,
      ``tokenizer_2/``, optionally ``text_encoder/`` + ``tokenizer/`` and ``scheduler/``).
    dtype: compute dtype of the UNet, the text encoders and the VAE ("bfloat16"); parameters are float32.
      The VAE computes in float32 under "float16" when its config says ``force_upcast``.

  Returns:
    An :class:`SDXLParts`.

  Raises:
    FileNotFoundError: the folder, ``model_index.json`` or a part is missing (one line naming it; an
      SD 1.x/2.x folder is named as one: it has no ``text_encoder_2``).
    ValueError: an unsupported config or a missing / mis-shaped tensor (named).

  Example:
    >>> parts = load_sdxl_parts("checkpoints/sdxl-base", dtype="bfloat16")  # doctest: +SKIP
    >>> parts.unet.config.addition_embed_type  # doctest: +SKIP
    'text_time'
  """
  root = Path(path)
  _io.refuse_pickle(root, what="pipeline")
  if not root.is_dir():
    raise FileNotFoundError(f"SDXL pipeline folder {str(root)!r} does not exist")
  index = _io.read_config(root, name="model_index.json")
  for part in ("text_encoder_2", "tokenizer_2"):
    if not _listed(index, part) or not (root / part).is_dir():
      raise FileNotFoundError(f"{str(root)!r} has no {part}/: not an SDXL pipeline folder (SD 1.x/2.x folders "
                              "load with StableDiffusion.from_diffusers)")
  for part in ("unet", "vae"):
    if not (root / part).is_dir():
      raise FileNotFoundError(f"SDXL pipeline part {str(root / part)!r} does not exist")
  unet, unet_params = load_unet(root / "unet", dtype=dtype)
  if unet.config.addition_embed_type != "text_time":
    raise ValueError(f"{str(root / 'unet')!r} has addition_embed_type={unet.config.addition_embed_type!r}; an "
                     "SDXL UNet has 'text_time'")
  vae, vae_params = load_vae(root / "vae", dtype=dtype)
  text_2, text_2_params = load_text_encoder(root / "text_encoder_2", dtype=dtype)
  if text_2.config.projection_dim is None:
    raise ValueError(f"{str(root / 'text_encoder_2')!r} is a CLIPTextModel without text_projection; SDXL's "
                     "text_encoder_2 is a CLIPTextModelWithProjection")
  tokenizer_2 = CLIPTokenizer.from_pretrained(root / "tokenizer_2")
  text = text_params = tokenizer = None
  if _listed(index, "text_encoder"):
    for part in ("text_encoder", "tokenizer"):
      if not (root / part).is_dir():
        raise FileNotFoundError(f"SDXL pipeline part {str(root / part)!r} does not exist")
    text, text_params = load_text_encoder(root / "text_encoder", dtype=dtype)
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
  sched = None
  if (root / "scheduler" / "scheduler_config.json").is_file():
    sched = _io.read_config(root / "scheduler", name="scheduler_config.json")
  return SDXLParts(unet=unet, unet_params=unet_params, vae=vae, vae_params=vae_params, text_encoder_2=text_2,
                   text_encoder_2_params=text_2_params, tokenizer_2=tokenizer_2, text_encoder=text,
                   text_encoder_params=text_params, tokenizer=tokenizer, scheduler_config=sched,
                   model_index=dict(index))


def save_sdxl_parts(parts: SDXLParts, path: str | os.PathLike, *,
                    max_shard_size: int | str | None = None, skip: Sequence[str] = ()) -> Path:
  """Writes a diffusers SDXL folder that ``StableDiffusionXLPipeline.from_pretrained`` (or the refiner's
  ``StableDiffusionXLImg2ImgPipeline``) and :func:`load_sdxl_parts` load.

  Args:
    parts: what to write (``parts.model_index`` keeps its pipeline class and flags).
    path: output folder (created).
    max_shard_size: shard each network's weights above this size (``"5GB"``), as ``save_pretrained`` does.
    skip: parts not written (the caller puts them there, e.g. a fine-tune's frozen ones copied byte for
      byte): some of "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler";
      ``model_index.json`` still lists them.

  Returns:
    The folder.

  Example:
    >>> save_sdxl_parts(dataclasses.replace(parts, unet_params=tuned), "out/sdxl")  # doctest: +SKIP
  """
  root = Path(path)
  refiner = parts.text_encoder is None
  index = {"_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
           "force_zeros_for_empty_prompt": True, **parts.model_index,
           "_diffusers_version": _DIFFUSERS_VERSION,
           "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
           "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
           "tokenizer_2": ["transformers", "CLIPTokenizer"],
           "text_encoder": [None, None] if refiner else ["transformers", "CLIPTextModel"],
           "tokenizer": [None, None] if refiner else ["transformers", "CLIPTokenizer"]}
  unknown = sorted(set(skip) - set(SKIPPABLE))
  if unknown:
    raise ValueError(f"unknown SDXL pipeline parts {unknown}; expected some of {SKIPPABLE}")
  save_unet(parts.unet, parts.unet_params, root / "unet", max_shard_size=max_shard_size)
  if "vae" not in skip:
    save_vae(parts.vae, parts.vae_params, root / "vae", max_shard_size=max_shard_size)
  if "text_encoder_2" not in skip:
    save_text_encoder(parts.text_encoder_2, parts.text_encoder_2_params, root / "text_encoder_2",
                      max_shard_size=max_shard_size)
  if "tokenizer_2" not in skip:
    parts.tokenizer_2.save_pretrained(root / "tokenizer_2")
  if not refiner and "text_encoder" not in skip:
    save_text_encoder(parts.text_encoder, parts.text_encoder_params, root / "text_encoder",
                      max_shard_size=max_shard_size)
  if not refiner and "tokenizer" not in skip:
    parts.tokenizer.save_pretrained(root / "tokenizer")
  if parts.scheduler_config is not None and "scheduler" not in skip:
    _io.write_config(root / "scheduler", parts.scheduler_config, name="scheduler_config.json")
  if parts.scheduler_config is not None:
    index.setdefault("scheduler", ["diffusers", parts.scheduler_config.get("_class_name", "EulerDiscreteScheduler")])
  else:
    index.pop("scheduler", None)
  _io.write_config(root, index, name="model_index.json")
  return root
