"""Test-wide settings: strict rank promotion (implicit broadcasting across ranks is a bug here),
CPU only, and a fixed float32 matmul precision so parity tolerances mean the same everywhere."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def key():
  return jax.random.key(0)


def pytest_configure(config):
  """``JDIFF_TORCH_THREADS=N`` runs the PyTorch references on N intra-op threads (the suite must pass on
  any count: a reference whose reductions are split across threads rounds differently)."""
  threads = os.environ.get("JDIFF_TORCH_THREADS")
  if threads:
    try:
      import torch
    except ImportError:
      return
    torch.set_num_threads(int(threads))
