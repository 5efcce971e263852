"""Memory of the train step: donation and in-place updates (XLA memory analysis), low-precision state."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdiff import parallel, training


class Stack(nn.Module):
  @nn.compact
  def __call__(self, x):
    for _ in range(8):
      x = nn.gelu(nn.Dense(512)(x)) + x
    return x


MODEL = Stack()
X = jnp.zeros((8, 512), jnp.float32)


def loss_fn(params, batch, key, frozen):
  del key, frozen
  return jnp.mean(jnp.square(MODEL.apply({"params": params}, batch["x"]))), {}


def _abstract_state(tx):
  params = jax.eval_shape(lambda: MODEL.init(jax.random.key(0), X)["params"])

  def init():
    p = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    return training.TrainState(step=jnp.int32(0), params=p, ema_params=p, opt_state=tx.init(p),
                               rng=jnp.zeros(2, jnp.uint32), bad_steps=jnp.int32(0), skipped_steps=jnp.int32(0))

  return params, jax.eval_shape(init)


@pytest.mark.parametrize("moments", [None, "bfloat16"])
def test_fused_step_temporaries_are_gradients_and_activations_only(moments):
  """The compiled step's temporaries beyond what value_and_grad alone needs (gradients + activations)
  stay under 10% of the parameter bytes: the guard, AdamW and the EMA write the donated state in place,
  bfloat16 moments included (no float32 or second bfloat16 copy of them), and the update norm's
  weight-decay term materialises no broadcast constant."""
  tx = training.make_optimizer(learning_rate=1e-3, clip_norm=1.0, weight_decay=0.01, mu_dtype=moments,
                               nu_dtype=moments)
  params, abstract = _abstract_state(tx)
  mesh = parallel.make_mesh()
  step = training.make_train_step(loss_fn, tx, mesh=mesh, state_sharding=training.state_shardings(abstract, mesh))
  batch = {"x": jax.ShapeDtypeStruct(X.shape, X.dtype)}
  mem = step.jitted.lower(abstract, batch, None).compile().memory_analysis()
  grad = jax.jit(lambda p, b: jax.value_and_grad(loss_fn, has_aux=True)(p, b, None, None)).lower(
      params, batch).compile().memory_analysis()
  param_bytes = sum(leaf.size * 4 for leaf in jax.tree.leaves(params))
  excess = mem.temp_size_in_bytes - (grad.temp_size_in_bytes + grad.output_size_in_bytes)
  assert excess <= 0.1 * param_bytes, (excess, param_bytes)
  moment_factor = 2 if moments is None else 1  # two moments of 4 or 2 bytes per parameter
  assert mem.alias_size_in_bytes >= (2 + moment_factor) * param_bytes  # params, EMA and both moments donated


def test_bfloat16_moments_and_ema_step_and_skip():
  tx = training.make_optimizer(learning_rate=1e-2, clip_norm=1.0, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
  mesh = parallel.make_mesh()
  st = training.create_train_state(lambda k: MODEL.init(k, X)["params"], tx, key=jax.random.key(1), mesh=mesh,
                                   ema_dtype=jnp.bfloat16)
  adam = st.opt_state[-1][0]
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves((adam.mu, adam.nu, st.ema_params)))
  p0 = jax.tree.map(np.asarray, st.params)
  step = training.make_train_step(loss_fn, tx, mesh=mesh, state_sharding=jax.tree.map(lambda a: a.sharding, st),
                                  ema_decay=0.9, ema_warmup=False)
  x = np.random.default_rng(0).normal(size=X.shape).astype(np.float32)
  # reference: the optimizer's own (unfused) update on the same gradients
  (_, _), g = jax.value_and_grad(loss_fn, has_aux=True)(p0, {"x": x}, None, None)
  upd, ref_opt = tx.update(g, tx.init(p0), p0)
  ref_p = optax.apply_updates(p0, upd)
  st, m = step(st, parallel.host_to_global({"x": x}, mesh))
  assert bool(m["finite"])
  # The two gradients differ in float32 ulps, enough to move a moment by one bfloat16 ulp (2^-8 relative);
  # the Adam ratio m / sqrt(v) is at most ~1 at step 1, so the update moves by a few lr * 2^-8, except where
  # |g| is near eps (the ratio is then ill-conditioned): allow that for a 1e-4 fraction of the elements.
  diff = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel()
                         for a, b in zip(jax.tree.leaves(st.params), jax.tree.leaves(ref_p))])
  assert np.mean(diff > 1e-2 * 2**-5) <= 1e-4 and diff.max() <= 2e-2, diff.max()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                                       rtol=2**-7, atol=2**-16 * np.abs(np.asarray(b, np.float32)).max()),
               st.opt_state[-1][0].mu, ref_opt[-1][0].mu)
  ref_norm = np.sqrt(sum(np.sum(np.square(np.asarray(u, np.float64))) for u in jax.tree.leaves(upd)))
  np.testing.assert_allclose(float(m["update_norm"]), ref_norm, rtol=2**-6)
  good = jax.tree.map(np.asarray, st)
  bad = x.copy()
  bad[0, 0] = np.nan
  st, m = step(st, parallel.host_to_global({"x": bad}, mesh))
  assert not bool(m["finite"]) and float(m["update_norm"]) == 0.0
  for a, b in zip(jax.tree.leaves((st.params, st.ema_params, st.opt_state)),
                  jax.tree.leaves((good.params, good.ema_params, good.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_no_ema_state():
  tx = training.make_optimizer(learning_rate=1e-2)
  mesh = parallel.make_mesh()
  st = training.create_train_state(lambda k: MODEL.init(k, X)["params"], tx, key=jax.random.key(1), mesh=mesh,
                                   ema=False)
  assert st.ema_params is None
  step = training.make_train_step(loss_fn, tx, mesh=mesh, state_sharding=jax.tree.map(lambda a: a.sharding, st))
  st, m = step(st, parallel.host_to_global({"x": np.ones(X.shape, np.float32)}, mesh))
  assert st.ema_params is None and bool(m["finite"])


def test_no_ema_run_samples_and_restores_its_params(tmp_path):
  """A run without an EMA samples and exports its online parameters: ``sampling_params`` and
  ``restore_ema`` fall back to ``params`` (bit-equal)."""
  from jdiff import checkpoint, ldm

  tx = training.make_optimizer(learning_rate=1e-2)
  mesh = parallel.make_mesh()
  st = training.create_train_state(lambda k: MODEL.init(k, X)["params"], tx, key=jax.random.key(1), mesh=mesh,
                                   ema=False)
  assert st.sampling_params is st.params
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
  try:
    ckpt.save(0, st, force=True)
    ckpt.wait()
    for ema in (True, False):
      got = ldm.restore_ema(ckpt, ema=ema)
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(st.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  finally:
    ckpt.close()
  with_ema = training.create_train_state(lambda k: MODEL.init(k, X)["params"], tx, key=jax.random.key(1), mesh=mesh)
  assert with_ema.sampling_params is with_ema.ema_params


def _attention_loss(q, k, v):
  from jdiff.models import layers

  w = jnp.arange(q.shape[1], dtype=jnp.float32)[None, :, None]
  return jnp.sum(jnp.sin(layers.attend(q, k, v, heads=2)) * w)


def test_chunked_attention_matches_full_attention():
  """``attention_implementation("chunked")``: float64 NumPy values; gradients equal to the default path's."""
  from jdiff.models import layers

  rng = np.random.default_rng(0)
  t = 2 * layers.ATTENTION_CHUNK
  for s in (t, 77):  # self- and cross-attention
    q = rng.standard_normal((2, t, 16)).astype(np.float32)
    k, v = (rng.standard_normal((2, s, 16)).astype(np.float32) for _ in range(2))
    qh, kh, vh = (a.astype(np.float64).reshape(2, -1, 2, 8).transpose(0, 2, 1, 3) for a in (q, k, v))
    logits = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(8)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    ref = ((p / p.sum(-1, keepdims=True)) @ vh).transpose(0, 2, 1, 3).reshape(2, t, 16)
    with layers.attention_implementation("chunked"):
      got = jax.jit(lambda q, k, v: layers.attend(q, k, v, heads=2))(q, k, v)
      g_chunked = jax.jit(jax.grad(_attention_loss, argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)
    g_full = jax.jit(jax.grad(_attention_loss, argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_chunked, g_full):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))


def test_chunked_attention_bfloat16_gradient_is_within_bfloat16_rounding_of_float32():
  """The chunked path's own backward in bfloat16 (q, k, v and the output rounded to bfloat16, scores and
  accumulators in float32): its gradients lie within a few bfloat16 roundings (2^-8 each) of the float32
  gradient on the same inputs, self- and cross-attention."""
  from jdiff.models import layers

  rng = np.random.default_rng(2)
  t = 2 * layers.ATTENTION_CHUNK
  loss = lambda q, k, v: jnp.sum(jnp.sin(layers.attend(q, k, v, heads=2).astype(jnp.float32)))
  for s in (t, 77):
    q = jnp.asarray(rng.standard_normal((2, t, 16)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((2, s, 16)), jnp.bfloat16) for _ in range(2))
    with layers.attention_implementation("chunked"):
      got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*(a.astype(jnp.float32) for a in (q, k, v)))
    for g, w in zip(got, want):
      assert g.dtype == jnp.bfloat16
      w = np.asarray(w)
      np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=0, atol=4 * 2.0**-8 * float(np.abs(w).max()))


def test_chunked_attention_on_short_bfloat16_sequences_takes_the_default_path():
  """A sequence of at most one chunk under "chunked" is the default attention, in bfloat16 too (bf16
  compute, as the digits memory-options run uses): the same values bit for bit."""
  from jdiff.models import layers

  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 64, 16)), jnp.bfloat16) for _ in range(3))
  attend = jax.jit(lambda q, k, v: layers.attend(q, k, v, heads=2))
  want = attend(q, k, v)
  with layers.attention_implementation("chunked"):
    got = jax.jit(lambda q, k, v: layers.attend(q, k, v, heads=2))(q, k, v)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_chunked_attention_does_not_hold_the_score_matrix():
  """SD1.5's 64x64 self-attention (4096 tokens, 8 heads of 40): the default path's gradient holds several
  512 MiB [8, 4096, 4096] score-sized buffers (1.5 GiB of temporaries here); chunked (512 queries: 64 MiB
  per chunk's scores), the temporaries are less than one score matrix and under a fifth of the default's."""
  from jdiff.models import layers

  x = jax.ShapeDtypeStruct((1, 4096, 320), jnp.float32)
  scores = 8 * 4096 * 4096 * 4

  def temp(impl):
    f = lambda q, k, v: jnp.sum(jnp.sin(layers.attend(q, k, v, heads=8)))
    with layers.attention_implementation(impl):
      return jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

  full, chunked = temp(None), temp("chunked")
  assert full >= 2 * scores
  assert chunked < scores and chunked <= full / 5, (chunked, full)


def test_memory_options_in_the_train_section_are_validated():
  """The train section's memory keys: named one-line errors for bad values; absent keys (configs written
  before they existed) still validate."""
  import ml_collections
  import pytest

  from configs import vae_digits
  from train import loop

  loop.validate_config(vae_digits.train_config(mu_dtype="bfloat16", nu_dtype="bfloat16", ema=False,
                                               ema_dtype="", attention="chunked", conv_backward="late",
                                               remat_backward="late", cpu_scheduler="memory",
                                               update_in_backward=True))
  old = vae_digits.train_config()
  for k in ("mu_dtype", "nu_dtype", "ema", "ema_dtype", "attention", "conv_backward", "remat_backward",
            "cpu_scheduler", "update_in_backward"):
    del old[k]
  loop.validate_config(old)
  for k, v in (("mu_dtype", "float16"), ("ema_dtype", "int8"), ("attention", "flash"), ("ema", "no"),
               ("conv_backward", "early"), ("remat_backward", "early"), ("cpu_scheduler", "fast"),
               ("update_in_backward", "yes")):
    bad = vae_digits.train_config(**{k: v})
    with pytest.raises(ValueError, match=rf"^config key train\.{k} must be") as e:
      loop.validate_config(ml_collections.ConfigDict(bad))
    assert "\n" not in str(e.value)


def test_memory_options_reach_the_state_and_the_traced_step(tmp_path, monkeypatch):
  """``python -m train.vae`` with bfloat16 moments, no EMA, chunked attention, the late convolution
  backward and the memory-optimised CPU schedule: the checkpointed state holds bfloat16 Adam moments and no
  EMA, and the step is built under the chosen attention and convolution backward with the scheduler's
  compiler options."""
  import os

  from jdiff import checkpoint
  from jdiff.models import layers
  from train import vae as vae_train

  seen = []
  make = training.make_train_step

  def recording(*args, **kwargs):
    seen.append((layers._attention_impl[0], layers._conv_backward[0], layers._remat_backward[0],
                 kwargs.get("compiler_options"), kwargs.get("update_in_backward")))
    return make(*args, **kwargs)

  monkeypatch.setattr(training, "make_train_step", recording)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = tmp_path / "vae"
  rc = vae_train.main(["prog", "--config", os.path.join(root, "configs", "vae_tiny.py"), "--workdir", str(workdir),
                       f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.train.steps=1",
                       "--config.train.mu_dtype=bfloat16", "--config.train.nu_dtype=bfloat16",
                       "--config.train.ema=False", "--config.train.attention=chunked",
                       "--config.train.conv_backward=late", "--config.train.remat_backward=late",
                       "--config.train.cpu_scheduler=memory", "--config.train.update_in_backward=True"])
  assert rc == 0 and seen == [("chunked", "late", "late", training.cpu_scheduler_options("memory"), True)]
  assert layers._attention_impl[0] is None and layers._conv_backward[0] is None and layers._remat_backward[0] is None
  ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"))
  try:
    saved = ckpt.saved_shapes()
  finally:
    ckpt.close()
  assert saved.get("ema_params") is None
  dtypes = {str(m.dtype) for m in jax.tree.leaves(saved["opt_state"]) if len(getattr(m, "shape", ())) > 1}
  assert dtypes == {"bfloat16"}, dtypes


_INIT_PEAK = r"""
import re
import flax.linen as nn
import jax
import jax.numpy as jnp
from jdiff import parallel, training


def hwm():
  return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


class Wide(nn.Module):
  @nn.compact
  def __call__(self, x):
    for _ in range(8):
      x = nn.Dense(4096)(x)
    return x


model, x = Wide(), jnp.zeros((1, 4096))
tx = training.make_optimizer(learning_rate=1e-3)
mesh = parallel.make_mesh()
jax.block_until_ready(jax.jit(lambda a: a * 2)(jnp.ones(10)))
before = hwm()
state = jax.block_until_ready(training.create_train_state(lambda k: model.init(k, x)["params"], tx,
                                                          key=jax.random.key(0), mesh=mesh))
print(hwm() - before, sum(a.nbytes for a in jax.tree.leaves(state)),
      sum(a.nbytes for a in jax.tree.leaves(state.params)))
"""


def test_initialisation_peaks_at_the_state_not_twice_it():
  """A fresh state (512 MiB of random Dense kernels, AdamW, EMA: 2 GiB) raises the process's peak RSS by the
  state plus at most 0.3x the parameters (one program generating parameters, moments and EMA at once held
  the random generation's temporaries beside the whole state: +0.6x the parameters here, +1.36x for the
  SD1.5 UNet's init)."""
  import subprocess
  import sys

  out = subprocess.run([sys.executable, "-c", _INIT_PEAK], capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  grew, state_bytes, param_bytes = map(int, out.stdout.split())
  assert 0 <= state_bytes - 4 * param_bytes < 1024  # params, EMA, two moments (+ step counters, rng)
  assert grew <= state_bytes + 0.3 * param_bytes, (grew - state_bytes) / param_bytes


def test_generated_and_given_parameters_start_the_same_state():
  """``create_train_state(key -> params)`` equals ``create_train_state(params)`` with the same key (the
  generated parameters go through their own program and are donated to the state)."""
  tx = training.make_optimizer(learning_rate=1e-2)
  mesh = parallel.make_mesh()
  init = lambda k: MODEL.init(k, X)["params"]  # noqa: E731
  key = jax.random.key(3)
  generated = training.create_train_state(init, tx, key=key, mesh=mesh, extra_ema=("target",))
  params = init(jax.random.split(key)[0])
  given = training.create_train_state(params, tx, key=key, mesh=mesh, extra_ema=("target",))
  for a, b in zip(jax.tree.leaves(generated), jax.tree.leaves(given), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_ahead_of_time_compiled_step_equals_the_jitted_step():
  """TrainStep.compile: the executable it keeps gives the jitted step's results bit for bit (donated state),
  a batch of another shape falls back to the jitted path, and the trim call reports a bool."""
  tx = training.make_optimizer(learning_rate=1e-2, clip_norm=1.0)
  mesh = parallel.make_mesh()
  init = lambda k: MODEL.init(k, X)["params"]
  make = lambda: training.create_train_state(init, tx, key=jax.random.key(3), mesh=mesh)
  rng = np.random.default_rng(1)
  xs = [rng.normal(size=X.shape).astype(np.float32) for _ in range(3)]
  results = []
  for ahead in (False, True):
    st = make()
    step = training.make_train_step(loss_fn, tx, mesh=mesh, state_sharding=jax.tree.map(lambda a: a.sharding, st))
    batches = [parallel.host_to_global({"x": x}, mesh) for x in xs]
    if ahead:
      mem = step.compile(jax.eval_shape(lambda: st), batches[0])
      assert mem is None or mem.alias_size_in_bytes > 0
      assert isinstance(training.release_host_memory(), bool)
    for b in batches:
      st, m = step(st, b)
    assert step.jitted._cache_size() == (0 if ahead else 1)  # the kept executable ran every step
    results.append(jax.tree.map(np.asarray, (st, m)))
    if ahead:
      small = parallel.host_to_global({"x": xs[0][:4]}, mesh)
      _, m_small = step(st, small)  # another batch shape: traced and compiled by jit
      assert step.jitted._cache_size() == 1 and np.isfinite(float(m_small["loss"]))
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_array_equal(a, b)


def test_memory_scheduled_step_equals_the_default_step():
  """make_train_step(compiler_options=cpu_scheduler_options("memory")): the options reach XLA (an unknown
  option is refused when the step compiles) and reordering the step's operations changes no value:
  three steps equal the default-scheduled step's bit for bit."""
  tx = training.make_optimizer(learning_rate=1e-2, clip_norm=1.0, weight_decay=0.01)
  mesh = parallel.make_mesh()
  init = lambda k: MODEL.init(k, X)["params"]  # noqa: E731
  rng = np.random.default_rng(2)
  batches = [parallel.host_to_global({"x": rng.normal(size=X.shape).astype(np.float32)}, mesh) for _ in range(3)]
  results = []
  for scheduler in ("", "memory", "concurrency"):
    options = training.cpu_scheduler_options(scheduler)
    assert bool(options) == (scheduler != "" and jax.default_backend() == "cpu")
    st = training.create_train_state(init, tx, key=jax.random.key(3), mesh=mesh)
    step = training.make_train_step(loss_fn, tx, mesh=mesh, state_sharding=jax.tree.map(lambda a: a.sharding, st),
                                    compiler_options=options)
    for b in batches:
      st, m = step(st, b)
    results.append(jax.tree.map(np.asarray, (st, m)))
  for other in results[1:]:
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(other), strict=True):
      np.testing.assert_array_equal(a, b)
  st = training.create_train_state(init, tx, key=jax.random.key(3), mesh=mesh)
  bogus = training.make_train_step(loss_fn, tx, mesh=mesh, state_sharding=jax.tree.map(lambda a: a.sharding, st),
                                   compiler_options={"xla_no_such_option": 1})
  with pytest.raises(Exception, match="xla_no_such_option"):
    bogus.compile(st, batches[0])
  assert training.cpu_scheduler_options("memory", backend="gpu") == {}
  with pytest.raises(ValueError, match="CPU scheduler 'fast'"):
    training.cpu_scheduler_options("fast")


def _leaf_atol(ref: np.ndarray, moments_eps: float, steps: int, lr: float) -> float:
  """A few float32 roundings of the leaf's scale, plus, for values made from the moments, a few roundings
  of the moments' storage dtype in each step's update (|update| <= lr * |m / sqrt(v)| ~ lr)."""
  eps32 = float(np.finfo(np.float32).eps)
  if ref.dtype == jnp.bfloat16:
    return 8 * float(jnp.finfo(jnp.bfloat16).eps) * float(np.max(np.abs(ref.astype(np.float32))))
  return 8 * eps32 * float(np.max(np.abs(ref))) + 4 * steps * lr * moments_eps


@pytest.mark.parametrize("moments", [None, "bfloat16"])
def test_update_in_backward_equals_the_fused_step(moments):
  """make_train_step(update_in_backward=True): four steps, the third on a batch holding a NaN, give the
  fused step's state and metrics within the rounding of recomputing the gradients (clipping, weight decay
  and the EMA included); the NaN step leaves every parameter, moment and EMA buffer bit-equal; and the
  compiled step holds no gradient tree: its temporaries are at least half the parameter bytes under the
  fused step's."""
  lr = 1e-2
  tx = training.make_optimizer(learning_rate=lr, clip_norm=1.0, weight_decay=0.01, mu_dtype=moments,
                               nu_dtype=moments)
  moments_eps = float(jnp.finfo(jnp.dtype(moments or "float32")).eps)
  mesh = parallel.make_mesh()
  init = lambda k: MODEL.init(k, X)["params"]  # noqa: E731
  rng = np.random.default_rng(5)
  xs = [rng.normal(size=X.shape).astype(np.float32) for _ in range(4)]
  xs[2][3, 7] = np.nan
  batches = [parallel.host_to_global({"x": x}, mesh) for x in xs]
  runs = []
  for in_backward in (False, True):
    st = training.create_train_state(init, tx, key=jax.random.key(3), mesh=mesh)
    step = training.make_train_step(loss_fn, tx, mesh=mesh, state_sharding=jax.tree.map(lambda a: a.sharding, st),
                                    update_in_backward=in_backward)
    states, metrics = [], []
    for b in batches:
      st, m = step(st, b)
      states.append(jax.tree.map(np.asarray, st))
      metrics.append({k: float(v) for k, v in m.items()})
    runs.append((states, metrics))
  (ref_states, ref_metrics), (states, metrics) = runs
  assert [m["finite"] for m in metrics] == [1.0, 1.0, 0.0, 1.0]
  for before, after in ((states[1], states[2]),):  # the skipped step
    for a, b in zip(jax.tree.leaves((before.params, before.ema_params, before.opt_state)),
                    jax.tree.leaves((after.params, after.ema_params, after.opt_state)), strict=True):
      np.testing.assert_array_equal(a, b)
  for n, (ref, got) in enumerate(zip(ref_states, states)):
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
      if not jnp.issubdtype(a.dtype, jnp.inexact):
        np.testing.assert_array_equal(a, b)
        continue
      atol = _leaf_atol(a, moments_eps, n + 1, lr)
      np.testing.assert_allclose(np.asarray(b, np.float64), np.asarray(a, np.float64), rtol=0, atol=atol)
  eps32 = float(np.finfo(np.float32).eps)
  for ref, got in zip(ref_metrics, metrics):
    assert ref.keys() == got.keys()
    for k in ref:
      if np.isnan(ref[k]):
        assert np.isnan(got[k]), k
      else:
        assert abs(got[k] - ref[k]) <= 1e3 * eps32 * max(1.0, abs(ref[k])), (k, ref[k], got[k])

  params, abstract = _abstract_state(tx)
  batch = {"x": jax.ShapeDtypeStruct(X.shape, X.dtype)}
  temps = []
  for in_backward in (False, True):
    step = training.make_train_step(loss_fn, tx, mesh=mesh, state_sharding=training.state_shardings(abstract, mesh),
                                    update_in_backward=in_backward)
    temps.append(step.jitted.lower(abstract, batch, None).compile().memory_analysis().temp_size_in_bytes)
  param_bytes = sum(leaf.size * 4 for leaf in jax.tree.leaves(params))
  assert temps[1] + 0.5 * param_bytes <= temps[0], (temps, param_bytes)


def test_update_in_backward_on_a_late_remat_unet_equals_the_fused_step():
  """update_in_backward on a tiny UNet under the SD fine-tune's settings (late convolution backward, late
  rematerialised blocks, which then release each gradient after their reads): two steps give the fused
  step's moments within the remat test's bound (2^-16 of each leaf's largest magnitude: the recomputed
  gradients may be summed in another order). Adam's direction m / (sqrt(v) + eps) changes by at most
  about |dg| / eps for a change dg of the (clipped, so |g| <= 1) gradient, so with eps = 1e-3 the
  parameters and EMA may differ by 2^-16 of their scale plus 2 steps * lr * 2 * 2^-16 / eps (a wrong
  update differs by about the learning rate)."""
  from jdiff import diffusion, schedules
  from jdiff.models import UNet, UNetConfig, layers

  cfg = UNetConfig.tiny(sample_size=8, remat=True)
  unet = UNet(cfg)
  sched = schedules.make("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
  rng = np.random.default_rng(4)
  d = cfg.per_block("cross_attention_dim")[0]
  mesh = parallel.make_mesh()
  batches = [parallel.host_to_global({"latents": rng.normal(size=(2, 8, 8, cfg.in_channels)).astype(np.float32),
                                      "context": rng.normal(size=(2, 5, d)).astype(np.float32)}, mesh)
             for _ in range(2)]

  def unet_loss(params, batch, key, frozen):
    del frozen
    model = lambda x_t, t: unet.apply({"params": params}, x_t, t, batch["context"])  # noqa: E731
    return diffusion.loss(model, sched, batch["latents"], key=key), {}

  init = lambda k: unet.init(k, jnp.zeros((1, 8, 8, cfg.in_channels)), jnp.zeros((1,), jnp.int32),  # noqa: E731
                             jnp.zeros((1, 5, d)))["params"]
  lr, eps = 1e-3, 1e-3
  tx = training.make_optimizer(learning_rate=lr, clip_norm=1.0, weight_decay=0.01, eps=eps)
  finals = []
  for in_backward in (False, True):
    st = training.create_train_state(init, tx, key=jax.random.key(1), mesh=mesh)
    with layers.convolution_backward("late"), layers.remat_backward("late"):
      step = training.make_train_step(unet_loss, tx, mesh=mesh,
                                      state_sharding=jax.tree.map(lambda a: a.sharding, st),
                                      update_in_backward=in_backward)
      for b in batches:
        st, m = step(st, b)
    assert bool(m["finite"])
    finals.append(jax.tree.map(np.asarray, ((st.params, st.ema_params), st.opt_state)))
  for i, slack in ((0, 2 * lr * 2 * 2.0**-16 / eps), (1, 0.0)):  # (params, EMA), then the optimizer state
    for a, b in zip(jax.tree.leaves(finals[0][i]), jax.tree.leaves(finals[1][i]), strict=True):
      if np.ndim(a):
        np.testing.assert_allclose(b, a, rtol=0, atol=2.0**-16 * float(np.max(np.abs(a))) + slack)
      else:
        np.testing.assert_array_equal(a, b)


def test_update_in_backward_needs_the_fused_adamw():
  """update_in_backward is refused (one clear error) for an optimizer other than make_optimizer's and with
  extra EMAs, whose updates it does not make."""
  mesh = parallel.make_mesh()
  tx = training.make_optimizer(learning_rate=1e-3)
  _, abstract = _abstract_state(tx)
  shardings = training.state_shardings(abstract, mesh)
  with pytest.raises(ValueError, match="update_in_backward applies make_optimizer's AdamW"):
    training.make_train_step(loss_fn, optax.adam(1e-3), mesh=mesh, state_sharding=shardings,
                             update_in_backward=True)
  with pytest.raises(ValueError, match=r"does not update extra EMAs \(got \['target'\]\)"):
    training.make_train_step(lambda p, b, k, f, s: loss_fn(p, b, k, f), tx, mesh=mesh, state_sharding=shardings,
                             extra_ema={"target": 0.9}, update_in_backward=True)


def test_release_host_memory_collects_reference_cycles():
  """release_host_memory runs the cycle collector: an unreachable cycle holding an array is freed by the
  call itself (automatic collection is off during the test)."""
  import gc
  import weakref

  class Node:
    pass

  node = Node()
  node.self, node.data = node, np.ones(1 << 20)
  ref = weakref.ref(node)
  enabled = gc.isenabled()
  gc.disable()
  try:
    del node
    assert ref() is not None  # a cycle: reference counting alone does not free it
    assert isinstance(training.release_host_memory(), bool)
    assert ref() is None
  finally:
    if enabled:
      gc.enable()


def test_release_host_memory_can_clear_jax_caches_but_keeps_a_held_executable():
  """release_host_memory(clear_caches=True) drops JAX's compiled-function caches (a jitted function
  compiles again when called again) while an ahead-of-time executable the caller holds still runs."""
  f = jax.jit(lambda x: x * 2.0 + 1.0)
  held = jax.jit(lambda x: x - 3.0).lower(jnp.float32(0)).compile()
  assert float(f(jnp.float32(1))) == 3.0 and f._cache_size() == 1
  training.release_host_memory()
  assert f._cache_size() == 1
  training.release_host_memory(clear_caches=True)
  assert f._cache_size() == 0
  assert float(held(jnp.float32(5))) == 2.0
  assert float(f(jnp.float32(2))) == 5.0 and f._cache_size() == 1


def test_update_norm_with_weight_decay_equals_the_optimizer_update():
  """The fused step's update_norm (recovered from the written buffers, the weight-decay term expanded)
  equals the global norm of the optimizer's own update on the same gradients, float64."""
  tx = training.make_optimizer(learning_rate=1e-2, clip_norm=1.0, weight_decay=0.05)
  mesh = parallel.make_mesh()
  st = training.create_train_state(lambda k: MODEL.init(k, X)["params"], tx, key=jax.random.key(4), mesh=mesh)
  p0 = jax.tree.map(np.asarray, st.params)
  step = training.make_train_step(loss_fn, tx, mesh=mesh, state_sharding=jax.tree.map(lambda a: a.sharding, st))
  x = np.random.default_rng(2).normal(size=X.shape).astype(np.float32)
  _, g = jax.value_and_grad(loss_fn, has_aux=True)(p0, {"x": x}, None, None)
  upd, _ = tx.update(g, tx.init(p0), p0)
  ref = np.sqrt(sum(np.sum(np.square(np.asarray(u, np.float64))) for u in jax.tree.leaves(upd)))
  _, m = step(st, parallel.host_to_global({"x": x}, mesh))
  # float32 recomputation of each update element from the stored moments: a few ulps relative
  np.testing.assert_allclose(float(m["update_norm"]), ref, rtol=1e-5)



def test_late_convolution_backward_is_the_autodiff_derivative():
  """convolution_backward("late"): a tiny UNet's forward and parameter / input gradients are bit-equal to
  JAX's own derivative (the same operations, the kernel multiplied by an exact 1); forward mode is
  refused; an unknown mode raises."""
  from jdiff.models import UNet, UNetConfig, layers

  cfg = UNetConfig.tiny(sample_size=8)
  unet = UNet(cfg)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, cfg.in_channels)), jnp.float32)
  t = jnp.asarray([3, 700], jnp.int32)
  ctx = jnp.asarray(rng.normal(size=(2, 5, cfg.per_block("cross_attention_dim")[0])), jnp.float32)
  params = unet.init(jax.random.key(0), x, t, ctx)["params"]

  def loss(p, xx):
    return jnp.sum(jnp.sin(unet.apply({"params": p}, xx, t, ctx)))

  runs = []
  for mode in (None, "late"):
    with layers.convolution_backward(mode):
      runs.append(jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x))
  with layers.convolution_backward("late"), layers.gradients_after_reads():
    runs.append(jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x))
  for other in runs[1:]:
    for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(other), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with layers.convolution_backward("late"), pytest.raises(TypeError, match="custom_vjp"):
    jax.jvp(lambda xx: loss(params, xx), (x,), (x,))
  with pytest.raises(ValueError, match="convolution backward 'early'"):
    with layers.convolution_backward("early"):
      pass


def test_late_remat_is_the_remat_derivative():
  """remat_backward("late"): a tiny UNet with remat=True has nn.remat's parameters, loss and gradients (the
  same float32 operations; XLA may fuse the recomputation differently, so sums may associate differently:
  within 2^-16 of each leaf's largest magnitude, about 500 float32 ulps), and forward mode, saving
  policies, dropout while training and an unknown mode are refused."""
  from jdiff.models import UNet, UNetConfig, layers

  cfg = UNetConfig.tiny(sample_size=8, remat=True)
  unet = UNet(cfg)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, cfg.in_channels)), jnp.float32)
  t = jnp.asarray([3, 700], jnp.int32)
  ctx = jnp.asarray(rng.normal(size=(2, 5, cfg.per_block("cross_attention_dim")[0])), jnp.float32)
  params = unet.init(jax.random.key(0), x, t, ctx)["params"]

  def loss(p, xx, cc):
    return jnp.sum(jnp.sin(unet.apply({"params": p}, xx, t, cc)))

  runs = []
  for mode in (None, "late"):
    with layers.remat_backward(mode):
      shapes = jax.eval_shape(lambda: unet.init(jax.random.key(0), x, t, ctx)["params"])
      assert jax.tree.structure(shapes) == jax.tree.structure(params)
      runs.append(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(params, x, ctx))
  with layers.remat_backward("late"), layers.gradients_after_reads():  # gradients released after the reads
    runs.append(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(params, x, ctx))
  for other in runs[1:]:
    for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(other), strict=True):
      a, b = np.asarray(a), np.asarray(b)
      np.testing.assert_allclose(b, a, rtol=0, atol=2.0**-16 * float(np.max(np.abs(a))))
  with layers.remat_backward("late"):
    with pytest.raises(TypeError, match="custom_vjp"):
      jax.jvp(lambda xx: loss(params, xx, ctx), (x,), (x,))
    with pytest.raises(ValueError, match="recomputes whole blocks"):
      UNet(UNetConfig.tiny(sample_size=8, remat="matmuls")).init(jax.random.key(0), x, t, ctx)
    dropped = UNet(UNetConfig.tiny(sample_size=8, remat=True, dropout=0.1))
    with pytest.raises(ValueError, match="dropout while training"):
      jax.grad(lambda p: jnp.sum(dropped.apply({"params": p}, x, t, ctx, train=True,
                                               rngs={"dropout": jax.random.key(1)})))(params)
  with pytest.raises(ValueError, match="remat backward 'early'"):
    with layers.remat_backward("early"):
      pass
