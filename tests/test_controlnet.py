"""ControlNet: zero-init exactness, frozen-plus-trainable training, and diffusers interop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdiff import partition
from jdiff.models import UNet, UNetConfig
from jdiff.models.controlnet import ControlNet, ControlNetConfig, combine_residuals, guidance_active, init_from_unet

CFG = UNetConfig.tiny(cross_attention_dim=16)
CN = ControlNetConfig(unet=CFG, conditioning_embedding_out_channels=(8, 16))


@pytest.fixture(scope="module")
def nets():
  unet, cn = UNet(CFG), ControlNet(CN)
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (2, 8, 8, 4))
  t = jnp.array([10, 500])
  ctx = jax.random.normal(k[1], (2, 3, 16))
  hint = jax.random.uniform(k[2], (2, 16, 16, 3))
  up = unet.init(k[3], x, t, ctx)["params"]
  cp = init_from_unet(up, cn, x, t, ctx, hint, key=jax.random.key(5))
  return unet, cn, up, cp, (x, t, ctx, hint)


def test_init_copies_the_encoder_and_leaves_the_unet_output_unchanged(nets):
  unet, cn, up, cp, (x, t, ctx, hint) = nets
  np.testing.assert_array_equal(cp["down_blocks_0"]["resnets_0"]["conv1"]["kernel"],
                                up["down_blocks_0"]["resnets_0"]["conv1"]["kernel"])
  down, mid = cn.apply({"params": cp}, x, t, ctx, hint)
  assert all(float(jnp.abs(d).max()) == 0.0 for d in down) and float(jnp.abs(mid).max()) == 0.0
  plain = unet.apply({"params": up}, x, t, ctx)
  steered = unet.apply({"params": up}, x, t, ctx, down_residuals=down, mid_residual=mid)
  np.testing.assert_array_equal(plain, steered)


def test_training_moves_only_the_controlnet(nets):
  unet, cn, up, cp, (x, t, ctx, hint) = nets
  params = {"unet": up, "controlnet": cp}
  labels = partition.labels(params, [(r"^controlnet/", "trainable"), (r"^unet/", "frozen")])
  train, frozen = partition.split(params, labels)
  tx = optax.adam(1e-2)
  opt_state = tx.init(train)
  assert partition.count(opt_state) == 2 * partition.count(cp) + 1  # mu, nu for ControlNet leaves + count
  frozen_before = jax.tree.map(np.array, frozen)
  target = jax.random.normal(jax.random.key(9), x.shape)

  def loss_fn(tr):
    p = partition.combine(tr, frozen)
    down, mid = cn.apply({"params": p["controlnet"]}, x, t, ctx, hint)
    out = unet.apply({"params": p["unet"]}, x, t, ctx, down_residuals=down, mid_residual=mid)
    return jnp.mean((out - target) ** 2)

  @jax.jit
  def step(tr, st):
    loss, g = jax.value_and_grad(loss_fn)(tr)
    upd, st = tx.update(g, st, tr)
    return optax.apply_updates(tr, upd), st, loss

  losses = []
  for _ in range(4):
    train, opt_state, loss = step(train, opt_state)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_before)):
    np.testing.assert_array_equal(a, b)
  moved = train["controlnet"]["controlnet_mid_block"]["kernel"]
  assert float(jnp.abs(moved).max()) > 0
  # the label-driven optimizer gives the same updates and keeps no state for frozen leaves
  mtx = partition.optimizer(optax.adam(1e-2), labels)
  full_state = mtx.init(params)
  assert partition.count(full_state) == partition.count(opt_state)


def test_scales_guess_mode_and_multi(nets):
  unet, cn, up, cp, (x, t, ctx, hint) = nets
  cp = jax.tree.map(lambda a: a + 0.01, cp)  # non-zero residuals
  down, mid = cn.apply({"params": cp}, x, t, ctx, hint)
  down2, mid2 = cn.apply({"params": cp}, x, t, ctx, hint, conditioning_scale=0.5)
  np.testing.assert_allclose(mid2, 0.5 * mid, rtol=1e-6)
  dg, mg = cn.apply({"params": cp}, x, t, ctx, hint, guess_mode=True)
  scales = 10.0 ** np.linspace(-1, 0, len(down) + 1)
  for d, dd, s in zip(dg, down, scales):
    np.testing.assert_allclose(d, s * dd, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(mg, mid, rtol=1e-6)
  cd, cm = combine_residuals([(down, mid), (down2, mid2)], [1.0, 2.0])
  np.testing.assert_allclose(cm, 2.0 * mid, rtol=1e-6)
  with pytest.raises(ValueError, match="control image must have shape"):
    cn.apply({"params": cp}, x, t, ctx, hint[:, :8])
  keep = [float(guidance_active(i, 10, 0.2, 0.8)) for i in range(10)]
  assert keep == [0, 0, 1, 1, 1, 1, 1, 1, 0, 0]


def test_partition_rules_must_cover_everything(nets):
  _, _, up, cp, _ = nets
  with pytest.raises(ValueError, match="covered by no partition rule"):
    partition.labels({"unet": up, "controlnet": cp}, [(r"^controlnet/", "trainable")])


@pytest.mark.slow  # a second UNet/ControlNet pair with a class embedding: ~45 s
def test_projection_class_embedding_is_copied_and_exact():
  """A UNet that adds a projected vector to its time embedding: the ControlNet copies that embedding."""
  cfg = UNetConfig.tiny(cross_attention_dim=16, class_embed_type="projection", projection_class_embeddings_input_dim=16)
  unet, cn = UNet(cfg), ControlNet(ControlNetConfig(unet=cfg, conditioning_embedding_out_channels=(8, 16)))
  x, t = jnp.ones((1, 8, 8, 4)), jnp.array([3])
  ctx, hint = jnp.ones((1, 2, 16)), jnp.zeros((1, 16, 16, 3))
  labels = jnp.mean(ctx, axis=1)
  up = unet.init(jax.random.key(0), x, t, ctx, class_labels=labels)["params"]
  cp = init_from_unet(up, cn, x, t, ctx, hint, class_labels=labels, key=jax.random.key(1))
  np.testing.assert_array_equal(cp["class_embedding"]["linear_1"]["kernel"], up["class_embedding"]["linear_1"]["kernel"])
  down, mid = cn.apply({"params": cp}, x, t, ctx, hint, class_labels=labels)
  out = unet.apply({"params": up}, x, t, ctx, class_labels=labels, down_residuals=down, mid_residual=mid)
  np.testing.assert_array_equal(out, unet.apply({"params": up}, x, t, ctx, class_labels=labels))
