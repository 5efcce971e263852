"""The training loop shared by ``train.vae`` and ``train.ldm``, and the command-line plumbing.

A program describes WHAT to train as a :class:`Task` (parameter init, loss, frozen inputs, how to
draw sample grids); :func:`train` does the rest: mesh and shardings, optimizer, state init or
resume from the workdir's latest Orbax checkpoint (model + optimizer + EMA + rng + data position),
the jitted step, progress lines (step, loss, steps/s, ETA), TensorBoard scalars (tensorboardX),
PNG sample grids from the EMA parameters, periodic and final checkpoints. Only process 0 writes
logs, scalars and images.

Example:
  >>> state = train(config.train, task, loader, "/tmp/run")
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jdiff import checkpoint, parallel, training

__all__ = ["Task", "train", "save_grid", "make_grid", "main_wrapper", "load_config", "apply_overrides",
           "ProgressLogger"]


@dataclasses.dataclass
class Task:
  """What to train.

  Attributes:
    name: shown in progress lines and used for the sample file names.
    init_params: ``key -> params`` (the trained parameters only).
    loss_fn: ``(params, batch, key, frozen) -> (loss, metrics)`` (see :func:`jdiff.training.make_train_step`).
    frozen: pytree of frozen inputs passed to ``loss_fn`` (or None).
    batch_keys: which keys of the loader's batches go to the device.
    sample_fn: optional ``(ema_params, key) -> images [N, H, W, C] in [-1, 1]`` for sample grids.
    grid_cols: columns of the sample grid.
  """

  name: str
  init_params: Callable[[jax.Array], Any]
  loss_fn: Callable[..., Any]
  frozen: Any = None
  batch_keys: tuple[str, ...] = ("image",)
  sample_fn: Callable[[Any, jax.Array], jax.Array] | None = None
  grid_cols: int = 10


# ----------------------------------------------------------------------------- images


def make_grid(images: np.ndarray, cols: int) -> np.ndarray:
  """[N, H, W, C] floats in [-1, 1] -> uint8 grid [rows*H, cols*W, C] (1-pixel gaps)."""
  images = np.asarray(images, np.float32)
  n, h, w, c = images.shape
  cols = max(1, min(cols, n))
  rows = -(-n // cols)
  grid = np.zeros((rows * (h + 1) - 1, cols * (w + 1) - 1, c), np.uint8)
  pix = np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
  for i in range(n):
    r, k = divmod(i, cols)
    grid[r * (h + 1):r * (h + 1) + h, k * (w + 1):k * (w + 1) + w] = pix[i]
  return grid


def save_grid(images: np.ndarray, path: str, *, cols: int = 10, scale: int = 2) -> str:
  """Writes images [N, H, W, C] in [-1, 1] as one PNG grid (nearest-neighbour upscaled)."""
  from PIL import Image
  grid = make_grid(images, cols)
  if scale > 1:
    grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(grid[:, :, 0] if grid.shape[-1] == 1 else grid).save(path)
  return path


# ----------------------------------------------------------------------------- logging


class ProgressLogger:
  """Periodic progress lines and TensorBoard scalars (process 0 only)."""

  def __init__(self, workdir: str, name: str, total_steps: int, *, every: int, stream=None):
    self.name, self.total, self.every = name, total_steps, max(1, every)
    self.main = parallel.is_main_process()
    self.stream = stream or sys.stdout
    self.writer = None
    if self.main:
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(os.path.join(workdir, "tensorboard", name))
    self.t0 = time.perf_counter()
    self.s0: int | None = None

  def start(self, step: int) -> None:
    """Starts the steps/s clock (call after the first, compiling, step)."""
    self.t0, self.s0 = time.perf_counter(), step

  def log(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.main:
      return
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items() if np.ndim(v) == 0}
    for k, v in scalars.items():
      self.writer.add_scalar(f"{self.name}/{k}", v, step)
    done = step - (self.s0 if self.s0 is not None else step)
    dt = time.perf_counter() - self.t0
    rate = done / dt if dt > 0 else 0.0
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    self.writer.add_scalar(f"{self.name}/steps_per_sec", rate, step)
    extra = "".join(f" {k} {scalars[k]:.4g}" for k in ("grad_norm",) if k in scalars)
    bad = f" skipped {int(scalars['skipped_steps'])}" if scalars.get("skipped_steps") else ""
    print(f"[{self.name}] step {step}/{self.total} loss {scalars.get('loss', float('nan')):.4f}{extra}"
          f" {rate:.2f} steps/s ETA {_fmt_time(eta)}{bad}", file=self.stream, flush=True)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.flush()
      self.writer.close()


def _fmt_time(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  m, s = divmod(int(round(seconds)), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


# ----------------------------------------------------------------------------- the loop


def _abstract_with_shardings(state_shape: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_shape, shardings)


def train(cfg: ml_collections.ConfigDict, task: Task, loader, workdir: str, *, seed: int = 0,
          stream=None) -> training.TrainState:
  """Runs (or resumes) training of ``task`` to ``cfg.steps`` steps in ``workdir``; returns the state.

  ``cfg`` is a train section: steps, learning_rate, warmup_steps, lr_schedule, clip_norm,
  weight_decay, ema_decay, ema_warmup, max_bad_steps, log_every, checkpoint_every, sample_every,
  keep_checkpoints, fsdp (mesh size of the "fsdp" axis, 1 = replicated params), stop_at (stop
  after this step as if killed; 0 = no).

  Example:
    >>> state = train(config.train, task, loader, workdir)
  """
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.make_mesh(fsdp=int(cfg.fsdp))
  tx = training.make_optimizer(learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
                               total_steps=cfg.steps, schedule=cfg.lr_schedule, clip_norm=cfg.clip_norm,
                               weight_decay=cfg.weight_decay)
  key = jax.random.key(seed)
  fsdp = int(cfg.fsdp) > 1
  state_shape = jax.eval_shape(
      lambda k: training.create_train_state(task.init_params, tx, k, mesh=mesh, fsdp=fsdp), key)
  shardings = training.state_shardings(state_shape, mesh, fsdp=fsdp)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=cfg.keep_checkpoints)
  try:
    restored = ckpt.restore_latest(_abstract_with_shardings(state_shape, shardings))
    if restored is None:
      state = training.create_train_state(task.init_params, tx, key, mesh=mesh, fsdp=fsdp)
    else:
      state, data_state = restored
      loader.set_state(data_state.get("loader", {}))
    step_fn = training.make_train_step(task.loss_fn, tx, mesh=mesh, state_sharding=shardings,
                                       frozen=task.frozen, ema_decay=cfg.ema_decay,
                                       ema_warmup=cfg.ema_warmup, max_bad_steps=cfg.max_bad_steps)
    start = int(state.step)
    total = int(cfg.steps)
    stop = min(total, int(cfg.stop_at)) if cfg.stop_at else total
    logger = ProgressLogger(workdir, task.name, total, every=cfg.log_every, stream=stream)
    if start >= stop:
      logger.close()
      return state
    if start:
      print(f"[{task.name}] resuming from step {start} ({ckpt.directory})", file=stream or sys.stdout,
            flush=True)
    sample_key = jax.random.fold_in(key, 1)
    check_every = max(1, min(int(cfg.log_every), int(cfg.max_bad_steps) or int(cfg.log_every)))
    metrics = None
    for step in range(start + 1, stop + 1):
      batch = next(loader)
      batch = parallel.host_to_global({k: batch[k] for k in task.batch_keys}, mesh)
      state, metrics = step_fn(state, batch)
      if step == start + 1:
        jax.block_until_ready(metrics)
        logger.start(step)  # rates exclude compilation
      if step % check_every == 0 or step == stop:
        step_fn.raise_if_diverged(metrics)  # a host sync: not every step, but within 2N steps of N bad ones
      if step % cfg.log_every == 0 or step == stop:
        logger.log(step, metrics)
      if task.sample_fn is not None and cfg.sample_every and (step % cfg.sample_every == 0 or step == total):
        images = parallel.global_to_host(task.sample_fn(state.ema_params, sample_key))
        if parallel.is_main_process():
          save_grid(images, os.path.join(workdir, "samples", f"{task.name}_{step:06d}.png"),
                    cols=task.grid_cols)
      if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == stop:
        step_fn.raise_if_diverged(metrics)
        ckpt.save(step, state, data_state={"loader": loader.get_state()}, force=True)
    logger.close()
    return state
  finally:
    ckpt.close()


# ----------------------------------------------------------------------------- configs & CLI


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted keys (``{"train.steps": 5}``); an unknown key raises one-line ValueError."""
  for dotted, value in overrides.items():
    node = config
    parts = dotted.split(".")
    for i, p in enumerate(parts):
      if not isinstance(node, (ml_collections.ConfigDict, dict)) or p not in node:
        raise ValueError(f"unknown config key {'.'.join(parts[:i + 1])!r}")
      if i == len(parts) - 1:
        node[p] = value
      else:
        node = node[p]
  return config


def load_config(path: str) -> ml_collections.ConfigDict:
  """Loads a ``configs/*.py`` file (its ``get_config()``)."""
  import importlib.util
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location("_jdiff_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def main_wrapper(run: Callable[[ml_collections.ConfigDict, str], Any], *, default_config: str,
                 default_workdir: str, argv: list[str] | None = None) -> int:
  """Parses ``--config FILE --config.a.b=v ... --workdir DIR`` and calls ``run(config, workdir)``.

  User mistakes (unknown config key, missing dataset or file, unreadable images, a checkpoint of a
  different model, diverged training) print ONE line ``error: ...`` to stderr and return 2.
  """
  from absl import flags
  from ml_collections import config_flags

  argv = list(sys.argv if argv is None else argv)
  fv = flags.FlagValues()
  try:
    config_flags.DEFINE_config_file("config", default_config, "training config file", flag_values=fv,
                                    lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", default_workdir, "output directory (checkpoints, logs, samples)",
                        flag_values=fv)
    fv(argv)
    config = fv.config
  except (flags.Error, KeyError, AttributeError, ValueError, TypeError, FileNotFoundError) as e:
    bad = _unknown_override(argv, default_config)
    msg = f"unknown config key {bad!r}" if bad else _one_line(e)
    print(f"error: {msg}", file=sys.stderr)
    return 2
  try:
    run(config, fv.workdir)
  except (ValueError, FileNotFoundError, KeyError, training.NonFiniteError) as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return 2
  return 0


def _one_line(e: BaseException) -> str:
  text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
  return " ".join(str(text).split()) or type(e).__name__


def _unknown_override(argv: list[str], default_config: str) -> str | None:
  """The first ``--config.a.b=v`` of ``argv`` whose key the config file does not have, if any."""
  path = default_config
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
  try:
    config = load_config(path)
  except Exception:  # the config itself is broken: let the original error speak
    return None
  for arg in argv:
    if arg.startswith("--config."):
      dotted = arg[len("--config."):].split("=", 1)[0]
      node = config
      for part in dotted.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
          return dotted
        node = node[part]
  return None


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Saves the run's config as ``workdir/config.json`` (process 0) so samplers can rebuild the models."""
  if parallel.is_main_process():
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as fh:
      fh.write(config.to_json_best_effort(indent=2))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in ``workdir`` was trained with."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
  with open(path) as fh:
    return ml_collections.ConfigDict(json.load(fh))


