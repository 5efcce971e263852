"""Device mesh, sharding rules and multi-host helpers.

Training runs over a 2-D :class:`jax.sharding.Mesh` with axes ``("data", "fsdp")``. The batch is
split over both axes (every device sees different examples); parameters, optimizer state and EMA
are either replicated or, with FSDP, each leaf is split along its largest axis divisible by the
size of ``"fsdp"`` (small or indivisible leaves stay replicated). The same code runs on one CPU,
on 8 fake CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``) and on a pod.

Example:
  >>> mesh = parallel.make_mesh(fsdp=2)
  >>> shardings = parallel.param_shardings(jax.eval_shape(init, key), mesh, fsdp=True)
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = [
    "AXES",
    "make_mesh",
    "replicated",
    "batch_sharding",
    "fsdp_spec",
    "param_shardings",
    "host_to_global",
    "global_to_host",
    "initialize",
    "is_main_process",
]

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def initialize() -> None:
  """Initialises multi-host JAX when launched on several hosts (a no-op on one process).

  Call once at program start, before any other JAX call, on every host. On TPU pods and SLURM
  clusters :func:`jax.distributed.initialize` discovers the coordinator itself.
  """
  import os
  if int(os.environ.get("JAX_PROCESS_COUNT", "1")) > 1 or "SLURM_NTASKS" in os.environ:
    jax.distributed.initialize()


def is_main_process() -> bool:
  """True on process 0, the only one that writes logs, samples and sample grids."""
  return jax.process_index() == 0


def make_mesh(*, data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp") mesh over ``devices`` (default: all devices).

  Args:
    data: size of the data-parallel axis; -1 takes whatever ``fsdp`` leaves.
    fsdp: size of the parameter-sharding axis.
    devices: the devices to use.

  Returns:
    A :class:`Mesh` of shape [data, fsdp].

  Example:
    >>> mesh = make_mesh(fsdp=4)   # 8 devices -> data=2, fsdp=4
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"mesh fsdp={fsdp} does not divide the {n} available devices")
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} != {n} devices")
  grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
  return Mesh(grid, AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding that keeps a full copy on every device."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device of the mesh; other axes whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def fsdp_spec(shape: Sequence[int], fsdp_size: int, *, min_size: int = 0) -> P:
  """The FSDP partition spec of one array: its largest axis divisible by ``fsdp_size``.

  Ties go to the last such axis. Arrays with fewer than ``min_size`` elements or no divisible
  axis are replicated (``P()``).

  Example:
    >>> fsdp_spec((3, 3, 64, 128), 4)
    PartitionSpec(None, None, None, 'fsdp')
  """
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < max(min_size, 1):
    return P()
  best = None
  for i, d in enumerate(shape):
    if d % fsdp_size == 0 and (best is None or d >= shape[best]):
      best = i
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = "fsdp"
  return P(*spec)


def param_shardings(tree: Any, mesh: Mesh, *, fsdp: bool = False, min_size: int = 0) -> Any:
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs): replicated, or FSDP.

  Args:
    tree: parameters / optimizer state / any pytree of array-likes with ``.shape``.
    mesh: a ("data", "fsdp") mesh.
    fsdp: shard each leaf over "fsdp" along its largest divisible axis (see :func:`fsdp_spec`).
    min_size: leaves with fewer elements stay replicated.

  Example:
    >>> shardings = param_shardings(jax.eval_shape(model.init, key, x), mesh, fsdp=True)
  """
  size = mesh.shape["fsdp"]

  def rule(leaf):
    shape = getattr(leaf, "shape", ())
    if not fsdp or not shape:
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, fsdp_spec(shape, size, min_size=min_size))

  return jax.tree.map(rule, tree)


def host_to_global(batch: Any, mesh: Mesh) -> Any:
  """Assembles this host's slice of a batch (numpy, leading axis = local batch) into global arrays.

  With one process this is a plain sharded ``device_put``; on several hosts each host passes its
  own examples and the result is one array spanning all of them.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def global_to_host(x: jax.Array) -> np.ndarray:
  """Fetches a (possibly multi-host) global array as numpy on every host."""
  from jax.experimental import multihost_utils
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
