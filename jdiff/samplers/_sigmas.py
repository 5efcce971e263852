"""Alias of :mod:`jdiff.samplers.levels` (the former private name, kept for existing callers)."""

from jdiff.samplers.levels import *  # noqa: F401,F403
from jdiff.samplers.levels import __all__  # noqa: F401
