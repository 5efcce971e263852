"""One prepared accelerator benchmark: SD1.5-shaped UNet in bfloat16, jdiff and (when present) diffusers.

Phases, each guarded by a time budget (default 450 s in all, so the script ends well within 8 minutes;
a phase that would not fit, or that fails, is recorded as skipped / failed and the rest still runs):

1. ``pipeline``: a random-weight SD1.5-shaped diffusers pipeline (UNet 860M, VAE, CLIP-L-shaped text
   encoder) saved to a temporary folder (torch, CPU) so both sides sample with identical weights.
2. ``jdiff_train``: the LDM train step (:mod:`bench.train`: epsilon loss, backward, clipping, AdamW,
   EMA; bfloat16 compute, float32 parameters) at batch 8 on 64x64x4 latents, compiled ahead of time;
   images/s, compile seconds, XLA's FLOP count (``compiled.cost_analysis()``), achieved TFLOP/s and
   model FLOPs utilisation against the device's peak bfloat16 rate, peak device memory.
3. ``jdiff_sample``: 50-step DDIM text-to-image with guidance 7.5 at batch 8 (512x512 images), one XLA
   program per call; images/s and latency.
4. ``diffusers_train`` / ``diffusers_sample``: the same with PyTorch (autocast bfloat16 training on the
   same initial weights; a bfloat16 ``StableDiffusionPipeline`` for sampling) when torch sees CUDA.

Attention: ``--attention auto`` (default) compiles with cuDNN fused attention where it applies
(:func:`jdiff.models.layers.attention_implementation`) on GPUs and falls back to XLA's if compiling
fails; CPU and TPU use XLA's.

``--tiny`` runs the same code on CPU (tiny UNet/VAE/text encoder in float32, batch 2, 16x16 latents,
4 sampler steps; diffusers on CPU with one thread) and is what the tests run. The table is printed last.

    python -m bench.gpu --out gpu.json
    python -m bench.gpu --tiny --out /tmp/gpu_tiny.json
"""

from __future__ import annotations

import os

# JAX's default preallocation (75% of GPU memory) would starve the PyTorch phases in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import _timing  # noqa: E402
from bench import sample as sample_bench  # noqa: E402
from bench import train as train_bench  # noqa: E402
from jdiff.models import UNetConfig, VAEConfig, layers  # noqa: E402

__all__ = ["Spec", "full_spec", "tiny_spec", "peak_tflops", "main"]

# Dense bfloat16 peak FLOP/s by device kind (first matching substring wins; vendor datasheets, no sparsity).
PEAK_BF16 = [
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12),
    ("TPU v4", 275e12),
]


@dataclasses.dataclass(frozen=True)
class Spec:
  """What the script runs: shapes, steps and repeats."""
  name: str
  unet: UNetConfig
  vae: VAEConfig
  text_layers: int
  text_heads: int
  batch: int
  latent: int
  context_len: int
  train_steps: int  # per timed repeat
  train_repeats: int
  sample_steps: int
  sample_repeats: int
  dtype: str


def full_spec(batch: int = 8) -> Spec:
  """SD1.5 shapes at 512x512 (64x64x4 latents), bfloat16 compute."""
  return Spec("sd15@64x64", UNetConfig.sd15(dtype="bfloat16"), VAEConfig.sd15(dtype="bfloat16"), text_layers=12,
              text_heads=12, batch=batch, latent=64, context_len=77, train_steps=5, train_repeats=3,
              sample_steps=50, sample_repeats=2, dtype="bfloat16")


def tiny_spec() -> Spec:
  """The same code on CPU-sized shapes, in float32 (XLA:CPU compiles bfloat16 programs far more slowly)."""
  return Spec("tiny@16x16", UNetConfig.tiny(), VAEConfig.tiny(), text_layers=2, text_heads=4, batch=2, latent=16,
              context_len=77, train_steps=1, train_repeats=2, sample_steps=4, sample_repeats=2, dtype="float32")


def peak_tflops(device: Any) -> float | None:
  """Peak dense bfloat16 TFLOP/s of a JAX device from its ``device_kind`` (None when unknown, e.g. CPU)."""
  kind = str(getattr(device, "device_kind", ""))
  for sub, flops in PEAK_BF16:
    if sub.lower() in kind.lower():
      return flops / 1e12
  return None


def _torch_cuda() -> bool:
  try:
    import torch
  except ImportError:
    return False
  return bool(torch.cuda.is_available())


def _free_memory() -> None:
  """Drops compiled programs and collects garbage so the next phase starts with the device memory free."""
  gc.collect()
  jax.clear_caches()
  if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
    sys.modules["torch"].cuda.empty_cache()


class Runner:
  """Runs named phases within a deadline, recording results, skips and failures."""

  def __init__(self, budget_s: float):
    self.t0 = time.perf_counter()
    self.deadline = self.t0 + budget_s
    self.results: dict[str, Any] = {}

  def left(self) -> float:
    return self.deadline - time.perf_counter()

  def phase(self, name: str, fn: Callable[[], dict[str, Any]], *, needs_s: float) -> dict[str, Any] | None:
    if self.left() < needs_s:
      reason = f"time budget: {self.left():.0f}s left, needs ~{needs_s:.0f}s"
      self.results[name] = {"status": "skipped", "reason": reason}
      print(f"[{name}] skipped (time budget)", flush=True)
      return None
    t0 = time.perf_counter()
    try:
      out = fn()
    except Exception as err:  # one failing phase must not lose the others
      self.results[name] = {"status": "failed", "error": f"{type(err).__name__}: {err}"[:2000],
                            "traceback": traceback.format_exc()[-4000:]}
      print(f"[{name}] FAILED: {type(err).__name__}: {str(err)[:300]}", flush=True)
      return None
    finally:
      _free_memory()  # the phase's arrays, models and programs are garbage now
    out = {"status": "ok", "phase_s": time.perf_counter() - t0, **out}
    self.results[name] = out
    print(f"[{name}] done in {out['phase_s']:.1f}s", flush=True)
    return out


def _attention_choices(mode: str) -> list[str | None]:
  if mode == "auto":
    return ["cudnn", "xla"] if jax.default_backend() == "gpu" else ["xla"]
  return [mode]


def _with_attention(mode: str, build: Callable[[], Any]) -> tuple[Any, str]:
  """``build()`` under the first attention implementation that compiles; returns (result, choice)."""
  errors = []
  for impl in _attention_choices(mode):
    try:
      with layers.attention_implementation(impl):
        return build(), str(impl)
    except Exception as err:  # e.g. a cuDNN version / shape the fused kernel does not take
      errors.append(f"{impl}: {type(err).__name__}: {str(err)[:300]}")
      print(f"  attention={impl} failed to compile, trying the next one", flush=True)
      _free_memory()
  raise RuntimeError("no attention implementation compiled: " + " | ".join(errors))


def _device_peak_mb() -> float | None:
  peak = _timing.device_peak_bytes()
  return None if peak is None else peak / 2**20


def jdiff_train(spec: Spec, args, store: dict[str, Any]) -> dict[str, Any]:
  case = train_bench.Case(spec.name, spec.unet, batch=spec.batch, size=spec.latent, context_len=spec.context_len)
  host = train_bench.make_batch(case)

  def build():
    jd = train_bench.JdiffTrainer(case)
    store["init_params"] = jd.initial_params_numpy() if args.torch_side else None
    batch = jd.put_batch(host)
    compile_s = jd.compile(batch)
    first, _ = _timing.timed(lambda: jd.run(batch, 1))  # inside: a kernel failing at run time falls back too
    return jd, batch, compile_s, first

  with _timing.PeakRSS() as mem:
    (jd, batch, compile_s, first), attention = _with_attention(args.attention, build)
    times = [_timing.timed(lambda: jd.run(batch, spec.train_steps))[0] for _ in range(spec.train_repeats)]
  s = _timing.summary(times)
  step_s = s["median_s"] / spec.train_steps
  flops = jd.flops()
  peak = args.peak_tflops or peak_tflops(jax.devices()[0])
  achieved = flops / step_s / 1e12 if flops else None
  out = {"attention": attention, "compile_s": compile_s, "first_step_s": first, "sec_per_step": step_s,
         "images_per_s": spec.batch / step_s, "flops_per_step": flops, "achieved_tflops": achieved,
         "peak_tflops": peak, "mfu": achieved / peak if (achieved and peak) else None,
         "device_peak_mb": _device_peak_mb(), "host_peak_rss_mb": mem.peak_bytes / 2**20, "times_s": times}
  return out


def random_pipeline(spec: Spec, *, seed: int = 0):
  """A jdiff ``StableDiffusion`` of ``spec``'s shapes with random weights (Flax initialisers) and a
  byte-level CLIP vocabulary: what :func:`jdiff_sample` times when no diffusers pipeline could be built
  (a machine with only the JAX stack). Same shapes, schedule and DDIM options as that pipeline."""
  from jdiff.models import AutoencoderKL, CLIPTextConfig, CLIPTextModel, UNet
  from jdiff.pipelines import StableDiffusion, sampler_options_from_config, schedule_from_config
  from jdiff.tokenizers import CLIPTokenizer

  with tempfile.TemporaryDirectory() as tmp:
    sample_bench.write_byte_vocab(Path(tmp))
    tok = CLIPTokenizer.from_files(Path(tmp) / "vocab.json", Path(tmp) / "merges.txt", max_length=spec.context_len)
  width = spec.unet.per_block("cross_attention_dim")[0]
  text = CLIPTextModel(CLIPTextConfig(
      vocab_size=len(tok.vocab), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=spec.text_layers,
      num_attention_heads=spec.text_heads, max_position_embeddings=spec.context_len, hidden_act="quick_gelu",
      bos_token_id=tok.vocab[tok.bos_token], eos_token_id=tok.vocab[tok.eos_token], dtype=spec.dtype))
  unet, vae = UNet(spec.unet), AutoencoderKL(spec.vae)
  k_unet, k_vae, k_text = jax.random.split(jax.random.key(seed), 3)
  lat = jnp.zeros((1, spec.latent, spec.latent, spec.vae.latent_channels))
  unet_params = jax.jit(unet.init)(k_unet, lat, jnp.zeros((1,), jnp.int32),
                                   jnp.zeros((1, spec.context_len, width)))["params"]
  vae_params = jax.jit(lambda k, z: vae.init(k, z, method=vae.decode))(k_vae, lat)["params"]
  text_params = jax.jit(text.init)(k_text, jnp.zeros((1, spec.context_len), jnp.int32))["params"]
  return StableDiffusion(unet=unet, unet_params=unet_params, vae=vae, vae_params=vae_params, text_encoder=text,
                         text_params=text_params, tokenizer=tok,
                         schedule=schedule_from_config(sample_bench.SCHEDULER_CONFIG),
                         scaling_factor=spec.vae.scaling_factor,
                         sampler_options=sampler_options_from_config(sample_bench.SCHEDULER_CONFIG))


def jdiff_sample(spec: Spec, args, folder: Path | None) -> dict[str, Any]:
  """Times 50-step guided DDIM on the saved diffusers pipeline, or (``folder`` None) on
  :func:`random_pipeline`."""
  from jdiff.pipelines import StableDiffusion

  prompts = [sample_bench.PROMPTS[i % len(sample_bench.PROMPTS)] for i in range(spec.batch)]
  latents = jnp.asarray(np.random.default_rng(0).standard_normal(
      (spec.batch, spec.latent, spec.latent, 4)).astype(np.float32))
  pipe = StableDiffusion.from_diffusers(folder, dtype=spec.dtype) if folder is not None else random_pipeline(spec)

  def call():
    out = pipe.generate(prompts, key=jax.random.key(0), num_steps=spec.sample_steps,
                        guidance_scale=sample_bench.GUIDANCE, latents=latents, sampler="ddim")
    return _timing.block(out)

  with _timing.PeakRSS() as mem:
    (first, images), attention = _with_attention(args.attention, lambda: _timing.timed(call))
    times = [_timing.timed(call)[0] for _ in range(spec.sample_repeats)]
  s = _timing.summary(times)
  out = {"attention": attention, "weights": "diffusers pipeline" if folder is not None else "random (jdiff init)",
         "first_call_s": first, "latency_s": s["median_s"],
         "images_per_s": spec.batch / s["median_s"], "image_shape": list(images.shape),
         "device_peak_mb": _device_peak_mb(), "host_peak_rss_mb": mem.peak_bytes / 2**20, "times_s": times}
  return out


def diffusers_train(spec: Spec, store: dict[str, Any], device: str) -> dict[str, Any]:
  import torch

  case = train_bench.Case(spec.name, spec.unet, batch=spec.batch, size=spec.latent, context_len=spec.context_len)
  params = store.pop("init_params")
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  tt = train_bench.TorchTrainer(case, params, device=device, dtype=spec.dtype)
  del params
  batch = tt.put_batch(train_bench.make_batch(case))
  first, _ = _timing.timed(lambda: tt.run(batch, 1))
  times = [_timing.timed(lambda: tt.run(batch, spec.train_steps))[0] for _ in range(spec.train_repeats)]
  s = _timing.summary(times)
  step_s = s["median_s"] / spec.train_steps
  out = {"first_step_s": first, "sec_per_step": step_s, "images_per_s": spec.batch / step_s, "times_s": times,
         "device_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None}
  return out


def diffusers_sample(spec: Spec, folder: Path, device: str) -> dict[str, Any]:
  import diffusers
  import torch

  dtype = torch.bfloat16 if spec.dtype == "bfloat16" else torch.float32
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                           torch_dtype=dtype).to(device)
  pipe.set_progress_bar_config(disable=True)
  prompts = [sample_bench.PROMPTS[i % len(sample_bench.PROMPTS)] for i in range(spec.batch)]
  lat = np.random.default_rng(0).standard_normal((spec.batch, spec.latent, spec.latent, 4)).astype(np.float32)
  latents = torch.from_numpy(lat.transpose(0, 3, 1, 2).copy()).to(device, dtype)
  size = spec.latent * spec.vae.downsample_factor

  def call():
    with torch.no_grad():
      out = pipe(prompt=prompts, latents=latents, num_inference_steps=spec.sample_steps,
                 guidance_scale=sample_bench.GUIDANCE, height=size, width=size, output_type="np").images
    if device == "cuda":
      torch.cuda.synchronize()
    return out

  first, images = _timing.timed(call)
  times = [_timing.timed(call)[0] for _ in range(spec.sample_repeats)]
  s = _timing.summary(times)
  out = {"first_call_s": first, "latency_s": s["median_s"], "images_per_s": spec.batch / s["median_s"],
         "image_shape": list(images.shape), "times_s": times,
         "device_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None}
  return out


def build_pipeline(spec: Spec, folder: Path) -> dict[str, Any]:
  case = sample_bench.SampleCase(spec.name, dataclasses.replace(spec.unet, dtype="float32"),
                                 dataclasses.replace(spec.vae, dtype="float32"), text_layers=spec.text_layers,
                                 latent=spec.latent, text_heads=spec.text_heads)
  sample_bench.build_diffusers_pipeline(case, folder)
  return {"folder": str(folder)}


COLUMNS = ["phase", "side", "status", "images/s", "ms/step or s/call", "compile/first s", "TFLOP/s", "MFU",
           "device peak MB"]


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
  rows = []
  for name in ("jdiff_train", "diffusers_train", "jdiff_sample", "diffusers_sample"):
    r = results.get(name)
    if r is None:
      continue
    side, kind = name.split("_")
    row = {"phase": kind, "side": side, "status": r["status"]}
    if r["status"] == "ok":
      per = 1e3 * r["sec_per_step"] if kind == "train" else r["latency_s"]
      row.update({"images/s": r["images_per_s"], "ms/step or s/call": per,
                  "compile/first s": r.get("compile_s", r.get("first_step_s", r.get("first_call_s"))),
                  "TFLOP/s": r.get("achieved_tflops"), "MFU": r.get("mfu"), "device peak MB": r.get("device_peak_mb")})
    rows.append(row)
  return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
  p.add_argument("--tiny", action="store_true", help="tiny shapes (runs on CPU; used by the tests)")
  p.add_argument("--batch", type=int, default=8, help="batch size of the full run")
  p.add_argument("--budget", type=float, default=450.0, help="seconds for all phases (phases that would not "
                 "fit are skipped)")
  p.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"), help="jdiff attention kernel")
  p.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak bf16 TFLOP/s")
  p.add_argument("--no-torch", action="store_true", help="skip the diffusers phases")
  p.add_argument("--out", default="bench_gpu.json", help="write results as JSON here")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  spec = tiny_spec() if args.tiny else full_spec(args.batch)
  cuda = _torch_cuda()
  torch_device = "cuda" if cuda else ("cpu" if args.tiny else None)
  if args.no_torch:
    torch_device = None
  if importlib.util.find_spec("diffusers") is None:
    torch_device = None
  args.torch_side = torch_device is not None
  if torch_device == "cpu":
    import torch

    torch.set_num_threads(1)  # CPU (tiny mode): OpenMP spinning is pathological on a shared small machine
  runner = Runner(args.budget)
  dev = jax.devices()[0]
  print(f"bench.gpu: {spec.name}, batch {spec.batch}, {spec.dtype}, jax on {dev.platform} ({dev.device_kind}), "
        f"diffusers on {torch_device or 'none'}", flush=True)
  store: dict[str, Any] = {}
  with tempfile.TemporaryDirectory() as tmp:
    folder = Path(tmp) / "sd"
    big = not args.tiny
    if any(importlib.util.find_spec(m) is None for m in ("torch", "diffusers", "transformers")):
      runner.results["pipeline"] = {"status": "skipped", "reason": "torch/diffusers/transformers not installed"}
      print("[pipeline] skipped (no torch/diffusers/transformers): jdiff samples with random weights", flush=True)
    else:
      runner.phase("pipeline", lambda: build_pipeline(spec, folder), needs_s=60 if big else 5)
    runner.phase("jdiff_train", lambda: jdiff_train(spec, args, store), needs_s=150 if big else 5)
    # without a diffusers pipeline (no torch/diffusers here) jdiff samples with its own random weights
    have_pipe = runner.results["pipeline"]["status"] == "ok"
    runner.phase("jdiff_sample", lambda: jdiff_sample(spec, args, folder if have_pipe else None),
                 needs_s=100 if big else 5)
    if torch_device is not None:
      if "init_params" in store and store["init_params"] is not None:
        runner.phase("diffusers_train", lambda: diffusers_train(spec, store, torch_device), needs_s=40 if big else 2)
      if runner.results["pipeline"]["status"] == "ok":
        runner.phase("diffusers_sample", lambda: diffusers_sample(spec, folder, torch_device),
                     needs_s=40 if big else 2)
  results = runner.results
  ratios: dict[str, float | None] = {}
  for kind in ("train", "sample"):
    a, b = results.get(f"jdiff_{kind}"), results.get(f"diffusers_{kind}")
    ok = a and b and a["status"] == b["status"] == "ok"
    ratios[f"{kind}_ratio"] = a["images_per_s"] / b["images_per_s"] if ok else None
  payload = {"benchmark": "gpu", "spec": {"name": spec.name, "batch": spec.batch, "latent": spec.latent,
                                          "dtype": spec.dtype, "train_steps": spec.train_steps,
                                          "sample_steps": spec.sample_steps},
             "device": {"platform": dev.platform, "kind": dev.device_kind}, "torch_device": torch_device,
             "total_s": time.perf_counter() - runner.t0, **ratios, "environment": _timing.environment(),
             "results": results}
  _timing.write_json(args.out, payload)
  print(f"total {payload['total_s']:.1f}s; jdiff/diffusers images/s: train {ratios['train_ratio']}, "
        f"sample {ratios['sample_ratio']}")
  print(_timing.format_table(table_rows(results), COLUMNS))
  return 0


if __name__ == "__main__":
  sys.exit(main())
