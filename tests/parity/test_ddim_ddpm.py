"""DDIM and DDPM against diffusers' schedulers, stepped side by side on the same model function and
noise, over the option combinations jdiff supports (float32, max relative difference <= 1e-5)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jdiff import samplers, schedules  # noqa: E402

SHAPE = (2, 6, 6, 3)
PRED_NAMES = {"epsilon": "epsilon", "v": "v_prediction", "sample": "sample"}


def jax_model(x, t):
  """A fixed nonlinear stand-in for a network, written identically for jax and torch."""
  w = 1.0 + t.astype(jnp.float32).reshape(-1, 1, 1, 1) / 1000.0
  return jnp.tanh(0.7 * x * w) + 0.05 * x - 0.02 * w


def torch_model(x, t):
  w = 1.0 + float(t) / 1000.0
  return torch.tanh(0.7 * x * w) + 0.05 * x - 0.02 * w


def _rel(a, b):
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def _x_T(seed=0):
  return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32) * 1.5


def _noises(key, n):
  keys = jax.random.split(key, n)
  return [np.array(samplers.step_noise(k, SHAPE)) for k in keys]


SCHEDS = {
    "scaled_linear": (dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
                      lambda: schedules.scaled_linear(1000, 0.00085, 0.012)),
    "linear": (dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
               lambda: schedules.linear(1000, 1e-4, 0.02)),
    "cosine": (dict(beta_schedule="squaredcos_cap_v2"), lambda: schedules.cosine(1000)),
}


def run_ddim_pair(*, pred, spacing, offset, alpha_one, clip, thresh, eta, clipped_eps, sched="scaled_linear",
                  num_steps=10):
  kw, make = SCHEDS[sched]
  ref = diffusers.DDIMScheduler(num_train_timesteps=1000, prediction_type=PRED_NAMES[pred],
                                timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=alpha_one,
                                clip_sample=clip, clip_sample_range=1.5, thresholding=thresh,
                                sample_max_value=2.0, **kw)
  ref.set_timesteps(num_steps)
  key = jax.random.key(3)
  noises = _noises(key, num_steps)
  x = torch.from_numpy(_x_T())
  traj_ref = []
  for i, t in enumerate(ref.timesteps):
    out = torch_model(x, t)
    x = ref.step(out, t, x, eta=eta, use_clipped_model_output=clipped_eps,
                 variance_noise=torch.from_numpy(noises[i]) if eta > 0 else None).prev_sample
    traj_ref.append(x.numpy())
  _, traj = samplers.ddim(jax_model, make(), jnp.asarray(_x_T()), num_steps=num_steps, eta=eta,
                          key=key if eta > 0 else None, prediction=pred, timestep_spacing=spacing,
                          steps_offset=offset, set_alpha_to_one=alpha_one, clip_sample=clip,
                          clip_sample_range=1.5, thresholding=thresh, sample_max_value=2.0,
                          use_clipped_model_output=clipped_eps, return_trajectory=True)
  traj = np.asarray(traj)
  return max(_rel(traj[i], traj_ref[i]) for i in range(num_steps))


# Every combination of the options that change the timestep grid or the update, crossed fully.
GRID = list(itertools.product(["epsilon", "v", "sample"], ["leading", "trailing", "linspace"], [0, 1],
                              [True, False]))


@pytest.mark.parametrize("pred,spacing,offset,alpha_one", GRID)
def test_ddim_grid_matches_diffusers(pred, spacing, offset, alpha_one):
  err = run_ddim_pair(pred=pred, spacing=spacing, offset=offset, alpha_one=alpha_one, clip=False,
                      thresh=False, eta=0.0, clipped_eps=False)
  assert err <= 1e-5


# The x0 post-processing and stochastic options, crossed with each prediction type.
POST = list(itertools.product(["epsilon", "v", "sample"],
                              [(False, False), (True, False), (False, True)],  # (clip, thresholding)
                              [0.0, 0.5, 1.0], [False, True]))


@pytest.mark.parametrize("pred,post,eta,clipped_eps", POST)
def test_ddim_postprocessing_and_eta_match_diffusers(pred, post, eta, clipped_eps):
  clip, thresh = post
  err = run_ddim_pair(pred=pred, spacing="leading", offset=1, alpha_one=False, clip=clip, thresh=thresh,
                      eta=eta, clipped_eps=clipped_eps)
  assert err <= 1e-5


@pytest.mark.parametrize("sched", ["linear", "cosine"])
@pytest.mark.parametrize("num_steps", [1, 7, 50])
def test_ddim_other_schedules_and_lengths(sched, num_steps):
  err = run_ddim_pair(pred="epsilon", spacing="trailing", offset=0, alpha_one=True, clip=False, thresh=False,
                      eta=0.0, clipped_eps=False, sched=sched, num_steps=num_steps)
  assert err <= 1e-5


def run_ddpm_pair(monkeypatch, *, pred, spacing, offset, variance_type, clip, thresh, num_steps,
                  sched="linear", trajectories=None):
  kw, make = SCHEDS[sched]
  ref = diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type=PRED_NAMES[pred],
                                timestep_spacing=spacing, steps_offset=offset, variance_type=variance_type,
                                clip_sample=clip, thresholding=thresh, sample_max_value=2.0, **kw)
  ref.set_timesteps(num_steps if num_steps is not None else 1000)
  n = len(ref.timesteps)
  key = jax.random.key(11)
  noises = iter(_noises(key, n))

  def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
    return torch.from_numpy(next(noises))

  # diffusers draws each step's noise through randn_tensor; hand it jdiff's per-step noise instead.
  import diffusers.schedulers.scheduling_ddpm as mod
  monkeypatch.setattr(mod, "randn_tensor", fake_randn)
  x = torch.from_numpy(_x_T(1))
  traj_ref = []
  for t in ref.timesteps:
    x = ref.step(torch_model(x, t), t, x).prev_sample
    traj_ref.append(x.numpy())

  _, traj = samplers.ddpm(jax_model, make(), jnp.asarray(_x_T(1)), key=key, num_steps=num_steps,
                          variance_type=variance_type, prediction=pred, timestep_spacing=spacing,
                          steps_offset=offset, clip_sample=clip, thresholding=thresh, sample_max_value=2.0,
                          return_trajectory=True)
  traj = np.asarray(traj)
  if trajectories is not None:
    trajectories.extend([list(traj), traj_ref])
  return max(_rel(traj[i], traj_ref[i]) for i in range(n))


DDPM_GRID = list(itertools.product(["epsilon", "v", "sample"], ["leading", "trailing", "linspace"], [0, 1],
                                   ["fixed_small", "fixed_small_log", "fixed_large"]))


@pytest.mark.parametrize("pred,spacing,offset,variance_type", DDPM_GRID)
def test_ddpm_matches_diffusers(monkeypatch, pred, spacing, offset, variance_type):
  err = run_ddpm_pair(monkeypatch, pred=pred, spacing=spacing, offset=offset, variance_type=variance_type,
                      clip=False, thresh=False, num_steps=12)
  assert err <= 1e-5


@pytest.mark.parametrize("post", [(True, False), (False, True)])
def test_ddpm_clip_and_threshold_match_diffusers(monkeypatch, post):
  err = run_ddpm_pair(monkeypatch, pred="epsilon", spacing="leading", offset=1, variance_type="fixed_small",
                      clip=post[0], thresh=post[1], num_steps=20)
  assert err <= 1e-5


U32 = 2.0 ** -24  # unit roundoff of float32


def ddpm_chain_reference(betas: np.ndarray, x_T: np.ndarray, noises: list[np.ndarray]):
  """The full 1000-step DDPM chain (epsilon prediction, fixed_small variance) of ``jax_model`` in float64,
  with a first-order bound on the absolute error of any float32 evaluation of it, per step and element.

  A float32 sampler rounds the stored alpha-bars (u each), every coefficient built from them (the ratio
  ``a_t / a_prev`` and ``1 - ratio``, whose cancellation makes beta_t's relative error ~u / beta_t),
  each arithmetic operation (u), ``pow`` (within an ulp: 2u) and the model's tanh (within 4 ulp: 8u).
  Because the model is elementwise, so is the step's Jacobian ``J``, and the error carried from the
  previous step propagates as ``|J| e``. The bound adds these worst cases with aligned signs, so it
  grows linearly over the chain; actual errors add with mixed signs and sit well inside it.
  """
  abar = np.cumprod(1.0 - betas.astype(np.float64))
  x, e = x_T.astype(np.float64), np.zeros(x_T.shape)
  traj, bounds = [], []
  for i, t in enumerate(range(len(abar) - 1, -1, -1)):
    at, ap = abar[t], (abar[t - 1] if t > 0 else 1.0)
    r_at, r_ap = U32, (U32 if t > 0 else 0.0)  # a_prev = 1 at the last step is exact
    w = 1.0 + t / 1000.0
    arg = 0.7 * x * w
    th = np.tanh(arg)
    eps = th + 0.05 * x - 0.02 * w
    e_eps = 8 * U32 * np.abs(th) + (1 - th ** 2) * 3 * U32 * np.abs(arg) + 3 * U32 * (
        np.abs(0.05 * x) + 0.02 * w + np.abs(eps))
    d_eps = 0.7 * w * (1 - th ** 2) + 0.05
    alpha = at / ap
    r_alpha = r_at + r_ap + U32
    beta = 1.0 - alpha
    e_beta = alpha * r_alpha + U32 * beta
    bp, bpp = 1.0 - at, 1.0 - ap
    e_bp, e_bpp = at * r_at + U32 * bp, ap * r_ap + U32 * bpp
    sa, sb = at ** 0.5, bp ** 0.5
    r_sa, r_sb = r_at / 2 + 2 * U32, e_bp / bp / 2 + 2 * U32
    num = x - sb * eps
    e_num = np.abs(sb * eps) * (r_sb + U32) + sb * e_eps + U32 * np.abs(num)
    x0 = num / sa
    e_x0 = e_num / sa + np.abs(x0) * (r_sa + U32)
    c1 = ap ** 0.5 * beta / bp
    r_c1 = r_ap / 2 + 4 * U32 + e_beta / beta + e_bp / bp
    c2 = alpha ** 0.5 * bpp / bp
    r_c2 = r_alpha / 2 + 4 * U32 + (e_bpp / bpp if t > 0 else 0.0) + e_bp / bp
    mean = c1 * x0 + c2 * x
    local = np.abs(c1) * e_x0 + np.abs(c1 * x0) * (r_c1 + U32) + np.abs(c2 * x) * (r_c2 + U32) + U32 * np.abs(mean)
    if t > 0:
      std = (bpp / bp * beta) ** 0.5
      r_std = (e_bpp / bpp + e_bp / bp + e_beta / beta + 2 * U32) / 2 + 2 * U32
      x_next = mean + std * noises[i]
      local = local + np.abs(std * noises[i]) * (r_std + U32) + U32 * np.abs(x_next)
    else:
      x_next = mean
    jac = c1 * (1.0 - sb * d_eps) / sa + c2
    e = np.abs(jac) * e + local
    x = x_next
    traj.append(x)
    bounds.append(e)
  return traj, bounds


def test_ddpm_full_chain_matches_diffusers(monkeypatch):
  """1000 steps: float32 rounding accumulates (~2e-5 relative), and vectorised tanh/pow kernels round
  differently on different CPU families, so jdiff and diffusers are each compared with a float64
  recomputation instead of with each other."""
  trajs = []
  err = run_ddpm_pair(monkeypatch, pred="epsilon", spacing="leading", offset=0, variance_type="fixed_small",
                      clip=False, thresh=False, num_steps=None, sched="scaled_linear", trajectories=trajs)
  traj, traj_ref = trajs
  betas = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                  beta_end=0.012).betas.numpy()
  ref64, bounds = ddpm_chain_reference(betas, _x_T(1), _noises(jax.random.key(11), 1000))
  # Within the first-order bound at every step and element.
  for got, want, bound in zip(traj, ref64, bounds):
    assert np.all(np.abs(got - want) <= bound)
  # And as close to the float64 chain as diffusers' float32 chain: both evaluate the same operations
  # in the same order, so their errors share the systematic part (the rounded coefficients); the
  # factor 2 leaves room for the kernels that round differently (tanh, pow).
  err_jdiff = max(_rel(got, want) for got, want in zip(traj, ref64))
  err_diffusers = max(_rel(got, want) for got, want in zip(traj_ref, ref64))
  assert err_jdiff <= 2.0 * err_diffusers, (err_jdiff, err_diffusers, err)


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_ddpm_learned_variance_matches_diffusers(monkeypatch, variance_type):
  """Learned variances: the network returns 2C channels. Both sides use a [B, C] layout here
  (C last for jdiff, channel axis 1 for diffusers), so the arrays line up exactly."""
  shape = (3, 4)
  x_np = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
  num_steps = 15
  key = jax.random.key(2)
  noises = iter([np.array(samplers.step_noise(k, shape)) for k in jax.random.split(key, num_steps)])
  import diffusers.schedulers.scheduling_ddpm as mod
  monkeypatch.setattr(mod, "randn_tensor", lambda *a, **k: torch.from_numpy(next(noises)))
  ref = diffusers.DDPMScheduler(variance_type=variance_type, clip_sample=False)
  ref.set_timesteps(num_steps)
  offs = 0.6 if variance_type == "learned" else 0.0

  def tm(x, t):
    w = 1.0 + float(t) / 1000.0
    return torch.cat([torch.tanh(0.7 * x * w), 0.004 * torch.tanh(x) + offs * 0.01], dim=1)

  x = torch.from_numpy(x_np)
  traj_ref = []
  for t in ref.timesteps:
    x = ref.step(tm(x, t), t, x).prev_sample
    traj_ref.append(x.numpy())

  def jm(x, t):
    w = 1.0 + t.astype(jnp.float32).reshape(-1, 1) / 1000.0
    return jnp.concatenate([jnp.tanh(0.7 * x * w), 0.004 * jnp.tanh(x) + offs * 0.01], axis=-1)

  _, traj = samplers.ddpm(jm, schedules.linear(), jnp.asarray(x_np), key=key, num_steps=num_steps,
                          variance_type=variance_type, return_trajectory=True)
  traj = np.asarray(traj)
  assert max(_rel(traj[i], traj_ref[i]) for i in range(num_steps)) <= 1e-5
