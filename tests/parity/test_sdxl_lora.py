"""SDXL LoRA files against diffusers' ``load_lora_weights``: fixtures written by hand in the kohya layout (SGM
block names for the UNet, ``lora_te1_`` / ``lora_te2_``) and in the diffusers/PEFT layout, loaded by
``jdiff.lora.load`` and merged into the tiny random SDXL pipeline of ``test_sdxl_models.py``; the UNet and both
text encoders then give the outputs diffusers gives with the same file loaded (as unmerged PEFT adapters).

Tolerance: the networks and inputs are those of ``test_sdxl_models.py`` (1e-4 relative there); merging
``W + s B A`` instead of computing ``W x + s B (A x)`` reorders float32 sums of K <= 512 terms of O(1) values
with factors of 0.2 scale, a relative change of order K * 2**-24 ~ 3e-5 before the networks' own bound, so
1e-4 holds. Each comparison also checks that the adapter moves the output by far more than that.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors.numpy import save_file  # noqa: E402

from jdiff import lora  # noqa: E402
from jdiff.convert import unet_param_shapes  # noqa: E402
from jdiff.convert.sdxl import load_sdxl_parts  # noqa: E402
from jdiff.models import UNetConfig  # noqa: E402
from tests.parity.test_sdxl_models import (PROMPTS, PROMPTS_2, RTOL, TIME_IDS, build_tiny_sdxl, rel_err,  # noqa: E402
                                           torch_unet, unet_inputs)
from tests.parity.test_unet import SD1_LIKE  # noqa: E402

# SGM module (kohya's name, dots as underscores) -> diffusers module, for the tiny SDXL UNet of
# test_sdxl_models.py: level 0 DownBlock2D (1 resnet + downsampler), level 1 cross-attention (1 resnet, 2
# transformer layers); up level 0 cross-attention (2 resnets + upsampler), up level 1 plain (2 resnets).
UNET_MODULES = {
    "input_blocks_0_0": "conv_in",
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_1_0_emb_layers_1": "down_blocks.0.resnets.0.time_emb_proj",
    "input_blocks_2_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_3_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks_3_1_proj_in": "down_blocks.1.attentions.0.proj_in",
    "input_blocks_3_1_transformer_blocks_0_attn1_to_out_0":
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "input_blocks_3_1_transformer_blocks_1_attn2_to_k": "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
    "middle_block_0_out_layers_3": "mid_block.resnets.0.conv2",
    "middle_block_1_transformer_blocks_1_ff_net_0_proj": "mid_block.attentions.0.transformer_blocks.1.ff.net.0.proj",
    "middle_block_2_in_layers_2": "mid_block.resnets.1.conv1",
    "output_blocks_0_1_transformer_blocks_0_attn1_to_q": "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "output_blocks_1_1_proj_out": "up_blocks.0.attentions.1.proj_out",
    "output_blocks_1_2_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_2_0_emb_layers_1": "up_blocks.1.resnets.0.time_emb_proj",
    "output_blocks_3_0_skip_connection": "up_blocks.1.resnets.1.conv_shortcut",
    "time_embed_0": "time_embedding.linear_1",
    "label_emb_0_2": "add_embedding.linear_2",
    "out_2": "conv_out",
}
TE1_MODULES = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1",
               "text_model.encoder.layers.2.self_attn.out_proj"]
TE2_MODULES = ["text_model.encoder.layers.0.self_attn.v_proj", "text_model.encoder.layers.0.self_attn.out_proj",
               "text_model.encoder.layers.1.mlp.fc2", "text_model.encoder.layers.2.self_attn.k_proj"]
KOHYA_ALPHA = 6.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(folder, jdiff parts) of the tiny SDXL pipeline."""
  folder = tmp_path_factory.mktemp("tiny_sdxl_lora")
  build_tiny_sdxl(folder)
  return folder, load_sdxl_parts(folder)


@pytest.fixture(scope="module")
def weights(tiny) -> dict[str, dict[str, np.ndarray]]:
  """The torch weights of each component, by module name."""
  folder, _ = tiny
  pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
  return {comp: {n[: -len(".weight")]: p.detach().numpy() for n, p in getattr(pipe, comp).named_parameters()
                 if n.endswith(".weight")} for comp in ("unet", "text_encoder", "text_encoder_2")}


def _factors(rng, weight: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
  """Random (down [r, in(, kh, kw)], up [out, r(, 1, 1)]) for a torch weight [out, in(, kh, kw)]."""
  down = 0.2 * rng.standard_normal((rank, *weight.shape[1:])).astype(np.float32)
  up = 0.2 * rng.standard_normal((weight.shape[0], rank, *(1,) * (weight.ndim - 2))).astype(np.float32)
  return down, up


def _te_weight(weights, comp, module):
  return weights[comp].get(module, weights[comp].get(module.removeprefix("text_model.")))


def _kohya_file(path, weights) -> dict[str, float]:
  """kohya keys with ranks 2-4 per module and one alpha (the trainer's ``network_alpha``): diffusers 0.42
  files the alphas of attention modules under other names and falls back to the file's common alpha for them,
  so only a file-wide alpha means the same to both loaders. Returns alpha / r by kohya module name."""
  rng = np.random.default_rng(0)
  scales = {}
  out = {}
  modules = [("lora_unet_" + k, weights["unet"][v]) for k, v in UNET_MODULES.items()]
  modules += [("lora_te1_" + m.replace(".", "_"), _te_weight(weights, "text_encoder", m)) for m in TE1_MODULES]
  modules += [("lora_te2_" + m.replace(".", "_"), _te_weight(weights, "text_encoder_2", m)) for m in TE2_MODULES]
  for name, w in modules:
    rank = int(rng.integers(2, 5))
    out[name + ".lora_down.weight"], out[name + ".lora_up.weight"] = _factors(rng, w, rank)
    out[name + ".alpha"] = np.asarray(KOHYA_ALPHA, np.float32)
    scales[name] = KOHYA_ALPHA / rank
  save_file(out, str(path))
  return scales


def _diffusers_file(path, weights) -> None:
  """diffusers/PEFT keys with one rank per component and its alpha in ``lora_adapter_metadata``."""
  rng = np.random.default_rng(1)
  out, meta = {}, {}
  per_comp = {"unet": list(UNET_MODULES.values()), "text_encoder": TE1_MODULES, "text_encoder_2": TE2_MODULES}
  for (comp, modules), (rank, alpha) in zip(per_comp.items(), [(4, 7.0), (3, 1.5), (2, 5.0)]):
    for m in modules:
      w = weights["unet"][m] if comp == "unet" else _te_weight(weights, comp, m)
      out[f"{comp}.{m}.lora_A.weight"], out[f"{comp}.{m}.lora_B.weight"] = _factors(rng, w, rank)
    targets = modules if comp == "unet" else sorted({m.rsplit(".", 1)[1] for m in modules})
    meta.update({f"{comp}.r": rank, f"{comp}.lora_alpha": alpha, f"{comp}.target_modules": targets})
  save_file(out, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
  return None


@pytest.fixture(scope="module")
def applies(tiny):
  """Jitted applies of the UNet and each text encoder (last hidden state, and text_embeds when projected),
  compiled once for the module."""
  _, parts = tiny

  def text(module):
    def run(params, ids):
      out = module.apply({"params": params}, ids)
      return [out.last_hidden_state] + ([out.text_embeds] if getattr(out, "text_embeds", None) is not None else [])
    return jax.jit(run)

  return {"unet": jax.jit(parts.unet.apply), "text_encoder": text(parts.text_encoder),
          "text_encoder_2": text(parts.text_encoder_2)}


def _torch_text_outputs(model, ids):
  with torch.no_grad():
    out = model(torch.from_numpy(ids.astype(np.int64)))
  return [out.last_hidden_state.numpy()] + ([out.text_embeds.numpy()] if hasattr(out, "text_embeds") else [])


@pytest.mark.parametrize("layout", ["kohya_sgm", "diffusers"])
def test_sdxl_lora_matches_diffusers_load_lora_weights(tiny, weights, applies, tmp_path, layout):
  folder, parts = tiny
  file = tmp_path / f"{layout}.safetensors"
  scales = (_kohya_file if layout == "kohya_sgm" else _diffusers_file)(file, weights)

  adapters = lora.load(file, {"unet": parts.unet_params, "text_encoder": parts.text_encoder_params,
                              "text_encoder_2": parts.text_encoder_2_params})
  assert sorted(adapters) == ["text_encoder", "text_encoder_2", "unet"]
  assert len(adapters["unet"].factors) == len(UNET_MODULES)
  assert len(adapters["text_encoder"].factors) == len(TE1_MODULES)
  assert len(adapters["text_encoder_2"].factors) == len(TE2_MODULES)
  assert sorted(lora.unet_namer(p) for p in adapters["unet"].paths) == sorted(UNET_MODULES.values())
  if scales:  # each kohya module's alpha / r
    sgm = {v: k for k, v in UNET_MODULES.items()}
    for path in adapters["unet"].paths:
      assert adapters["unet"].scale_of(path) == pytest.approx(scales["lora_unet_" + sgm[lora.unet_namer(path)]])
    for comp, prefix in (("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
      for path in adapters[comp].paths:
        name = prefix + lora.text_namer(path).replace(".", "_")
        assert adapters[comp].scale_of(path) == pytest.approx(scales[name])

  pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
  pipe.load_lora_weights(str(file))

  x, t, ctx, pooled = unet_inputs(seed=3)
  want = torch_unet(pipe.unet, x, t, ctx, pooled, TIME_IDS)
  unet_apply = applies["unet"]
  got = unet_apply({"params": lora.merge(parts.unet_params, adapters["unet"])}, x, t, ctx, text_embeds=pooled,
                   time_ids=TIME_IDS)
  assert rel_err(got, want) <= RTOL
  base = unet_apply({"params": parts.unet_params}, x, t, ctx, text_embeds=pooled, time_ids=TIME_IDS)
  assert rel_err(base, want) > 1e-2  # the adapter changes the output, so the check above means something

  for comp, tokenizer, prompts in [("text_encoder", parts.tokenizer, PROMPTS),
                                   ("text_encoder_2", parts.tokenizer_2, PROMPTS_2)]:
    ids = tokenizer(prompts)
    params = getattr(parts, comp + "_params")
    wants = _torch_text_outputs(getattr(pipe, comp), ids)
    gots = applies[comp](lora.merge(params, adapters[comp]), ids)
    bases = applies[comp](params, ids)
    assert len(gots) == len(wants) == (2 if comp == "text_encoder_2" else 1)
    for got, base, want in zip(gots, bases, wants):
      assert rel_err(got, want) <= RTOL, comp
      assert rel_err(base, want) > 1e-2, comp


def test_sgm_names_of_the_sdxl_base_unet():
  """SGM names of the SDXL base UNet's layout (abstract shapes, nothing allocated; 3 transformer layers in the
  deepest level instead of 10, to trace faster) at the level ends."""
  shapes = unet_param_shapes(UNetConfig.sdxl_base(transformer_layers_per_block=(1, 2, 3)))
  params = {}
  for path, shape in shapes.items():
    node = params
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = jax.ShapeDtypeStruct(shape, np.float32)
  names = lora.sgm_names(params)
  assert names["down_blocks.0.downsamplers.0.conv"] == "input_blocks.3.0.op"
  assert names["down_blocks.2.attentions.1.transformer_blocks.2.attn2.to_k"] == \
      "input_blocks.8.1.transformer_blocks.2.attn2.to_k"
  assert names["mid_block.resnets.1.conv1"] == "middle_block.2.in_layers.2"
  assert names["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.2.conv"
  assert names["up_blocks.1.resnets.2.conv_shortcut"] == "output_blocks.5.0.skip_connection"
  assert names["up_blocks.2.resnets.2.time_emb_proj"] == "output_blocks.8.0.emb_layers.1"
  assert len(names) == len([p for p in shapes if p[-1] == "kernel" and len(shapes[p]) in (2, 4)])


def _sd15_params():
  shapes = unet_param_shapes(UNetConfig(**SD1_LIKE))
  params = {}
  for path, shape in shapes.items():
    node = params
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = np.zeros(shape, np.float32)
  return params


def _one_line_error(match, file, params_by_component):
  with pytest.raises(ValueError, match=match) as err:
    lora.load(file, params_by_component)
  assert "\n" not in str(err.value)


def test_sd15_and_sdxl_lora_mismatches_are_one_line(tiny, weights, tmp_path):
  _, parts = tiny
  sd15 = _sd15_params()
  ad = lora.init(sd15, key=jax.random.key(0), rank=2)
  lora.save_diffusers(tmp_path / "sd15.safetensors", {"unet": ad})
  lora.save_kohya(tmp_path / "sd15_kohya.safetensors", {"unet": ad})
  sdxl = {"unet": parts.unet_params, "text_encoder": parts.text_encoder_params,
          "text_encoder_2": parts.text_encoder_2_params}
  for name in ("sd15.safetensors", "sd15_kohya.safetensors"):  # SD1.5's first level has attention, SDXL's not
    _one_line_error(r"a LoRA for SD1\.x/2\.x applied to SDXL: .*(not in the unet|no counterpart in the unet)",
                    tmp_path / name, sdxl)
  # a full-size SD1.5 cross-attention (768 wide) on a module SDXL has: the shapes disagree
  save_file({"unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": np.ones((2, 768), np.float32),
             "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": np.ones((64, 2), np.float32)},
            str(tmp_path / "sd15_wide.safetensors"))
  _one_line_error(r"a LoRA for SD1\.x applied to SDXL: the unet LoRA for .*attn2/to_k/kernel implies kernel shape "
                  r"\(768, 64\), the model has \(80, 64\)", tmp_path / "sd15_wide.safetensors", sdxl)
  # an SDXL file (second text encoder) on SD1.5 parameters
  _kohya_file(tmp_path / "sdxl.safetensors", weights)
  _one_line_error(r"a LoRA for SDXL applied to SD1\.x/2\.x: it adapts text_encoder_2, and no second text encoder",
                  tmp_path / "sdxl.safetensors", {"unet": sd15, "text_encoder": parts.text_encoder_params})


def test_unknown_sgm_block_is_one_line(tiny, tmp_path):
  _, parts = tiny
  f = lambda *s: np.ones(s, np.float32)  # noqa: E731
  save_file({"lora_unet_output_blocks_7_1_proj_in.lora_down.weight": f(2, 64),
             "lora_unet_output_blocks_7_1_proj_in.lora_up.weight": f(64, 2)}, str(tmp_path / "bad.safetensors"))
  _one_line_error(r"kohya module 'lora_unet_output_blocks_7_1_proj_in' names SGM block output_blocks\.7, which "
                  r"this UNet does not have \(it has input_blocks 0-3, middle_block 0-2, output_blocks 0-3\)",
                  tmp_path / "bad.safetensors", {"unet": parts.unet_params})
  # a block that exists, without the module named (input block 1 is a resnet: no attention at .1)
  save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": f(2, 32),
             "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": f(32, 2)}, str(tmp_path / "bad2.safetensors"))
  _one_line_error(r"kohya module 'lora_unet_input_blocks_1_1_proj_in' has no counterpart in the unet parameters",
                  tmp_path / "bad2.safetensors", {"unet": parts.unet_params})


def test_pipeline_applies_lora_to_both_text_encoders(tiny, weights, tmp_path):
  """StableDiffusionXL.generate(lora=file) with a kohya file adapting the UNet and both text encoders gives the
  images of diffusers' pipeline after ``load_lora_weights`` at ``cross_attention_kwargs={"scale": s}`` (1e-4 of
  the image range, as tests/parity/test_sdxl_pipeline.py argues); without the text_encoder_2 adapter the images
  move by far more, so the second encoder's adapter is applied."""
  from jdiff.sdxl import StableDiffusionXL

  folder, _ = tiny
  file = tmp_path / "kohya.safetensors"
  _kohya_file(file, weights)
  latents = np.random.default_rng(5).standard_normal((2, 16, 16, 4)).astype(np.float32)
  scale, steps = 0.7, 3
  pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
  pipe.load_lora_weights(str(file))
  pipe.set_progress_bar_config(disable=True)
  with torch.no_grad():
    want = pipe(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=5.0, output_type="np",
                latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), height=32, width=32,
                cross_attention_kwargs={"scale": scale}).images
  ours = StableDiffusionXL.from_diffusers(folder)
  got = ours.generate(PROMPTS, key=jax.random.key(0), num_steps=steps, guidance_scale=5.0, latents=latents,
                      lora=file, lora_scale=scale)
  assert float(np.max(np.abs(np.asarray(got, np.float64) - want))) <= 1e-4
  adapters = ours.load_lora(file)
  assert sorted(adapters) == ["text_encoder", "text_encoder_2", "unet"]
  without_te2 = ours.generate(PROMPTS, key=jax.random.key(0), num_steps=steps, guidance_scale=5.0, latents=latents,
                              lora=[({k: v for k, v in adapters.items() if k != "text_encoder_2"}, scale)])
  assert float(np.max(np.abs(np.asarray(without_te2, np.float64) - want))) > 1e-2
  with pytest.raises(ValueError, match="a LoRA dict maps 'unet' / 'text_encoder' / 'text_encoder_2'"):
    ours.generate(PROMPTS, key=jax.random.key(0), num_steps=1, lora={"text_encoder_3": adapters["unet"]})
