"""jdiff: diffusion models as pure functions over arrays and pytrees, in JAX/Flax."""

from jdiff import diffusion, guidance, samplers, schedules
from jdiff.diffusion import q_posterior, q_sample
from jdiff.guidance import cfg
from jdiff.samplers import sample
from jdiff.schedules import Schedule

__version__ = "0.1.0"

__all__ = ["diffusion", "guidance", "samplers", "schedules", "Schedule", "cfg", "q_sample",
           "q_posterior", "sample"]
