import os
import subprocess
import sys

PROG = """
import jax, jax.numpy as jnp
from jdiff import parallel
print(parallel.enable_compilation_cache())
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # cache even this quick compile
jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T)(jnp.ones((64, 64))).block_until_ready()
"""


def test_cli_compilation_cache_is_written_and_can_be_disabled(tmp_path):
  env = dict(os.environ, JDIFF_COMPILATION_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.getcwd() + os.pathsep + env.get("PYTHONPATH", "")
  out = subprocess.run([sys.executable, "-c", PROG], env=env, capture_output=True, text=True, check=True)
  assert out.stdout.strip() == str(tmp_path / "cache")
  assert any((tmp_path / "cache").iterdir())
  env["JDIFF_COMPILATION_CACHE"] = "0"
  out = subprocess.run([sys.executable, "-c", PROG], env=env, capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "None"
