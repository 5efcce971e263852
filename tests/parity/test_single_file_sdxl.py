"""SDXL original-layout (SGM) single-file checkpoints, checked through an independent reader: jdiff writes the
file from the tiny random base and refiner folders of ``test_sdxl_pipeline.py``; diffusers'
``StableDiffusionXLPipeline.from_single_file`` (the refiner: ``StableDiffusionXLImg2ImgPipeline``), given the
folder as config, loads it to parameters bit-identical to the folder's (every tensor of the UNet, the VAE and
both text encoders), and jdiff's reader loads it to the parameters ``from_diffusers`` gave. The tiny encoders
have different widths (32, 48), as diffusers needs to tell the base model's two apart. Exact equality: the
round trip copies float32 tensors without arithmetic.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from safetensors.numpy import save_file  # noqa: E402

from jdiff.convert import _io  # noqa: E402
from jdiff.convert.single_file import (read_single_file, read_sdxl_single_file, sdxl_family_configs,  # noqa: E402
                                       unet_original_name)
from jdiff.convert.unet import torch_name, unet_param_shapes  # noqa: E402
from jdiff.pipelines import StableDiffusion  # noqa: E402
from jdiff.sdxl import StableDiffusionXL  # noqa: E402
from tests.parity.test_sdxl_models import PROJ, WIDTH_1, WIDTH_2  # noqa: E402
from tests.parity.test_sdxl_pipeline import PROMPTS, folders  # noqa: E402,F401  (module fixture)
from tests.parity.test_single_file import _state_dicts_equal  # noqa: E402

CLASSES = {"base": "StableDiffusionXLPipeline", "refiner": "StableDiffusionXLImg2ImgPipeline"}


@pytest.fixture(scope="module")
def written(folders, tmp_path_factory):  # noqa: F811
  """which -> (diffusers folder, jdiff bundle from it, the single file jdiff wrote)."""
  out = tmp_path_factory.mktemp("sdxl_single_file")
  cases = {}
  for which, folder in zip(("base", "refiner"), folders):
    ours = StableDiffusionXL.from_diffusers(folder)
    cases[which] = (folder, ours, ours.save_single_file(out / f"{which}.safetensors"))
  return cases


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_diffusers_from_single_file_loads_bit_identical(written, which):
  folder, _, file = written[which]
  cls = getattr(diffusers, CLASSES[which])
  want = cls.from_pretrained(folder, add_watermarker=False)
  got = cls.from_single_file(str(file), config=str(folder), local_files_only=True, add_watermarker=False)
  parts = ("unet", "vae", "text_encoder", "text_encoder_2") if which == "base" else ("unet", "vae", "text_encoder_2")
  for part in parts:
    _state_dicts_equal(getattr(want, part), getattr(got, part), part)
  if which == "refiner":
    assert got.text_encoder is None


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_file_has_sgm_layout(written, which):
  _, ours, file = written[which]
  tensors, meta = _io.read_safetensors(file)
  assert meta == {"format": "pt"}
  openclip = "conditioner.embedders.1.model." if which == "base" else "conditioner.embedders.0.model."
  prefixes = ("model.diffusion_model.", "first_stage_model.", openclip)
  if which == "base":
    prefixes += ("conditioner.embedders.0.transformer.text_model.",)
  assert all(k.startswith(prefixes) for k in tensors)
  n = ours.text_encoder_2.config.num_hidden_layers
  assert {int(k.split(".")[6]) for k in tensors if k.startswith(openclip + "transformer.resblocks.")} == set(range(n))
  assert tensors[openclip + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * WIDTH_2, WIDTH_2)
  # OpenCLIP's projection multiplies from the right: [hidden, projection], transformers' weight transposed
  assert tensors[openclip + "text_projection"].shape == (WIDTH_2, PROJ)
  assert tensors[openclip + "positional_embedding"].shape[1] == WIDTH_2
  assert "model.diffusion_model.label_emb.0.0.weight" in tensors  # the "text_time" embedding
  assert "model.diffusion_model.label_emb.0.2.bias" in tensors
  if which == "base":
    assert tensors["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"].shape == (WIDTH_1,)


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_jdiff_reads_back_the_same_params(written, which):
  folder, ours, file = written[which]
  got = StableDiffusion.from_single_file(file, config=folder)  # dispatches on the file's SDXL text encoders
  assert type(got) is StableDiffusionXL
  assert got.unet.config == ours.unet.config and got.text_encoder_2.config == ours.text_encoder_2.config
  assert (got.force_zeros_for_empty_prompt, got.requires_aesthetics_score) == \
      (ours.force_zeros_for_empty_prompt, ours.requires_aesthetics_score)
  assert got.scheduler_config == ours.scheduler_config and got.defaults == ours.defaults
  parts = ("unet_params", "vae_params", "text_params_2") + (("text_params",) if which == "base" else ())
  if which == "refiner":
    assert got.text_encoder is None and got.text_params is None and got.tokenizer is None
  else:
    assert got.text_encoder.config == ours.text_encoder.config
  for part in parts:
    want, have = getattr(ours, part), getattr(got, part)
    assert jax.tree.structure(want) == jax.tree.structure(have), part
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(have)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=part)
  for a, b in zip(got.tokenize(PROMPTS), ours.tokenize(PROMPTS)):
    np.testing.assert_array_equal(a, b)


def test_sdxl_family_names_match_the_original_files():
  """Names of the real SDXL 1.0 base and refiner files' UNets (base: three levels of 2 layers, 1/2/10
  transformer blocks, upsamplers after the attention), from the family presets alone (shapes are computed
  abstractly)."""
  unet_config = sdxl_family_configs("sdxl")[0]
  names = {unet_original_name(torch_name(p), unet_config) for p in unet_param_shapes(unet_config)}
  assert {"label_emb.0.0.weight", "label_emb.0.2.bias", "input_blocks.3.0.op.weight", "input_blocks.6.0.op.bias",
          "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight", "input_blocks.8.1.proj_out.weight",
          "middle_block.1.transformer_blocks.9.ff.net.2.weight", "output_blocks.2.2.conv.weight",
          "output_blocks.5.2.conv.weight", "output_blocks.8.0.skip_connection.weight", "out.2.bias"} <= names
  assert not any(n.startswith(("input_blocks.1.1.", "input_blocks.9", "output_blocks.9")) for n in names)
  # the refiner: four levels, attention at the middle two, no upsampler after an attention at up level 0
  unet_config = sdxl_family_configs("sdxl-refiner")[0]
  names = {unet_original_name(torch_name(p), unet_config) for p in unet_param_shapes(unet_config)}
  assert {"input_blocks.9.0.op.weight", "input_blocks.7.1.transformer_blocks.3.attn1.to_q.weight",
          "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight",
          "middle_block.1.transformer_blocks.3.norm3.weight", "label_emb.0.0.weight"} <= names
  assert not any(n.startswith(("input_blocks.1.1.", "input_blocks.10.1.", "output_blocks.0.1.")) for n in names)


def test_bad_inputs_are_one_line(written, tmp_path):
  base_folder, _, base_file = written["base"]
  refiner_folder, _, refiner_file = written["refiner"]
  sd_file = tmp_path / "sd1.safetensors"  # the SD 1 layout's prefixes: enough to be told apart
  save_file({"model.diffusion_model.conv_in.weight": np.zeros((2, 2), np.float32),
             "cond_stage_model.transformer.text_model.final_layer_norm.weight": np.zeros(2, np.float32)},
            str(sd_file))
  ckpt = tmp_path / "model.ckpt"
  ckpt.write_bytes(b"\x80\x02}q\x00.")
  cases = [
      (lambda: StableDiffusion.from_single_file(base_file, family="sd15"), "'sd15' is an SD 1.x / 2.x family"),
      (lambda: read_single_file(base_file, family="sd15"), "is an SDXL checkpoint"),
      (lambda: read_sdxl_single_file(sd_file, config=base_folder), "holds no SDXL text encoders .* SD 1.x / 2.x"),
      (lambda: StableDiffusion.from_single_file(sd_file, config=base_folder), "is an SDXL pipeline"),
      (lambda: read_sdxl_single_file(base_file, config=refiner_folder), "not an SDXL refiner file"),
      (lambda: read_sdxl_single_file(refiner_file, config=base_folder), "not an SDXL base file"),
      (lambda: StableDiffusionXL.from_single_file(base_file, family="sdxl"), "holds no tokenizers"),
      (lambda: StableDiffusionXL.from_single_file(ckpt, config=base_folder), "pickle"),
      (lambda: StableDiffusion.from_single_file(ckpt, config=base_folder), "pickle"),
  ]
  for fn, pattern in cases:
    with pytest.raises(ValueError, match=pattern) as err:
      fn()
    assert "\n" not in str(err.value), pattern
