"""The performance benchmarks end to end in their quick / tiny modes: JSON fields, and proof that jdiff and
diffusers did the same work (same loss, gradient norm and update norm after one train step on identical
weights; same images from the same latents), plus the helpers (FLOP counting, peak memory, timing)."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import _timing
from bench import gpu as gpu_bench
from bench import sample as sample_bench
from bench import train as train_bench

pytest.importorskip("diffusers")
pytest.importorskip("torch")


def _run(main, args, tmp_path, name):
  out = tmp_path / f"{name}.json"
  assert main([*args, "--out", str(out)]) == 0
  return json.loads(out.read_text())


# End-to-end runs are marked slow: compiling the train step (forward, backward, AdamW, EMA) of even the tiny
# UNet takes 20-70 s on 2 shared cores, the 20-step sampling program 10-20 s.
@pytest.fixture(scope="module")
def train_result(tmp_path_factory):
  return _run(train_bench.main, ["--quick", "--torch-threads", "1"], tmp_path_factory.mktemp("bt"), "train")


@pytest.fixture(scope="module")
def sample_result(tmp_path_factory):
  return _run(sample_bench.main, ["--quick", "--torch-threads", "1"], tmp_path_factory.mktemp("bs"), "sample")


@pytest.mark.slow
def test_train_quick_same_step_and_fields(train_result):
  assert train_result["benchmark"] == "train_step"
  assert train_result["environment"]["jax"] == jax.__version__
  (r,) = train_result["results"]
  assert r["config"] == "tiny" and r["batch"] == 8 and r["latent"] == [16, 16, 4]
  # identical weights and batch: one step gives the same loss, gradient norm and AdamW update on both sides
  check = r["check"]
  assert check["loss_rel_diff"] <= 1e-5, check
  assert check["grad_norm_rel_diff"] <= 1e-4, check
  assert check["update_norm_rel_diff"] <= 1e-3, check
  assert check["jdiff"]["loss"] > 0.5  # an untrained epsilon-predictor: MSE near the noise variance
  for side in ("jdiff", "diffusers"):
    s = r[side]
    assert len(s["times_s"]) == r["repeats"] == 2
    assert s["median_s"] > 0 and s["min_s"] <= s["median_s"] <= s["max_s"]
    assert math.isclose(s["images_per_s"], r["batch"] * r["steps_per_repeat"] / s["median_s"], rel_tol=1e-9)
    assert s["first_step_s"] > 0 and s["steady_peak_rss_mb"] >= 0
  assert r["diffusers"]["torch_threads"] == 1
  assert r["jdiff"]["compile_s"] > 0 and r["jdiff"]["flops_per_step"] > 0
  assert math.isclose(r["ratio"], r["jdiff"]["images_per_s"] / r["diffusers"]["images_per_s"], rel_tol=1e-9)


@pytest.mark.slow
def test_sample_quick_same_images_and_fields(sample_result):
  assert sample_result["benchmark"] == "txt2img"
  (r,) = sample_result["results"]
  assert r["config"] == "tiny" and r["sampler"] == "ddim" and r["steps"] == 20 and r["batch"] == 2
  # same weights, prompts, latents and DDIM steps: the images agree (diffusers float32 as the reference)
  assert r["check"]["shape"] == [2, 32, 32, 3]
  assert r["check"]["max_abs_diff"] <= 1e-3
  assert r["check"]["image_std"] > 1e-3
  for side in ("jdiff", "diffusers"):
    s = r[side]
    assert math.isclose(s["images_per_s"], r["batch"] / s["latency_s"], rel_tol=1e-9)
    assert s["first_call_s"] > 0
  comp = r["components_ms"]
  assert set(comp) == {"jdiff_unet", "diffusers_unet", "jdiff_vae_decode", "diffusers_vae_decode"}
  assert all(v > 0 for v in comp.values())
  assert math.isclose(r["ratio"], r["jdiff"]["images_per_s"] / r["diffusers"]["images_per_s"], rel_tol=1e-9)


@pytest.mark.slow
def test_gpu_tiny_end_to_end(tmp_path):
  res = _run(gpu_bench.main, ["--tiny"], tmp_path, "gpu")
  assert res["spec"]["name"] == "tiny@16x16" and res["spec"]["dtype"] == "float32"
  phases = res["results"]
  for name in ("pipeline", "jdiff_train", "jdiff_sample", "diffusers_train", "diffusers_sample"):
    assert phases[name]["status"] == "ok", (name, phases[name])
  jt = phases["jdiff_train"]
  assert jt["attention"] == "xla"  # CPU: XLA's attention
  assert jt["flops_per_step"] > 0 and jt["achieved_tflops"] > 0
  assert math.isclose(jt["achieved_tflops"], jt["flops_per_step"] / jt["sec_per_step"] / 1e12, rel_tol=1e-9)
  assert jt["mfu"] is None and jt["peak_tflops"] is None  # no peak rate known for a CPU
  assert phases["jdiff_sample"]["image_shape"] == [2, 32, 32, 3]
  assert phases["diffusers_sample"]["image_shape"] == [2, 32, 32, 3]
  assert phases["jdiff_sample"]["weights"] == "diffusers pipeline"  # the same weights on both sides
  for kind in ("train", "sample"):
    want = phases[f"jdiff_{kind}"]["images_per_s"] / phases[f"diffusers_{kind}"]["images_per_s"]
    assert math.isclose(res[f"{kind}_ratio"], want, rel_tol=1e-9)


def test_cost_flops_counts_a_matmul():
  m, k, n = 16, 32, 8
  compiled = jax.jit(lambda a, b: a @ b).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
  assert train_bench.cost_flops(compiled) == pytest.approx(2 * m * k * n, rel=0.01)


def test_peak_tflops_lookup():
  class Dev:
    def __init__(self, kind):
      self.device_kind = kind

  assert gpu_bench.peak_tflops(Dev("NVIDIA H100 PCIe")) == 756
  assert gpu_bench.peak_tflops(Dev("NVIDIA H100 80GB HBM3")) == 989
  assert gpu_bench.peak_tflops(Dev("NVIDIA A100-SXM4-80GB")) == 312
  assert gpu_bench.peak_tflops(Dev("TPU v5 lite")) == 197
  assert gpu_bench.peak_tflops(Dev("cpu")) is None


def test_timing_helpers():
  calls = []
  times = _timing.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3)
  assert calls == ["a", "b", "b", "a", "a", "b"]  # the order flips every round
  assert [len(v) for v in times.values()] == [3, 3]
  assert _timing.summary([3.0, 1.0, 2.0]) == {"median_s": 2.0, "min_s": 1.0, "max_s": 3.0, "n": 3}
  with pytest.raises(ValueError, match="repeats"):
    _timing.alternate({"a": lambda: None}, repeats=0)
  table = _timing.format_table([{"x": 1, "y": 0.5}, {"x": 22}], ["x", "y"]).splitlines()
  assert table[0].split() == ["x", "y"] and table[3].split() == ["22", "-"]


def test_peak_rss_sees_an_allocation():
  with _timing.PeakRSS() as mem:
    buf = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    del buf
  assert mem.peak_bytes >= 48 * 2**20


def test_attention_implementation_switch():
  from jdiff.models import layers

  x = jax.random.normal(jax.random.key(0), (2, 6, 16))
  attn = layers.Attention(heads=2, head_dim=8)
  params = attn.init(jax.random.key(1), x)
  default = jax.jit(attn.apply)(params, x)
  # cuDNN's envelope excludes float32: on any backend the call falls back to XLA's attention, same numbers
  for impl in ("xla", "cudnn"):
    with layers.attention_implementation(impl):
      assert layers._attention_impl[0] == impl
      np.testing.assert_allclose(np.asarray(jax.jit(attn.apply)(params, x)), np.asarray(default), rtol=0, atol=1e-6)
  assert layers._attention_impl[0] is None  # restored
  with pytest.raises(ValueError, match="flash"):
    with layers.attention_implementation("flash"):
      pass


@pytest.mark.slow  # builds diffusers and jdiff pipelines: ~50 s; .ci/core_smoke runs bench.gpu --tiny
def test_gpu_random_pipeline_has_the_diffusers_pipeline_shapes(tmp_path):
  # bench.gpu samples with jdiff's own random weights where torch/diffusers are missing (a bare JAX
  # machine); the model it times must be the one the diffusers pipeline would have given
  from jdiff.pipelines import StableDiffusion
  spec = gpu_bench.tiny_spec()
  gpu_bench.build_pipeline(spec, tmp_path / "sd")
  want = StableDiffusion.from_diffusers(tmp_path / "sd")
  got = gpu_bench.random_pipeline(spec)

  def shapes(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(v.shape)
            for path, v in jax.tree_util.tree_leaves_with_path(tree)}

  assert shapes(got.unet_params) == shapes(want.unet_params)
  assert shapes(got.text_params) == shapes(want.text_params)
  vae_want = shapes(want.vae_params)
  vae_got = shapes(got.vae_params)
  assert vae_got and all(vae_want[k] == v for k, v in vae_got.items())  # the decoder half, same shapes
  assert {k for k in vae_want if k.startswith(("decoder", "post_quant_conv"))} == set(vae_got)
  # same tokenizer vocabulary and ids, same sampler options and schedule
  assert got.tokenizer(["a photo of a cat"]).tolist() == want.tokenizer(["a photo of a cat"]).tolist()
  np.testing.assert_allclose(np.asarray(got.schedule.alphas_cumprod), np.asarray(want.schedule.alphas_cumprod),
                             rtol=1e-6)
  assert got.scaling_factor == want.scaling_factor
  for k, v in got.sampler_options.items():
    assert want.sampler_options[k] == v, k
  img = got.generate(["a cat"], key=jax.random.key(0), num_steps=2, guidance_scale=3.0, sampler="ddim")
  assert img.shape == (1, 32, 32, 3) and np.all(np.isfinite(np.asarray(img)))
