"""DDIM inversion: the latent noise that DDIM sampling maps back to an image, and the round trip.

Usage:
  python -m sample.invert --diffusers checkpoints/sd15 --image cat.png --prompt "a photo of a cat" \
      --out cat_latents.npy [--num_steps 50] [--guidance_scale 1] [--guidance_rescale 0] [--negative_prompt ""] \
      [--reconstruct cat_again.png]
  python -m sample.invert --workdir runs/ldm_digits --roundtrip 64 [--num_steps 50] [--guidance_scale 1]

``--out`` receives the inverted latents z_T ``[1, h, w, C]`` (float32 ``.npy``, the unit-variance scale of
``StableDiffusion.generate``'s ``latents``). ``--reconstruct`` samples z_T back with DDIM at the same steps
and guidance, writes the decoded image and prints the relative reconstruction error in latent space,
``||z0' - z0|| / ||z0||``, with z0 the image's VAE posterior-mean latents and z0' what DDIM maps z_T to.

``--roundtrip N`` (a training workdir): the first N examples of the run's own data, each inverted under
its own caption and regenerated; prints JSON with the latent relative errors and the pixel distance of
the regenerated images to the VAE reconstructions (decoded z0) and to the data.

Both use the bundle's pure pieces (:meth:`~jdiff.pipelines.StableDiffusion.encode_images`,
:meth:`~jdiff.pipelines.StableDiffusion.model_fn`, :func:`jdiff.samplers.ddim_inversion`,
:func:`jdiff.samplers.sample`), so they also serve models whose images have one channel; the latents
equal :meth:`~jdiff.pipelines.StableDiffusion.invert`'s. ``--num_steps`` / ``--guidance_scale`` /
``--negative_prompt`` / ``--guidance_rescale`` are also spelled ``--steps`` / ``--guidance`` /
``--negative-prompt`` / ``--guidance-rescale``. User mistakes print one line and exit with 2.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sample import _cli
from sample.inpaint import image_mode

__all__ = ["build_parser", "invert_latents", "roundtrip", "relative_errors", "main"]


def build_parser() -> _cli.ArgumentParser:
  parser = _cli.ArgumentParser(prog="invert", description="DDIM-invert an image into latent noise.")
  _cli.add_model_flags(parser)
  parser.add_argument("--image", default=None, metavar="FILE", help="the image to invert")
  parser.add_argument("--prompt", default=None, help="the prompt the image is inverted under")
  parser.add_argument("--negative_prompt", "--negative-prompt", default=None, dest="negative_prompt",
                      help="unconditional prompt under guidance > 1 (default: empty)")
  parser.add_argument("--out", default=None, metavar="FILE.npy", help="where the latents z_T go")
  parser.add_argument("--num_steps", "--steps", type=int, default=50, dest="num_steps",
                      help="inversion (and regeneration) steps (default: 50)")
  parser.add_argument("--guidance_scale", "--guidance", type=float, default=1.0, dest="guidance_scale",
                      help="guidance scale during inversion and regeneration (default: 1, the conditional model)")
  parser.add_argument("--guidance_rescale", "--guidance-rescale", type=float, default=0.0, dest="guidance_rescale",
                      help="guidance rescale phi in [0, 1] under guidance > 1 (default: 0)")
  parser.add_argument("--reconstruct", default=None, metavar="FILE.png",
                      help="regenerate with DDIM from z_T, write the image, print the latent error")
  parser.add_argument("--roundtrip", type=int, default=None, metavar="N",
                      help="a training workdir: round-trip its first N data examples; prints JSON")
  parser.add_argument("--batch_size", type=int, default=64, help="images per device call with --roundtrip")
  return parser


def _check(args) -> None:
  if args.num_steps < 1:
    raise _cli.UsageError(f"--num_steps must be >= 1, got {args.num_steps}")
  if not 0.0 <= args.guidance_rescale <= 1.0:
    raise _cli.UsageError(f"--guidance_rescale must be in [0, 1], got {args.guidance_rescale:g}")
  if args.roundtrip is not None:
    if args.image or args.out or args.reconstruct or args.prompt:
      raise _cli.UsageError("--roundtrip takes its images and captions from the run's data: no --image, --prompt, "
                            "--out or --reconstruct")
    if args.roundtrip < 1 or args.batch_size < 1:
      raise _cli.UsageError(f"--roundtrip and --batch_size must be >= 1, got {args.roundtrip}, {args.batch_size}")
    return
  for flag in ("image", "prompt", "out"):
    if getattr(args, flag) is None:
      raise _cli.UsageError(f"--{flag} is required (or --roundtrip N)")
  if not args.out.lower().endswith(".npy"):
    raise _cli.UsageError(f"--out must name a .npy file, got {args.out!r}")
  if args.reconstruct is not None and not args.reconstruct.lower().endswith(".png"):
    raise _cli.UsageError(f"--reconstruct must name a .png file, got {args.reconstruct!r}")


def _program(pipe, num_steps: int, guidance_scale: float, regenerate: bool, guidance_rescale: float = 0.0):
  """A jitted ``(unet, text, vae params, images [B, H, W, C] in [0, 1], ids, neg_ids) -> dict`` of the
  posterior-mean latents ``z0``, the inverted ``z_T`` and, with ``regenerate``, the DDIM sample ``z0_back``
  and the decoded images ``recon`` (of z0) and ``back`` (of z0_back), in [0, 1]."""
  import jax

  from jdiff import samplers
  from jdiff.pipelines import accepted_options

  # guidance as StableDiffusion.invert / generate apply it: CFG above 1, a distilled model's embedding
  guided = bool(pipe.guidance_embedding_dim) or (pipe.cfg and guidance_scale > 1.0)
  inversion = accepted_options(samplers.ddim_inversion, pipe.sampler_options)
  ddim = accepted_options("ddim", pipe.sampler_options)

  def run(unet_params, text_params, vae_params, images, ids, neg_ids):
    z0 = pipe.encode_images(vae_params, images * 2.0 - 1.0, sample=False)  # [B, h, w, C]
    guide = pipe.guidance_kwargs(text_params, ids.shape[0], guidance_scale if guided else None, neg_ids)
    if "null_context" in guide:
      guide["guidance_rescale"] = guidance_rescale
    model_fn = pipe.model_fn(unet_params, pipe.encode_text(text_params, ids), **guide)
    z_T = samplers.ddim_inversion(model_fn, pipe.schedule, z0, num_steps=num_steps, prediction=pipe.prediction,
                                  **inversion)
    out = {"z0": z0, "z_T": z_T}
    if regenerate:
      z0_back = samplers.sample("ddim", model_fn, pipe.schedule, z_T, num_steps=num_steps, key=jax.random.key(0),
                                prediction=pipe.prediction, **ddim)
      out.update(z0_back=z0_back, recon=pipe.decode(vae_params, z0) * 0.5 + 0.5,
                 back=pipe.decode(vae_params, z0_back) * 0.5 + 0.5)
    return out

  return jax.jit(run)


def invert_latents(pipe, images: np.ndarray, prompts: Sequence[str], *, num_steps: int = 50,
                   guidance_scale: float = 1.0, negative_prompts: str | Sequence[str] | None = None,
                   regenerate: bool = False, batch_size: int | None = None,
                   guidance_rescale: float = 0.0) -> dict[str, np.ndarray]:
  """DDIM inversion of ``images`` ``[B, H, W, C]`` in [0, 1] under ``prompts`` (one each), in batches.

  Returns:
    numpy arrays: ``z0`` (posterior-mean latents), ``z_T`` (the inverted noise, equal to
    :meth:`~jdiff.pipelines.StableDiffusion.invert`), and with ``regenerate`` ``z0_back`` (DDIM from
    ``z_T`` at the same steps and guidance), ``recon`` and ``back`` (their decoded images in [0, 1]).
  """
  images = np.asarray(images, np.float32)
  prompts = list(prompts)
  if images.ndim != 4 or images.shape[0] != len(prompts):
    raise ValueError(f"images must be [B={len(prompts)}, H, W, C], got shape {images.shape}")
  if negative_prompts is None or isinstance(negative_prompts, str):
    negative_prompts = [negative_prompts or ""] * len(prompts)
  program = _program(pipe, int(num_steps), float(guidance_scale), regenerate, float(guidance_rescale))
  batch = batch_size or len(prompts)
  parts: list[dict[str, Any]] = []
  for i in range(0, len(prompts), batch):
    ids = pipe.tokenize(prompts[i:i + batch])
    neg_ids = pipe.tokenize(list(negative_prompts[i:i + batch]))
    out = program(pipe.unet_params, pipe.text_params, pipe.vae_params, images[i:i + batch], ids, neg_ids)
    parts.append({k: np.asarray(v) for k, v in out.items()})
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def relative_errors(z0: np.ndarray, z0_back: np.ndarray) -> np.ndarray:
  """Per-image ``||z0_back - z0|| / ||z0||`` ``[B]`` (float64)."""
  a = np.asarray(z0, np.float64).reshape(len(z0), -1)
  b = np.asarray(z0_back, np.float64).reshape(len(z0_back), -1)
  return np.linalg.norm(b - a, axis=1) / np.linalg.norm(a, axis=1)


def _data_examples(pipe, count: int) -> tuple[np.ndarray, list[str]]:
  """The first ``count`` images ``[N, H, W, C]`` in [0, 1] and captions of the run's own data."""
  from jdiff import data

  config = pipe.data_config
  if config is None:
    raise _cli.UsageError("--roundtrip needs a training workdir (its config names the data)")
  config = dict(config)
  if config.get("kind") == "precomputed":
    raise _cli.UsageError("--roundtrip needs images; this run trained on precomputed latents")
  names = inspect.signature(data.make_source).parameters
  source = data.make_source(**{k: v for k, v in config.items() if k in names and v != ""})
  if count > len(source):
    raise _cli.UsageError(f"--roundtrip {count}: the data holds {len(source)} examples")
  prep = data.Preprocess(image_size=config.get("image_size") or None, channels=config.get("channels") or None)
  images, captions = [], []
  for i in range(count):
    ex = source[i]
    images.append(prep(ex, i, 0)["image"] * 0.5 + 0.5)  # [-1, 1] -> [0, 1]
    captions.append(ex["caption"])
  if not all(captions):
    raise _cli.UsageError("--roundtrip needs captioned data (an example has an empty caption)")
  return np.stack(images), captions


def roundtrip(pipe, count: int, *, num_steps: int = 50, guidance_scale: float = 1.0,
              batch_size: int = 64, guidance_rescale: float = 0.0) -> dict[str, Any]:
  """Inverts the first ``count`` examples of a training run's data under their captions, regenerates
  them with DDIM, and measures: latent relative errors (:func:`relative_errors`; their mean, max, and
  the pooled ``||Z0' - Z0|| / ||Z0||``), and the RMS / max pixel distance in [0, 1] of the regenerated
  images to the VAE reconstructions and of both to the data."""
  images, captions = _data_examples(pipe, count)
  out = invert_latents(pipe, images, captions, num_steps=num_steps, guidance_scale=guidance_scale, regenerate=True,
                       batch_size=batch_size, guidance_rescale=guidance_rescale)
  err = relative_errors(out["z0"], out["z0_back"])
  z0, back = out["z0"].astype(np.float64), out["z0_back"].astype(np.float64)
  rms = lambda a, b: float(np.sqrt(np.mean((np.asarray(a, np.float64) - b) ** 2)))
  return {"images": count, "num_steps": num_steps, "guidance_scale": guidance_scale,
          "guidance_rescale": guidance_rescale,
          "latent_relative_error_mean": float(err.mean()), "latent_relative_error_max": float(err.max()),
          "latent_relative_error_pooled": float(np.linalg.norm(back - z0) / np.linalg.norm(z0)),
          "pixel_rms_regenerated_vs_vae_reconstruction": rms(out["back"], out["recon"]),
          "pixel_max_regenerated_vs_vae_reconstruction": float(np.max(np.abs(out["back"] - out["recon"]))),
          "pixel_rms_vae_reconstruction_vs_data": rms(out["recon"], images),
          "pixel_rms_regenerated_vs_data": rms(out["back"], images)}


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  _check(args)
  if args.image is not None:
    _cli.read_image(args.image, flag="--image")  # fail before the (slow) model load

  start = time.perf_counter()
  pipe = _cli.load_model(args)
  kind = _cli.source_kind(args)
  print(f"loaded {kind} model from {getattr(args, kind)} in {time.perf_counter() - start:.1f}s", flush=True,
        file=sys.stderr if args.roundtrip else sys.stdout)
  if args.roundtrip is not None:
    result = roundtrip(pipe, args.roundtrip, num_steps=args.num_steps, guidance_scale=args.guidance_scale,
                       batch_size=args.batch_size, guidance_rescale=args.guidance_rescale)
    result["seconds"] = time.perf_counter() - start
    print(json.dumps(result, indent=2))
    return 0

  image = _cli.read_image(args.image, flag="--image", mode=image_mode(pipe))  # [H, W, C] in [0, 1]
  f = pipe.size_multiple
  if image.shape[0] % f or image.shape[1] % f:
    raise _cli.UsageError(f"--image is {image.shape[1]}x{image.shape[0]}: height and width must be multiples of {f}")
  out = invert_latents(pipe, image[None], [args.prompt], num_steps=args.num_steps,
                       guidance_scale=args.guidance_scale, negative_prompts=args.negative_prompt,
                       regenerate=args.reconstruct is not None, guidance_rescale=args.guidance_rescale)
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  np.save(args.out, out["z_T"])
  print(f"wrote {args.out} (latents {list(out['z_T'].shape)}, {args.num_steps} steps, guidance "
        f"{args.guidance_scale:g})", flush=True)
  if args.reconstruct is not None:
    path = _cli.save_png(args.reconstruct, _cli.to_uint8(out["back"][0]))
    err = float(relative_errors(out["z0"], out["z0_back"])[0])
    print(f"wrote {path}; relative reconstruction error in latent space ||z0' - z0|| / ||z0|| = {err:.4g}",
          flush=True)
  print(f"done in {time.perf_counter() - start:.1f}s total", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(_cli.run(main, prog="invert"))
