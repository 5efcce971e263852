"""Shared parity harness for the fast samplers: a fixed toy model written twice (torch and jax),
a driver that runs a diffusers scheduler the way its pipelines do (``set_timesteps``,
``scale_model_input``, ``step``) and records every state, noise injection into diffusers'
``randn_tensor``, and the exact denoiser of Gaussian data for moment checks.

The tests in this file check the harness itself (the two toy models agree; the Gaussian denoiser is
the posterior mean).
"""

from __future__ import annotations

import contextlib
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jdiff import samplers, schedules  # noqa: E402

DIM = 6
BATCH = 3
_rng = np.random.default_rng(1234)
W = (_rng.standard_normal((DIM, DIM)) / np.sqrt(DIM)).astype(np.float32)
U = _rng.standard_normal((DIM,)).astype(np.float32)


def schedule_pair(kind: str = "scaled_linear"):
  """A jdiff schedule and the matching diffusers config kwargs.

  The samplers read only ``alphas_cumprod``; it is taken from diffusers (torch's float32 cumprod)
  so that these tests compare the samplers alone. (jdiff's schedule accumulates the product in
  float64 and can differ in the last bit, which moves a truncated fractional timestep across an
  integer; the schedules' own parity is tested with the schedules.)
  """
  if kind == "scaled_linear":
    sched = schedules.scaled_linear(1000, 0.00085, 0.012)
    cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
  elif kind == "linear":
    sched = schedules.linear(1000, 1e-4, 0.02)
    cfg = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
  else:
    raise ValueError(kind)
  betas = torch.from_numpy(np.asarray(sched.betas).copy())
  np.testing.assert_array_equal(betas.numpy(), _diffusers_betas(cfg))
  abar = torch.cumprod(1.0 - betas, dim=0).numpy()
  return sched.replace(alphas_cumprod=jnp.asarray(abar)), cfg


def _diffusers_betas(cfg) -> np.ndarray:
  from diffusers import DDPMScheduler
  return DDPMScheduler(**cfg).betas.numpy()


def toy_jax(x, t):
  """out = 0.9 x cos(t / 700) + 0.3 tanh(x W + u t / 1000): a fixed smooth map of x [B, ..., D], t [B]."""
  tf = t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))  # [B, 1, ...]
  w, u = jnp.asarray(W), jnp.asarray(U).reshape((1,) * (x.ndim - 1) + (DIM,))
  lin = jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST)
  return 0.9 * x * jnp.cos(tf / 700.0) + 0.3 * jnp.tanh(lin + u * (tf / 1000.0))


def toy_torch(x, t):
  """The same map in torch float32; ``t`` is diffusers' scalar timestep (int or float tensor)."""
  tf = torch.as_tensor(t).to(torch.float32)
  lin = x @ torch.from_numpy(W)
  return 0.9 * x * torch.cos(tf / 700.0) + 0.3 * torch.tanh(lin + torch.from_numpy(U) * (tf / 1000.0))


def x_T(seed: int = 0, batch: int = BATCH, spatial: tuple[int, ...] = ()) -> np.ndarray:
  """Starting noise [B, *spatial, D] (4-D when thresholding: diffusers needs a channel axis)."""
  shape = (batch,) + tuple(spatial) + (DIM,)
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def jdiff_noises(key, num_steps: int, shape) -> list[np.ndarray]:
  """The noise jdiff's stochastic samplers draw at each step (see ``samplers.step_noise``)."""
  keys = jax.random.split(key, num_steps)
  return [np.asarray(samplers.step_noise(keys[i], shape)) for i in range(num_steps)]


@contextlib.contextmanager
def injected_noise(module_name: str, noises):
  """Makes diffusers' ``randn_tensor`` in ``module_name`` return ``noises`` in order."""
  mod = importlib.import_module(module_name)
  orig = mod.randn_tensor
  it = iter(noises)

  def fake(shape, generator=None, device=None, dtype=None, layout=None):
    z = torch.from_numpy(np.asarray(next(it)))
    assert tuple(z.shape) == tuple(shape), (z.shape, shape)
    return z.to(dtype or torch.float32)

  mod.randn_tensor = fake
  try:
    yield
  finally:
    mod.randn_tensor = orig


def run_diffusers(scheduler, xT: np.ndarray, num_steps: int, model=toy_torch, step_kwargs=None,
                  noises=None):
  """Runs ``scheduler`` like a diffusers pipeline; returns every state [calls, B, D] (float32).

  ``noises`` (list) are passed as ``variance_noise`` to schedulers whose ``step`` accepts it.
  """
  scheduler.set_timesteps(num_steps)
  x = torch.from_numpy(xT) * scheduler.init_noise_sigma
  traj, ts = [], []
  for i, t in enumerate(scheduler.timesteps):
    xin = scheduler.scale_model_input(x, t)
    out = model(xin, t)
    kw = dict(step_kwargs or {})
    if noises is not None:
      kw["variance_noise"] = torch.from_numpy(noises[i])
    x = scheduler.step(out, t, x, **kw).prev_sample
    traj.append(x.numpy().copy())
    ts.append(float(t))
  return np.stack(traj), np.asarray(ts)


def recording_model(model, log: list):
  """Wraps a jax model function so that the timesteps it is called with are recorded (eagerly)."""

  def fn(x, t):
    jax.debug.callback(lambda tt: log.append(np.asarray(tt)), t)
    return model(x, t)

  return fn


def max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
  """max over steps of max|a_k - b_k| / max|b_k| (per-step relative difference of whole states)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  axes = tuple(range(1, a.ndim))
  num = np.max(np.abs(a - b), axis=axes)
  den = np.maximum(np.max(np.abs(b), axis=axes), 1e-6)
  return float(np.max(num / den))


# ----------------------------------------------------------------------------- Gaussian data

GAUSS_MU, GAUSS_S = 0.7, 0.5


def gaussian_eps_jax(schedule, mu: float = GAUSS_MU, s: float = GAUSS_S):
  """The exact epsilon-predictor of x0 ~ N(mu, s^2) (iid per element) at (integer or fractional) t.

  eps_hat = sigma_t (x_t - alpha_t mu) / (alpha_t^2 s^2 + sigma_t^2), with the VE sigma of a
  fractional t interpolated linearly in log sigma (the inverse of diffusers' sigma -> t map).
  """
  log_sig = jnp.log(jnp.sqrt((1.0 - schedule.alphas_cumprod) / schedule.alphas_cumprod))
  num_t = log_sig.shape[0]

  def fn(x, t):
    tf = t.astype(jnp.float32)
    lo = jnp.clip(jnp.floor(tf), 0, num_t - 2).astype(jnp.int32)
    w = tf - lo.astype(jnp.float32)
    sig = jnp.exp((1.0 - w) * log_sig[lo] + w * log_sig[lo + 1]).reshape((-1,) + (1,) * (x.ndim - 1))
    alpha = 1.0 / jnp.sqrt(1.0 + sig * sig)
    sigma = sig * alpha
    return sigma * (x - alpha * mu) / (alpha * alpha * s * s + sigma * sigma)

  return fn


def test_toy_models_agree():
  x = x_T(3)
  for t in (0, 17, 500.5, 999):
    a = np.asarray(toy_jax(jnp.asarray(x), jnp.full((BATCH,), t, jnp.float32)))
    b = toy_torch(torch.from_numpy(x), torch.tensor(t)).numpy()
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_gaussian_denoiser_is_posterior_mean():
  # Monte Carlo check of E[eps | x_t] on a narrow bin of x_t, in float64 numpy.
  sched, _ = schedule_pair()
  t = 400
  abar = float(sched.alphas_cumprod[t])
  a, sg = abar ** 0.5, (1 - abar) ** 0.5
  rng = np.random.default_rng(0)
  x0 = GAUSS_MU + GAUSS_S * rng.standard_normal(2_000_000)
  eps = rng.standard_normal(x0.shape)
  xt = a * x0 + sg * eps
  sel = np.abs(xt - 0.9) < 0.01
  expected = float(np.asarray(gaussian_eps_jax(sched)(jnp.full((1, 1), 0.9), jnp.full((1,), t))).ravel()[0])
  assert abs(eps[sel].mean() - expected) < 0.02
