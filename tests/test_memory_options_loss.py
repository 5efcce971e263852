"""The memory options train the digits model as float32 does: a short ``train.ldm`` digits run with bfloat16
Adam moments, no EMA, chunked attention and bfloat16 compute ends at a mean loss (last 100 steps) within two
standard deviations of three float32 runs with different seeds."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest

from configs import ldm_digits
from train import ldm as ldm_train
from train import vae as vae_train

STEPS = 300
LAST = 100
LINE = re.compile(r"^\[ldm\] step (\d+)/\d+ loss ([0-9.]+)")


@pytest.fixture(scope="module")
def vae_workdir(tmp_path_factory):
  """The digits VAE after 100 steps (latents with the digits' structure; the runs below share it)."""
  config = ldm_digits.get_config()
  vcfg = ldm_train._vae_config_for(config)
  vcfg.train.steps = 100
  vcfg.train.sample_every = 0
  workdir = str(tmp_path_factory.mktemp("vae"))
  vae_train.train_vae(vcfg, workdir, train_cfg=vcfg.train, stream=io.StringIO())
  return workdir


def _run(vae_workdir: str, workdir: str, seed: int, **train_options) -> np.ndarray:
  """Per-step losses of a STEPS-step digits run (log_every = 1)."""
  config = ldm_digits.get_config()
  config.seed = seed
  config.vae.pretrained = vae_workdir
  config.train.update(dict(steps=STEPS, log_every=1, sample_every=0, checkpoint_every=STEPS))
  compute = train_options.pop("compute_dtype", None)
  if compute:
    config.unet.dtype = compute
  for k, v in train_options.items():
    config.train[k] = v
  out = io.StringIO()
  ldm_train.train_ldm(config, workdir, stream=out)
  losses = {int(m.group(1)): float(m.group(2)) for m in map(LINE.match, out.getvalue().splitlines()) if m}
  assert sorted(losses) == list(range(1, STEPS + 1)), "one progress line per step expected"
  return np.array([losses[k] for k in range(1, STEPS + 1)])


@pytest.mark.slow  # four 300-step digits runs: ~8 min of CPU
def test_memory_options_loss_within_two_std_of_float32_seeds(vae_workdir, tmp_path):
  ref = np.array([_run(vae_workdir, str(tmp_path / f"f32_{s}"), s)[-LAST:].mean() for s in range(3)])
  opt = _run(vae_workdir, str(tmp_path / "opt"), 0, mu_dtype="bfloat16", nu_dtype="bfloat16", ema=False,
             attention="chunked", compute_dtype="bfloat16")
  assert np.all(np.isfinite(opt))
  mean, std = ref.mean(), ref.std(ddof=1)
  got = opt[-LAST:].mean()
  assert abs(got - mean) <= 2.0 * std, (got, ref)
