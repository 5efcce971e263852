"""Inpainting: regenerate the white region of a mask, keep the rest of the image.

Usage:
  python -m sample.inpaint --diffusers checkpoints/sd15-inpainting --image room.png --mask mask.png \
      --prompt "a red armchair" --out room_chair.png [--negative_prompt "blurry"] [--strength 1.0] \
      [--num_steps 50] [--guidance_scale 7.5] [--guidance_rescale 0.0] [--sampler ddim] [--seed 0] \
      [--lora style.safetensors --lora-scale 0.8] [--textual_inversion emb.safetensors [--token T]]
  python -m sample.inpaint --single_file v1-5.safetensors --config checkpoints/sd15 --image ... --mask ...
  python -m sample.inpaint --diffusers checkpoints/sd15 --controlnet checkpoints/sd-controlnet-canny \
      --control_image edges.png [--canny] [--control_scale 1.0] [--control_start 0] [--control_end 1] \
      [--guess_mode] --image room.png --mask mask.png --prompt "a red armchair"

The model comes from one source flag (:func:`sample._cli.add_model_flags`). An inpainting UNet (9 input
channels) gets the mask and masked image as inputs; an ordinary UNet keeps the unmasked region pinned
to the image (:meth:`jdiff.pipelines.StableDiffusion.inpaint`). The mask is read as grayscale (white:
regenerate) and must have the image's size; the image's sides must be multiples of the UNet's factor
(8 x 2^(levels - 1) pixels for SD). ``--num_steps`` / ``--guidance_scale`` / ``--negative_prompt`` are also
spelled ``--steps`` / ``--guidance`` / ``--negative-prompt`` as in ``sample.txt2img``. Without
``--sampler`` the model's default sampler is used. ControlNets (``--controlnet`` folders with one
``--control_image`` each, or a ``train.controlnet`` workdir's own net) steer the inpainting as in
``sample.controlnet`` (:func:`sample.controlnet.add_control_flags`); control images are resized to the
image's size. User mistakes print one line and exit with 2.
"""

from __future__ import annotations

import sys
import time

from sample import _cli
from sample.controlnet import PREFIXED, add_control_flags, attach_controlnets, check_control_flags, control_kwargs
from sample.txt2img import add_lora_flags, lora_entries


def build_parser() -> _cli.ArgumentParser:
  parser = _cli.ArgumentParser(prog="inpaint", description="Regenerate the masked region of an image.")
  _cli.add_model_flags(parser)
  parser.add_argument("--image", required=True, metavar="FILE", help="the image to edit")
  parser.add_argument("--mask", required=True, metavar="FILE",
                      help="grayscale mask of the image's size: white is regenerated, black kept")
  parser.add_argument("--prompt", required=True, help="the text prompt")
  parser.add_argument("--negative_prompt", "--negative-prompt", default=None, dest="negative_prompt",
                      help="unconditional prompt (default: empty)")
  parser.add_argument("--out", default="inpaint.png", help="output PNG (default: inpaint.png)")
  parser.add_argument("--strength", type=float, default=1.0,
                      help="in (0, 1]: 1 starts from noise, less from the noised image (default: 1)")
  parser.add_argument("--num_steps", "--steps", type=int, default=50, dest="num_steps",
                      help="sampler steps before --strength cuts them (default: 50)")
  parser.add_argument("--guidance_scale", "--guidance", type=float, default=7.5, dest="guidance_scale",
                      help="classifier-free guidance scale (default: 7.5)")
  parser.add_argument("--guidance_rescale", "--guidance-rescale", type=float, default=0.0, dest="guidance_rescale",
                      help="guidance rescale phi in [0, 1] (default: 0)")
  parser.add_argument("--sampler", default=None,
                      help="sampler name (jdiff.samplers.available(); default: the model's, else ddim)")
  parser.add_argument("--seed", type=int, default=0, help="random seed")
  add_lora_flags(parser)
  add_control_flags(parser, PREFIXED, required=False)
  return parser


def check_sampling_flags(args) -> None:
  """The checks ``--num_steps``, ``--guidance_rescale``, ``--sampler`` and ``--out`` (PNG) share."""
  from jdiff import samplers

  if args.num_steps < 1:
    raise _cli.UsageError(f"--num_steps must be >= 1, got {args.num_steps}")
  if not 0.0 <= args.guidance_rescale <= 1.0:
    raise _cli.UsageError(f"--guidance_rescale must be in [0, 1], got {args.guidance_rescale:g}")
  if args.sampler is not None and args.sampler not in samplers.available():
    raise _cli.UsageError(f"unknown --sampler {args.sampler!r}; available: {', '.join(samplers.available())}")
  if not args.out.lower().endswith(".png"):
    raise _cli.UsageError(f"--out must name a .png file, got {args.out!r}")


def image_mode(pipe) -> str:
  """The PIL mode of the model's images: "L" for a one-channel VAE, else "RGB"."""
  return "L" if int(getattr(pipe.vae.config, "in_channels", 3)) == 1 else "RGB"


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  check_sampling_flags(args)
  if not 0.0 < args.strength <= 1.0:
    raise _cli.UsageError(f"--strength must be in (0, 1], got {args.strength:g}")
  loras = lora_entries(args)
  _cli.read_image(args.image, flag="--image")  # fail before the (slow) model load
  _cli.read_image(args.mask, flag="--mask", mode="L")
  check_control_flags(args, PREFIXED)

  import jax
  import numpy as np

  start = time.perf_counter()
  pipe = _cli.load_model(args)
  pipe = attach_controlnets(pipe, args, PREFIXED)  # a workdir's own net needs its --control_image too
  kind = _cli.source_kind(args)
  print(f"loaded {kind} model from {getattr(args, kind)} in {time.perf_counter() - start:.1f}s", flush=True)
  image = _cli.read_image(args.image, flag="--image", mode=image_mode(pipe))  # [H, W, C] in [0, 1]
  mask = _cli.read_image(args.mask, flag="--mask", mode="L")[..., 0]  # [H, W] in [0, 1]
  control = control_kwargs(args, image.shape[0], image.shape[1])[1] if args.control_image else {}
  sampler = args.sampler or pipe.defaults.get("sampler", "ddim")
  t0 = time.perf_counter()
  out = pipe.inpaint(image, mask, args.prompt, key=jax.random.key(args.seed), strength=args.strength,
                     num_steps=args.num_steps, guidance_scale=args.guidance_scale,
                     guidance_rescale=args.guidance_rescale, sampler=sampler, negative_prompts=args.negative_prompt,
                     **({"lora": loras} if loras else {}), **control)
  out = np.asarray(jax.device_get(out))[0]  # [H, W, C] in [0, 1]
  print(f"{args.num_steps} {sampler} steps at strength {args.strength:g} in {time.perf_counter() - t0:.1f}s "
        "(includes compilation)", flush=True)
  path = _cli.save_png(args.out, _cli.to_uint8(out))
  print(f"wrote {path} ({out.shape[1]}x{out.shape[0]}) in {time.perf_counter() - start:.1f}s total", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(_cli.run(main, prog="inpaint"))
