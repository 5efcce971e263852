"""Shared helpers of the sampling programs: argument parsing with one-line errors, loading a pipeline
from a source, PNG grids.

Extension point: :data:`SOURCES` maps a source kind (the command-line flag name: ``diffusers``, ``workdir``)
to a function ``path -> pipeline`` returning an object with ``generate(prompts, *, key, ...)`` like
:class:`jdiff.pipelines.StableDiffusion`; :func:`register_source` adds a kind (``txt2img`` gains a
``--KIND`` flag).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn

import numpy as np

__all__ = ["ArgumentParser", "UsageError", "SOURCES", "register_source", "load_pipeline", "make_grid",
           "save_png", "run"]

EXIT_USAGE = 2


class UsageError(Exception):
  """A user mistake (bad flag value, missing file): reported as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
  """``argparse`` whose errors are one line on stderr and exit code 2 (no usage dump)."""

  def error(self, message: str) -> NoReturn:
    sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
    raise SystemExit(EXIT_USAGE)


def _load_diffusers(path: str, **options: Any) -> Any:
  from jdiff.pipelines import StableDiffusion
  return StableDiffusion.from_diffusers(path, **options)


def _load_workdir(path: str, **options: Any) -> Any:
  """A training workdir (``train.ldm``, ``train.lora``, ``train.lcm``, ``train.controlnet``) as a
  :class:`~jdiff.pipelines.StableDiffusion` (EMA weights; :func:`jdiff.ldm.load_path`)."""
  if options:
    raise UsageError(f"--workdir models take no {', '.join(sorted(options))} option")
  from jdiff.ldm import load_path
  try:
    return load_path(path, what="--workdir model", flag="--workdir")
  except FileNotFoundError as err:
    raise UsageError(str(err)) from None


SOURCES: dict[str, Callable[..., Any]] = {"diffusers": _load_diffusers, "workdir": _load_workdir}


def register_source(kind: str, loader: Callable[..., Any]) -> None:
  """Adds a pipeline source ``kind`` (a ``--kind PATH`` flag of the sampling programs)."""
  if kind in SOURCES:
    raise ValueError(f"pipeline source {kind!r} registered twice")
  SOURCES[kind] = loader


def load_pipeline(kind: str, path: str, **options: Any) -> Any:
  """Builds a pipeline-like object (``generate(prompts, *, key, ...)``) from a source; ``options``
  go to the source's loader (``controlnet=[...]`` for ``diffusers``).

  Raises:
    UsageError: unknown kind or missing folder.
  """
  if kind not in SOURCES:
    raise UsageError(f"unknown pipeline source {kind!r}; available: {sorted(SOURCES)}")
  if not Path(path).exists():
    raise UsageError(f"--{kind} folder {path!r} does not exist")
  return SOURCES[kind](path, **options)


def make_grid(images: np.ndarray, *, cols: int | None = None, pad: int = 2) -> np.ndarray:
  """Tiles float images ``[N, H, W, C]`` in [0, 1] into one uint8 image ``[rows*(H+pad)-pad, ...]``.

  Example:
    >>> make_grid(np.zeros((3, 8, 8, 3)), cols=2).shape
    (18, 18, 3)
  """
  images = np.asarray(images, np.float32)
  if images.ndim != 4:
    raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
  n, h, w, c = images.shape
  cols = min(n, cols or int(np.ceil(np.sqrt(n))))
  rows = int(np.ceil(n / cols))
  grid = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, c), 255, np.uint8)
  pixels = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    grid[r * (h + pad): r * (h + pad) + h, q * (w + pad): q * (w + pad) + w] = pixels[i]
  return grid


def save_png(path: str | Path, grid: np.ndarray) -> Path:
  """Writes a uint8 ``[H, W, 3]`` (or ``[H, W, 1]``) array as PNG, creating parent folders."""
  from PIL import Image
  out = Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(out, format="PNG")
  return out


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None, *,
        prog: str = "jdiff") -> int:
  """Runs ``main(argv)``; user mistakes (UsageError, FileNotFoundError, ValueError) become one line
  ``prog: error: ...`` on stderr and exit code 2; anything else propagates (a real bug)."""
  from jdiff import parallel
  parallel.enable_compilation_cache()
  try:
    return int(main(argv) or 0)
  except (UsageError, FileNotFoundError, NotADirectoryError, ValueError) as err:
    sys.stderr.write(f"{prog}: error: {err}\n")
    return EXIT_USAGE
  except KeyboardInterrupt:
    sys.stderr.write(f"{prog}: interrupted\n")
    return 130
