"""``python -m sample.txt2img`` end to end on a tiny saved diffusers pipeline, and its error paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from sample import _cli, txt2img

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  return subprocess.run([sys.executable, "-m", "sample.txt2img", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  pytest.importorskip("diffusers")
  from tests.parity.test_pipeline import build_tiny_sd_pipeline
  folder = tmp_path_factory.mktemp("tiny_sd_cli")
  build_tiny_sd_pipeline(folder)
  return folder


@pytest.mark.slow  # ~40 s on 2 cores: a subprocess compiles the sampler, then the check compiles it again
def test_writes_grid_equal_to_library_output(pipeline_dir, tmp_path):
  out = tmp_path / "grids" / "grid.png"
  proc = _run("--diffusers", str(pipeline_dir), "--prompt", "a photo of a cat", "--out", str(out),
              "--steps", "3", "--num-images", "3", "--batch-size", "3", "--seed", "7", "--guidance", "4",
              "--negative-prompt", "blurry", "--cols", "3")
  assert proc.returncode == 0, proc.stderr
  assert "wrote" in proc.stdout and "batch 1/1" in proc.stdout
  grid = np.asarray(Image.open(out).convert("RGB"))
  assert grid.shape == (32, 3 * 32 + 2 * 2, 3)

  from jdiff.pipelines import StableDiffusion
  pipe = StableDiffusion.from_diffusers(pipeline_dir)
  images = pipe.generate(["a photo of a cat"] * 3, key=jax.random.fold_in(jax.random.key(7), 0), num_steps=3,
                         guidance_scale=4.0, negative_prompts="blurry")
  want = _cli.make_grid(np.asarray(images), cols=3)
  assert np.max(np.abs(grid.astype(int) - want.astype(int))) <= 1  # float rounding at a pixel edge at most


def test_missing_folder_is_one_line_exit_2(tmp_path):
  proc = _run("--diffusers", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "g.png"))
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  # The program's own message is the one line with its "txt2img: error:" prefix; native libraries may
  # write other lines to the same stream, so ours are selected by that prefix.
  lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("txt2img: error:")]
  assert len(lines) == 1 and "does not exist" in lines[0] and "nope" in lines[0], proc.stderr


@pytest.mark.parametrize("argv,message", [
    (["--prompt", "x"], "one of the arguments --diffusers"),
    (["--diffusers", ".", "--prompt", "x", "--bogus"], "unrecognized arguments: --bogus"),
    (["--diffusers", ".", "--prompt", "x", "--steps", "many"], "invalid int value"),
    (["--diffusers", ".", "--prompt", "x", "--steps", "0"], "--steps must be >= 1"),
    (["--diffusers", ".", "--prompt", "x", "--sampler", "magic"], "unknown --sampler 'magic'"),
    (["--diffusers", ".", "--prompt", "x", "--out", "grid.jpg"], "--out must name a .png"),
])
def test_usage_errors(argv, message, capsys):
  with pytest.raises(SystemExit) as exc:  # argparse errors exit from inside parse_args
    raise SystemExit(_cli.run(txt2img.main, argv, prog="txt2img"))
  assert exc.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and message in err[0], err


def test_not_a_pipeline_folder(tmp_path, capsys):
  assert _cli.run(txt2img.main, ["--diffusers", str(tmp_path), "--prompt", "x"], prog="txt2img") == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "model_index.json" in err[0]


def test_grid_layout():
  images = np.stack([np.full((4, 5, 3), v, np.float32) for v in (0.0, 0.5, 1.0)])
  grid = _cli.make_grid(images, cols=2, pad=1)
  assert grid.shape == (9, 11, 3)
  assert grid[0, 0, 0] == 0 and grid[0, 6, 0] == 128 and grid[5, 0, 0] == 255 and grid[4, 0, 0] == 255


def test_lora_flags_pair_files_with_scales(tmp_path):
  files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
  for f in files:
    f.write_bytes(b"")
  parse = lambda *extra: txt2img.build_parser().parse_args(["--diffusers", ".", "--prompt", "x", *map(str, extra)])
  assert txt2img.lora_entries(parse()) is None
  assert txt2img.lora_entries(parse("--lora", files[0], "--lora", files[1])) == [(str(files[0]), 1.0),
                                                                                (str(files[1]), 1.0)]
  assert txt2img.lora_entries(parse("--lora", files[0], "--lora", files[1], "--lora-scale", "0.5")) == [
      (str(files[0]), 0.5), (str(files[1]), 0.5)]
  assert txt2img.lora_entries(parse("--lora", files[0], "--lora-scale", "0.3", "--lora", files[1],
                                    "--lora-scale", "0.7")) == [(str(files[0]), 0.3), (str(files[1]), 0.7)]
  with pytest.raises(_cli.UsageError, match="3 --lora-scale values for 2 --lora files"):
    txt2img.lora_entries(parse("--lora", files[0], "--lora", files[1], *["--lora-scale", "1"] * 3))
  with pytest.raises(_cli.UsageError, match="--lora-scale given without --lora"):
    txt2img.lora_entries(parse("--lora-scale", "0.5"))
  with pytest.raises(_cli.UsageError, match="--lora file .*missing"):
    txt2img.lora_entries(parse("--lora", tmp_path / "missing.safetensors"))


@pytest.mark.slow  # ~25 s on 2 cores: compiles a 2-step sampler
def test_lora_flag_generates_with_the_adapter(pipeline_dir, tmp_path, capsys, monkeypatch):
  from jdiff import lora
  from jdiff.pipelines import StableDiffusion
  pipe = StableDiffusion.from_diffusers(pipeline_dir)
  monkeypatch.setattr(_cli, "load_pipeline", lambda kind, path, **kw: pipe)  # share the compiled program
  ad = lora.init(pipe.unet_params, key=jax.random.key(0), rank=2, alpha=2.0)
  ad = lora.LoRA(factors={p: {"down": f["down"], "up": 0.5 * jax.random.normal(jax.random.key(i), f["up"].shape)}
                          for i, (p, f) in enumerate(sorted(ad.factors.items()))}, scales=ad.scales)
  lora.save_diffusers(tmp_path / "style.safetensors", {"unet": ad})
  out = tmp_path / "g.png"
  code = _cli.run(txt2img.main, ["--diffusers", str(pipeline_dir), "--prompt", "a cat", "--out", str(out),
                                 "--steps", "2", "--num-images", "1", "--seed", "3", "--lora",
                                 str(tmp_path / "style.safetensors"), "--lora-scale", "0.6"], prog="txt2img")
  assert code == 0, capsys.readouterr().err
  assert "LoRA: " in capsys.readouterr().out
  grid = np.asarray(Image.open(out).convert("RGB")).astype(int)
  key = jax.random.fold_in(jax.random.key(3), 0)
  want = _cli.make_grid(np.asarray(pipe.generate(["a cat"], key=key, num_steps=2, lora=[(ad, 0.6)])))
  plain = _cli.make_grid(np.asarray(pipe.generate(["a cat"], key=key, num_steps=2)))
  assert np.max(np.abs(grid - want.astype(int))) <= 1
  assert np.max(np.abs(grid - plain.astype(int))) > 2  # the adapter changed the image


def test_workdir_source_generates_from_a_train_ldm_run(tmp_path, capsys):
  """``--workdir`` loads a train.ldm workdir; the grid equals the pipeline's own output."""
  from PIL import Image

  from sample import txt2img
  from sample._cli import load_pipeline
  from tests.test_train_lora import save_random_base
  wd = save_random_base(str(tmp_path / "ldm"))
  out = tmp_path / "grid.png"
  code = txt2img.main(["--workdir", wd, "--prompt", "a handwritten digit 3", "--out", str(out), "--steps", "3",
                       "--num-images", "2", "--guidance", "2.0", "--cols", "2"])
  assert code == 0 and out.exists()
  grid = np.asarray(Image.open(out))
  pipe = load_pipeline("workdir", wd)
  want = np.asarray(pipe.generate(["a handwritten digit 3"] * 2, key=jax.random.fold_in(jax.random.key(0), 0),
                                  num_steps=3, guidance_scale=2.0))
  assert grid.shape[0] == want.shape[1] and abs(grid.shape[1] - 2 * want.shape[2]) <= 4
  first = grid[:, : want.shape[2]].astype(np.float32) / 255.0
  if first.ndim == 2:  # one-channel digits are written as a greyscale PNG
    first = first[..., None]
  np.testing.assert_allclose(first, want[0], atol=1.5 / 255)
  with pytest.raises(_cli.UsageError, match="does not exist"):
    txt2img.main(["--workdir", str(tmp_path / "nope"), "--prompt", "x"])
