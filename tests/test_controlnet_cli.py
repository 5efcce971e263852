"""``python -m sample.controlnet`` on a tiny saved pipeline + ControlNet, and its error paths."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from PIL import Image

from jdiff import control_images
from sample import _cli, controlnet

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
  return root


def _run(argv, capsys):
  code = _cli.run(controlnet.main, [str(a) for a in argv], prog="controlnet")
  return code, capsys.readouterr()


def test_writes_control_and_result_side_by_side(folders, tmp_path, capsys, monkeypatch):
  from jdiff.pipelines import StableDiffusion
  pipe = StableDiffusion.from_diffusers(folders / "sd", controlnet=folders / "cn")
  monkeypatch.setattr(_cli, "load_pipeline", lambda kind, path, **kw: pipe)  # share the compiled program
  out = tmp_path / "o" / "cn.png"
  code, io = _run(["--diffusers", folders / "sd", "--controlnet", folders / "cn", "--image", folders / "shape.png",
                   "--canny", "--low", "50", "--high", "150", "--prompt", "a box", "--steps", "3", "--seed", "4",
                   "--guidance", "3", "--scale", "0.9", "--out", out], capsys)
  assert code == 0, io.err
  assert "wrote" in io.out
  grid = np.asarray(Image.open(out).convert("RGB"))
  assert grid.shape == (36, 2 * 32 + 2, 3)
  # left: the Canny edges of the Lanczos-resized image; right: the library's output for the same inputs
  img = control_images.load_control_image(folders / "shape.png", (36, 32))
  edges = control_images.canny(img, 50, 150)
  assert edges.max() == 1.0 and 0 < edges.mean() < 0.5
  np.testing.assert_array_equal(grid[:, :32], np.round(edges * 255).astype(np.uint8))
  want = pipe.generate(["a box"], key=jax.random.key(4), num_steps=3, guidance_scale=3.0, height=36, width=32,
                       control_images=edges, controlnet_conditioning_scale=0.9)
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
