"""diffusers ``UNet2DConditionModel`` folders <-> jdiff :class:`~jdiff.models.UNet` parameters.

The mapping is mechanical: a jdiff parameter path ``("down_blocks_0", "attentions_0", "proj_in",
"kernel")`` is the diffusers tensor ``down_blocks.0.attentions.0.proj_in.weight``; conv kernels are
stored HWIO here and OIHW there, dense kernels (in, out) here and (out, in) there. The same rules
serve the autoencoder (:mod:`jdiff.convert.vae`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jdiff.convert import _io
from jdiff.models.configs import UNetConfig
from jdiff.models.unet import UNet

__all__ = ["load_unet", "save_unet", "unet_param_shapes", "torch_name", "params_from_torch",
           "params_to_torch"]

DIFFUSERS_VERSION = "0.30.0"  # written into saved configs; any diffusers >= 0.30 reads them
_LIST = re.compile(r"^(down_blocks|up_blocks|resnets|attentions|transformer_blocks|downsamplers|"
                   r"upsamplers|to_out|net)_(\d+)$")
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def torch_name(path: tuple[str, ...]) -> str:
  """The diffusers tensor name of a jdiff parameter path.

  Example:
    >>> torch_name(("down_blocks_0", "attentions_0", "proj_in", "kernel"))
    'down_blocks.0.attentions.0.proj_in.weight'
  """
  parts: list[str] = []
  for p in path[:-1]:
    m = _LIST.match(p)
    parts.extend([m.group(1), m.group(2)] if m else [p])
  if path[-1] not in _LEAF:
    raise ValueError(f"no diffusers name for parameter {'/'.join(path)}")
  parts.append(_LEAF[path[-1]])
  return ".".join(parts)


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  if path[-1] == "kernel" and len(shape) == 4:  # HWIO -> OIHW
    return (shape[3], shape[2], shape[0], shape[1])
  if path[-1] == "kernel" and len(shape) == 2:  # (in, out) -> (out, in)
    return (shape[1], shape[0])
  return tuple(shape)


def _to_jdiff(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel" and array.ndim == 4:
    return np.transpose(array, (2, 3, 1, 0))
  if path[-1] == "kernel" and array.ndim == 2:
    return array.T
  return array


def _to_torch(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel" and array.ndim == 4:
    return np.transpose(array, (3, 2, 0, 1))
  if path[-1] == "kernel" and array.ndim == 2:
    return array.T
  return array


def _shapes(abstract: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
  params = abstract["params"] if "params" in abstract else abstract
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(params).items()}


def embedding_inputs(config: UNetConfig) -> dict[str, jax.Array]:
  """Example keyword inputs (batch 1, zeros) for the class and additional embeddings of ``config``:
  what shape-only initialisation of a UNet (or of a ControlNet copying its encoder) needs."""
  kwargs: dict[str, jax.Array] = {}
  kind = config.class_embed_type
  if kind is None and config.num_class_embeds is not None:
    kwargs["class_labels"] = jnp.zeros((1,), jnp.int32)
  elif kind == "timestep":
    kwargs["class_labels"] = jnp.zeros((1,), jnp.float32)
  elif kind in ("projection", "simple_projection"):
    kwargs["class_labels"] = jnp.zeros((1, config.projection_class_embeddings_input_dim), jnp.float32)
  elif kind == "identity":
    kwargs["class_labels"] = jnp.zeros((1, config.time_embed_dim), jnp.float32)
  if config.addition_embed_type == "text_time":  # any split of the MLP's input width will do
    kwargs["text_embeds"] = jnp.zeros((1, config.projection_class_embeddings_input_dim), jnp.float32)
    kwargs["time_ids"] = jnp.zeros((1, 0), jnp.float32)
  return kwargs


def unet_param_shapes(config: UNetConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Every parameter path of a :class:`UNet` with its shape, computed abstractly (no allocation).

  Example:
    >>> shapes = unet_param_shapes(UNetConfig.sd15())
    >>> sum(int(np.prod(s)) for s in shapes.values())
    859520964
  """
  f = 2 ** (config.num_levels - 1)
  x = jnp.zeros((1, f, f, config.in_channels), jnp.float32)
  t = jnp.zeros((1,), jnp.float32)
  ctx = jnp.zeros((1, 1, config.per_block("cross_attention_dim")[0]), jnp.float32)
  kwargs = embedding_inputs(config)
  if config.time_cond_proj_dim is not None:
    kwargs["timestep_cond"] = jnp.zeros((1, config.time_cond_proj_dim), jnp.float32)
  module = UNet(config)
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), x, t, ctx, **kwargs))
  return _shapes(abstract)


def params_from_torch(tensors: Mapping[str, np.ndarray],
                      shapes: Mapping[tuple[str, ...], tuple[int, ...]], *,
                      source: str = "checkpoint") -> dict[str, Any]:
  """Builds a jdiff parameter tree from diffusers tensors, checking names and shapes.

  Args:
    tensors: diffusers name -> array (e.g. from :func:`jdiff.convert._io.load_tensors`).
    shapes: jdiff path -> shape, from :func:`unet_param_shapes` or ``vae_param_shapes``.
    source: where ``tensors`` came from, for error messages.

  Raises:
    ValueError: naming the first missing, mis-shaped or unexpected tensor.

  Example:
    >>> params = params_from_torch(_io.load_tensors(folder), unet_param_shapes(cfg))  # doctest: +SKIP
  """
  tensors = dict(tensors)
  expected: dict[str, tuple[int, ...]] = {}
  for path, shape in shapes.items():
    name = torch_name(path)
    want = _torch_shape(path, shape)
    expected[name] = want
    got = tensors.get(name)
    # Old checkpoints store some linear layers as 1x1 convs (O, I, 1, 1).
    if got is not None and len(want) == 2 and got.ndim == 4 and got.shape[2:] == (1, 1):
      tensors[name] = got[:, :, 0, 0]
  _io.check_tensors(expected, tensors, source=source)
  flat = {path: np.asarray(_to_jdiff(path, np.asarray(tensors[torch_name(path)], np.float32)))
          for path in shapes}
  return traverse_util.unflatten_dict(flat)


def params_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flattens a jdiff parameter tree to diffusers names and layouts (float32 numpy).

  Example:
    >>> tensors = params_to_torch(params)  # doctest: +SKIP
    >>> tensors["conv_in.weight"].shape  # doctest: +SKIP
    (320, 4, 3, 3)
  """
  flat = traverse_util.flatten_dict(_unwrap(params))
  return {torch_name(path): np.ascontiguousarray(_to_torch(path, np.asarray(value, np.float32)))
          for path, value in flat.items()}


def _unwrap(params: Mapping[str, Any]) -> Mapping[str, Any]:
  if set(params) == {"params"}:
    return params["params"]
  return params


def _resolve(path: str | os.PathLike, sub: str) -> Path:
  folder = Path(path)
  if not (folder / "config.json").is_file() and (folder / sub / "config.json").is_file():
    return folder / sub  # a diffusers pipeline root
  return folder


def _save(folder: Path, config_dict: dict[str, Any], params: Mapping[str, Any],
          shapes: Mapping[tuple[str, ...], tuple[int, ...]], max_shard_size) -> Path:
  tensors = params_to_torch(params)
  expected = {torch_name(p): _torch_shape(p, s) for p, s in shapes.items()}
  _io.check_tensors(expected, tensors, source="params")
  _io.write_config(folder, {**config_dict, "_diffusers_version": DIFFUSERS_VERSION})
  _io.save_tensors(tensors, folder, max_shard_size=max_shard_size)
  return folder


def _load(path: str | os.PathLike, sub: str, from_config: Callable[..., Any],
          shapes_fn: Callable[[Any], Mapping], overrides: dict[str, Any],
          legacy: Callable[[dict], dict] | None = None):
  folder = _resolve(path, sub)
  config = from_config(_io.read_config(folder), **overrides)
  tensors = _io.load_tensors(folder)
  if legacy is not None:
    tensors = legacy(tensors)
  params = params_from_torch(tensors, shapes_fn(config), source=str(folder))
  return config, params


def load_unet(path: str | os.PathLike, *, dtype: str | None = None,
              remat: bool = False) -> tuple[UNet, dict[str, Any]]:
  """Loads a diffusers ``UNet2DConditionModel`` folder (or a pipeline root's ``unet/``).

  Args:
    path: folder with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or shards).
    dtype: compute dtype override ("bfloat16"); parameters are float32 either way.
    remat: rematerialise blocks (for training).

  Returns:
    ``(module, params)``: a :class:`~jdiff.models.UNet` and its float32 parameter tree.

  Raises:
    FileNotFoundError: missing folder, config or weights.
    ValueError: an unsupported config key, or the first missing / mis-shaped / unexpected tensor.

  Example:
    >>> unet, params = load_unet("sd15/unet")  # doctest: +SKIP
    >>> eps = unet.apply({"params": params}, x, t, text_emb)  # doctest: +SKIP
  """
  overrides: dict[str, Any] = {"remat": remat}
  if dtype is not None:
    overrides["dtype"] = dtype
  config, params = _load(path, "unet", UNetConfig.from_diffusers_config, unet_param_shapes, overrides)
  return UNet(config), params


def save_unet(module_or_config: UNet | UNetConfig, params: Mapping[str, Any], path: str | os.PathLike,
              *, max_shard_size: int | str | None = None) -> Path:
  """Writes ``config.json`` + ``diffusion_pytorch_model.safetensors`` that diffusers'
  ``UNet2DConditionModel.from_pretrained`` loads.

  Args:
    module_or_config: the :class:`UNet` or its config.
    params: the parameter tree (``{"params": ...}`` accepted too).
    path: output folder (created).
    max_shard_size: shard above this size (``"5GB"``), as ``save_pretrained`` does.

  Returns:
    The folder.

  Raises:
    ValueError: ``params`` do not match the config (naming the first bad tensor).

  Example:
    >>> save_unet(unet, params, "out/unet")  # doctest: +SKIP
  """
  config = module_or_config.config if isinstance(module_or_config, UNet) else module_or_config
  if not isinstance(config, UNetConfig):
    raise ValueError(f"save_unet needs a UNet or UNetConfig, got {type(module_or_config).__name__}")
  return _save(Path(path), config.to_diffusers_config(), params, unet_param_shapes(config),
               max_shard_size)
