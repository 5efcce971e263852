"""``python -m train.export --workdir W --out DIR``: a fine-tune run as a diffusers Stable Diffusion folder.

Writes the run's latest checkpoint (EMA weights; ``--no-ema`` for the online ones) as a folder that
``diffusers.StableDiffusionPipeline.from_pretrained`` (an SDXL run's: ``StableDiffusionXLPipeline``) and
``jdiff.pipelines.StableDiffusion.from_diffusers`` load: the trained UNet (and text encoder, if it was trained)
plus the starting checkpoint's frozen VAE, tokenizer(s), text encoder(s) and scheduler, copied byte for byte.

Example:
  $ python -m train.export --workdir workdir/sd15_photos --out exported/sd15_photos
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="train.export", description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a train.ldm fine-tune workdir")
  parser.add_argument("--out", default=None, help="output folder (default: the run's export.dir or WORKDIR/diffusers)")
  parser.add_argument("--no-ema", dest="ema", action="store_false", default=None,
                      help="export the online weights instead of the EMA")
  args = parser.parse_args(argv)
  from train import ldm
  try:
    out = ldm.export(args.workdir, args.out, ema=args.ema)
  except (ValueError, FileNotFoundError) as e:
    print(f"train.export: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  print(f"[export] wrote {out}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
