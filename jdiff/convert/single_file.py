"""Original-layout ("ldm") single-file Stable Diffusion checkpoints <-> jdiff parameter trees.

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

__all__ = ["FAMILIES", "SingleFileParts", "family_configs", "read_single_file", "write_single_file",
           "load_single_file_bundle", "save_single_file_bundle", "unet_original_name", "vae_original_name"]

FAMILIES = ("sd15", "sd21", "sd21-base")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
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
               "class_embedding": "label_emb"}
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


def _open_clip_to_transformers(tensors: Mapping[str, np.ndarray], config: CLIPTextConfig,
                               source: str) -> dict[str, np.ndarray]:
  """OpenCLIP tensors (prefix removed) -> transformers names, keeping the first ``num_hidden_layers`` of the
  ``num_hidden_layers + 1`` blocks."""
  n, d = config.num_hidden_layers, config.hidden_size
  blocks = sorted({int(m[1]) for k in tensors if (m := _OC_BLOCK.match(k))})
  if len(blocks) != n + 1:
    raise ValueError(f"{source}: the OpenCLIP text encoder has {len(blocks)} blocks; the config's text encoder "
                     f"takes {n}, and SD 2 files hold one more (SD 2 reads the penultimate block)")
  fixed = {v: k for k, v in _OC_FIXED.items()}
  rename = {v: k for k, v in _OC_RENAME.items()}
  out: dict[str, np.ndarray] = {}
  for key, value in tensors.items():
    if key in _IGNORED_TEXT["open_clip"]:
      continue
    if key in fixed:
      out[fixed[key]] = value
      continue
    m = _OC_BLOCK.match(key)
    if m is None:
      raise ValueError(f"{source}: unexpected text encoder tensor {OPENCLIP_PREFIX + key!r}")
    i, rest = int(m[1]), m[2]
    if i == n:
      continue  # the last block: SD 2 conditions on the penultimate one
    layer = f"text_model.encoder.layers.{i}."
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
      if value.shape[0] != 3 * d:
        raise ValueError(f"{source}: tensor {OPENCLIP_PREFIX + key!r} has shape {tuple(value.shape)}; a width-{d} "
                         f"encoder fuses q, k, v into {3 * d} rows")
      leaf = rest.rsplit("_", 1)[1]
      for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        out[f"{layer}self_attn.{proj}.{leaf}"] = value[j * d:(j + 1) * d]
      continue
    module, _, leaf = rest.rpartition(".")
    if module not in rename:
      raise ValueError(f"{source}: unexpected text encoder tensor {OPENCLIP_PREFIX + key!r}")
    out[f"{layer}{rename[module]}.{leaf}"] = value
  return out


def _transformers_to_open_clip(tensors: Mapping[str, np.ndarray], config: CLIPTextConfig) -> dict[str, np.ndarray]:
  """transformers names -> OpenCLIP tensors (prefix not added), with the identity last block and projection."""
  n, d = config.num_hidden_layers, config.hidden_size
  out: dict[str, np.ndarray] = {}
  for key, value in tensors.items():
    if key in _OC_FIXED:
      out[_OC_FIXED[key]] = value
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
  unet_config, vae_config, text_config = _configs(family, config)
  tensors, _ = _io.read_safetensors(path)
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

  unet_shapes = _unet.unet_param_shapes(unet_config)
  named = _renamed(unet, _expected(unet_shapes), lambda n: unet_original_name(n, unet_config), UNET_PREFIX,
                   "UNet", source)
  unet_params = _unet.params_from_torch(named, unet_shapes, source=source)
  vae_shapes = _vae.vae_param_shapes(vae_config)
  named = _renamed(vae, _expected(vae_shapes), lambda n: vae_original_name(n, vae_config), VAE_PREFIX,
                   "VAE", source)
  vae_params = _unet.params_from_torch(named, vae_shapes, source=source)
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
  text_shapes = _text.text_param_shapes(text_config)
  if any(p[0] == "text_projection" for p in text_shapes):
    raise ValueError("a text encoder with a projection head has no SD 1 / SD 2 single-file layout")
  text = _text.text_params_to_torch(dict(_unwrap(text_params)))
  expected = {"text_model." + _text._torch_name(p): (s[::-1] if p[-1] == "kernel" else s)
              for p, s in text_shapes.items()}
  _io.check_tensors(expected, text, source="text encoder params")
  if _TEXT_LAYOUT[family] == "clip":
    out.update({CLIP_PREFIX + k: v for k, v in text.items()})
  else:
    out.update({OPENCLIP_PREFIX + k: v for k, v in _transformers_to_open_clip(text, text_config).items()})
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
  """Writes a :class:`~jdiff.pipelines.StableDiffusion`'s UNet, VAE and text encoder as one original-layout
  ``.safetensors`` file (:func:`write_single_file`). The tokenizer and scheduler are not part of the layout.

  Args:
    bundle: the pipeline bundle.
    path: the output file.
    family: the layout's family (see :func:`write_single_file`); None picks "sd15" for a text encoder with
      OpenAI CLIP's quick_gelu and "sd21" (OpenCLIP layout) for one with gelu.
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
  if isinstance(bundle.unet, TextUNet) and bundle.unet.config.class_embed_type:
    raise ValueError(f"a UNet with class_embed_type={bundle.unet.config.class_embed_type!r} reading the pooled "
                     "text has no Stable Diffusion single-file layout")
  text_config = bundle.text_encoder.config
  if family is None:
    family = "sd21" if text_config.hidden_act == "gelu" else "sd15"
  return write_single_file(path, bundle.unet_params, bundle.vae_params, bundle.text_params,
                           unet_config=bundle.unet.config, vae_config=bundle.vae.config, text_config=text_config,
                           family=family, dtype=dtype)
