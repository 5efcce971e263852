"""Original-layout single-file checkpoints, checked through an independent reader: jdiff writes the file
from a tiny random diffusers pipeline; diffusers' ``StableDiffusionPipeline.from_single_file`` (with that
pipeline's folder as config) loads it to bit-identical parameters, and jdiff's reader loads it to the
parameters ``from_diffusers`` gave. SD 1 (OpenAI CLIP text layout) and SD 2 (OpenCLIP text layout)."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from jdiff.convert import _io
from jdiff.convert import unet_param_shapes, vae_param_shapes
from jdiff.convert.single_file import (family_configs, load_single_file_bundle, read_single_file,
                                       save_single_file_bundle, unet_original_name, vae_original_name)
from jdiff.convert.unet import torch_name
from jdiff.pipelines import StableDiffusion
from tests.parity.test_pipeline import build_tiny_sd_pipeline
from tests.parity.test_tokenizer import write_clip_vocab

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def build_tiny_sd2_pipeline(folder) -> None:
  """Saves a tiny random SD 2-style pipeline: linear transformer projections, per-level heads, two layers
  per level (so the block numbering is exercised), a gelu (OpenCLIP) text encoder, v-prediction."""
  torch.manual_seed(1)
  unet = diffusers.UNet2DConditionModel(
      sample_size=8, block_out_channels=(32, 64), layers_per_block=2, in_channels=4, out_channels=4,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
      norm_num_groups=8)
  vae = diffusers.AutoencoderKL(
      block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
      norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
      sample_size=16)
  vocab_size = write_clip_vocab(folder / "_vocab")
  tokenizer = transformers.CLIPTokenizer(vocab=str(folder / "_vocab" / "vocab.json"),
                                         merges=str(folder / "_vocab" / "merges.txt"), model_max_length=77)
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=77, hidden_act="gelu", bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
  scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                      prediction_type="v_prediction")
  pipe = diffusers.StableDiffusionPipeline(unet=unet.eval(), vae=vae.eval(), text_encoder=text.eval(),
                                           tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(folder)


def _written(tmp_path_factory, layout: str):
  """(diffusers folder, jdiff bundle from it, the single file jdiff wrote, layout)."""
  folder = tmp_path_factory.mktemp(f"tiny_{layout}")
  (build_tiny_sd_pipeline if layout == "sd1" else build_tiny_sd2_pipeline)(folder)
  ours = StableDiffusion.from_diffusers(folder)
  file = save_single_file_bundle(ours, folder.parent / f"{layout}_model.safetensors")
  return folder, ours, file, layout


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
  return _written(tmp_path_factory, "sd1")


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
  return _written(tmp_path_factory, "sd2")


@pytest.fixture(params=["sd1", "sd2"])
def case(request):
  return request.getfixturevalue(request.param)


def _state_dicts_equal(want: torch.nn.Module, got: torch.nn.Module, part: str) -> None:
  a, b = want.state_dict(), got.state_dict()
  assert sorted(a) == sorted(b), part
  for name in a:
    assert b[name].device.type != "meta", f"{part}.{name} was not loaded"
    assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), f"{part}.{name}"


def test_diffusers_from_single_file_loads_bit_identical(case):
  folder, _, file, _ = case
  want = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                           requires_safety_checker=False)
  got = diffusers.StableDiffusionPipeline.from_single_file(str(file), config=str(folder), local_files_only=True)
  for part in ("unet", "vae", "text_encoder"):
    _state_dicts_equal(getattr(want, part), getattr(got, part), part)


def test_file_has_original_layout(case):
  _, ours, file, layout = case
  tensors, meta = _io.read_safetensors(file)
  assert meta == {"format": "pt"}
  assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in tensors)
  # the VAE's attention is stored as 1x1 convolutions, the decoder's levels counted from the deepest
  assert tensors["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
  assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in tensors
  if layout == "sd1":
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in tensors
    assert "model.diffusion_model.output_blocks.1.2.conv.weight" in tensors  # after up level 0's attention
  else:
    n, d = ours.text_encoder.config.num_hidden_layers, ours.text_encoder.config.hidden_size
    assert tensors[f"cond_stage_model.model.transformer.resblocks.{n - 1}.attn.in_proj_weight"].shape == (3 * d, d)
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in tensors  # 1 + 0 * 3 + 2
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in tensors  # up level 0 has no attention
    assert tensors["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 2  # linear projections


def test_jdiff_reads_back_the_same_params(case):
  folder, ours, file, layout = case
  got = load_single_file_bundle(file, config=folder)
  assert got.prediction == ours.prediction == ("epsilon" if layout == "sd1" else "v")
  assert got.unet.config == ours.unet.config and got.text_encoder.config == ours.text_encoder.config
  for part in ("unet_params", "vae_params", "text_params"):
    want, have = getattr(ours, part), getattr(got, part)
    assert jax.tree.structure(want) == jax.tree.structure(have), part
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(have)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=part)


def test_sd2_last_block_is_identity(sd2, tmp_path):
  """A reader taking the OpenCLIP encoder's last block (one more than SD 2's penultimate) gets the same
  hidden states: the written extra block is an exact identity."""
  folder, _, file, _ = sd2
  from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

  config = json.loads((folder / "text_encoder" / "config.json").read_text())
  deeper = tmp_path / "text_encoder"
  deeper.mkdir()
  (deeper / "config.json").write_text(json.dumps({**config, "num_hidden_layers": config["num_hidden_layers"] + 1}))
  checkpoint = {k: torch.from_numpy(np.array(v)) for k, v in _io.read_safetensors(file)[0].items()}
  full = create_diffusers_clip_model_from_ldm(transformers.CLIPTextModel, checkpoint, config=str(tmp_path),
                                              subfolder="text_encoder", local_files_only=True)
  ref = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
  ids = torch.tensor([[0, 5, 9, 3, 1] + [1] * 72])
  with torch.no_grad():
    np.testing.assert_array_equal(full(ids).last_hidden_state.numpy(), ref(ids).last_hidden_state.numpy())


def test_pickle_refused_in_one_line(tmp_path):
  ckpt = tmp_path / "model.ckpt"
  ckpt.write_bytes(b"\x80\x02}q\x00.")
  with pytest.raises(ValueError, match="pickle") as err:
    read_single_file(ckpt, family="sd15")
  assert "\n" not in str(err.value)


def test_missing_part_and_foreign_layout_in_one_line(sd1, tmp_path):
  folder, _, file, _ = sd1
  tensors, _ = _io.read_safetensors(file)
  shutil.copytree(folder, tmp_path / "other", ignore=shutil.ignore_patterns("*.safetensors"))
  unet_config = json.loads((folder / "unet" / "config.json").read_text())
  (tmp_path / "other" / "unet" / "config.json").write_text(json.dumps({**unet_config, "in_channels": 9}))
  no_vae = tmp_path / "no_vae.safetensors"
  save_file({k: np.array(v) for k, v in tensors.items() if not k.startswith("first_stage_model.")}, str(no_vae))
  with pytest.raises(ValueError, match="holds no VAE") as err:
    read_single_file(no_vae, config=folder)
  assert "\n" not in str(err.value)
  diffusers_layout = tmp_path / "unet.safetensors"
  shutil.copy(folder / "unet" / "diffusion_pytorch_model.safetensors", diffusers_layout)
  with pytest.raises(ValueError, match="not an original-layout") as err:
    read_single_file(diffusers_layout, config=folder)
  assert "\n" not in str(err.value)
  with pytest.raises(ValueError, match="'model.diffusion_model.input_blocks.0.0.weight' has shape"):
    read_single_file(file, config=tmp_path / "other")
  with pytest.raises(ValueError, match="OpenAI CLIP"):  # an SD 1 file read as an SD 2 family
    read_single_file(file, family="sd21-base")
  with pytest.raises(ValueError, match="exactly one of family= .* or config="):
    read_single_file(file)
  with pytest.raises(ValueError, match="holds no tokenizer"):
    load_single_file_bundle(file, family="sd15")


def test_float16_file_reads_as_rounded_float32(sd1, tmp_path):
  _, ours, _, _ = sd1
  half = save_single_file_bundle(ours, tmp_path / "half.safetensors", dtype="float16")
  raw = half.read_bytes()
  header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
  assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}
  got = read_single_file(half, config=ours.source)
  for a, b in zip(jax.tree.leaves(ours.unet_params), jax.tree.leaves(got.unet_params)):
    np.testing.assert_array_equal(np.asarray(a).astype(np.float16).astype(np.float32), np.asarray(b))


def test_sd15_family_names_match_the_original_files():
  """The real SD 1.5 file's UNet and VAE tensor counts (686, 248) and a few of its names, from the
  family preset alone (shapes are computed abstractly)."""
  unet_config, vae_config, _ = family_configs("sd15")
  unet = {unet_original_name(torch_name(p), unet_config) for p in unet_param_shapes(unet_config)}
  vae = {vae_original_name(torch_name(p), vae_config) for p in vae_param_shapes(vae_config)}
  assert len(unet) == 686 and len(vae) == 248
  assert {"input_blocks.9.0.op.weight", "input_blocks.11.0.out_layers.3.weight", "middle_block.1.proj_in.weight",
          "middle_block.2.emb_layers.1.weight",
          "output_blocks.2.1.conv.weight", "output_blocks.8.2.conv.weight", "output_blocks.3.0.skip_connection.weight",
          "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight", "time_embed.2.bias", "out.2.weight"} <= unet
  assert {"encoder.down.3.block.1.conv2.weight", "encoder.down.1.block.0.nin_shortcut.weight",
          "encoder.down.2.downsample.conv.weight", "decoder.up.0.block.2.conv1.weight",
          "decoder.up.3.upsample.conv.weight", "decoder.up.1.block.0.nin_shortcut.weight",
          "decoder.mid.attn_1.proj_out.weight", "encoder.norm_out.bias", "post_quant_conv.weight"} <= vae
