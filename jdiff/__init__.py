"""jdiff: diffusion models as pure functions over arrays and pytrees, in JAX/Flax.

Submodules: ``consistency``, ``schedules``, ``diffusion``, ``flow`` (rectified flow), ``guidance``, ``samplers``,
``models``, ``lora``, ``partition``, ``tokenizers``; ``convert``, ``pipelines`` (the latent diffusion bundle),
``sdxl``, ``sd3_pipeline``, ``dit_pipeline``, ``ldm`` (bundles of training workdirs), ``textual_inversion``,
``evaluation``, ``training``, ``checkpoint``, ``parallel`` and ``data`` are imported on first use
(``import jdiff.pipelines``), as are the pipeline classes: ``jdiff.StableDiffusion``,
``jdiff.StableDiffusionXL``, ``jdiff.StableDiffusion3``, ``jdiff.DiTPipeline``.
"""

from jdiff import consistency, diffusion, flow, guidance, lora, models, partition, samplers, schedules, tokenizers
from jdiff.diffusion import q_posterior, q_sample
from jdiff.guidance import cfg
from jdiff.samplers import sample
from jdiff.schedules import Schedule

__version__ = "0.1.0"

_LAZY = ("checkpoint", "control_images", "convert", "data", "dit_pipeline", "evaluation", "ldm", "parallel",
         "pipelines", "sd3_pipeline", "sdxl", "training", "textual_inversion")
# public pipeline classes -> the lazily imported module that defines them
_PIPELINES = {"StableDiffusion": "pipelines", "StableDiffusionXL": "sdxl", "StableDiffusion3": "sd3_pipeline",
              "DiTPipeline": "dit_pipeline"}


def __getattr__(name):
  # Heavier submodules (Orbax, TFDS, the pipelines) load on first use: ``jdiff.training``.
  import importlib
  if name in _LAZY:
    return importlib.import_module(f"jdiff.{name}")
  if name in _PIPELINES:
    return getattr(importlib.import_module(f"jdiff.{_PIPELINES[name]}"), name)
  raise AttributeError(f"module 'jdiff' has no attribute {name!r}")

__all__ = ["consistency", "diffusion", "flow", "guidance", "lora", "models", "partition", "samplers", "schedules",
           "tokenizers", "Schedule", "cfg", "q_sample", "q_posterior", "sample", *_PIPELINES]
