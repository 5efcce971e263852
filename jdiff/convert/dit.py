"""diffusers ``DiTTransformer2DModel`` / ``SD3Transformer2DModel`` folders <-> jdiff :class:`~jdiff.models.DiT` /
:class:`~jdiff.models.MMDiT` parameters.

Same naming rules as :mod:`jdiff.convert.unet` (``transformer_blocks_0/attn/to_out_0/kernel`` is
``transformer_blocks.0.attn.to_out.0.weight``; dense kernels transposed, the patch projection's HWIO
kernel stored OIHW). SD3 checkpoints also hold the position-embedding table ``pos_embed.pos_embed``
(a buffer, not a parameter): loading checks it against jdiff's recomputation, saving writes the
recomputed table.

Example:
  >>> dit, params = load_dit("DiT-XL-2-256/transformer")  # doctest: +SKIP
  >>> net, params = load_sd3_transformer("sd3-medium")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jdiff.convert import _io
from jdiff.convert.unet import params_from_torch, params_to_torch, torch_name
from jdiff.models.dit import DiT, DiTConfig
from jdiff.models.mmdit import MMDiT, SD3Config, sd3_pos_embed

__all__ = ["load_dit", "save_dit", "dit_param_shapes", "load_sd3_transformer", "save_sd3_transformer",
           "sd3_param_shapes", "POS_EMBED_KEY"]

DIFFUSERS_VERSION = "0.30.0"  # written into saved configs; diffusers >= 0.30 has both classes
POS_EMBED_KEY = "pos_embed.pos_embed"
_DIT_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
_SD3_CLASSES = ("SD3Transformer2DModel",)
# The stored table and jdiff's recomputation are both float32 roundings of the same float64 sines of
# the same float32 coordinates; they may differ by the last bits of the float64 sin/pow of two libms.
_POS_EMBED_ATOL = 1e-6


def _shapes(abstract: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract["params"]).items()}


def dit_param_shapes(config: DiTConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Every parameter path of a :class:`DiT` with its shape (abstract, no allocation).

  Example:
    >>> sum(int(np.prod(s)) for s in dit_param_shapes(DiTConfig.tiny()).values())  # doctest: +SKIP
  """
  p = config.patch_size
  x = jnp.zeros((1, p, p, config.in_channels), jnp.float32)
  t, y = jnp.zeros((1,), jnp.float32), jnp.zeros((1,), jnp.int32)
  return _shapes(jax.eval_shape(lambda: DiT(config).init(jax.random.key(0), x, t, y)))


def sd3_param_shapes(config: SD3Config) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Every parameter path of an :class:`MMDiT` with its shape (abstract, no allocation)."""
  p = config.patch_size
  x = jnp.zeros((1, p, p, config.in_channels), jnp.float32)
  t = jnp.zeros((1,), jnp.float32)
  ctx = jnp.zeros((1, 1, config.joint_attention_dim), jnp.float32)
  pooled = jnp.zeros((1, config.pooled_projection_dim), jnp.float32)
  return _shapes(jax.eval_shape(lambda: MMDiT(config).init(jax.random.key(0), x, t, ctx, pooled)))


def _resolve(path: str | os.PathLike) -> Path:
  folder = Path(path)
  _io.refuse_pickle(folder, what="transformer checkpoint")
  if not (folder / "config.json").is_file() and (folder / "transformer" / "config.json").is_file():
    return folder / "transformer"  # a diffusers pipeline root
  return folder


def _read(path: str | os.PathLike, classes: tuple[str, ...], kind: str) -> tuple[Path, dict[str, Any]]:
  folder = _resolve(path)
  raw = _io.read_config(folder)
  name = raw.get("_class_name")
  if name is not None and name not in classes:
    raise ValueError(f"{str(folder)!r} holds a {name}, not a {kind} ({' or '.join(classes)})")
  return folder, raw


def _overrides(dtype: str | None, remat: bool | str) -> dict[str, Any]:
  return {"remat": remat, **({} if dtype is None else {"dtype": dtype})}


def _check_config(config: Any, cls: type, fn: str) -> Any:
  if not isinstance(config, cls):
    raise ValueError(f"{fn} needs a {cls.__name__} or its module, got {type(config).__name__}")
  return config


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  if path[-1] == "kernel" and len(shape) == 4:  # HWIO -> OIHW
    return (shape[3], shape[2], shape[0], shape[1])
  if path[-1] == "kernel" and len(shape) == 2:  # (in, out) -> (out, in)
    return (shape[1], shape[0])
  return tuple(shape)


def _write(folder: Path, config_dict: dict[str, Any], params: Mapping[str, Any],
           shapes: Mapping[tuple[str, ...], tuple[int, ...]], max_shard_size,
           extra: Mapping[str, np.ndarray] | None = None) -> Path:
  tensors = params_to_torch(params)
  _io.check_tensors({torch_name(p): _torch_shape(p, s) for p, s in shapes.items()}, tensors, source="params")
  _io.write_config(folder, {**config_dict, "_diffusers_version": DIFFUSERS_VERSION})
  _io.save_tensors({**tensors, **dict(extra or {})}, folder, max_shard_size=max_shard_size)
  return folder


def load_dit(path: str | os.PathLike, *, dtype: str | None = None,
             remat: bool | str = False) -> tuple[DiT, dict[str, Any]]:
  """Loads a diffusers ``DiTTransformer2DModel`` folder (or a pipeline root's ``transformer/``).

  Args:
    path: folder with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or shards).
    dtype: compute dtype override ("bfloat16"); parameters are float32 either way.
    remat: rematerialise blocks (for training).

  Returns:
    ``(module, params)``: a :class:`~jdiff.models.DiT` and its float32 parameter tree.

  Raises:
    FileNotFoundError: missing folder, config or weights (pickle files are never read).
    ValueError: an unsupported config key, or the first missing / mis-shaped / unexpected tensor.

  Example:
    >>> dit, params = load_dit("DiT-XL-2-256")  # doctest: +SKIP
    >>> out = dit.apply({"params": params}, x, t, labels)  # doctest: +SKIP
  """
  folder, raw = _read(path, _DIT_CLASSES, "DiT transformer")
  config = DiTConfig.from_diffusers_config(raw, **_overrides(dtype, remat))
  params = params_from_torch(_io.load_tensors(folder), dit_param_shapes(config), source=str(folder))
  return DiT(config), params


def save_dit(module_or_config: DiT | DiTConfig, params: Mapping[str, Any], path: str | os.PathLike, *,
             max_shard_size: int | str | None = None) -> Path:
  """Writes ``config.json`` + ``diffusion_pytorch_model.safetensors`` that diffusers'
  ``DiTTransformer2DModel.from_pretrained`` loads.

  Raises:
    ValueError: ``params`` do not match the config (naming the first bad tensor).

  Example:
    >>> save_dit(dit, params, "out/transformer")  # doctest: +SKIP
  """
  config = module_or_config.config if isinstance(module_or_config, DiT) else module_or_config
  _check_config(config, DiTConfig, "save_dit")
  return _write(Path(path), config.to_diffusers_config(), params, dit_param_shapes(config), max_shard_size)


def _sd3_table(config: SD3Config) -> np.ndarray:
  """The full [1, max^2, D] position-embedding table SD3 checkpoints store as ``pos_embed.pos_embed``."""
  m = config.pos_embed_max_size
  return sd3_pos_embed(config, m, m)[None]


def load_sd3_transformer(path: str | os.PathLike, *, dtype: str | None = None,
                         remat: bool | str = False) -> tuple[MMDiT, dict[str, Any]]:
  """Loads a diffusers ``SD3Transformer2DModel`` folder (or a pipeline root's ``transformer/``).

  The stored position-embedding table must equal the sin-cos table jdiff recomputes (within the last
  bits of float32); a different table (a learned one) is refused.

  Returns:
    ``(module, params)``: an :class:`~jdiff.models.MMDiT` and its float32 parameter tree.

  Raises:
    FileNotFoundError: missing folder, config or weights (pickle files are never read).
    ValueError: an unsupported config key, a missing / mis-shaped / unexpected tensor, or a position
      table that is not the sin-cos one.

  Example:
    >>> net, params = load_sd3_transformer("stable-diffusion-3-medium-diffusers")  # doctest: +SKIP
  """
  folder, raw = _read(path, _SD3_CLASSES, "SD3 transformer")
  config = SD3Config.from_diffusers_config(raw, **_overrides(dtype, remat))
  tensors = dict(_io.load_tensors(folder))
  table = tensors.pop(POS_EMBED_KEY, None)
  if table is not None:
    want = _sd3_table(config)
    if table.shape != want.shape:
      raise ValueError(f"{folder}: tensor {POS_EMBED_KEY!r} has shape {table.shape}, expected {want.shape}")
    err = float(np.max(np.abs(np.asarray(table, np.float64) - want)))
    if err > _POS_EMBED_ATOL:
      raise ValueError(f"{folder}: {POS_EMBED_KEY!r} differs from the 2-D sin-cos table by {err:.3g}; jdiff "
                       "recomputes that table and does not load learned position embeddings")
  params = params_from_torch(tensors, sd3_param_shapes(config), source=str(folder))
  return MMDiT(config), params


def save_sd3_transformer(module_or_config: MMDiT | SD3Config, params: Mapping[str, Any], path: str | os.PathLike,
                         *, max_shard_size: int | str | None = None) -> Path:
  """Writes a folder that diffusers' ``SD3Transformer2DModel.from_pretrained`` loads (with the
  ``pos_embed.pos_embed`` table diffusers keeps as a persistent buffer).

  Raises:
    ValueError: ``params`` do not match the config (naming the first bad tensor).

  Example:
    >>> save_sd3_transformer(net, params, "out/transformer")  # doctest: +SKIP
  """
  config = module_or_config.config if isinstance(module_or_config, MMDiT) else module_or_config
  _check_config(config, SD3Config, "save_sd3_transformer")
  return _write(Path(path), config.to_diffusers_config(), params, sd3_param_shapes(config), max_shard_size,
                extra={POS_EMBED_KEY: _sd3_table(config)})
