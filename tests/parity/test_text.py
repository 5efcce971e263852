"""CLIP text encoder parity with transformers' CLIPTextModel (PyTorch, float32) on tiny random models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jdiff.convert import _io
from jdiff.convert.text import load_text_encoder, save_text_encoder, text_param_shapes
from jdiff.models.text import CLIPTextConfig, CLIPTextModel

transformers = pytest.importorskip("transformers")

VOCAB = 100
LENGTH = 12

# sd1-like: quick_gelu and a legacy eos_token_id == 2 (pool at the largest id);
# sd2-like: gelu, eos inside the vocabulary but not its largest id (pool at the first eos).
CONFIGS = {
    "sd1": dict(hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1),
    "sd2": dict(hidden_act="gelu", bos_token_id=48, eos_token_id=50, pad_token_id=50),
}


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _ids(kind: str) -> np.ndarray:
  rng = np.random.default_rng(1)
  ids = rng.integers(3, VOCAB, size=(3, LENGTH))
  cfg = CONFIGS[kind]
  ids[ids == cfg["eos_token_id"]] = 7
  ids[:, 0] = cfg["bos_token_id"]
  for row, end in enumerate([4, 8, LENGTH - 1]):
    ids[row, end] = cfg["eos_token_id"]
    if kind == "sd2":
      ids[row, end + 1:] = cfg["pad_token_id"]  # pad == eos: pooling must pick the first one
    elif kind == "sd1":
      ids[row, end] = VOCAB - 1  # legacy pooling: the end-of-text token is the largest id
  return ids


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(request, tmp_path_factory):
  kind = request.param
  config = transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=37,
                                       num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=16,
                                       **CONFIGS[kind])
  torch.manual_seed(0)
  model = transformers.CLIPTextModel(config).eval()
  folder = tmp_path_factory.mktemp(f"clip_{kind}")
  model.save_pretrained(folder)
  return kind, model, folder


def test_forward_parity(reference):
  kind, torch_model, folder = reference
  model, params = load_text_encoder(folder)
  assert model.config.hidden_act == CONFIGS[kind]["hidden_act"]
  ids = _ids(kind)
  out = jax.jit(lambda p, i: model.apply({"params": p}, i, output_hidden_states=True))(params, jnp.asarray(ids))
  with torch.no_grad():
    ref = torch_model(torch.as_tensor(ids), output_hidden_states=True)
  assert out.last_hidden_state.shape == (3, LENGTH, 32)
  assert _rel(out.last_hidden_state, ref.last_hidden_state.numpy()) <= 1e-4
  assert _rel(out.pooler_output, ref.pooler_output.numpy()) <= 1e-4
  assert len(out.hidden_states) == len(ref.hidden_states) == 4
  for mine, theirs in zip(out.hidden_states, ref.hidden_states):
    assert _rel(mine, theirs.numpy()) <= 1e-4


def test_clip_skip_matches_diffusers_rule(reference):
  """diffusers' clip_skip: final_layer_norm(hidden_states[-(clip_skip + 1)])."""
  kind, torch_model, folder = reference
  model, params = load_text_encoder(folder)
  ids = _ids(kind)
  out = model.apply({"params": params}, jnp.asarray(ids), clip_skip=1)
  with torch.no_grad():
    hidden = torch_model(torch.as_tensor(ids), output_hidden_states=True).hidden_states[-2]
    want = torch_model.final_layer_norm(hidden).numpy()
  assert _rel(out.last_hidden_state, want) <= 1e-4


def test_attention_mask_parity(reference):
  kind, torch_model, folder = reference
  model, params = load_text_encoder(folder)
  ids = _ids(kind)
  mask = np.ones_like(ids)
  mask[0, 6:] = 0
  mask[1, 10:] = 0
  out = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  with torch.no_grad():
    ref = torch_model(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
  valid = mask.astype(bool)  # padded query rows are unspecified in transformers' masking; compare the rest
  assert _rel(np.asarray(out.last_hidden_state)[valid], ref.last_hidden_state.numpy()[valid]) <= 1e-4


def test_save_loads_in_transformers(reference, tmp_path):
  kind, torch_model, folder = reference
  model, params = load_text_encoder(folder)
  params = jax.tree.map(lambda p: p * 1.01, params)  # make sure saved values, not the originals, load
  save_text_encoder(model, {"params": params}, tmp_path, max_shard_size="8KB")
  assert (tmp_path / "model.safetensors.index.json").is_file()
  assert all(k.startswith("text_model.") for k in _io.load_tensors(tmp_path, "model"))
  reloaded = transformers.CLIPTextModel.from_pretrained(tmp_path).eval()
  ids = _ids(kind)
  with torch.no_grad():
    ref = reloaded(torch.as_tensor(ids))
  out = model.apply({"params": params}, jnp.asarray(ids))
  assert _rel(out.last_hidden_state, ref.last_hidden_state.numpy()) <= 1e-4
  assert _rel(out.pooler_output, ref.pooler_output.numpy()) <= 1e-4


def test_load_errors_name_the_tensor(reference, tmp_path):
  _, _, folder = reference
  tensors = _io.load_tensors(folder, "model")
  _io.write_config(tmp_path, _io.read_config(folder))
  bad = dict(tensors)
  bad["encoder.layers.1.mlp.fc1.weight"] = np.zeros((5, 32), np.float32)
  _io.save_tensors(bad, tmp_path, prefix="model")
  with pytest.raises(ValueError, match=r"encoder.layers.1.mlp.fc1.weight' has shape \(5, 32\)"):
    load_text_encoder(tmp_path)
  del bad["encoder.layers.1.mlp.fc1.weight"]
  _io.save_tensors(bad, tmp_path, prefix="model")
  with pytest.raises(ValueError, match="missing tensor 'encoder.layers.1.mlp.fc1.weight'"):
    load_text_encoder(tmp_path)


def test_bfloat16_compute_close_to_float32(reference):
  kind, _, folder = reference
  model, params = load_text_encoder(folder)
  model16, _ = load_text_encoder(folder, dtype="bfloat16", remat=True)
  ids = jnp.asarray(_ids(kind))
  ref = model.apply({"params": params}, ids).last_hidden_state
  out = model16.apply({"params": params}, ids).last_hidden_state
  assert out.dtype == jnp.bfloat16
  assert _rel(out.astype(jnp.float32), ref) < 5e-2


def test_presets_parameter_counts():
  """Abstract init (no allocation) gives the known sizes of the SD 1.x and SD 2.x text encoders."""
  count = lambda cfg: sum(int(np.prod(s)) for s in text_param_shapes(cfg).values())
  assert count(CLIPTextConfig.sd15()) == 123_060_480  # openai/clip-vit-large-patch14 text tower
  assert count(CLIPTextConfig.sd21()) == 340_387_840  # OpenCLIP ViT-H text tower, 23 blocks


def test_config_validation():
  with pytest.raises(ValueError, match="hidden_act"):
    CLIPTextConfig(hidden_act="relu6")
  with pytest.raises(ValueError, match="model_type"):
    CLIPTextConfig.from_hf_config({"model_type": "t5"})
  cfg = CLIPTextConfig.from_hf_config({"model_type": "clip", "text_config": {"hidden_size": 64,
                                                                             "num_attention_heads": 2}})
  assert cfg.hidden_size == 64 and cfg.head_dim == 32
  model = CLIPTextModel(CLIPTextConfig.tiny())
  with pytest.raises(ValueError, match="max_position_embeddings"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 17), jnp.int32))
