"""The CPU fast paths of jdiff.models.layers compute what the generic implementations compute.

Each fast path (1x1 convolution as a matmul, convolution on inputs smaller than the kernel as an
im2col matmul, heads-major float32 attention, GEGLU's projection as two half matmuls) is checked
against an independent implementation: ``flax.linen.Conv`` (same parameter tree and initialisation,
same outputs and gradients), ``jax.nn.dot_product_attention`` and a split ``flax.linen.Dense``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff.models import layers


def _max_diff(a, b) -> float:
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _rel_diff(a, b) -> float:
  return max(float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-12))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


CONV_CASES = [
    # (input shape, kernel, stride, padding): which path
    ((3, 2, 2, 16), 3, 1, ((1, 1), (1, 1))),  # smaller than the kernel: im2col
    ((3, 1, 1, 16), 3, 1, ((1, 1), (1, 1))),  # 1x1 spatial: im2col
    ((3, 2, 2, 16), 3, 2, ((0, 1), (0, 1))),  # strided, asymmetric padding (VAE downsampler): im2col
    ((3, 2, 3, 16), 3, 2, ((1, 1), (1, 1))),  # non-square input: im2col
    ((3, 5, 5, 16), 3, 2, ((1, 1), (1, 1))),  # XLA convolution
    ((3, 4, 4, 16), 1, 1, ((0, 0), (0, 0))),  # 1x1 kernel: matmul
    ((3, 6, 6, 8), 3, 1, ((1, 1), (1, 1))),  # XLA convolution
]


@pytest.mark.parametrize("shape,kernel,stride,padding", CONV_CASES)
def test_conv2d_matches_flax_conv(shape, kernel, stride, padding):
  x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
  ref = nn.Conv(8, (kernel, kernel), strides=(stride, stride), padding=padding)
  ours = layers.Conv2D(8, kernel, stride=stride, padding=padding)
  p_ref = ref.init(jax.random.key(1), x)
  p_ours = ours.init(jax.random.key(1), x)
  assert jax.tree.structure(p_ref) == jax.tree.structure(p_ours)
  assert _max_diff(p_ours, p_ref) == 0.0  # same names, shapes and initialisation
  params = jax.tree.map(lambda a: a + 0.1, p_ref)  # a non-zero bias too
  y_ref, y = ref.apply(params, x), ours.apply(params, x)
  assert y.shape == y_ref.shape
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)

  def grads(module):
    return jax.grad(lambda p, x: jnp.sum(jnp.sin(module.apply(p, x))), argnums=(0, 1))(params, x)

  assert _rel_diff(grads(ours), grads(ref)) < 1e-5


def test_conv2d_im2col_float64_matches_finite_differences():
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 2, 2, 3)), jnp.float64)
    conv = layers.Conv2D(4, 3, padding=((1, 1), (1, 1)), dtype=jnp.float64, param_dtype=jnp.float64)
    params = conv.init(jax.random.key(0), x)
    f = lambda x: jnp.sum(jnp.sin(conv.apply(params, x)))
    g = jax.grad(f)(x)
    direction = jnp.asarray(rng.standard_normal(x.shape), jnp.float64)
    eps = 1e-6
    fd = (f(x + eps * direction) - f(x - eps * direction)) / (2 * eps)
    assert abs(float(jnp.sum(g * direction)) - float(fd)) < 1e-7 * max(1.0, abs(float(fd)))


def test_conv2d_rejects_non_nhwc_input():
  with pytest.raises(ValueError, match="NHWC"):
    layers.Conv2D(4, 3).init(jax.random.key(0), jnp.zeros((2, 3, 4)))


@pytest.mark.parametrize("tq,tk,heads", [(16, 16, 4), (16, 7, 2), (5, 9, 1)])
def test_heads_major_attention_matches_jax(tq, tk, heads):
  rng = np.random.default_rng(3)
  d = 8
  q = jnp.asarray(rng.standard_normal((3, tq, heads * d)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, tk, heads * d)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((3, tk, heads * d)), jnp.float32)

  def reference(q, k, v):
    r = lambda a: a.reshape(a.shape[0], a.shape[1], heads, d)
    out = jax.nn.dot_product_attention(r(q), r(k), r(v), scale=d ** -0.5, implementation="xla")
    return out.reshape(3, tq, heads * d)

  ours = lambda q, k, v: layers._attend(q, k, v, heads, upcast=False)
  np.testing.assert_allclose(np.asarray(ours(q, k, v)), np.asarray(reference(q, k, v)), rtol=1e-5, atol=1e-6)
  loss = lambda f: (lambda q, k, v: jnp.sum(jnp.cos(f(q, k, v))))
  g_ours = jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v)
  g_ref = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
  assert _rel_diff(g_ours, g_ref) < 1e-5


class _SplitDenseGEGLU(nn.Module):
  inner: int

  @nn.compact
  def __call__(self, x):
    a, g = jnp.split(nn.Dense(2 * self.inner, name="proj")(x), 2, axis=-1)
    return a * jax.nn.gelu(g, approximate=False)


def test_geglu_halves_match_split_dense():
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 5, 16)), jnp.float32)
  ref, ours = _SplitDenseGEGLU(32), layers.GEGLU(32)
  p_ref, p_ours = ref.init(jax.random.key(7), x), ours.init(jax.random.key(7), x)
  assert jax.tree.structure(p_ref) == jax.tree.structure(p_ours)
  assert _max_diff(p_ours, p_ref) == 0.0
  params = jax.tree.map(lambda a: a + 0.05, p_ref)
  np.testing.assert_allclose(np.asarray(ours.apply(params, x)), np.asarray(ref.apply(params, x)),
                             rtol=1e-6, atol=1e-6)

  def grads(module):
    return jax.grad(lambda p, x: jnp.sum(jnp.sin(module.apply(p, x))), argnums=(0, 1))(params, x)

  assert _rel_diff(grads(ours), grads(ref)) < 1e-5


def test_gelu_exact_matches_float64_and_jax():
  from scipy.special import erf

  x = np.linspace(-9.0, 9.0, 2001).astype(np.float32)
  xd = x.astype(np.float64)
  want = 0.5 * xd * (1.0 + erf(xd / np.sqrt(2.0)))
  dwant = 0.5 * (1.0 + erf(xd / np.sqrt(2.0))) + xd * np.exp(-0.5 * xd ** 2) / np.sqrt(2.0 * np.pi)
  got = np.asarray(layers.gelu_exact(jnp.asarray(x)), np.float64)
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
  dgot = np.asarray(jax.vmap(jax.grad(layers.gelu_exact))(jnp.asarray(x)), np.float64)
  np.testing.assert_allclose(dgot, dwant, rtol=2e-6, atol=2e-6)
  jax_gelu = np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=False))
  np.testing.assert_allclose(got, jax_gelu, rtol=2e-6, atol=2e-6)
