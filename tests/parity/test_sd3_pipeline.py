"""The SD3 text-to-image pipeline against diffusers' ``StableDiffusion3Pipeline`` without T5: a tiny random
pipeline (SD3 transformer, two CLIP text encoders with projection and their tokenizers, a 16-channel VAE
with a shift factor, ``FlowMatchEulerDiscreteScheduler(shift=3.0)``, ``text_encoder_3=None``) saved with
``save_pretrained`` and loaded by :meth:`jdiff.sd3_pipeline.StableDiffusion3.from_diffusers`: the text
conditioning against ``encode_prompt``, and the images of 4 steps guided (the folder's static shift) and
unguided (the dynamic shift, mu from the latent sequence length); a folder listing a T5 encoder is refused.

Both sides start from the same latents and are deterministic. Tolerances: the text conditioning is the
CLIP encoders' output (``1e-4`` relative, as ``test_sdxl_models.py``) with exact zeros elsewhere. The
images agree to ~1e-6; 1e-4 of the [0, 1] image range (the issue's bound) leaves room for the
differing summation orders of two frameworks over ~30 layers (float32 epsilon 1.2e-7 times a growth of
~1e2): 4 Euler steps with coefficients |sigma' - sigma| <= 1 add no growth, and guidance at scale 7
multiplies velocity differences by at most 2 * 7 - 1 = 13 within the same bound.
"""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from jdiff.sd3_pipeline import StableDiffusion3  # noqa: E402
from tests.parity.test_tokenizer import write_clip_vocab  # noqa: E402

TOL = 1e-4  # of the [0, 1] image range, see the module docstring
RTOL = 1e-4  # relative, text conditioning
SIZE, MAX_LEN, STEPS = 16, 20, 4
WIDTH_1, WIDTH_2, PROJ_1, PROJ_2, JOINT = 32, 48, 16, 24, 96
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on mars, high detail, 8k, trending on artstation"]
TRANSFORMER = dict(sample_size=SIZE // 2, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                   attention_head_dim=8, num_attention_heads=4, joint_attention_dim=JOINT, caption_projection_dim=32,
                   pooled_projection_dim=PROJ_1 + PROJ_2, pos_embed_max_size=8)


def perturb(model, seed: int) -> None:
  """Moves every weight away from its default init (so a swapped scale/bias cannot hide)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))


def build_tiny_sd3(folder):
  """Saves a tiny random StableDiffusion3Pipeline without T5 into ``folder``; returns it. The first
  encoder pools at its eos id (quick_gelu), the second at the largest id (legacy eos_token_id 2, gelu);
  tokenizer_2 pads with "!" as SD3's does."""
  torch.manual_seed(0)
  transformer = diffusers.SD3Transformer2DModel(**TRANSFORMER)
  vae = diffusers.AutoencoderKL(block_out_channels=(16, 32), latent_channels=16, layers_per_block=1,
                                norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, sample_size=SIZE, scaling_factor=1.5305,
                                shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
  write_clip_vocab(folder / "_vocab")
  files = dict(vocab=str(folder / "_vocab" / "vocab.json"), merges=str(folder / "_vocab" / "merges.txt"),
               model_max_length=MAX_LEN)
  tokenizer = transformers.CLIPTokenizer(**files)
  tokenizer_2 = transformers.CLIPTokenizer(**files, pad_token="!")
  common = dict(vocab_size=len(tokenizer), intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=MAX_LEN, bos_token_id=tokenizer.bos_token_id)
  text = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      hidden_size=WIDTH_1, projection_dim=PROJ_1, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id, **common))
  text_2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      hidden_size=WIDTH_2, projection_dim=PROJ_2, hidden_act="gelu", eos_token_id=2, pad_token_id=1, **common))
  for i, model in enumerate((transformer, vae, text, text_2)):
    perturb(model, 1 + i)
  pipe = diffusers.StableDiffusion3Pipeline(
      transformer=transformer.eval(), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
      vae=vae.eval(), text_encoder=text.eval(), tokenizer=tokenizer, text_encoder_2=text_2.eval(),
      tokenizer_2=tokenizer_2, text_encoder_3=None, tokenizer_3=None)
  pipe.set_progress_bar_config(disable=True)
  pipe.save_pretrained(folder)
  return pipe


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """(folder, the diffusers pipeline that wrote it)."""
  folder = tmp_path_factory.mktemp("tiny_sd3")
  return folder, build_tiny_sd3(folder)


@pytest.fixture(scope="module")
def ours(saved):
  return StableDiffusion3.from_diffusers(saved[0])


def _latents(batch: int, seed: int = 0) -> np.ndarray:
  """Initial noise [B, h, w, 16] (NHWC)."""
  return np.random.default_rng(seed).standard_normal((batch, SIZE // 2, SIZE // 2, 16)).astype(np.float32)


def _nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_loads_folder_without_t5(saved, ours):
  from jdiff.pipelines import StableDiffusion
  assert type(StableDiffusion.from_diffusers(saved[0])) is StableDiffusion3
  index = json.loads((saved[0] / "model_index.json").read_text())
  assert index["text_encoder_3"] == [None, None]
  assert ours.defaults["sampler"] == "flow_euler" and ours.sampler_options["shift"] == 3.0
  assert ours.prediction == "flow" and ours.tokenize(PROMPTS).shape == (len(PROMPTS), 2, MAX_LEN)
  assert (ours.scaling_factor, ours.shift_factor) == (1.5305, 0.0609)
  assert ours.default_size == SIZE


def test_text_conditioning_matches_encode_prompt(saved, ours):
  pipe = saved[1]
  with torch.no_grad():
    want = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True, negative_prompt=["", "blurry"])
  encode = jax.jit(lambda params, ids: tuple(ours.encode_text(params, ids).values()))
  embeds, pooled = encode(ours.all_text_params(), ours.tokenize(PROMPTS))
  null_embeds, null_pooled = encode(ours.all_text_params(), ours.tokenize(["", "blurry"]))
  for got, ref in zip((embeds, null_embeds, pooled, null_pooled), want):
    ref = ref.numpy()
    assert got.shape == ref.shape
    assert _rel_err(got, ref) <= RTOL
  assert embeds.shape == (2, MAX_LEN + 256, JOINT)
  assert not np.any(np.asarray(embeds)[:, :, WIDTH_1 + WIDTH_2:]) and not np.any(np.asarray(embeds)[:, MAX_LEN:])


# (guidance_scale, jdiff sampler options): guided with the folder's scheduler (static shift 3), and unguided
# with the dynamic shift (mu from the latent sequence length, set on diffusers' scheduler as well)
CASES = {"guided_shift3": (7.0, {}), "unguided_dynamic_shift": (1.0, {"use_dynamic_shifting": True})}


@pytest.mark.parametrize("case", list(CASES))
def test_images_match_diffusers(saved, ours, case):
  guidance_scale, options = CASES[case]
  pipe, latents = saved[1], _latents(len(PROMPTS))
  scheduler = pipe.scheduler
  pipe.scheduler = type(scheduler).from_config(scheduler.config, **options)
  try:
    with torch.no_grad():
      want = pipe(prompt=PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance_scale, height=SIZE, width=SIZE,
                  latents=_nchw(latents), output_type="np").images
  finally:
    pipe.scheduler = scheduler
  got = np.asarray(ours.generate(PROMPTS, key=jax.random.key(0), num_steps=STEPS, guidance_scale=guidance_scale,
                                 latents=latents, **options))
  assert got.shape == want.shape == (len(PROMPTS), SIZE, SIZE, 3)
  assert float(np.max(np.abs(got - want))) <= TOL
  assert float(np.std(want)) > 1e-3


def test_t5_folder_and_bad_input_are_one_line_errors(saved, ours, tmp_path):
  folder = tmp_path / "with_t5"
  shutil.copytree(saved[0], folder)
  index = json.loads((folder / "model_index.json").read_text())
  index["text_encoder_3"] = ["transformers", "T5EncoderModel"]
  (folder / "model_index.json").write_text(json.dumps(index))
  with pytest.raises(ValueError, match="T5 is not supported by jdiff") as err:
    StableDiffusion3.from_diffusers(folder)
  assert "\n" not in str(err.value)
  with pytest.raises(ValueError, match="must be positive multiples of 4"):
    ours.generate(PROMPTS, key=jax.random.key(0), height=18, width=SIZE)
  with pytest.raises(ValueError, match="1 negative_prompts for 2 prompts"):
    ours.generate(PROMPTS, key=jax.random.key(0), negative_prompts=["x"])
