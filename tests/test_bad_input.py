"""The bad-input suite: user mistakes give ONE line ``error: ...`` on stderr and exit code 2 from the
training CLIs (no traceback), or a documented recovery, and never leave a corrupted checkpoint.

Most cases go through ``tests/test_fault_tolerance.py``'s tiny training program (the real
``loop.main_wrapper`` / ``loop.train`` / Checkpointer) or ``train.vae``'s argument and data
handling; library-level cases (safetensors, weights of the wrong shape) check the one-line
ValueError of :mod:`jdiff.convert`.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from jdiff import checkpoint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_fault_tolerance as worker  # noqa: E402

ROOT = worker.ROOT
VAE_TINY = os.path.join(ROOT, "configs", "vae_tiny.py")


def _one_line_error(capsys, rc) -> str:
  err = capsys.readouterr().err.strip()
  lines = [ln for ln in err.splitlines() if not ln.startswith(("WARNING:", "warning:"))]
  assert rc == 2, err
  assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
  return lines[0]


def _worker(tmp_path, *overrides, config=None):
  return worker.main(["prog", "--config", config or worker.HERE, "--workdir", str(tmp_path / "w"), *overrides])


def _assert_checkpoints_sound(workdir) -> list[int]:
  """Every checkpoint left in ``workdir`` restores, matches its fingerprint and is finite."""
  ckdir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckdir):
    return []
  steps = checkpoint.Checkpointer(ckdir).all_steps()
  for s in steps:
    _, state, data_state = worker.saved_state(workdir, s)
    leaves = jax.tree.leaves(state)
    assert all(np.isfinite(x).all() for x in leaves if np.issubdtype(x.dtype, np.floating))
    assert checkpoint.fingerprint(state) == data_state["_fingerprint"]
  return steps


def _config_file(tmp_path, body: str) -> str:
  path = tmp_path / "cfg.py"
  path.write_text("import sys\nsys.path.insert(0, %r)\nimport test_fault_tolerance as w\n\n"
                  "def get_config():\n  c = w.get_config()\n%s\n  return c\n"
                  % (os.path.dirname(worker.HERE), body))
  return str(path)


# ----------------------------------------------------------------------------- malformed configs


@pytest.mark.parametrize("argv, needle", [
    (["--config.train.nosuch=1"], "train.nosuch"),                        # unknown override key
    (["--config.train.steps=abc"], "--config.train.steps=abc"),           # wrong type on the command line
    (["--config.train.learning_rate=nan"], "train.learning_rate"),        # NaN learning rate
    (["--config.train.learning_rate=-1.0"], "train.learning_rate"),       # impossible value
    (["--config.train.keep_checkpoints=0"], "train.keep_checkpoints"),
    (["--config.train.lr_schedule=linear"], "train.lr_schedule"),
    (["--config.train.grad_accum=3"], "grad_accum=3"),                    # batch 8 not divisible
    (["--num_processes=2"], "--coordinator"),                             # incomplete multi-host flags
    (["--config", "/no/such/config.py"], "/no/such/config.py"),           # missing config file
])
def test_bad_flags_are_one_line(tmp_path, capsys, argv, needle):
  line = _one_line_error(capsys, _worker(tmp_path, *argv))
  assert needle in line
  assert _assert_checkpoints_sound(tmp_path / "w") == []


@pytest.mark.parametrize("body, needle", [
    ("  c.train.stepz = 3", "'train.stepz'"),                      # unknown key in the file (typo)
    ("  c.train.steps = '10'", "steps"),                           # wrong type in the file
    ("  c.train.steps = None", "train.steps must be an integer"),  # wrong type ml_collections lets through
    ("  c.train.ema_decay = 1.5", "train.ema_decay"),
    ("  del c.train['log_every']", "train.log_every is missing"),
    ("  c.model.width = (", "cfg.py"),                             # a syntax error in the file
    ("  c = undefined_name", "undefined_name"),                   # a broken config file
])
def test_malformed_config_files_are_one_line(tmp_path, capsys, body, needle):
  line = _one_line_error(capsys, _worker(tmp_path, config=_config_file(tmp_path, body)))
  assert needle in line


# ----------------------------------------------------------------------------- weights and checkpoints


def test_checkpoint_of_a_different_model_is_one_line_and_kept(tmp_path, capsys):
  assert _worker(tmp_path, "--config.train.steps=2") == 0
  capsys.readouterr()
  line = _one_line_error(capsys, _worker(tmp_path, "--config.train.steps=4", "--config.model.width=24"))
  assert "checkpoint" in line and "(16, 1)" in line and "(24, 1)" in line
  assert _assert_checkpoints_sound(tmp_path / "w") == [1, 2]  # untouched


def test_every_checkpoint_corrupt_is_one_line(tmp_path, capsys):
  assert _worker(tmp_path, "--config.train.steps=1") == 0
  capsys.readouterr()
  for f in glob.glob(str(tmp_path / "w" / "checkpoints" / "1" / "state" / "**" / "d" / "*"), recursive=True):
    with open(f, "r+b") as fh:
      fh.truncate(3)
  line = _one_line_error(capsys, _worker(tmp_path, "--config.train.steps=2"))
  assert "all 1 checkpoints" in line and "corrupt" in line


def _tiny_vae_folder(tmp_path):
  from jdiff.convert import vae as cv
  from jdiff.models import AutoencoderKL, VAEConfig
  cfg = VAEConfig.preset("digits", block_out_channels=(8, 8), norm_num_groups=4, latent_channels=2,
                         mid_block_add_attention=False, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2)
  vae = AutoencoderKL(cfg)
  params = vae.init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))["params"]
  folder = tmp_path / "vae"
  cv.save_vae(vae, params, folder)
  return folder, cv


def test_corrupt_and_wrong_shape_safetensors_are_one_line(tmp_path):
  folder, cv = _tiny_vae_folder(tmp_path)
  _, params = cv.load_vae(folder)  # sound folder loads
  weights = folder / "diffusion_pytorch_model.safetensors"
  good = weights.read_bytes()
  # Corrupt: garbage header, then a file cut short.
  for damaged in (b"\xff" * 64 + good[64:], good[:len(good) // 2]):
    weights.write_bytes(damaged)
    with pytest.raises(ValueError) as e:
      cv.load_vae(folder)
    assert "\n" not in str(e.value) and str(weights) in str(e.value)
  # Weights of the wrong shape: a config that does not match the tensors.
  weights.write_bytes(good)
  import json
  cfg_path = folder / "config.json"
  cfg = json.loads(cfg_path.read_text())
  cfg["latent_channels"] = 3
  cfg_path.write_text(json.dumps(cfg))
  with pytest.raises(ValueError) as e:
    cv.load_vae(folder)
  assert "\n" not in str(e.value) and "shape" in str(e.value)


# ----------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  from jdiff.data import digits
  return digits.prepare(str(tmp_path_factory.mktemp("tfds")))


def _vae(workdir, *argv):
  from train import vae as vae_train
  return vae_train.main(["prog", "--config", VAE_TINY, "--workdir", str(workdir), *argv])


@pytest.mark.parametrize("damage", ["truncate", pytest.param("replace", marks=pytest.mark.slow)])
def test_corrupt_dataset_files_are_one_line(tmp_path, capsys, digits_dir, damage):
  data_dir = tmp_path / "tfds"
  shutil.copytree(digits_dir, data_dir)
  files = glob.glob(str(data_dir / "**" / "*.array_record*"), recursive=True)
  assert files
  for f in files:
    size = os.path.getsize(f)
    if damage == "truncate":
      with open(f, "r+b") as fh:
        fh.truncate(size // 3)
    else:
      with open(f, "wb") as fh:
        fh.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
  line = _one_line_error(capsys, _vae(tmp_path / "w", f"--config.data.data_dir={data_dir}",
                                      "--config.train.steps=2"))
  assert "dataset" in line
  assert _assert_checkpoints_sound(tmp_path / "w") == []


def test_missing_dataset_is_one_line(tmp_path, capsys, digits_dir):
  line = _one_line_error(capsys, _vae(tmp_path / "w", f"--config.data.data_dir={digits_dir}",
                                      "--config.data.name=no_such_set"))
  assert "no_such_set" in line


def test_image_folder_cases(tmp_path, capsys, digits_dir):
  folder = tmp_path / "imgs"
  folder.mkdir()
  # Only non-image files: one line naming the folder.
  (folder / "notes.txt").write_text("not an image")
  (folder / "captions.csv").write_text("a,b\n")
  common = [f"--config.data.data_dir={digits_dir}", "--config.data.kind=folder", f"--config.data.path={folder}"]
  line = _one_line_error(capsys, _vae(tmp_path / "w1", *common))
  assert str(folder) in line and "no images" in line
  # A non-image file with an image extension: one line naming the file.
  (folder / "fake.png").write_text("this is text, not a PNG")
  for i in range(8):
    Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(folder / f"ok{i}.png")
  line = _one_line_error(capsys, _vae(tmp_path / "w2", *common))
  assert str(folder / "fake.png") in line
  # A missing folder.
  line = _one_line_error(capsys, _vae(tmp_path / "w3", f"--config.data.data_dir={digits_dir}",
                                      "--config.data.kind=folder", f"--config.data.path={tmp_path / 'nope'}"))
  assert "nope" in line


# ----------------------------------------------------------------------------- divergence


@pytest.mark.parametrize("lr", ["1e30", "3e38"])
def test_nan_producing_learning_rate_stops_without_bad_checkpoint(tmp_path, capsys, lr):
  """A finite but absurd learning rate: the step guard skips steps with non-finite loss or
  gradients, training stops after max_bad_steps with one line, and every checkpoint left is
  finite and matches its fingerprint (a state with NaN/inf is never saved)."""
  rc = _worker(tmp_path, f"--config.train.learning_rate={lr}", "--config.train.warmup_steps=0",
               "--config.train.max_bad_steps=2", "--config.train.lr_schedule=constant")
  line = _one_line_error(capsys, rc)
  assert ("non-finite" in line and "lower the learning rate" in line) or "refusing to checkpoint" in line
  _assert_checkpoints_sound(tmp_path / "w")
