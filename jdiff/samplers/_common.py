"""Alias of :mod:`jdiff.samplers.base` (the former private name, kept for existing callers)."""

from jdiff.samplers.base import *  # noqa: F401,F403
from jdiff.samplers.base import __all__  # noqa: F401
