"""Shared helpers of the performance benchmarks: alternating A/B timing, peak memory, tables, JSON.

Timings of two implementations are taken in ONE process, alternating (A, B, A, B, ...) so that load
from other processes on a shared machine hits both sides alike; medians and the A/B ratio are
reported. Peak memory is the rise of the process's resident set (Linux ``VmHWM`` after resetting it
through ``/proc/self/clear_refs``; ``psutil`` RSS sampling otherwise) and, on accelerators, the
device's ``peak_bytes_in_use``.

Example:
  >>> times = alternate({"jdiff": run_a, "diffusers": run_b}, repeats=5)  # doctest: +SKIP
  >>> summary(times["jdiff"])["median_s"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

__all__ = ["timed", "alternate", "choose_torch_threads", "summary", "PeakRSS", "device_peak_bytes",
           "format_table", "write_json", "environment", "block",
           "add_common_flags", "start"]


def block(tree: Any) -> Any:
  """Waits for every JAX array in ``tree`` (a no-op for other leaves); returns ``tree``."""
  import jax

  for leaf in jax.tree.leaves(tree):
    if hasattr(leaf, "block_until_ready"):
      leaf.block_until_ready()
  return tree


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
  """Seconds ``fn()`` took (it must block until its work is done) and its result."""
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


def alternate(fns: Mapping[str, Callable[[], Any]], *, repeats: int) -> dict[str, list[float]]:
  """Runs the callables in turn, ``repeats`` rounds (the order flips every round), timing each call.

  Args:
    fns: name -> a blocking callable (one measured unit of work, already warmed up).
    repeats: rounds.

  Returns:
    name -> list of seconds, one per round.

  Example:
    >>> t = alternate({"a": lambda: sum(range(1000)), "b": lambda: sum(range(10))}, repeats=3)
    >>> len(t["a"])
    3
  """
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}")
  names = list(fns)
  out: dict[str, list[float]] = {n: [] for n in names}
  for r in range(repeats):
    for n in (names if r % 2 == 0 else names[::-1]):
      out[n].append(timed(fns[n])[0])
  return out


def choose_torch_threads(fn: Callable[[], Any], setting: str | int = "auto") -> int:
  """Sets PyTorch's intra-op thread count and returns it.

  ``"auto"`` times ``fn`` (twice, after a warm-up call) with 1 thread and with PyTorch's default
  and keeps the faster: on a CPU shared with other work, OpenMP's spinning worker threads can make
  the multi-threaded setting several times slower, and the baseline should get its best setting.

  Example:
    >>> n = choose_torch_threads(lambda: None, 1)
    >>> n
    1
  """
  import torch

  if setting != "auto":
    torch.set_num_threads(int(setting))
    return int(setting)
  default = torch.get_num_threads()
  best, best_t = default, float("inf")
  for n in sorted({1, default}):
    torch.set_num_threads(n)
    fn()
    t = min(timed(fn)[0] for _ in range(2))
    if t < best_t:
      best, best_t = n, t
  torch.set_num_threads(best)
  return best


def summary(times: Sequence[float]) -> dict[str, float]:
  """Median, min and max of a list of seconds."""
  if not times:
    raise ValueError("no timings")
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def _status_kb(field: str) -> int | None:
  try:
    with open("/proc/self/status") as fh:
      for line in fh:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    return None
  return None


def _reset_hwm() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as fh:
      fh.write("5")  # resets the peak resident set size (VmHWM) to the current RSS
    return True
  except OSError:
    return False


def _rss_bytes() -> int:
  kb = _status_kb("VmRSS")
  if kb is not None:
    return kb * 1024
  import psutil

  return int(psutil.Process().memory_info().rss)


class PeakRSS:
  """Context manager: ``peak_bytes`` is the highest resident set above the level at entry.

  Uses Linux's resettable high-water mark (exact); elsewhere samples RSS at exit (a lower bound).

  Example:
    >>> with PeakRSS() as mem:
    ...   buf = bytearray(50 * 2**20)
    >>> mem.peak_bytes >= 0
    True
  """

  def __enter__(self) -> PeakRSS:
    self.exact = _reset_hwm()
    self.start = _rss_bytes()
    self.peak_bytes = 0
    return self

  def __exit__(self, *exc) -> None:
    hwm = _status_kb("VmHWM") if self.exact else None
    peak = hwm * 1024 if hwm is not None else _rss_bytes()
    self.peak_bytes = max(0, peak - self.start)


def device_peak_bytes(device: Any = None) -> int | None:
  """``peak_bytes_in_use`` of a JAX device (None where the backend keeps no statistics, e.g. CPU)."""
  import jax

  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # some backends raise instead of returning None
    return None
  if not stats:
    return None
  return int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0))) or None


def environment() -> dict[str, Any]:
  """Versions, devices and thread settings, stored with every result."""
  import jax

  env: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(),
                         "cpu_count": os.cpu_count(), "jax": jax.__version__,
                         "jax_backend": jax.default_backend(),
                         "jax_devices": [str(d) for d in jax.devices()]}
  try:
    import torch

    env.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
               torch_cuda=bool(torch.cuda.is_available()))
  except ImportError:
    env["torch"] = None
  try:
    import diffusers

    env["diffusers"] = diffusers.__version__
  except ImportError:
    env["diffusers"] = None
  try:
    env["loadavg"] = os.getloadavg()
  except OSError:
    pass
  return env


def _fmt(value: Any) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    if value == 0 or 1e-3 <= abs(value) < 1e5:
      return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
    return f"{value:.3e}"
  return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """A plain-text table of ``rows`` restricted to ``columns`` (missing cells print as ``-``).

  Example:
    >>> print(format_table([{"a": 1, "b": 2.5}], ["a", "b"]))
    a  b
    -  ---
    1  2.5
  """
  cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
  widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(),
           "  ".join("-" * w for w in widths).rstrip()]
  lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
  return "\n".join(lines)


def write_json(path: str | os.PathLike | None, payload: Mapping[str, Any]) -> None:
  """Writes ``payload`` as indented JSON (creating parent folders); nothing when ``path`` is None."""
  if path is None:
    return
  folder = os.path.dirname(os.fspath(path))
  if folder:
    os.makedirs(folder, exist_ok=True)
  with open(path, "w") as fh:
    json.dump(payload, fh, indent=2, sort_keys=False, default=str)
    fh.write("\n")


def add_common_flags(p) -> None:
  """``--torch-threads``, ``--compilation-cache`` and ``--out`` of the jdiff-vs-diffusers benchmarks."""
  p.add_argument("--torch-threads", default="auto", help="PyTorch intra-op threads, or auto (the faster of 1 "
                 "and the default)")
  p.add_argument("--compilation-cache", default=None, metavar="DIR",
                 help="JAX persistent compilation cache folder (a second run skips XLA compilation)")
  p.add_argument("--out", default=None, help="write results as JSON here")


def start(args) -> None:
  """What every benchmark does with the common flags before it compiles anything."""
  if args.compilation_cache:
    from jdiff import parallel
    parallel.enable_compilation_cache(os.fspath(args.compilation_cache), min_compile_seconds=0.0)
