"""transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` folders <-> jdiff
:class:`~jdiff.models.text.CLIPTextModel` parameters.

A folder holds ``config.json`` and ``model.safetensors`` (or shards with an index), as written by
``save_pretrained`` or found under ``text_encoder/`` / ``text_encoder_2/`` of a diffusers pipeline. Tensor
names may carry the ``text_model.`` prefix (hub checkpoints, transformers < 5) or not (transformers 5); both
load. :func:`save_text_encoder` writes the prefixed form, which every transformers version reads. The
projection of ``CLIPTextModelWithProjection`` (config ``architectures``) is ``text_projection.weight``,
never prefixed.

Name mapping (torch -> flax): ``encoder.layers.3.mlp.fc1.weight`` -> ``encoder/layers_3/mlp/fc1/kernel``
(transposed); LayerNorm ``weight`` -> ``scale``; embedding ``weight`` -> ``embedding``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jdiff.convert import _io
from jdiff.models.text import CLIPTextConfig, CLIPTextModel

__all__ = ["load_text_encoder", "save_text_encoder", "text_params_from_torch", "text_params_to_torch",
           "text_param_shapes"]

_PREFIX = "text_model."
_PROJECTION = "text_projection"  # CLIPTextModelWithProjection's head: outside text_model
_IGNORED = ("embeddings.position_ids",)  # a buffer older transformers versions saved


def _torch_name(path: tuple[str, ...]) -> str:
  *mods, leaf = path
  mods = [re.sub(r"^layers_(\d+)$", r"layers.\1", m) for m in mods]
  leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
  return ".".join([*mods, leaf])


def _saved_name(path: tuple[str, ...], prefix: str) -> str:
  return _torch_name(path) if path[0] == _PROJECTION else prefix + _torch_name(path)


def text_param_shapes(config: CLIPTextConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flax parameter path -> shape for ``config``, computed abstractly (nothing is allocated)."""
  model = CLIPTextModel(config)
  ids = jax.ShapeDtypeStruct((1, config.max_position_embeddings), jnp.int32)
  shapes = jax.eval_shape(lambda i: model.init(jax.random.key(0), i)["params"], ids)
  return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(shapes).items()}


def text_params_from_torch(tensors: dict[str, np.ndarray], config: CLIPTextConfig, *,
                           source: str = "checkpoint") -> dict[str, Any]:
  """Converts a transformers state dict (numpy arrays) into the jdiff parameter tree.

  Raises:
    ValueError: naming the first missing, mis-shaped or unexpected tensor.

  Example:
    >>> params = text_params_from_torch(load_tensors(folder, "model"), config)  # doctest: +SKIP
  """
  tensors = {(k[len(_PREFIX):] if k.startswith(_PREFIX) else k): v for k, v in tensors.items()}
  tensors = {k: v for k, v in tensors.items() if k not in _IGNORED}
  shapes = text_param_shapes(config)
  expected = {}
  for path, shape in shapes.items():
    expected[_torch_name(path)] = shape[::-1] if path[-1] == "kernel" else shape
  _io.check_tensors(expected, tensors, source=source)
  flat = {}
  for path in shapes:
    value = np.asarray(tensors[_torch_name(path)], np.float32)
    flat[path] = jnp.asarray(value.T if path[-1] == "kernel" else value)
  return traverse_util.unflatten_dict(flat)


def text_params_to_torch(params: dict[str, Any], *, prefix: str = _PREFIX) -> dict[str, np.ndarray]:
  """The transformers state dict (float32 numpy, ``text_model.``-prefixed) of a jdiff parameter tree."""
  out = {}
  for path, value in traverse_util.flatten_dict(params).items():
    value = np.asarray(jax.device_get(value), np.float32)
    out[_saved_name(path, prefix)] = value.T if path[-1] == "kernel" else value
  return out


def _resolve(path: str | os.PathLike) -> Path:
  folder = Path(path)
  if not (folder / "config.json").is_file() and (folder / "text_encoder" / "config.json").is_file():
    return folder / "text_encoder"  # a diffusers pipeline root
  return folder


def load_text_encoder(path: str | os.PathLike, *, dtype: str | None = None,
                      remat: bool = False) -> tuple[CLIPTextModel, dict[str, Any]]:
  """Loads a transformers CLIP text encoder folder (or a diffusers pipeline root's ``text_encoder/``);
  a ``CLIPTextModelWithProjection`` folder (e.g. SDXL's ``text_encoder_2/``) loads with its projection.

  Args:
    path: folder with ``config.json`` and ``model.safetensors`` (or shards).
    dtype: compute dtype override ("bfloat16"); parameters are float32 either way.
    remat: rematerialise blocks (for fine-tuning the encoder).

  Returns:
    ``(module, params)``: a :class:`CLIPTextModel` and its float32 parameter tree.

  Raises:
    FileNotFoundError: missing folder, config or weights (pickle-only folders included).
    ValueError: unsupported config or the first missing / mis-shaped tensor.

  Example:
    >>> model, params = load_text_encoder("sd15/text_encoder")  # doctest: +SKIP
    >>> out = model.apply({"params": params}, ids)  # doctest: +SKIP
  """
  folder = _resolve(path)
  overrides: dict[str, Any] = {"remat": remat}
  if dtype is not None:
    overrides["dtype"] = dtype
  config = CLIPTextConfig.from_hf_config(_io.read_config(folder), **overrides)
  tensors = _io.load_tensors(folder, prefix="model")
  params = text_params_from_torch(tensors, config, source=str(folder))
  return CLIPTextModel(config), params


def save_text_encoder(model: CLIPTextModel | CLIPTextConfig, params: dict[str, Any], path: str | os.PathLike,
                      *, max_shard_size: int | str | None = None) -> Path:
  """Writes ``config.json`` + ``model.safetensors`` that ``transformers.CLIPTextModel.from_pretrained`` loads
  (``CLIPTextModelWithProjection.from_pretrained`` when the config has ``projection_dim``).

  Args:
    model: the module or its config (with ``projection_dim``: a ``CLIPTextModelWithProjection`` folder).
    params: the parameter tree (``{"params": ...}`` accepted too).
    path: output folder (created).
    max_shard_size: shard above this size (``"5GB"``), as ``save_pretrained`` does.

  Returns:
    The folder.

  Example:
    >>> save_text_encoder(model, params, "out/text_encoder")  # doctest: +SKIP
  """
  config = model.config if isinstance(model, CLIPTextModel) else model
  if not isinstance(config, CLIPTextConfig):
    raise ValueError(f"save_text_encoder needs a CLIPTextModel or CLIPTextConfig, got {type(model).__name__}")
  if set(params) == {"params"}:
    params = params["params"]
  folder = Path(path)
  tensors = text_params_to_torch(params)
  expected = {}
  for p, shape in text_param_shapes(config).items():
    expected[_saved_name(p, _PREFIX)] = shape[::-1] if p[-1] == "kernel" else shape
  _io.check_tensors(expected, tensors, source="params")
  _io.write_config(folder, config.to_hf_config())
  _io.save_tensors(tensors, folder, prefix="model", max_shard_size=max_shard_size)
  return folder
