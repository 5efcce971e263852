"""Stable Diffusion XL models against diffusers / transformers: a tiny random StableDiffusionXLPipeline saved
with save_pretrained and loaded by ``jdiff.convert.sdxl.load_sdxl_parts``; the "text_time" UNet, the text
encoder with projection and SDXL's text conditioning on the same inputs; full-size parameter counts built
abstractly on both sides (jax.eval_shape, torch's meta device).

Tolerances (see ``tests/parity/__init__.py``): the networks are the tiny configs of ``test_unet.py`` /
``test_text.py`` plus one MLP on the additional embedding, so their 1e-4 relative bound holds. The time
ids reach 1024; their sinusoidal arguments ``id * freq`` carry one float32 rounding of ``freq`` on either
side (exp of the same float32 exponent), i.e. an absolute error of at most ``1024 * 2**-24 ~ 6e-5`` in
an argument of a sine whose output is O(1), which the two-layer embedding MLP (K = 80) passes on without
growth; the UNet's own timestep (811) has the same structure and the same bound. The parity tests passed with
the tolerance cut to 0.3x, with PyTorch on 1 and on 2 threads.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from jdiff import sdxl  # noqa: E402
from jdiff.convert import unet_param_shapes, vae_param_shapes  # noqa: E402
from jdiff.convert.sdxl import load_sdxl_parts, save_sdxl_parts  # noqa: E402
from jdiff.convert.text import text_param_shapes  # noqa: E402
from jdiff.models import UNet, UNetConfig, VAEConfig  # noqa: E402
from jdiff.models.text import CLIPTextConfig, sdxl_text_conditioning  # noqa: E402
from tests.parity.test_tokenizer import write_clip_vocab  # noqa: E402

RTOL = 1e-4
B, H, MAX_LEN = 2, 16, 20
WIDTH_1, WIDTH_2, PROJ, TIME_DIM = 32, 48, 40, 8
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on mars, high detail, 8k, trending on artstation"]
PROMPTS_2 = ["red fox in snow", "a dog"]
# base: original (h, w), crop (top, left), target (h, w); values as a 1024-pixel SDXL call passes them
TIME_IDS = np.array([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 1344.0, 16.0, 48.0, 1024.0, 1024.0]],
                    np.float32)

UNET = dict(sample_size=H, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2), use_linear_projection=True, norm_num_groups=8,
            cross_attention_dim=WIDTH_1 + WIDTH_2, addition_embed_type="text_time",
            addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=PROJ + 6 * TIME_DIM)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def nchw(x: np.ndarray) -> "torch.Tensor":
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def perturb(model, seed: int) -> None:
  """Moves every weight away from its default init (so a swapped scale/bias cannot hide)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))


def build_tiny_sdxl(folder) -> None:
  """Saves a tiny random StableDiffusionXLPipeline into ``folder``: the first encoder a quick_gelu CLIP
  pooling at its eos id, the second a gelu CLIPTextModelWithProjection with the legacy eos_token_id 2
  (pooling at the largest id, as SDXL's bigG config does) and tokenizer_2 padding with "!"."""
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(**UNET)
  perturb(unet, 1)
  vae = diffusers.AutoencoderKL(block_out_channels=(16, 32), latent_channels=4, layers_per_block=1,
                                norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32, scaling_factor=0.13025)
  vocab = write_clip_vocab(folder / "_vocab")
  files = dict(vocab=str(folder / "_vocab" / "vocab.json"), merges=str(folder / "_vocab" / "merges.txt"),
               model_max_length=MAX_LEN)
  tokenizer = transformers.CLIPTokenizer(**files)
  tokenizer_2 = transformers.CLIPTokenizer(**files, pad_token="!")
  common = dict(vocab_size=vocab, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=MAX_LEN, bos_token_id=tokenizer.bos_token_id)
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      hidden_size=WIDTH_1, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **common))
  text_2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      hidden_size=WIDTH_2, projection_dim=PROJ, hidden_act="gelu", eos_token_id=2, pad_token_id=1, **common))
  for i, model in enumerate((text, text_2)):
    perturb(model, 2 + i)
  scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                               steps_offset=1, timestep_spacing="leading")
  pipe = diffusers.StableDiffusionXLPipeline(vae=vae.eval(), text_encoder=text.eval(), text_encoder_2=text_2.eval(),
                                             tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet.eval(),
                                             scheduler=scheduler)
  pipe.save_pretrained(folder)
  return pipe


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """(folder, the diffusers pipeline that wrote it)."""
  folder = tmp_path_factory.mktemp("tiny_sdxl")
  return folder, build_tiny_sdxl(folder)


@pytest.fixture(scope="module")
def parts(saved):
  return load_sdxl_parts(saved[0])


@pytest.fixture(scope="module")
def unet_apply(parts):
  """The jitted UNet apply, shared by every test of this config."""
  return jax.jit(parts.unet.apply)


def unet_inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, H, H, 4)).astype(np.float32)
  t = np.array([3, 811], np.int32)
  ctx = rng.standard_normal((B, 7, WIDTH_1 + WIDTH_2)).astype(np.float32)
  pooled = rng.standard_normal((B, PROJ)).astype(np.float32)
  return x, t, ctx, pooled


def torch_unet(model, x, t, ctx, pooled, time_ids):
  with torch.no_grad():
    out = model(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx),
                added_cond_kwargs={"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(time_ids)})
  return np.transpose(out.sample.numpy(), (0, 2, 3, 1))


def test_loads_sdxl_parts(saved, parts):
  folder, _ = saved
  assert parts.unet.config == UNetConfig(**UNET)
  assert parts.text_encoder.config.projection_dim is None
  assert parts.text_encoder_2.config.projection_dim == PROJ and parts.text_encoder_2.config.hidden_act == "gelu"
  assert parts.tokenizer_2.pad_token == "!" and parts.tokenizer.pad_token == "<|endoftext|>"
  assert parts.vae.config.force_upcast and parts.vae.config.scaling_factor == 0.13025
  assert parts.force_zeros_for_empty_prompt and not parts.requires_aesthetics_score
  assert parts.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
  assert json.loads((folder / "model_index.json").read_text())["text_encoder_2"][1] == "CLIPTextModelWithProjection"


def test_text_time_unet_matches_diffusers(saved, parts, unet_apply):
  _, pipe = saved
  x, t, ctx, pooled = unet_inputs()
  want = torch_unet(pipe.unet, x, t, ctx, pooled, TIME_IDS)
  apply = unet_apply
  got = apply({"params": parts.unet_params}, x, t, ctx, text_embeds=pooled, time_ids=TIME_IDS)
  assert got.shape == want.shape
  assert rel_err(got, want) <= RTOL
  # the additional embedding matters: other time ids give another output
  other = apply({"params": parts.unet_params}, x, t, ctx, text_embeds=pooled, time_ids=TIME_IDS[::-1])
  assert rel_err(other, want) > 1e-3
  with pytest.raises(ValueError, match="pass text_embeds"):
    parts.unet.apply({"params": parts.unet_params}, x, t, ctx)
  with pytest.raises(ValueError, match="projection_class_embeddings_input_dim=88"):
    parts.unet.apply({"params": parts.unet_params}, x, t, ctx, text_embeds=pooled, time_ids=TIME_IDS[:, :5])


def test_text_encoder_with_projection_matches_transformers(saved, parts):
  _, pipe = saved
  ids = parts.tokenizer_2(PROMPTS)
  assert ids.shape == (B, MAX_LEN)
  with torch.no_grad():
    ref = pipe.text_encoder_2(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
  module, params = parts.text_encoder_2, parts.text_encoder_2_params
  out = jax.jit(lambda p, i: module.apply({"params": p}, i, output_hidden_states=True))(params, ids)
  assert out.text_embeds.shape == (B, PROJ)
  assert rel_err(out.text_embeds, ref.text_embeds.numpy()) <= RTOL
  assert rel_err(out.last_hidden_state, ref.last_hidden_state.numpy()) <= RTOL
  assert len(out.hidden_states) == len(ref.hidden_states) == 4
  for mine, theirs in zip(out.hidden_states, ref.hidden_states):
    assert rel_err(mine, theirs.numpy()) <= RTOL


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_text_conditioning_matches_encode_prompt(saved, parts, clip_skip):
  _, pipe = saved
  with torch.no_grad():
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=PROMPTS_2, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False, clip_skip=clip_skip)
  ids = [parts.tokenizer(PROMPTS), parts.tokenizer_2(PROMPTS_2)]
  got, got_pooled = sdxl_text_conditioning(parts.encoders, ids, clip_skip=clip_skip or 0)
  assert got.shape == (B, MAX_LEN, WIDTH_1 + WIDTH_2) and got_pooled.shape == (B, PROJ)
  assert rel_err(got, embeds.numpy()) <= RTOL
  assert rel_err(got_pooled, pooled.numpy()) <= RTOL


def test_refiner_text_conditioning_matches_encode_prompt(saved, parts):
  """The refiner has only text_encoder_2: its hidden states alone, pooled from it."""
  _, pipe = saved
  refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
      vae=pipe.vae, text_encoder=None, text_encoder_2=pipe.text_encoder_2, tokenizer=None,
      tokenizer_2=pipe.tokenizer_2, unet=pipe.unet, scheduler=pipe.scheduler, requires_aesthetics_score=True)
  with torch.no_grad():
    embeds, _, pooled, _ = refiner.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                 do_classifier_free_guidance=False)
  got, got_pooled = sdxl_text_conditioning(parts.encoders[1:], [parts.tokenizer_2(PROMPTS)])
  assert got.shape == (B, MAX_LEN, WIDTH_2)
  assert rel_err(got, embeds.numpy()) <= RTOL
  assert rel_err(got_pooled, pooled.numpy()) <= RTOL
  with pytest.raises(ValueError, match="no encoder has a text_projection"):
    sdxl_text_conditioning(parts.encoders[:1], [parts.tokenizer(PROMPTS)])


def test_save_sdxl_parts_loads_in_diffusers(parts, unet_apply, tmp_path):
  """jdiff parameters -> save_sdxl_parts (sharded UNet) -> diffusers from_pretrained and load_sdxl_parts."""
  rng = np.random.default_rng(4)
  shift = lambda tree: jax.tree.map(  # noqa: E731
      lambda p: np.asarray(p) + np.float32(0.05) * rng.standard_normal(p.shape, np.float32), tree)
  mine = dataclasses.replace(parts, unet_params=shift(parts.unet_params),
                             text_encoder_2_params=shift(parts.text_encoder_2_params))
  save_sdxl_parts(mine, tmp_path / "out", max_shard_size="200KB")
  assert (tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
  back = load_sdxl_parts(tmp_path / "out")
  assert back.unet.config == parts.unet.config and back.text_encoder_2.config == parts.text_encoder_2.config
  jax.tree.map(np.testing.assert_array_equal, back.unet_params, mine.unet_params)
  jax.tree.map(np.testing.assert_array_equal, back.text_encoder_2_params, mine.text_encoder_2_params)
  pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / "out")
  x, t, ctx, pooled = unet_inputs(seed=2)
  want = torch_unet(pipe.unet, x, t, ctx, pooled, TIME_IDS)
  got = unet_apply({"params": mine.unet_params}, x, t, ctx, text_embeds=pooled, time_ids=TIME_IDS)
  assert rel_err(got, want) <= RTOL
  with torch.no_grad():
    embeds, _, pooled_ref, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
  got_embeds, got_pooled = sdxl_text_conditioning(mine.encoders, [tok(PROMPTS) for tok in mine.tokenizers])
  assert rel_err(got_embeds, embeds.numpy()) <= RTOL
  assert rel_err(got_pooled, pooled_ref.numpy()) <= RTOL


def test_refiner_folder_round_trip(parts, tmp_path):
  """A refiner folder (no text_encoder / tokenizer): written by save_sdxl_parts, read by diffusers' img2img
  pipeline and by load_sdxl_parts with one encoder."""
  refiner = dataclasses.replace(parts, text_encoder=None, text_encoder_params=None, tokenizer=None,
                                model_index={"_class_name": "StableDiffusionXLImg2ImgPipeline",
                                             "requires_aesthetics_score": True,
                                             "force_zeros_for_empty_prompt": False})
  save_sdxl_parts(refiner, tmp_path / "refiner")
  back = load_sdxl_parts(tmp_path / "refiner")
  assert back.text_encoder is None and back.tokenizer is None and len(back.encoders) == 1
  assert back.requires_aesthetics_score and not back.force_zeros_for_empty_prompt
  pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(tmp_path / "refiner")
  assert pipe.text_encoder is None and pipe.config.requires_aesthetics_score
  assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"


def test_folder_without_text_encoder_2_is_one_line(saved, tmp_path):
  folder, _ = saved
  broken = tmp_path / "no_te2"
  shutil.copytree(folder, broken)
  shutil.rmtree(broken / "text_encoder_2")
  with pytest.raises(FileNotFoundError, match=r"has no text_encoder_2/: not an SDXL pipeline folder") as err:
    load_sdxl_parts(broken)
  assert "\n" not in str(err.value)
  index = json.loads((broken / "model_index.json").read_text())
  del index["text_encoder_2"]
  (broken / "model_index.json").write_text(json.dumps(index))
  with pytest.raises(FileNotFoundError, match="has no text_encoder_2/"):
    load_sdxl_parts(broken)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_sdxl_parts(tmp_path / "nowhere")


def test_full_size_parameter_counts_equal_diffusers():
  """SDXL base / refiner UNets, the bigG text encoder with projection and the VAE, counted abstractly on both
  sides (nothing full-size is allocated)."""
  count = lambda shapes: sum(int(np.prod(s)) for s in shapes.values())  # noqa: E731
  strip = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
  n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
  got = {}
  for preset in ("sdxl_base", "sdxl_refiner"):
    cfg = UNetConfig.preset(preset)
    with torch.device("meta"):
      ref = diffusers.UNet2DConditionModel(**strip(cfg.to_diffusers_config()))
    got[preset] = count(unet_param_shapes(cfg))
    assert got[preset] == n(ref), preset
  assert got["sdxl_base"] == 2_567_463_684  # the published size of SDXL 1.0 base
  text_2 = CLIPTextConfig.sdxl_2()
  with torch.device("meta"):
    ref = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**strip(text_2.to_hf_config())))
    vae = diffusers.AutoencoderKL(**strip(VAEConfig.sdxl().to_diffusers_config()))
  assert count(text_param_shapes(text_2)) == n(ref) == 694_659_840
  assert count(vae_param_shapes(VAEConfig.sdxl())) == n(vae)


def test_configs_and_force_upcast():
  with pytest.raises(ValueError, match="'text_time' needs a positive addition_time_embed_dim"):
    UNetConfig.tiny(addition_embed_type="text_time", projection_class_embeddings_input_dim=8)
  with pytest.raises(ValueError, match="addition_embed_type='image' is not supported"):
    UNetConfig.tiny(addition_embed_type="image")
  with pytest.raises(ValueError, match="text_embeds given but this UNet has no addition_embed_type"):
    x, ctx = jnp.zeros((1, 16, 16, 4)), jnp.zeros((1, 3, 32))
    jax.eval_shape(lambda: UNet(UNetConfig.tiny()).init(jax.random.key(0), x, jnp.zeros((1,)), ctx,
                                                        text_embeds=jnp.zeros((1, 4)), time_ids=jnp.zeros((1, 6))))
  # diffusers' SDXL config writes upcast_attention null; it reads as False
  cfg = UNetConfig.sdxl_base()
  assert UNetConfig.from_diffusers_config({**cfg.to_diffusers_config(), "upcast_attention": None}) == cfg
  # force_upcast: float16 computes in float32, bfloat16 (float32's range) and float32 are kept
  assert VAEConfig.sdxl(dtype="float16").compute_dtype == jnp.float32
  assert VAEConfig.sdxl(dtype="float16", force_upcast=False).compute_dtype == jnp.float16
  assert VAEConfig.sdxl(dtype="bfloat16").compute_dtype == jnp.bfloat16
  assert VAEConfig.from_diffusers_config({**VAEConfig.sdxl().to_diffusers_config(), "force_upcast": False}) == \
      VAEConfig.sdxl(force_upcast=False)


def test_time_ids_match_diffusers(saved):
  _, pipe = saved
  want = pipe._get_add_time_ids((768, 1344), (16, 48), (1024, 1024), dtype=torch.float32,
                                text_encoder_projection_dim=PROJ)
  np.testing.assert_array_equal(sdxl.time_ids((768, 1344), (16, 48), (1024, 1024)), want.numpy())
  refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
      vae=pipe.vae, text_encoder=None, text_encoder_2=pipe.text_encoder_2, tokenizer=None,
      tokenizer_2=pipe.tokenizer_2, scheduler=pipe.scheduler, requires_aesthetics_score=True,
      unet=diffusers.UNet2DConditionModel(**{**UNET, "projection_class_embeddings_input_dim": PROJ + 5 * TIME_DIM}))
  want, want_neg = refiner._get_add_time_ids((512, 640), (0, 8), (1024, 1024), 6.0, 2.5, (512, 640), (0, 8),
                                             (1024, 1024), dtype=torch.float32, text_encoder_projection_dim=PROJ)
  np.testing.assert_array_equal(sdxl.time_ids((512, 640), (0, 8), aesthetic_score=6.0), want.numpy())
  np.testing.assert_array_equal(sdxl.time_ids((512, 640), (0, 8), aesthetic_score=2.5), want_neg.numpy())
  assert sdxl.time_ids((64, 64), batch_size=3).shape == (3, 6)
  with pytest.raises(ValueError, match="original_size must be a pair"):
    sdxl.time_ids((64,))
