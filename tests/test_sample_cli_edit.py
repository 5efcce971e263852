"""``sample.inpaint``, ``sample.invert`` and the shared model flags (``--single_file``,
``--textual_inversion``, an LCM folder's default sampler) in-process on tiny saved diffusers pipelines.

Each program is compared with the library call it wraps on the same inputs and seed. Images pass through
8-bit PNGs, so written images may differ from the library's by one level where a float lands on a
rounding edge. Latents are compared to 1e-4 of their scale: both sides are jdiff in float32 (epsilon
1.2e-7), differing only in how XLA fuses the same operations, over a few steps of a ~30-layer UNet.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sample import _cli, inpaint, invert, txt2img

diffusers = pytest.importorskip("diffusers")

LATENT_TOL = 1e-4  # of the latents' max |value|, see the module docstring
SIZE = 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  from tests.parity.test_pipeline import build_tiny_sd_pipeline
  root = tmp_path_factory.mktemp("tiny_sd_cli_edit")
  build_tiny_sd_pipeline(root)
  return root


@pytest.fixture(scope="module")
def pipe(folder):
  from jdiff.pipelines import StableDiffusion
  return StableDiffusion.from_diffusers(folder)


@pytest.fixture
def shared(pipe, monkeypatch):
  """The programs load the module's pipeline (its compiled programs are reused)."""
  monkeypatch.setattr(_cli, "load_pipeline", lambda kind, path, **kw: pipe)
  return pipe


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """An RGB image, a mask of its size (white: regenerate), a mask of another size, a non-image."""
  root = tmp_path_factory.mktemp("edit_inputs")
  rng = np.random.default_rng(0)
  coarse = rng.integers(0, 256, (SIZE // 8, SIZE // 8, 3), dtype=np.uint8)
  Image.fromarray(np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)).save(root / "image.png")
  mask = np.zeros((SIZE, SIZE), np.uint8)
  mask[8:24, 4:20] = 255
  Image.fromarray(mask).save(root / "mask.png")
  Image.fromarray(mask[::2, ::2]).save(root / "small_mask.png")
  (root / "broken.png").write_bytes(b"not an image")
  return root


def _pixels(path) -> np.ndarray:
  return np.asarray(Image.open(path)).astype(int)


def _one_error_line(capsys, prog: str) -> str:
  err = capsys.readouterr().err.strip().splitlines()
  lines = [ln for ln in err if ln.startswith(f"{prog}: error:")]
  assert len(lines) == 1, err
  return lines[0]


def test_inpaint_writes_the_library_output(shared, folder, files, tmp_path, capsys):
  out = tmp_path / "out" / "inpainted.png"
  code = _cli.run(inpaint.main, ["--diffusers", str(folder), "--image", str(files / "image.png"), "--mask",
                                 str(files / "mask.png"), "--prompt", "a photo of a cat", "--num_steps", "3",
                                 "--guidance_scale", "4", "--guidance_rescale", "0.5", "--negative_prompt", "blurry",
                                 "--seed", "5", "--out", str(out)], prog="inpaint")
  assert code == 0, capsys.readouterr().err
  got = _pixels(out)
  assert got.shape == (SIZE, SIZE, 3)
  image = np.asarray(Image.open(files / "image.png"), np.float32) / 255.0
  mask = np.asarray(Image.open(files / "mask.png"), np.float32) / 255.0
  want = shared.inpaint(image, mask, "a photo of a cat", key=jax.random.key(5), num_steps=3, guidance_scale=4.0,
                        guidance_rescale=0.5, negative_prompts="blurry", sampler="ddim")
  want = _cli.to_uint8(np.asarray(want)[0]).astype(int)
  assert np.max(np.abs(got - want)) <= 1
  assert np.std(want) > 5  # not a blank image


@pytest.mark.slow  # an inversion and a regeneration through the CLI: ~30 s; tests/parity/test_ddim_inversion.py checks the numbers
def test_invert_writes_the_library_latents_and_regenerates_with_ddim(shared, folder, files, tmp_path, capsys):
  latents, again = tmp_path / "z.npy", tmp_path / "again.png"
  code = _cli.run(invert.main, ["--diffusers", str(folder), "--image", str(files / "image.png"), "--prompt",
                                "a photo of a cat", "--num_steps", "3", "--guidance_scale", "2",
                                "--negative_prompt", "blurry", "--out", str(latents), "--reconstruct", str(again)],
                  prog="invert")
  assert code == 0, capsys.readouterr().err
  stdout = capsys.readouterr().out
  image = np.asarray(Image.open(files / "image.png"), np.float32) / 255.0
  z_t = np.load(latents)
  want = np.asarray(shared.invert(image, "a photo of a cat", num_steps=3, guidance_scale=2.0,
                                  negative_prompts="blurry"))
  assert z_t.shape == want.shape == (1, SIZE // 2, SIZE // 2, 4)
  assert np.max(np.abs(z_t - want)) <= LATENT_TOL * np.max(np.abs(want))
  # the reconstruction is generate's DDIM from z_T at the same steps and guidance
  regen = shared.generate("a photo of a cat", key=jax.random.key(0), latents=jnp.asarray(want), num_steps=3,
                          guidance_scale=2.0, negative_prompts="blurry", sampler="ddim")
  assert np.max(np.abs(_pixels(again) - _cli.to_uint8(np.asarray(regen)[0]).astype(int))) <= 1
  printed = float(stdout.split("||z0' - z0|| / ||z0|| = ")[1].split()[0])
  assert np.isfinite(printed) and printed > 0.0  # a random model does not round-trip: no bound on its size


def test_relative_errors_per_image():
  z0 = np.stack([np.full((2, 2, 4), 2.0), np.full((2, 2, 4), -1.0)]).astype(np.float32)
  back = z0 + np.stack([np.full((2, 2, 4), 0.2), np.zeros((2, 2, 4))]).astype(np.float32)
  np.testing.assert_allclose(invert.relative_errors(z0, back), [0.1, 0.0], rtol=1e-6)


@pytest.mark.parametrize("argv,message", [
    (["--image", "{files}/broken.png", "--mask", "{files}/mask.png"], "is not a readable image"),
    (["--image", "{files}/image.png", "--mask", "{files}/nope.png"], "--mask file"),
    (["--image", "{files}/image.png", "--mask", "{files}/small_mask.png"], "masks must be [B, H, W] with the images'"),
    (["--image", "{files}/image.png", "--mask", "{files}/mask.png", "--strength", "0"], "--strength must be in"),
    (["--image", "{files}/image.png", "--mask", "{files}/mask.png", "--sampler", "magic"], "unknown --sampler"),
])
def test_inpaint_bad_input_is_one_line(shared, folder, files, tmp_path, capsys, argv, message):
  argv = [a.format(files=files) for a in argv]
  code = _cli.run(inpaint.main, ["--diffusers", str(folder), "--prompt", "x", "--num_steps", "2",
                                 "--out", str(tmp_path / "o.png"), *argv], prog="inpaint")
  assert code == 2
  assert message in _one_error_line(capsys, "inpaint")
  assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("argv,message", [
    (["--roundtrip", "2"], "--roundtrip needs a training workdir"),
    (["--roundtrip", "2", "--prompt", "x"], "--roundtrip takes its images and captions from the run's data"),
    (["--image", "{files}/image.png", "--prompt", "x"], "--out is required"),
    (["--image", "{files}/image.png", "--prompt", "x", "--out", "z.png"], "--out must name a .npy file"),
    (["--image", "{files}/broken.png", "--prompt", "x", "--out", "z.npy"], "is not a readable image"),
])
def test_invert_bad_input_is_one_line(shared, folder, files, capsys, argv, message):
  code = _cli.run(invert.main, ["--diffusers", str(folder), *[a.format(files=files) for a in argv]], prog="invert")
  assert code == 2
  assert message in _one_error_line(capsys, "invert")


def test_single_file_and_textual_inversion_flags(pipe, folder, files, tmp_path, capsys):
  """``--single_file`` with ``--config`` loads the file's weights; ``--textual_inversion`` adds the token;
  a pickled ``.ckpt`` and missing single-file options are one-line errors."""
  from safetensors.numpy import save_file

  single = pipe.save_single_file(tmp_path / "model.safetensors", family="sd15")
  emb = np.random.default_rng(1).standard_normal((2, pipe.text_encoder.config.hidden_size)).astype(np.float32)
  save_file({"emb_params": emb}, str(tmp_path / "toy.safetensors"))
  args = txt2img.build_parser().parse_args(["--single_file", str(single), "--config", str(folder), "--prompt", "x",
                                            "--textual_inversion", str(tmp_path / "toy.safetensors"),
                                            "--token", "<toy>"])
  loaded = _cli.load_model(args)
  for a, b in zip(jax.tree.leaves(pipe.unet_params), jax.tree.leaves(loaded.unet_params)):
    np.testing.assert_array_equal(a, b)
  added = [loaded.tokenizer.added[t] for t in ("<toy>", "<toy>_1")]
  assert all(i in loaded.tokenize("a <toy> cat").tolist() for i in added)

  (tmp_path / "model.ckpt").write_bytes(b"\x80\x02")
  cases = [(["--single_file", str(tmp_path / "model.ckpt"), "--config", str(folder)], "pickle"),
           (["--single_file", str(single)], "--single_file needs --config"),
           (["--single_file", str(single), "--family", "sd15"], "needs --tokenizer"),
           (["--diffusers", str(folder), "--family", "sd15"], "only apply with --single_file"),
           (["--diffusers", str(folder), "--textual_inversion", str(tmp_path / "toy.safetensors"), "--token", "a",
             "--token", "b"], "2 --token values for 1 --textual_inversion")]
  for source, message in cases:
    code = _cli.run(invert.main, [*source, "--image", str(files / "image.png"), "--prompt", "x",
                                  "--out", str(tmp_path / "z.npy")], prog="invert")
    assert code == 2
    assert message in _one_error_line(capsys, "invert"), source
  with pytest.raises(SystemExit):  # argparse: an unknown family
    txt2img.build_parser().parse_args(["--single_file", str(single), "--family", "sd99", "--prompt", "x"])
  capsys.readouterr()


def test_without_sampler_flag_the_model_default_is_used(tmp_path, monkeypatch, capsys):
  """txt2img passes the model's default sampler (an LCM folder's "lcm") when --sampler is absent."""
  calls = []

  class Stub:
    defaults = {"sampler": "lcm"}

    def generate(self, prompts, **kw):
      calls.append(kw)
      return np.zeros((len(prompts), 8, 8, 3), np.float32)

  monkeypatch.setattr(_cli, "load_pipeline", lambda kind, path, **kw: Stub())
  argv = ["--diffusers", str(tmp_path), "--prompt", "x", "--num-images", "1", "--out", str(tmp_path / "g.png")]
  assert _cli.run(txt2img.main, argv, prog="txt2img") == 0
  assert _cli.run(txt2img.main, [*argv, "--sampler", "ddim", "--guidance-rescale", "0.3"], prog="txt2img") == 0
  assert [c["sampler"] for c in calls] == ["lcm", "ddim"]
  assert [c["guidance_rescale"] for c in calls] == [0.0, 0.3]
  assert "lcm steps" in capsys.readouterr().out


def test_lcm_folder_samples_with_its_default_sampler(folder, tmp_path, capsys):
  """A folder saved with LCMScheduler and a w-embedding UNet: txt2img without --sampler runs "lcm"
  guided through the embedding, as the library's generate does."""
  import torch

  from jdiff.pipelines import StableDiffusion

  root = tmp_path / "lcm"
  base = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
  torch.manual_seed(2)
  unet = diffusers.UNet2DConditionModel.from_config({**dict(base.unet.config), "time_cond_proj_dim": 8}).eval()
  diffusers.LatentConsistencyModelPipeline(
      vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet,
      scheduler=diffusers.LCMScheduler.from_config(base.scheduler.config), safety_checker=None,
      feature_extractor=None, requires_safety_checker=False).save_pretrained(root)
  out = tmp_path / "lcm.png"
  code = _cli.run(txt2img.main, ["--diffusers", str(root), "--prompt", "a cat", "--steps", "2", "--guidance", "6",
                                 "--num-images", "1", "--seed", "1", "--out", str(out)], prog="txt2img")
  assert code == 0, capsys.readouterr().err
  assert "2 lcm steps" in capsys.readouterr().out
  lcm = StableDiffusion.from_diffusers(root)
  want = lcm.generate(["a cat"], key=jax.random.fold_in(jax.random.key(1), 0), num_steps=2, guidance_scale=6.0)
  assert np.max(np.abs(_pixels(out) - _cli.to_uint8(np.asarray(want)[0]).astype(int))) <= 1
