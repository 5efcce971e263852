"""LoRA as a transformation of a parameter pytree (Hu et al., 2021).

A low-rank adapter adds ``(alpha / r) * down @ up`` to selected kernels: W' = W + (alpha/r) A B with
A = ``down`` [in, r] randomly initialised and B = ``up`` [r, out] zero-initialised, so a fresh
adapter leaves the model unchanged. Convolution kernels [kh, kw, in, out] are adapted LoCon-style:
``down`` is a [kh, kw, in, r] convolution followed by a 1x1 ``up`` [r, out].

Nothing here knows about layers: :func:`init` selects kernels by parameter-path patterns, and
:func:`merge` returns a new parameter tree, so LoRA applies to any Flax model unchanged and the
base parameters are never written. Training differentiates only ``LoRA.factors``.

Example:
  >>> adapter = lora.init(params, key=key, rank=8, alpha=32)
  >>> out = unet.apply({"params": lora.merge(params, adapter)}, x, t, emb)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

__all__ = [
    "DEFAULT_TARGETS",
    "LoraConfig",
    "LoRA",
    "init",
    "merge",
    "unmerge",
    "merge_many",
    "delta",
    "num_params",
    "target_paths",
    "save_diffusers",
    "load_diffusers",
    "load_kohya",
    "save_kohya",
    "load",
]

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out")
Params = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA hyper-parameters (the seed's PEFT ``LoraConfig``: r, lora_alpha, target_modules, dropout)."""

  rank: int = 4
  alpha: float = 4.0
  targets: tuple[str, ...] = DEFAULT_TARGETS
  dropout: float = 0.0

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
    if isinstance(self.targets, str):
      object.__setattr__(self, "targets", (self.targets,))


@flax.struct.dataclass
class LoRA:
  """An adapter: ``factors[path] = {"down": A, "up": B}`` and the static per-path scale alpha / r.

  ``path`` is the "/"-joined path of the adapted kernel in the parameter tree.
  """

  factors: dict[str, dict[str, jax.Array]]
  scales: tuple[tuple[str, float], ...] = flax.struct.field(pytree_node=False)

  @property
  def paths(self) -> list[str]:
    return sorted(self.factors)

  def scale_of(self, path: str) -> float:
    return dict(self.scales)[path]

  @property
  def rank(self) -> int:
    return max(int(f["up"].shape[0]) for f in self.factors.values())


def _flat(params: Params) -> dict[str, Any]:
  return traverse_util.flatten_dict(dict(params), sep="/")


def _matches(path: str, target: str) -> bool:
  """``target`` names a module (``to_q`` also matches list entries ``to_q_0``) or is a regex."""
  if re.search(rf"(^|/){target}(_\d+)?/kernel$", path):
    return True
  return False


def target_paths(params: Params, targets: Iterable[str] = DEFAULT_TARGETS) -> list[str]:
  """The "/"-joined paths of the dense (2-D) and conv (4-D) kernels that ``targets`` select."""
  targets = (targets,) if isinstance(targets, str) else tuple(targets)
  out = []
  for path, leaf in _flat(params).items():
    if path.endswith("kernel") and jnp.ndim(leaf) in (2, 4) and any(_matches(path, t) for t in targets):
      out.append(path)
  return sorted(out)


def init(params: Params, *, key: jax.Array, rank: int = 4, alpha: float | None = None,
         targets: Iterable[str] = DEFAULT_TARGETS, dtype=jnp.float32) -> LoRA:
  """Creates a zero-effect adapter for the kernels of ``params`` selected by ``targets``.

  Args:
    key: PRNG key for the down projections.
    params: the base parameter tree (not modified).
    rank: r.
    alpha: scaling numerator; the update is (alpha / r) * down @ up. Defaults to ``rank``.
    targets: module names or regexes over "/"-joined parameter paths.
    dtype: dtype of the factors.

  Returns:
    The :class:`LoRA` adapter; ``up`` is zero so ``merge(params, adapter) == params``.
  """
  LoraConfig(rank=rank, targets=tuple(targets) if not isinstance(targets, str) else (targets,))
  alpha = float(rank if alpha is None else alpha)
  flat = _flat(params)
  paths = target_paths(params, targets)
  if not paths:
    raise ValueError(f"no kernel matches the LoRA targets {tuple(targets)}")
  keys = jax.random.split(key, len(paths))
  factors, scales = {}, []
  for k, path in zip(keys, paths):
    shape = flat[path].shape
    fan_in = math.prod(shape[:-1])
    bound = 1.0 / math.sqrt(fan_in)  # the uniform bound of PyTorch's default kaiming init (a = sqrt(5))
    down = jax.random.uniform(k, shape[:-1] + (rank,), dtype, -bound, bound)
    up = jnp.zeros((rank, shape[-1]), dtype)
    factors[path] = {"down": down, "up": up}
    scales.append((path, alpha / rank))
  return LoRA(factors=factors, scales=tuple(scales))


def delta(down: jax.Array, up: jax.Array) -> jax.Array:
  """The kernel update down @ up: [in, r] x [r, out] -> [in, out], or [kh, kw, in, r] -> [kh, kw, in, out]."""
  return jnp.einsum("...r,ro->...o", down, up, precision=jax.lax.Precision.HIGHEST)


def _apply(params: Params, adapters: Sequence[tuple[LoRA, float]], *, dropout: float = 0.0,
           key: jax.Array | None = None) -> dict[str, Any]:
  flat = _flat(params)
  for i, (adapter, strength) in enumerate(adapters):
    for j, (path, f) in enumerate(sorted(adapter.factors.items())):
      if path not in flat:
        raise ValueError(f"LoRA targets {path!r}, which is not in the parameter tree")
      w = flat[path]
      down, up = f["down"], f["up"]
      if dropout:
        if key is None:
          raise ValueError("LoRA dropout needs a key")
        # Rank dropout: each rank-one component is dropped with probability p for this step.
        k = jax.random.fold_in(jax.random.fold_in(key, i), j)
        keep = jax.random.bernoulli(k, 1.0 - dropout, (down.shape[-1],))
        keep = keep.astype(down.dtype).reshape((1,) * (down.ndim - 1) + (-1,))
        down = down * (keep / (1.0 - dropout))
      d = delta(down, up)
      if d.shape != w.shape:
        raise ValueError(f"LoRA factors for {path!r} give shape {d.shape}, the kernel is {w.shape}")
      flat[path] = (w + (adapter.scale_of(path) * strength) * d.astype(jnp.float32)).astype(w.dtype)
  return traverse_util.unflatten_dict(flat, sep="/")


def merge(params: Params, adapter: LoRA, scale: float = 1.0, *, dropout: float = 0.0,
          key: jax.Array | None = None) -> dict[str, Any]:
  """Returns ``params`` with ``scale * (alpha/r) * down @ up`` added to each adapted kernel.

  ``dropout`` > 0 (training only) drops whole rank components with that probability, keyed.
  """
  return _apply(params, [(adapter, scale)], dropout=dropout, key=key)


def unmerge(params: Params, adapter: LoRA, scale: float = 1.0) -> dict[str, Any]:
  """Inverse of :func:`merge`: subtracts the same update."""
  return _apply(params, [(adapter, -scale)])


def merge_many(params: Params, adapters: Sequence[tuple[LoRA, float]]) -> dict[str, Any]:
  """Merges several adapters, each with its own strength: ``[(lora_a, 0.8), (lora_b, 0.5)]``."""
  return _apply(params, list(adapters))


def num_params(tree: Any) -> int:
  """Total number of scalars in a pytree (e.g. ``num_params(adapter.factors)``)."""
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------- files
#
# A ``namer`` maps a "/"-joined jdiff kernel path to the PyTorch module name it stands for
# (e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"); :func:`unet_namer` and
# :func:`text_namer` give those of jdiff's UNet and CLIP text encoder.


def unet_namer(path: str) -> str:
  from jdiff.convert.unet import torch_name
  return torch_name(tuple(path.split("/"))).rsplit(".", 1)[0]


def text_namer(path: str) -> str:
  from jdiff.convert.text import _torch_name
  return "text_model." + _torch_name(tuple(path.split("/"))).rsplit(".", 1)[0]


_COMPONENTS = {"unet": unet_namer, "text_encoder": text_namer}


def _to_torch_factors(down: np.ndarray, up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """jdiff (down [.., in, r], up [r, out]) -> PyTorch (A [r, in(, kh, kw)], B [out, r(, 1, 1)])."""
  if down.ndim == 2:
    return down.T, up.T
  return np.transpose(down, (3, 2, 0, 1)), up.T[:, :, None, None]


def _from_torch_factors(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  if a.ndim == 2:
    return a.T, b.T
  if b.ndim != 4 or b.shape[2:] != (1, 1):
    raise ValueError(f"conv LoRA up-projection must be 1x1, got shape {b.shape}")
  return np.transpose(a, (2, 3, 1, 0)), b[:, :, 0, 0].T


def _reverse_names(params: Params, namer: Callable[[str], str]) -> dict[str, str]:
  names = {}
  for path, leaf in _flat(params).items():
    if path.endswith("kernel") and jnp.ndim(leaf) in (2, 4):
      try:
        names[namer(path)] = path
      except ValueError:
        continue
  return names


def save_diffusers(file: str | os.PathLike, adapters: Mapping[str, LoRA]) -> None:
  """Writes adapters in the diffusers/PEFT safetensors layout (``unet.<module>.lora_A.weight``).

  ``adapters`` maps a component ("unet", "text_encoder") to its :class:`LoRA`. Each module's
  alpha / r is folded into ``lora_B`` so the file means the same to loaders that assume alpha = r.
  """
  from safetensors.numpy import save_file
  out = {}
  for comp, adapter in adapters.items():
    if comp not in _COMPONENTS:
      raise ValueError(f"unknown component {comp!r}; expected one of {sorted(_COMPONENTS)}")
    for path, f in adapter.factors.items():
      a, b = _to_torch_factors(np.asarray(f["down"], np.float32),
                               np.asarray(f["up"], np.float32) * adapter.scale_of(path))
      name = _COMPONENTS[comp](path)
      out[f"{comp}.{name}.lora_A.weight"] = np.ascontiguousarray(a)
      out[f"{comp}.{name}.lora_B.weight"] = np.ascontiguousarray(b)
  save_file(out, os.fspath(file), metadata={"format": "pt"})


def _read(file: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  from jdiff.convert import _io
  file = os.fspath(file)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"LoRA file not found: {file}")
  _io.refuse_pickle(file, what="LoRA file")
  if not file.endswith(".safetensors"):
    raise ValueError(f"{file}: only .safetensors LoRA files are loaded (pickled files are never unpickled)")
  try:
    tensors, meta = _io.read_safetensors(file)  # sizes checked against the file before reading
  except ValueError as e:
    raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
  return {k: v.astype(np.float32) for k, v in tensors.items()}, meta


def _metadata_alphas(meta: Mapping[str, str], comp: str) -> tuple[float | None, int | None]:
  """alpha and r of a component from diffusers' ``lora_adapter_metadata`` (keys ``unet.lora_alpha``)."""
  raw = meta.get("lora_adapter_metadata")
  if not raw:
    return None, None
  info = json.loads(raw)
  if info.get(f"{comp}.alpha_pattern") or info.get(f"{comp}.rank_pattern"):
    raise ValueError("per-module alpha_pattern/rank_pattern LoRA metadata is not supported")
  return info.get(f"{comp}.lora_alpha"), info.get(f"{comp}.r")


def _normalise_key(key: str) -> str:
  """Spellings diffusers has used for the same tensors -> one: ``lora_linear_layer.down/up`` ->
  ``lora_A/lora_B``, and text-encoder keys without the ``text_model.`` level (transformers >= 5
  names CLIP's modules without it)."""
  key = key.replace(".lora_linear_layer.down.", ".lora_A.").replace(".lora_linear_layer.up.", ".lora_B.")
  if key.startswith("text_encoder.") and not key.startswith("text_encoder.text_model."):
    key = "text_encoder.text_model." + key[len("text_encoder."):]
  return key


def load_diffusers(file: str | os.PathLike, params_by_component: Mapping[str, Params]) -> dict[str, LoRA]:
  """Reads a diffusers/PEFT LoRA file into one :class:`LoRA` per component found.

  Args:
    file: a ``.safetensors`` file as written by diffusers' ``save_lora_weights`` (keys
      ``unet.<module>.lora_A.weight`` / ``lora_B.weight``; older ``.lora.down/up`` spellings too).
    params_by_component: the base parameter trees, e.g. ``{"unet": unet_params}``, used to map
      module names to jdiff paths and check shapes.
  """
  tensors, meta = _read(file)
  tensors = {_normalise_key(k): v for k, v in tensors.items()}
  result = {}
  for comp, params in params_by_component.items():
    names = _reverse_names(params, _COMPONENTS[comp])
    alpha, rank_meta = _metadata_alphas(meta, comp)
    factors, scales = {}, []
    prefix = comp + "."
    for key in sorted(tensors):
      if not key.startswith(prefix):
        continue
      m = re.match(r"^(.*)\.(lora_A|lora\.down|lora_down)\.weight$", key[len(prefix):])
      if not m:
        continue
      module = m.group(1)
      up_key = next((prefix + module + s for s in (".lora_B.weight", ".lora.up.weight", ".lora_up.weight")
                     if prefix + module + s in tensors), None)
      if up_key is None:
        raise ValueError(f"{file}: {key} has no matching up/B tensor")
      if module not in names:
        raise ValueError(f"{file}: module {module!r} is not in the {comp} parameter tree")
      path = names[module]
      down, up = _from_torch_factors(tensors[key], tensors[up_key])
      rank = down.shape[-1]
      factors[path] = {"down": jnp.asarray(down), "up": jnp.asarray(up)}
      scales.append((path, (alpha / (rank_meta or rank)) if alpha else 1.0))
    if factors:
      _check_shapes(file, factors, params)
      result[comp] = LoRA(factors=factors, scales=tuple(scales))
  if not result:
    raise ValueError(f"{file}: no LoRA tensors for components {sorted(params_by_component)}")
  return result


_KOHYA = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def load_kohya(file: str | os.PathLike, params_by_component: Mapping[str, Params]) -> dict[str, LoRA]:
  """Reads a kohya-ss / A1111 LoRA file (``lora_unet_*`` / ``lora_te_*`` with ``.lora_down``,
  ``.lora_up`` and ``.alpha``), for models whose module names follow diffusers' layout."""
  tensors, _ = _read(file)
  result = {}
  for comp, params in params_by_component.items():
    names = {k.replace(".", "_"): v for k, v in _reverse_names(params, _COMPONENTS[comp]).items()}
    factors, scales = {}, []
    for key in sorted(tensors):
      if not (key.startswith(_KOHYA[comp]) and key.endswith(".lora_down.weight")):
        continue
      base = key[: -len(".lora_down.weight")]
      module = base[len(_KOHYA[comp]):]
      if module not in names:
        raise ValueError(f"{file}: kohya module {base!r} has no counterpart in the {comp} parameters")
      if base + ".lora_up.weight" not in tensors:
        raise ValueError(f"{file}: {key} has no matching lora_up tensor")
      down, up = _from_torch_factors(tensors[key], tensors[base + ".lora_up.weight"])
      rank = down.shape[-1]
      alpha = float(tensors[base + ".alpha"]) if base + ".alpha" in tensors else float(rank)
      path = names[module]
      factors[path] = {"down": jnp.asarray(down), "up": jnp.asarray(up)}
      scales.append((path, alpha / rank))
    if factors:
      _check_shapes(file, factors, params)
      result[comp] = LoRA(factors=factors, scales=tuple(scales))
  if not result:
    raise ValueError(f"{file}: no kohya LoRA tensors for components {sorted(params_by_component)}")
  return result


def save_kohya(file: str | os.PathLike, adapters: Mapping[str, LoRA]) -> None:
  """Writes adapters in kohya-ss's layout, with each module's alpha."""
  from safetensors.numpy import save_file
  out = {}
  for comp, adapter in adapters.items():
    for path, f in adapter.factors.items():
      a, b = _to_torch_factors(np.asarray(f["down"], np.float32), np.asarray(f["up"], np.float32))
      base = _KOHYA[comp] + _COMPONENTS[comp](path).replace(".", "_")
      rank = a.shape[0]
      out[base + ".lora_down.weight"] = np.ascontiguousarray(a)
      out[base + ".lora_up.weight"] = np.ascontiguousarray(b)
      out[base + ".alpha"] = np.asarray(adapter.scale_of(path) * rank, np.float32)
  save_file(out, os.fspath(file))


def load(file: str | os.PathLike, params_by_component: Mapping[str, Params]) -> dict[str, LoRA]:
  """Reads a LoRA file in either the diffusers/PEFT or the kohya layout (detected from its keys)."""
  tensors, _ = _read(file)
  if any(k.startswith(tuple(_KOHYA.values())) for k in tensors):
    return load_kohya(file, params_by_component)
  return load_diffusers(file, params_by_component)


def _check_shapes(file, factors, params):
  flat = _flat(params)
  for path, f in factors.items():
    want = flat[path].shape
    got = tuple(f["down"].shape[:-1]) + (f["up"].shape[-1],)
    if got != tuple(want):
      raise ValueError(f"{file}: LoRA for {path} implies kernel shape {got}, the model has {tuple(want)}")
