"""``python -m sample.controlnet`` (and ``sample.inpaint``'s ControlNet flags) on a tiny saved pipeline +
ControlNet, and their error paths. Written images pass through 8-bit PNGs, so they may differ from the
library's output by one level where a float lands on a rounding edge."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from PIL import Image

from jdiff import control_images
from sample import _cli, controlnet, inpaint

SIZE = 32


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  diffusers = pytest.importorskip("diffusers")
  torch = pytest.importorskip("torch")
  from tests.parity.test_pipeline import build_tiny_sd_pipeline
  root = tmp_path_factory.mktemp("cn_cli")
  build_tiny_sd_pipeline(root / "sd")
  unet = diffusers.UNet2DConditionModel.from_pretrained(root / "sd" / "unet")
  torch.manual_seed(0)
  net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in net.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  net.save_pretrained(root / "cn")
  img = np.zeros((37, 35, 3), np.uint8)  # not a multiple of 4: the CLI rounds down to 36x32
  img[6:30, 8:26] = (250, 120, 30)
  Image.fromarray(img).save(root / "shape.png")
  (root / "broken.png").write_bytes(b"\x89PNG but not really")
  rng = np.random.default_rng(0)
  Image.fromarray(np.repeat(np.repeat(rng.integers(0, 256, (4, 4), dtype=np.uint8), 8, 0), 8, 1)).save(
      root / "gray.png")  # a grayscale image to inpaint (replicated to RGB by the reader)
  mask = np.zeros((SIZE, SIZE), np.uint8)
  mask[8:24, 4:20] = 255
  Image.fromarray(mask).save(root / "mask.png")
  return root


@pytest.fixture(scope="module")
def pipes(folders):
  """(the plain pipeline, the same with the ControlNet attached): one compilation per program kind."""
  from jdiff.pipelines import StableDiffusion
  plain = StableDiffusion.from_diffusers(folders / "sd")
  return plain, plain.with_controlnets(folders / "cn")


@pytest.fixture
def shared(pipes, monkeypatch):
  """The programs load the module's pipelines (their compiled programs are reused)."""
  plain, with_cn = pipes
  monkeypatch.setattr(_cli, "load_pipeline", lambda kind, path, **kw: plain)
  monkeypatch.setattr(plain, "with_controlnets", lambda folders, **kw: with_cn)
  return with_cn


def _run(argv, capsys):
  code = _cli.run(controlnet.main, [str(a) for a in argv], prog="controlnet")
  return code, capsys.readouterr()


def test_writes_control_and_result_side_by_side(folders, shared, tmp_path, capsys):
  pipe = shared
  out = tmp_path / "o" / "cn.png"
  code, io = _run(["--diffusers", folders / "sd", "--controlnet", folders / "cn", "--image", folders / "shape.png",
                   "--canny", "--low", "50", "--high", "150", "--prompt", "a box", "--steps", "3", "--seed", "4",
                   "--guidance", "3", "--guidance_rescale", "0.6", "--scale", "0.9", "--out", out], capsys)
  assert code == 0, io.err
  assert "wrote" in io.out
  grid = np.asarray(Image.open(out).convert("RGB"))
  assert grid.shape == (36, 2 * 32 + 2, 3)
  # left: the Canny edges of the Lanczos-resized image; right: the library's output for the same inputs
  img = control_images.load_control_image(folders / "shape.png", (36, 32))
  edges = control_images.canny(img, 50, 150)
  assert edges.max() == 1.0 and 0 < edges.mean() < 0.5
  np.testing.assert_array_equal(grid[:, :32], np.round(edges * 255).astype(np.uint8))
  want = pipe.generate(["a box"], key=jax.random.key(4), num_steps=3, guidance_scale=3.0, guidance_rescale=0.6,
                       height=36, width=32, control_images=edges, controlnet_conditioning_scale=0.9)
  want = np.clip(np.round(np.asarray(want)[0] * 255), 0, 255).astype(int)
  assert np.max(np.abs(grid[:, 34:].astype(int) - want)) <= 1


@pytest.mark.parametrize("extra,message", [
    (["--image", "MISSING"], "--image file"),
    (["--image", "BROKEN"], "not a readable image"),
    (["--image", "SHAPE", "--canny", "--low", "200", "--high", "100"], "--low and --high"),
    (["--image", "SHAPE", "--image", "SHAPE"], "2 --image for 1 --controlnet"),
    (["--image", "SHAPE", "--steps", "0"], "--steps must be >= 1"),
    (["--image", "SHAPE", "--out", "x.jpg"], "--out must name a .png"),
    (["--image", "SHAPE", "--lora", "nope.safetensors"], "--lora file"),
    (["--image", "SHAPE", "--start", "0.5", "--end", "0.5"], "--start and --end"),
    (["--image", "SHAPE", "--guidance-rescale", "1.5"], "--guidance-rescale must be in [0, 1]"),
    (["--image", "SHAPE", "--sampler", "nope"], "unknown --sampler"),
    (["--image", "SHAPE", "--scale", "1", "--scale", "2", "--scale", "3"], "3 --scale values"),
    (["--image", "SHAPE", "--config", "SHAPE"], "only apply with --single_file"),
])
def test_usage_errors_are_one_line_exit_2(folders, tmp_path, capsys, extra, message):
  names = {"MISSING": tmp_path / "missing.png", "BROKEN": folders / "broken.png", "SHAPE": folders / "shape.png"}
  argv = ["--diffusers", folders / "sd", "--controlnet", folders / "cn", "--prompt", "x", "--steps", "2",
          "--out", tmp_path / "o.png"] + [names.get(a, a) for a in extra]
  code, io = _run(argv, capsys)
  assert code == 2
  lines = io.err.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], lines
  assert not (tmp_path / "o.png").exists()


def test_missing_controlnet_folder(folders, tmp_path, capsys):
  code, io = _run(["--diffusers", folders / "sd", "--controlnet", tmp_path / "nope", "--image",
                   folders / "shape.png", "--prompt", "x"], capsys)
  assert code == 2 and "--controlnet folder" in io.err and len(io.err.strip().splitlines()) == 1


def test_argparse_errors_exit_2(capsys):
  with pytest.raises(SystemExit) as exc:
    _cli.run(controlnet.main, ["--diffusers", ".", "--prompt", "x"], prog="controlnet")
  assert exc.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "required" in err[0]


def test_control_image_without_a_controlnet_folder(folders, tmp_path, capsys):
  code, io = _run(["--diffusers", folders / "sd", "--image", folders / "shape.png", "--prompt", "x",
                   "--out", tmp_path / "o.png"], capsys)
  assert code == 2 and "--image needs --controlnet" in io.err and len(io.err.strip().splitlines()) == 1


def test_single_file_source_takes_controlnets(folders, pipes, tmp_path):
  """--single_file with --config loads through the shared loader; --controlnet attaches the same net."""
  plain, with_cn = pipes
  path = plain.save_single_file(tmp_path / "model.safetensors", family="sd15")
  args = controlnet.build_parser().parse_args(
      ["--single_file", str(path), "--config", str(folders / "sd"), "--controlnet", str(folders / "cn"),
       "--image", str(folders / "shape.png"), "--prompt", "x"])
  controlnet._check(args)
  pipe = controlnet.attach_controlnets(_cli.load_model(args), args)
  assert len(pipe.controlnets) == 1
  for a, b in zip(jax.tree.leaves(pipe.controlnet_params), jax.tree.leaves(with_cn.controlnet_params)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(pipe.unet_params), jax.tree.leaves(plain.unet_params)):
    np.testing.assert_array_equal(a, b)


def test_inpaint_with_controlnet_writes_the_library_output(folders, shared, tmp_path, capsys):
  """sample.inpaint's ControlNet flags, on a grayscale image (read as its RGB replication)."""
  out = tmp_path / "inpainted.png"
  code = _cli.run(inpaint.main, ["--diffusers", str(folders / "sd"), "--controlnet", str(folders / "cn"),
                                 "--control_image", str(folders / "shape.png"), "--control_scale", "0.7",
                                 "--control_end", "0.5", "--image", str(folders / "gray.png"), "--mask",
                                 str(folders / "mask.png"), "--prompt", "a box", "--num_steps", "3",
                                 "--guidance_scale", "4", "--seed", "2", "--out", str(out)], prog="inpaint")
  assert code == 0, capsys.readouterr().err
  gray = np.asarray(Image.open(folders / "gray.png"), np.float32) / 255.0
  mask = np.asarray(Image.open(folders / "mask.png"), np.float32) / 255.0
  control = control_images.load_control_image(folders / "shape.png", (SIZE, SIZE))
  want = shared.inpaint(np.repeat(gray[..., None], 3, axis=-1), mask, "a box", key=jax.random.key(2), num_steps=3,
                        guidance_scale=4.0, sampler="ddim", control_images=control,
                        controlnet_conditioning_scale=0.7, control_guidance_end=0.5)
  want = _cli.to_uint8(np.asarray(want)[0]).astype(int)
  got = np.asarray(Image.open(out)).astype(int)
  assert got.shape == (SIZE, SIZE, 3) and np.std(want) > 5
  assert np.max(np.abs(got - want)) <= 1


@pytest.mark.parametrize("extra,message", [
    (["--control_image", "SHAPE"], "--control_image needs --controlnet"),
    (["--controlnet", "CN"], "--controlnet needs --control_image"),
    (["--controlnet", "CN", "--control_image", "SHAPE", "--control_image", "SHAPE"],
     "2 --control_image for 1 --controlnet"),
    (["--controlnet", "CN", "--control_image", "SHAPE", "--control_start", "0.9", "--control_end", "0.2"],
     "--control_start and --control_end"),
])
def test_inpaint_control_flag_errors(folders, tmp_path, capsys, extra, message):
  names = {"SHAPE": folders / "shape.png", "CN": folders / "cn"}
  argv = ["--diffusers", folders / "sd", "--image", folders / "gray.png", "--mask", folders / "mask.png",
          "--prompt", "x", "--out", tmp_path / "o.png"] + [names.get(a, a) for a in extra]
  code = _cli.run(inpaint.main, [str(a) for a in argv], prog="inpaint")
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and message in err[0], err
