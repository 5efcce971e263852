"""ControlNet sampling: the control image and the generated image(s) side by side in one PNG.

Usage:
  python -m sample.controlnet --diffusers checkpoints/sd15 --controlnet checkpoints/sd-controlnet-canny \
      --image fox.png --canny [--low 100] [--high 200] --prompt "a red fox in snow" --out fox_cn.png \
      [--steps 20] [--guidance 7.5] [--guidance_rescale 0.0] [--sampler ddim] [--seed 0] [--num-images 1] \
      [--scale 1.0] [--guess-mode] [--start 0.0] [--end 1.0] [--height 512] [--width 512] \
      [--negative-prompt "blurry"] [--lora style.safetensors --lora-scale 0.8] \
      [--textual_inversion emb.safetensors [--token T]]
  python -m sample.controlnet --single_file v1-5.safetensors --config checkpoints/sd15 --controlnet cn --image ...
  python -m sample.controlnet --workdir runs/controlnet_digits --image edges.png --prompt "7"

The model comes from one source flag (:func:`sample._cli.add_model_flags`); ``--controlnet`` folders are
attached to it (:meth:`jdiff.pipelines.StableDiffusion.with_controlnets`), and may be left out for a
``train.controlnet`` workdir, which holds its trained net. Several ControlNets: repeat ``--controlnet`` and
``--image`` (one image per net, in order) and give ``--scale`` once for all or once per net. ``--canny``
turns each image into its Canny edge map (:func:`jdiff.control_images.canny`, OpenCV's algorithm) before it
is used. Without ``--height`` / ``--width`` the size is the first image's, rounded down to what the
denoiser accepts. ``--steps`` / ``--guidance`` / ``--negative-prompt`` / ``--guidance-rescale`` are also
spelled ``--num_steps`` / ``--guidance_scale`` / ``--negative_prompt`` / ``--guidance_rescale``. Without
``--sampler`` the model's default sampler is used. User mistakes print one line and exit with 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from sample import _cli
from sample.txt2img import add_lora_flags, lora_entries

# the control flags' names in this program and in sample.inpaint (whose --image is the image to edit)
FLAGS = {"image": "--image", "scale": "--scale", "start": "--start", "end": "--end", "guess_mode": "--guess-mode"}
PREFIXED = {"image": "--control_image", "scale": "--control_scale", "start": "--control_start",
            "end": "--control_end", "guess_mode": "--guess_mode"}


def add_control_flags(parser: argparse.ArgumentParser, names: dict[str, str] = FLAGS, *,
                      required: bool = True) -> None:
  """``--controlnet`` folders, their control images (``names["image"]``), Canny preprocessing and the
  conditioning scale / guess mode / start-end window; the values land in ``args.controlnet``,
  ``control_image``, ``canny``, ``low``, ``high``, ``control_scale``, ``guess_mode``, ``control_start``,
  ``control_end``."""
  parser.add_argument("--controlnet", action="append", default=[], metavar="PATH",
                      help="diffusers ControlNetModel folder; repeatable (optional for a train.controlnet workdir)")
  parser.add_argument(names["image"], dest="control_image", required=required, action="append",
                      default=None if required else [], metavar="FILE", help="control image, one per ControlNet")
  parser.add_argument("--canny", action="store_true", help="use the Canny edges of each control image")
  parser.add_argument("--low", type=float, default=100.0, help="Canny low threshold (default: 100)")
  parser.add_argument("--high", type=float, default=200.0, help="Canny high threshold (default: 200)")
  parser.add_argument(names["scale"], dest="control_scale", type=float, action="append", default=[],
                      help="controlnet_conditioning_scale, once for all nets or once per net (default: 1.0)")
  parser.add_argument(names["guess_mode"], dest="guess_mode", action="store_true", help="diffusers' guess mode")
  parser.add_argument(names["start"], dest="control_start", type=float, default=0.0,
                      help="control_guidance_start (default: 0)")
  parser.add_argument(names["end"], dest="control_end", type=float, default=1.0,
                      help="control_guidance_end (default: 1)")


def check_control_flags(args, names: dict[str, str] = FLAGS) -> None:
  """Checks the control flags without loading anything: folders and images exist, counts agree,
  thresholds and windows are ordered."""
  from PIL import Image, UnidentifiedImageError

  images, nets = args.control_image or [], args.controlnet
  uses = bool(nets or images)
  if not uses:
    return
  if not images:
    raise _cli.UsageError(f"--controlnet needs {names['image']} (one control image per net)")
  if nets and len(images) != len(nets):
    raise _cli.UsageError(f"{len(images)} {names['image']} for {len(nets)} --controlnet (one each)")
  if not nets and _cli.source_kind(args) != "workdir":
    raise _cli.UsageError(f"{names['image']} needs --controlnet FOLDER (only a train.controlnet workdir holds its "
                          "own ControlNet)")
  if len(args.control_scale) not in (0, 1, max(len(nets), len(images))):
    raise _cli.UsageError(f"{len(args.control_scale)} {names['scale']} values for {len(images)} control images")
  if args.canny and not 0 <= args.low <= args.high:
    raise _cli.UsageError(f"--low and --high must satisfy 0 <= low <= high, got {args.low:g}, {args.high:g}")
  if not 0.0 <= args.control_start < args.control_end <= 1.0:
    raise _cli.UsageError(f"{names['start']} and {names['end']} must satisfy 0 <= start < end <= 1, got "
                          f"{args.control_start:g}, {args.control_end:g}")
  for p in nets:
    if not Path(p).is_dir():
      raise _cli.UsageError(f"--controlnet folder {p!r} does not exist")
  for p in images:
    if not Path(p).is_file():
      raise _cli.UsageError(f"{names['image']} file {p!r} does not exist")
    try:  # fail before the (slow) model load
      with Image.open(p) as im:
        im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
      raise _cli.UsageError(f"{names['image']} {p!r} is not a readable image ({err})") from err


def attach_controlnets(pipe, args, names: dict[str, str] = FLAGS):
  """``pipe`` with the ``--controlnet`` folders attached (a workdir's own net when none is given), checked
  against the number of control images."""
  if args.controlnet:
    pipe = pipe.with_controlnets(args.controlnet)
  count = len(getattr(pipe, "controlnets", ()))
  if count != len(args.control_image):
    raise _cli.UsageError(f"the model holds {count} ControlNet(s) but {len(args.control_image)} {names['image']} "
                          "were given (one each)")
  return pipe


def control_kwargs(args, height: int, width: int) -> tuple[list[Any], dict[str, Any]]:
  """The control images at ``height`` x ``width`` (Canny edges with ``--canny``) and the ControlNet
  keywords of the pipeline methods."""
  from jdiff import control_images

  controls = []
  for path in args.control_image:
    img = control_images.load_control_image(path, (height, width))  # [H, W, 3] in [0, 1]
    controls.append(control_images.canny(img, args.low, args.high) if args.canny else img)
  scale = args.control_scale if len(args.control_scale) > 1 else (args.control_scale or [1.0])[0]
  return controls, {"control_images": controls if len(controls) > 1 else controls[0],
                    "controlnet_conditioning_scale": scale, "guess_mode": args.guess_mode,
                    "control_guidance_start": args.control_start, "control_guidance_end": args.control_end}


def build_parser() -> _cli.ArgumentParser:
  parser = _cli.ArgumentParser(prog="controlnet", description="Generate images steered by control images.")
  _cli.add_model_flags(parser)
  add_control_flags(parser)
  parser.add_argument("--prompt", required=True, help="the text prompt")
  parser.add_argument("--negative-prompt", "--negative_prompt", default=None, dest="negative_prompt",
                      help="unconditional prompt (default: empty)")
  parser.add_argument("--out", default="controlnet.png", help="output PNG (default: controlnet.png)")
  parser.add_argument("--steps", "--num_steps", type=int, default=20, dest="steps", help="sampler steps (default: 20)")
  parser.add_argument("--guidance", "--guidance_scale", type=float, default=7.5, dest="guidance",
                      help="classifier-free guidance scale (default: 7.5)")
  parser.add_argument("--guidance-rescale", "--guidance_rescale", type=float, default=0.0, dest="guidance_rescale",
                      help="guidance rescale phi in [0, 1] (default: 0)")
  parser.add_argument("--sampler", default=None,
                      help="sampler name (jdiff.samplers.available(); default: the model's, else ddim)")
  parser.add_argument("--seed", type=int, default=0, help="random seed")
  parser.add_argument("--num-images", "--num_images", type=int, default=1, dest="num_images",
                      help="images to generate (default: 1)")
  parser.add_argument("--height", type=int, default=None, help="image height in pixels")
  parser.add_argument("--width", type=int, default=None, help="image width in pixels")
  add_lora_flags(parser)
  return parser


def _check(args) -> None:
  from jdiff import samplers

  for name in ("steps", "num_images"):
    if getattr(args, name) < 1:
      raise _cli.UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  if args.sampler is not None and args.sampler not in samplers.available():
    raise _cli.UsageError(f"unknown --sampler {args.sampler!r}; available: {', '.join(samplers.available())}")
  if not 0.0 <= args.guidance_rescale <= 1.0:
    raise _cli.UsageError(f"--guidance-rescale must be in [0, 1], got {args.guidance_rescale:g}")
  if not args.out.lower().endswith(".png"):
    raise _cli.UsageError(f"--out must name a .png file, got {args.out!r}")
  check_control_flags(args)
  lora_entries(args)


def _size(args, pipe, first_image: str) -> tuple[int, int]:
  """--height/--width, else the first image's size rounded down to a multiple of the pipeline's."""
  from PIL import Image, UnidentifiedImageError

  f = pipe.size_multiple
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

  start = time.perf_counter()
  pipe = attach_controlnets(_cli.load_model(args), args)
  kind = _cli.source_kind(args)
  print(f"loaded {kind} model from {getattr(args, kind)} with {len(pipe.controlnets)} ControlNet(s) in "
        f"{time.perf_counter() - start:.1f}s", flush=True)
  height, width = _size(args, pipe, args.control_image[0])
  controls, control = control_kwargs(args, height, width)
  sampler = args.sampler or pipe.defaults.get("sampler", "ddim")
  loras = lora_entries(args)
  if loras:
    pipe.lora_params(loras)

  t0 = time.perf_counter()
  images = pipe.generate([args.prompt] * args.num_images, key=jax.random.key(args.seed), num_steps=args.steps,
                         guidance_scale=args.guidance, guidance_rescale=args.guidance_rescale, sampler=sampler,
                         negative_prompts=args.negative_prompt, height=height, width=width, lora=loras, **control)
  images = np.asarray(jax.device_get(images))
  if images.shape[-1] == 1:  # a one-channel model: gray tiles beside the RGB control images
    images = np.repeat(images, 3, axis=-1)
  print(f"{args.num_images} image(s), {args.steps} {sampler} steps in {time.perf_counter() - t0:.1f}s "
        "(includes compilation)", flush=True)
  tiles = np.concatenate([np.stack(controls), images], axis=0)
  grid = _cli.make_grid(tiles, cols=len(controls) + args.num_images)
  path = _cli.save_png(args.out, grid)
  print(f"wrote {path} ({grid.shape[1]}x{grid.shape[0]}: control image(s), then result(s)) in "
        f"{time.perf_counter() - start:.1f}s total", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(_cli.run(main, prog="controlnet"))
