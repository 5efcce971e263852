"""Text-to-image sampling to a PNG grid.

Usage:
  python -m sample.txt2img --diffusers checkpoints/sd15 --prompt "a red fox in snow" --out grid.png \
      [--steps 50] [--guidance 7.5] [--sampler ddim] [--seed 0] [--num-images 4] [--batch-size 4] \
      [--height 512] [--width 512] [--negative-prompt "blurry"] [--dtype bfloat16] \
      [--lora style.safetensors --lora-scale 0.8 --lora detail.safetensors --lora-scale 0.4] \
      [--guidance-rescale 0.7] [--textual_inversion cat-toy.safetensors [--token "<cat-toy>"]]
  python -m sample.txt2img --single_file v1-5.safetensors --config checkpoints/sd15 --prompt "a fox" --out fox.png
  python -m sample.txt2img --diffusers checkpoints/lcm-sd15 --prompt "a fox" --steps 4 --guidance 8 --out fox.png

The model comes from one source flag; each kind in :data:`sample._cli.SOURCES` is a flag (``--diffusers``
now; training programs register more, e.g. ``--workdir``). User mistakes print one line and exit with 2.
Without ``--sampler`` the model's own default is used (a diffusers folder's scheduler class: an LCM
checkpoint samples with ``lcm``, guided through its w-embedding).
"""

from __future__ import annotations

import sys
import time

from sample import _cli


def build_parser() -> _cli.ArgumentParser:
  parser = _cli.ArgumentParser(prog="txt2img", description="Generate images from a text prompt.")
  source = parser.add_mutually_exclusive_group(required=True)
  for kind in sorted(_cli.SOURCES):
    source.add_argument(f"--{kind}", metavar="PATH",
                        help=f"load the model from a {kind} {'file' if kind == 'single_file' else 'folder'}")
  _cli.add_model_options(parser)
  parser.add_argument("--prompt", required=True, help="the text prompt")
  parser.add_argument("--negative-prompt", default=None, help="unconditional prompt (default: empty)")
  parser.add_argument("--out", default="grid.png", help="output PNG grid (default: grid.png)")
  parser.add_argument("--steps", type=int, default=50, help="sampler steps (default: 50)")
  parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
  parser.add_argument("--guidance-rescale", "--guidance_rescale", type=float, default=0.0, dest="guidance_rescale",
                      help="guidance rescale phi in [0, 1] (default: 0)")
  parser.add_argument("--sampler", default=None,
                      help="sampler name (jdiff.samplers.available(); default: the model's, else ddim)")
  parser.add_argument("--seed", type=int, default=0, help="random seed")
  parser.add_argument("--num-images", type=int, default=4, help="images in the grid (default: 4)")
  parser.add_argument("--batch-size", type=int, default=None, help="images per device call (default: all)")
  parser.add_argument("--height", type=int, default=None, help="image height in pixels")
  parser.add_argument("--width", type=int, default=None, help="image width in pixels")
  parser.add_argument("--cols", type=int, default=None, help="grid columns (default: square-ish)")
  add_lora_flags(parser)
  return parser


def add_lora_flags(parser: _cli.ArgumentParser) -> None:
  parser.add_argument("--lora", action="append", default=[], metavar="FILE",
                      help="LoRA .safetensors file (diffusers/PEFT or kohya layout); repeatable")
  parser.add_argument("--lora-scale", action="append", type=float, default=[], metavar="S",
                      help="scale of the matching --lora (one value applies to all; default 1.0)")


def lora_entries(args) -> list[tuple[str, float]] | None:
  """``--lora`` / ``--lora-scale`` pairs, checked: files exist, scales match the files in number."""
  from pathlib import Path

  if not args.lora:
    if args.lora_scale:
      raise _cli.UsageError("--lora-scale given without --lora")
    return None
  for file in args.lora:
    if not Path(file).is_file():
      raise _cli.UsageError(f"--lora file {file!r} does not exist")
  scales = args.lora_scale or [1.0]
  if len(scales) == 1:
    scales = scales * len(args.lora)
  if len(scales) != len(args.lora):
    raise _cli.UsageError(f"{len(args.lora_scale)} --lora-scale values for {len(args.lora)} --lora files "
                          "(give one for all, or one each)")
  return list(zip(args.lora, scales))


def _check(args) -> None:
  from jdiff import samplers

  for name in ("steps", "num_images"):
    if getattr(args, name) < 1:
      raise _cli.UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  if args.batch_size is not None and args.batch_size < 1:
    raise _cli.UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
  if args.sampler is not None and args.sampler not in samplers.available():
    raise _cli.UsageError(f"unknown --sampler {args.sampler!r}; available: {', '.join(samplers.available())}")
  if not 0.0 <= args.guidance_rescale <= 1.0:
    raise _cli.UsageError(f"--guidance-rescale must be in [0, 1], got {args.guidance_rescale:g}")
  if not args.out.lower().endswith(".png"):
    raise _cli.UsageError(f"--out must name a .png file, got {args.out!r}")
  lora_entries(args)


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  _check(args)
  kind = next(k for k in sorted(_cli.SOURCES) if getattr(args, k) is not None)

  import jax
  import numpy as np

  start = time.perf_counter()
  pipe = _cli.load_model(args)
  sampler = args.sampler or getattr(pipe, "defaults", {}).get("sampler", "ddim")
  print(f"loaded {kind} model from {getattr(args, kind)} in {time.perf_counter() - start:.1f}s", flush=True)

  loras = lora_entries(args)
  if loras:
    pipe.lora_params(loras)  # read and check the files once, before any sampling
    print("LoRA: " + ", ".join(f"{f} x{s:g}" for f, s in loras), flush=True)
  batch = min(args.batch_size or args.num_images, args.num_images)
  key = jax.random.key(args.seed)
  images = []
  num_batches = -(-args.num_images // batch)
  for i in range(num_batches):
    n = min(batch, args.num_images - i * batch)
    t0 = time.perf_counter()
    out = pipe.generate([args.prompt] * n, key=jax.random.fold_in(key, i), num_steps=args.steps,
                        guidance_scale=args.guidance, guidance_rescale=args.guidance_rescale, sampler=sampler,
                        negative_prompts=args.negative_prompt, height=args.height, width=args.width,
                        **({"lora": loras} if loras else {}))
    images.append(np.asarray(jax.device_get(out)))
    note = " (includes compilation)" if i == 0 else ""
    print(f"batch {i + 1}/{num_batches}: {n} image(s), {args.steps} {sampler} steps in "
          f"{time.perf_counter() - t0:.1f}s{note}", flush=True)
  grid = _cli.make_grid(np.concatenate(images, axis=0), cols=args.cols)
  path = _cli.save_png(args.out, grid)
  print(f"wrote {path} ({grid.shape[1]}x{grid.shape[0]}, {args.num_images} images) in "
        f"{time.perf_counter() - start:.1f}s total", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(_cli.run(main, prog="txt2img"))
