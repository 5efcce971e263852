"""UNet / AutoencoderKL properties that need no PyTorch: parameter counts of the real configs (abstract
init), compute dtypes, remat, dropout, the timestep embedding and the Gaussian posterior in closed form,
and input validation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff.convert import unet_param_shapes, vae_param_shapes
from jdiff.models import AutoencoderKL, CLIPTextConfig, DiagonalGaussian, UNet, UNetConfig, VAEConfig, layers

# One level, no downsampling: the cheapest UNet that still has every kind of block.
MINI = dict(sample_size=8, block_out_channels=(32,), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
            cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8)


def count(shapes) -> int:
  return sum(math.prod(s) for s in shapes.values())


def random_params(module, *args, seed=0):
  """Random parameters of the right shapes without compiling ``init``: kernels ~ N(0, 1/fan_in),
  everything else ~ 1 + N(0, 0.1^2) (scales) or N(0, 0.1^2)."""
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    z = rng.standard_normal(leaf.shape).astype(np.float32)
    if name == "kernel":
      return z / np.float32(math.sqrt(math.prod(leaf.shape[:-1])))
    return np.float32(0.1) * z + np.float32(name == "scale")

  return jax.tree_util.tree_map_with_path(draw, abstract)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_sd15_unet_parameter_count_abstract():
  # Published sizes: SD 1.x UNet 859,520,964; SD 2.x UNet 865,910,724; SD VAE 83,653,863.
  assert count(unet_param_shapes(UNetConfig.sd15())) == 859_520_964
  assert count(unet_param_shapes(UNetConfig.sd21())) == 865_910_724
  assert count(vae_param_shapes(VAEConfig.sd15())) == 83_653_863


def test_sd15_eval_shape_allocates_nothing_and_is_float32_under_bf16():
  cfg = UNetConfig.sd15(dtype="bfloat16", remat=True)
  x, t, c = jnp.zeros((1, 64, 64, 4)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 77, 768))
  abstract = jax.eval_shape(lambda: UNet(cfg).init(jax.random.key(0), x, t, c))
  leaves = jax.tree.leaves(abstract)
  assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
  assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.float32)}
  assert sum(leaf.size for leaf in leaves) == 859_520_964
  out = jax.eval_shape(lambda p: UNet(cfg).apply(p, x, t, c), abstract)
  assert out.shape == (1, 64, 64, 4) and out.dtype == jnp.float32


@pytest.fixture(scope="module")
def tiny_unet():
  cfg = UNetConfig.tiny()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
  t = np.array([10, 900], np.int32)
  ctx = rng.standard_normal((2, 7, cfg.cross_attention_dim)).astype(np.float32)
  return cfg, random_params(UNet(cfg), x, t, ctx), (x, t, ctx)


def test_bfloat16_compute_is_close_to_float32(tiny_unet):
  cfg, params, (x, t, ctx) = tiny_unet
  ref = jax.jit(UNet(cfg).apply)({"params": params}, x, t, ctx)
  bf16 = UNet(UNetConfig.tiny(dtype="bfloat16"))
  low = jax.jit(bf16.apply)({"params": params}, x, t, ctx)
  assert low.dtype == jnp.float32 and low.shape == ref.shape
  err = rel_err(low, ref)
  assert 1e-5 < err < 5e-2  # really computed in bfloat16, and still close
  assert np.isfinite(np.asarray(low)).all()


@pytest.fixture(scope="module")
def mini_unet():
  cfg = UNetConfig(**MINI, dropout=0.3)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
  t = np.array([5], np.int32)
  ctx = rng.standard_normal((1, 3, 16)).astype(np.float32)
  return cfg, random_params(UNet(cfg), x, t, ctx), (x, t, ctx)


@pytest.mark.slow  # compiles remat variants: ~20 s; test_remat_policies_save_what_they_name runs in the quick suite
def test_remat_and_dropout_forward(mini_unet):
  """remat keeps values (dropout on, same rng: the masks match); dropout acts only in training."""
  cfg, params, (x, t, ctx) = mini_unet
  rngs = {"dropout": jax.random.key(7)}
  run = lambda c, train: jax.jit(lambda p: UNet(c).apply({"params": p}, x, t, ctx, train=train,
                                                          rngs=rngs))(params)
  plain = run(cfg, True)
  remat = run(UNetConfig(**MINI, dropout=0.3, remat=True), True)
  np.testing.assert_allclose(remat, plain, rtol=1e-5, atol=1e-6)
  evaluated = run(cfg, False)
  assert rel_err(evaluated, plain) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("policy", [True, "matmuls", "weights"])
def test_remat_gradients_match(mini_unet, policy):
  cfg, params, (x, t, ctx) = mini_unet
  rngs = {"dropout": jax.random.key(7)}

  def loss(p, module):
    return jnp.mean(jnp.square(module.apply({"params": p}, x, t, ctx, train=True, rngs=rngs)))

  plain = jax.jit(jax.value_and_grad(lambda p: loss(p, UNet(cfg))))(params)
  remat_cfg = UNetConfig(**MINI, dropout=0.3, remat=policy)
  remat = jax.jit(jax.value_and_grad(lambda p: loss(p, UNet(remat_cfg))))(params)
  np.testing.assert_allclose(remat[0], plain[0], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), remat[1], plain[1])


def test_remat_policies_save_what_they_name(mini_unet):
  """What the backward pass keeps, by policy: everything > matmul outputs >= weight-matmul outputs >
  block inputs only (bytes of the residuals that jax.vjp's backward function holds)."""
  _, params, (x, t, ctx) = mini_unet

  def saved_bytes(remat):
    module = UNet(UNetConfig(**MINI, remat=remat))
    f = lambda p: jnp.mean(module.apply({"params": p}, x, t, ctx))
    backward = jax.jit(lambda p: jax.vjp(f, p)[1])(params)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(backward))

  none, matmuls, weights, full = (saved_bytes(r) for r in (False, "matmuls", "weights", True))
  assert none > matmuls >= weights > full, (none, matmuls, weights, full)
  assert saved_bytes("full") == full


@pytest.mark.parametrize("make", [lambda r: UNetConfig(**MINI, remat=r), lambda r: VAEConfig.tiny(remat=r),
                                  lambda r: CLIPTextConfig(remat=r)])
def test_unknown_remat_policy_is_refused(make):
  for ok in (False, True, "full", "matmuls", "weights"):
    make(ok)
  with pytest.raises(ValueError, match="remat='dots'.*matmuls"):
    make("dots")


@pytest.mark.parametrize("flip,shift,dim", [(True, 0, 320), (False, 1, 33)])
def test_timestep_embedding_closed_form(flip, shift, dim):
  t = np.array([0.0, 1.0, 37.5, 999.0])
  half = dim // 2
  freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - shift))
  args = t[:, None] * freqs[None, :]
  want = np.concatenate([np.cos(args), np.sin(args)] if flip else [np.sin(args), np.cos(args)], axis=1)
  if dim % 2:
    want = np.pad(want, ((0, 0), (0, 1)))
  got = layers.timestep_embedding(jnp.asarray(t, jnp.float32), dim, flip_sin_to_cos=flip,
                                  freq_shift=shift)
  assert got.shape == (4, dim)
  np.testing.assert_allclose(got, want, atol=2e-4)  # float32 phase of t * freq for t ~ 1000


def test_diagonal_gaussian_closed_form():
  rng = np.random.default_rng(2)
  moments = rng.standard_normal((3, 4, 4, 8)) * 2
  moments[0, 0, 0, 4] = -50.0  # clipped to -30
  post = DiagonalGaussian.from_moments(jnp.asarray(moments, jnp.float32))
  mean, logvar = moments[..., :4], np.clip(moments[..., 4:], -30, 20)
  np.testing.assert_allclose(post.mean, mean, rtol=1e-6)
  np.testing.assert_allclose(post.logvar, logvar, rtol=1e-6)
  kl = 0.5 * np.sum(mean ** 2 + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3))
  np.testing.assert_allclose(post.kl(), kl, rtol=1e-5)
  np.testing.assert_array_equal(post.mode(), post.mean)
  noise = rng.standard_normal(mean.shape).astype(np.float32)
  np.testing.assert_allclose(post.reparameterize(noise), mean + np.exp(0.5 * logvar) * noise,
                             rtol=1e-5, atol=1e-6)
  grads = jax.grad(lambda m: jnp.sum(DiagonalGaussian.from_moments(m).sample(key=jax.random.key(0))))(
      jnp.asarray(moments, jnp.float32))
  np.testing.assert_allclose(grads[..., :4], 1.0)  # d sample / d mean = 1 (reparameterised)


def test_digits_presets_fit_together():
  vae_cfg, unet_cfg = VAEConfig.digits(), UNetConfig.digits()
  vae = AutoencoderKL(vae_cfg)
  x = jnp.zeros((2, 32, 32, vae_cfg.in_channels))
  params = jax.eval_shape(lambda: vae.init(jax.random.key(0), x))
  post = jax.eval_shape(lambda p: vae.apply(p, x, method=AutoencoderKL.encode), params)
  assert post.mean.shape == (2, 8, 8, unet_cfg.in_channels)
  ctx = jnp.zeros((2, 9, unet_cfg.cross_attention_dim))
  n = count(unet_param_shapes(unet_cfg))
  assert 1e6 < n < 2e7  # small enough to train on CPU
  out = jax.eval_shape(lambda: UNet(unet_cfg).init_with_output(
      jax.random.key(0), jnp.zeros(post.mean.shape), jnp.zeros((2,)), ctx)[0])
  assert out.shape == post.mean.shape


def test_vae_bfloat16_decode_close_to_float32():
  cfg = VAEConfig.tiny()
  z = np.random.default_rng(3).standard_normal((1, 16, 16, 4)).astype(np.float32)
  params = random_params(AutoencoderKL(cfg), jnp.zeros((1, 32, 32, 3)))
  dec = lambda c: jax.jit(lambda p, z: AutoencoderKL(c).apply({"params": p}, z, method="decode"))
  ref = dec(cfg)(params, z)
  low = dec(VAEConfig.tiny(dtype="bfloat16"))(params, z)
  assert low.dtype == jnp.float32 and 1e-5 < rel_err(low, ref) < 5e-2


def test_input_validation_messages(tiny_unet):
  cfg, params, (x, t, ctx) = tiny_unet
  unet = UNet(cfg)
  with pytest.raises(ValueError, match="expects 4 input channels"):
    jax.eval_shape(lambda: unet.apply({"params": params}, x[..., :3], t, ctx))
  with pytest.raises(ValueError, match="divisible by 2"):
    jax.eval_shape(lambda: unet.apply({"params": params}, x[:, :15, :15], t, ctx))
  with pytest.raises(ValueError, match="down_residuals has 1 tensors, the UNet has 4"):
    jax.eval_shape(lambda: unet.apply({"params": params}, x, t, ctx, down_residuals=[x]))
  with pytest.raises(ValueError, match="timesteps must have shape"):
    jax.eval_shape(lambda: unet.apply({"params": params}, x, t[:1], ctx))
  with pytest.raises(ValueError, match="cannot be split into 3 attention heads"):
    UNetConfig.tiny(attention_head_dim=3)
  with pytest.raises(ValueError, match="unknown UNet preset 'sd3'"):
    UNetConfig.preset("sd3")
  with pytest.raises(ValueError, match="class-conditional"):
    c2 = UNetConfig.tiny(num_class_embeds=3)
    jax.eval_shape(lambda: UNet(c2).init(jax.random.key(0), x, t, ctx))
  with pytest.raises(ValueError, match=r"VAE expects images \[B, H, W, 3\]"):
    jax.eval_shape(lambda: AutoencoderKL(VAEConfig.tiny()).init(jax.random.key(0), x))
