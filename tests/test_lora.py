"""LoRA as a parameter-tree transformation: algebra, training isolation, and file formats."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdiff import lora


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Conv(6, (3, 3), name="conv_in")(x)
    b, hh, ww, c = h.shape
    seq = h.reshape(b, hh * ww, c)
    q = nn.Dense(6, name="to_q")(seq)
    k = nn.Dense(6, name="to_k")(seq)
    v = nn.Dense(6, name="to_v")(seq)
    a = jax.nn.dot_product_attention(q[:, :, None], k[:, :, None], v[:, :, None])[:, :, 0]
    out = nn.Dense(6, name="to_out_0")(a)
    return nn.Dense(3, name="proj")(out).reshape(b, hh, ww, 3)


@pytest.fixture(scope="module")
def model():
  m = Block()
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  params = m.init(jax.random.key(1), x)["params"]
  return m, params, x


def _randomize_up(adapter, key):
  f = {p: {"down": v["down"], "up": 0.3 * jax.random.normal(jax.random.fold_in(key, i), v["up"].shape)}
       for i, (p, v) in enumerate(sorted(adapter.factors.items()))}
  return lora.LoRA(factors=f, scales=adapter.scales)


def test_targets_and_zero_init(model):
  m, params, x = model
  ad = lora.init(params, key=jax.random.key(2), rank=2, alpha=4)
  assert ad.paths == ["to_k/kernel", "to_out_0/kernel", "to_q/kernel", "to_v/kernel"]
  assert ad.scale_of("to_q/kernel") == 2.0
  merged = lora.merge(params, ad)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)  # B = 0: the model is unchanged
  conv = lora.init(params, key=jax.random.key(2), rank=3, targets=("conv_in",))
  assert conv.factors["conv_in/kernel"]["down"].shape == (3, 3, 3, 3)
  assert conv.factors["conv_in/kernel"]["up"].shape == (3, 6)
  with pytest.raises(ValueError, match="no kernel matches"):
    lora.init(params, key=jax.random.key(0), targets=("nothing",))


def test_merged_equals_unmerged_computation(model):
  """Merged weights give the same output as evaluating W x + (alpha/r) B A x explicitly."""
  m, params, x = model
  ad = _randomize_up(lora.init(params, key=jax.random.key(3), rank=2, alpha=3, targets=("to_q", "conv_in")), jax.random.key(4))
  merged_out = m.apply({"params": lora.merge(params, ad, scale=0.7)}, x)

  class Explicit(nn.Module):
    @nn.compact
    def __call__(self, x):
      fq = ad.factors["to_q/kernel"]
      fc = ad.factors["conv_in/kernel"]
      s = 1.5 * 0.7
      h = nn.Conv(6, (3, 3), name="conv_in")(x)
      h = h + s * jax.lax.conv_general_dilated(
          jax.lax.conv_general_dilated(x, fc["down"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")),
          fc["up"][None, None], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      b, hh, ww, c = h.shape
      seq = h.reshape(b, hh * ww, c)
      q = nn.Dense(6, name="to_q")(seq) + s * (seq @ fq["down"]) @ fq["up"]
      k = nn.Dense(6, name="to_k")(seq)
      v = nn.Dense(6, name="to_v")(seq)
      a = jax.nn.dot_product_attention(q[:, :, None], k[:, :, None], v[:, :, None])[:, :, 0]
      out = nn.Dense(6, name="to_out_0")(a)
      return nn.Dense(3, name="proj")(out).reshape(b, hh, ww, 3)

  explicit = Explicit().apply({"params": params}, x)
  np.testing.assert_allclose(merged_out, explicit, rtol=1e-5, atol=1e-5)


def test_merge_unmerge_round_trip_and_many(model):
  _, params, _ = model
  a = _randomize_up(lora.init(params, key=jax.random.key(5), rank=4, alpha=8), jax.random.key(6))
  b = _randomize_up(lora.init(params, key=jax.random.key(7), rank=2, alpha=2), jax.random.key(8))
  back = lora.unmerge(lora.merge(params, a, 0.8), a, 0.8)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_allclose(x, y, atol=1e-6)
  both = lora.merge_many(params, [(a, 0.8), (b, 0.5)])
  seq = lora.merge(lora.merge(params, a, 0.8), b, 0.5)
  for x, y in zip(jax.tree.leaves(both), jax.tree.leaves(seq)):
    np.testing.assert_allclose(x, y, atol=1e-6)
  w = np.asarray(params["to_v"]["kernel"], np.float64)
  fa, fb = a.factors["to_v/kernel"], b.factors["to_v/kernel"]
  want = w + 0.8 * 2.0 * np.asarray(fa["down"], np.float64) @ np.asarray(fa["up"], np.float64) \
      + 0.5 * 1.0 * np.asarray(fb["down"], np.float64) @ np.asarray(fb["up"], np.float64)
  np.testing.assert_allclose(both["to_v"]["kernel"], want, rtol=1e-5, atol=1e-6)


def test_training_touches_only_the_factors(model):
  m, params, x = model
  base = jax.tree.map(np.array, params)
  ad = lora.init(params, key=jax.random.key(9), rank=2, alpha=2)
  opt = optax.adam(1e-2)
  opt_state = opt.init(ad.factors)
  # adam holds mu and nu for the factors only, plus its step count
  assert lora.num_params(opt_state) == 2 * lora.num_params(ad.factors) + 1
  target = jnp.ones((2, 4, 4, 3))

  @jax.jit
  def step(factors, opt_state, k):
    def loss_fn(f):
      merged = lora.merge(params, lora.LoRA(factors=f, scales=ad.scales), dropout=0.25, key=k)
      return jnp.mean((m.apply({"params": merged}, x) - target) ** 2)
    loss, g = jax.value_and_grad(loss_fn)(factors)
    upd, opt_state = opt.update(g, opt_state)
    return optax.apply_updates(factors, upd), opt_state, loss

  factors = ad.factors
  losses = []
  for i in range(20):
    factors, opt_state, loss = step(factors, opt_state, jax.random.key(i))
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(base)):
    np.testing.assert_array_equal(a, b)  # the base is bit-identical
  assert float(jnp.abs(factors["to_q/kernel"]["up"]).max()) > 0


def test_kohya_round_trip_matches_merged_weights(tmp_path, model, monkeypatch):
  _, params, _ = model
  # Name modules as diffusers would for this toy tree: the path without "/kernel".
  monkeypatch.setitem(lora._COMPONENTS, "unet", lambda p: p.rsplit("/", 1)[0].replace("/", "."))
  ad = _randomize_up(lora.init(params, key=jax.random.key(10), rank=3, alpha=1.5, targets=("to_q", "conv_in")),
                     jax.random.key(11))
  lora.save_kohya(tmp_path / "k.safetensors", {"unet": ad})
  from safetensors.numpy import load_file
  raw = load_file(tmp_path / "k.safetensors")
  assert set(raw) == {f"lora_unet_{m}.{s}" for m in ("to_q", "conv_in") for s in ("lora_down.weight", "lora_up.weight", "alpha")}
  assert raw["lora_unet_conv_in.lora_down.weight"].shape == (3, 3, 3, 3)  # [r, in, kh, kw]
  assert raw["lora_unet_conv_in.lora_up.weight"].shape == (6, 3, 1, 1)
  back = lora.load(tmp_path / "k.safetensors", {"unet": params})["unet"]
  for x, y in zip(jax.tree.leaves(lora.merge(params, back)), jax.tree.leaves(lora.merge(params, ad))):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  lora.save_diffusers(tmp_path / "d.safetensors", {"unet": ad})
  back = lora.load(tmp_path / "d.safetensors", {"unet": params})["unet"]
  for x, y in zip(jax.tree.leaves(lora.merge(params, back)), jax.tree.leaves(lora.merge(params, ad))):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_file_errors(tmp_path, model):
  _, params, _ = model
  with pytest.raises(FileNotFoundError, match="not found"):
    lora.load(tmp_path / "missing.safetensors", {"unet": params})
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
  with pytest.raises(ValueError, match="not a readable safetensors"):
    lora.load(bad, {"unet": params})
  with pytest.raises(ValueError, match="never unpickled"):
    p = tmp_path / "x.bin"
    p.write_bytes(b"0")
    lora.load(p, {"unet": params})
