"""The training loop shared by ``train.vae`` and ``train.ldm``, and the command-line plumbing.

A program describes WHAT to train as a :class:`Task` (parameter init, loss, frozen inputs, how to
draw sample grids); :func:`train` does the rest: mesh and shardings, optimizer, state init or
resume from the workdir's latest Orbax checkpoint (model + optimizer + EMA + rng + data position),
the jitted step, progress lines (step, loss, steps/s, ETA), TensorBoard scalars (tensorboardX),
PNG sample grids from the EMA parameters, periodic and final checkpoints. Only process 0 writes
logs, scalars and images.

Multi-host: every process runs the same command with ``--coordinator HOST:PORT --num_processes N
--process_id I`` (or ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``;
nothing on TPU pods and SLURM, where JAX finds the cluster). :func:`main_wrapper` starts
``jax.distributed`` before anything touches devices; each host reads its block of every global
batch (:class:`jdiff.data.Loader`), the step sees one global array, Orbax writes collectively.

Gradient accumulation: ``train.grad_accum = k`` splits each global batch into ``k`` micro-batches
inside the step (a rematerialised ``lax.scan``: activations of one micro-batch at a time) and
averages their losses, so the update equals one step on the whole batch (per-example losses
averaged); each micro-batch draws its noise from its own key.

Preemption: SIGTERM or SIGINT during training saves a checkpoint at the next step boundary (all
processes agree on the step), waits for it, prints one line and exits with
:data:`EXIT_PREEMPTED` (143 after SIGTERM, 130 after SIGINT, the shell's 128 + signal number);
rerunning the same command resumes. A second signal stops at once. SIGKILL loses only the steps
since the last checkpoint; a corrupt latest checkpoint is skipped (:mod:`jdiff.checkpoint`).

Example:
  >>> state = train(config.train, task, loader, "/tmp/run")
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jdiff import checkpoint, parallel, training
from jdiff.models import layers

__all__ = ["Task", "train", "save_grid", "make_grid", "main_wrapper", "load_config", "apply_overrides",
           "ProgressLogger", "Preempted", "EXIT_PREEMPTED", "EXIT_USAGE", "accumulate_gradients",
           "validate_config", "pop_flag"]

EXIT_USAGE = 2
EXIT_PREEMPTED = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}


class Preempted(Exception):
  """Training stopped on SIGTERM/SIGINT after saving a checkpoint at ``step`` (``step`` is None when
  the signal came before any step of this run and nothing new needed saving)."""

  def __init__(self, signum: int, step: int | None, directory: str):
    self.signum, self.step, self.directory = signum, step, directory
    name = signal.Signals(signum).name
    where = (f"checkpoint saved at step {step} in {directory}" if step is not None
             else f"no new checkpoint needed ({directory})")
    super().__init__(f"{name} received: {where}; rerun the same command to resume")


class _PreemptionGuard:
  """Turns SIGTERM/SIGINT into a flag checked at step boundaries (a second signal stops at once).

  The same signal again within ``REPEAT_S`` seconds counts once: a supervised multi-process child
  (:func:`jdiff.parallel.initialize`) can get a signal both directly and forwarded by its parent."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)
  REPEAT_S = 2.0

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}
    self._depth = 0
    self._first = 0.0

  def _handler(self, signum, frame):
    if self.signum == signum and time.monotonic() - self._first < self.REPEAT_S:
      return  # one signal delivered twice (directly and through a supervising parent)
    if self.signum is not None:  # second signal: the user really means it
      self.uninstall(force=True)
      if signum == signal.SIGINT:
        raise KeyboardInterrupt
      os._exit(128 + signum)
    self.signum, self._first = signum, time.monotonic()

  def install(self) -> None:
    self._depth += 1
    if self._depth > 1 or threading.current_thread() is not threading.main_thread():
      return
    self.signum = None
    for sig in self.SIGNALS:
      self._previous[sig] = signal.signal(sig, self._handler)

  def uninstall(self, force: bool = False) -> None:
    self._depth = 0 if force else max(0, self._depth - 1)
    if self._depth == 0 and self._previous:
      for sig, old in self._previous.items():
        signal.signal(sig, old)
      self._previous = {}

  @property
  def requested(self) -> bool:
    return self.signum is not None


_GUARD = _PreemptionGuard()


@dataclasses.dataclass
class Task:
  """What to train.

  Attributes:
    name: shown in progress lines and used for the sample file names.
    init_params: ``key -> params`` (the trained parameters only), or the parameter tree to start from
      (fine-tuning a pretrained model).
    loss_fn: ``(params, batch, key, frozen) -> (loss, metrics)`` (see :func:`jdiff.training.make_train_step`).
    frozen: pytree of frozen inputs passed to ``loss_fn`` (or None).
    batch_keys: which keys of the loader's batches go to the device.
    sample_fn: optional ``(ema_params, key) -> images [N, H, W, C] in [-1, 1]`` for sample grids.
    grid_cols: columns of the sample grid.
    extra_ema: ``{name: decay}`` of further EMAs of the parameters kept in the train state (e.g. a
      consistency target network; see :func:`jdiff.training.make_train_step`); when given,
      ``loss_fn`` takes the train state before the update as a fifth argument.
  """

  name: str
  init_params: Callable[[jax.Array], Any] | Any
  loss_fn: Callable[..., Any]
  frozen: Any = None
  batch_keys: tuple[str, ...] = ("image",)
  sample_fn: Callable[[Any, jax.Array], jax.Array] | None = None
  grid_cols: int = 10
  extra_ema: dict[str, Any] | None = None


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
    if scalars.get("data/bad_examples"):
      bad += f" replaced examples {int(scalars['data/bad_examples'])}"
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


def accumulate_gradients(loss_fn: Callable[..., Any], steps: int) -> Callable[..., Any]:
  """A loss function averaging ``loss_fn`` over ``steps`` micro-batches of the batch (in-step scan).

  Micro-batch ``j`` holds examples ``j, j + steps, j + 2 * steps, ...`` (so every device keeps an
  equal share of each), its key is ``split(key, steps)[j]``, and the scan body is rematerialised:
  the backward pass holds one micro-batch's activations at a time. For per-example-mean losses the
  gradient equals the full batch's.

  Example:
    >>> loss = accumulate_gradients(loss_fn, 4)   # batch [B] -> 4 micro-batches [B / 4]
  """
  if steps <= 1:
    return loss_fn

  def split(x):  # [B, ...] -> [steps, B / steps, ...]
    b = x.shape[0]
    if b % steps:
      raise ValueError(f"batch of {b} examples is not divisible by grad_accum={steps}")
    return jnp.swapaxes(x.reshape((b // steps, steps) + x.shape[1:]), 0, 1)

  def wrapped(params, batch, key, frozen, *state):
    micro = jax.tree.map(split, batch)
    keys = jax.random.split(key, steps)

    @jax.checkpoint
    def body(carry, inputs):
      mb, k = inputs
      loss, aux = loss_fn(params, mb, k, frozen, *state)
      return carry, (loss, aux)

    _, (losses, auxes) = jax.lax.scan(body, None, (micro, keys))
    return jnp.mean(losses), jax.tree.map(lambda a: jnp.mean(a, axis=0), auxes)

  return wrapped


def _next_batch(loader) -> dict[str, Any]:
  try:
    return next(loader)
  except (ValueError, FileNotFoundError, KeyError):
    raise
  except StopIteration:
    raise ValueError("the data loader ran out of batches") from None
  except Exception as e:  # corrupt dataset files: the reader raises many types
    text = " ".join(str(e).split())[:300]
    raise ValueError(f"cannot read the next batch from the dataset ({type(e).__name__}: {text}); "
                     "the dataset files may be corrupt: re-prepare them") from None


def train(cfg: ml_collections.ConfigDict, task: Task, loader, workdir: str, *, seed: int = 0,
          stream=None) -> training.TrainState:
  """Runs (or resumes) training of ``task`` to ``cfg.steps`` steps in ``workdir``; returns the state.

  ``cfg`` is a train section: steps, learning_rate, warmup_steps, lr_schedule, clip_norm,
  weight_decay, ema_decay, ema_warmup, max_bad_steps, (optional: mu_dtype, nu_dtype: Adam moment storage
  dtypes, e.g. "bfloat16"; ema: false drops the sampling EMA; ema_dtype; attention: the
  :func:`jdiff.models.layers.attention_implementation` the step and sample grids are traced under, e.g.
  "chunked"; conv_backward: the :func:`jdiff.models.layers.convolution_backward`, e.g. "late"; remat_backward:
  the :func:`jdiff.models.layers.remat_backward`, e.g. "late"; cpu_scheduler: XLA:CPU's scheduler for the
  step, :func:`jdiff.training.cpu_scheduler_options`, e.g. "memory"; update_in_backward: the AdamW update
  made in a second backward pass, :func:`jdiff.training.make_train_step`), log_every, checkpoint_every, sample_every,
  keep_checkpoints, fsdp (mesh size of the "fsdp" axis, 1 = replicated params), stop_at (stop
  after this step as if killed; 0 = no), grad_accum (micro-batches per step; optional, default 1).

  Raises:
    Preempted: SIGTERM/SIGINT arrived; a checkpoint of the last finished step was written.
    ValueError: a bad setting or data (one line); training.NonFiniteError: diverged.

  Example:
    >>> state = train(config.train, task, loader, workdir)
  """
  validate_config(cfg)
  _GUARD.install()
  try:
    # both read when the step and the sample grids are traced
    with layers.attention_implementation(cfg.get("attention") or None), \
        layers.convolution_backward(cfg.get("conv_backward") or None), \
        layers.remat_backward(cfg.get("remat_backward") or None):
      return _train(cfg, task, loader, workdir, seed=seed, stream=stream)
  finally:
    _GUARD.uninstall()


def _train(cfg, task, loader, workdir, *, seed, stream) -> training.TrainState:
  out = stream or sys.stdout
  main = parallel.is_main_process()
  checkpoint.check_writable(workdir)  # CheckpointSaveError before anything is compiled
  mesh = parallel.make_mesh(fsdp=int(cfg.fsdp))
  accum = int(cfg.get("grad_accum", 1) or 1)
  local_b = getattr(loader, "local_batch", None)
  if local_b is not None:
    global_b = int(local_b) * jax.process_count()
    n_dev = jax.device_count()
    if global_b % (n_dev * accum):
      raise ValueError(f"the global batch of {global_b} examples is not divisible by {n_dev} devices x "
                       f"grad_accum={accum}; choose a batch size that is a multiple of {n_dev * accum}")
  tx = training.make_optimizer(learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
                               total_steps=cfg.steps, schedule=cfg.lr_schedule, clip_norm=cfg.clip_norm,
                               weight_decay=cfg.weight_decay, mu_dtype=cfg.get("mu_dtype") or None,
                               nu_dtype=cfg.get("nu_dtype") or None)
  ema_opts = dict(ema=bool(cfg.get("ema", True)), ema_dtype=cfg.get("ema_dtype") or None)
  key = jax.random.key(seed)
  fsdp = int(cfg.fsdp) > 1
  state_shape = jax.eval_shape(
      lambda k: training.create_train_state(task.init_params, tx, key=k, mesh=mesh, fsdp=fsdp,
                                            extra_ema=tuple(task.extra_ema or ()), **ema_opts), key)
  shardings = training.state_shardings(state_shape, mesh, fsdp=fsdp)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=cfg.keep_checkpoints)
  try:
    restored = ckpt.restore_latest(_abstract_with_shardings(state_shape, shardings))
    if restored is None:
      state = training.create_train_state(task.init_params, tx, key=key, mesh=mesh, fsdp=fsdp,
                                          extra_ema=tuple(task.extra_ema or ()), **ema_opts)
    else:
      state, data_state = restored
      loader.set_state(data_state.get("loader", {}))
    training.release_host_memory(clear_caches=True)  # the initialiser's executable, freed host buffers
    step_fn = training.make_train_step(accumulate_gradients(task.loss_fn, accum), tx, mesh=mesh,
                                       state_sharding=shardings, frozen=task.frozen,
                                       ema_decay=cfg.ema_decay, ema_warmup=cfg.ema_warmup, extra_ema=task.extra_ema,
                                       max_bad_steps=cfg.max_bad_steps,
                                       compiler_options=training.cpu_scheduler_options(cfg.get("cpu_scheduler") or ""),
                                       update_in_backward=bool(cfg.get("update_in_backward", False)))
    start = int(state.step)
    total = int(cfg.steps)
    stop = min(total, int(cfg.stop_at)) if cfg.stop_at else total
    if parallel.sync_flag(_GUARD.requested):
      raise Preempted(_GUARD.signum or signal.SIGTERM, None, ckpt.directory)
    logger = ProgressLogger(workdir, task.name, total, every=cfg.log_every, stream=stream)
    if start >= stop:
      logger.close()
      return state
    if start and main:
      print(f"[{task.name}] resuming from step {start} ({ckpt.directory})", file=out, flush=True)
    sample_key = jax.random.fold_in(key, 1)
    check_every = max(1, min(int(cfg.log_every), int(cfg.max_bad_steps) or int(cfg.log_every)))
    metrics = None
    try:
      for step in range(start + 1, stop + 1):
        batch = _next_batch(loader)
        batch = parallel.host_to_global({k: batch[k] for k in task.batch_keys}, mesh)
        if step == start + 1:
          step_fn.compile(state, batch)
          # the compiler's buffers and JAX's caches (the step's executable is held by step_fn), before the
          # step's own buffers are allocated
          training.release_host_memory(clear_caches=True)
        state, metrics = step_fn(state, batch)
        if step == start + 1:
          jax.block_until_ready(metrics)
          logger.start(step)  # rates exclude compilation
        if step % check_every == 0 or step == stop:
          step_fn.raise_if_diverged(metrics)  # a host sync: not every step, but within 2N steps of N bad ones
        if step % cfg.log_every == 0 or step == stop:
          # the loader's own counters (e.g. data/bad_examples, this process's replaced examples)
          logger.log(step, {**metrics, **(loader.metrics() if hasattr(loader, "metrics") else {})})
        if task.sample_fn is not None and cfg.sample_every and (step % cfg.sample_every == 0 or step == total):
          images = parallel.global_to_host(task.sample_fn(
              state.sampling_params, sample_key))
          if main:
            save_grid(images, os.path.join(workdir, "samples", f"{task.name}_{step:06d}.png"),
                      cols=task.grid_cols)
        saved = False
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == stop:
          step_fn.raise_if_diverged(metrics)
          ckpt.save(step, state, data_state={"loader": loader.get_state()}, force=True)
          saved = True
        if parallel.sync_flag(_GUARD.requested):  # every process stops at the same step
          if not saved:
            step_fn.raise_if_diverged(metrics)
            ckpt.save(step, state, data_state={"loader": loader.get_state()}, force=True)
          ckpt.wait()
          raise Preempted(_GUARD.signum or signal.SIGTERM, step, ckpt.directory)
    finally:
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
  """Loads a ``configs/*.py`` file (its ``get_config()``); ``FILE.py:ARG`` calls ``get_config(ARG)``
  (a variant, as ml_collections' config flags do)."""
  import importlib.util
  arg = None
  if ":" in os.path.basename(path):
    path, arg = path.rsplit(":", 1)
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location("_jdiff_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config() if arg is None else mod.get_config(arg)


_STATE_DTYPES = ("", None, "float32", "bfloat16")
_TRAIN_KEYS = {
    # key: (types, check, what it must be)
    "steps": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "learning_rate": ((int, float), lambda v: np.isfinite(v) and v > 0, "a finite number > 0"),
    "warmup_steps": ((int,), lambda v: v >= 0, "an integer >= 0"),
    "lr_schedule": ((str,), lambda v: v in ("constant", "cosine"), "'constant' or 'cosine'"),
    "clip_norm": ((int, float, type(None)), lambda v: v is None or (np.isfinite(v) and v > 0),
                  "a finite number > 0 or None"),
    "weight_decay": ((int, float), lambda v: np.isfinite(v) and v >= 0, "a finite number >= 0"),
    "ema_decay": ((int, float), lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "ema_warmup": ((bool,), lambda v: True, "true or false"),
    "max_bad_steps": ((int,), lambda v: v >= 0, "an integer >= 0"),
    "log_every": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "checkpoint_every": ((int,), lambda v: v >= 0, "an integer >= 0"),
    "sample_every": ((int,), lambda v: v >= 0, "an integer >= 0"),
    "keep_checkpoints": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "fsdp": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "stop_at": ((int,), lambda v: v >= 0, "an integer >= 0"),
    "batch_size": ((int,), lambda v: v >= 0, "an integer >= 0 (0: data.batch_size)"),
    "grad_accum": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "mu_dtype": ((str, type(None)), lambda v: v in _STATE_DTYPES, "'', 'float32' or 'bfloat16'"),
    "nu_dtype": ((str, type(None)), lambda v: v in _STATE_DTYPES, "'', 'float32' or 'bfloat16'"),
    "ema": ((bool,), lambda v: True, "true or false"),
    "ema_dtype": ((str, type(None)), lambda v: v in _STATE_DTYPES, "'', 'float32' or 'bfloat16'"),
    "attention": ((str, type(None)), lambda v: v in ("", None, "xla", "cudnn", "chunked"),
                  "'', 'xla', 'cudnn' or 'chunked'"),
    "conv_backward": ((str, type(None)), lambda v: v in ("", None, "autodiff", "late"), "'', 'autodiff' or 'late'"),
    "remat_backward": ((str, type(None)), lambda v: v in ("", None, "autodiff", "late"), "'', 'autodiff' or 'late'"),
    "cpu_scheduler": ((str, type(None)), lambda v: v in ("", None) or v in training.CPU_SCHEDULERS,
                      "'', 'default', 'memory' or 'concurrency'"),
    "update_in_backward": ((bool,), lambda v: True, "true or false"),
}
_OPTIONAL_TRAIN_KEYS = ("batch_size", "grad_accum", "mu_dtype", "nu_dtype", "ema", "ema_dtype", "attention",
                        "conv_backward", "remat_backward", "cpu_scheduler", "update_in_backward")


def validate_config(cfg: ml_collections.ConfigDict, *, prefix: str = "train") -> None:
  """Checks a train section's keys, types and ranges; raises ONE-line ValueError naming the key.

  Unknown keys (typos in a config file), wrong types (``steps="10"``) and impossible values
  (``learning_rate=nan``, ``keep_checkpoints=0``) are rejected before anything is built.

  Example:
    >>> validate_config(config.train)
  """
  for k in cfg.keys():
    if k not in _TRAIN_KEYS:
      raise ValueError(f"unknown config key '{prefix}.{k}'; known: {', '.join(sorted(_TRAIN_KEYS))}")
  for k, (types, ok, what) in _TRAIN_KEYS.items():
    if k not in cfg:
      if k in _OPTIONAL_TRAIN_KEYS:
        continue
      raise ValueError(f"config key {prefix}.{k} is missing")
    v = cfg[k]
    good_type = isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
    if not good_type or not ok(v):
      raise ValueError(f"config key {prefix}.{k} must be {what}, got {v!r}")


def main_wrapper(run: Callable[[ml_collections.ConfigDict, str], Any], *, default_config: str,
                 default_workdir: str, argv: list[str] | None = None) -> int:
  """Parses ``--config FILE --config.a.b=v ... --workdir DIR`` and calls ``run(config, workdir)``.

  Multi-host flags ``--coordinator HOST:PORT --num_processes N --process_id I`` (or the
  ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` environment; automatic on
  TPU pods and SLURM) start ``jax.distributed`` before anything touches devices; processes other
  than 0 print nothing on stdout.

  Exit codes: 0 done; 2 (:data:`EXIT_USAGE`) a user mistake (unknown config key, bad value or type,
  broken config file, missing or corrupt dataset, unreadable images, a checkpoint of a different
  model, every checkpoint corrupt, diverged training, a workdir that is not writable, a checkpoint
  that could not be written), reported as ONE line ``error: ...`` on stderr; 143 / 130
  (:data:`EXIT_PREEMPTED`) stopped by SIGTERM / SIGINT after saving a checkpoint (rerun to resume);
  75 (:data:`jdiff.parallel.EXIT_PEER_LOST`) another process of a multi-process job died, reported
  as one line naming it (relaunch every process to resume from the last complete checkpoint).

  Example:
    >>> sys.exit(main_wrapper(run, default_config="configs/ldm_digits.py", default_workdir="workdir/ldm"))
  """
  from absl import flags
  from ml_collections import config_flags

  parallel.enable_compilation_cache()
  argv = list(sys.argv if argv is None else argv)
  fv = flags.FlagValues()
  try:
    config_flags.DEFINE_config_file("config", default_config, "training config file", flag_values=fv,
                                    lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", default_workdir, "output directory (checkpoints, logs, samples)",
                        flag_values=fv)
    flags.DEFINE_string("coordinator", None, "multi-host: HOST:PORT of process 0's coordinator",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "multi-host: number of processes", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "multi-host: this process's index", flag_values=fv)
    fv(argv)
    config = fv.config
    if not isinstance(config, ml_collections.ConfigDict):
      config.keys()  # a config that failed to load raises its deferred error here
  except (flags.Error, KeyError, AttributeError, ValueError, TypeError, OSError, SyntaxError,
          NameError, ImportError) as e:
    bad = _unknown_override(argv, default_config)
    msg = f"unknown config key {bad!r}" if bad else _config_error(e, argv, default_config)
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_USAGE
  try:
    parallel.initialize(coordinator=fv.coordinator, num_processes=fv.num_processes,
                        process_id=fv.process_id, supervise=True)  # a lost peer: one line, exit 75
    checkpoint.check_writable(fv.workdir)  # before anything is built or compiled
  except (ValueError, checkpoint.CheckpointSaveError) as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return EXIT_USAGE
  quiet = None
  if not parallel.is_main_process():
    quiet = open(os.devnull, "w")
  _GUARD.install()
  try:
    if quiet is not None:
      with _redirect_stdout(quiet):
        run(config, fv.workdir)
    else:
      run(config, fv.workdir)
  except Preempted as e:
    print(f"preempted: {e}", file=sys.stderr, flush=True)
    return EXIT_PREEMPTED.get(e.signum, 128 + int(e.signum))
  except (ValueError, FileNotFoundError, KeyError, training.NonFiniteError, checkpoint.CheckpointSaveError) as e:
    if isinstance(e, checkpoint.CheckpointSaveError):
      # The failed write's sibling tasks are collected at exit, each logging the same error again
      # ("exception was never retrieved"); the line below already reports it.
      logging.getLogger("asyncio").disabled = True
    print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
    return EXIT_USAGE
  finally:
    _GUARD.uninstall()
    if quiet is not None:
      quiet.close()
  return 0


def _redirect_stdout(target):
  import contextlib
  return contextlib.redirect_stdout(target)


def _config_error(e: BaseException, argv: list[str], default_config: str) -> str:
  """One line for a config that failed to load: ml_collections embeds the config file's traceback
  in its message; keep only the final exception line, naming the file."""
  text = str(e)
  if "Traceback (most recent call last)" in text:
    last = [ln.strip() for ln in text.strip().splitlines() if ln.strip()][-1]
    return f"config file {_config_path(argv, default_config)}: {' '.join(last.split())}"
  return _one_line(e)


def pop_flag(argv: list[str], name: str, *, has_value: bool = True) -> tuple[list[str], Any]:
  """Removes a CLI's own flag from ``argv`` before the config flags are parsed.

  ``has_value=True``: ``--name VALUE`` / ``--name=VALUE`` -> (rest, value or None);
  ``has_value=False``: ``--name`` / ``--name=true`` -> (rest, True or False).

  Example:
    >>> pop_flag(["prog", "--base", "d", "--workdir=w"], "base")
    (['prog', '--workdir=w'], 'd')
  """
  out, value, i = [], None if has_value else False, 0
  while i < len(argv):
    a = argv[i]
    if has_value and a == f"--{name}" and i + 1 < len(argv):
      value, i = argv[i + 1], i + 2
      continue
    if has_value and a.startswith(f"--{name}="):
      value = a.split("=", 1)[1]
    elif not has_value and a in (f"--{name}", f"--{name}=true", f"--{name}=True"):
      value = True
    else:
      out.append(a)
    i += 1
  return out, value


def _config_path(argv: list[str], default_config: str) -> str:
  path = default_config
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
  return path


def _one_line(e: BaseException) -> str:
  text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
  return " ".join(str(text).split()) or type(e).__name__


def _unknown_override(argv: list[str], default_config: str) -> str | None:
  """The first ``--config.a.b=v`` of ``argv`` whose key the config file does not have, if any."""
  path = _config_path(argv, default_config)
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


