"""Train state, optimizer and the jitted, sharded train step.

A :class:`TrainState` is a plain pytree (params, EMA params, optimizer state, step, rng and two
non-finite counters). :func:`make_train_step` turns a loss function into ONE pure function
``(state, batch) -> (state, metrics)`` compiled with ``jax.jit`` over a ("data", "fsdp") mesh with
explicit in/out shardings and the state donated. Inside the step:

* the step's key is ``fold_in(state.rng, state.step)``, so a restored run continues bit-for-bit;
* gradients are clipped by global norm (in the optimizer, :func:`make_optimizer`);
* a step whose loss or gradients are not finite is skipped (params, EMA and optimizer state are
  left unchanged) and counted in ``bad_steps`` (consecutive) and ``skipped_steps`` (total); the
  loop stops with :class:`NonFiniteError` after ``max_bad_steps`` consecutive ones, so NaN never
  reaches the parameters, nor a checkpoint;
* EMA parameters follow ``optax.incremental_update`` with an optional warmup of the decay;
* further EMAs of the parameters (``extra_ema``: e.g. the target network of a consistency model),
  each with its own decay (a constant or a function of the step), live in the state beside the
  sampling EMA, are checkpointed with it, and are read by the loss (its fifth argument is then
  the state before the update), never differentiated.

Example:
  >>> tx = make_optimizer(learning_rate=1e-3, clip_norm=1.0)
  >>> state = create_train_state(lambda k: model.init(k, x)["params"], tx, key=key, mesh=mesh)
  >>> step = make_train_step(loss_fn, tx, mesh=mesh, state_sharding=state_shardings(state, mesh))
  >>> state, metrics = step(state, batch)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jdiff import parallel
from jdiff.models import layers

__all__ = [
    "TrainState",
    "NonFiniteError",
    "make_optimizer",
    "Optimizer",
    "AdamWSpec",
    "scale_by_adam",
    "create_train_state",
    "state_shardings",
    "ema_decay_at",
    "extra_ema_decay",
    "make_train_step",
    "cpu_scheduler_options",
    "TrainStep",
    "check_finite",
    "release_host_memory",
]

# loss_fn(params, batch, key, frozen[, state]) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
# an extra EMA's decay: a constant, or a function of the step (int32 scalar, updates so far) -> float32 scalar
Decay = float | Callable[[jax.Array], jax.Array]


class NonFiniteError(FloatingPointError):
  """Raised when training produced too many consecutive steps with NaN/inf loss or gradients."""


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue: a pytree of arrays.

  Attributes:
    step: int32 scalar, the number of steps taken (skipped ones included).
    params: the trained parameters.
    ema_params: exponential moving average of ``params`` (sample from these), or None when the run
      keeps no EMA (``create_train_state(ema=False)``).
    opt_state: optax state.
    rng: uint32 raw key data [2] (``jax.random.key_data``); each step uses
      ``fold_in(wrap_key_data(rng), step)``. Raw data keeps checkpoints plain.
    bad_steps: int32, consecutive non-finite steps so far.
    skipped_steps: int32, total non-finite (skipped) steps.
    extra_ema: None, or ``{name: EMA of params}``: further moving averages with their own decays
      (``make_train_step(extra_ema=...)``), e.g. a consistency model's target network.
  """

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array
  bad_steps: jax.Array
  skipped_steps: jax.Array
  extra_ema: Any = None

  @property
  def sampling_params(self) -> Any:
    """The parameters to sample and export from: the EMA, or ``params`` when the run keeps none."""
    return self.params if self.ema_params is None else self.ema_params


class AdamWSpec(NamedTuple):
  """The hyper-parameters of :func:`make_optimizer`'s AdamW, read by the train step's fused update."""
  learning_rate: float | Callable[[jax.Array], jax.Array]
  b1: float
  b2: float
  eps: float
  weight_decay: float
  clip_norm: float | None
  mu_dtype: Any
  nu_dtype: Any


class Optimizer(NamedTuple):
  """An optax ``GradientTransformation`` (``init``/``update``) that also carries its AdamW ``spec``.

  ``update`` is the plain optax chain (clip, Adam, weight decay, learning rate); :func:`make_train_step`
  uses ``spec`` to apply the same update leaf by leaf, fused with the non-finite guard and the EMA,
  writing every state buffer in place (see :func:`make_train_step`).
  """
  init: Callable[[Any], Any]
  update: Callable[..., Any]
  spec: AdamWSpec


def _moment_dtype(name: str, dtype: Any) -> Any:
  if dtype is None:
    return None
  try:
    dt = jnp.dtype(dtype)
  except TypeError:
    raise ValueError(f"{name}={dtype!r} is not a dtype; use float32 or bfloat16") from None
  if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"{name}={dtype!r}: optimizer moments are stored as float32 or bfloat16")
  return dt


def _bias_corrections(b1: float, b2: float, count: jax.Array) -> tuple[jax.Array, jax.Array]:
  return 1 - b1 ** count, 1 - b2 ** count  # float32 scalars (weak-typed base, int32 count)


def _adam_moments(g: jax.Array, mu: jax.Array, nu: jax.Array, b1: float, b2: float,
                  ok: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Adam's moment updates in float32, returned in the stored dtypes (``mu.dtype``, ``nu.dtype``).

  With ``ok`` (a boolean scalar) the old moments are kept where it is false, selected in float32
  before the rounding, so a bfloat16 moment is written by one fusion (no second copy of it)."""
  g = g.astype(jnp.float32)
  old_mu, old_nu = mu.astype(jnp.float32), nu.astype(jnp.float32)
  new_mu = (1 - b1) * g + b1 * old_mu
  new_nu = (1 - b2) * (g * g) + b2 * old_nu
  if ok is not None:
    new_mu, new_nu = jnp.where(ok, new_mu, old_mu), jnp.where(ok, new_nu, old_nu)
  return new_mu.astype(mu.dtype), new_nu.astype(nu.dtype)


def _adam_direction(mu: jax.Array, nu: jax.Array, c1: jax.Array, c2: jax.Array, eps: float) -> jax.Array:
  return (mu.astype(jnp.float32) / c1) / (jnp.sqrt(nu.astype(jnp.float32) / c2) + eps)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *, mu_dtype: Any = None,
                  nu_dtype: Any = None) -> optax.GradientTransformation:
  """``optax.scale_by_adam`` with both moments stored in a chosen dtype (float32 or bfloat16).

  The moments are updated in float32 and rounded to their storage dtype; the update is computed from
  the stored (rounded) moments, so a bfloat16 state behaves the same whether it is applied by
  ``update`` or by :func:`make_train_step`'s fused update. With float32 moments this is optax's
  ``scale_by_adam`` (``eps_root=0``, no Nesterov). The state is an ``optax.ScaleByAdamState``.

  Example:
    >>> tx = optax.chain(scale_by_adam(mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16), optax.scale(-1e-3))
  """
  mu_dtype = _moment_dtype("mu_dtype", mu_dtype)
  nu_dtype = _moment_dtype("nu_dtype", nu_dtype)

  def init(params):
    mu = jax.tree.map(lambda p: jnp.zeros(p.shape, mu_dtype or p.dtype), params)
    nu = jax.tree.map(lambda p: jnp.zeros(p.shape, nu_dtype or p.dtype), params)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

  def update(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    c1, c2 = _bias_corrections(b1, b2, count)
    moments = jax.tree.map(lambda g, m, v: _adam_moments(g, m, v, b1, b2), updates, state.mu, state.nu)
    mu = jax.tree.map(lambda _, mv: mv[0], updates, moments)
    nu = jax.tree.map(lambda _, mv: mv[1], updates, moments)
    out = jax.tree.map(lambda g, m, v: _adam_direction(m, v, c1, c2, eps).astype(g.dtype), updates, mu, nu)
    return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init, update)


def make_optimizer(*, learning_rate: float = 1e-4, warmup_steps: int = 0, total_steps: int | None = None,
                   schedule: str = "constant", clip_norm: float | None = 1.0, b1: float = 0.9,
                   b2: float = 0.999, weight_decay: float = 0.0, eps: float = 1e-8, mu_dtype: Any = None,
                   nu_dtype: Any = None) -> Optimizer:
  """AdamW with global-norm gradient clipping and a constant or cosine learning-rate schedule.

  Args:
    learning_rate: peak learning rate.
    warmup_steps: linear warmup from 0.
    total_steps: needed by ``schedule="cosine"`` (decay to 0 at ``total_steps``).
    schedule: "constant" or "cosine".
    clip_norm: clip gradients to this global norm (None disables clipping).
    b1, b2, weight_decay, eps: AdamW hyper-parameters.
    mu_dtype, nu_dtype: storage dtype of the first / second moment (None: the parameters' dtype;
      ``jnp.bfloat16`` halves that moment's memory; see :func:`scale_by_adam`).

  Returns:
    An :class:`Optimizer`: the optax chain ``clip_by_global_norm`` -> (:func:`scale_by_adam`,
    ``add_decayed_weights``, ``scale_by_learning_rate``) with its ``spec`` (the state has optax's
    ``adamw`` layout).

  Example:
    >>> tx = make_optimizer(learning_rate=2e-4, warmup_steps=100, clip_norm=1.0)
    >>> tx = make_optimizer(learning_rate=1e-4, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
  """
  if schedule == "constant":
    lr = (optax.linear_schedule(0.0, learning_rate, warmup_steps) if warmup_steps else learning_rate)
    if warmup_steps:
      lr = optax.join_schedules([lr, optax.constant_schedule(learning_rate)], [warmup_steps])
  elif schedule == "cosine":
    if not total_steps:
      raise ValueError("schedule='cosine' needs total_steps")
    lr = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup_steps, 0),
                                            max(total_steps, warmup_steps + 1))
  else:
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; expected 'constant' or 'cosine'")
  spec = AdamWSpec(learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, clip_norm=clip_norm,
                   mu_dtype=_moment_dtype("mu_dtype", mu_dtype), nu_dtype=_moment_dtype("nu_dtype", nu_dtype))
  parts = []
  if clip_norm is not None:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.chain(scale_by_adam(b1, b2, eps, mu_dtype=spec.mu_dtype, nu_dtype=spec.nu_dtype),
                           optax.add_decayed_weights(weight_decay), optax.scale_by_learning_rate(lr)))
  tx = optax.chain(*parts)
  return Optimizer(tx.init, tx.update, spec)


def _zero_int() -> jax.Array:
  return jnp.zeros((), jnp.int32)


def state_shardings(abstract_state: TrainState, mesh: Mesh, *, fsdp: bool = False,
                    min_size: int = 0) -> TrainState:
  """NamedShardings for every leaf of a TrainState: params/EMA/opt state replicated or FSDP."""
  return parallel.param_shardings(abstract_state, mesh, fsdp=fsdp, min_size=min_size)


def create_train_state(init_fn: Callable[[jax.Array], Any], tx: optax.GradientTransformation, *,
                       key: jax.Array, mesh: Mesh | None = None, fsdp: bool = False,
                       min_size: int = 0, extra_ema: Iterable[str] = (), ema: bool = True,
                       ema_dtype: Any = None) -> TrainState:
  """Initialises a TrainState directly into its shardings (``jit`` with ``out_shardings``).

  Args:
    init_fn: ``key -> params``, or a parameter tree to start from (a pretrained checkpoint): it enters
      the jitted initialisation as an argument, so large trees are not baked into the program.
    tx: the optimizer.
    key: a PRNG key; split once into the init key and the state's rng.
    mesh: the device mesh (default: all devices, data parallel).
    fsdp: FSDP-shard parameters, EMA and optimizer state over "fsdp".
    min_size: leaves smaller than this stay replicated.
    extra_ema: names of further EMAs of the parameters (``state.extra_ema[name]``), each starting
      at the initial parameters; none: ``state.extra_ema`` is None.
    ema: keep the sampling EMA (``state.ema_params``); False: ``state.ema_params`` is None (no
      EMA memory; sample from ``state.params``).
    ema_dtype: storage dtype of the sampling EMA (None: the parameters' dtype; ``jnp.bfloat16``
      halves its memory; it is updated in float32 and rounded each step).

  Example:
    >>> state = create_train_state(lambda k: model.init(k, x)["params"], tx, key=jax.random.key(0))
    >>> state = create_train_state(init_fn, tx, key=key, extra_ema=("target",))  # state.extra_ema["target"]
  """
  mesh = mesh or parallel.make_mesh()
  k_init, k_rng = jax.random.split(key)
  rng = jax.random.key_data(k_rng)
  names = _ema_names(extra_ema)
  ema_dtype = _moment_dtype("ema_dtype", ema_dtype)

  start = None if callable(init_fn) else jax.tree.map(jnp.asarray, init_fn)

  def from_params(params, rng):
    extra = {name: params for name in names} if names else None
    ema_params = None
    if ema:
      ema_params = jax.tree.map(lambda p: p.astype(ema_dtype or p.dtype), params)
    return TrainState(step=_zero_int(), params=params, ema_params=ema_params, opt_state=tx.init(params),
                      rng=rng, bad_steps=_zero_int(), skipped_steps=_zero_int(), extra_ema=extra)

  abstract = jax.eval_shape(lambda k, r: from_params(init_fn(k) if start is None else start, r), k_init, rng)
  shardings = state_shardings(abstract, mesh, fsdp=fsdp, min_size=min_size)
  if start is not None:
    return jax.jit(from_params, out_shardings=shardings)(start, rng)
  # Generated parameters come from a program of their own, so the random generation's temporaries are gone
  # before the moments and EMAs exist; the state program then takes the parameters over (donated).
  params = jax.jit(init_fn, out_shardings=shardings.params)(k_init)
  return jax.jit(from_params, out_shardings=shardings, donate_argnums=0)(params, rng)


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
  """EMA decay used after ``step`` updates: ``decay``, or min(decay, (1 + n) / (10 + n)) with warmup."""
  if not warmup:
    return jnp.float32(decay)
  n = step.astype(jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))


def _ema_names(extra_ema: Iterable[str]) -> tuple[str, ...]:
  names = tuple(extra_ema)
  for name in names:
    if not isinstance(name, str) or not name:
      raise ValueError(f"extra_ema names must be non-empty strings, got {name!r}")
  if len(set(names)) != len(names):
    raise ValueError(f"extra_ema names must be distinct, got {names}")
  return names


def extra_ema_decay(decay: Decay, step: jax.Array) -> jax.Array:
  """An extra EMA's decay after ``step`` updates: the constant, or ``decay(step)``, as float32.

  Example:
    >>> mu = extra_ema_decay(lambda n: 0.9 + 0.05 * (n > 100), state.step)  # float32 scalar
  """
  value = decay(step) if callable(decay) else decay
  return jnp.asarray(value, jnp.float32)


def _global_norm(tree: Any) -> jax.Array:
  return optax.tree.norm(jax.tree.map(lambda g: g.astype(jnp.float32), tree))


def check_finite(tree: Any) -> bool:
  """True if every floating leaf of ``tree`` is finite (host-side check, used before saving)."""
  ok = True
  for leaf in jax.tree.leaves(tree):
    if jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      ok = ok and bool(jnp.all(jnp.isfinite(leaf)))
  return ok


def _ema_step(new: jax.Array, old: jax.Array, decay: jax.Array) -> jax.Array:
  """``optax.incremental_update`` of one leaf in float32, rounded to the EMA's dtype."""
  rate = 1.0 - decay
  return (rate * new.astype(jnp.float32) + (1.0 - rate) * old.astype(jnp.float32)).astype(old.dtype)


def _guarded_update(tx, grads, opt_state, params, emas, decays, finite):
  """Any optax ``tx``: the update, then ``where(finite, new, old)`` per leaf (holds a second state)."""
  updates, new_opt = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  new_emas = [jax.tree.map(lambda p, e, d=d: _ema_step(p, e, d), new_params, ema) for ema, d in zip(emas, decays)]

  def keep(new, old):
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

  return (keep(new_params, params), keep(new_opt, opt_state), [keep(n, o) for n, o in zip(new_emas, emas)],
          _global_norm(updates), finite)


class _AdamWScalars(NamedTuple):
  count: jax.Array         # the Adam count after this step
  c1: jax.Array            # bias corrections
  c2: jax.Array
  step_size: jax.Array     # -learning rate
  scale: jax.Array         # the clipping factor of the gradients
  lr_state: Any            # the learning-rate schedule's state after this step


def _adamw_scalars(spec: AdamWSpec, opt_state, grad_norm: jax.Array) -> _AdamWScalars:
  adam, _, lr_state = opt_state[-1]
  f32 = jnp.float32
  count = optax.safe_increment(adam.count)
  c1, c2 = _bias_corrections(spec.b1, spec.b2, count)
  if callable(spec.learning_rate):
    step_size = -jnp.asarray(spec.learning_rate(lr_state.count), f32)
    lr_state = lr_state._replace(count=optax.safe_increment(lr_state.count))
  else:
    step_size = -jnp.asarray(spec.learning_rate, f32)
  if spec.clip_norm is None:
    scale = jnp.ones((), f32)
  else:
    scale = jnp.where(grad_norm < spec.clip_norm, 1.0, spec.clip_norm / grad_norm).astype(f32)
  return _AdamWScalars(count, c1, c2, step_size, scale, lr_state)


def _adamw_leaf(hyper, scale, step_size, c1, c2, ok, g, m, v, p, emas, decays):
  """One leaf of the fused update: the stored moments (old ones where ``ok`` is false), the parameter,
  the EMAs. ``hyper`` is ``(b1, b2, eps, weight_decay)``."""
  b1, b2, eps, wd = hyper
  f32 = jnp.float32
  m1, v1 = _adam_moments(g.astype(f32) * scale, m, v, b1, b2, ok)
  d = _adam_direction(m1, v1, c1, c2, eps)
  if wd:
    d = d + wd * p.astype(f32)
  p1 = jnp.where(ok, (p.astype(f32) + step_size * d).astype(p.dtype), p)
  return p1, m1, v1, tuple(jnp.where(ok, _ema_step(p1, e, dec), e) for e, dec in zip(emas, decays))


def _applied_update_sq(hyper, step_size, c1, c2, m1, v1, p1) -> jax.Array:
  """|applied update / step size|^2 of one leaf, from the written buffers only (p1 = p + u, so u = step
  (d + wd p1) / (1 + step wd))."""
  _, _, eps, wd = hyper
  f32 = jnp.float32
  d = m1.astype(f32) / (c1 * (jnp.sqrt(v1.astype(f32) / c2) + eps))
  if not wd:
    return jnp.sum(jnp.square(d))
  # |d + wd p1|^2 / (1 + step wd)^2, expanded so that every reduction reads arrays only: with a scalar
  # factor inside, XLA:CPU materialises that scalar broadcast to the leaf's shape, once per shape, and
  # keeps it live through the whole step.
  q = p1.astype(f32)
  parts = jnp.sum(d * d) + 2.0 * wd * jnp.sum(d * q) + wd * wd * jnp.sum(q * q)
  return parts / jnp.square(1.0 + step_size * wd)


def _adamw_outputs(spec, sc: _AdamWScalars, opt_state, ok, treedef, new_p, new_m, new_v, new_e):
  *head, (adam, wd_state, lr_state) = opt_state
  hyper = (spec.b1, spec.b2, spec.eps, spec.weight_decay)
  sq = jnp.zeros((), jnp.float32)
  for m1, v1, p1 in zip(new_m, new_v, new_p):
    sq = sq + _applied_update_sq(hyper, sc.step_size, sc.c1, sc.c2, m1, v1, p1)
  update_norm = jnp.where(ok, jnp.abs(sc.step_size) * jnp.sqrt(sq), 0.0)
  new_adam = optax.ScaleByAdamState(count=jnp.where(ok, sc.count, adam.count), mu=treedef.unflatten(new_m),
                                    nu=treedef.unflatten(new_v))
  new_lr_state = lr_state
  if sc.lr_state is not lr_state:
    new_lr_state = lr_state._replace(count=jnp.where(ok, sc.lr_state.count, lr_state.count))
  new_opt = (*head, (new_adam, wd_state, new_lr_state))
  return treedef.unflatten(new_p), new_opt, [treedef.unflatten(e) for e in new_e], update_norm, ok


def _fused_adamw(spec: AdamWSpec, grads, grad_norm, opt_state, params, emas, decays, finite):
  """:func:`make_optimizer`'s update, the non-finite guard and the EMAs, leaf by leaf, in place.

  The step applies when the loss and the gradient norm are finite (``finite``). Each state buffer is
  written once, from values already selected by ``finite``: ``mu, nu <- where(finite, new, old)``
  (selected in float32, then rounded to the stored dtype: one fusion per moment, also in bfloat16),
  then the parameter update from those stored moments, ``params <- where(finite, params + update,
  params)``, then ``ema <- where(finite, ema step, ema)``. Each old value has a single reader, the
  fusion that writes its new value, and every later read (the update norm, the EMA step) reads the
  written buffers, so XLA updates the donated buffers in place: no second copy of the state, and a
  skipped step leaves every buffer bit-equal (the NaN candidates are never selected, never stored).
  The update norm is recovered from the written buffers (0 on a skipped step).
  """
  adam = opt_state[-1][0]
  sc = _adamw_scalars(spec, opt_state, grad_norm)
  hyper = (spec.b1, spec.b2, spec.eps, spec.weight_decay)
  leaves, treedef = jax.tree.flatten(params)
  g_l, m_l, v_l = (treedef.flatten_up_to(t) for t in (grads, adam.mu, adam.nu))
  e_ls = [treedef.flatten_up_to(e) for e in emas]
  new_p, new_m, new_v, new_e = [], [], [], [[] for _ in emas]
  for i, (g, m, v, p) in enumerate(zip(g_l, m_l, v_l, leaves)):
    p1, m1, v1, e1 = _adamw_leaf(hyper, sc.scale, sc.step_size, sc.c1, sc.c2, finite, g, m, v, p,
                                 [e_l[i] for e_l in e_ls], decays)
    new_p.append(p1)
    new_m.append(m1)
    new_v.append(v1)
    for out, e in zip(new_e, e1):
      out.append(e)
  return _adamw_outputs(spec, sc, opt_state, finite, treedef, new_p, new_m, new_v, new_e)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _update_in_backward(hyper, p, m, v, emas, sc):
  """The identity on ``p`` whose derivative rule returns, in place of the cotangents of ``(p, m, v,
  emas)``, their values after this step's AdamW update with the gradient ``g`` that reaches ``p``:
  ``jax.grad`` of a loss of hooked parameters is then the new state, made leaf by leaf as the backward
  pass reaches each parameter. ``sc`` holds ``[scale, step_size, c1, c2, ok, *ema decays]``."""
  del hyper, m, v, emas, sc
  return p


def _update_in_backward_fwd(hyper, p, m, v, emas, sc):
  return p, (p, m, v, emas, sc)


def _update_in_backward_bwd(hyper, res, g):
  p, m, v, emas, sc = res
  p1, m1, v1, e1 = _adamw_leaf(hyper, sc[0], sc[1], sc[2], sc[3], sc[4] > 0.5, g, m, v, p, emas, list(sc[5:]))
  return p1, m1, v1, e1, jnp.zeros_like(sc)


_update_in_backward.defvjp(_update_in_backward_fwd, _update_in_backward_bwd)


@jax.custom_vjp
def _square_sum_in_backward(p, z):
  """The identity on ``p`` whose derivative rule gives ``z`` (a float32 scalar) the cotangent sum(g^2) of the
  gradient ``g`` reaching ``p``, and ``p`` none: differentiating a loss of such parameters with respect to the
  ``z`` leaves gives each gradient's squared norm, reduced as soon as the gradient exists."""
  del z
  return p


def _square_sum_fwd(p, z):
  del z
  return p, None


def _square_sum_bwd(_, g):
  return None, jnp.sum(jnp.square(g.astype(jnp.float32)))


_square_sum_in_backward.defvjp(_square_sum_fwd, _square_sum_bwd)


def _loss_and_grad_norm(loss_fn, params, batch, key, frozen):
  """``(loss, aux), norm of the gradient of loss_fn with respect to params``, without holding the gradients
  (each is reduced to its squared norm where the backward pass makes it)."""
  leaves, treedef = jax.tree.flatten(params)

  def of_zeros(zeros):
    hooked = [_square_sum_in_backward(p, z) for p, z in zip(leaves, zeros)]
    return loss_fn(treedef.unflatten(hooked), batch, key, frozen)

  zeros = [jnp.zeros((), jnp.float32) for _ in leaves]
  (loss, aux), squares = jax.value_and_grad(of_zeros, has_aux=True)(zeros)
  return (loss, aux), jnp.sqrt(sum(squares, jnp.zeros((), jnp.float32)))


def _tie(tree: Any, s: jax.Array) -> Any:
  """``tree`` with every array made to depend on the scalar ``s`` without changing its finite values
  (floats times ``1 + 0 s``, integers plus ``int(0 s)``; key data likewise)."""
  zero = 0.0 * s.astype(jnp.float32)

  def tie(a):
    if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(tie(jax.random.key_data(a)), impl=jax.random.key_impl(a))
    if not hasattr(a, "dtype"):
      return a
    if jnp.issubdtype(a.dtype, jnp.inexact):
      return a * (1.0 + zero).astype(a.dtype)
    if jnp.issubdtype(a.dtype, jnp.integer):
      return a + zero.astype(a.dtype)
    return a

  return jax.tree.map(tie, tree)


def _adamw_in_backward(spec: AdamWSpec, loss_of, batch, key, grad_norm, opt_state, params, emas, decays,
                       finite):
  """:func:`_fused_adamw`'s update made during a second backward pass: ``loss_of(params, batch, key)`` is
  differentiated again with every parameter passed through :func:`_update_in_backward`, so each leaf's
  moments, parameter and EMAs are written as soon as its gradient exists and the gradients are never held
  together. ``grad_norm`` and ``finite`` come from the first pass; the second pass's inputs are tied to
  ``grad_norm`` so that XLA cannot merge it with the first."""
  adam = opt_state[-1][0]
  sc = _adamw_scalars(spec, opt_state, grad_norm)
  hyper = (spec.b1, spec.b2, spec.eps, spec.weight_decay)
  packed = jnp.stack([sc.scale, sc.step_size, sc.c1, sc.c2, finite.astype(jnp.float32),
                      *[jnp.asarray(d, jnp.float32) for d in decays]])
  leaves, treedef = jax.tree.flatten(params)
  m_l, v_l = treedef.flatten_up_to(adam.mu), treedef.flatten_up_to(adam.nu)
  e_ls = [treedef.flatten_up_to(e) for e in emas]
  e_per_leaf = [tuple(e_l[i] for e_l in e_ls) for i in range(len(leaves))]
  tied_batch, tied_key = _tie((batch, key), grad_norm)
  # The parameters as new values (the same buffers) that exist once grad_norm does: what the second pass
  # derives from them (e.g. a scale broadcast to the activations' shape) is not merged with the first
  # pass's copy, which would then stay alive from the first pass to the second.
  leaves, _ = jax.lax.optimization_barrier((leaves, grad_norm))

  def second_pass(state):
    p_l, m_l, v_l, e_l = state
    hooked = [_update_in_backward(hyper, *x, packed) for x in zip(p_l, m_l, v_l, e_l)]
    with layers.gradients_after_reads():
      return loss_of(treedef.unflatten(hooked), tied_batch, tied_key)

  new_p, new_m, new_v, new_e = jax.grad(second_pass)((leaves, m_l, v_l, e_per_leaf))
  new_e = [[e[j] for e in new_e] for j in range(len(emas))]
  return _adamw_outputs(spec, sc, opt_state, finite, treedef, new_p, new_m, new_v, new_e)


class TrainStep:
  """The compiled train step: call as ``state, metrics = step(state, batch)``.

  Frozen inputs (a frozen VAE / text encoder, or ``None``) are passed to the jitted function as
  an argument (not baked in as constants) and held here, so the public call stays
  ``(state, batch) -> (state, metrics)``. ``jitted`` is the underlying ``jax.jit`` object
  (``jitted._cache_size()`` counts compilations).
  """

  def __init__(self, jitted, frozen: Any, max_bad_steps: int):
    self.jitted = jitted
    self.frozen = frozen
    self.max_bad_steps = max_bad_steps
    self._compiled: tuple[Any, Any] | None = None  # (batch signature, executable) of :meth:`compile`

  def compile(self, state: Any, batch: Any) -> Any:
    """Compiles the step ahead of time for ``state`` and ``batch`` (arrays, or ``jax.ShapeDtypeStruct``s
    with their shardings) and returns XLA's memory analysis (or None).

    Later calls whose batch has the same structure, shapes and dtypes run this executable; any other
    batch goes through ``jitted`` (traced and compiled on first use, as without this call). Compiling
    apart from the first call lets a caller release the compiler's freed host memory
    (:func:`release_host_memory`) before the step's own buffers are allocated.
    """
    executable = self.jitted.lower(state, batch, self.frozen).compile()
    self._compiled = (_signature(batch), executable)
    return executable.memory_analysis()

  def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
    if self._compiled is not None and self._compiled[0] == _signature(batch):
      return self._compiled[1](state, batch, self.frozen)
    return self.jitted(state, batch, self.frozen)

  def raise_if_diverged(self, metrics: dict[str, Any]) -> None:
    """Raises :class:`NonFiniteError` when ``metrics["bad_steps"]`` reached ``max_bad_steps``."""
    bad = int(metrics["bad_steps"])
    if self.max_bad_steps and bad >= self.max_bad_steps:
      raise NonFiniteError(f"{bad} consecutive training steps had non-finite loss or gradients "
                           f"(last finite params kept; {int(metrics['skipped_steps'])} skipped in total); "
                           "lower the learning rate or check the data")


def _signature(tree: Any) -> tuple[Any, tuple[tuple[tuple[int, ...], Any], ...]]:
  return jax.tree.structure(tree), tuple((tuple(x.shape), jnp.dtype(x.dtype)) for x in jax.tree.leaves(tree))


def release_host_memory(clear_caches: bool = False) -> bool:
  """Frees unreachable Python objects (``gc.collect()``), then returns the C heap's free pages to the
  operating system (glibc's ``malloc_trim(0)``). With ``clear_caches``, first drops JAX's caches of traced
  and compiled functions (``jax.clear_caches()``): the executables of functions already called (the
  state's initialiser, say) are freed, and such a function is compiled again if called again; an
  executable the caller holds (:meth:`TrainStep.compile`'s) is kept.

  Tracing and lowering a large step leave reference cycles (traced functions, lowered modules) that
  hold host memory until the cycle collector runs, and host buffers freed by initialisation or by the
  compiler stay in the process's resident set until the allocator returns them; on the CPU backend the
  train step's buffers are host memory too, so a process that releases after building its state and
  after compiling peaks lower. Returns False where the C library has no ``malloc_trim`` (not glibc).
  """
  import ctypes
  import gc

  if clear_caches:
    jax.clear_caches()
  gc.collect()
  try:
    return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
  except (OSError, AttributeError):
    return False


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, mesh: Mesh,
                    state_sharding: TrainState, frozen: Any = None, frozen_sharding: Any = None,
                    ema_decay: float = 0.999, ema_warmup: bool = True, max_bad_steps: int = 10,
                    donate: bool = True, extra_ema: Mapping[str, Decay] | None = None,
                    compiler_options: Mapping[str, Any] | None = None,
                    update_in_backward: bool = False) -> TrainStep:
  """Builds the jitted train step.

  Args:
    loss_fn: ``(params, batch, key, frozen) -> (loss, metrics)``; ``metrics`` is a dict of scalars.
      With ``extra_ema``: ``(params, batch, key, frozen, state) -> (loss, metrics)``, where
      ``state`` is the TrainState before this step's update (its ``step`` and ``extra_ema``
      trees); the loss is differentiated with respect to ``params`` only.
    tx: the optimizer (clipping included, see :func:`make_optimizer`). An :class:`Optimizer` from
      :func:`make_optimizer` is applied fused with the guard and the EMAs, in place (no second copy of
      the state, see ``_fused_adamw``); any other optax transformation is applied, then guarded with
      ``where(finite, new, old)`` per leaf (XLA then holds new and old state together).
    mesh: the ("data", "fsdp") mesh; the batch is split over all its devices.
    state_sharding: shardings of the TrainState (:func:`state_shardings`).
    frozen: a pytree passed unchanged to every call of ``loss_fn`` (frozen networks), or None.
    frozen_sharding: its shardings (default: replicated).
    ema_decay: EMA decay.
    ema_warmup: use min(decay, (1+n)/(10+n)) early in training.
    max_bad_steps: consecutive non-finite steps tolerated before
      :meth:`TrainStep.raise_if_diverged` raises (0: never).
    donate: donate the input state's buffers.
    extra_ema: ``{name: decay}`` of the state's further EMAs (the names given to
      :func:`create_train_state`); a decay is a constant or a function ``step -> decay`` of the
      number of updates before this one. After the optimizer update, ``extra_ema[name] <- decay
      * extra_ema[name] + (1 - decay) * new params`` (no warmup); skipped with the update on a
      non-finite step.
    compiler_options: XLA options for compiling the step (``jax.jit``'s ``compiler_options``), e.g.
      :func:`cpu_scheduler_options` ``("memory")``.
    update_in_backward: differentiate the loss twice: the first pass gives the loss, the gradient norm
      and the non-finite guard; the second applies the fused AdamW update, the guard and the EMAs to each
      parameter as soon as the backward pass reaches it (``_update_in_backward``), so the gradients are
      never held together (one more forward and backward pass per step, the same update up to the float32
      rounding of recomputing the gradients). Needs ``tx`` from :func:`make_optimizer` and no
      ``extra_ema``.

  Returns:
    A :class:`TrainStep`; metrics include ``loss``, ``grad_norm``, ``param_norm`` (after the step),
    ``update_norm`` (of the applied update; 0 on a skipped step),
    ``finite``, ``bad_steps``, ``skipped_steps``, ``<name>_decay`` of each extra EMA and the
    entries from ``loss_fn``.

  Example:
    >>> step = make_train_step(loss_fn, tx, mesh=mesh, state_sharding=shardings)
    >>> state, metrics = step(state, batch)
    >>> step = make_train_step(lambda p, b, k, f, s: my_loss(p, s.extra_ema["target"], b, k), tx, mesh=mesh,
    ...                        state_sharding=shardings, extra_ema={"target": 0.95})
  """
  extra = dict(extra_ema or {})
  _ema_names(extra)

  spec = getattr(tx, "spec", None)
  fused = isinstance(spec, AdamWSpec)
  if update_in_backward and not fused:
    raise ValueError("update_in_backward applies make_optimizer's AdamW in the backward pass; "
                     f"got the optimizer {type(tx).__name__}")
  if update_in_backward and extra:
    raise ValueError(f"update_in_backward does not update extra EMAs (got {sorted(extra)})")

  def step_fn(state: TrainState, batch: Any, frozen: Any):
    have = tuple(sorted(state.extra_ema or {}))
    if have != tuple(sorted(extra)):
      raise ValueError(f"the train state holds extra EMAs {have} but the step updates {tuple(sorted(extra))}; "
                       "pass the same names to create_train_state(extra_ema=...)")
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    with_state = (state,) if extra else ()
    if update_in_backward:
      (loss, aux), grad_norm = _loss_and_grad_norm(loss_fn, state.params, batch, key, frozen)
    else:
      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key, frozen, *with_state)
      grad_norm = _global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    extra_decays = {name: extra_ema_decay(d, state.step) for name, d in extra.items()}
    names = sorted(extra)
    emas = [state.extra_ema[name] for name in names]
    decays = [extra_decays[name] for name in names]
    if state.ema_params is not None:
      emas.append(state.ema_params)
      decays.append(ema_decay_at(state.step, ema_decay, ema_warmup))
    if update_in_backward:
      new_params, new_opt, new_emas, update_norm, ok = _adamw_in_backward(
          spec, lambda p, b, k: loss_fn(p, b, k, frozen)[0], batch, key, grad_norm, state.opt_state,
          state.params, emas, decays, finite)
    elif fused:
      new_params, new_opt, new_emas, update_norm, ok = _fused_adamw(spec, grads, grad_norm, state.opt_state,
                                                                    state.params, emas, decays, finite)
    else:
      new_params, new_opt, new_emas, update_norm, ok = _guarded_update(tx, grads, state.opt_state, state.params,
                                                                       emas, decays, finite)
    new_ema = new_emas.pop() if state.ema_params is not None else None
    new_extra = dict(zip(names, new_emas)) or None
    bad = jnp.where(ok, 0, state.bad_steps + 1).astype(jnp.int32)
    new_state = TrainState(step=state.step + 1, params=new_params, ema_params=new_ema, opt_state=new_opt,
                           rng=state.rng, bad_steps=bad,
                           skipped_steps=state.skipped_steps + (1 - ok.astype(jnp.int32)), extra_ema=new_extra)
    metrics = dict(aux)
    metrics.update({f"{name}_decay": d for name, d in extra_decays.items()})
    metrics.update(loss=loss, grad_norm=grad_norm, param_norm=_global_norm(new_params),
                   update_norm=update_norm, finite=ok, bad_steps=bad, skipped_steps=new_state.skipped_steps)
    return new_state, metrics

  if frozen_sharding is None:
    frozen_sharding = jax.tree.map(lambda _: parallel.replicated(mesh), frozen)
  jitted = jax.jit(step_fn,
                   in_shardings=(state_sharding, parallel.batch_sharding(mesh), frozen_sharding),
                   out_shardings=(state_sharding, parallel.replicated(mesh)),
                   donate_argnums=(0,) if donate else (),
                   compiler_options=dict(compiler_options) if compiler_options else None)
  return TrainStep(jitted, frozen, max_bad_steps)


CPU_SCHEDULERS = {"": None, "default": None, "memory": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
                  "concurrency": "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED"}


def cpu_scheduler_options(scheduler: str, backend: str | None = None) -> dict[str, Any]:
  """Compiler options choosing XLA:CPU's instruction scheduler, for ``make_train_step(compiler_options=...)``.

  ``"memory"`` orders the step's operations to lower its peak of live buffers; ``"concurrency"`` to let
  independent operations run in parallel (more buffers live at once); ``""`` / ``"default"``: XLA's
  choice. Empty (no option) unless ``backend`` (default: ``jax.default_backend()``) is ``"cpu"``, since
  the option means nothing to other compilers.

  Example:
    >>> cpu_scheduler_options("memory", backend="cpu")
    {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}
    >>> cpu_scheduler_options("memory", backend="gpu")
    {}
  """
  if scheduler not in CPU_SCHEDULERS:
    raise ValueError(f"CPU scheduler {scheduler!r} is not one of {sorted(CPU_SCHEDULERS)}")
  kind = CPU_SCHEDULERS[scheduler]
  if kind is None or (backend or jax.default_backend()) != "cpu":
    return {}
  return {"xla_cpu_scheduler_type": kind}
