"""Peak memory of the SD1.5 UNet fine-tune step: jdiff vs diffusers (PyTorch CPU), each case in its own process.

The step is the UNet part of a Stable Diffusion 1.5 full fine-tune: epsilon loss on ``q_sample``
(scaled-linear schedule) of random latents [B, 64, 64, 4] (512 px images) with random text
embeddings [B, 77, 768], backward, global-norm clipping to 1.0, AdamW (lr 1e-4, weight decay 0.01)
and an EMA update (decay 0.999 with warmup), float32 master weights. The frozen VAE and CLIP text
encoder of a real fine-tune are not built: they only produce the latents and text embeddings
(outside the differentiated step, and a few hundred MB next to the UNet's state), so random
arrays of the right shapes give the same UNet step and the same memory for the UNet's state.

Each case runs in a SEPARATE subprocess (so one case's allocator, compilation caches and freed
memory never count toward another's), which reports:

* jdiff: XLA's compiled memory analysis of the jitted, donated step (argument, output, alias and
  temporary bytes), compile seconds, seconds per step; the state is built, then the step compiled
  ahead of time, with freed C-heap pages returned to the OS after each, as ``train.loop`` does
  (``--no-trim`` keeps them; ``--compile-first`` compiles before the state exists);
* both sides: the process's peak resident set from start to after the last step (``VmHWM`` of
  ``/proc/self/status``, and ``ru_maxrss``): model init and compilation included, as a user's
  process must survive them too.

The diffusers side builds ``UNet2DConditionModel.from_config`` from the config dict of
``UNetConfig.sd15().to_diffusers_config()`` (no download), random init, ``torch.optim.AdamW``,
``diffusers.training_utils.EMAModel``, gradient checkpointing off or on.

The floor is parameters + gradients + two AdamW moments + EMA in bytes, from the exact parameter
count and the storage dtypes of the case. On a shared machine the parent skips a case when the
available memory (``MemAvailable``) is under the case's estimate, and kills a case whose process
pushes ``MemAvailable`` under ``--reserve-gib`` (recorded as killed, with the RSS reached).

    python -m bench.memory [--batch 1] [--cases f32-lean,f32-remat-lean,bf16-noema-lean,torch,torch-ckpt]
                           [--steps 3] [--size 64] [--compile-only] [--out bench_memory.json]
    python -m bench.memory --batch 4
    python -m bench.memory --cases f32-chunked --compilation-cache /tmp/jax_cache   # twice: warm compile
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

__all__ = ["Case", "CASES", "floor_bytes", "count_params", "jdiff_worker", "torch_worker", "run_case", "main"]

GIB = 2**30
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default
CLIP_NORM = 1.0
EMA_DECAY = 0.999
CONTEXT_LEN = 77
_BYTES = {"float32": 4, "bfloat16": 2, None: 0}


@dataclasses.dataclass(frozen=True)
class Case:
  """One measured configuration.

  Attributes:
    name: the case's name on the command line.
    side: "jdiff" or "diffusers".
    remat: jdiff ``UNetConfig.remat`` / diffusers gradient checkpointing.
    moments: storage dtype of both AdamW moments ("float32" or "bfloat16"; diffusers: float32).
    ema: storage dtype of the EMA ("float32", "bfloat16"), or None for no EMA.
    attention: jdiff's attention implementation while the step is traced (None: the default;
      "chunked": :func:`jdiff.models.layers.attention_implementation` ``"chunked"``).
    conv: jdiff's convolution backward while the step is traced (None: autodiff; "late":
      :func:`jdiff.models.layers.convolution_backward` ``"late"``).
    remat_bwd: jdiff's recomputation of rematerialised blocks (None: ``nn.remat``; "late":
      :func:`jdiff.models.layers.remat_backward` ``"late"``).
    scheduler: XLA:CPU's scheduler for the step (:func:`jdiff.training.cpu_scheduler_options`; None:
      XLA's default).
    update: where the AdamW update is made (None: after the backward pass, from all the gradients;
      "backward": ``make_train_step(update_in_backward=True)``, each parameter's update in a second
      backward pass, the gradients never held together).
  """
  name: str
  side: str
  remat: bool
  moments: str = "float32"
  ema: str | None = "float32"
  attention: str | None = None
  conv: str | None = None
  remat_bwd: str | None = None
  scheduler: str | None = None
  update: str | None = None


CASES: dict[str, Case] = {c.name: c for c in [
    Case("f32", "jdiff", False),
    Case("f32-remat", "jdiff", True),
    Case("bf16", "jdiff", False, "bfloat16", "bfloat16"),
    Case("bf16-remat", "jdiff", True, "bfloat16", "bfloat16"),
    Case("bf16-noema", "jdiff", False, "bfloat16", None),
    Case("bf16-noema-remat", "jdiff", True, "bfloat16", None),
    Case("f32-chunked", "jdiff", False, attention="chunked"),
    Case("f32-remat-chunked", "jdiff", True, attention="chunked"),
    Case("bf16-chunked", "jdiff", False, "bfloat16", "bfloat16", attention="chunked"),
    Case("bf16-noema-chunked", "jdiff", False, "bfloat16", None, attention="chunked"),
    Case("f32-late", "jdiff", False, attention="chunked", conv="late"),
    Case("f32-remat-late", "jdiff", True, attention="chunked", conv="late"),
    Case("bf16-noema-late", "jdiff", False, "bfloat16", None, attention="chunked", conv="late"),
    Case("f32-lean", "jdiff", False, attention="chunked", conv="late", scheduler="memory"),
    Case("f32-remat-lean", "jdiff", True, attention="chunked", conv="late", remat_bwd="late"),
    Case("bf16-noema-lean", "jdiff", False, "bfloat16", None, attention="chunked", conv="late",
         scheduler="memory"),
    Case("f32-2pass", "jdiff", False, attention="chunked", conv="late", scheduler="memory", update="backward"),
    Case("f32-remat-2pass", "jdiff", True, attention="chunked", conv="late", remat_bwd="late",
         update="backward"),
    Case("bf16-noema-2pass", "jdiff", False, "bfloat16", None, attention="chunked", conv="late",
         scheduler="memory", update="backward"),
    Case("torch", "diffusers", False),
    Case("torch-ckpt", "diffusers", True),
]}
DEFAULT_CASES = "f32-lean,f32-remat-lean,bf16-noema-lean,torch,torch-ckpt"


def floor_bytes(n_params: int, case: Case) -> int:
  """Parameters (float32) + gradients (float32) + both AdamW moments + EMA, in bytes.

  Example:
    >>> floor_bytes(10, CASES["f32"]), floor_bytes(10, CASES["bf16-noema"])
    (200, 120)
  """
  return n_params * (4 + 4 + 2 * _BYTES[case.moments] + _BYTES[case.ema])


def unet_config(model: str, size: int, remat: bool = False):
  """The UNet of the step: ``"sd15"`` (SD1.5, 859,520,964 parameters) or ``"tiny"`` (tests)."""
  from jdiff.models import UNetConfig

  if model == "sd15":
    return UNetConfig.sd15(sample_size=size, remat=remat)
  if model == "tiny":
    return UNetConfig.tiny(sample_size=size, remat=remat)
  raise ValueError(f"unknown model {model!r}; expected 'sd15' or 'tiny'")


def count_params(model: str) -> int:
  """The UNet's exact parameter count (``jax.eval_shape`` of its init: nothing is allocated)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jdiff.models import UNet

  cfg = unet_config(model, 8)
  d = cfg.per_block("cross_attention_dim")[0]
  shapes = jax.eval_shape(lambda k: UNet(cfg).init(k, jnp.zeros((1, 8, 8, cfg.in_channels)), jnp.zeros((1,), jnp.int32),
                                                    jnp.zeros((1, CONTEXT_LEN, d)))["params"], jax.random.key(0))
  return int(sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)))


def _host_batch(cfg, batch: int, size: int, seed: int = 0) -> dict[str, Any]:
  import numpy as np

  rng = np.random.default_rng(seed)
  shape = (batch, size, size, cfg.in_channels)
  d = cfg.per_block("cross_attention_dim")[0]
  return {"latents": rng.standard_normal(shape).astype(np.float32),
          "context": rng.standard_normal((batch, CONTEXT_LEN, d)).astype(np.float32),
          "t": rng.integers(0, 1000, batch).astype(np.int32),
          "noise": rng.standard_normal(shape).astype(np.float32)}


def _peak_rss() -> dict[str, int]:
  out = {"ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
  try:
    with open("/proc/self/status") as fh:
      for line in fh:
        if line.startswith("VmHWM:"):
          out["vmhwm_bytes"] = int(line.split()[1]) * 1024
        elif line.startswith("VmRSS:"):
          out["rss_now_bytes"] = int(line.split()[1]) * 1024
  except OSError:
    pass
  out["peak_rss_bytes"] = out.get("vmhwm_bytes", out["ru_maxrss_bytes"])
  return out


def _stage(name: str, **extra: Any) -> None:
  """Prints ``STAGE {"stage": name, "peak_rss_bytes": ..., **extra}`` (flushed): the parent keeps these even
  if it kills the process, so a killed case says how far it got (and its XLA analysis, once compiled)."""
  print("STAGE" + json.dumps({"stage": name, **_peak_rss(), **extra}), flush=True)


def jdiff_worker(spec: dict[str, Any]) -> dict[str, Any]:
  """One jdiff case in this process: init, compile (memory analysis), ``spec["steps"]`` steps."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jdiff import diffusion, parallel, schedules, training
  from jdiff.models import UNet, layers

  case = CASES[spec["case"]]
  if spec.get("cache"):
    parallel.enable_compilation_cache(spec["cache"], min_compile_seconds=0.0)
  cfg = unet_config(spec["model"], spec["size"], case.remat)
  unet = UNet(cfg)
  sched = schedules.make("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
  mesh = parallel.make_mesh()
  moments = jnp.dtype(case.moments)
  tx = training.make_optimizer(learning_rate=LEARNING_RATE, clip_norm=CLIP_NORM, weight_decay=WEIGHT_DECAY,
                               mu_dtype=moments, nu_dtype=moments)
  host = _host_batch(cfg, spec["batch"], spec["size"])
  d = cfg.per_block("cross_attention_dim")[0]
  x = jnp.zeros((1, spec["size"], spec["size"], cfg.in_channels), jnp.float32)

  def init_fn(k):
    return unet.init(k, x, jnp.zeros((1,), jnp.int32), jnp.zeros((1, CONTEXT_LEN, d), jnp.float32))["params"]

  def make_state(key):
    return training.create_train_state(init_fn, tx, key=key, mesh=mesh, ema=case.ema is not None,
                                       ema_dtype=case.ema)

  def loss_fn(params, batch, key, frozen):
    del frozen

    def model_fn(x_t, t):
      return unet.apply({"params": params}, x_t, t, batch["context"])

    return diffusion.loss(model_fn, sched, batch["latents"], key=key, t=batch["t"], noise=batch["noise"]), {}

  out: dict[str, Any] = {}
  t0 = time.perf_counter()
  abstract = jax.eval_shape(make_state, jax.random.key(0))
  shardings = training.state_shardings(abstract, mesh)
  step = training.make_train_step(loss_fn, tx, mesh=mesh, state_sharding=shardings, ema_decay=EMA_DECAY,
                                  ema_warmup=True,
                                  compiler_options=training.cpu_scheduler_options(case.scheduler or ""),
                                  update_in_backward=case.update == "backward")
  out["params"] = int(sum(np.size(p) for p in jax.tree.leaves(abstract.params)))
  out["state_bytes"] = int(sum(s.size * s.dtype.itemsize for s in jax.tree.leaves(abstract)))
  _stage("imported")
  state = None
  batch = jax.device_put({k: jnp.asarray(v) for k, v in host.items()}, parallel.batch_sharding(mesh))

  def init():
    t0 = time.perf_counter()
    st = make_state(jax.random.key(0))
    jax.block_until_ready(st)
    out["init_s"] = time.perf_counter() - t0
    if spec.get("trim"):
      out["trimmed_after_init"] = training.release_host_memory(clear_caches=True)
    rss = _peak_rss()
    out["rss_after_init"], out["rss_now_after_init"] = rss["peak_rss_bytes"], rss.get("rss_now_bytes")
    _stage("initialised")
    return st

  def compile_step():
    t0 = time.perf_counter()
    with layers.attention_implementation(case.attention), layers.convolution_backward(case.conv), \
        layers.remat_backward(case.remat_bwd):
      # Lowered against the abstract state: the same program as for the concrete one (shapes, dtypes,
      # shardings), so it may be compiled before the state exists.
      compiled = step.jitted.lower(abstract, batch, step.frozen).compile()
    out["compile_s"] = time.perf_counter() - t0
    if spec.get("trim"):
      out["trimmed_after_compile"] = training.release_host_memory(clear_caches=True)
    mem = compiled.memory_analysis()
    if mem is not None:
      out["xla"] = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in
                    ("argument", "output", "alias", "temp", "generated_code")}
    rss = _peak_rss()
    out["rss_after_compile"], out["rss_now_after_compile"] = rss["peak_rss_bytes"], rss.get("rss_now_bytes")
    _stage("compiled", xla=out.get("xla"), compile_s=out["compile_s"])
    return compiled

  if spec.get("compile_first", False) or spec["compile_only"]:
    compiled = compile_step()
    state = None if spec["compile_only"] else init()
  else:
    state = init()
    compiled = compile_step()
  out["order"] = "compile-first" if spec.get("compile_first") else "init-first"
  if state is not None:
    times, losses = [], []
    for _ in range(spec["steps"]):
      t0 = time.perf_counter()
      state, metrics = compiled(state, batch, step.frozen)
      losses.append(float(metrics["loss"]))
      times.append(time.perf_counter() - t0)
      _stage(f"step {len(times)}")
    out.update(step_s=times, losses=losses, finite=bool(metrics["finite"]))
  out.update(_peak_rss())
  return out


def torch_worker(spec: dict[str, Any]) -> dict[str, Any]:
  """One diffusers case in this process: ``from_config`` init, AdamW, EMAModel, ``spec["steps"]`` steps."""
  import numpy as np
  import torch
  from diffusers import UNet2DConditionModel
  from diffusers.training_utils import EMAModel

  from jdiff import schedules

  case = CASES[spec["case"]]
  cfg = unet_config(spec["model"], spec["size"])
  torch.manual_seed(0)
  t0 = time.perf_counter()
  model = UNet2DConditionModel.from_config(cfg.to_diffusers_config()).train()
  if case.remat:
    model.enable_gradient_checkpointing()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
  ema = EMAModel(model.parameters(), decay=EMA_DECAY)
  out: dict[str, Any] = {"params": int(sum(p.numel() for p in params)), "init_s": time.perf_counter() - t0,
                         "rss_after_init": _peak_rss()["peak_rss_bytes"]}
  _stage("initialised")
  host = _host_batch(cfg, spec["batch"], spec["size"])
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  lat, noise = nchw(host["latents"]), nchw(host["noise"])
  ctx, t = torch.from_numpy(host["context"]), torch.from_numpy(host["t"].astype(np.int64))
  sched = schedules.make("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
  abar = torch.from_numpy(np.array(sched.alphas_cumprod, np.float32))
  times, losses = [], []
  for _ in range(spec["steps"]):
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    a = abar[t].reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * lat + (1 - a).sqrt() * noise
    pred = model(x_t, t, encoder_hidden_states=ctx).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
    opt.step()
    ema.step(model.parameters())
    losses.append(float(loss.detach()))
    times.append(time.perf_counter() - t0)
    _stage(f"step {len(times)}")
  out.update(step_s=times, losses=losses, torch_threads=torch.get_num_threads())
  out.update(_peak_rss())
  return out


def _mem_available() -> int | None:
  try:
    with open("/proc/meminfo") as fh:
      for line in fh:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    return None
  return None


def _rss_of(pid: int) -> int:
  try:
    with open(f"/proc/{pid}/status") as fh:
      for line in fh:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def run_case(case: Case, *, model: str, batch: int, size: int, steps: int, compile_only: bool = False,
             n_params: int, need_bytes: int | None = None, reserve_bytes: int = GIB,
             timeout_s: float = 3600.0, compile_first: bool = False, trim: bool = True,
             cache: str | None = None) -> dict[str, Any]:
  """Runs ``case`` in a subprocess (``python -m bench.memory --worker ...``) and watches its memory.

  The case is skipped (``status: "skipped"``) when ``MemAvailable`` is under ``need_bytes`` (default:
  1.1x the floor + 1.5 GiB; compile-only jdiff cases need 3 GiB), and killed (``status: "killed"``)
  when, while it runs, ``MemAvailable`` falls under ``reserve_bytes``.

  Returns:
    The worker's dict plus ``case``, ``side``, ``remat``, ``moments``, ``ema``, ``batch``, ``floor_bytes``,
    ``status`` ("ok", "skipped", "killed", "failed"), ``watched_peak_rss_bytes`` (the parent's sampling)
    and ``mem_available_before``.
  """
  floor = floor_bytes(n_params, case)
  res: dict[str, Any] = {"case": case.name, "side": case.side, "remat": case.remat, "moments": case.moments,
                         "ema": case.ema, "attention": case.attention, "conv": case.conv,
                         "remat_bwd": case.remat_bwd, "scheduler": case.scheduler, "update": case.update,
                         "batch": batch, "latent": [size, size], "floor_bytes": floor, "compile_only": compile_only}
  if case.side == "diffusers" and compile_only:
    return {**res, "status": "skipped", "reason": "diffusers has no compile-only mode"}
  if need_bytes is None:
    need_bytes = 3 * GIB if compile_only else int(1.1 * floor + 1.5 * GIB)
  avail = _mem_available()
  res["mem_available_before"] = avail
  if avail is not None and avail < need_bytes:
    return {**res, "status": "skipped",
            "reason": f"{avail / GIB:.1f} GiB available < {need_bytes / GIB:.1f} GiB needed"}
  spec = {"case": case.name, "model": model, "batch": batch, "size": size, "steps": steps,
          "compile_only": compile_only, "compile_first": compile_first, "trim": trim, "cache": cache}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
  if case.side == "jdiff":
    env.setdefault("JAX_PLATFORMS", "cpu")
  with tempfile.TemporaryFile("w+") as fout, tempfile.TemporaryFile("w+") as ferr:
    proc = subprocess.Popen([sys.executable, "-m", "bench.memory", "--worker", json.dumps(spec)], stdout=fout,
                            stderr=ferr, env=env, cwd=root)
    peak, killed, t0 = 0, None, time.monotonic()
    while proc.poll() is None:
      peak = max(peak, _rss_of(proc.pid))
      avail = _mem_available()
      if avail is not None and avail < reserve_bytes:
        killed = f"MemAvailable fell to {avail / GIB:.2f} GiB (reserve {reserve_bytes / GIB:.1f} GiB)"
      elif time.monotonic() - t0 > timeout_s:
        killed = f"timeout after {timeout_s:.0f} s"
      if killed:
        proc.kill()
        proc.wait()
        break
      time.sleep(0.1)
    fout.seek(0)
    ferr.seek(0)
    stdout, stderr = fout.read(), ferr.read()
  res["watched_peak_rss_bytes"] = peak
  res["stages"] = [json.loads(ln[len("STAGE"):]) for ln in stdout.splitlines() if ln.startswith("STAGE")]
  if killed:
    last = res["stages"][-1]["stage"] if res["stages"] else "start"
    known = {k: v for st in res["stages"] for k, v in st.items() if k in ("xla", "compile_s")}
    return {**res, **known, "status": "killed", "reason": f"{killed}, after stage {last!r}"}
  lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT")]
  if proc.returncode != 0 or not lines:
    return {**res, "status": "failed", "reason": f"exit {proc.returncode}: {stderr.strip()[-500:]}"}
  return {**res, **json.loads(lines[-1][len("RESULT"):]), "status": "ok"}


COLUMNS = ["case", "side", "batch", "remat", "moments", "EMA", "attention", "conv bwd", "scheduler", "update", "floor GiB",
           "XLA args GiB", "XLA temp GiB", "peak RSS GiB", "peak/floor", "compile s", "s/step", "status"]


def table_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per case (GiB = 2^30 bytes; s/step is the mean of the steps after the first)."""
  rows = []
  for r in results:
    xla = r.get("xla") or {}
    peak = r.get("peak_rss_bytes")
    steps = r.get("step_s") or []
    later = steps[1:] or steps
    status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"
    if r["status"] == "ok" and r.get("compile_only"):
      status = "compile only (peak RSS: compilation, no state)"
    if r["status"] == "killed":
      status += f" at {r['watched_peak_rss_bytes'] / GIB:.2f} GiB RSS"
    remat = "late" if r["remat"] and r.get("remat_bwd") == "late" else r["remat"]
    rows.append({"case": r["case"], "side": r["side"], "batch": r["batch"], "remat": remat,
                 "moments": r["moments"], "EMA": r["ema"] or "none",
                 "attention": r.get("attention") or ("sdpa" if r["side"] == "diffusers" else "full"),
                 "conv bwd": r.get("conv") or ("-" if r["side"] == "diffusers" else "autodiff"),
                 "scheduler": r.get("scheduler") or ("-" if r["side"] == "diffusers" else "default"),
                 "update": r.get("update") or ("-" if r["side"] == "diffusers" else "after"),
                 "floor GiB": r["floor_bytes"] / GIB,
                 "XLA args GiB": xla["argument"] / GIB if xla else None,
                 "XLA temp GiB": xla["temp"] / GIB if xla else None,
                 "peak RSS GiB": peak / GIB if peak else None,
                 "peak/floor": peak / r["floor_bytes"] if peak and not r.get("compile_only") else None,
                 "compile s": r.get("compile_s"), "s/step": sum(later) / len(later) if later else None,
                 "status": status})
  return rows


def markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
  """A markdown table of ``rows`` (floats to 3 significant digits, or 2 decimals from 10 up)."""
  def fmt(v):
    if v is None:
      return "-"
    if isinstance(v, float):
      return f"{v:.2f}" if abs(v) >= 10 else f"{v:.3g}"
    return str(v)

  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
  p.add_argument("--cases", default=DEFAULT_CASES, help=f"comma list of {', '.join(CASES)}")
  p.add_argument("--model", default="sd15", help="sd15, or tiny (tests)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--size", type=int, default=64, help="latent height = width (64: 512 px images)")
  p.add_argument("--steps", type=int, default=3, help="train steps per case (peak RSS is read after the last)")
  p.add_argument("--compile-only", action="store_true", help="jdiff: compiled memory analysis only, no state")
  p.add_argument("--compile-first", action="store_true",
                 help="jdiff: compile the step against the abstract state before creating the state")
  p.add_argument("--no-trim", action="store_true",
                 help="jdiff: keep freed C-heap pages after init and compile (train.loop returns them to the OS)")
  p.add_argument("--compilation-cache", default=None, metavar="DIR",
                 help="jdiff: JAX's persistent compilation cache in DIR (a second run loads the compiled step)")
  p.add_argument("--need-gib", type=float, default=None,
                 help="skip a case unless this much memory is available (default: 1.1x its floor + 1.5 GiB)")
  p.add_argument("--reserve-gib", type=float, default=1.0,
                 help="kill a case whose process pushes the machine's available memory under this")
  p.add_argument("--timeout", type=float, default=3600.0, help="seconds per case")
  p.add_argument("--out", default=None, help="write results as JSON here")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  if args.worker is not None:
    spec = json.loads(args.worker)
    fn = jdiff_worker if CASES[spec["case"]].side == "jdiff" else torch_worker
    print("RESULT" + json.dumps(fn(spec)), flush=True)
    return 0
  names = [n.strip() for n in args.cases.split(",") if n.strip()]
  unknown = [n for n in names if n not in CASES]
  if unknown:
    raise ValueError(f"unknown case {unknown[0]!r} (choose from {', '.join(CASES)})")
  if args.batch < 1 or args.steps < 1:
    raise ValueError(f"--batch and --steps must be >= 1, got {args.batch} and {args.steps}")
  n_params = count_params(args.model)
  need = None if args.need_gib is None else int(args.need_gib * GIB)
  results = []
  for name in names:
    r = run_case(CASES[name], model=args.model, batch=args.batch, size=args.size, steps=args.steps,
                 compile_only=args.compile_only, n_params=n_params, need_bytes=need,
                 reserve_bytes=int(args.reserve_gib * GIB), timeout_s=args.timeout,
                 compile_first=args.compile_first, trim=not args.no_trim, cache=args.compilation_cache)
    results.append(r)
    print(markdown(table_rows([r]), COLUMNS).splitlines()[-1], flush=True)
  payload = {"benchmark": "train_step_memory", "model": args.model, "params": n_params, "batch": args.batch,
             "latent": [args.size, args.size], "steps": args.steps, "time_utc": time.strftime(
                 "%Y-%m-%d %H:%M", time.gmtime()), "results": results}
  if args.out:
    folder = os.path.dirname(args.out)
    if folder:
      os.makedirs(folder, exist_ok=True)
    with open(args.out, "w") as fh:
      json.dump(payload, fh, indent=2)
      fh.write("\n")
  print(markdown(table_rows(results), COLUMNS))
  return 0


if __name__ == "__main__":
  sys.exit(main())
