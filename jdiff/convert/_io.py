"""Reading and writing diffusers/transformers checkpoint folders without torch and without pickle.

A checkpoint folder holds a ``config.json`` and the weights as safetensors, either one file
``<prefix>.safetensors`` or shards listed by ``<prefix>.safetensors.index.json`` (the layout that
``save_pretrained`` writes). Prefixes: diffusers models use ``diffusion_pytorch_model``, transformers
models use ``model``. Tensors come back as numpy arrays; half-precision floats (float16, bfloat16) are
upcast to float32 so conversion code only ever sees float32.

Files from the internet are not trusted: a safetensors header is validated against the file's length
(every tensor's dtype, shape and byte range, no overlaps) before any tensor is read, and tensors are
memory-mapped rather than loaded (:func:`read_safetensors`). Pickle-based files (``.bin``, ``.ckpt``,
``.pt``, ``.pth``, ``.pkl``) are never opened (:func:`refuse_pickle`): unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

__all__ = ["read_config", "write_config", "load_tensors", "save_tensors", "check_tensors",
           "parse_size", "read_safetensors", "refuse_pickle", "MAX_HEADER_BYTES"]

PathLike = str | os.PathLike
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def _folder(folder: PathLike) -> Path:
  path = Path(folder)
  if not path.is_dir():
    refuse_pickle(path)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint folder {str(path)!r} does not exist")
  if not path.is_dir():
    raise NotADirectoryError(f"{str(path)!r} is not a folder (expected a checkpoint folder)")
  return path


def read_config(folder: PathLike, *, name: str = "config.json") -> dict[str, Any]:
  """Reads the JSON config of a checkpoint folder.

  Args:
    folder: the checkpoint folder (e.g. ``sd15/unet``).
    name: file name inside the folder.

  Returns:
    The parsed config as a dict.

  Raises:
    FileNotFoundError: the folder or the config file does not exist.
    ValueError: the file is not a JSON object.

  Example:
    >>> cfg = read_config("sd15/unet")  # doctest: +SKIP
    >>> cfg["cross_attention_dim"]  # doctest: +SKIP
    768
  """
  path = _folder(folder) / name
  if not path.is_file():
    raise FileNotFoundError(f"no {name} in {str(path.parent)!r}")
  try:
    config = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise ValueError(f"{str(path)!r} is not valid JSON: {err}") from None
  if not isinstance(config, dict):
    raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(config).__name__}")
  return config


def write_config(folder: PathLike, config: Mapping[str, Any], *, name: str = "config.json") -> Path:
  """Writes ``config`` as indented, key-sorted JSON into ``folder/name`` (creating the folder).

  Example:
    >>> write_config(tmp, {"in_channels": 4})  # doctest: +SKIP
  """
  path = Path(folder)
  path.mkdir(parents=True, exist_ok=True)
  out = path / name
  out.write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n", encoding="utf-8")
  return out


# safetensors dtype name -> (numpy dtype of the stored bytes, bytes per element)
_DTYPES = {"BOOL": ("|b1", 1), "U8": ("|u1", 1), "I8": ("|i1", 1), "U16": ("<u2", 2), "I16": ("<i2", 2),
           "F16": ("<f2", 2), "BF16": ("<u2", 2), "U32": ("<u4", 4), "I32": ("<i4", 4), "F32": ("<f4", 4),
           "U64": ("<u8", 8), "I64": ("<i8", 8), "F64": ("<f8", 8)}
MAX_HEADER_BYTES = 100 * 10**6  # the safetensors format's own limit on the JSON header


def refuse_pickle(path: PathLike, *, what: str = "checkpoint") -> None:
  """Raises one-line ValueError when ``path`` names a pickle-based file (``.ckpt``, ``.bin``, ``.pt``,
  ``.pth``, ``.pkl``): those are never opened, since unpickling runs arbitrary code.

  Example:
    >>> refuse_pickle("model.safetensors")
  """
  suffix = Path(path).suffix.lower()
  if suffix in _PICKLE_SUFFIXES:
    raise ValueError(f"{what} {str(path)!r} is a pickle file ({suffix}, the torch.save format); pickled files "
                     "are never unpickled (that runs arbitrary code): convert it to safetensors first")


def _checked_header(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], dict[str, str], int]:
  """The validated header of a safetensors file: name -> (dtype, shape, begin, end), the metadata, and
  the offset where the data section starts. Every size is checked against the file's length before
  anything but the header itself is read (and the header only when the file really holds it)."""
  where = f"safetensors file {str(path)!r}"
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ValueError(f"{where} is {size} bytes long: too short for the 8-byte header length")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
      raise ValueError(f"{where}: header claims {n} bytes but the file holds only {size - 8} after the length")
    if n > MAX_HEADER_BYTES:
      raise ValueError(f"{where}: header of {n} bytes exceeds the format's limit of {MAX_HEADER_BYTES}")
    raw = f.read(n)
  try:
    header = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise ValueError(f"{where}: header is not valid JSON ({err})") from None
  if not isinstance(header, dict):
    raise ValueError(f"{where}: header must be a JSON object, got {type(header).__name__}")
  metadata = header.pop("__metadata__", None) or {}
  if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
    raise ValueError(f"{where}: __metadata__ must map names to strings")
  data_len = size - 8 - n
  entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
  for name, info in header.items():
    if not isinstance(info, dict):
      raise ValueError(f"{where}: tensor {name!r} has no dtype/shape/data_offsets entry")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _DTYPES:
      raise ValueError(f"{where}: tensor {name!r} has unsupported dtype {dtype!r} "
                       f"(known: {', '.join(_DTYPES)})")
    if (not isinstance(shape, list)
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
      raise ValueError(f"{where}: tensor {name!r} has invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
      raise ValueError(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
      raise ValueError(f"{where}: tensor {name!r} lies at bytes [{begin}, {end}) outside the file's "
                       f"{data_len}-byte data section")
    count = 1
    for d in shape:
      count *= d  # Python ints: absurd shapes cannot overflow
    nbytes = count * _DTYPES[dtype][1]
    if nbytes != end - begin:
      raise ValueError(f"{where}: tensor {name!r} of shape {tuple(shape)} and dtype {dtype} needs {nbytes} "
                       f"bytes but its data_offsets span {end - begin}")
    entries[name] = (dtype, tuple(shape), begin, end)
  spans = sorted((b, e, name) for name, (_, _, b, e) in entries.items() if e > b)
  for (_, e0, a), (b1, _, b) in zip(spans, spans[1:]):
    if b1 < e0:
      raise ValueError(f"{where}: tensors {a!r} and {b!r} overlap in the data section")
  return entries, dict(metadata), 8 + n


def read_safetensors(path: PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """All tensors of one safetensors file as numpy (memory-mapped, read-only), and its metadata.

  The header is validated first: its length, every tensor's dtype, shape and byte range against the
  file's actual length, and that no two tensors overlap; a file whose header claims more than the
  file holds is refused before anything is allocated. Tensors are then views of a read-only memory
  map (pages are read when used); float16 and bfloat16 tensors are widened to float32 (a copy).

  Args:
    path: a ``.safetensors`` file.

  Returns:
    (name -> array, ``__metadata__`` dict).

  Raises:
    FileNotFoundError: no such file.
    ValueError: a pickle file (by suffix), or a malformed or inconsistent file; one line naming the file
      and, where one is to blame, the tensor.

  Example:
    >>> tensors, meta = read_safetensors("unet/diffusion_pytorch_model.safetensors")  # doctest: +SKIP
  """
  path = Path(path)
  refuse_pickle(path, what="weights file")
  if not path.is_file():
    raise FileNotFoundError(f"safetensors file {str(path)!r} does not exist")
  try:
    entries, metadata, start = _checked_header(path)
    out: dict[str, np.ndarray] = {}
    if not entries:
      return out, metadata
    with open(path, "rb") as f:
      view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # stays alive through the arrays
    for name, (dtype, shape, begin, end) in entries.items():
      stored, itemsize = _DTYPES[dtype]
      arr = np.frombuffer(view, dtype=np.dtype(stored), count=(end - begin) // itemsize,
                          offset=start + begin).reshape(shape)
      if dtype == "BF16":  # numpy has no bfloat16: widen the raw 16 bits to float32's upper half
        arr = (arr.astype(np.uint32) << np.uint32(16)).view(np.float32)
      elif dtype == "F16":
        arr = arr.astype(np.float32)
      out[name] = arr
  except OSError as err:
    raise ValueError(f"cannot read safetensors file {str(path)!r}: {err}") from None
  return out, metadata


def _read_file(path: Path) -> dict[str, np.ndarray]:
  """All tensors of one safetensors file (see :func:`read_safetensors`)."""
  return read_safetensors(path)[0]


def _index_path(folder: Path, prefix: str) -> Path:
  return folder / f"{prefix}.safetensors.index.json"


def load_tensors(folder: PathLike, prefix: str = "diffusion_pytorch_model") -> dict[str, np.ndarray]:
  """Loads every tensor of a checkpoint folder, single-file or sharded, as numpy arrays.

  Looks for ``<prefix>.safetensors`` and then ``<prefix>.safetensors.index.json``. float16 and bfloat16
  tensors are returned as float32. Pickle files are never read.

  Args:
    folder: the checkpoint folder.
    prefix: the weights file stem: ``diffusion_pytorch_model`` (diffusers) or ``model`` (transformers).

  Returns:
    A dict from tensor name (e.g. ``conv_in.weight``) to a numpy array.

  Raises:
    FileNotFoundError: no safetensors weights in the folder (the message says when only pickle files
      are present), or a shard named by the index is missing.
    ValueError: a file is corrupt or the index is malformed; the message names the file.

  Example:
    >>> tensors = load_tensors("sd15/unet")  # doctest: +SKIP
    >>> tensors["conv_in.weight"].shape  # doctest: +SKIP
    (320, 4, 3, 3)
  """
  path = _folder(folder)
  single = path / f"{prefix}.safetensors"
  index = _index_path(path, prefix)
  if single.is_file():
    return _read_file(single)
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
      if not isinstance(weight_map, dict):
        raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
      raise ValueError(f"malformed safetensors index {str(index)!r}: {err}") from None
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
      shard_path = path / shard
      if not shard_path.is_file():
        raise FileNotFoundError(f"shard {shard!r} listed in {str(index)!r} does not exist")
      out.update(_read_file(shard_path))
    missing = sorted(set(weight_map) - set(out))
    if missing:
      raise ValueError(f"tensor {missing[0]!r} listed in {str(index)!r} is not in its shard "
                       f"{weight_map[missing[0]]!r}")
    return out
  pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
  others = sorted(p.name for p in path.glob("*.safetensors"))
  if pickles:
    raise FileNotFoundError(
        f"no {prefix}.safetensors in {str(path)!r}; found only pickle files {pickles}, which jdiff "
        "never loads (unpickling runs arbitrary code). Convert them to safetensors first.")
  hint = f" (found {others})" if others else ""
  raise FileNotFoundError(f"no {single.name} or {index.name} in {str(path)!r}{hint}")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
  """Bytes from an int or a string like ``"5GB"`` / ``"200MiB"`` (the forms ``save_pretrained`` accepts).

  Example:
    >>> parse_size("2KB")
    2000
  """
  if isinstance(size, int):
    if size <= 0:
      raise ValueError(f"max_shard_size must be positive, got {size}")
    return size
  match = _SIZE.match(str(size))
  if not match:
    raise ValueError(f"cannot parse size {size!r} (expected e.g. 5GB, 500MB, 1000)")
  unit = (match.group(2) or "").upper()
  return parse_size(int(float(match.group(1)) * _UNITS[unit]))


def save_tensors(tensors: Mapping[str, Any], folder: PathLike, prefix: str = "diffusion_pytorch_model",
                 *, max_shard_size: int | str | None = None,
                 metadata: Mapping[str, str] | None = None) -> list[Path]:
  """Writes tensors as safetensors, sharded like ``save_pretrained`` when above ``max_shard_size``.

  One file ``<prefix>.safetensors``, or shards ``<prefix>-0000i-of-0000n.safetensors`` plus
  ``<prefix>.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map": {...}}``).
  Files carry the ``{"format": "pt"}`` metadata that diffusers and transformers expect.

  Args:
    tensors: name -> array (numpy or jax; converted with ``np.asarray``).
    folder: output folder, created if needed.
    prefix: file stem (``diffusion_pytorch_model`` or ``model``).
    max_shard_size: bytes (int) or a string like ``"5GB"``; None writes a single file.
    metadata: extra string metadata for each file.

  Returns:
    The written paths (weights files, then the index when sharded).

  Example:
    >>> save_tensors({"w": np.zeros((2, 2), np.float32)}, tmp, max_shard_size="1MB")  # doctest: +SKIP
  """
  path = Path(folder)
  path.mkdir(parents=True, exist_ok=True)
  arrays = {name: np.ascontiguousarray(np.asarray(value)) for name, value in tensors.items()}
  meta = {"format": "pt", **dict(metadata or {})}
  for stale in [path / f"{prefix}.safetensors", _index_path(path, prefix),
                *path.glob(f"{prefix}-*-of-*.safetensors")]:
    if stale.is_file():
      stale.unlink()  # never leave a mix of old and new layouts behind
  if max_shard_size is None:
    out = path / f"{prefix}.safetensors"
    save_file(arrays, str(out), metadata=meta)
    return [out]
  limit = parse_size(max_shard_size)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(arrays):
    nbytes = arrays[name].nbytes
    if shards[-1] and size + nbytes > limit:  # a tensor larger than the limit gets a shard of its own
      shards.append({})
      size = 0
    shards[-1][name] = arrays[name]
    size += nbytes
  if len(shards) == 1:
    out = path / f"{prefix}.safetensors"
    save_file(arrays, str(out), metadata=meta)
    return [out]
  written: list[Path] = []
  weight_map: dict[str, str] = {}
  for i, shard in enumerate(shards):
    fname = f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, str(path / fname), metadata=meta)
    written.append(path / fname)
    weight_map.update({name: fname for name in shard})
  index = {"metadata": {"total_size": int(sum(a.nbytes for a in arrays.values()))},
           "weight_map": dict(sorted(weight_map.items()))}
  _index_path(path, prefix).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
  written.append(_index_path(path, prefix))
  return written


def check_tensors(expected: Mapping[str, tuple[int, ...]], got: Mapping[str, Any], *,
                  source: str = "checkpoint", allow_unexpected: bool = False) -> None:
  """Checks that ``got`` holds exactly the tensors of ``expected`` with the right shapes.

  Args:
    expected: name -> shape the model needs.
    got: name -> array read from a checkpoint.
    source: what ``got`` came from (a path), used in messages.
    allow_unexpected: when False, tensors in ``got`` that the model does not use are an error.

  Raises:
    ValueError: naming the first (sorted) missing tensor, else the first mis-shaped one, else the first
      unexpected one.

  Example:
    >>> check_tensors({"w": (2, 3)}, {"w": np.zeros((2, 3))})
  """
  missing = sorted(set(expected) - set(got))
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise ValueError(f"{source}: missing tensor {missing[0]!r} with shape {tuple(expected[missing[0]])}"
                     f"{more}")
  for name in sorted(expected):
    shape = tuple(np.shape(got[name]))
    if shape != tuple(expected[name]):
      raise ValueError(f"{source}: tensor {name!r} has shape {shape}, expected {tuple(expected[name])}")
  if not allow_unexpected:
    extra = sorted(set(got) - set(expected))
    if extra:
      more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
      raise ValueError(f"{source}: unexpected tensor {extra[0]!r}{more} (does the config match the weights?)")
