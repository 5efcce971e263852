"""ControlNet sampling: the control image and the generated image(s) side by side in one PNG.

Usage:
  python -m sample.controlnet --diffusers checkpoints/sd15 --controlnet checkpoints/sd-controlnet-canny \
      --image fox.png --canny [--low 100] [--high 200] --prompt "a red fox in snow" --out fox_cn.png \
      [--steps 20] [--guidance 7.5] [--sampler ddim] [--seed 0] [--num-images 1] [--scale 1.0] \
      [--guess-mode] [--start 0.0] [--end 1.0] [--height 512] [--width 512] [--negative-prompt "blurry"] \
      [--lora style.safetensors --lora-scale 0.8]

Several ControlNets: repeat ``--controlnet`` and ``--image`` (one image per net, in order) and give
``--scale`` once for all or once per net. ``--canny`` turns each image into its Canny edge map
(:func:`jdiff.control_images.canny`, OpenCV's algorithm) before it is used. Without ``--height`` /
``--width`` the size is the first image's, rounded down to what the UNet accepts. User mistakes print
one line and exit with 2.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from sample import _cli
from sample.txt2img import add_lora_flags, lora_entries


def build_parser() -> _cli.ArgumentParser:
  parser = _cli.ArgumentParser(prog="controlnet", description="Generate images steered by control images.")
  parser.add_argument("--diffusers", required=True, metavar="PATH", help="Stable Diffusion pipeline folder")
  parser.add_argument("--controlnet", required=True, action="append", metavar="PATH",
                      help="diffusers ControlNetModel folder; repeatable")
  parser.add_argument("--image", required=True, action="append", metavar="FILE",
                      help="control image, one per --controlnet")
  parser.add_argument("--canny", action="store_true", help="use the Canny edges of each image as control")
  parser.add_argument("--low", type=float, default=100.0, help="Canny low threshold (default: 100)")
  parser.add_argument("--high", type=float, default=200.0, help="Canny high threshold (default: 200)")
  parser.add_argument("--prompt", required=True, help="the text prompt")
  parser.add_argument("--negative-prompt", default=None, help="unconditional prompt (default: empty)")
  parser.add_argument("--out", default="controlnet.png", help="output PNG (default: controlnet.png)")
  parser.add_argument("--steps", type=int, default=20, help="sampler steps (default: 20)")
  parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
  parser.add_argument("--sampler", default="ddim", help="sampler name (jdiff.samplers.available())")
  parser.add_argument("--seed", type=int, default=0, help="random seed")
  parser.add_argument("--num-images", type=int, default=1, help="images to generate (default: 1)")
  parser.add_argument("--scale", type=float, action="append", default=[],
                      help="controlnet_conditioning_scale, once for all nets or once per net (default: 1.0)")
  parser.add_argument("--guess-mode", action="store_true", help="diffusers' guess mode")
  parser.add_argument("--start", type=float, default=0.0, help="control_guidance_start (default: 0)")
  parser.add_argument("--end", type=float, default=1.0, help="control_guidance_end (default: 1)")
  parser.add_argument("--height", type=int, default=None, help="image height in pixels")
  parser.add_argument("--width", type=int, default=None, help="image width in pixels")
  add_lora_flags(parser)
  return parser


def _check(args) -> None:
  from jdiff import samplers

  for name in ("steps", "num_images"):
    if getattr(args, name) < 1:
      raise _cli.UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  if args.sampler not in samplers.available():
    raise _cli.UsageError(f"unknown --sampler {args.sampler!r}; available: {', '.join(samplers.available())}")
  if not args.out.lower().endswith(".png"):
    raise _cli.UsageError(f"--out must name a .png file, got {args.out!r}")
  if len(args.image) != len(args.controlnet):
    raise _cli.UsageError(f"{len(args.image)} --image for {len(args.controlnet)} --controlnet (one each)")
  if len(args.scale) not in (0, 1, len(args.controlnet)):
    raise _cli.UsageError(f"{len(args.scale)} --scale values for {len(args.controlnet)} --controlnet")
  if args.canny and not 0 <= args.low <= args.high:
    raise _cli.UsageError(f"--low and --high must satisfy 0 <= low <= high, got {args.low:g}, {args.high:g}")
  if not 0.0 <= args.start < args.end <= 1.0:
    raise _cli.UsageError(f"--start and --end must satisfy 0 <= start < end <= 1, got {args.start:g}, {args.end:g}")
  for kind, paths in (("--diffusers", [args.diffusers]), ("--controlnet", args.controlnet)):
    for p in paths:
      if not Path(p).is_dir():
        raise _cli.UsageError(f"{kind} folder {p!r} does not exist")
  from PIL import Image, UnidentifiedImageError

  for p in args.image:
    if not Path(p).is_file():
      raise _cli.UsageError(f"--image file {p!r} does not exist")
    try:  # fail before the (slow) model load
      with Image.open(p) as im:
        im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
      raise _cli.UsageError(f"--image {p!r} is not a readable image ({err})") from err
  lora_entries(args)


def _size(args, pipe, first_image: str) -> tuple[int, int]:
  """--height/--width, else the first image's size rounded down to a multiple of the UNet's factor."""
  from PIL import Image, UnidentifiedImageError

  f = pipe.vae_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
  if args.height is not None and args.width is not None:
    return args.height, args.width
  try:
    with Image.open(first_image) as im:
      w, h = im.size
  except (UnidentifiedImageError, OSError) as err:
    raise _cli.UsageError(f"--image {first_image!r} is not a readable image ({err})") from err
  h, w = max(f, h // f * f), max(f, w // f * f)
  return (args.height or h), (args.width or w)


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  _check(args)

  import jax
  import numpy as np

  from jdiff import control_images

  start = time.perf_counter()
  pipe = _cli.load_pipeline("diffusers", args.diffusers, controlnet=args.controlnet)
  print(f"loaded {args.diffusers} with {len(args.controlnet)} ControlNet(s) in "
        f"{time.perf_counter() - start:.1f}s", flush=True)
  height, width = _size(args, pipe, args.image[0])
  controls = []
  for path in args.image:
    img = control_images.load_control_image(path, (height, width))  # [H, W, 3] in [0, 1]
    controls.append(control_images.canny(img, args.low, args.high) if args.canny else img)
  loras = lora_entries(args)
  if loras:
    pipe.lora_params(loras)

  t0 = time.perf_counter()
  images = pipe.generate([args.prompt] * args.num_images, key=jax.random.key(args.seed), num_steps=args.steps,
                         guidance_scale=args.guidance, sampler=args.sampler, negative_prompts=args.negative_prompt,
                         height=height, width=width, control_images=controls if len(controls) > 1 else controls[0],
                         controlnet_conditioning_scale=(args.scale if len(args.scale) > 1
                                                        else (args.scale or [1.0])[0]),
                         guess_mode=args.guess_mode, control_guidance_start=args.start,
                         control_guidance_end=args.end, lora=loras)
  images = np.asarray(jax.device_get(images))
  print(f"{args.num_images} image(s), {args.steps} {args.sampler} steps in {time.perf_counter() - t0:.1f}s "
        "(includes compilation)", flush=True)
  tiles = np.concatenate([np.stack(controls), images], axis=0)
  grid = _cli.make_grid(tiles, cols=len(controls) + args.num_images)
  path = _cli.save_png(args.out, grid)
  print(f"wrote {path} ({grid.shape[1]}x{grid.shape[0]}: control image(s), then result(s)) in "
        f"{time.perf_counter() - start:.1f}s total", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(_cli.run(main, prog="controlnet"))
