"""Textual inversion against diffusers' ``load_textual_inversion`` on a tiny random StableDiffusionPipeline:
a single-vector diffusers ``learned_embeds.safetensors`` and a two-vector A1111 ``emb_params`` file, loaded
into both; prompt token ids equal, prompt embeddings to 1e-4 relative (the text encoder's bound in
``tests/parity/__init__.py``), a short DDIM generation as ``tests/parity/test_pipeline.py`` checks it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import save_file  # noqa: E402

from jdiff.pipelines import StableDiffusion  # noqa: E402
from jdiff.textual_inversion import add_tokens, load_textual_inversion, read_embeddings  # noqa: E402
from jdiff.tokenizers import CLIPTokenizer  # noqa: E402
from tests.parity.test_pipeline import _latents, _reference, build_tiny_sd_pipeline  # noqa: E402

WIDTH = 32  # the tiny text encoder's hidden size
PROMPTS = ["a photo of <cat-toy> in wavy-style", "wavy-style<cat-toy>, wavy-style!", "a plain prompt"]


def _rel(a, b):
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("ti")
  build_tiny_sd_pipeline(root / "sd")
  rng = np.random.default_rng(7)
  (root / "cat").mkdir()
  save_file({"<cat-toy>": rng.standard_normal((1, WIDTH)).astype(np.float32)},
            str(root / "cat" / "learned_embeds.safetensors"))
  save_file({"emb_params": rng.standard_normal((2, WIDTH)).astype(np.float32)}, str(root / "wavy-style.safetensors"))
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(root / "sd", safety_checker=None,
                                                           requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  pipe.load_textual_inversion(str(root / "cat"), local_files_only=True)
  pipe.load_textual_inversion(str(root / "wavy-style.safetensors"), token="wavy-style", local_files_only=True)
  ours = StableDiffusion.from_diffusers(root / "sd")
  ours = load_textual_inversion(ours, root / "cat")
  ours = load_textual_inversion(ours, root / "wavy-style.safetensors")  # token from the file name
  return root, pipe, ours


def test_prompt_ids_and_embeddings_match_diffusers(setup):
  _, pipe, ours = setup
  converted = pipe.maybe_convert_prompt(PROMPTS, pipe.tokenizer)
  want_ids = pipe.tokenizer(converted, padding="max_length", max_length=77, truncation=True).input_ids
  got_ids = ours.tokenize(PROMPTS)
  np.testing.assert_array_equal(got_ids, np.asarray(want_ids))
  assert (got_ids >= ours.tokenizer.vocab_size - 3).sum() == 2 + 2 * 3  # <cat-toy> x2, wavy-style (2 ids) x3
  with torch.no_grad():
    want, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
  got = np.asarray(ours.encode_prompts(PROMPTS))
  assert got.shape == tuple(want.shape)
  assert _rel(got, want.numpy()) <= 1e-4


def test_generate_with_embedding_matches_diffusers(setup):
  _, pipe, ours = setup
  prompts = PROMPTS[:2]
  latents = _latents(len(prompts))
  want = _reference(pipe, latents, prompt=prompts, num_inference_steps=2, guidance_scale=7.5)
  got = ours.generate(prompts, key=jax.random.key(0), num_steps=2, guidance_scale=7.5, latents=jnp.asarray(latents))
  assert float(np.max(np.abs(np.asarray(got) - want))) <= 1e-3  # test_pipeline.py's image bound


def test_read_formats_and_tokenizer_round_trip(setup, tmp_path):
  root, pipe, ours = setup
  emb = read_embeddings(root / "wavy-style.safetensors", token="<w>")
  assert list(emb) == ["<w>"] and emb["<w>"].shape == (2, WIDTH)
  save_file({"emb_params": np.ones((3, WIDTH), np.float32)}, str(tmp_path / "x.safetensors"),
            metadata={"name": "<named>"})
  assert list(read_embeddings(tmp_path / "x.safetensors")) == ["<named>"]
  save_file({"<v>": np.ones((WIDTH,), np.float32)}, str(tmp_path / "v.safetensors"))
  assert read_embeddings(tmp_path / "v.safetensors")["<v>"].shape == (1, WIDTH)
  # the added tokens survive save_pretrained, for transformers and for jdiff
  ours.tokenizer.save_pretrained(tmp_path / "tok")
  ref = transformers.CLIPTokenizer.from_pretrained(tmp_path / "tok")
  again = CLIPTokenizer.from_pretrained(tmp_path / "tok")
  assert again.added == ours.tokenizer.added
  converted = pipe.maybe_convert_prompt(PROMPTS, ref)
  want = ref(converted, padding="max_length", max_length=77).input_ids
  np.testing.assert_array_equal(again(PROMPTS), np.asarray(want))


def test_bad_inputs_one_line(setup, tmp_path):
  root, _, ours = setup
  (tmp_path / "emb.pt").write_bytes(b"\x80\x04not opened")
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "learned_embeds.bin").write_bytes(b"\x80\x04not opened")
  save_file({"<wide>": np.zeros((1, 48), np.float32)}, str(tmp_path / "wide.safetensors"))
  save_file({"clip_l": np.zeros((1, WIDTH), np.float32), "clip_g": np.zeros((1, 64), np.float32)},
            str(tmp_path / "xl.safetensors"))
  cases = [(tmp_path / "emb.pt", "pickle"), (tmp_path / "old", "pickle"), (tmp_path / "wide.safetensors", "width 48"),
           (tmp_path / "xl.safetensors", "one embedding"), (root / "cat", "already in the tokenizer")]
  for path, match in cases:
    with pytest.raises(ValueError, match=match) as err:
      load_textual_inversion(ours, path)
    assert "\n" not in str(err.value)
  with pytest.raises(FileNotFoundError):
    read_embeddings(tmp_path / "missing.safetensors")
  with pytest.raises(ValueError, match="CLIP BPE"):
    add_tokens(object(), ours.text_params, {"<x>": np.zeros((WIDTH,))})
