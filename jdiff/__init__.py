"""jdiff: diffusion models as pure functions over arrays and pytrees, in JAX/Flax.

Submodules: ``consistency``, ``schedules``, ``diffusion``, ``flow`` (rectified flow), ``guidance``, ``samplers``,
``models``, ``lora``, ``partition``, ``tokenizers``; ``convert``, ``pipelines`` (the latent diffusion bundle),
``ldm`` (bundles of training workdirs), ``textual_inversion``, ``evaluation``, ``training``, ``checkpoint``,
``parallel`` and ``data`` are imported on first use (``import jdiff.pipelines``).
"""

from jdiff import consistency, diffusion, flow, guidance, lora, models, partition, samplers, schedules, tokenizers
from jdiff.diffusion import q_posterior, q_sample
from jdiff.guidance import cfg
from jdiff.samplers import sample
from jdiff.schedules import Schedule

__version__ = "0.1.0"

_LAZY = ("checkpoint", "control_images", "convert", "data", "evaluation", "ldm", "parallel", "pipelines",
         "training", "textual_inversion")


def __getattr__(name):
  # Heavier submodules (Orbax, TFDS, the pipelines) load on first use: ``jdiff.training``.
  if name in _LAZY:
    import importlib
    return importlib.import_module(f"jdiff.{name}")
  raise AttributeError(f"module 'jdiff' has no attribute {name!r}")

__all__ = ["consistency", "diffusion", "flow", "guidance", "lora", "models", "partition", "samplers", "schedules",
           "tokenizers", "Schedule", "cfg", "q_sample", "q_posterior", "sample"]
