"""diffusers ``ControlNetModel`` folders <-> jdiff :class:`~jdiff.models.controlnet.ControlNet` parameters."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jdiff.convert import _io
from jdiff.convert import unet as _unet
from jdiff.models.configs import UNetConfig
from jdiff.models.controlnet import ControlNet, ControlNetConfig

__all__ = ["load_controlnet", "load_controlnets", "save_controlnet", "controlnet_param_shapes"]

_CN_LIST = re.compile(r"^(controlnet_down_blocks|blocks)_(\d+)$")


def _path(path: tuple[str, ...]) -> tuple[str, ...]:
  """Spells ControlNet-only list entries the way diffusers names them; the rest follows the UNet rules."""
  return tuple(_CN_LIST.sub(r"\1.\2", p) for p in path)


def controlnet_param_shapes(config: ControlNetConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Every parameter path with its shape, computed abstractly."""
  u = config.unet
  f = 2 ** (u.num_levels - 1)
  x = jnp.zeros((1, f, f, u.in_channels))
  hint = jnp.zeros((1, f * config.hint_downsample, f * config.hint_downsample, config.conditioning_channels))
  ctx = jnp.zeros((1, 1, u.per_block("cross_attention_dim")[0]))
  kw = _unet.embedding_inputs(u)  # class labels, SDXL's text_embeds / time_ids
  abstract = jax.eval_shape(lambda: ControlNet(config).init(jax.random.key(0), x, jnp.zeros((1,)), ctx, hint, **kw))
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract["params"]).items()}


def load_controlnet(path: str | os.PathLike, *, dtype: str | None = None) -> tuple[ControlNet, dict[str, Any]]:
  """Loads a diffusers ``ControlNetModel`` folder: ``(module, params)``.

  Raises:
    FileNotFoundError: missing folder, config or weights.
    ValueError: an unsupported config key, or the first missing / mis-shaped / unexpected tensor.
  """
  folder = Path(path)
  overrides = {} if dtype is None else {"dtype": dtype}
  config = ControlNetConfig.from_diffusers_config(_io.read_config(folder), **overrides)
  tensors = _io.load_tensors(folder)
  shapes = controlnet_param_shapes(config)
  expected = {_unet.torch_name(_path(p)): _unet._torch_shape(p, s) for p, s in shapes.items()}
  _io.check_tensors(expected, tensors, source=str(folder))
  flat = {p: np.asarray(_unet._to_jdiff(p, np.asarray(tensors[_unet.torch_name(_path(p))], np.float32)))
          for p in shapes}
  return ControlNet(config), traverse_util.unflatten_dict(flat)


def save_controlnet(module_or_config: ControlNet | ControlNetConfig, params: Mapping[str, Any],
                    path: str | os.PathLike) -> Path:
  """Writes a folder that diffusers' ``ControlNetModel.from_pretrained`` loads."""
  config = module_or_config.config if isinstance(module_or_config, ControlNet) else module_or_config
  flat = traverse_util.flatten_dict(dict(params))
  shapes = controlnet_param_shapes(config)
  tensors = {_unet.torch_name(_path(p)): np.ascontiguousarray(_unet._to_torch(p, np.asarray(v, np.float32)))
             for p, v in flat.items()}
  expected = {_unet.torch_name(_path(p)): _unet._torch_shape(p, s) for p, s in shapes.items()}
  _io.check_tensors(expected, tensors, source="params")
  folder = Path(path)
  _io.write_config(folder, {**config.to_diffusers_config(), "_diffusers_version": _unet.DIFFUSERS_VERSION})
  _io.save_tensors(tensors, folder)
  return folder


def load_controlnets(folders: str | os.PathLike | Sequence[str | os.PathLike], unet_config: UNetConfig, *,
                     dtype: str | None = None) -> tuple[tuple[ControlNet, ...], tuple[dict[str, Any], ...]]:
  """Loads one ``ControlNetModel`` folder or a list of them for a pipeline whose UNet has ``unet_config``.

  Returns:
    ``(nets, params)``, one entry per folder.

  Raises:
    FileNotFoundError: a missing folder (named).
    ValueError: a net whose widths or additional embedding ("text_time" for SDXL) differ from the UNet's.

  Example:
    >>> nets, params = load_controlnets(["cn-canny", "cn-depth"], pipe.unet.config)  # doctest: +SKIP
  """
  nets, params = [], []
  for folder in [folders] if isinstance(folders, (str, os.PathLike)) else list(folders):
    if not Path(folder).is_dir():
      raise FileNotFoundError(f"ControlNet folder {str(folder)!r} does not exist")
    net, p = load_controlnet(folder, dtype=dtype)
    cfg = net.config.unet
    if cfg.block_out_channels != unet_config.block_out_channels:
      raise ValueError(f"ControlNet {str(folder)!r} has block_out_channels {cfg.block_out_channels}, the UNet "
                       f"{unet_config.block_out_channels}")
    mine = (cfg.addition_embed_type, cfg.projection_class_embeddings_input_dim)
    theirs = (unet_config.addition_embed_type, unet_config.projection_class_embeddings_input_dim)
    if cfg.addition_embed_type != unet_config.addition_embed_type or (cfg.addition_embed_type and mine != theirs):
      raise ValueError(f"ControlNet {str(folder)!r} has addition_embed_type={mine[0]!r} with "
                       f"projection_class_embeddings_input_dim={mine[1]}, the UNet {theirs[0]!r} with {theirs[1]} "
                       "(an SD 1.x/2.x ControlNet on SDXL, or the reverse)")
    nets.append(net)
    params.append(p)
  return tuple(nets), tuple(params)
