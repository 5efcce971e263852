"""Building blocks shared by the UNet and the autoencoder, NHWC throughout.

Parameter names follow diffusers' module names (``to_q``, ``conv1``, ``time_emb_proj``, ...) so that a
diffusers checkpoint converts by renaming list indices (``resnets.0`` -> ``resnets_0``) and transposing
kernels (conv OIHW -> HWIO, linear (out, in) -> (in, out)); see :mod:`jdiff.convert`.

Every module takes ``dtype`` (the compute dtype, e.g. ``jnp.bfloat16``); parameters stay float32.
Normalisation statistics, softmax and the sinusoidal embedding are computed in float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.models.configs import check_remat

__all__ = [
    "attention_implementation",
    "convolution_backward",
    "remat_backward",
    "attend",
    "Conv2D",
    "timestep_embedding",
    "TimestepEmbedding",
    "ResnetBlock2D",
    "Attention",
    "SpatialAttention",
    "GEGLU",
    "gelu_exact",
    "FeedForward",
    "BasicTransformerBlock",
    "Transformer2D",
    "Downsample2D",
    "Upsample2D",
    "remat_module",
]

Dtype = Any


def timestep_embedding(t: jax.Array, dim: int, *, flip_sin_to_cos: bool = False,
                       freq_shift: float = 1.0, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps, as diffusers' ``Timesteps``.

  Frequencies are ``exp(-log(max_period) * i / (dim / 2 - freq_shift))`` for ``i < dim / 2``; the
  output is ``[sin, cos]`` (``[cos, sin]`` with ``flip_sin_to_cos``), zero-padded when ``dim`` is odd.

  Args:
    t: timesteps [B] (int or float).
    dim: embedding size.
    flip_sin_to_cos: put the cosines first.
    freq_shift: diffusers' ``downscale_freq_shift``.
    max_period: the longest period.

  Returns:
    float32 [B, dim].

  Example:
    >>> timestep_embedding(jnp.array([0, 500]), 320, flip_sin_to_cos=True, freq_shift=0).shape
    (2, 320)
  """
  if t.ndim != 1:
    raise ValueError(f"timesteps must have shape [B], got {t.shape}")
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  freqs = jnp.exp(exponent)  # [half]
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, half]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _group_norm(groups: int, eps: float, dtype: Dtype, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def _conv(features: int, kernel: int, dtype: Dtype, name: str, *, stride: int = 1,
          padding: Any = None) -> Conv2D:
  pad = (kernel - 1) // 2 if padding is None else padding
  if isinstance(pad, int):
    pad = ((pad, pad), (pad, pad))
  return Conv2D(features, kernel, stride=stride, padding=pad, dtype=dtype, name=name)


def _conv_as_matmul(x: jax.Array, kernel: jax.Array, stride: int,
                    padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """A 2-D convolution as one matmul over gathered patches (im2col), NHWC / HWIO."""
  kh, kw, cin, cout = kernel.shape
  _, hgt, wid, _ = x.shape
  (pt, pb), (pl, pr) = padding
  ho = (hgt + pt + pb - kh) // stride + 1
  wo = (wid + pl + pr - kw) // stride + 1
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  taps = [xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
          for i in range(kh) for j in range(kw)]
  patches = jnp.concatenate(taps, axis=-1)  # [B, Ho, Wo, kh * kw * C_in], (i, j, c) order = HWIO
  return jnp.einsum("bhwk,ko->bhwo", patches, kernel.reshape(kh * kw * cin, cout))


CONVOLUTION_BACKWARDS = (None, "autodiff", "late")
_conv_backward: list[str | None] = [None]


@contextlib.contextmanager
def convolution_backward(mode: str | None) -> Iterator[None]:
  """Chooses how :class:`Conv2D`'s k x k convolutions are differentiated, for modules TRACED inside.

  ``None`` / ``"autodiff"`` (default): JAX's own derivative. ``"late"``: the same derivative (same
  operations, same values), with the kernel made data-dependent on the output's cotangent in the
  backward pass (multiplied by an exact 1 computed from it), so the kernel's rearranged copy that
  the input gradient uses (XLA:CPU transposes it) is made when that cotangent exists rather than
  at the start of the program, where every layer's copy would be live at once. A "late"
  convolution has no forward-mode derivative (``jax.jvp`` raises): use it for training steps, not
  for forward-mode research code. Read when a function is traced.

  Example:
    >>> with convolution_backward("late"):  # doctest: +SKIP
    ...   compiled = jax.jit(train_step).lower(state, batch).compile()
  """
  if mode not in CONVOLUTION_BACKWARDS:
    raise ValueError(f"convolution backward {mode!r} is not one of {CONVOLUTION_BACKWARDS}")
  with _holding(_conv_backward, mode):
    yield


_gradients_after_reads: list[bool] = [False]


@contextlib.contextmanager
def gradients_after_reads() -> Iterator[None]:
  """For functions TRACED inside: each "late" convolution (:func:`convolution_backward`) and "late"
  rematerialised block (:func:`remat_backward`) releases its parameters' gradients only after its
  backward pass has read those parameters (the gradients multiplied by an exact 1 computed from the input
  cotangent). A consumer of a parameter's gradient that overwrites the parameter's buffer in place, as
  the train step's ``update_in_backward`` does, then comes after every read of it, and XLA needs no copy
  of the parameter to keep for those reads. Same values; used by
  :func:`jdiff.training.make_train_step`.
  """
  with _holding(_gradients_after_reads, True):
    yield


def _one_from(a: jax.Array) -> jax.Array:
  """1 + 0 * a[0, ..., 0] as float32: exactly 1 (NaN where that element is not finite)."""
  return 1.0 + 0.0 * a[(0,) * a.ndim].astype(jnp.float32)


@contextlib.contextmanager
def _holding(slot: list, value: Any) -> Iterator[None]:
  """Sets ``slot[0]`` to ``value`` inside the block (a trace-time setting), restoring it after."""
  previous = slot[0]
  slot[0] = value
  try:
    yield
  finally:
    slot[0] = previous


def _conv_nhwc(x: jax.Array, kernel: jax.Array, stride: int, padding: tuple) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv_late_fwd(x, kernel, stride, padding):
  return _conv_nhwc(x, kernel, stride, padding), (x, kernel)


def _conv_late_bwd(stride, padding, residuals, g):
  x, kernel = residuals
  # The kernel read by the backward convolutions now depends on g (times an exact 1 taken from it), so
  # nothing is derived from it earlier.
  one = _one_from(g).astype(kernel.dtype)
  _, vjp = jax.vjp(lambda a, b: _conv_nhwc(a, b, stride, padding), x, kernel * one)
  return vjp(g)


_conv_late = jax.custom_vjp(_conv_nhwc, nondiff_argnums=(2, 3))  # the convolution of convolution_backward("late")
_conv_late.defvjp(_conv_late_fwd, _conv_late_bwd)


def _conv_late_tied_bwd(stride, padding, residuals, g):
  dx, dk = _conv_late_bwd(stride, padding, residuals, g)
  return dx, dk * _one_from(dx).astype(dk.dtype)


_conv_late_tied = jax.custom_vjp(_conv_nhwc, nondiff_argnums=(2, 3))  # ... under gradients_after_reads()
_conv_late_tied.defvjp(_conv_late_fwd, _conv_late_tied_bwd)


class Conv2D(nn.Module):
  """Square-kernel NHWC convolution with ``flax.linen.Conv``'s parameters (``kernel`` [k, k, C_in, C],
  ``bias`` [C]), initialisation and numerics.

  1x1 convolutions run as a matmul over channels. On inputs spatially smaller than the kernel (the
  2x2 deepest level of a UNet on small latents) XLA's CPU convolution is slow (measured 8-9x slower
  than a matmul for [64, 2, 2, 128] inputs, forward and backward); there the same convolution runs as
  one matmul over gathered patches (same products, summed in another order: float32 rounding level).

  Example:
    >>> y = Conv2D(64, 3, padding=((1, 1), (1, 1))).apply(params, x)  # x [B, H, W, C_in]
  """

  features: int
  kernel_size: int
  stride: int = 1
  padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
  dtype: Dtype = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"Conv2D expects NHWC input [B, H, W, C], got shape {x.shape}")
    k = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    padding = tuple(tuple(int(p) for p in pair) for pair in self.padding)
    if k == 1 and self.stride == 1 and padding == ((0, 0), (0, 0)):
      y = jnp.einsum("bhwc,co->bhwo", x, kernel[0, 0])  # a 1x1 convolution is a matmul over C
    elif x.shape[1] < k or x.shape[2] < k:
      y = _conv_as_matmul(x, kernel, self.stride, padding)
    elif _conv_backward[0] == "late":
      y = (_conv_late_tied if _gradients_after_reads[0] else _conv_late)(x, kernel, self.stride, padding)
    else:
      y = _conv_nhwc(x, kernel, self.stride, padding)
    return y + bias[None, None, None, :]  # [B, H', W', features]


class TimestepEmbedding(nn.Module):
  """Two-layer MLP on a timestep (or class) embedding: ``linear_2(silu(linear_1(x)))``.

  ``cond_proj_dim`` adds ``cond_proj(condition)`` (no bias) to the input first, as LCM's guidance
  embedding does.
  """

  features: int
  cond_proj_dim: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, condition: jax.Array | None = None) -> jax.Array:
    x = x.astype(self.dtype)  # [B, D_in]
    if self.cond_proj_dim is not None:
      if condition is None:
        raise ValueError("this UNet has time_cond_proj_dim set: pass timestep_cond [B, "
                         f"{self.cond_proj_dim}]")
      x = x + nn.Dense(x.shape[-1], use_bias=False, dtype=self.dtype, name="cond_proj")(condition)
    x = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x)
    x = nn.silu(x)
    return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(x)  # [B, features]


class ResnetBlock2D(nn.Module):
  """GroupNorm-SiLU-conv twice, optional time embedding added in between, 1x1 shortcut when channels
  change; the output is ``(x + h) / output_scale_factor``.

  Example:
    >>> y = ResnetBlock2D(64).apply(params, x, temb)  # x [B, H, W, C], temb [B, T]
  """

  features: int
  groups: int = 32
  eps: float = 1e-5
  dropout: float = 0.0
  output_scale_factor: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None = None, train: bool = False) -> jax.Array:
    h = _group_norm(self.groups, self.eps, self.dtype, "norm1")(x)  # [B, H, W, C_in]
    h = nn.silu(h)
    h = _conv(self.features, 3, self.dtype, "conv1")(h)  # [B, H, W, C]
    if temb is not None:
      e = nn.Dense(self.features, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))  # [B, C]
      h = h + e[:, None, None, :]
    h = _group_norm(self.groups, self.eps, self.dtype, "norm2")(h)
    h = nn.silu(h)
    if self.dropout > 0:
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _conv(self.features, 3, self.dtype, "conv2")(h)
    if x.shape[-1] != self.features:
      x = _conv(self.features, 1, self.dtype, "conv_shortcut")(x)
    out = x.astype(h.dtype) + h
    if self.output_scale_factor != 1.0:
      out = out / self.output_scale_factor
    return out


def _save_matmuls(prim, *_, **params) -> bool:
  return prim.name in ("dot_general", "conv_general_dilated")


def _save_weight_matmuls(prim, *_, **params) -> bool:
  if prim.name == "conv_general_dilated":
    return True
  if prim.name == "dot_general":
    lhs_batch = params["dimension_numbers"][1][0]
    return not lhs_batch  # a matmul against a weight; attention's products carry batch dimensions
  return False


_POLICIES = {True: None, "full": None, "matmuls": _save_matmuls, "weights": _save_weight_matmuls}


REMAT_BACKWARDS = (None, "autodiff", "late")
_remat_backward: list[str | None] = [None]


@contextlib.contextmanager
def remat_backward(mode: str | None) -> Iterator[None]:
  """Chooses how blocks built by :func:`remat_module` with ``remat=True`` are recomputed, for modules TRACED
  inside.

  ``None`` / ``"autodiff"`` (default): ``nn.remat`` (``jax.checkpoint``). Its recomputation depends only on
  the block's inputs, so a compiler may schedule it right after the forward pass (XLA:CPU does), and then
  the recomputed activations of many blocks are live together. ``"late"``: the same recomputation and the
  same derivative, made into one step of the backward pass by two data dependencies on exact 1s: the
  block's parameters and inputs are multiplied by one computed from the output's cotangent (the block is
  recomputed once that cotangent exists), and the input's cotangent by one computed from every parameter
  gradient of the block (the blocks before it start their backward pass once this one's is complete).
  A "late" block has no forward-mode derivative (``jax.jvp`` raises), takes no dropout while training
  (its recomputation would need the forward pass's random key) and supports ``remat=True`` only (not the
  saving policies). Read when a function is traced.

  Example:
    >>> with remat_backward("late"):  # doctest: +SKIP
    ...   compiled = jax.jit(train_step).lower(state, batch).compile()
  """
  if mode not in REMAT_BACKWARDS:
    raise ValueError(f"remat backward {mode!r} is not one of {REMAT_BACKWARDS}")
  with _holding(_remat_backward, mode):
    yield


def _exact_one(tree: Any) -> jax.Array:
  """1 + 0 * (sum of the first few elements of each leaf): exactly 1 (NaN where such an element is not
  finite, as the gradients then are), computable only once every leaf exists. The sums are reductions,
  which XLA computes once into a scalar rather than repeating the reads in every consumer of the 1 (which
  would keep the leaves alive as long as those consumers)."""
  firsts = [jnp.sum(leaf.reshape(-1)[:8].astype(jnp.float32)) for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(leaf.dtype, jnp.inexact)]
  return 1.0 + 0.0 * sum(firsts, jnp.float32(0.0))


def _tied(tree: Any, one: jax.Array) -> Any:
  return jax.tree.map(lambda a: a * one.astype(a.dtype) if jnp.issubdtype(a.dtype, jnp.inexact) else a, tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _late_remat_call(fn, params, args):
  return fn(params, args)


def _late_remat_fwd(fn, params, args):
  return fn(params, args), (params, args)


def _late_remat_grads(fn, residuals, g):
  """The block recomputed from its inputs tied to ``g``, and its parameter and input cotangents."""
  params, args = residuals
  one = _exact_one(g)
  _, vjp = jax.vjp(fn, _tied(params, one), _tied(args, one))
  return vjp(g)


def _late_remat_bwd(fn, residuals, g):
  d_params, d_args = _late_remat_grads(fn, residuals, g)
  return d_params, _tied(d_args, _exact_one(d_params))


_late_remat_call.defvjp(_late_remat_fwd, _late_remat_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _late_remat_tied_call(fn, params, args):  # _late_remat_call under gradients_after_reads()
  return fn(params, args)


def _late_remat_tied_bwd(fn, residuals, g):
  d_params, d_args = _late_remat_grads(fn, residuals, g)
  d_params = _tied(d_params, _exact_one(d_args))
  return d_params, _tied(d_args, _exact_one(d_params))


_late_remat_tied_call.defvjp(_late_remat_fwd, _late_remat_tied_bwd)


def _late_remat_class(cls: type[nn.Module], static_argnums: tuple[int, ...]) -> type[nn.Module]:
  """``cls`` whose call, outside initialisation, is :func:`_late_remat_call` of its plain ``apply``."""
  static = {i - 1 for i in static_argnums}  # positions among the call's arguments (static_argnums count self)

  class LateRemat(cls):
    def __call__(self, *args):
      if self.is_initializing():
        return super().__call__(*args)
      if self.is_mutable_collection("intermediates") or (
          getattr(self, "dropout", 0.0) and any(args[i] is True for i in static)):
        raise ValueError(f"remat_backward('late') cannot recompute {cls.__name__} with dropout while training "
                         "or while capturing intermediates; use remat_backward(None)")
      plain = cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls)
                     if f.init and f.name not in ("parent", "name")}, parent=None)
      variables = self.variables
      others = {k: v for k, v in variables.items() if k != "params"}
      fixed = {i: a for i, a in enumerate(args) if i in static}
      traced = tuple(a for i, a in enumerate(args) if i not in static)

      def fn(params, dyn):
        it = iter(dyn)
        full = [fixed[i] if i in fixed else next(it) for i in range(len(args))]
        return plain.apply({"params": params, **others}, *full)

      call = _late_remat_tied_call if _gradients_after_reads[0] else _late_remat_call
      return call(fn, variables.get("params", {}), traced)

  LateRemat.__name__ = LateRemat.__qualname__ = f"LateRemat{cls.__name__}"
  return LateRemat


def remat_module(cls: type[nn.Module], remat: bool | str, static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
  """``cls`` as is (``remat`` False) or wrapped in ``nn.remat`` with the policy named by ``remat``.

  True / "full" saves nothing inside the block (recomputes all of it in the backward pass);
  "matmuls" saves the outputs of convolutions and matmuls; "weights" saves those of convolutions and
  weight matmuls only (see :func:`jdiff.models.configs.check_remat`). The values are the same in
  every case; only memory and recomputation differ. Under :func:`remat_backward` ``"late"``, True /
  "full" blocks are recomputed within their own step of the backward pass.

  Example:
    >>> Block = remat_module(ResnetBlock2D, "matmuls", static_argnums=(3,))
  """
  check_remat(remat)
  if remat is False:
    return cls
  if _remat_backward[0] == "late":
    if _POLICIES[remat] is not None:
      raise ValueError(f"remat_backward('late') recomputes whole blocks (remat=True); got remat={remat!r}")
    return _late_remat_class(cls, static_argnums)
  return nn.remat(cls, static_argnums=static_argnums, policy=_POLICIES[remat])


_ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn", "chunked")
ATTENTION_CHUNK = 512  # queries per chunk of the "chunked" implementation
_attention_impl: list[str | None] = [None]


@contextlib.contextmanager
def attention_implementation(implementation: str | None) -> Iterator[None]:
  """Chooses ``jax.nn.dot_product_attention``'s implementation for modules TRACED inside the block.

  ``None`` (default) and ``"xla"`` use XLA's attention; ``"cudnn"`` uses cuDNN's fused (flash)
  attention on NVIDIA GPUs for the calls it supports (bfloat16/float16 inputs, head size a multiple
  of 8 and at most 128) and XLA's for the others (e.g. float32-upcast or 160-wide heads).
  ``"chunked"`` computes the attention :data:`ATTENTION_CHUNK` queries at a time, and its gradient
  from one chunk's recomputed scores at a time (:func:`_attend_chunked`), so no [B, heads, T, S] score matrix is
  held whole, forward or backward (e.g. 512 MiB per SD1.5 64x64 self-attention in float32); sequences
  of at most one chunk, or not a multiple of it, use the default path; the chunked path has no
  forward-mode derivative (``jax.jvp`` raises). The choice is read when a
  function is traced, so build (and first call / lower) the jitted function inside.

  Example:
    >>> with attention_implementation("cudnn"):  # doctest: +SKIP
    ...   compiled = jax.jit(step).lower(state, batch).compile()
  """
  if implementation not in _ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is not one of {_ATTENTION_IMPLEMENTATIONS}")
  with _holding(_attention_impl, implementation):
    yield


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, *, upcast: bool) -> jax.Array:
  """Multi-head scaled dot-product attention on [B, T, heads * d] projections."""
  b, tq, inner = q.shape
  d = inner // heads
  q = q.reshape(b, tq, heads, d)
  k = k.reshape(b, k.shape[1], heads, d)
  v = v.reshape(b, v.shape[1], heads, d)
  dtype = q.dtype
  if upcast and dtype != jnp.float32:
    q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
  impl = _attention_impl[0]
  if impl == "cudnn" and not (q.dtype in (jnp.bfloat16, jnp.float16) and d % 8 == 0 and d <= 128):
    impl = "xla"  # outside cuDNN's fused-attention envelope
  if impl == "chunked" and not (tq > ATTENTION_CHUNK and tq % ATTENTION_CHUNK == 0):
    impl = None  # at most one chunk, or not a multiple of it: the default path
  if impl == "chunked":
    out = _attend_chunked(q, k, v, 1.0 / math.sqrt(d), ATTENTION_CHUNK)
  elif impl != "cudnn" and q.dtype == jnp.float32:
    out = _attend_heads_major(q, k, v, 1.0 / math.sqrt(d))
  else:
    out = jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(d), implementation=impl)  # [B, T, heads, d]
  return out.astype(dtype).reshape(b, tq, inner)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, *, upcast: bool = False) -> jax.Array:
  """Multi-head scaled dot-product attention on projections q [B, T, heads * d], k and v [B, S, heads * d].

  The attention core of :class:`Attention` (``jax.nn.dot_product_attention``, honouring
  :func:`attention_implementation`), for modules that project or normalise q/k themselves.
  ``upcast`` computes it in float32 whatever the input dtype. Returns [B, T, heads * d].

  Example:
    >>> out = attend(q, k, v, heads=8)  # doctest: +SKIP
  """
  return _attend(q, k, v, heads, upcast=upcast)


def _attend_heads_major(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
  """float32 attention on [B, T, heads, d] inputs, computed in [B, heads, T, d] layout.

  The same math as ``jax.nn.dot_product_attention``'s XLA path (logits scaled after the product,
  softmax over keys), but with the heads moved next to the batch axis first, so that both batched
  matmuls and their transposes in the backward pass run on contiguous [B * heads] batches: on CPU
  this made the attention core's forward + backward about 1.5-2x faster (digits UNet shapes).
  """
  q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # [B, heads, T|S, d]
  logits = jnp.einsum("bntd,bnsd->bnts", q, k) * jnp.float32(scale)  # [B, heads, T, S]
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bnts,bnsd->bntd", probs, v)  # [B, heads, T, d]
  return out.transpose(0, 2, 1, 3)  # [B, T, heads, d]


def _chunk_logits(qi: jax.Array, k: jax.Array, scale: float) -> jax.Array:
  """float32 scores [B, heads, c, S] of query chunk ``qi`` [B, heads, c, d] against keys [B, S, heads, d]."""
  return jnp.einsum("bntd,bsnd->bnts", qi, k, preferred_element_type=jnp.float32) * jnp.float32(scale)


def _query_chunk(a: jax.Array, i: jax.Array, chunk: int) -> jax.Array:
  """Queries ``i * chunk`` onwards of ``a`` [B, T, heads, d], heads-major: [B, heads, chunk, d]."""
  return jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk, axis=1).transpose(0, 2, 1, 3)


def _chunked_forward(q, k, v, scale, chunk):
  """Output [B, T, heads, d] and log-sum-exp [B, heads, T] of :func:`_attend_chunked`."""
  def body(i, carry):
    out, lse = carry
    logits = _chunk_logits(_query_chunk(q, i, chunk), k, scale)  # [B, heads, chunk, S]
    peak = jnp.max(logits, axis=-1, keepdims=True)
    unnormalized = jnp.exp(logits - peak)
    total = jnp.sum(unnormalized, axis=-1, keepdims=True)
    oi = jnp.einsum("bnts,bsnd->btnd", (unnormalized / total).astype(v.dtype), v)
    out = jax.lax.dynamic_update_slice_in_dim(out, oi.astype(out.dtype), i * chunk, axis=1)
    lse = jax.lax.dynamic_update_slice_in_dim(lse, (peak + jnp.log(total))[..., 0], i * chunk, axis=2)
    return out, lse

  b, t, n, _ = q.shape
  return jax.lax.fori_loop(0, t // chunk, body, (q, jnp.zeros((b, n, t), jnp.float32)))  # out overwrites q's copy


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attend_chunked(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, chunk: int) -> jax.Array:
  """Attention on [B, T, heads, d] inputs, ``chunk`` queries at a time (T a multiple of ``chunk``; q, k, v
  of one dtype and head size d, as :func:`_attend` gives them).

  The forward pass forms, soft-maxes and applies one chunk's scores [B, heads, chunk, S] at a time
  (softmax over all keys of each query: the values of :func:`_attend_heads_major`) and keeps each
  query's log-sum-exp. The backward pass (a custom VJP) recomputes one chunk's probabilities at a
  time from q, k and the log-sum-exp, writes that chunk's dq and accumulates dk and dv. Only the
  inputs, the output and the log-sum-exps are saved, in the callers' [B, T, heads, d] layout (no
  transposed copies), so the memory is one chunk's scores, not all T queries'. Every loop buffer starts
  from data (the first chunk's gradients, a copy of an input), not from a zero constant, so the
  compiler allocates it when its loop is reached.
  """
  return _chunked_forward(q, k, v, scale, chunk)[0]


def _attend_chunked_fwd(q, k, v, scale, chunk):
  out, lse = _chunked_forward(q, k, v, scale, chunk)
  return out, (q, k, v, out, lse)


def _attend_chunked_bwd(scale, chunk, residuals, g):
  q, k, v, out, lse = residuals
  # sum_s p_s * dp_s = g . out: the softmax backward's row term, one float per query
  row = jnp.einsum("btnd,btnd->bnt", g, out, preferred_element_type=jnp.float32)
  f32 = jnp.float32

  def grads(i):
    qi, gi = _query_chunk(q, i, chunk), _query_chunk(g, i, chunk)
    at = lambda a: jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk, axis=2)
    probs = jnp.exp(_chunk_logits(qi, k, scale) - at(lse)[..., None])  # [B, heads, chunk, S]
    dv = jnp.einsum("bnts,bntd->bsnd", probs.astype(v.dtype), gi, preferred_element_type=f32)
    dprobs = jnp.einsum("bntd,bsnd->bnts", gi, v, preferred_element_type=f32)
    dlogits = (probs * (dprobs - at(row)[..., None]) * f32(scale)).astype(q.dtype)
    dq = jnp.einsum("bnts,bsnd->btnd", dlogits, k, preferred_element_type=f32)
    dk = jnp.einsum("bnts,bntd->bsnd", dlogits, qi, preferred_element_type=f32)
    return dq, dk, dv

  def body(i, carry):
    dq_all, dk, dv = carry
    dq, dk_i, dv_i = grads(i)
    dq_all = jax.lax.dynamic_update_slice_in_dim(dq_all, dq.astype(dq_all.dtype), i * chunk, axis=1)
    return dq_all, dk + dk_i, dv + dv_i

  dq0, dk, dv = grads(0)  # the first chunk outside the loop: the accumulators start from it
  dq_all = jax.lax.dynamic_update_slice_in_dim(g, dq0.astype(g.dtype), 0, axis=1)  # g: q's shape and dtype
  dq_all, dk, dv = jax.lax.fori_loop(1, q.shape[1] // chunk, body, (dq_all, dk, dv))
  return dq_all, dk.astype(k.dtype), dv.astype(v.dtype)


_attend_chunked.defvjp(_attend_chunked_fwd, _attend_chunked_bwd)


class Attention(nn.Module):
  """Multi-head (self or cross) attention with diffusers' ``to_q/to_k/to_v/to_out.0`` projections.

  Example:
    >>> y = Attention(heads=8, head_dim=40).apply(params, x, context)  # x [B, T, C], context [B, S, D]
  """

  heads: int
  head_dim: int
  qkv_bias: bool = False
  upcast: bool = False
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None, train: bool = False) -> jax.Array:
    inner = self.heads * self.head_dim
    context = x if context is None else context.astype(self.dtype)
    q = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_q")(x)  # [B, T, inner]
    k = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_k")(context)  # [B, S, inner]
    v = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_v")(context)
    out = _attend(q, k, v, self.heads, upcast=self.upcast)
    out = nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out)  # [B, T, C]
    if self.dropout > 0:
      out = nn.Dropout(self.dropout, deterministic=not train)(out)
    return out


class SpatialAttention(nn.Module):
  """The autoencoder's single-head attention over pixels: GroupNorm, attention, residual.

  Example:
    >>> y = SpatialAttention(groups=32).apply(params, x)  # x [B, H, W, C]
  """

  groups: int = 32
  eps: float = 1e-6
  head_dim: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    head_dim = self.head_dim or c
    h = _group_norm(self.groups, self.eps, self.dtype, "group_norm")(x).reshape(b, hgt * wid, c)
    q = nn.Dense(c, dtype=self.dtype, name="to_q")(h)  # [B, HW, C]
    k = nn.Dense(c, dtype=self.dtype, name="to_k")(h)
    v = nn.Dense(c, dtype=self.dtype, name="to_v")(h)
    out = _attend(q, k, v, c // head_dim, upcast=True)
    out = nn.Dense(c, dtype=self.dtype, name="to_out_0")(out)
    return x.astype(out.dtype) + out.reshape(b, hgt, wid, c)


class GEGLU(nn.Module):
  """``a * gelu(g)`` with ``[a, g] = proj(x)`` (exact GELU), diffusers' ``GEGLU``."""

  inner: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    a, g = _HalvesDense(self.inner, dtype=self.dtype, name="proj")(x)  # [B, T, inner] each
    return a * gelu_exact(g)  # [B, T, inner]


def gelu_exact(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, ``x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2)))``: PyTorch's formula.

  Same function as ``jax.nn.gelu(x, approximate=False)`` (which evaluates it through ``erfc``);
  XLA's CPU ``erf`` is about twice as fast as its ``erfc`` (float32 error vs float64 below 2e-6).

  Example:
    >>> gelu_exact(jnp.array([0.0, 1.0]))  # doctest: +SKIP
    Array([0.       , 0.8413447], dtype=float32)
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(1.0 / math.sqrt(2.0), x.dtype)))


class _HalvesDense(nn.Module):
  """``jnp.split(nn.Dense(2 * features)(x), 2, -1)`` with the same parameters (``kernel`` [C, 2F],
  ``bias`` [2F]) and initialisation, computed as two matmuls on the kernel's halves: the backward
  pass then needs no concatenation of the two [B, T, F] activation gradients (measured ~15% off the
  feed-forward's forward + backward on CPU)."""

  features: int
  dtype: Dtype = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    f = self.features
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 2 * f), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), (2 * f,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    lead = (1,) * (x.ndim - 1)

    def half(i: int) -> jax.Array:
      y = jax.lax.dot_general(x, kernel[:, i * f:(i + 1) * f], (((x.ndim - 1,), (0,)), ((), ())))
      return y + bias[i * f:(i + 1) * f].reshape(lead + (f,))

    return half(0), half(1)


class FeedForward(nn.Module):
  """GEGLU feed-forward ``net_2(GEGLU(x))`` with a ``mult``-times wider hidden layer."""

  mult: int = 4
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    dim = x.shape[-1]
    h = GEGLU(dim * self.mult, dtype=self.dtype, name="net_0")(x)  # [B, T, mult * dim]
    if self.dropout > 0:
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return nn.Dense(dim, dtype=self.dtype, name="net_2")(h)  # [B, T, dim]


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each with a residual."""

  heads: int
  head_dim: int
  upcast_attention: bool = False
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, train: bool = False) -> jax.Array:
    def norm(name):
      return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, use_fast_variance=False, name=name)

    def attn(name):
      return Attention(self.heads, self.head_dim, upcast=self.upcast_attention, dropout=self.dropout,
                       dtype=self.dtype, name=name)

    x = x + attn("attn1")(norm("norm1")(x), None, train)  # [B, T, C]
    x = x + attn("attn2")(norm("norm2")(x), context, train)
    x = x + FeedForward(dropout=self.dropout, dtype=self.dtype, name="ff")(norm("norm3")(x), train)
    return x


class Transformer2D(nn.Module):
  """diffusers' ``Transformer2DModel`` on continuous NHWC input: GroupNorm, ``proj_in`` (1x1 conv or
  linear), ``num_layers`` transformer blocks, ``proj_out``, residual.

  Example:
    >>> y = Transformer2D(heads=8, head_dim=40).apply(params, x, context)  # [B, H, W, 320], [B, 77, 768]
  """

  heads: int
  head_dim: int
  num_layers: int = 1
  groups: int = 32
  use_linear_projection: bool = False
  upcast_attention: bool = False
  dropout: float = 0.0
  remat: bool | str = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, train: bool = False) -> jax.Array:
    b, hgt, wid, c = x.shape
    inner = self.heads * self.head_dim
    h = _group_norm(self.groups, 1e-6, self.dtype, "norm")(x)  # [B, H, W, C]
    if self.use_linear_projection:
      h = nn.Dense(inner, dtype=self.dtype, name="proj_in")(h.reshape(b, hgt * wid, c))
    else:
      h = _conv(inner, 1, self.dtype, "proj_in")(h).reshape(b, hgt * wid, inner)
    block = remat_module(BasicTransformerBlock, self.remat, static_argnums=(3,))
    for i in range(self.num_layers):
      h = block(self.heads, self.head_dim, upcast_attention=self.upcast_attention,
                dropout=self.dropout, dtype=self.dtype, name=f"transformer_blocks_{i}")(h, context, train)
    if self.use_linear_projection:
      h = nn.Dense(c, dtype=self.dtype, name="proj_out")(h).reshape(b, hgt, wid, c)
    else:
      h = _conv(c, 1, self.dtype, "proj_out")(h.reshape(b, hgt, wid, inner))
    return x.astype(h.dtype) + h


class Downsample2D(nn.Module):
  """Strided 3x3 conv halving H and W. ``padding`` 1 pads all sides (UNet); 0 pads only bottom/right
  by one (the autoencoder)."""

  features: int
  padding: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad = ((self.padding, self.padding),) * 2 if self.padding else ((0, 1), (0, 1))
    return _conv(self.features, 3, self.dtype, "conv", stride=2, padding=pad)(x)  # [B, H/2, W/2, C]


class Upsample2D(nn.Module):
  """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # [B, 2H, 2W, C]
    return _conv(self.features, 3, self.dtype, "conv")(x)
