"""StableDiffusionXL.save_pretrained: the tiny random base and refiner folders of ``test_sdxl_pipeline.py`` are
loaded, written back, and read by diffusers' own ``from_pretrained`` (every tensor bit-identical to the
original folder's, the tokenizers giving the same ids, the pipeline flags kept) and by
``StableDiffusionXL.from_diffusers`` (every parameter bit-identical to the bundle's). Exact equality: the
round trip copies float32 tensors without arithmetic.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jdiff.sdxl import StableDiffusionXL  # noqa: E402
from tests.parity.test_sdxl_pipeline import PROMPTS, folders  # noqa: E402,F401  (module fixture)

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _state(pipe, part):
  return {k: v.numpy() for k, v in getattr(pipe, part).state_dict().items()}


def _assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_save_pretrained_round_trip(folders, which, tmp_path):  # noqa: F811
  src = folders[0] if which == "base" else folders[1]
  cls = diffusers.StableDiffusionXLPipeline if which == "base" else diffusers.StableDiffusionXLImg2ImgPipeline
  pipe = StableDiffusionXL.from_diffusers(src)
  out = pipe.save_pretrained(tmp_path / "out")

  index = json.loads((out / "model_index.json").read_text())
  assert index["_class_name"] == cls.__name__
  assert index["force_zeros_for_empty_prompt"] == pipe.force_zeros_for_empty_prompt
  ref = cls.from_pretrained(src, add_watermarker=False)
  got = cls.from_pretrained(out, add_watermarker=False)
  assert got.config.force_zeros_for_empty_prompt == ref.config.force_zeros_for_empty_prompt
  if which == "refiner":
    assert got.text_encoder is None and got.tokenizer is None and got.config.requires_aesthetics_score
  for part in PARTS if which == "base" else ("unet", "vae", "text_encoder_2"):
    want, have = _state(ref, part), _state(got, part)
    assert sorted(have) == sorted(want), part
    for k in want:
      np.testing.assert_array_equal(have[k], want[k], err_msg=f"{part}.{k}")
  for tok in ("tokenizer", "tokenizer_2") if which == "base" else ("tokenizer_2",):
    assert getattr(got, tok)(PROMPTS).input_ids == getattr(ref, tok)(PROMPTS).input_ids
  assert type(got.scheduler) is type(ref.scheduler)
  assert dict(got.scheduler.config) == dict(ref.scheduler.config)

  back = StableDiffusionXL.from_diffusers(out)
  _assert_same_tree(back.unet_params, pipe.unet_params)
  _assert_same_tree(back.vae_params, pipe.vae_params)
  _assert_same_tree(back.text_params_2, pipe.text_params_2)
  _assert_same_tree(back.text_params, pipe.text_params)
  assert back.unet.config == pipe.unet.config and back.text_encoder_2.config == pipe.text_encoder_2.config
  assert (back.force_zeros_for_empty_prompt, back.requires_aesthetics_score) == \
      (pipe.force_zeros_for_empty_prompt, pipe.requires_aesthetics_score)
  assert back.defaults == pipe.defaults and back.scheduler_config == pipe.scheduler_config
  for a, b in zip(back.tokenize(PROMPTS), pipe.tokenize(PROMPTS)):
    np.testing.assert_array_equal(a, b)
