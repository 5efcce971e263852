"""train.controlnet: the UNet is frozen through partition labels, only ControlNet leaves are trained /
optimised / checkpointed, the run resumes, control images are OpenCV's Canny edges, and the saved
folder loads with load_controlnet and diffusers' ControlNetModel."""

from __future__ import annotations

import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import controlnet_digits
from jdiff import checkpoint, partition
from jdiff.convert.controlnet import load_controlnet, save_controlnet
from tests.test_train_lora import save_random_base, tree_digest
from train import controlnet as cn_train
from train import lora as lora_train
from train import loop


def tiny_config(base_dir: str, **train):
  config = controlnet_digits.get_config()
  config.base = base_dir
  config.data.batch_size = 4
  config.train.update(dict(steps=2, log_every=1, checkpoint_every=1, sample_every=0, warmup_steps=0,
                           learning_rate=1e-2, batch_size=4, **train))
  config.sample.update(dict(num_steps=2, num_images=2))
  return config


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  return save_random_base(str(tmp_path_factory.mktemp("ldm_base")))


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_edges_are_opencv_canny():
  cv2 = pytest.importorskip("cv2")
  rng = np.random.default_rng(0)
  pix = np.zeros((3, 32, 32, 1), np.uint8)
  for i in range(3):
    pix[i, 6 + i:24, 8:20 + i] = 200
    pix[i] = np.clip(pix[i].astype(int) + rng.integers(0, 40, pix[i].shape), 0, 255)
  images = pix.astype(np.float32) / 127.5 - 1.0
  got = cn_train.edges_of(images, 100, 200)
  assert got.shape == (3, 32, 32, 3)
  for i in range(3):
    want = cv2.Canny(pix[i, :, :, 0], 100, 200) > 0
    np.testing.assert_array_equal(got[i, :, :, 0] > 0, want)
    assert want.sum() > 10


@pytest.mark.slow  # two trainings and a resume: ~1 min; tests/test_controlnet.py checks the split step quickly
def test_trains_only_the_controlnet_and_resumes(base_dir, tmp_path):
  digest = tree_digest(base_dir)
  workdir = str(tmp_path / "cn")
  base = lora_train.load_base(base_dir)
  before = {k: v.copy() for k, v in _flat(base.unet_params).items()}
  config = tiny_config(base_dir, stop_at=1)
  net, labels, init_params, frozen_part = cn_train.build(config, base)
  flat_labels = {k: str(v) for k, v in _flat(labels).items()}
  assert {v for k, v in flat_labels.items() if k.startswith("unet/")} == {"frozen"}
  assert {v for k, v in flat_labels.items() if k.startswith("controlnet/")} == {"trainable"}
  task = cn_train.make_task(config, base, net, init_params, frozen_part)
  data = lora_train.data_config(config, base)

  def loader():
    return cn_train.ControlLoader(lora_train.make_loader(data, base, batch_size=4), low=100, high=200)

  state0 = jax.jit(init_params)(jax.random.key(0))
  out1 = io.StringIO()
  state1 = loop.train(config.train, task, loader(), workdir, stream=out1)
  assert int(state1.step) == 1
  config.train.stop_at = 0
  out2 = io.StringIO()
  state = loop.train(config.train, task, loader(), workdir, stream=out2)
  assert int(state.step) == 2 and "resuming from step 1" in out2.getvalue()

  # The frozen UNet is bit-identical (and nothing under the base folder changed).
  for k, v in _flat(task.frozen["base"]["unet"]).items():
    np.testing.assert_array_equal(v, before[k], err_msg=k)
  assert tree_digest(base_dir) == digest
  # Only {"controlnet": ...} is trained; the optimizer state and the checkpoint hold only its leaves.
  assert set(state.params) == {"controlnet"}
  n_cn = partition.count(state.params)
  assert n_cn == partition.count(jax.eval_shape(init_params, jax.random.key(0)))
  opt_floats = [x for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim]
  assert sum(x.size for x in opt_floats) == 2 * n_cn
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    saved = ckpt.saved_shapes()
  assert set(saved["params"]) == {"controlnet"}
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(saved["params"])) == n_cn
  # The zero convolutions left zero: the ControlNet now changes the UNet's output.
  trained = _flat(state.params)
  start = _flat(state0)
  assert float(np.max(np.abs(trained["controlnet/controlnet_mid_block/kernel"]))) > 0
  assert float(np.max(np.abs(start["controlnet/controlnet_mid_block/kernel"]))) == 0
  losses = [float(line.split(" loss ")[1].split()[0]) for line in (out1.getvalue() + out2.getvalue()).splitlines()
            if " loss " in line]
  assert len(losses) == 2 and np.all(np.isfinite(losses)), losses

  # The diffusers folder round-trips, and diffusers reads it.
  folder = tmp_path / "controlnet"
  save_controlnet(net, jax.device_get(state.ema_params["controlnet"]), folder)
  net2, params2 = load_controlnet(folder)
  assert net2.config.to_diffusers_config() == net.config.to_diffusers_config()
  got = _flat(params2)
  for k, v in _flat(state.ema_params["controlnet"]).items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  diffusers = pytest.importorskip("diffusers")
  torch_net = diffusers.ControlNetModel.from_pretrained(folder)
  assert sum(p.numel() for p in torch_net.parameters()) == n_cn
  w = torch_net.controlnet_mid_block.weight.detach().numpy()  # [out, in, 1, 1]
  np.testing.assert_array_equal(w[:, :, 0, 0].T, np.asarray(state.ema_params["controlnet"]["controlnet_mid_block"]["kernel"])[0, 0])


def test_user_mistakes_are_one_line(base_dir, tmp_path, capsys):
  def run(*args):
    rc = cn_train.main(["train.controlnet", *args, f"--workdir={tmp_path / 'w'}", "--config.train.steps=1"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return rc, err

  rc, err = run("--base", str(tmp_path / "missing"))
  assert rc == 2 and len(err) == 1 and "missing" in err[0] and err[0].startswith("error:")
  rc, err = run("--base", base_dir, "--config.controlnet.conditioning_embedding_out_channels=(16,32,64)")
  assert rc == 2 and len(err) == 1 and "conditioning_embedding_out_channels" in err[0]
  rc, err = run("--base", base_dir, "--config.controlnet.empty_prompt_rate=1.5")
  assert rc == 2 and len(err) == 1 and "empty_prompt_rate" in err[0]
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


@pytest.mark.slow
def test_cli_writes_a_diffusers_controlnet(base_dir, tmp_path, capsys):
  workdir = tmp_path / "run"
  rc = cn_train.main(["train.controlnet", "--base", base_dir, f"--workdir={workdir}", "--config.data.batch_size=4",
                      "--config.train.steps=1", "--config.train.log_every=1", "--config.train.sample_every=1",
                      "--config.sample.num_steps=2", "--config.sample.num_images=2"])
  out = capsys.readouterr().out
  assert rc == 0, out
  assert "trainable params: " in out
  folder = cn_train.controlnet_path(str(workdir))
  net, params = load_controlnet(folder)
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    from train import vae as vae_train
    ema = vae_train.restore_ema(ckpt)
  got = _flat(params)
  for k, v in _flat(ema["controlnet"]).items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  assert os.path.exists(workdir / "samples" / "controlnet_000001.png")
