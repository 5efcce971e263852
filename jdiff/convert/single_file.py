"""Original-layout ("ldm" / "sgm") single-file Stable Diffusion checkpoints <-> jdiff parameter trees.

Community Stable Diffusion 1.x / 2.x models ship as one ``.safetensors`` file in the layout of the
original CompVis / Stability code. Its three parts sit under fixed prefixes:

- ``model.diffusion_model.``: the UNet, as ``input_blocks.N`` / ``middle_block.N`` / ``output_blocks.N``
  (``time_embed.0/2``, ``out.0/2``; resnets ``in_layers.0/2``, ``out_layers.0/3``, ``emb_layers.1``,
  ``skip_connection``; transformer blocks under the same names as diffusers').
- ``first_stage_model.``: the autoencoder, as ``encoder.down.I.block.J`` / ``decoder.up.I.block.J`` (the
  decoder's levels counted from the deepest), ``mid.block_1/2``, ``mid.attn_1`` (``norm``, ``q``, ``k``,
  ``v``, ``proj_out`` stored as 1x1 convolutions), ``norm_out``, ``nin_shortcut``.
- the text encoder: ``cond_stage_model.transformer.`` + transformers' ``CLIPTextModel`` names (SD 1,
  OpenAI CLIP), or ``cond_stage_model.model.`` + OpenCLIP names (SD 2: ``transformer.resblocks.N`` with
  fused ``attn.in_proj_weight`` [3D, D], ``ln_1``/``ln_2``, ``mlp.c_fc``/``mlp.c_proj``,
  ``token_embedding``, ``positional_embedding``, ``ln_final``, ``text_projection``).

SDXL files (the SGM layout; :func:`read_sdxl_single_file`, :func:`write_sdxl_single_file`) keep the UNet
and VAE prefixes (the UNet's "text_time" embedding is ``label_emb.0.0`` / ``label_emb.0.2``) and hold their
text encoders under ``conditioner.embedders.``: the base model's OpenAI CLIP as ``0.transformer.`` +
transformers' names and its OpenCLIP ViT-bigG as ``1.model.`` + OpenCLIP names (every block, as diffusers'
``text_encoder_2`` holds them; ``text_projection`` stored [hidden, projection], the transpose of
transformers' ``text_projection.weight``); the refiner's only encoder, OpenCLIP, is ``0.model.``.

SD 2 conditions on the output of OpenCLIP's penultimate block (then ``ln_final``); diffusers' and jdiff's
SD 2 text encoder therefore holds one block fewer than the file. Reading drops the file's last block;
writing appends a last block that is an exact identity (zero output projections, unit LayerNorms) and an
identity ``text_projection``: neither is read by SD 2's conditioning, and a reader that takes the last
block's output computes the same conditioning as one that takes the penultimate.

The mapping here only renames original names to diffusers names (and reshapes, splits, fuses where the
layouts differ); the diffusers names <-> jdiff parameter paths rules are those of
:mod:`jdiff.convert.unet`, :mod:`jdiff.convert.vae` and :mod:`jdiff.convert.text`. The configs (shapes)
come from a model family preset or from a local diffusers folder: the file itself holds no config.
Pickled checkpoints (``.ckpt``, ``.pt``, ``.bin``) are never opened.

Example:
  >>> parts = read_single_file("model.safetensors", family="sd15")  # doctest: +SKIP
  >>> pipe = load_single_file_bundle("model.safetensors", config="sd15_diffusers_folder")  # doctest: +SKIP
  >>> save_single_file_bundle(pipe, "out.safetensors")  # doctest: +SKIP
  >>> xl = load_sdxl_single_file_bundle("sd_xl_base_1.0.safetensors", config="sdxl_diffusers_folder")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from safetensors.numpy import save_file

from jdiff.convert import _io
from jdiff.convert import text as _text
from jdiff.convert import unet as _unet
from jdiff.convert import vae as _vae
from jdiff.models.configs import UNetConfig, VAEConfig
from jdiff.models.text import CLIPTextConfig

__all__ = ["FAMILIES", "SDXL_FAMILIES", "SingleFileParts", "SDXLSingleFileParts", "family_configs",
           "sdxl_family_configs", "read_single_file", "write_single_file", "read_sdxl_single_file",
           "write_sdxl_single_file", "is_sdxl_file", "load_single_file_bundle", "save_single_file_bundle",
           "load_sdxl_single_file_bundle", "unet_original_name", "vae_original_name"]

FAMILIES = ("sd15", "sd21", "sd21-base")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_FAMILIES = ("sdxl", "sdxl-refiner")
SDXL_PREFIX = "conditioner.embedders."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # the base model's OpenAI CLIP ViT-L
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."  # the base model's OpenCLIP ViT-bigG
SDXL_REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."  # the refiner's only encoder
_TEXT_LAYOUT = {"sd15": "clip", "sd21": "open_clip", "sd21-base": "open_clip"}
_IGNORED_TEXT = {"clip": ("text_model.embeddings.position_ids",),  # a buffer, not a weight
                 "open_clip": ("text_projection", "logit_scale", "attn_mask")}  # unused by SD conditioning


@dataclasses.dataclass(frozen=True)
class SingleFileParts:
  """The three networks of a single-file checkpoint: configs and float32 parameter trees (jdiff layout).

  Attributes:
    unet_config, unet_params: the UNet.
    vae_config, vae_params: the autoencoder (``vae_config.scaling_factor`` from the family or config).
    text_config, text_params: the CLIP text encoder.
    text_layout: "clip" (SD 1, ``cond_stage_model.transformer.*``) or "open_clip" (SD 2,
      ``cond_stage_model.model.*``).
  """
  unet_config: UNetConfig
  unet_params: dict[str, Any]
  vae_config: VAEConfig
  vae_params: dict[str, Any]
  text_config: CLIPTextConfig
  text_params: dict[str, Any]
  text_layout: str


# ----------------------------------------------------------------------------- configs


def _check_family(family: str) -> str:
  if family not in FAMILIES:
    raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
  return family


def family_configs(family: str) -> tuple[UNetConfig, VAEConfig, CLIPTextConfig]:
  """The UNet, VAE and text encoder configs of a model family ("sd15", "sd21", "sd21-base").

  Example:
    >>> family_configs("sd21-base")[0].sample_size
    64
  """
  _check_family(family)
  if family == "sd15":
    return UNetConfig.sd15(), VAEConfig.sd15(), CLIPTextConfig.sd15()
  if family == "sd21":
    return UNetConfig.sd21(), VAEConfig.sd21(), CLIPTextConfig.sd21()
  return UNetConfig.sd21(sample_size=64), VAEConfig.sd15(), CLIPTextConfig.sd21()


def _folder_configs(config: str | os.PathLike) -> tuple[UNetConfig, VAEConfig, CLIPTextConfig]:
  root = Path(config)
  if not root.is_dir():
    raise FileNotFoundError(f"config folder {str(root)!r} does not exist (expected a diffusers pipeline folder)")
  if (root / "text_encoder_2").is_dir():
    raise ValueError(f"config folder {str(root)!r} is an SDXL pipeline (it has text_encoder_2/); it does not "
                     "describe an SD 1.x / 2.x file")
  return (UNetConfig.from_diffusers_config(_io.read_config(root / "unet")),
          VAEConfig.from_diffusers_config(_io.read_config(root / "vae")),
          CLIPTextConfig.from_hf_config(_io.read_config(root / "text_encoder")))


def _configs(family: str | None, config: str | os.PathLike | None):
  if (family is None) == (config is None):
    raise ValueError("pass exactly one of family= (one of "
                     f"{FAMILIES}) or config= (a diffusers pipeline folder whose configs describe the file)")
  return family_configs(family) if family is not None else _folder_configs(config)


# ----------------------------------------------------------------------------- UNet names

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
               "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
               "class_embedding": "label_emb", "add_embedding.linear_1": "label_emb.0.0",
               "add_embedding.linear_2": "label_emb.0.2"}
_DOWN_RES = re.compile(r"^down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)$")
_DOWN_ATTN = re.compile(r"^down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$")
_DOWN_SAMPLE = re.compile(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)$")
_MID_RES = re.compile(r"^mid_block\.resnets\.(\d+)\.(\w+)\.(\w+)$")
_MID_ATTN = re.compile(r"^mid_block\.attentions\.(\d+)\.(.+)$")
_UP_RES = re.compile(r"^up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)$")
_UP_ATTN = re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$")
_UP_SAMPLE = re.compile(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)$")


def _layers(config: UNetConfig) -> int:
  layers = set(config.per_block("layers_per_block"))
  if len(layers) != 1:
    raise ValueError(f"layers_per_block={config.layers_per_block} differs between levels; the original layout "
                     "numbers blocks with one count for every level")
  return layers.pop()


def _resnet(part: str, name: str) -> str:
  if part not in _RESNET:
    raise ValueError(f"no original-layout name for resnet tensor {name!r}")
  return _RESNET[part]


def unet_original_name(name: str, config: UNetConfig) -> str:
  """The original-layout name (without ``model.diffusion_model.``) of a diffusers UNet tensor name.

  Down level ``b``'s layer ``l`` is ``input_blocks.{1 + b(L+1) + l}`` (``.0`` the resnet, ``.1`` the
  attention), its downsampler ``input_blocks.{1 + b(L+1) + L}.0.op``; up level ``b``'s layer ``l`` is
  ``output_blocks.{b(L+1) + l}``, its upsampler the last layer's ``.1.conv`` (``.2.conv`` after an
  attention); the middle block alternates resnets and attentions. ``L`` is ``layers_per_block``.

  Raises:
    ValueError: a tensor the original layout has no place for (e.g. LCM's ``time_embedding.cond_proj``).

  Example:
    >>> unet_original_name("down_blocks.1.resnets.0.conv1.weight", UNetConfig.sd15())
    'input_blocks.4.0.in_layers.2.weight'
    >>> unet_original_name("up_blocks.1.upsamplers.0.conv.bias", UNetConfig.sd15())
    'output_blocks.5.2.conv.bias'
  """
  n = _layers(config)
  if m := _DOWN_RES.match(name):
    b, l, part, leaf = int(m[1]), int(m[2]), m[3], m[4]
    return f"input_blocks.{1 + b * (n + 1) + l}.0.{_resnet(part, name)}.{leaf}"
  if m := _DOWN_ATTN.match(name):
    return f"input_blocks.{1 + int(m[1]) * (n + 1) + int(m[2])}.1.{m[3]}"
  if m := _DOWN_SAMPLE.match(name):
    return f"input_blocks.{1 + int(m[1]) * (n + 1) + n}.0.op.{m[2]}"
  if m := _MID_RES.match(name):
    return f"middle_block.{2 * int(m[1])}.{_resnet(m[2], name)}.{m[3]}"
  if m := _MID_ATTN.match(name):
    return f"middle_block.{2 * int(m[1]) + 1}.{m[2]}"
  if m := _UP_RES.match(name):
    b, l, part, leaf = int(m[1]), int(m[2]), m[3], m[4]
    return f"output_blocks.{b * (n + 1) + l}.0.{_resnet(part, name)}.{leaf}"
  if m := _UP_ATTN.match(name):
    return f"output_blocks.{int(m[1]) * (n + 1) + int(m[2])}.1.{m[3]}"
  if m := _UP_SAMPLE.match(name):
    b = int(m[1])
    slot = 2 if config.up_block_types[b].startswith("CrossAttn") else 1
    return f"output_blocks.{b * (n + 1) + n}.{slot}.conv.{m[2]}"
  module, _, leaf = name.rpartition(".")
  if module in _UNET_FIXED:
    return f"{_UNET_FIXED[module]}.{leaf}"
  raise ValueError(f"no original-layout name for UNet tensor {name!r}")


# ----------------------------------------------------------------------------- VAE names

_VAE_RESNET = re.compile(r"^(encoder\.down|decoder\.up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)$")
_VAE_SAMPLE = re.compile(r"^(encoder\.down|decoder\.up)_blocks\.(\d+)\.(down|up)samplers\.0\.conv\.(\w+)$")
_VAE_MID_RES = re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)\.(\w+)$")
_VAE_MID_ATTN = re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)"
                           r"\.(\w+)$")
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_FIXED = {"encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out", "quant_conv",
              "post_quant_conv"}


def vae_original_name(name: str, config: VAEConfig) -> str:
  """The original-layout name (without ``first_stage_model.``) of a diffusers autoencoder tensor name.

  Raises:
    ValueError: a tensor the original layout has no place for.

  Example:
    >>> vae_original_name("decoder.up_blocks.0.resnets.2.conv_shortcut.weight", VAEConfig.sd15())
    'decoder.up.3.block.2.nin_shortcut.weight'
    >>> vae_original_name("encoder.mid_block.attentions.0.to_out.0.weight", VAEConfig.sd15())
    'encoder.mid.attn_1.proj_out.weight'
  """
  levels = len(config.block_out_channels)
  if m := _VAE_RESNET.match(name):
    i = int(m[2]) if m[1] == "encoder.down" else levels - 1 - int(m[2])
    part = "nin_shortcut" if m[4] == "conv_shortcut" else m[4]
    return f"{m[1]}.{i}.block.{m[3]}.{part}.{m[5]}"
  if m := _VAE_SAMPLE.match(name):
    i = int(m[2]) if m[1] == "encoder.down" else levels - 1 - int(m[2])
    return f"{m[1]}.{i}.{m[3]}sample.conv.{m[4]}"
  if m := _VAE_MID_RES.match(name):
    part = "nin_shortcut" if m[3] == "conv_shortcut" else m[3]
    return f"{m[1]}.mid.block_{int(m[2]) + 1}.{part}.{m[4]}"
  if m := _VAE_MID_ATTN.match(name):
    return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
  module, _, leaf = name.rpartition(".")
  if module in ("encoder.conv_norm_out", "decoder.conv_norm_out"):
    return f"{module.split('.')[0]}.norm_out.{leaf}"
  if module in _VAE_FIXED:
    return name
  raise ValueError(f"no original-layout name for VAE tensor {name!r}")


# ----------------------------------------------------------------------------- OpenCLIP names

_OC_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")
_OC_RENAME = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
              "self_attn.out_proj": "attn.out_proj"}
_OC_FIXED = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
_OC_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")


def _open_clip_to_transformers(tensors: Mapping[str, np.ndarray], config: CLIPTextConfig, source: str, *,
                               prefix: str = OPENCLIP_PREFIX, penultimate: bool = True) -> dict[str, np.ndarray]:
  """OpenCLIP tensors (``prefix`` removed) -> transformers names.

  ``penultimate`` (SD 2): the file holds ``num_hidden_layers + 1`` blocks, the last one is dropped and so
  is ``text_projection``. Otherwise (SDXL): the file holds ``num_hidden_layers`` blocks, and a config with
  ``projection_dim`` takes ``text_projection`` ([hidden, projection], the transpose of transformers'
  ``text_projection.weight``)."""
  n, d = config.num_hidden_layers, config.hidden_size
  blocks = sorted({int(m[1]) for k in tensors if (m := _OC_BLOCK.match(k))})
  want = n + 1 if penultimate else n
  if len(blocks) != want:
    why = "SD 2 files hold one more (SD 2 reads the penultimate block)" if penultimate else "SDXL files hold as many"
    raise ValueError(f"{source}: the OpenCLIP text encoder has {len(blocks)} blocks; the config's text encoder "
                     f"takes {n}, and {why}")
  fixed = {v: k for k, v in _OC_FIXED.items()}
  rename = {v: k for k, v in _OC_RENAME.items()}
  ignored = _IGNORED_TEXT["open_clip"] if penultimate else ("logit_scale", "attn_mask")
  out: dict[str, np.ndarray] = {}
  for key, value in tensors.items():
    if key in ignored:
      continue
    if key in fixed:
      out[fixed[key]] = value
      continue
    if key == "text_projection":
      if config.projection_dim is None:
        raise ValueError(f"{source}: the file's text encoder has {prefix + key!r}; the config's has no projection")
      if tuple(value.shape) != (d, config.projection_dim):
        raise ValueError(f"{source}: tensor {prefix + key!r} has shape {tuple(value.shape)}, the config needs "
                         f"{(d, config.projection_dim)}")
      out["text_projection.weight"] = np.ascontiguousarray(value.T)
      continue
    m = _OC_BLOCK.match(key)
    if m is None:
      raise ValueError(f"{source}: unexpected text encoder tensor {prefix + key!r}")
    i, rest = int(m[1]), m[2]
    if i == n:
      continue  # the last block: SD 2 conditions on the penultimate one
    layer = f"text_model.encoder.layers.{i}."
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
      if value.shape[0] != 3 * d:
        raise ValueError(f"{source}: tensor {prefix + key!r} has shape {tuple(value.shape)}; a width-{d} "
                         f"encoder fuses q, k, v into {3 * d} rows")
      leaf = rest.rsplit("_", 1)[1]
      for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        out[f"{layer}self_attn.{proj}.{leaf}"] = value[j * d:(j + 1) * d]
      continue
    module, _, leaf = rest.rpartition(".")
    if module not in rename:
      raise ValueError(f"{source}: unexpected text encoder tensor {prefix + key!r}")
    out[f"{layer}{rename[module]}.{leaf}"] = value
  return out


def _transformers_to_open_clip(tensors: Mapping[str, np.ndarray], config: CLIPTextConfig, *,
                               penultimate: bool = True) -> dict[str, np.ndarray]:
  """transformers names -> OpenCLIP tensors (prefix not added). ``penultimate`` (SD 2): with the identity
  last block and projection; otherwise (SDXL) the blocks as they are and transformers'
  ``text_projection.weight`` transposed into ``text_projection``."""
  n, d = config.num_hidden_layers, config.hidden_size
  out: dict[str, np.ndarray] = {}
  for key, value in tensors.items():
    if key in _OC_FIXED:
      out[_OC_FIXED[key]] = value
      continue
    if key == "text_projection.weight" and not penultimate:
      out["text_projection"] = np.ascontiguousarray(np.asarray(value).T)
      continue
    m = _OC_LAYER.match(key)
    module, _, leaf = m[2].rpartition(".") if m else ("", "", "")
    if m is not None and module in _OC_RENAME:
      out[f"transformer.resblocks.{m[1]}.{_OC_RENAME[module]}.{leaf}"] = value
    elif m is None or module not in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
      raise ValueError(f"no OpenCLIP name for text encoder tensor {key!r}")
  for i in range(n):
    for leaf in ("weight", "bias"):
      parts = [tensors[f"text_model.encoder.layers.{i}.self_attn.{p}.{leaf}"] for p in ("q_proj", "k_proj", "v_proj")]
      out[f"transformer.resblocks.{i}.attn.in_proj_{leaf}"] = np.concatenate(parts, axis=0)
  if not penultimate:
    return out
  last, f = f"transformer.resblocks.{n}.", config.intermediate_size
  zeros = lambda *shape: np.zeros(shape, np.float32)
  out.update({last + "attn.in_proj_weight": zeros(3 * d, d), last + "attn.in_proj_bias": zeros(3 * d),
              last + "attn.out_proj.weight": zeros(d, d), last + "attn.out_proj.bias": zeros(d),
              last + "ln_1.weight": np.ones(d, np.float32), last + "ln_1.bias": zeros(d),
              last + "ln_2.weight": np.ones(d, np.float32), last + "ln_2.bias": zeros(d),
              last + "mlp.c_fc.weight": zeros(f, d), last + "mlp.c_fc.bias": zeros(f),
              last + "mlp.c_proj.weight": zeros(d, f), last + "mlp.c_proj.bias": zeros(d),
              "text_projection": np.eye(d, dtype=np.float32)})
  return out


# ----------------------------------------------------------------------------- reading


def _part(tensors: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _renamed(found: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]],
             original: Callable[[str], str], prefix: str, what: str, source: str) -> dict[str, np.ndarray]:
  """The diffusers-named tensors of one part, every expected one looked up under its original name; 1x1
  convolution weights become dense ones where diffusers stores a linear layer."""
  names = {name: original(name) for name in expected}
  missing = sorted(prefix + o for n, o in names.items() if o not in found)
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise ValueError(f"{source}: the {what} misses tensor {missing[0]!r}{more}; does the family or config "
                     "match the file?")
  extra = sorted(set(found) - set(names.values()))
  if extra:
    more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
    raise ValueError(f"{source}: unexpected {what} tensor {prefix + extra[0]!r}{more}; does the family or "
                     "config match the file?")
  out = {}
  for name, o in names.items():
    value = found[o]
    if len(expected[name]) == 2 and value.ndim > 2 and all(s == 1 for s in value.shape[2:]):
      value = value.reshape(value.shape[:2])
    if tuple(value.shape) != tuple(expected[name]):
      raise ValueError(f"{source}: {what} tensor {prefix + o!r} has shape {tuple(found[o].shape)}, the config "
                       f"needs {tuple(expected[name])}; does the family or config match the file?")
    out[name] = value
  return out


def _expected(shapes: Mapping[tuple[str, ...], tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
  return {_unet.torch_name(p): _unet._torch_shape(p, s) for p, s in shapes.items()}


def _read_unet_vae(unet: Mapping[str, np.ndarray], vae: Mapping[str, np.ndarray], unet_config: UNetConfig,
                   vae_config: VAEConfig, source: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """The UNet and VAE parameter trees from their original-layout tensors (prefixes removed)."""
  unet_shapes = _unet.unet_param_shapes(unet_config)
  named = _renamed(unet, _expected(unet_shapes), lambda n: unet_original_name(n, unet_config), UNET_PREFIX,
                   "UNet", source)
  unet_params = _unet.params_from_torch(named, unet_shapes, source=source)
  vae_shapes = _vae.vae_param_shapes(vae_config)
  named = _renamed(vae, _expected(vae_shapes), lambda n: vae_original_name(n, vae_config), VAE_PREFIX,
                   "VAE", source)
  return unet_params, _unet.params_from_torch(named, vae_shapes, source=source)


def _tensor_names(path: str | os.PathLike) -> list[str]:
  """The tensor names of a ``.safetensors`` file, from its header alone."""
  _io.refuse_pickle(path, what="single-file checkpoint")
  if not Path(path).is_file():
    raise FileNotFoundError(f"single-file checkpoint {str(path)!r} does not exist")
  return list(_io._checked_header(Path(path))[0])


def is_sdxl_file(path: str | os.PathLike) -> bool:
  """Whether an original-layout ``.safetensors`` file is an SDXL one (``conditioner.embedders.*`` text
  encoders), read from its header alone.

  Raises:
    FileNotFoundError: no such file; ValueError: a pickle file or a malformed header.
  """
  return any(k.startswith(SDXL_PREFIX) for k in _tensor_names(path))


def read_single_file(path: str | os.PathLike, *, family: str | None = None,
                     config: str | os.PathLike | None = None) -> SingleFileParts:
  """Reads an original-layout SD 1.x / 2.x ``.safetensors`` checkpoint into jdiff parameter trees.

  Args:
    path: the ``.safetensors`` file (UNet, VAE and text encoder).
    family: the model family whose configs describe the file: "sd15", "sd21" (768-v) or "sd21-base".
    config: instead of ``family``, a local diffusers pipeline folder whose ``unet/``, ``vae/`` and
      ``text_encoder/`` configs describe the file.

  Returns:
    The configs and float32 parameter trees (:class:`SingleFileParts`). Tensors outside the three parts
    (EMA copies, schedule buffers) are ignored.

  Raises:
    FileNotFoundError: no such file or config folder.
    ValueError: a pickle file (``.ckpt``, ``.pt``, ``.bin``), neither or both of ``family`` / ``config``, a
      file without one of the three parts, or a tensor missing, unexpected or mis-shaped for the configs
      (one line naming it).

  Example:
    >>> parts = read_single_file("v1-5-pruned-emaonly.safetensors", family="sd15")  # doctest: +SKIP
    >>> parts.unet_params["conv_in"]["kernel"].shape  # doctest: +SKIP
    (3, 3, 4, 320)
  """
  _io.refuse_pickle(path, what="single-file checkpoint")
  source = str(path)
  if family in SDXL_FAMILIES:
    raise ValueError(f"family {family!r} is an SDXL family; read SDXL files with read_sdxl_single_file")
  unet_config, vae_config, text_config = _configs(family, config)
  tensors, _ = _io.read_safetensors(path)
  if any(k.startswith(SDXL_PREFIX) for k in tensors):
    raise ValueError(f"{source} is an SDXL checkpoint ('{SDXL_PREFIX}*' text encoders); read it with "
                     "read_sdxl_single_file or StableDiffusionXL.from_single_file")
  unet = _part(tensors, UNET_PREFIX)
  vae = _part(tensors, VAE_PREFIX)
  clip, open_clip = _part(tensors, CLIP_PREFIX), _part(tensors, OPENCLIP_PREFIX)
  if not unet:
    raise ValueError(f"{source} is not an original-layout (ldm) Stable Diffusion checkpoint: no UNet "
                     f"('{UNET_PREFIX}*' tensors)")
  if not vae:
    raise ValueError(f"{source} holds no VAE ('{VAE_PREFIX}*' tensors); a single-file checkpoint holds the UNet, "
                     "the VAE and the text encoder")
  if not clip and not open_clip:
    raise ValueError(f"{source} holds no text encoder ('{CLIP_PREFIX}*' or '{OPENCLIP_PREFIX}*' tensors); a "
                     "single-file checkpoint holds the UNet, the VAE and the text encoder")
  layout = "clip" if clip else "open_clip"
  if family is not None and _TEXT_LAYOUT[family] != layout:
    held = "an OpenAI CLIP (SD 1)" if clip else "an OpenCLIP (SD 2)"
    raise ValueError(f"{source} holds {held} text encoder; family {family!r} expects the other one")

  unet_params, vae_params = _read_unet_vae(unet, vae, unet_config, vae_config, source)
  if layout == "clip":
    text = {k: v for k, v in clip.items() if k not in _IGNORED_TEXT["clip"]}
  else:
    text = _open_clip_to_transformers(open_clip, text_config, source)
  text_params = _text.text_params_from_torch(text, text_config, source=source)
  return SingleFileParts(unet_config=unet_config, unet_params=unet_params, vae_config=vae_config,
                         vae_params=vae_params, text_config=text_config, text_params=text_params,
                         text_layout=layout)


# ----------------------------------------------------------------------------- writing


def _unwrap(params: Mapping[str, Any]) -> Mapping[str, Any]:
  return params["params"] if set(params) == {"params"} else params


def write_single_file(path: str | os.PathLike, unet_params: Mapping[str, Any], vae_params: Mapping[str, Any],
                      text_params: Mapping[str, Any], *, unet_config: UNetConfig, vae_config: VAEConfig,
                      text_config: CLIPTextConfig, family: str, dtype: str = "float32") -> Path:
  """Writes an original-layout single ``.safetensors`` file (SD 1 layout for "sd15", SD 2's OpenCLIP text
  layout for "sd21" / "sd21-base") that original-layout tools and diffusers' ``from_single_file`` read.

  Args:
    path: the output file (``.safetensors``; parent folders are created).
    unet_params, vae_params, text_params: jdiff parameter trees (``{"params": ...}`` accepted too).
    unet_config, vae_config, text_config: their configs (checked against the trees).
    family: "sd15" (OpenAI CLIP text layout) or "sd21" / "sd21-base" (OpenCLIP text layout).
    dtype: stored precision, "float32" or "float16".

  Returns:
    The file.

  Raises:
    ValueError: a pickle suffix, an unknown family or dtype, a text encoder whose activation is not the
      layout's (quick_gelu for "sd15", gelu for SD 2), a parameter tree that does not match its config, or a
      tensor the original layout has no place for (one line naming it).

  Example:
    >>> write_single_file("out.safetensors", unet_p, vae_p, text_p, unet_config=UNetConfig.sd15(),
    ...                   vae_config=VAEConfig.sd15(), text_config=CLIPTextConfig.sd15(),
    ...                   family="sd15")  # doctest: +SKIP
  """
  _io.refuse_pickle(path, what="single-file checkpoint")
  _check_family(family)
  if dtype not in ("float32", "float16"):
    raise ValueError(f"dtype={dtype!r}; a single file is written as float32 or float16")
  act = {"clip": "quick_gelu", "open_clip": "gelu"}[_TEXT_LAYOUT[family]]
  if text_config.hidden_act != act:  # original-layout readers take the activation from the layout
    raise ValueError(f"family {family!r} stores a text encoder whose MLP uses {act}; this one uses "
                     f"{text_config.hidden_act!r}")
  if text_config.projection_dim is not None:
    raise ValueError("a text encoder with a projection head has no SD 1 / SD 2 single-file layout")
  out = _unet_vae_tensors(unet_params, vae_params, unet_config, vae_config)
  text = _hf_text_tensors(text_params, text_config, "text encoder params")
  if _TEXT_LAYOUT[family] == "clip":
    out.update({CLIP_PREFIX + k: v for k, v in text.items()})
  else:
    out.update({OPENCLIP_PREFIX + k: v for k, v in _transformers_to_open_clip(text, text_config).items()})
  return _save(out, path, dtype)


def _unet_vae_tensors(unet_params: Mapping[str, Any], vae_params: Mapping[str, Any], unet_config: UNetConfig,
                      vae_config: VAEConfig) -> dict[str, np.ndarray]:
  """The UNet's and VAE's original-layout tensors (prefixed), the trees checked against their configs."""
  out: dict[str, np.ndarray] = {}
  unet = _unet.params_to_torch(_unwrap(unet_params))
  _io.check_tensors(_expected(_unet.unet_param_shapes(unet_config)), unet, source="UNet params")
  for name, value in unet.items():
    out[UNET_PREFIX + unet_original_name(name, unet_config)] = value
  vae = _unet.params_to_torch(_unwrap(vae_params))
  _io.check_tensors(_expected(_vae.vae_param_shapes(vae_config)), vae, source="VAE params")
  for name, value in vae.items():
    if _VAE_MID_ATTN.match(name) and value.ndim == 2:
      value = value.reshape(value.shape + (1, 1))  # the original layout's attention is 1x1 convolutions
    out[VAE_PREFIX + vae_original_name(name, vae_config)] = value
  return out


def _hf_text_tensors(text_params: Mapping[str, Any], text_config: CLIPTextConfig, what: str) -> dict[str, np.ndarray]:
  """A text encoder's transformers state dict (``text_model.*``, ``text_projection.weight``), checked against
  its config."""
  text = _text.text_params_to_torch(dict(_unwrap(text_params)))
  expected = {_text._saved_name(p, "text_model."): (s[::-1] if p[-1] == "kernel" else s)
              for p, s in _text.text_param_shapes(text_config).items()}
  _io.check_tensors(expected, text, source=what)
  return text


def _save(out: Mapping[str, np.ndarray], path: str | os.PathLike, dtype: str) -> Path:
  arrays = {k: np.ascontiguousarray(v, dtype=np.dtype(dtype)) for k, v in out.items()}
  target = Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  save_file(arrays, str(target), metadata={"format": "pt"})
  return target


# ----------------------------------------------------------------------------- bundles


def _family_scheduler(family: str) -> dict[str, Any]:
  """A diffusers DDIM scheduler config with the family's training schedule and prediction type."""
  return {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
          "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False,
          "steps_offset": 1, "timestep_spacing": "leading",
          "prediction_type": "v_prediction" if family == "sd21" else "epsilon"}


def load_single_file_bundle(path: str | os.PathLike, *, family: str | None = None,
                            config: str | os.PathLike | None = None, tokenizer: Any = None,
                            dtype: str | None = None):
  """A :class:`~jdiff.pipelines.StableDiffusion` from an original-layout single ``.safetensors`` file.

  Args:
    path: the file.
    family: "sd15", "sd21" (768-v) or "sd21-base": configs, training schedule and prediction type.
    config: instead of ``family``, a local diffusers pipeline folder: its ``unet/``, ``vae/``,
      ``text_encoder/`` configs, ``tokenizer/`` and ``scheduler/``.
    tokenizer: a :class:`~jdiff.tokenizers.CLIPTokenizer` or a tokenizer folder (``vocab.json``,
      ``merges.txt``); required with ``family`` (the file holds no vocabulary), overrides ``config``'s.
    dtype: compute dtype of the three networks ("bfloat16"); parameters stay float32.

  Returns:
    The bundle (its ``source`` is None: it was not loaded from a diffusers folder).

  Raises:
    FileNotFoundError / ValueError: as :func:`read_single_file`, or no tokenizer (one line).

  Example:
    >>> pipe = load_single_file_bundle("model.safetensors", family="sd15", tokenizer="sd15/tokenizer")  # doctest: +SKIP
  """
  from jdiff.models.text import CLIPTextModel
  from jdiff.models.unet import UNet
  from jdiff.models.vae import AutoencoderKL
  from jdiff.pipelines import StableDiffusion, sampler_options_from_config, schedule_from_config
  from jdiff.tokenizers import CLIPTokenizer

  if tokenizer is None and config is None:
    raise ValueError("the file holds no tokenizer: pass tokenizer= (a CLIP tokenizer folder) or config= (a "
                     "diffusers pipeline folder)")
  parts = read_single_file(path, family=family, config=config)
  if tokenizer is None:
    tokenizer = Path(config) / "tokenizer"
  if not isinstance(tokenizer, CLIPTokenizer):
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer)
  if config is not None:
    scheduler = _io.read_config(Path(config) / "scheduler", name="scheduler_config.json")
  else:
    scheduler = _family_scheduler(family)
  over = {} if dtype is None else {"dtype": dtype}
  unet = UNet(dataclasses.replace(parts.unet_config, **over))
  vae = AutoencoderKL(dataclasses.replace(parts.vae_config, **over))
  text = CLIPTextModel(dataclasses.replace(parts.text_config, **over))
  return StableDiffusion(unet=unet, unet_params=parts.unet_params, vae=vae, vae_params=parts.vae_params,
                         text_encoder=text, text_params=parts.text_params, tokenizer=tokenizer,
                         schedule=schedule_from_config(scheduler),
                         prediction=scheduler.get("prediction_type", "epsilon"),
                         scaling_factor=float(vae.config.scaling_factor),
                         shift_factor=float(vae.config.shift_factor or 0.0),
                         sampler_options=sampler_options_from_config(scheduler), scheduler_config=scheduler)


def save_single_file_bundle(bundle: Any, path: str | os.PathLike, *, family: str | None = None,
                            dtype: str = "float32") -> Path:
  """Writes a :class:`~jdiff.pipelines.StableDiffusion`'s UNet, VAE and text encoder(s) as one original-layout
  ``.safetensors`` file (:func:`write_single_file`). The tokenizer and scheduler are not part of the layout.

  Args:
    bundle: the pipeline bundle.
    path: the output file.
    family: the layout's family (see :func:`write_single_file`); None picks "sd15" for a text encoder with
      OpenAI CLIP's quick_gelu and "sd21" (OpenCLIP layout) for one with gelu. A
      :class:`~jdiff.sdxl.StableDiffusionXL` bundle is written in the SDXL layout
      (:func:`write_sdxl_single_file`: the base's or, without a first encoder, the refiner's).
    dtype: "float32" or "float16".

  Raises:
    ValueError: a bundle with ControlNets or a UNet that reads the pooled text through its class embedding
      (neither has a place in the layout), or as :func:`write_single_file`.

  Example:
    >>> save_single_file_bundle(pipe, "out/model.safetensors")  # doctest: +SKIP
  """
  from jdiff.ldm import TextUNet

  if bundle.controlnets:
    raise ValueError("ControlNets have no place in a Stable Diffusion single file; save them on their own")
  if getattr(bundle, "text_encoder_2", None) is not None:  # StableDiffusionXL
    if family is not None and family not in SDXL_FAMILIES:
      raise ValueError(f"family {family!r} is not an SDXL layout; an SDXL bundle is written as one of "
                       f"{SDXL_FAMILIES} (None picks it)")
    first = bundle.text_encoder
    return write_sdxl_single_file(path, bundle.unet_params, bundle.vae_params, bundle.text_params,
                                  bundle.text_params_2, unet_config=bundle.unet.config, vae_config=bundle.vae.config,
                                  text_config=None if first is None else first.config,
                                  text_config_2=bundle.text_encoder_2.config, dtype=dtype)
  if isinstance(bundle.unet, TextUNet) and bundle.unet.config.class_embed_type:
    raise ValueError(f"a UNet with class_embed_type={bundle.unet.config.class_embed_type!r} reading the pooled "
                     "text has no Stable Diffusion single-file layout")
  text_config = bundle.text_encoder.config
  if family is None:
    family = "sd21" if text_config.hidden_act == "gelu" else "sd15"
  return write_single_file(path, bundle.unet_params, bundle.vae_params, bundle.text_params,
                           unet_config=bundle.unet.config, vae_config=bundle.vae.config, text_config=text_config,
                           family=family, dtype=dtype)


# ----------------------------------------------------------------------------- SDXL


@dataclasses.dataclass(frozen=True)
class SDXLSingleFileParts:
  """The networks of an SDXL single-file checkpoint: configs and float32 parameter trees (jdiff layout).

  Attributes:
    unet_config, unet_params: the "text_time" UNet.
    vae_config, vae_params: the autoencoder.
    text_config_2, text_params_2: the OpenCLIP encoder (with ``text_projection``).
    text_config, text_params: the OpenAI CLIP encoder; None for a refiner.
  """
  unet_config: UNetConfig
  unet_params: dict[str, Any]
  vae_config: VAEConfig
  vae_params: dict[str, Any]
  text_config_2: CLIPTextConfig
  text_params_2: dict[str, Any]
  text_config: CLIPTextConfig | None = None
  text_params: dict[str, Any] | None = None


def sdxl_family_configs(family: str) -> tuple[UNetConfig, VAEConfig, CLIPTextConfig | None, CLIPTextConfig]:
  """The UNet, VAE, first and second text encoder configs of "sdxl" (base 1.0) or "sdxl-refiner" (refiner
  1.0: no first encoder, None).

  Example:
    >>> sdxl_family_configs("sdxl-refiner")[2] is None
    True
  """
  if family not in SDXL_FAMILIES:
    raise ValueError(f"unknown SDXL model family {family!r}; expected one of {SDXL_FAMILIES}")
  if family == "sdxl":
    return UNetConfig.sdxl_base(), VAEConfig.sdxl(), CLIPTextConfig.sdxl(), CLIPTextConfig.sdxl_2()
  return UNetConfig.sdxl_refiner(), VAEConfig.sdxl(), None, CLIPTextConfig.sdxl_2()


def _sdxl_folder_configs(config: str | os.PathLike):
  root = Path(config)
  if not root.is_dir():
    raise FileNotFoundError(f"config folder {str(root)!r} does not exist (expected a diffusers SDXL pipeline folder)")
  if not (root / "text_encoder_2").is_dir():
    raise ValueError(f"config folder {str(root)!r} has no text_encoder_2/: not an SDXL pipeline folder, so it does "
                     "not describe an SDXL file")
  first = root / "text_encoder" / "config.json"
  return (UNetConfig.from_diffusers_config(_io.read_config(root / "unet")),
          VAEConfig.from_diffusers_config(_io.read_config(root / "vae")),
          CLIPTextConfig.from_hf_config(_io.read_config(root / "text_encoder")) if first.is_file() else None,
          CLIPTextConfig.from_hf_config(_io.read_config(root / "text_encoder_2")))


def _sdxl_configs(family: str | None, config: str | os.PathLike | None):
  if (family is None) == (config is None):
    raise ValueError(f"pass exactly one of family= (one of {SDXL_FAMILIES}) or config= (a diffusers SDXL "
                     "pipeline folder whose configs describe the file)")
  if family in FAMILIES:
    raise ValueError(f"family {family!r} is an SD 1.x / 2.x family; it does not describe an SDXL file "
                     f"(expected one of {SDXL_FAMILIES})")
  return sdxl_family_configs(family) if family is not None else _sdxl_folder_configs(config)


def read_sdxl_single_file(path: str | os.PathLike, *, family: str | None = None,
                          config: str | os.PathLike | None = None) -> SDXLSingleFileParts:
  """Reads an original-layout (SGM) SDXL ``.safetensors`` checkpoint into jdiff parameter trees.

  The layout: the UNet under ``model.diffusion_model.`` (the SD names, the "text_time" embedding as
  ``label_emb.0.0`` / ``label_emb.0.2``), the VAE under ``first_stage_model.``, the base model's OpenAI
  CLIP under ``conditioner.embedders.0.transformer.`` (transformers' names) and its OpenCLIP ViT-bigG
  under ``conditioner.embedders.1.model.`` (OpenCLIP names, all blocks, ``text_projection`` stored
  [hidden, projection]); the refiner holds only the OpenCLIP encoder, as ``conditioner.embedders.0.model.``.

  Args:
    path: the ``.safetensors`` file.
    family: "sdxl" (base 1.0) or "sdxl-refiner" (refiner 1.0).
    config: instead of ``family``, a local diffusers SDXL pipeline folder whose ``unet/``, ``vae/``,
      ``text_encoder_2/`` and (base) ``text_encoder/`` configs describe the file.

  Returns:
    An :class:`SDXLSingleFileParts` (tensors outside the parts, such as ``logit_scale``, are ignored).

  Raises:
    FileNotFoundError: no such file or config folder.
    ValueError: a pickle file, neither or both of ``family`` / ``config``, an SD 1.x / 2.x family, config
      folder or file, a base file read as a refiner (or the reverse), a missing part, or a tensor missing,
      unexpected or mis-shaped for the configs (one line naming it).

  Example:
    >>> parts = read_sdxl_single_file("sd_xl_base_1.0.safetensors", family="sdxl")  # doctest: +SKIP
  """
  _io.refuse_pickle(path, what="single-file checkpoint")
  source = str(path)
  unet_config, vae_config, text_config, text_config_2 = _sdxl_configs(family, config)
  tensors, _ = _io.read_safetensors(path)
  if not any(k.startswith(SDXL_PREFIX) for k in tensors):
    held = " (an SD 1.x / 2.x file: read it with read_single_file)" if any(
        k.startswith("cond_stage_model.") for k in tensors) else ""
    raise ValueError(f"{source} holds no SDXL text encoders ('{SDXL_PREFIX}*' tensors){held}")
  unet, vae = _part(tensors, UNET_PREFIX), _part(tensors, VAE_PREFIX)
  clip, open_clip = _part(tensors, SDXL_CLIP_PREFIX), _part(tensors, SDXL_OPENCLIP_PREFIX)
  refiner_clip = _part(tensors, SDXL_REFINER_OPENCLIP_PREFIX)
  if not unet:
    raise ValueError(f"{source} holds no UNet ('{UNET_PREFIX}*' tensors)")
  if not vae:
    raise ValueError(f"{source} holds no VAE ('{VAE_PREFIX}*' tensors); a single-file checkpoint holds the UNet, "
                     "the VAE and the text encoders")
  what = "a refiner's" if text_config is None else "a base model's"
  if text_config is None and (clip or open_clip or not refiner_clip):
    raise ValueError(f"{source} is not an SDXL refiner file (one OpenCLIP encoder, "
                     f"'{SDXL_REFINER_OPENCLIP_PREFIX}*'); the config is {what}")
  if text_config is not None and (refiner_clip or not clip or not open_clip):
    raise ValueError(f"{source} is not an SDXL base file (two encoders, '{SDXL_CLIP_PREFIX}*' and "
                     f"'{SDXL_OPENCLIP_PREFIX}*'); the config is {what}")
  unet_params, vae_params = _read_unet_vae(unet, vae, unet_config, vae_config, source)
  prefix = SDXL_OPENCLIP_PREFIX if text_config is not None else SDXL_REFINER_OPENCLIP_PREFIX
  text_2 = _open_clip_to_transformers(open_clip or refiner_clip, text_config_2, source, prefix=prefix,
                                      penultimate=False)
  text_params_2 = _text.text_params_from_torch(text_2, text_config_2, source=source)
  text_params = None
  if text_config is not None:
    text = {k: v for k, v in clip.items() if k not in _IGNORED_TEXT["clip"]}
    text_params = _text.text_params_from_torch(text, text_config, source=source)
  return SDXLSingleFileParts(unet_config=unet_config, unet_params=unet_params, vae_config=vae_config,
                             vae_params=vae_params, text_config_2=text_config_2, text_params_2=text_params_2,
                             text_config=text_config, text_params=text_params)


def write_sdxl_single_file(path: str | os.PathLike, unet_params: Mapping[str, Any], vae_params: Mapping[str, Any],
                           text_params: Mapping[str, Any] | None, text_params_2: Mapping[str, Any], *,
                           unet_config: UNetConfig, vae_config: VAEConfig, text_config: CLIPTextConfig | None,
                           text_config_2: CLIPTextConfig, dtype: str = "float32") -> Path:
  """Writes an original-layout (SGM) SDXL single ``.safetensors`` file (the layout of
  :func:`read_sdxl_single_file`) that diffusers' ``from_single_file`` reads: the base model's when
  ``text_config`` is given, the refiner's (one OpenCLIP encoder) when it is None.

  Args:
    path: the output file (``.safetensors``; parent folders are created).
    unet_params, vae_params, text_params, text_params_2: jdiff parameter trees (``{"params": ...}``
      accepted too); ``text_params`` None for a refiner.
    unet_config, vae_config, text_config, text_config_2: their configs (checked against the trees).
    dtype: stored precision, "float32" or "float16".

  Returns:
    The file.

  Raises:
    ValueError: a pickle suffix, an unknown dtype, a UNet without the "text_time" embedding, a first
      encoder that is not a quick_gelu encoder without projection, a second one that is not a gelu encoder
      with projection, a tree that does not match its config, or a tensor the layout has no place for (one
      line naming it).

  Example:
    >>> write_sdxl_single_file("out.safetensors", unet_p, vae_p, text_p, text_p2, unet_config=UNetConfig.sdxl_base(),
    ...                        vae_config=VAEConfig.sdxl(), text_config=CLIPTextConfig.sdxl(),
    ...                        text_config_2=CLIPTextConfig.sdxl_2())  # doctest: +SKIP
  """
  _io.refuse_pickle(path, what="single-file checkpoint")
  if dtype not in ("float32", "float16"):
    raise ValueError(f"dtype={dtype!r}; a single file is written as float32 or float16")
  if unet_config.addition_embed_type != "text_time":
    raise ValueError(f"the UNet has addition_embed_type={unet_config.addition_embed_type!r}; an SDXL single file "
                     "holds a 'text_time' UNet")
  if text_config_2.hidden_act != "gelu" or text_config_2.projection_dim is None:
    raise ValueError("SDXL's OpenCLIP encoder is a gelu encoder with text_projection; text_config_2 has "
                     f"hidden_act={text_config_2.hidden_act!r}, projection_dim={text_config_2.projection_dim}")
  if text_config is not None and (text_config.hidden_act != "quick_gelu" or text_config.projection_dim is not None):
    raise ValueError("SDXL's first encoder is OpenAI CLIP (quick_gelu, no projection); text_config has "
                     f"hidden_act={text_config.hidden_act!r}, projection_dim={text_config.projection_dim}")
  if (text_config is None) != (text_params is None):
    raise ValueError("pass text_params and text_config together (both None for a refiner)")
  out = _unet_vae_tensors(unet_params, vae_params, unet_config, vae_config)
  text_2 = _hf_text_tensors(text_params_2, text_config_2, "text encoder 2 params")
  prefix = SDXL_OPENCLIP_PREFIX if text_config is not None else SDXL_REFINER_OPENCLIP_PREFIX
  out.update({prefix + k: v for k, v in _transformers_to_open_clip(text_2, text_config_2, penultimate=False).items()})
  if text_config is not None:
    text = _hf_text_tensors(text_params, text_config, "text encoder params")
    out.update({SDXL_CLIP_PREFIX + k: v for k, v in text.items()})
  return _save(out, path, dtype)


def _sdxl_scheduler() -> dict[str, Any]:
  """SDXL 1.0's scheduler config (base and refiner): Euler on the scaled-linear schedule, epsilon."""
  return {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
          "beta_start": 0.00085, "beta_end": 0.012, "interpolation_type": "linear", "prediction_type": "epsilon",
          "steps_offset": 1, "timestep_spacing": "leading", "use_karras_sigmas": False}


def load_sdxl_single_file_bundle(path: str | os.PathLike, *, family: str | None = None,
                                 config: str | os.PathLike | None = None, tokenizer: Any = None,
                                 tokenizer_2: Any = None, dtype: str | None = None):
  """A :class:`~jdiff.sdxl.StableDiffusionXL` from an SDXL original-layout single ``.safetensors`` file.

  Args:
    path: the file.
    family: "sdxl" or "sdxl-refiner": configs, SDXL 1.0's Euler schedule and pipeline flags (the base:
      ``force_zeros_for_empty_prompt``; the refiner: ``requires_aesthetics_score``, no zeroed negative).
    config: instead of ``family``, a local diffusers SDXL pipeline folder: its configs, tokenizers,
      ``scheduler/`` and ``model_index.json`` flags.
    tokenizer, tokenizer_2: :class:`~jdiff.tokenizers.CLIPTokenizer` s or tokenizer folders; required with
      ``family`` (``tokenizer`` only for the base), override ``config``'s.
    dtype: compute dtype of the networks ("bfloat16"); parameters stay float32.

  Returns:
    The bundle (its ``source`` is None).

  Raises:
    FileNotFoundError / ValueError: as :func:`read_sdxl_single_file`, or a missing tokenizer (one line).

  Example:
    >>> pipe = load_sdxl_single_file_bundle("sd_xl_base_1.0.safetensors", config="sdxl-base")  # doctest: +SKIP
  """
  from jdiff.models.text import CLIPTextModel
  from jdiff.models.unet import UNet
  from jdiff.models.vae import AutoencoderKL
  from jdiff.pipelines import SCHEDULER_SAMPLERS, sampler_options_from_config, schedule_from_config
  from jdiff.sdxl import StableDiffusionXL
  from jdiff.tokenizers import CLIPTokenizer

  _sdxl_configs(family, config)  # a wrong family or config is named before the missing tokenizers
  refiner_family = family == "sdxl-refiner"
  if config is None and (tokenizer_2 is None or (tokenizer is None and not refiner_family)):
    raise ValueError("the file holds no tokenizers: pass tokenizer= and tokenizer_2= (CLIP tokenizer folders; "
                     "a refiner only tokenizer_2=) or config= (a diffusers SDXL pipeline folder)")
  parts = read_sdxl_single_file(path, family=family, config=config)
  refiner = parts.text_config is None
  if config is not None:
    root = Path(config)
    tokenizer = None if refiner else (root / "tokenizer" if tokenizer is None else tokenizer)
    tokenizer_2 = root / "tokenizer_2" if tokenizer_2 is None else tokenizer_2
    scheduler = _io.read_config(root / "scheduler", name="scheduler_config.json")
    index = _io.read_config(root, name="model_index.json")
  else:
    tokenizer = None if refiner else tokenizer
    scheduler = _sdxl_scheduler()
    index = {"force_zeros_for_empty_prompt": not refiner, "requires_aesthetics_score": refiner}
  load = lambda t: t if t is None or isinstance(t, CLIPTokenizer) else CLIPTokenizer.from_pretrained(t)
  over = {} if dtype is None else {"dtype": dtype}
  vae = AutoencoderKL(dataclasses.replace(parts.vae_config, **over))
  method, implied = SCHEDULER_SAMPLERS.get(scheduler.get("_class_name"), ("ddim", {}))
  return StableDiffusionXL(
      unet=UNet(dataclasses.replace(parts.unet_config, **over)), unet_params=parts.unet_params, vae=vae,
      vae_params=parts.vae_params,
      text_encoder=None if refiner else CLIPTextModel(dataclasses.replace(parts.text_config, **over)),
      text_params=parts.text_params, tokenizer=load(tokenizer), schedule=schedule_from_config(scheduler),
      prediction=scheduler.get("prediction_type", "epsilon"), scaling_factor=float(vae.config.scaling_factor),
      shift_factor=float(vae.config.shift_factor or 0.0),
      sampler_options={**sampler_options_from_config(scheduler), **implied}, scheduler_config=scheduler,
      defaults={"sampler": method, "guidance_scale": 5.0},
      text_encoder_2=CLIPTextModel(dataclasses.replace(parts.text_config_2, **over)),
      text_params_2=parts.text_params_2, tokenizer_2=load(tokenizer_2),
      force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
      requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)))
