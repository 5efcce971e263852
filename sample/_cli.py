"""Shared helpers of the sampling programs: argument parsing with one-line errors, loading a pipeline
from a source, PNG grids.

Extension point: :data:`SOURCES` maps a source kind (the command-line flag name: ``diffusers``, ``workdir``,
``single_file``) to a function ``path -> pipeline`` returning an object with ``generate(prompts, *, key, ...)``
like :class:`jdiff.pipelines.StableDiffusion`; :func:`register_source` adds a kind (``txt2img`` gains a
``--KIND`` flag). :func:`add_model_flags` and :func:`load_model` are the one way every sampling program
reads its model: the source, ``--config`` / ``--family`` / ``--tokenizer`` for a single file, and
``--textual_inversion`` embeddings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn

import numpy as np

__all__ = ["ArgumentParser", "UsageError", "SOURCES", "register_source", "load_pipeline", "add_model_flags",
           "add_model_options", "source_kind", "load_model", "read_image", "to_uint8", "make_grid", "save_png", "run"]

EXIT_USAGE = 2
FAMILIES = ("sd15", "sd21", "sd21-base")  # single-file model families (jdiff.convert.single_file)


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


def _load_single_file(path: str, *, config: str | None = None, family: str | None = None,
                      tokenizer: str | None = None) -> Any:
  """An original-layout single ``.safetensors`` checkpoint (SD 1.x / 2.x) with its configs from a
  diffusers folder (``--config``) or a model family (``--family`` and ``--tokenizer``)."""
  if config is None and family is None:
    raise UsageError("--single_file needs --config FOLDER (a diffusers pipeline folder) or --family "
                     f"({', '.join(FAMILIES)}) with --tokenizer FOLDER")
  if config is not None and family is not None:
    raise UsageError("give --config or --family, not both")
  if family is not None and tokenizer is None:
    raise UsageError(f"--family {family} needs --tokenizer FOLDER (the file holds no vocabulary)")
  for flag, folder in (("--config", config), ("--tokenizer", tokenizer)):
    if folder is not None and not Path(folder).is_dir():
      raise UsageError(f"{flag} folder {folder!r} does not exist")
  from jdiff.pipelines import StableDiffusion
  return StableDiffusion.from_single_file(path, family=family, config=config, tokenizer=tokenizer)


SOURCES: dict[str, Callable[..., Any]] = {"diffusers": _load_diffusers, "workdir": _load_workdir,
                                          "single_file": _load_single_file}
SINGLE_FILE_OPTIONS = ("config", "family", "tokenizer")


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
    raise UsageError(f"--{kind} {'file' if kind == 'single_file' else 'folder'} {path!r} does not exist")
  return SOURCES[kind](path, **options)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
  """The model flags: one source ``--KIND PATH`` per :data:`SOURCES` entry (required), the single-file
  options and textual-inversion embeddings."""
  source = parser.add_mutually_exclusive_group(required=True)
  for kind in sorted(SOURCES):
    source.add_argument(f"--{kind}", metavar="PATH", help=f"load the model from a {kind} "
                        f"{'.safetensors file (original layout)' if kind == 'single_file' else 'folder'}")
  add_model_options(parser)


def add_model_options(parser: argparse.ArgumentParser) -> None:
  """``--config`` / ``--family`` / ``--tokenizer`` (with ``--single_file``) and ``--textual_inversion``
  / ``--token`` (any source); for programs that build their own source flags."""
  parser.add_argument("--config", metavar="FOLDER", default=None,
                      help="with --single_file: a diffusers pipeline folder giving configs, tokenizer, scheduler")
  parser.add_argument("--family", choices=FAMILIES, default=None,
                      help="with --single_file: the model family (then --tokenizer), instead of --config")
  parser.add_argument("--tokenizer", metavar="FOLDER", default=None,
                      help="with --single_file: a CLIP tokenizer folder (vocab.json, merges.txt)")
  parser.add_argument("--textual_inversion", "--textual-inversion", action="append", default=[], metavar="FILE",
                      help="textual-inversion embedding (.safetensors, diffusers or A1111 layout); repeatable")
  parser.add_argument("--token", action="append", default=[], metavar="T",
                      help="the token of the matching --textual_inversion (default: the name in the file)")


def source_kind(args: argparse.Namespace) -> str:
  """The source flag given (``diffusers``, ``workdir``, ``single_file``, ...)."""
  kinds = [k for k in sorted(SOURCES) if getattr(args, k, None) is not None]
  if len(kinds) != 1:
    raise UsageError(f"give one model source: {', '.join('--' + k for k in sorted(SOURCES))}")
  return kinds[0]


def load_model(args: argparse.Namespace, **options: Any) -> Any:
  """The pipeline the parsed flags of :func:`add_model_flags` name, with its textual-inversion
  embeddings added; ``options`` go to the source's loader.

  Raises:
    UsageError: single-file options without ``--single_file``, ``--token`` values that do not match
      the ``--textual_inversion`` files, missing files.
  """
  kind = source_kind(args)
  single = {k: getattr(args, k, None) for k in SINGLE_FILE_OPTIONS if getattr(args, k, None) is not None}
  if single and kind != "single_file":
    raise UsageError(f"{', '.join('--' + k for k in single)} only apply with --single_file")
  files, tokens = list(getattr(args, "textual_inversion", []) or []), list(getattr(args, "token", []) or [])
  if tokens and len(tokens) != len(files):
    raise UsageError(f"{len(tokens)} --token values for {len(files)} --textual_inversion files (give one each, "
                     "or none to use the names in the files)")
  for file in files:
    if not Path(file).exists():
      raise UsageError(f"--textual_inversion file {file!r} does not exist")
  pipe = load_pipeline(kind, getattr(args, kind), **single, **options)
  for file, token in zip(files, tokens or [None] * len(files)):
    pipe = pipe.load_textual_inversion(file, token=token)
  return pipe


def read_image(path: str, *, flag: str = "--image", mode: str = "RGB") -> np.ndarray:
  """An image file as float32 ``[H, W, C]`` in [0, 1] (``mode`` "RGB", "L" for one channel).

  Raises:
    UsageError: the file is missing or not a readable image.
  """
  from PIL import Image, UnidentifiedImageError

  if not Path(path).is_file():
    raise UsageError(f"{flag} file {path!r} does not exist")
  try:
    with Image.open(path) as im:
      pixels = np.asarray(im.convert(mode), np.float32) / 255.0
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
    raise UsageError(f"{flag} {path!r} is not a readable image ({' '.join(str(err).split())})") from None
  return pixels[..., None] if pixels.ndim == 2 else pixels


def to_uint8(image: np.ndarray) -> np.ndarray:
  """A float image ``[H, W, C]`` in [0, 1] as uint8 (the pixels :func:`make_grid` writes)."""
  return make_grid(np.asarray(image)[None], cols=1)


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
