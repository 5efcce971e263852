"""LoRA files exchanged with diffusers/PEFT and kohya, checked on a tiny diffusers UNet."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from jdiff import convert, lora  # noqa: E402
from tests.parity.test_unet import SD1_LIKE, inputs, nhwc, nchw, perturb, rel_err  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  torch.manual_seed(0)
  model = diffusers.UNet2DConditionModel(**SD1_LIKE).eval()
  perturb(model, 3)
  folder = tmp_path_factory.mktemp("unet")
  model.save_pretrained(folder)
  module, params = convert.load_unet(folder)
  model.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="gaussian"))
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_B" in name:  # B starts at zero: give it values so the adapter matters
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))
  return model, module, params, tmp_path_factory.mktemp("lora"), folder


def _outputs(model, module, params, seed=0):
  x, t, ctx = inputs(SD1_LIKE, seed)
  with torch.no_grad():
    ref = nhwc(model(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
  got = module.apply({"params": params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx))
  return np.asarray(got), ref


def test_peft_lora_saved_by_diffusers_loads_in_jdiff(setup):
  model, module, params, d, _ = setup
  from peft.utils import get_peft_model_state_dict
  from diffusers.utils import convert_state_dict_to_diffusers
  state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
  diffusers.StableDiffusionPipeline.save_lora_weights(
      d / "from_diffusers", unet_lora_layers=state,
      unet_lora_adapter_metadata=model.peft_config["default"].to_dict())
  adapter = lora.load(d / "from_diffusers" / "pytorch_lora_weights.safetensors", {"unet": params})["unet"]
  assert len(adapter.factors) == sum(n.endswith("lora_A.default.weight") for n, _ in model.named_parameters())
  assert {s for _, s in adapter.scales} == {2.0}
  got, ref = _outputs(model, module, lora.merge(params, adapter))
  assert rel_err(got, ref) <= 1e-4
  base, _ = _outputs(model, module, params)
  assert rel_err(base, ref) > 1e-2  # the adapter changes the output, so the check above means something


def test_jdiff_lora_loads_in_diffusers(setup, tmp_path):
  _, module, params, _, folder = setup
  ad = lora.init(params, key=jax.random.key(0), rank=3, alpha=6.0)
  ad = lora.LoRA(factors={p: {"down": f["down"], "up": 0.3 * jax.random.normal(jax.random.key(i), f["up"].shape)}
                          for i, (p, f) in enumerate(sorted(ad.factors.items()))}, scales=ad.scales)
  lora.save_diffusers(tmp_path / "jdiff_lora.safetensors", {"unet": ad})
  fresh = diffusers.UNet2DConditionModel.from_pretrained(folder).eval()
  fresh.load_lora_adapter(str(tmp_path / "jdiff_lora.safetensors"), prefix="unet", adapter_name="j")
  got, ref = _outputs(fresh, module, lora.merge(params, ad))
  assert rel_err(got, ref) <= 1e-4


def test_kohya_file_converts_to_the_same_merged_weights(setup, tmp_path):
  """A kohya file (lora_down/lora_up/alpha per module) of the PEFT adapter merges to W + (alpha/r) B A."""
  model, module, params, _, _ = setup
  from safetensors.numpy import save_file
  tensors, expected = {}, {}
  sd = dict(model.named_parameters())
  for name in sd:
    if not name.endswith("lora_A.default.weight"):
      continue
    mod = name[: -len(".lora_A.default.weight")]
    a = sd[name].detach().numpy()
    b = sd[mod + ".lora_B.default.weight"].detach().numpy()
    base = "lora_unet_" + mod.replace(".", "_")
    tensors[base + ".lora_down.weight"] = a
    tensors[base + ".lora_up.weight"] = b
    tensors[base + ".alpha"] = np.asarray(5.0, np.float32)  # alpha / r = 1.25
    w = sd[mod + ".base_layer.weight"].detach().numpy().astype(np.float64)
    expected[mod] = (w + 1.25 * b.astype(np.float64) @ a.astype(np.float64)).T  # jdiff kernels are (in, out)
  save_file(tensors, str(tmp_path / "kohya.safetensors"))
  adapter = lora.load(tmp_path / "kohya.safetensors", {"unet": params})["unet"]
  merged = lora.merge(params, adapter)
  names = {lora.unet_namer(p): p for p in adapter.paths}
  assert set(names) == set(expected)
  for mod, want in expected.items():
    node = merged
    for k in names[mod].split("/"):
      node = node[k]
    np.testing.assert_allclose(np.asarray(node), want, rtol=1e-5, atol=1e-6)
