"""Train-step throughput of the latent-diffusion UNet: jdiff vs diffusers (PyTorch), same machine, same run.

Both sides train the SAME network (diffusers' ``UNet2DConditionModel`` built from
``UNetConfig.to_diffusers_config()`` and loaded with the jdiff initial weights), on the SAME batch
(latents, text context, timesteps and noise drawn once on the host), with the same work per step:
epsilon loss on ``q_sample`` (scaled-linear schedule), backward, global-norm clipping to 1.0, AdamW
(lr 1e-4, no weight decay) and an EMA update. jdiff runs :func:`jdiff.training.make_train_step`
(one jitted, donated program) around :func:`jdiff.diffusion.loss`; diffusers runs eager PyTorch with
``torch.optim.AdamW``. Before timing, one step on identical weights is compared (loss, gradient norm,
update norm) to prove the work is the same. Timings alternate jdiff / diffusers in one process;
medians and the jdiff/diffusers ratio are reported, with compile (first-step) time and peak memory.

    python -m bench.train [--configs tiny,digits,sd15] [--repeats 7] [--steps 3] [--out bench_train.json]
    python -m bench.train --quick          # tiny only, a few seconds (tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bench import _timing
from jdiff import diffusion, parallel, schedules, training
from jdiff.models import UNet, UNetConfig

__all__ = ["Case", "CASES", "make_case", "JdiffTrainer", "TorchTrainer", "run_case", "main"]

LEARNING_RATE = 1e-4
CLIP_NORM = 1.0
EMA_DECAY = 0.999


@dataclasses.dataclass(frozen=True)
class Case:
  """One benchmark configuration: a UNet config, a batch size, latent size and context length."""
  name: str
  unet: UNetConfig
  batch: int
  size: int  # latent height = width
  context_len: int


def _sd15_small() -> UNetConfig:
  return UNetConfig.sd15(sample_size=16)


CASES: dict[str, Callable[[], Case]] = {
    "tiny": lambda: Case("tiny", UNetConfig.tiny(), batch=8, size=16, context_len=8),
    "digits": lambda: Case("digits", UNetConfig.digits(), batch=64, size=8, context_len=32),
    "sd15": lambda: Case("sd15@16x16", _sd15_small(), batch=1, size=16, context_len=77),
}


def make_case(name: str, *, batch: int | None = None, dtype: str = "float32") -> Case:
  """A named case (``tiny``, ``digits``, ``sd15``) with an optional batch size / compute dtype override."""
  if name not in CASES:
    raise ValueError(f"unknown benchmark config {name!r} (choose from {', '.join(CASES)})")
  case = CASES[name]()
  unet = dataclasses.replace(case.unet, dtype=dtype)
  return dataclasses.replace(case, unet=unet, batch=batch or case.batch)


def make_batch(case: Case, seed: int = 0) -> dict[str, np.ndarray]:
  """Host arrays shared by both sides: latents/noise [B, H, W, C], context [B, L, D], t [B]."""
  rng = np.random.default_rng(seed)
  c = case.unet.in_channels
  d = case.unet.per_block("cross_attention_dim")[0]
  shape = (case.batch, case.size, case.size, c)
  return {"latents": rng.standard_normal(shape).astype(np.float32),
          "context": rng.standard_normal((case.batch, case.context_len, d)).astype(np.float32),
          "t": rng.integers(0, 1000, case.batch).astype(np.int32),
          "noise": rng.standard_normal(shape).astype(np.float32)}


def noise_schedule() -> schedules.Schedule:
  """Stable Diffusion's training schedule (scaled linear, 1000 steps)."""
  return schedules.make("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)


class JdiffTrainer:
  """The jdiff side: ``create_train_state`` + ``make_train_step`` around ``diffusion.loss``."""

  def __init__(self, case: Case, *, seed: int = 0, remat: bool | None = None):
    cfg = case.unet if remat is None else dataclasses.replace(case.unet, remat=remat)
    self.case, self.unet = case, UNet(cfg)
    sched = noise_schedule()
    mesh = parallel.make_mesh()
    self.tx = training.make_optimizer(learning_rate=LEARNING_RATE, clip_norm=CLIP_NORM, weight_decay=0.0)
    d = cfg.per_block("cross_attention_dim")[0]
    x = jnp.zeros((1, case.size, case.size, cfg.in_channels), jnp.float32)
    ctx = jnp.zeros((1, case.context_len, d), jnp.float32)
    unet = self.unet
    self.state = training.create_train_state(
        lambda k: unet.init(k, x, jnp.zeros((1,), jnp.int32), ctx)["params"], self.tx,
        key=jax.random.key(seed), mesh=mesh)

    def loss_fn(params, batch, key, frozen):
      del frozen

      def model_fn(x_t, t):
        return unet.apply({"params": params}, x_t, t, batch["context"])

      return diffusion.loss(model_fn, sched, batch["latents"], key=key, t=batch["t"], noise=batch["noise"]), {}

    shardings = training.state_shardings(self.state, mesh)
    self.step = training.make_train_step(loss_fn, self.tx, mesh=mesh, state_sharding=shardings,
                                         ema_decay=EMA_DECAY, ema_warmup=False)
    self.batch_sharding = parallel.batch_sharding(mesh)
    self.compiled = None

  def initial_params_numpy(self) -> Any:
    return jax.tree.map(np.asarray, self.state.params)

  def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return jax.device_put({k: jnp.asarray(v) for k, v in batch.items()}, self.batch_sharding)

  def compile(self, batch: dict[str, jax.Array]) -> float:
    """Compiles the step ahead of time for ``batch``'s shapes (``self.compiled``); returns seconds."""
    t0 = time.perf_counter()
    self.compiled = self.step.jitted.lower(self.state, batch, self.step.frozen).compile()
    return time.perf_counter() - t0

  def flops(self) -> float | None:
    """XLA's FLOP count of one compiled step (None when the backend does not report it)."""
    if self.compiled is None:
      raise ValueError("call compile() first")
    return cost_flops(self.compiled)

  def run(self, batch: dict[str, jax.Array], steps: int) -> dict[str, float]:
    fn = self.compiled if self.compiled is not None else self.step.jitted
    metrics = None
    for _ in range(steps):
      self.state, metrics = fn(self.state, batch, self.step.frozen)
    _timing.block(metrics)
    return {k: float(metrics[k]) for k in ("loss", "grad_norm", "update_norm")}


def cost_flops(compiled: Any) -> float | None:
  """The ``flops`` entry of ``compiled.cost_analysis()`` (a dict, or a list of dicts on older JAX)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # backends without cost analysis
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


class TorchTrainer:
  """The diffusers side: ``UNet2DConditionModel`` + ``torch.optim.AdamW``, eager PyTorch."""

  def __init__(self, case: Case, params: Any, *, device: str = "cpu", dtype: str = "float32"):
    import torch
    from diffusers import UNet2DConditionModel

    from jdiff.convert.unet import params_to_torch

    self.torch = torch
    self.device = torch.device(device)
    self.autocast_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = UNet2DConditionModel.from_config(case.unet.to_diffusers_config())
    state = {k: torch.from_numpy(np.array(v)) for k, v in params_to_torch(params).items()}
    model.load_state_dict(state, strict=True)
    self.model = model.to(self.device).train()
    self.params = [p for p in self.model.parameters() if p.requires_grad]
    self.ema = [p.detach().clone() for p in self.params]
    self.opt = torch.optim.AdamW(self.params, lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    abar = np.array(noise_schedule().alphas_cumprod, np.float32)
    self.abar = torch.from_numpy(abar).to(self.device)

  def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    t = self.torch
    nchw = lambda a: t.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(self.device)
    return {"latents": nchw(batch["latents"]), "noise": nchw(batch["noise"]),
            "context": t.from_numpy(batch["context"]).to(self.device),
            "t": t.from_numpy(batch["t"].astype(np.int64)).to(self.device)}

  def _one_step(self, batch: dict[str, Any], measure: bool) -> dict[str, float] | None:
    torch = self.torch
    self.opt.zero_grad(set_to_none=True)
    a = self.abar[batch["t"]].reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * batch["latents"] + (1 - a).sqrt() * batch["noise"]
    with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
      pred = self.model(x_t, batch["t"], encoder_hidden_states=batch["context"]).sample
    loss = torch.nn.functional.mse_loss(pred.float(), batch["noise"])
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(self.params, CLIP_NORM)
    before = [p.detach().clone() for p in self.params] if measure else None
    self.opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, self.params, 1.0 - EMA_DECAY)
    if not measure:
      return None
    upd = math.sqrt(sum(float(((p.detach() - q) ** 2).sum()) for p, q in zip(self.params, before)))
    return {"loss": float(loss.detach()), "grad_norm": float(grad_norm.detach()), "update_norm": upd}

  def run(self, batch: dict[str, Any], steps: int, *, measure: bool = False) -> dict[str, float] | None:
    out = None
    for i in range(steps):
      out = self._one_step(batch, measure and i == steps - 1)
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()
    return out


def _rel(a: float, b: float) -> float:
  return abs(a - b) / max(abs(b), 1e-12)


def run_case(case: Case, *, repeats: int, steps: int, verify: bool = True, torch_side: bool = True,
             torch_threads: str | int = "auto", log: Callable[[str], None] = print) -> dict[str, Any]:
  """Builds both trainers, checks one identical step, then times alternating repeats of ``steps`` steps.

  Returns:
    A JSON-able dict: images/s (median), seconds per step, first-step (compile) seconds, peak RSS
    rise (MB) per side, the parity check and the jdiff/diffusers throughput ratio.
  """
  host_batch = make_batch(case)
  res: dict[str, Any] = {"config": case.name, "batch": case.batch, "latent": [case.size, case.size,
                                                                              case.unet.in_channels],
                         "context_len": case.context_len, "dtype": case.unet.dtype, "steps_per_repeat": steps,
                         "repeats": repeats}
  with _timing.PeakRSS() as mem:
    jd = JdiffTrainer(case)
    init_params = jd.initial_params_numpy()
    res["params"] = int(sum(np.size(p) for p in jax.tree.leaves(init_params)))
    jbatch = jd.put_batch(host_batch)
    compile_s = jd.compile(jbatch)
    first, jcheck = _timing.timed(lambda: jd.run(jbatch, 1))
  res["jdiff"] = {"compile_s": compile_s, "first_step_s": compile_s + first,
                  "first_step_peak_rss_mb": mem.peak_bytes / 2**20, "flops_per_step": jd.flops()}
  log(f"[{case.name}] jdiff compiled in {compile_s:.2f}s, first step {first:.2f}s "
      f"({res['params'] / 1e6:.2f}M params)")
  fns = {"jdiff": lambda: jd.run(jbatch, steps)}
  if torch_side:
    with _timing.PeakRSS() as mem:
      tt = TorchTrainer(case, init_params)
      tbatch = tt.put_batch(host_batch)
      tfirst, tcheck = _timing.timed(lambda: tt.run(tbatch, 1, measure=True))
    res["diffusers"] = {"first_step_s": tfirst, "first_step_peak_rss_mb": mem.peak_bytes / 2**20}
    if verify:
      res["check"] = {"jdiff": jcheck, "diffusers": tcheck,
                      "loss_rel_diff": _rel(jcheck["loss"], tcheck["loss"]),
                      "grad_norm_rel_diff": _rel(jcheck["grad_norm"], tcheck["grad_norm"]),
                      "update_norm_rel_diff": _rel(jcheck["update_norm"], tcheck["update_norm"])}
      log(f"[{case.name}] same step: loss {jcheck['loss']:.6f} vs {tcheck['loss']:.6f}, grad norm "
          f"{jcheck['grad_norm']:.5f} vs {tcheck['grad_norm']:.5f}")
    res["diffusers"]["torch_threads"] = _timing.choose_torch_threads(lambda: tt.run(tbatch, 1), torch_threads)
    fns["diffusers"] = lambda: tt.run(tbatch, steps)
  for fn in fns.values():  # warm-up repeat (allocator, caches)
    fn()
  for name, fn in fns.items():
    with _timing.PeakRSS() as mem:
      fn()
    res[name]["steady_peak_rss_mb"] = mem.peak_bytes / 2**20
  times = _timing.alternate(fns, repeats=repeats)
  for name, ts in times.items():
    s = _timing.summary(ts)
    res[name].update(s, sec_per_step=s["median_s"] / steps, images_per_s=case.batch * steps / s["median_s"],
                     times_s=ts)
  if torch_side:
    res["ratio"] = res["jdiff"]["images_per_s"] / res["diffusers"]["images_per_s"]
  return res


COLUMNS = ["config", "batch", "side", "images/s", "ms/step", "first step s", "peak RSS MB", "ratio"]


def table_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  rows = []
  for r in results:
    for side in ("jdiff", "diffusers"):
      if side not in r:
        continue
      s = r[side]
      rows.append({"config": r["config"], "batch": r["batch"], "side": side, "images/s": s["images_per_s"],
                   "ms/step": 1e3 * s["sec_per_step"], "first step s": s["first_step_s"],
                   "peak RSS MB": s["steady_peak_rss_mb"],
                   "ratio": r.get("ratio") if side == "jdiff" else None})
  return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n\n")[0])
  p.add_argument("--configs", default="tiny,digits", help="comma list of tiny, digits, sd15")
  p.add_argument("--batch", type=int, default=None, help="override every config's batch size")
  p.add_argument("--repeats", type=int, default=7, help="alternating timed rounds per side")
  p.add_argument("--steps", type=int, default=3, help="train steps per timed round")
  p.add_argument("--dtype", default="float32", help="jdiff compute dtype (diffusers: autocast)")
  p.add_argument("--no-torch", action="store_true", help="time jdiff only")
  p.add_argument("--quick", action="store_true", help="tiny config, 2 repeats of 1 step (for tests)")
  _timing.add_common_flags(p)
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  _timing.start(args)
  names = ["tiny"] if args.quick else [n.strip() for n in args.configs.split(",") if n.strip()]
  repeats, steps = (2, 1) if args.quick else (args.repeats, args.steps)
  results = []
  for name in names:
    case = make_case(name, batch=args.batch, dtype=args.dtype)
    results.append(run_case(case, repeats=repeats, steps=steps, torch_side=not args.no_torch,
                            torch_threads=args.torch_threads))
  payload = {"benchmark": "train_step", "environment": _timing.environment(), "results": results}
  _timing.write_json(args.out, payload)
  print(_timing.format_table(table_rows(results), COLUMNS))
  return 0


if __name__ == "__main__":
  sys.exit(main())
