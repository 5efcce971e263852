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
    "sgm_names",
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
  """CLIP module names: ``text_model.encoder.layers.0.self_attn.q_proj``; the projection head of
  ``CLIPTextModelWithProjection`` (SDXL's second encoder) is ``text_projection``, outside ``text_model``."""
  from jdiff.convert.text import _torch_name
  name = _torch_name(tuple(path.split("/"))).rsplit(".", 1)[0]
  return name if name.split(".")[0] == "text_projection" else "text_model." + name


_COMPONENTS = {"unet": unet_namer, "text_encoder": text_namer, "text_encoder_2": text_namer}


# ----------------------------------------------------------------------------- SGM (original SDXL) names
#
# kohya-ss trains SDXL on Stability's SGM UNet and names its modules after it. The SGM UNet is a flat
# list: ``input_blocks.0.0`` is conv_in; then, level by level, one input block per resnet (``.0``, with
# the attention after it as ``.1``) and one per downsampler (``.0.op``); ``middle_block.0/1/2`` are
# resnet, attention, resnet; ``output_blocks`` likewise per up-level resnet, with the upsampler after
# the last one's attention (``.2.conv``, or ``.1.conv`` in a level without attention). ``time_embed.0/2``,
# ``label_emb.0.0/2`` and ``out.2`` are the time and added-conditioning MLPs and conv_out. Inside a
# resnet, ``in_layers.2``, ``emb_layers.1``, ``out_layers.3`` and ``skip_connection`` are conv1,
# time_emb_proj, conv2 and conv_shortcut; attention modules keep diffusers' names.

_SGM_TOP = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2"}
_SGM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}
_SGM_BLOCK = re.compile(r"^(input_blocks|middle_block|output_blocks)[._](\d+)[._]")


def _sgm_blocks(names: Iterable[str]) -> tuple[dict[str, str], dict[str, int]]:
  """diffusers block prefix (``down_blocks.1.resnets.0``) -> SGM block (``input_blocks.4.0``), and
  the number of SGM blocks of each kind, from the module names present in a UNet."""
  names = list(names)

  def indices(prefix: str) -> list[int]:
    found = {int(m.group(1)) for n in names for m in [re.match(re.escape(prefix) + r"\.(\d+)\.", n)] if m}
    return sorted(found)

  def has(prefix: str) -> bool:
    return any(n.startswith(prefix + ".") for n in names)

  blocks, i = {}, 1
  for level in indices("down_blocks"):
    for j in indices(f"down_blocks.{level}.resnets"):
      blocks[f"down_blocks.{level}.resnets.{j}"] = f"input_blocks.{i}.0"
      blocks[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{i}.1"
      i += 1
    if has(f"down_blocks.{level}.downsamplers.0"):
      blocks[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{i}.0.op"
      i += 1
  mid_attention = has("mid_block.attentions.0")
  blocks["mid_block.resnets.0"] = "middle_block.0"
  blocks["mid_block.attentions.0"] = "middle_block.1"
  blocks["mid_block.resnets.1"] = f"middle_block.{2 if mid_attention else 1}"
  k = 0
  for level in indices("up_blocks"):
    resnets = indices(f"up_blocks.{level}.resnets")
    attention = has(f"up_blocks.{level}.attentions")
    for j in resnets:
      blocks[f"up_blocks.{level}.resnets.{j}"] = f"output_blocks.{k}.0"
      blocks[f"up_blocks.{level}.attentions.{j}"] = f"output_blocks.{k}.1"
      if j == resnets[-1] and has(f"up_blocks.{level}.upsamplers.0"):
        blocks[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{k}.{2 if attention else 1}.conv"
      k += 1
  counts = {"input_blocks": i, "middle_block": 3 if mid_attention else 2, "output_blocks": k}
  return blocks, counts


def _sgm_name(name: str, blocks: Mapping[str, str]) -> str | None:
  if name in _SGM_TOP:
    return _SGM_TOP[name]
  parts = name.split(".")
  for n in (5, 4, 3):  # downsampler / upsampler conv, down/up block members, mid block members
    head = ".".join(parts[:n])
    if head in blocks:
      rest = parts[n:]
      if ".resnets." in head and rest and rest[0] in _SGM_RESNET:
        rest = [_SGM_RESNET[rest[0]], *rest[1:]]
      return ".".join([blocks[head], *rest])
  return None


def sgm_names(params: Params) -> dict[str, str]:
  """The SGM (original SDXL) module name of each adaptable kernel of a jdiff UNet, keyed by its
  diffusers module name: ``down_blocks.1.attentions.0.proj_in`` -> ``input_blocks.4.1.proj_in`` for
  SDXL. The block layout is read from ``params`` (any number of levels and resnets per level).

  Example:
    >>> sgm_names(unet_params)["mid_block.resnets.1.conv1"]  # doctest: +SKIP
    'middle_block.2.in_layers.2'
  """
  names = list(_reverse_names(params, unet_namer))
  blocks, _ = _sgm_blocks(names)
  return {n: s for n in names if (s := _sgm_name(n, blocks)) is not None}


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
  for comp in ("text_encoder.", "text_encoder_2."):
    rest = key[len(comp):]
    if key.startswith(comp) and not rest.startswith(("text_model.", "text_projection.")):
      key = comp + "text_model." + rest
  return key


# ----------------------------------------------------------------------------- which model a file is for

_SDXL_KEYS = ("lora_te1_", "lora_te2_", "text_encoder_2.")
_WIDTHS = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}  # the UNet's cross-attention width


def _file_model(tensors: Mapping[str, np.ndarray]) -> str | None:
  """The model family a LoRA file was made for, when its keys or widths tell: SDXL files adapt a second
  text encoder or name SGM blocks; SD1.x/2.x UNets (unlike SDXL's) have attention in their first level;
  the cross-attention width separates SD1.x (768), SD2.x (1024) and SDXL (2048)."""
  keys = list(tensors)
  if any(k.startswith(_SDXL_KEYS) for k in keys) or any(
      _SGM_BLOCK.match(k[len("lora_unet_"):]) for k in keys if k.startswith("lora_unet_")):
    return "SDXL"
  for k in keys:
    if re.search(r"attn2[._]to_k[._]", k) and re.search(r"(lora_A|lora\.down|lora_down)\.weight$", k):
      if tensors[k].ndim == 2 and tensors[k].shape[1] in _WIDTHS:
        return _WIDTHS[tensors[k].shape[1]]
  if any(re.match(r"^(unet\.|lora_unet_)down_blocks[._]0[._]attentions[._]", k) for k in keys):
    return "SD1.x/2.x"
  return None


def _params_model(params_by_component: Mapping[str, Params]) -> str | None:
  """The model family of the parameters a LoRA is loaded into (SDXL: the "text_time" added embedding or a
  second text encoder; SD1.x/2.x: attention in the UNet's first level, told apart by width)."""
  if "text_encoder_2" in params_by_component:
    return "SDXL"
  unet = params_by_component.get("unet")
  if not unet:
    return None
  if "add_embedding" in unet:
    return "SDXL"
  flat = _flat(unet)
  if any(p.startswith("down_blocks_0/attentions_") for p in flat):
    to_k = [v for p, v in flat.items() if p.endswith("attn2/to_k/kernel")]
    return _WIDTHS.get(int(to_k[0].shape[0]), "SD1.x/2.x") if to_k else "SD1.x/2.x"
  return None


def _mismatch(file, tensors: Mapping[str, np.ndarray], params_by_component: Mapping[str, Params],
              detail: str) -> ValueError:
  """A one-line error that names the two model families when they differ."""
  made_for, model = _file_model(tensors), _params_model(params_by_component)
  if made_for and model and made_for != model:
    return ValueError(f"{file}: a LoRA for {made_for} applied to {model}: {detail}")
  if made_for:
    return ValueError(f"{file}: (a LoRA for {made_for}) {detail}")
  return ValueError(f"{file}: {detail}")


def _check_second_encoder(file, tensors, params_by_component) -> None:
  if "text_encoder_2" not in params_by_component and any(
      k.startswith(("lora_te2_", "text_encoder_2.")) for k in tensors):
    raise _mismatch(file, tensors, params_by_component,
                    "it adapts text_encoder_2, and no second text encoder was given")


def _check_shapes(file, tensors, params_by_component, comp, factors):
  flat = _flat(params_by_component[comp])
  for path, f in factors.items():
    want = flat[path].shape
    got = tuple(f["down"].shape[:-1]) + (f["up"].shape[-1],)
    if got != tuple(want):
      raise _mismatch(file, tensors, params_by_component,
                      f"the {comp} LoRA for {path} implies kernel shape {got}, the model has {tuple(want)}")


# ----------------------------------------------------------------------------- loaders


def load_diffusers(file: str | os.PathLike, params_by_component: Mapping[str, Params]) -> dict[str, LoRA]:
  """Reads a diffusers/PEFT LoRA file into one :class:`LoRA` per component found.

  Args:
    file: a ``.safetensors`` file as written by diffusers' ``save_lora_weights`` (keys
      ``unet.<module>.lora_A.weight`` / ``lora_B.weight``, ``text_encoder.`` and, for SDXL,
      ``text_encoder_2.``; older ``.lora.down/up`` spellings too).
    params_by_component: the base parameter trees, e.g. ``{"unet": unet_params}``, used to map
      module names to jdiff paths and check shapes. A file that adapts ``text_encoder_2`` needs
      that component.

  Raises:
    ValueError: one line, naming the model families when the file is for another model.
  """
  tensors, meta = _read(file)
  tensors = {_normalise_key(k): v for k, v in tensors.items()}
  _check_second_encoder(file, tensors, params_by_component)
  result = {}
  for comp, params in params_by_component.items():
    if comp not in _COMPONENTS:
      raise ValueError(f"unknown component {comp!r}; expected one of {sorted(_COMPONENTS)}")
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
        raise _mismatch(file, tensors, params_by_component, f"module {module!r} is not in the {comp} parameter tree")
      path = names[module]
      down, up = _from_torch_factors(tensors[key], tensors[up_key])
      rank = down.shape[-1]
      factors[path] = {"down": jnp.asarray(down), "up": jnp.asarray(up)}
      scales.append((path, (alpha / (rank_meta or rank)) if alpha else 1.0))
    if factors:
      _check_shapes(file, tensors, params_by_component, comp, factors)
      result[comp] = LoRA(factors=factors, scales=tuple(scales))
  if not result:
    raise _mismatch(file, tensors, params_by_component,
                    f"no LoRA tensors for components {sorted(params_by_component)}")
  return result


# kohya-ss prefixes: SD1.x/2.x files name the text encoder lora_te_, SDXL files lora_te1_ and lora_te2_.
_KOHYA = {"unet": ("lora_unet_",), "text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}


def _kohya_names(params: Params, comp: str) -> dict[str, str]:
  """kohya module name (dots -> underscores) -> jdiff kernel path; UNets answer to diffusers' and to SGM's
  block names."""
  names = _reverse_names(params, _COMPONENTS[comp])
  out = {k.replace(".", "_"): v for k, v in names.items()}
  if comp == "unet":
    out.update({s.replace(".", "_"): names[d] for d, s in sgm_names(params).items()})
  return out


def _unknown_sgm_block(module: str, params: Params) -> str | None:
  """Names the SGM block of ``module`` when this UNet has no such block."""
  m = _SGM_BLOCK.match(module + "_")
  if not m:
    return None
  _, counts = _sgm_blocks(_reverse_names(params, unet_namer))
  if int(m.group(2)) < counts[m.group(1)]:
    return None
  have = ", ".join(f"{kind} 0-{n - 1}" for kind, n in counts.items())
  return f"SGM block {m.group(1)}.{m.group(2)}, which this UNet does not have (it has {have})"


def load_kohya(file: str | os.PathLike, params_by_component: Mapping[str, Params]) -> dict[str, LoRA]:
  """Reads a kohya-ss / A1111 LoRA file (``.lora_down``, ``.lora_up`` and ``.alpha`` per module).

  Keys are ``lora_unet_*`` with diffusers' block names (SD1.x/2.x) or SGM's ``input_blocks`` /
  ``middle_block`` / ``output_blocks`` (SDXL, see :func:`sgm_names`), ``lora_te_*`` or ``lora_te1_*`` for
  the text encoder and ``lora_te2_*`` for SDXL's second one (component ``"text_encoder_2"``).

  Raises:
    ValueError: one line, naming the module (and the model families when the file is for another model).
  """
  tensors, _ = _read(file)
  _check_second_encoder(file, tensors, params_by_component)
  result = {}
  for comp, params in params_by_component.items():
    if comp not in _COMPONENTS:
      raise ValueError(f"unknown component {comp!r}; expected one of {sorted(_COMPONENTS)}")
    names = None
    factors, scales = {}, []
    for key in sorted(tensors):
      prefix = next((p for p in _KOHYA[comp] if key.startswith(p)), None)
      if prefix is None or not key.endswith(".lora_down.weight"):
        continue
      names = _kohya_names(params, comp) if names is None else names
      base = key[: -len(".lora_down.weight")]
      module = base[len(prefix):]
      if module not in names:
        block = _unknown_sgm_block(module, params) if comp == "unet" else None
        raise _mismatch(file, tensors, params_by_component,
                        f"kohya module {base!r} names {block}" if block else
                        f"kohya module {base!r} has no counterpart in the {comp} parameters")
      if base + ".lora_up.weight" not in tensors:
        raise ValueError(f"{file}: {key} has no matching lora_up tensor")
      down, up = _from_torch_factors(tensors[key], tensors[base + ".lora_up.weight"])
      rank = down.shape[-1]
      alpha = float(tensors[base + ".alpha"]) if base + ".alpha" in tensors else float(rank)
      path = names[module]
      factors[path] = {"down": jnp.asarray(down), "up": jnp.asarray(up)}
      scales.append((path, alpha / rank))
    if factors:
      _check_shapes(file, tensors, params_by_component, comp, factors)
      result[comp] = LoRA(factors=factors, scales=tuple(scales))
  if not result:
    raise _mismatch(file, tensors, params_by_component,
                    f"no kohya LoRA tensors for components {sorted(params_by_component)}")
  return result


def save_kohya(file: str | os.PathLike, adapters: Mapping[str, LoRA]) -> None:
  """Writes adapters in kohya-ss's layout, with each module's alpha: diffusers' UNet block names, and
  ``lora_te1_`` / ``lora_te2_`` for the text encoders when ``text_encoder_2`` is among them (else
  ``lora_te_``)."""
  from safetensors.numpy import save_file
  out = {}
  sdxl = "text_encoder_2" in adapters
  for comp, adapter in adapters.items():
    if comp not in _COMPONENTS:
      raise ValueError(f"unknown component {comp!r}; expected one of {sorted(_COMPONENTS)}")
    prefix = _KOHYA[comp][-1 if sdxl else 0]
    for path, f in adapter.factors.items():
      a, b = _to_torch_factors(np.asarray(f["down"], np.float32), np.asarray(f["up"], np.float32))
      base = prefix + _COMPONENTS[comp](path).replace(".", "_")
      rank = a.shape[0]
      out[base + ".lora_down.weight"] = np.ascontiguousarray(a)
      out[base + ".lora_up.weight"] = np.ascontiguousarray(b)
      out[base + ".alpha"] = np.asarray(adapter.scale_of(path) * rank, np.float32)
  save_file(out, os.fspath(file))


def load(file: str | os.PathLike, params_by_component: Mapping[str, Params]) -> dict[str, LoRA]:
  """Reads a LoRA file in either the diffusers/PEFT or the kohya layout (detected from its keys).

  Args:
    file: a ``.safetensors`` LoRA file.
    params_by_component: the base parameter trees by component: ``"unet"``, ``"text_encoder"`` and, for
      SDXL, ``"text_encoder_2"``. Components the file does not adapt are left out of the result; a file
      that adapts ``text_encoder_2`` (an SDXL LoRA) is refused without that component.

  Returns:
    ``{component: LoRA}`` for each component the file adapts.

  Raises:
    FileNotFoundError: no such file.
    ValueError: one line: an unreadable or pickled file, or a LoRA that does not fit the parameters (naming
      the model families when they can be told: "a LoRA for SD1.x/2.x applied to SDXL: ...").

  Example:
    >>> adapters = lora.load("sdxl_lora.safetensors", {"unet": unet_params, "text_encoder": te1_params,
    ...                      "text_encoder_2": te2_params})  # doctest: +SKIP
    >>> unet_params = lora.merge(unet_params, adapters["unet"], 0.8)  # doctest: +SKIP
  """
  tensors, _ = _read(file)
  if any(k.startswith(sum(_KOHYA.values(), ())) for k in tensors):
    return load_kohya(file, params_by_component)
  return load_diffusers(file, params_by_component)
