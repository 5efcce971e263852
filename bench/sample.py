"""Text-to-image latency: jdiff ``StableDiffusion.generate`` vs diffusers' ``StableDiffusionPipeline``.

A diffusers pipeline with random weights (UNet and VAE shaped like jdiff's ``tiny`` or ``digits``
presets, a small CLIP text encoder and a byte-level CLIP vocabulary) is saved with
``save_pretrained`` into a temporary folder and loaded by :meth:`StableDiffusion.from_diffusers`, so
both sides run identical weights. Each call is a full text-to-image request: tokenize, encode the
prompts and the empty negative prompts, ``--steps`` sampler steps with classifier-free guidance
(scale 7.5, one fused 2B-batch UNet call per step on both sides), VAE decode. Same starting latents,
same sampler (DDIM, and DPM-Solver++ 2M): the images are compared before timing. Calls alternate
jdiff / diffusers in one process; medians, images/s and the jdiff/diffusers ratio are reported, with a
per-component breakdown (one guided UNet call, one VAE decode) of where the time goes.

    python -m bench.sample [--configs tiny,digits] [--samplers ddim,dpm] [--batch 4] [--steps 20] [--out f.json]
    python -m bench.sample --quick        # tiny, DDIM, 2 repeats (tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bench import _timing
from jdiff.models import UNetConfig, VAEConfig
from jdiff.tokenizers import bytes_to_unicode

__all__ = ["SampleCase", "CASES", "build_diffusers_pipeline", "run_case", "main"]

PROMPTS = ["a photo of a cat", "a red fox in the snow", "an astronaut riding a horse", "the number seven"]
GUIDANCE = 7.5
# jdiff sampler name -> diffusers scheduler class
SAMPLERS = {"ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler"}
_JDIFF_SAMPLER = {"ddim": "ddim", "dpm": "dpm_solver"}
# The benchmark pipelines' scheduler (SD 1.5's schedule, DDIM options), as a diffusers scheduler config.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)


@dataclasses.dataclass(frozen=True)
class SampleCase:
  """A pipeline shape: UNet and VAE configs (3-channel images), text width/depth, latent size."""
  name: str
  unet: UNetConfig
  vae: VAEConfig
  text_layers: int
  latent: int  # latent height = width
  text_heads: int = 4

  @property
  def image(self) -> int:
    return self.latent * self.vae.downsample_factor


def _tiny() -> SampleCase:
  return SampleCase("tiny", UNetConfig.tiny(sample_size=16), VAEConfig.tiny(), text_layers=2, latent=16)


def _digits() -> SampleCase:
  vae = VAEConfig.digits(in_channels=3, out_channels=3, scaling_factor=0.18215)
  return SampleCase("digits", UNetConfig.digits(), vae, text_layers=2, latent=8)


CASES: dict[str, Callable[[], SampleCase]] = {"tiny": _tiny, "digits": _digits}


def write_byte_vocab(folder: Path) -> int:
  """A CLIP BPE vocabulary with no merges (one token per byte, with and without ``</w>``)."""
  folder.mkdir(parents=True, exist_ok=True)
  base = list(bytes_to_unicode().values())
  tokens = base + [c + "</w>" for c in base] + ["<|startoftext|>", "<|endoftext|>"]
  (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False),
                                     encoding="utf-8")
  (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
  return len(tokens)


def build_diffusers_pipeline(case: SampleCase, folder: Path, *, seed: int = 0) -> None:
  """Saves a random-weight ``StableDiffusionPipeline`` of ``case``'s shapes (DDIM, SD 1.5 schedule)."""
  import diffusers
  import torch
  import transformers

  torch.manual_seed(seed)
  unet = diffusers.UNet2DConditionModel.from_config(case.unet.to_diffusers_config())
  vae = diffusers.AutoencoderKL.from_config(case.vae.to_diffusers_config())
  vocab_size = write_byte_vocab(folder / "_vocab")
  tok = transformers.CLIPTokenizer(vocab=str(folder / "_vocab" / "vocab.json"),
                                   merges=str(folder / "_vocab" / "merges.txt"), model_max_length=77)
  width = case.unet.per_block("cross_attention_dim")[0]
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=case.text_layers,
      num_attention_heads=case.text_heads, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
  sched = diffusers.DDIMScheduler(**SCHEDULER_CONFIG)
  pipe = diffusers.StableDiffusionPipeline(unet=unet.eval(), vae=vae.eval(), text_encoder=text.eval(),
                                           tokenizer=tok, scheduler=sched, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(folder)


def _load_diffusers(folder: Path):
  import diffusers

  pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                           requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  return pipe


def _set_scheduler(pipe, sampler: str) -> None:
  import diffusers

  cls = getattr(diffusers, SAMPLERS[sampler])
  pipe.scheduler = cls.from_config(pipe.scheduler.config)


def _torch_unet_call(pipe, case: SampleCase, batch: int) -> None:
  """One guided-batch diffusers UNet call on zeros (picks PyTorch's thread count)."""
  import torch

  width = case.unet.per_block("cross_attention_dim")[0]
  with torch.no_grad():
    pipe.unet(torch.zeros(2 * batch, 4, case.latent, case.latent), torch.full((2 * batch,), 500),
              encoder_hidden_states=torch.zeros(2 * batch, 77, width))


def _component_times(ours, pipe, case: SampleCase, batch: int, repeats: int) -> dict[str, Any]:
  """Median ms of one guided UNet call (batch 2B) and one VAE decode (batch B) on each side."""
  import torch

  rng = np.random.default_rng(1)
  x = rng.standard_normal((2 * batch, case.latent, case.latent, 4)).astype(np.float32)
  width = case.unet.per_block("cross_attention_dim")[0]
  ctx = rng.standard_normal((2 * batch, 77, width)).astype(np.float32)
  t = np.full((2 * batch,), 500, np.int32)
  z = x[:batch]
  unet_j = jax.jit(lambda p, x, t, c: ours.unet.apply({"params": p}, x, t, c))
  dec_j = jax.jit(lambda p, z: ours.vae.apply({"params": p}, z, method=ours.vae.decode))
  xj, cj, tj, zj = map(jnp.asarray, (x, ctx, t, z))
  _timing.block(unet_j(ours.unet_params, xj, tj, cj))
  _timing.block(dec_j(ours.vae_params, zj))
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  zt = torch.from_numpy(z.transpose(0, 3, 1, 2).copy())
  ct, tt = torch.from_numpy(ctx), torch.from_numpy(t.astype(np.int64))

  def t_unet():
    with torch.no_grad():
      return pipe.unet(xt, tt, encoder_hidden_states=ct).sample

  def t_dec():
    with torch.no_grad():
      return pipe.vae.decode(zt).sample

  t_unet(), t_dec()
  times = _timing.alternate({
      "jdiff_unet": lambda: _timing.block(unet_j(ours.unet_params, xj, tj, cj)),
      "diffusers_unet": t_unet,
      "jdiff_vae_decode": lambda: _timing.block(dec_j(ours.vae_params, zj)),
      "diffusers_vae_decode": t_dec}, repeats=repeats)
  return {k: 1e3 * _timing.summary(v)["median_s"] for k, v in times.items()}


def run_case(case: SampleCase, *, samplers: Sequence[str], batch: int, steps: int, repeats: int,
             components: bool = True, torch_threads: str | int = "auto",
             log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Builds the pipeline pair, then per sampler: compares images, times alternating calls."""
  import torch

  from jdiff.pipelines import StableDiffusion

  prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
  latents = np.random.default_rng(0).standard_normal((batch, case.latent, case.latent, 4)).astype(np.float32)
  latents_t = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    folder = Path(tmp) / "pipe"
    build_diffusers_pipeline(case, folder)
    pipe = _load_diffusers(folder)
    ours = StableDiffusion.from_diffusers(folder)
    threads = _timing.choose_torch_threads(lambda: _torch_unet_call(pipe, case, batch), torch_threads)
    comp = _component_times(ours, pipe, case, batch, repeats) if components else None
    for sampler in samplers:
      _set_scheduler(pipe, sampler)
      name = _JDIFF_SAMPLER[sampler]

      def run_jdiff():
        out = ours.generate(prompts, key=jax.random.key(0), num_steps=steps, guidance_scale=GUIDANCE,
                            latents=jnp.asarray(latents), sampler=name)
        return np.asarray(_timing.block(out))

      def run_diffusers():
        with torch.no_grad():
          return pipe(prompt=prompts, latents=latents_t, num_inference_steps=steps, guidance_scale=GUIDANCE,
                      height=case.image, width=case.image, output_type="np").images

      res: dict[str, Any] = {"config": case.name, "sampler": sampler, "batch": batch, "steps": steps,
                             "image": [case.image, case.image, 3], "latent": [case.latent, case.latent, 4],
                             "guidance_scale": GUIDANCE, "repeats": repeats}
      with _timing.PeakRSS() as mem:
        first, got = _timing.timed(run_jdiff)
      res["jdiff"] = {"first_call_s": first, "first_call_peak_rss_mb": mem.peak_bytes / 2**20}
      with _timing.PeakRSS() as mem:
        tfirst, want = _timing.timed(run_diffusers)
      res["diffusers"] = {"first_call_s": tfirst, "first_call_peak_rss_mb": mem.peak_bytes / 2**20}
      res["check"] = {"max_abs_diff": float(np.max(np.abs(got - want))), "image_std": float(np.std(want)),
                      "shape": list(got.shape)}
      log(f"[{case.name}/{sampler}] jdiff first call (compile) {first:.2f}s; images differ by at most "
          f"{res['check']['max_abs_diff']:.2e}")
      fns = {"jdiff": run_jdiff, "diffusers": run_diffusers}
      for side, fn in fns.items():
        with _timing.PeakRSS() as mem:
          fn()
        res[side]["steady_peak_rss_mb"] = mem.peak_bytes / 2**20
      times = _timing.alternate(fns, repeats=repeats)
      for side, ts in times.items():
        s = _timing.summary(ts)
        res[side].update(s, latency_s=s["median_s"], images_per_s=batch / s["median_s"], times_s=ts)
      res["diffusers"]["torch_threads"] = threads
      res["ratio"] = res["jdiff"]["images_per_s"] / res["diffusers"]["images_per_s"]
      if comp is not None:
        res["components_ms"] = comp
      results.append(res)
  return results


COLUMNS = ["config", "sampler", "batch", "side", "latency s", "images/s", "first call s", "peak RSS MB",
           "UNet call ms", "VAE decode ms", "ratio"]


def table_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  rows = []
  for r in results:
    comp = r.get("components_ms") or {}
    for side in ("jdiff", "diffusers"):
      s = r[side]
      rows.append({"config": r["config"], "sampler": r["sampler"], "batch": r["batch"], "side": side,
                   "latency s": s["latency_s"], "images/s": s["images_per_s"], "first call s": s["first_call_s"],
                   "peak RSS MB": s["steady_peak_rss_mb"], "UNet call ms": comp.get(f"{side}_unet"),
                   "VAE decode ms": comp.get(f"{side}_vae_decode"),
                   "ratio": r["ratio"] if side == "jdiff" else None})
  return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m bench.sample", description=__doc__.split("\n\n")[0])
  p.add_argument("--configs", default="tiny,digits", help="comma list of tiny, digits")
  p.add_argument("--samplers", default="ddim,dpm", help="comma list of ddim, dpm")
  p.add_argument("--batch", type=int, default=4, help="images per call")
  p.add_argument("--steps", type=int, default=20, help="sampler steps")
  p.add_argument("--repeats", type=int, default=5, help="alternating timed calls per side")
  p.add_argument("--no-components", action="store_true", help="skip the UNet / VAE breakdown")
  p.add_argument("--quick", action="store_true", help="tiny, DDIM, batch 2, 20 steps, 2 repeats (tests)")
  _timing.add_common_flags(p)
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  _timing.start(args)
  if args.quick:
    names, samplers, batch, repeats = ["tiny"], ["ddim"], 2, 2
  else:
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    batch, repeats = args.batch, args.repeats
  for n in names:
    if n not in CASES:
      raise ValueError(f"unknown config {n!r} (choose from {', '.join(CASES)})")
  for s in samplers:
    if s not in SAMPLERS:
      raise ValueError(f"unknown sampler {s!r} (choose from {', '.join(SAMPLERS)})")
  results = []
  for n in names:
    results.extend(run_case(CASES[n](), samplers=samplers, batch=batch, steps=args.steps, repeats=repeats,
                            components=not args.no_components, torch_threads=args.torch_threads))
  _timing.write_json(args.out, {"benchmark": "txt2img", "environment": _timing.environment(), "results": results})
  print(_timing.format_table(table_rows(results), COLUMNS))
  return 0


if __name__ == "__main__":
  sys.exit(main())
