"""diffusers ``AutoencoderKL`` folders <-> jdiff :class:`~jdiff.models.AutoencoderKL` parameters.

Same naming rules as :mod:`jdiff.convert.unet`. Checkpoints written before diffusers renamed the
autoencoder's attention (``query``/``key``/``value``/``proj_attn``, sometimes as 1x1 convs) load too.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jdiff.convert import unet as _unet
from jdiff.models.configs import VAEConfig
from jdiff.models.vae import AutoencoderKL

__all__ = ["load_vae", "save_vae", "vae_param_shapes"]

_LEGACY = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
_RENAME = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename_legacy(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for name, value in tensors.items():
    m = _LEGACY.match(name)
    out[f"{m.group(1)}{_RENAME[m.group(2)]}.{m.group(3)}" if m else name] = value
  return out


def vae_param_shapes(config: VAEConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Every parameter path of an :class:`AutoencoderKL` with its shape (abstract, no allocation).

  Example:
    >>> sum(int(np.prod(s)) for s in vae_param_shapes(VAEConfig.sd15()).values())
    83653863
  """
  f = config.downsample_factor
  x = jnp.zeros((1, f, f, config.in_channels), jnp.float32)
  abstract = jax.eval_shape(lambda: AutoencoderKL(config).init(jax.random.key(0), x))
  return _unet._shapes(abstract)


def load_vae(path: str | os.PathLike, *, dtype: str | None = None,
             remat: bool = False) -> tuple[AutoencoderKL, dict[str, Any]]:
  """Loads a diffusers ``AutoencoderKL`` folder (or a pipeline root's ``vae/``).

  Args:
    path: folder with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or shards).
    dtype: compute dtype override ("bfloat16"); parameters are float32 either way.
    remat: rematerialise resnets (for training).

  Returns:
    ``(module, params)``; ``module.config.scaling_factor`` holds the latent scale.

  Raises:
    FileNotFoundError: missing folder, config or weights.
    ValueError: an unsupported config key, or the first missing / mis-shaped / unexpected tensor.

  Example:
    >>> vae, params = load_vae("sd15/vae")  # doctest: +SKIP
    >>> images = vae.apply({"params": params}, latents, method=vae.decode)  # doctest: +SKIP
  """
  overrides: dict[str, Any] = {"remat": remat}
  if dtype is not None:
    overrides["dtype"] = dtype
  config, params = _unet._load(path, "vae", VAEConfig.from_diffusers_config, vae_param_shapes,
                               overrides, legacy=_rename_legacy)
  return AutoencoderKL(config), params


def save_vae(module_or_config: AutoencoderKL | VAEConfig, params: Mapping[str, Any],
             path: str | os.PathLike, *, max_shard_size: int | str | None = None) -> Path:
  """Writes ``config.json`` + ``diffusion_pytorch_model.safetensors`` that diffusers'
  ``AutoencoderKL.from_pretrained`` loads.

  Raises:
    ValueError: ``params`` do not match the config (naming the first bad tensor).

  Example:
    >>> save_vae(vae, params, "out/vae")  # doctest: +SKIP
  """
  config = module_or_config.config if isinstance(module_or_config, AutoencoderKL) else module_or_config
  if not isinstance(config, VAEConfig):
    raise ValueError("save_vae needs an AutoencoderKL or VAEConfig, got "
                     f"{type(module_or_config).__name__}")
  return _unet._save(Path(path), config.to_diffusers_config(), params, vae_param_shapes(config),
                     max_shard_size)
