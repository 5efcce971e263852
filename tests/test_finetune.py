"""Fine-tuning a Stable Diffusion checkpoint with ``python -m train.ldm --config configs/sd_finetune.py``.

A tiny random diffusers pipeline saved with ``save_pretrained`` stands in for SD: the objective equals
diffusers' fine-tuning recipe on the same tensors, a short CLI run exports a folder that diffusers loads
(the UNet computing what jdiff computes, the frozen parts byte-identical), and a SIGKILLed run resumes
bit-identically.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jdiff import ldm  # noqa: E402
from jdiff.pipelines import StableDiffusion  # noqa: E402
from tests.parity.test_pipeline import SIZE, build_tiny_sd_pipeline  # noqa: E402
from train import ldm as train_ldm  # noqa: E402
from train import loop  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "sd_finetune.py")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tiny_sd_finetune")
  build_tiny_sd_pipeline(folder)
  return folder


@pytest.fixture(scope="module")
def sd_v_folder(sd_folder, tmp_path_factory):
  """The same pipeline with a v-prediction scheduler (SD 2.x-v)."""
  folder = tmp_path_factory.mktemp("tiny_sd_v") / "pipe"
  shutil.copytree(sd_folder, folder)
  path = folder / "scheduler" / "scheduler_config.json"
  config = json.loads(path.read_text())
  config["prediction_type"] = "v_prediction"
  path.write_text(json.dumps(config))
  return folder


PHOTO_SIZES = [(40, 36), (32, 32), (48, 64), (36, 40), (33, 50), (64, 40)]  # (h, w) of the folder's images


def write_captioned_images(folder):
  """Six random RGB images of the sizes :data:`PHOTO_SIZES` in ``folder``, captions in diffusers'
  metadata.jsonl; returns ``folder``."""
  rng = np.random.default_rng(0)
  rows = []
  for i, (h, w) in enumerate(PHOTO_SIZES):
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    rows.append({"file_name": f"img{i}.png", "text": f"a photo of object number {i}"})
  (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """Six captioned images of several sizes (:func:`write_captioned_images`)."""
  return write_captioned_images(tmp_path_factory.mktemp("photos"))


def _config(pretrained, **diffusion):
  config = loop.load_config(CONFIG)
  config.pretrained = str(pretrained)
  config.data.image_size = SIZE
  config.unet.dtype = "float32"
  config.unet.remat = ""
  config.diffusion.update({"cond_drop": 0.0, **diffusion})
  return config


def _diffusers_loss(folder, images, ids, eps_z, t, noise, *, weighting, gamma):
  """diffusers' text-to-image fine-tuning objective on given tensors (NHWC in, NCHW inside)."""
  from diffusers.training_utils import compute_snr

  pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                           requires_safety_checker=False)
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(a), -1, 1)))  # noqa: E731
  sched = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
  with torch.no_grad():
    dist = pipe.vae.encode(nchw(images)).latent_dist
    latents = (dist.mean + dist.std * nchw(eps_z)) * pipe.vae.config.scaling_factor
    hidden = pipe.text_encoder(torch.from_numpy(np.asarray(ids)))[0]
    tt = torch.from_numpy(np.asarray(t)).long()
    noise_t = nchw(noise)
    noisy = sched.add_noise(latents, noise_t, tt)
    if sched.config.prediction_type == "epsilon":
      target = noise_t
    else:
      target = sched.get_velocity(latents, noise_t, tt)
    pred = pipe.unet(noisy, tt, hidden).sample
    if weighting is None:
      return float(torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean"))
    snr = compute_snr(sched, tt)
    weights = torch.stack([snr, gamma * torch.ones_like(tt)], dim=1).min(dim=1)[0]
    weights = weights / snr if sched.config.prediction_type == "epsilon" else weights / (snr + 1)
    per = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
    return float((per * weights).mean())


@pytest.mark.parametrize("pred", ["epsilon", "v"])
@pytest.mark.parametrize("weighting", [None, "min_snr"])
def test_objective_equals_diffusers_recipe(sd_folder, sd_v_folder, pred, weighting):
  folder = sd_folder if pred == "epsilon" else sd_v_folder
  config = _config(folder, weighting=weighting or "", min_snr_gamma=5.0)
  bundle = ldm.finetune_bundle(config)
  assert bundle.prediction == pred
  images = np.random.default_rng(1).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
  ids = bundle.tokenize(["a photo of a cat", "a dog"])
  batch = {"image": jnp.asarray(images), "tokens": jnp.asarray(ids)}
  frozen = {"vae": bundle.vae_params, "text": bundle.text_params, "null_tokens": bundle.null_ids()}
  key = jax.random.key(5)
  loss, _ = train_ldm.make_loss(config, bundle)(bundle.unet_params, batch, key, frozen)
  # The draws of the step's documented key split: (posterior, dropout, loss); the loss splits (t, noise).
  k_z, _, k_loss = jax.random.split(key, 3)
  h = SIZE // bundle.vae_factor
  eps_z = jax.random.normal(k_z, (2, h, h, 4), jnp.float32)
  k_t, k_n = jax.random.split(k_loss)
  t = jax.random.randint(k_t, (2,), 0, 1000, dtype=jnp.int32)
  noise = jax.random.normal(k_n, (2, h, h, 4), jnp.float32)
  want = _diffusers_loss(folder, images, ids, eps_z, t, noise, weighting=weighting, gamma=5.0)
  assert abs(float(loss) - want) <= 1e-5 * abs(want), (float(loss), want)


def test_bad_pretrained_folders_are_one_line(tmp_path, sd_folder):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ldm.finetune_bundle(_config(tmp_path / "nope"))
  broken = tmp_path / "no_vae"
  shutil.copytree(sd_folder, broken)
  shutil.rmtree(broken / "vae")
  with pytest.raises(FileNotFoundError, match="vae"):
    ldm.finetune_bundle(_config(broken))
  config = _config(sd_folder)
  config.data.image_size = SIZE + 1
  with pytest.raises(ValueError, match="multiple of the VAE factor 2"):
    ldm.finetune_bundle(config)
  # an inpainting UNet (2C + 1 input channels) and a UNet that fits neither
  for channels, needle in [(9, "inpainting"), (5, "takes 5 input channels")]:
    odd = tmp_path / f"unet_{channels}"
    shutil.copytree(sd_folder, odd)
    unet = diffusers.UNet2DConditionModel.from_pretrained(odd / "unet")
    cfg = dict(unet.config)
    cfg["in_channels"] = channels
    diffusers.UNet2DConditionModel.from_config(cfg).save_pretrained(odd / "unet")
    with pytest.raises(ValueError, match=needle):
      ldm.finetune_bundle(_config(odd))


def _cli(workdir, sd_folder, image_folder, *extra):
  return [f"--config={CONFIG}", f"--config.pretrained={sd_folder}", f"--config.data.path={image_folder}",
          f"--config.data.image_size={SIZE}", "--config.unet.dtype=float32", "--config.unet.remat=",
          "--config.data.batch_size=2", "--config.train.steps=4", "--config.train.checkpoint_every=1",
          "--config.train.sample_every=0", "--config.train.log_every=1", "--config.train.warmup_steps=0",
          "--config.train.learning_rate=1e-3", "--config.data.flip=True", "--config.data.crop=random",
          f"--workdir={workdir}", *extra]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, sd_folder, image_folder):
  """An uninterrupted 4-step CLI fine-tune with its exported folder."""
  workdir = tmp_path_factory.mktemp("ft") / "run"
  rc = train_ldm.main(["train.ldm", *_cli(workdir, sd_folder, image_folder)])
  assert rc == 0
  return workdir


def test_cli_fine_tune_exports_a_folder_diffusers_runs(finetuned, sd_folder, tmp_path):
  out = finetuned / "diffusers"
  for part in ("vae", "text_encoder", "tokenizer", "scheduler"):  # frozen: copied byte for byte
    cmp = filecmp.dircmp(sd_folder / part, out / part)
    assert not cmp.left_only and not cmp.right_only and not cmp.diff_files, part
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
  ours = StableDiffusion.from_diffusers(out)
  # the exported UNet is the run's EMA, which training moved away from the checkpoint
  ema = StableDiffusion.from_workdir(finetuned)
  start = StableDiffusion.from_diffusers(sd_folder)
  for a, b in zip(jax.tree.leaves(ours.unet_params), jax.tree.leaves(ema.unet_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(ours.unet_params),
                                                              jax.tree.leaves(start.unet_params)))
  assert moved > 1e-4
  # diffusers' UNet from the export computes what jdiff's does
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, SIZE // 2, SIZE // 2, 4)).astype(np.float32)
  ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
  t = np.array([10, 700])
  mine = np.asarray(ours.unet.apply({"params": ours.unet_params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)))
  with torch.no_grad():
    theirs = pipe.unet(torch.from_numpy(np.moveaxis(x, -1, 1).copy()), torch.from_numpy(t),
                       torch.from_numpy(ctx)).sample.numpy()
  theirs = np.moveaxis(theirs, 1, -1)
  assert np.max(np.abs(mine - theirs)) <= 1e-5 * np.max(np.abs(theirs))
  # and the whole pipeline runs
  pipe.set_progress_bar_config(disable=True)
  img = pipe("a photo of object number 1", num_inference_steps=2, height=SIZE, width=SIZE, output_type="np").images
  assert img.shape == (1, SIZE, SIZE, 3) and np.isfinite(img).all()


def test_export_cli_online_weights(finetuned, tmp_path, capsys):
  from train import export
  assert export.main(["--workdir", str(finetuned), "--out", str(tmp_path / "online"), "--no-ema"]) == 0
  online = StableDiffusion.from_diffusers(tmp_path / "online")
  from tests.test_fault_tolerance import saved_state
  _, state, _ = saved_state(finetuned)
  for a, b in zip(jax.tree.leaves(online.unet_params), jax.tree.leaves(state["params"])):
    np.testing.assert_array_equal(np.asarray(a), b)
  assert export.main(["--workdir", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
  assert "config.json" in capsys.readouterr().err


@pytest.mark.slow  # three fresh processes compiling the tiny SD step: ~2 min on 2 busy cores
def test_sigkilled_fine_tune_resumes_bit_identically(finetuned, sd_folder, image_folder, tmp_path):
  from tests.test_fault_tolerance import _read_until_step, assert_states_equal, saved_state, worker_env
  workdir = tmp_path / "killed"
  cmd = [sys.executable, "-m", "train.ldm", *_cli(workdir, sd_folder, image_folder)]
  proc = subprocess.Popen(cmd, env=worker_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True)
  try:
    _read_until_step(proc, 3)
    time.sleep(1.0)  # the asynchronous save of step 2 completes (a later one may be half-written)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  res = subprocess.run(cmd, env=worker_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "resuming from step" in res.stdout
  step, state, data_state = saved_state(workdir)
  ref_step, ref_state, ref_data = saved_state(finetuned)
  assert step == ref_step == 4 and data_state == ref_data
  assert_states_equal(state, ref_state)


@pytest.mark.slow  # trains the SD-layout digits config end to end: ~1.5 min of CPU
def test_sd_layout_digits_run_exports_for_diffusers(tmp_path, capsys):
  """A from-scratch run in Stable Diffusion's layout (BPE tokenizer learned from the captions, cross-attention
  only) exports a folder diffusers runs; jdiff generates the same images from the workdir and from the export;
  the byte-tokenizer default refuses to export in one line."""
  from train import export

  data_dir = tmp_path / "tfds"
  workdir = tmp_path / "sd_layout"
  tiny = os.path.join(ROOT, "configs", "ldm_tiny.py")
  rc = train_ldm.main(["prog", "--config", tiny, "--workdir", str(workdir), f"--config.data.data_dir={data_dir}",
                       "--config.text.tokenizer=bpe", "--config.text.max_length=16"])
  assert rc == 0, capsys.readouterr().err
  assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "out")]) == 0
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "out", safety_checker=None,
                                                           requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  run = StableDiffusion.from_workdir(workdir)
  exported = StableDiffusion.from_diffusers(tmp_path / "out")
  prompts = ["a handwritten digit 3", "a handwritten digit seven"]
  ids = run.tokenize(prompts)
  np.testing.assert_array_equal(ids, pipe.tokenizer(prompts, padding="max_length", max_length=16,
                                                    return_tensors="np")["input_ids"])
  with torch.no_grad():
    hidden = pipe.text_encoder(torch.from_numpy(np.asarray(ids)))[0].numpy()
  mine = np.asarray(run.encode_text(run.text_params, jnp.asarray(ids)))
  assert np.max(np.abs(mine - hidden)) <= 1e-5 * np.max(np.abs(hidden))
  key = jax.random.key(2)
  a = run.generate(prompts, key=key, num_steps=3, guidance_scale=3.0, sampler="ddim")
  b = exported.generate(prompts, key=key, num_steps=3, guidance_scale=3.0, sampler="ddim")
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  img = pipe(prompts[0], num_inference_steps=2, height=32, width=32, output_type="np").images
  assert img.shape == (1, 32, 32, 1) or img.shape == (1, 32, 32, 3)
  # the byte-tokenizer default has no diffusers layout: one line
  from configs import ldm_tiny
  from jdiff.models import AutoencoderKL, VAEConfig

  vae = AutoencoderKL(VAEConfig.tiny(in_channels=1, out_channels=1))
  vae_params = vae.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))["params"]
  byte_bundle = ldm.from_config(ldm_tiny.get_config(), vae, vae_params)
  with pytest.raises(ValueError, match="byte-tokenizer model has no diffusers layout") as e:
    byte_bundle.save_pretrained(tmp_path / "nope")
  assert "\n" not in str(e.value)


def test_precomputed_encoders_give_the_live_loss(sd_folder, tmp_path):
  """``data.precompute``: the step on stored latent moments and text embeddings computes the loss of the
  step that runs the frozen encoders (same key: same posterior draw, dropout, t and noise)."""
  from jdiff import data

  folder = tmp_path / "square"
  folder.mkdir()
  rng = np.random.default_rng(4)
  captions = ["a red square", "a blue thing", "a photo of a cat"]
  for i, text in enumerate(captions):
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / f"{i}.png")
  (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": t}) + "\n"
                                                 for i, t in enumerate(captions)))
  config = _config(sd_folder, cond_drop=0.5)
  config.data.path = str(folder)
  config.data.precompute = str(tmp_path / "pre")
  bundle = ldm.finetune_bundle(config)
  loader = train_ldm.precomputed_loader(config, bundle, batch_size=3)
  source = data.PrecomputedSource(tmp_path / "pre")
  records = [source[i] for i in range(3)]
  pre = {k: jnp.asarray(np.stack([r[k] for r in records])) for k in ("latent_mean", "latent_logvar", "text")}
  live_source = data.make_source(kind="folder", path=str(folder), caption_key="text", channels=3)
  examples = [live_source[i] for i in range(3)]
  images = np.stack([np.asarray(e["image"], np.float32) / 127.5 - 1.0 for e in examples])
  tokens = bundle.tokenize([e["caption"] for e in examples])
  frozen = {"vae": bundle.vae_params, "text": bundle.text_params, "null_tokens": bundle.null_ids(),
            "null_text": bundle.encode_text(bundle.text_params, bundle.null_ids())}
  loss_fn = jax.jit(train_ldm.make_loss(config, bundle))
  for seed in range(3):
    key = jax.random.key(seed)
    live, _ = loss_fn(bundle.unet_params, {"image": jnp.asarray(images), "tokens": jnp.asarray(tokens)}, key, frozen)
    stored, _ = loss_fn(bundle.unet_params, pre, key, frozen)
    assert abs(float(stored) - float(live)) <= 1e-5 * abs(float(live))
  assert next(loader)["latent_mean"].shape == (3, SIZE // 2, SIZE // 2, 4)
  config.text.trainable = True
  with pytest.raises(ValueError, match="text encoder trains"):
    train_ldm.precomputed_loader(config, bundle)


@pytest.mark.slow  # one more compilation of the tiny SD step (~1 min on 2 busy cores)
def test_cli_fine_tune_on_precomputed_data(sd_folder, image_folder, tmp_path, capsys):
  workdir = tmp_path / "pre_run"
  argv = _cli(workdir, sd_folder, image_folder, f"--config.data.precompute={tmp_path / 'pre'}",
              "--config.train.steps=1", "--config.data.flip=False", "--config.data.crop=center")
  assert train_ldm.main(["train.ldm", *argv]) == 0, capsys.readouterr().err
  from tests.test_fault_tolerance import saved_state
  step, state, _ = saved_state(workdir)
  assert step == 1 and all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
  assert (workdir / "diffusers" / "unet").is_dir() and len(os.listdir(tmp_path / "pre")) >= 2


def test_pickled_checkpoints_are_refused_by_name(tmp_path):
  ckpt = tmp_path / "v1-5-pruned.ckpt"
  ckpt.write_bytes(b"\x80\x02not really")
  for load in (lambda: StableDiffusion.from_diffusers(ckpt), lambda: ldm.load_path(str(ckpt), what="base")):
    with pytest.raises(ValueError, match=r"pickle file \(\.ckpt") as e:
      load()
    assert "\n" not in str(e.value)
