"""train.lora: the base stays bit-identical, only the factors are trained / optimised / checkpointed,
the run resumes, and the saved diffusers/PEFT file reloads to the trained weights.

The base is a tiny random train.ldm workdir written the way train.ldm writes one (config.json, the
VAE's vae.json + checkpoint, the UNet checkpoint), without training it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lora_digits, ldm_tiny
from jdiff import checkpoint, ldm, lora
from jdiff.models import AutoencoderKL
from train import ldm as ldm_train
from train import loop
from train import lora as lora_train
from train import vae as vae_train


def save_random_base(workdir: str, seed: int = 0) -> str:
  """A train.ldm workdir holding random tiny networks (ldm_tiny), as train.ldm would save them."""
  config = ldm_tiny.get_config()
  vcfg = vae_train.vae_config(config.vae, scaling_factor=0.9)
  vae = AutoencoderKL(vcfg)
  vae_params = jax.jit(lambda k: vae.init(k, jnp.zeros((1, 32, 32, 1)))["params"])(jax.random.key(seed))
  vdir = os.path.join(workdir, "vae")
  os.makedirs(vdir, exist_ok=True)
  with open(os.path.join(vdir, "vae.json"), "w") as fh:
    json.dump({"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(vcfg).items()},
               "step": 1}, fh)
  with checkpoint.Checkpointer(os.path.join(vdir, "checkpoints")) as ckpt:
    ckpt.save(1, {"ema_params": vae_params}, force=True)
  bundle = ldm_train.build(config, vae, vae_params)
  params = jax.jit(ldm_train.init_params(config, bundle))(jax.random.key(seed + 1))  # UNet (+ text when trained)
  loop.write_config(config, workdir)
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    ckpt.save(1, {"ema_params": params}, force=True)
  return workdir


def tree_digest(folder: str) -> str:
  """sha256 over every file (name and bytes) under ``folder``."""
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(folder)):
    dirs.sort()
    for f in sorted(files):
      p = os.path.join(root, f)
      h.update(os.path.relpath(p, folder).encode())
      with open(p, "rb") as fh:
        h.update(fh.read())
  return h.hexdigest()


def tiny_config(base_dir: str, **train):
  config = lora_digits.get_config()
  config.base = base_dir
  config.lora.update(dict(rank=2, alpha=4.0))
  config.data.batch_size = 4
  config.train.update(dict(steps=2, log_every=1, checkpoint_every=1, sample_every=0, warmup_steps=0,
                           learning_rate=1e-2, batch_size=4, **train))
  config.sample.update(dict(num_steps=2, per_prompt=1))
  return config


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  return save_random_base(str(tmp_path_factory.mktemp("ldm_base")))


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow  # two trainings and a resume: ~35 s of CPU
def test_trains_only_the_factors_and_resumes(base_dir, tmp_path):
  """Two steps through loop.train (stopped after one as if killed, then resumed): the frozen base is
  bit-identical, params / EMA / optimizer state / checkpoint hold only the factors, the factors moved,
  and the adapter file written at the end merges to the trained weights."""
  digest = tree_digest(base_dir)
  workdir = str(tmp_path / "lora")
  base = lora_train.load_base(base_dir)
  before = {k: v.copy() for k, v in _flat(base.unet_params).items()}
  config = tiny_config(base_dir, stop_at=1)
  scales, init_params = lora_train.build(config, base)
  task = lora_train.make_task(config, base, scales, init_params)
  data = lora_train.data_config(config, base)
  out1 = io.StringIO()
  state1 = loop.train(config.train, task, lora_train.make_loader(data, base, batch_size=4), workdir, stream=out1)
  assert int(state1.step) == 1
  config.train.stop_at = 0
  out2 = io.StringIO()
  state = loop.train(config.train, task, lora_train.make_loader(data, base, batch_size=4), workdir, stream=out2)
  assert int(state.step) == 2 and "resuming from step 1" in out2.getvalue()

  # The frozen base: the very arrays the step received are unchanged, and nothing on disk changed.
  for k, v in _flat(task.frozen["unet"]).items():
    np.testing.assert_array_equal(v, before[k], err_msg=k)
  assert tree_digest(base_dir) == digest

  # Trained tree = factors of the targeted kernels only; the optimizer state holds nothing else.
  n_base = lora.num_params(base.unet_params)
  flat = _flat(state.params)
  assert flat and all(k.endswith(("/down", "/up")) for k in flat)
  targets = lora.target_paths(base.unet_params, ldm.lora_targets(config.lora.targets))
  assert sorted({k.rsplit("/", 1)[0] for k in flat}) == targets
  n_factors = lora.num_params(state.params)
  assert 0 < n_factors < n_base // 10
  opt_floats = [x for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim]
  assert sum(x.size for x in opt_floats) == 2 * n_factors  # Adam's mu and nu over the factors
  assert lora.num_params(state.ema_params) == n_factors
  ups = [v for k, v in flat.items() if k.endswith("/up")]
  assert max(float(np.max(np.abs(u))) for u in ups) > 0  # B left zero: the factors were trained
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    saved = ckpt.saved_shapes()
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(saved["params"])) == n_factors
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(saved["opt_state"])) <= 2 * n_factors + 16

  # The adapter in diffusers/PEFT keys loads back to the same merged UNet.
  file = str(tmp_path / "adapter.safetensors")
  adapter = lora_train.tree_to_lora(jax.device_get(state.ema_params), scales)
  lora.save_diffusers(file, {"unet": adapter})
  loaded = lora.load(file, {"unet": base.unet_params})["unet"]
  want = _flat(lora.merge(base.unet_params, adapter))
  got = _flat(lora.merge(base.unet_params, loaded))
  for k in targets:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
    # independent float64 reference of the merged kernel: W + (alpha/r) A B
    a = np.asarray(flat[k + "/down"], np.float64)
    b = np.asarray(flat[k + "/up"], np.float64)
    ref = before[k].astype(np.float64) + (4.0 / 2.0) * np.einsum("...r,ro->...o", a, b)
    np.testing.assert_allclose(got[k], ref, rtol=1e-5, atol=1e-6, err_msg=k)
  losses = [float(line.split(" loss ")[1].split()[0]) for line in (out1.getvalue() + out2.getvalue()).splitlines()
            if " loss " in line]
  assert len(losses) == 2 and np.all(np.isfinite(losses)), losses


def test_parameter_report():
  base = {"k": np.zeros((10, 9))}
  factors = {"k": {"down": np.zeros((10, 1)), "up": np.zeros((1, 9))}}
  assert lora_train.parameter_report(factors, base) == \
      "trainable params: 19 || all params: 109 || trainable%: 17.4312"


def test_user_mistakes_are_one_line(base_dir, tmp_path, capsys):
  def run(*args):
    rc = lora_train.main(["train.lora", *args, f"--workdir={tmp_path / 'w'}", "--config.train.steps=1"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return rc, err

  rc, err = run("--base", str(tmp_path / "missing"))
  assert rc == 2 and len(err) == 1 and "missing" in err[0] and err[0].startswith("error:")
  empty = tmp_path / "empty"
  empty.mkdir()
  rc, err = run("--base", str(empty))
  assert rc == 2 and len(err) == 1 and "neither a train.ldm workdir" in err[0]
  rc, err = run("--base", base_dir, "--data", str(tmp_path / "no_such_folder"))
  assert rc == 2 and len(err) == 1 and "no_such_folder" in err[0]
  rc, err = run("--base", base_dir, "--config.lora.targets=nothing_matches")
  assert rc == 2 and len(err) == 1 and "lora.targets" in err[0]
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


@pytest.mark.slow
def test_cli_on_an_image_folder_and_pipeline_loads_the_adapter(base_dir, tmp_path, capsys):
  """``python -m train.lora --base DIR --data FOLDER``: the report line, the adapter file, and
  StableDiffusion.generate(lora=FILE) equal to generating with the merged trained factors."""
  from PIL import Image
  folder = tmp_path / "images"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(6):
    Image.fromarray(rng.integers(0, 255, (40, 40), np.uint8)).save(folder / f"{i}.png")
    (folder / f"{i}.txt").write_text(f"a noisy square {i}")
  workdir = tmp_path / "run"
  rc = lora_train.main(["train.lora", "--base", base_dir, "--data", str(folder), f"--workdir={workdir}",
                        "--config.lora.rank=2", "--config.data.batch_size=4", "--config.train.steps=2",
                        "--config.train.log_every=1", "--config.train.sample_every=2",
                        "--config.sample.num_steps=2", "--config.sample.per_prompt=1"])
  out = capsys.readouterr().out
  assert rc == 0, out
  assert "trainable params: " in out and "|| all params: " in out and "trainable%: " in out
  file = lora_train.adapter_path(str(workdir))
  assert os.path.exists(file) and os.path.exists(workdir / "samples" / "lora_000002.png")
  saved = loop.read_config(str(workdir))
  assert saved.data.kind == "folder" and saved.data.image_size == 32 and saved.data.channels == 1
  base = lora_train.load_base(base_dir)
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    trained = vae_train.restore_ema(ckpt)
  scales, _ = lora_train.build(saved, base)
  adapter = lora_train.tree_to_lora(trained, scales)
  key = jax.random.key(3)
  kw = dict(key=key, num_steps=2, guidance_scale=2.0, height=32, width=32)
  from_file = base.generate(["a noisy square 1"], lora=file, **kw)
  from_tree = base.generate(["a noisy square 1"], lora=adapter, **kw)
  plain = base.generate(["a noisy square 1"], **kw)
  np.testing.assert_allclose(np.asarray(from_file), np.asarray(from_tree), atol=1e-5)
  assert float(jnp.max(jnp.abs(from_tree - plain))) > 1e-5
