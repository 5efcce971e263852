"""Sampler accuracy per model call on problems with an exact answer.

Data: isotropic Gaussian mixtures in tens of dimensions, whose exact epsilon-predictor is closed
form. For the same starting noise, a high-accuracy solution of the probability-flow ODE (scipy's
``solve_ivp``, DOP853 in log-sigma time, rtol 1e-10) is the reference; every deterministic jdiff
sampler and its diffusers twin (same options, same problem) are scored by the relative error
||x - x_ref|| / ||x_ref|| at 5, 10, 20 and 50 model calls. Prints a table, writes JSON and a
log-log PNG.

Best against best: every diffusers scheduler configuration of a sweep (DPM-Solver multistep and
singlestep, UniPC, DEIS, SA-Solver, Euler, Heun, LMS, KDPM2, DDIM, PNDM, each over its orders,
solver types, parameterisations, sigma schedules, timestep spacings and final sigmas; about 700
configurations) is run at a budget of 5, 10 and 20 model calls (the largest step count whose model
calls fit the budget), and the best one per problem and budget is reported by name next to the best
jdiff configuration. The jdiff side includes grids calibrated on each problem's own model
(``jdiff.samplers.calibrate.calibrate_timesteps``: the interior noise levels of a 10-call solver
fitted by gradient descent to a 256-level teacher solve of the same model from calibration noises of
another seed than the scored batch). Every score is also reported as the median per-sample error and
the number of far samples (> 0.1 relative error: they ended at another mode); with sharp modes the
batch error is decided by those few samples, hence the default of 1024 test noises. Problems: three
Gaussian mixtures (sharp, second, third) and, with ``--trained``, a small denoiser trained here on
scikit-learn's 8x8 digits (reference: DOP853 on the trained network).

    python -m bench.samplers [--quick] [--trained] [--best-only] [--problems sharp,digits] [--nfes 10]
                             [--batch 2048] [--out DIR]
    python -m bench.samplers --flips [--problems sharp] [--steps 10,20,40] [--batch 4096]

``--flips`` measures why the sharp mixtures' batch error at 10-20 calls barely moves with the solver:
per step count and solver order, how many samples end at another mode than their reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import samplers, schedules

NFES = (5, 10, 20, 50)


@dataclasses.dataclass(frozen=True)
class Mixture:
  """x0 ~ sum_k w_k N(means_k, stds_k^2 I) in ``dim`` dimensions."""
  name: str
  weights: np.ndarray  # [K]
  means: np.ndarray  # [K, D]
  stds: np.ndarray  # [K]

  @property
  def dim(self) -> int:
    return self.means.shape[1]


def sharp_mixture(dim: int = 32) -> Mixture:
  """Four components with unit-scale means and sharp spreads (two of them 0.15)."""
  rng = np.random.default_rng(0)
  return Mixture("sharp", np.array([0.3, 0.3, 0.2, 0.2]), rng.standard_normal((4, dim)),
                 np.array([0.15, 0.15, 0.3, 0.5]))


def second_mixture(dim: int = 20) -> Mixture:
  """Six components, different dimension, weights and spreads (0.1 to 0.6)."""
  rng = np.random.default_rng(1)
  w = np.array([0.05, 0.1, 0.15, 0.2, 0.2, 0.3])
  return Mixture("second", w, 1.5 * rng.standard_normal((6, dim)), np.array([0.1, 0.6, 0.25, 0.12, 0.4, 0.2]))


def third_mixture(dim: int = 48) -> Mixture:
  """Three components in 48 dimensions, unequal weights, one very sharp (0.08) and one broad."""
  rng = np.random.default_rng(2)
  return Mixture("third", np.array([0.5, 0.3, 0.2]), 1.2 * rng.standard_normal((3, dim)),
                 np.array([0.2, 0.08, 0.35]))


def _eps_np(mix: Mixture, x: np.ndarray, alpha, sigma) -> np.ndarray:
  """Exact epsilon prediction (float64 numpy) at VP (alpha, sigma) for x [B, D]."""
  var = alpha ** 2 * mix.stds ** 2 + sigma ** 2  # [K]
  diff = x[:, None, :] - alpha * mix.means[None]  # [B, K, D]
  logp = np.log(mix.weights) - 0.5 * np.sum(diff ** 2, -1) / var - 0.5 * mix.dim * np.log(var)
  r = np.exp(logp - logp.max(1, keepdims=True))
  r /= r.sum(1, keepdims=True)
  score = -np.sum(r[..., None] * diff / var[None, :, None], axis=1)
  return -sigma * score


def _sigma_of_t(log_sig: np.ndarray, t):
  """VE sigma at (fractional) timestep t by linear interpolation of log sigma."""
  t = np.asarray(t, np.float64)
  lo = np.clip(np.floor(t), 0, len(log_sig) - 2).astype(int)
  w = t - lo
  return np.exp((1 - w) * log_sig[lo] + w * log_sig[lo + 1])


def jax_model(mix: Mixture, sched):
  """The exact epsilon-predictor as a jdiff model function ``(x [B, D], t [B]) -> eps``."""
  log_sig = jnp.log(jnp.sqrt((1.0 - sched.alphas_cumprod) / sched.alphas_cumprod))
  w, mu, sd = (jnp.asarray(a, jnp.float32) for a in (mix.weights, mix.means, mix.stds))
  num_t = log_sig.shape[0]

  def fn(x, t):
    tf = t.astype(jnp.float32)
    lo = jnp.clip(jnp.floor(tf), 0, num_t - 2).astype(jnp.int32)
    fr = tf - lo.astype(jnp.float32)
    sig = jnp.exp((1.0 - fr) * log_sig[lo] + fr * log_sig[lo + 1]).reshape(-1, 1)  # [B, 1]
    alpha = 1.0 / jnp.sqrt(1.0 + sig * sig)
    sigma = sig * alpha
    var = alpha * alpha * sd.reshape(1, -1) ** 2 + sigma * sigma  # [B, K]
    diff = x[:, None, :] - alpha[:, :, None] * mu[None]  # [B, K, D]
    logp = (jnp.log(w).reshape(1, -1) - 0.5 * jnp.sum(diff * diff, -1) / var
            - 0.5 * mix.dim * jnp.log(var))
    r = jax.nn.softmax(logp, axis=1)
    score = -jnp.sum((r / var)[..., None] * diff, axis=1)
    return -sigma * score

  return fn


def torch_model(mix: Mixture, abar: np.ndarray):
  """The same predictor for diffusers' loop: float64 numpy inside, float32 torch outside."""
  import torch
  log_sig = np.log(np.sqrt((1.0 - abar.astype(np.float64)) / abar.astype(np.float64)))

  def fn(x, t):
    sig = _sigma_of_t(log_sig, float(t))
    alpha = 1 / math.sqrt(1 + sig * sig)
    eps = _eps_np(mix, x.numpy().astype(np.float64), alpha, sig * alpha)
    return torch.from_numpy(eps.astype(np.float32))

  return fn


def reference(mix: Mixture, y0: np.ndarray, sigma_start: float, sigma_end: float = 1e-6) -> np.ndarray:
  """The probability-flow ODE solved to sigma = 0 from the VE state y0 at ``sigma_start``.

  In u = log sigma the ODE reads dy/du = y - D(y, sigma), D the exact denoiser; DOP853 with rtol =
  atol = 1e-10 to sigma = 1e-6, where the remaining change is O(sigma^2) (see
  :func:`reference_problem`).
  """
  return reference_problem(Problem(mix.name, mix.dim, _mixture_eps(mix), None), y0, sigma_start, sigma_end)


# ----------------------------------------------------------------------------- configurations

# name -> (jdiff method, jdiff options, diffusers class name or None, diffusers options, NFE -> steps,
#          starting convention: "vp" (x_T at the first sigma, VP) or "ve" (Euler family))
_CFG = {"timestep_spacing": "linspace"}
CONFIGS = {
    "ddim": ("ddim", {"timestep_spacing": "trailing"}, "DDIMScheduler",
             {"timestep_spacing": "trailing", "clip_sample": False}, "n", "vp"),
    "euler": ("euler", {}, "EulerDiscreteScheduler", {}, "n", "ve"),
    "euler_karras": ("euler", {"use_karras_sigmas": True}, "EulerDiscreteScheduler",
                     {"use_karras_sigmas": True}, "n", "ve"),
    "heun_karras": ("heun", {"use_karras_sigmas": True}, "HeunDiscreteScheduler",
                    {"use_karras_sigmas": True}, "heun", "ve"),
    "dpm++2m": ("dpm_solver", {"order": 2}, "DPMSolverMultistepScheduler", {"solver_order": 2}, "n", "vp"),
    "dpm++2m_karras": ("dpm_solver", {"order": 2, "use_karras_sigmas": True}, "DPMSolverMultistepScheduler",
                       {"solver_order": 2, "use_karras_sigmas": True}, "n", "vp"),
    "dpm++3m_karras": ("dpm_solver", {"order": 3, "use_karras_sigmas": True}, "DPMSolverMultistepScheduler",
                       {"solver_order": 3, "use_karras_sigmas": True}, "n", "vp"),
    "dpm++2s": ("dpm_solver", {"order": 2, "singlestep": True}, "DPMSolverSinglestepScheduler",
                {"solver_order": 2}, "n", "vp"),
    "unipc2": ("unipc", {"order": 2}, "UniPCMultistepScheduler", {"solver_order": 2}, "n", "vp"),
    "unipc3_karras_trailing": ("unipc", {"order": 3, "use_karras_sigmas": True, "timestep_spacing": "trailing"},
                               "UniPCMultistepScheduler",
                               {"solver_order": 3, "use_karras_sigmas": True, "timestep_spacing": "trailing"},
                               "n", "vp"),
    # jdiff only: uniform log-SNR steps + second-order last step in sigma
    "jdiff_unipc3_logsnr_extrap": ("unipc", {"order": 3, "sigma_schedule": "logsnr", "final_step": "extrapolate"},
                                   None, {}, "n", "vp"),
    "jdiff_dpm++3m_logsnr_extrap": ("dpm_solver", {"order": 3, "sigma_schedule": "logsnr",
                                                   "final_step": "extrapolate"}, None, {}, "n", "vp"),
}
QUICK = ("dpm++2m", "unipc3_karras_trailing", "jdiff_unipc3_logsnr_extrap")


def _steps(rule: str, nfe: int) -> int:
  return (nfe + 1) // 2 if rule == "heun" else nfe


def _diffusers_scheduler(cls_name: str, opts: dict, sched_cfg: dict):
  import diffusers
  cls = getattr(diffusers, cls_name)
  return cls(**sched_cfg, **opts)


def _start(sig0: float, conv: str, init_sigma: float | None, x_T: np.ndarray):
  """(sigma_start, VE state) a sampler starts from."""
  if conv == "ve":
    return sig0, x_T.astype(np.float64) * init_sigma
  return sig0, x_T.astype(np.float64) * math.sqrt(1 + sig0 * sig0)


def run_problem(mix: Mixture, names, nfes, batch: int, log=print) -> dict:
  """Errors of every configuration (jdiff and diffusers) on one mixture."""
  import torch  # diffusers' loop
  sched = schedules.scaled_linear(1000, 0.00085, 0.012)
  sched_cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
  abar = np.asarray(sched.alphas_cumprod)
  x_T = np.random.default_rng(42).standard_normal((batch, mix.dim)).astype(np.float32)
  jmodel = jax_model(mix, sched)
  tmodel = torch_model(mix, abar)
  table_sig = np.sqrt((1 - abar.astype(np.float64)) / abar.astype(np.float64))
  refs: dict = {}

  def ref_for(sig0, y0):
    k = (round(sig0, 6), round(float(y0.ravel()[0] / x_T.ravel()[0]), 6))
    if k not in refs:
      refs[k] = reference(mix, y0, sig0)
    return refs[k]

  out = {}
  for name in names:
    method, jopts, dcls, dopts, rule, conv = CONFIGS[name]
    out[name] = {"jdiff": {}, "diffusers": {}}
    for nfe in nfes:
      n = _steps(rule, nfe)
      x0 = np.asarray(jax.jit(lambda z: samplers.sample(method, jmodel, sched, z, num_steps=n, **jopts))(
          jnp.asarray(x_T)), np.float64)
      # where the sampler starts: the first sigma of its grid
      if conv == "ve":
        from jdiff.samplers import levels
        sp = jopts.get("timestep_spacing", "linspace")
        _, sig = levels.euler_grid(abar, n, spacing=sp,
                                    sigma_schedule="karras" if jopts.get("use_karras_sigmas") else None)
        top = float(np.max(sig))
        sig0, y0 = _start(float(sig[0]), "ve", top if sp != "leading" else math.sqrt(top * top + 1), x_T)
      else:
        sig0 = float(table_sig[-1])
        y0 = x_T.astype(np.float64) * math.sqrt(1 + sig0 * sig0)
      ref = ref_for(sig0, y0)
      out[name]["jdiff"][nfe] = sample_errors(x0, ref)["error"]
      if dcls is not None:
        with warnings.catch_warnings():
          warnings.simplefilter("ignore")
          sch = _diffusers_scheduler(dcls, dopts, sched_cfg)
          sch.set_timesteps(n)
          x = torch.from_numpy(x_T) * sch.init_noise_sigma
          for t in sch.timesteps:
            x = sch.step(tmodel(sch.scale_model_input(x, t), t), t, x).prev_sample
        out[name]["diffusers"][nfe] = sample_errors(x.numpy().astype(np.float64), ref)["error"]
      log(f"  {mix.name:7s} {name:30s} NFE {nfe:3d}: jdiff {out[name]['jdiff'][nfe]:.3e}  diffusers "
          + (f"{out[name]['diffusers'][nfe]:.3e}" if dcls else "   -"))
  return out


# ----------------------------------------------------------------------------- best against best

@dataclasses.dataclass(frozen=True)
class Problem:
  """A probability-flow ODE with a known predictor: ``eps_np(x_vp [B, D], sigma_ve) -> eps`` (float64
  numpy, reference and diffusers) and ``jax_fn(x [B, D], t [B]) -> eps`` (jdiff)."""
  name: str
  dim: int
  eps_np: object
  jax_fn: object
  means: np.ndarray | None = None  # [K, D] component means of a mixture (flips are counted against them)


def _mixture_eps(mix: Mixture):
  """``eps_np(x_vp [B, D], sigma_ve)`` of a mixture (float64 numpy)."""
  def eps_np(x, sig):
    alpha = 1 / math.sqrt(1 + sig * sig)
    return _eps_np(mix, x, alpha, sig * alpha)
  return eps_np


def mixture_problem(mix: Mixture, sched) -> Problem:
  return Problem(mix.name, mix.dim, _mixture_eps(mix), jax_model(mix, sched), mix.means)


def reference_problem(prob: Problem, y0: np.ndarray, sigma_start: float, sigma_end: float = 1e-6,
                      rtol: float = 1e-10) -> np.ndarray:
  """:func:`reference` for any :class:`Problem` (DOP853 in log sigma on the VE state)."""
  from scipy.integrate import solve_ivp
  shape = y0.shape

  def rhs(u, yflat):
    sig = math.exp(u)
    y = yflat.reshape(shape)
    return (sig * prob.eps_np(y / math.sqrt(1 + sig * sig), sig)).ravel()

  sol = solve_ivp(rhs, (math.log(sigma_start), math.log(sigma_end)), y0.astype(np.float64).ravel(),
                  method="DOP853", rtol=rtol, atol=rtol)
  if not sol.success:
    raise RuntimeError(f"reference ODE solve failed: {sol.message}")
  return sol.y[:, -1].reshape(shape)


_DSIG = {"default": {}, "karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True},
         "beta": {"use_beta_sigmas": True}}
_SPACINGS = ("linspace", "leading", "trailing")


def _spacing(sp: str) -> dict:
  return {"timestep_spacing": sp, "steps_offset": 1 if sp == "leading" else 0}


def diffusers_sweep(quick: bool = False) -> list[tuple[str, dict]]:
  """(scheduler class, options) for every deterministic diffusers configuration the bench tries."""
  algs = (("dpmsolver++", "zero"), ("dpmsolver++", "sigma_min"), ("dpmsolver", "sigma_min"))
  sigs = ("default", "karras", "exponential") if quick else tuple(_DSIG)
  spacings = ("linspace",) if quick else _SPACINGS
  out = []
  for (alg, fin), order, st, sg, sp in itertools.product(algs, (2, 3), ("midpoint", "heun"),
                                                        sigs + (() if quick else ("lu",)), spacings):
    extra = {"use_lu_lambdas": True} if sg == "lu" else _DSIG[sg]
    out.append(("DPMSolverMultistepScheduler", dict(algorithm_type=alg, final_sigmas_type=fin, solver_order=order,
                                                    solver_type=st, **_spacing(sp), **extra)))
  for st, order, px0, sg, sp, fin in itertools.product(("bh1", "bh2"), (2, 3), (True, False), sigs, spacings,
                                                       ("zero", "sigma_min")):
    if not px0 and fin == "zero":
      continue
    out.append(("UniPCMultistepScheduler", dict(solver_type=st, solver_order=order, predict_x0=px0,
                                                final_sigmas_type=fin, **_spacing(sp), **_DSIG[sg])))
  if quick:
    return out
  for (alg, fin), order, st, sg in itertools.product(algs, (2, 3), ("midpoint", "heun"), sigs):
    out.append(("DPMSolverSinglestepScheduler", dict(algorithm_type=alg, final_sigmas_type=fin, solver_order=order,
                                                     solver_type=st, **_DSIG[sg])))
  for order, sg, sp in itertools.product((2, 3), sigs, spacings):
    out.append(("DEISMultistepScheduler", dict(solver_order=order, **_spacing(sp), **_DSIG[sg])))
  for po, co, sg, sp in itertools.product((2, 3), (1, 2, 3), sigs, spacings):
    out.append(("SASolverScheduler", dict(predictor_order=po, corrector_order=co, **_spacing(sp), **_DSIG[sg])))
  for cls, sg, sp in itertools.product(("EulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
                                        "KDPM2DiscreteScheduler"), sigs, spacings):
    out.append((cls, dict(**_spacing(sp), **_DSIG[sg])))
  for sp in spacings:
    out.append(("DDIMScheduler", dict(clip_sample=False, **_spacing(sp))))
    out.append(("PNDMScheduler", dict(skip_prk_steps=True, **_spacing(sp))))
  return out


# jdiff configurations raced against the sweep: twins of the strongest diffusers families plus the
# jdiff-only options (noise-prediction solvers that land on sigma = 0 through the extrapolated last
# step; uniform log-SNR grids).
JDIFF_SWEEP = {
    "dpm++2m_karras": ("dpm_solver", {"order": 2, "sigma_schedule": "karras"}),
    "dpm3m_eps_karras_sigma_min": ("dpm_solver", {"order": 3, "algorithm": "dpmsolver", "sigma_schedule": "karras",
                                                  "final_sigmas_type": "sigma_min"}),
    "unipc2_bh2_exponential": ("unipc", {"order": 2, "sigma_schedule": "exponential"}),
    "unipc2_bh2_karras_sigma_min": ("unipc", {"order": 2, "sigma_schedule": "karras",
                                              "final_sigmas_type": "sigma_min"}),
    "jdiff_dpm3m_eps_karras_extrap": ("dpm_solver", {"order": 3, "algorithm": "dpmsolver", "sigma_schedule": "karras",
                                                     "final_step": "extrapolate"}),
    "jdiff_dpm2m_eps_karras_extrap": ("dpm_solver", {"order": 2, "algorithm": "dpmsolver", "sigma_schedule": "karras",
                                                     "final_step": "extrapolate"}),
    "jdiff_unipc3_bh1_eps_karras_extrap": ("unipc", {"order": 3, "solver_type": "bh1", "predict_x0": False,
                                                     "sigma_schedule": "karras", "final_step": "extrapolate"}),
    "jdiff_unipc2_bh2_exponential_extrap": ("unipc", {"order": 2, "sigma_schedule": "exponential",
                                                      "final_step": "extrapolate"}),
    "jdiff_unipc3_logsnr_extrap": ("unipc", {"order": 3, "sigma_schedule": "logsnr", "final_step": "extrapolate"}),
    "jdiff_dpm++2m_logsnr_extrap": ("dpm_solver", {"order": 2, "sigma_schedule": "logsnr",
                                                   "final_step": "extrapolate"}),
}
JDIFF_QUICK = ("dpm3m_eps_karras_sigma_min", "jdiff_dpm3m_eps_karras_extrap", "jdiff_unipc3_logsnr_extrap",
               "unipc2_bh2_exponential", "jdiff_exact_dpm3m_eps_karras_extrap", "jdiff_calshift_unipc3_extrap")

# jdiff configurations on explicit grids (``sigmas=``), so the model is called at the noise level the
# solver steps to (fractional timesteps) instead of at a rounded timestep: "exact" = a standard grid,
# "cal" = the grid calibrated on the problem's own model (jdiff.samplers.calibrate), fitted on
# calibration noises drawn with another seed than the scored batch.
JDIFF_GRID = {
    "jdiff_exact_dpm3m_eps_karras_extrap": ("dpm_solver", {"order": 3, "algorithm": "dpmsolver",
                                                           "final_step": "extrapolate"}, "karras"),
    "jdiff_exact_unipc3_logsnr_extrap": ("unipc", {"order": 3, "final_step": "extrapolate"}, "logsnr"),
    "jdiff_cal_dpm3m_eps_extrap": ("dpm_solver", {"order": 3, "algorithm": "dpmsolver", "final_step": "extrapolate"},
                                   "calibrated"),
    # grid and the noise level the model is told, both calibrated (shift_timesteps=True)
    "jdiff_calshift_dpm3m_eps_extrap": ("dpm_solver", {"order": 3, "algorithm": "dpmsolver",
                                                       "final_step": "extrapolate"}, "calibrated+shift"),
    "jdiff_calshift_unipc3_extrap": ("unipc", {"order": 3, "final_step": "extrapolate"}, "calibrated+shift"),
}


def grid_sigmas(kind: str, prob: "Problem", sched, nfe: int, *, calib_batch: int, calib_seed: int,
                iterations: int = 200, method: str = "unipc", opts: dict | None = None) -> dict:
  """The explicit grid of a ``JDIFF_GRID`` configuration on ``prob``: ``{"sigmas": [nfe + 1]}``
  plus ``"timesteps": [nfe]`` for a calibrated model shift."""
  from jdiff.samplers import calibrate, levels
  lo, hi = calibrate.sigma_range(sched)
  if kind == "karras":
    return {"sigmas": np.concatenate([levels.karras(lo, hi, nfe), [0.0]]).astype(np.float32)}
  if kind == "logsnr":
    return {"sigmas": np.concatenate([levels.logsnr_uniform(lo, hi, nfe), [0.0]]).astype(np.float32)}
  x_c = np.random.default_rng(calib_seed).standard_normal((calib_batch, prob.dim)).astype(np.float32)
  shift = kind == "calibrated+shift"
  out = calibrate.calibrate_timesteps(method, prob.jax_fn, sched, jnp.asarray(x_c), num_steps=nfe, loss="mean",
                                      iterations=iterations, shift_timesteps=shift, **(opts or {}))
  return {"sigmas": out[0], "timesteps": out[1]} if shift else {"sigmas": out}


def config_name(cls: str, opts: dict) -> str:
  short = {k: v for k, v in opts.items() if k != "steps_offset"}
  return cls.replace("Scheduler", "") + "(" + ", ".join(f"{k}={v}" for k, v in short.items()) + ")"


def _run_diffusers(cls_name: str, opts: dict, sched_cfg: dict, nfe: int, x_T: np.ndarray, eps_np, table_sig):
  """Runs one diffusers configuration within ``nfe`` model calls: (x, calls, sigma_start, y_start)."""
  import diffusers
  import torch
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    sch = getattr(diffusers, cls_name)(**sched_cfg, **opts)
    for n in range(nfe, 0, -1):
      sch.set_timesteps(n)
      if len(sch.timesteps) <= nfe:
        break
    ins = float(sch.init_noise_sigma)
    if ins > 1.0 + 1e-6:  # Euler family: the state is the VE sample y at sigmas[0]
      sig0, y0 = float(sch.sigmas[0]), x_T.astype(np.float64) * ins
    else:  # VP state at the first timestep
      sig0 = float(table_sig[int(sch.timesteps[0])])
      y0 = x_T.astype(np.float64) * math.sqrt(1 + sig0 * sig0)
    log_sig = np.log(table_sig)

    def model(x, t):
      sig = float(_sigma_of_t(log_sig, float(t)))
      return torch.from_numpy(eps_np(x.numpy().astype(np.float64), sig).astype(np.float32))

    x = torch.from_numpy(x_T) * sch.init_noise_sigma
    calls = 0
    for t in sch.timesteps:
      x = sch.step(model(sch.scale_model_input(x, t), t), t, x).prev_sample
      calls += 1
  return x.numpy().astype(np.float64), calls, sig0, y0


FAR = 0.1  # a sample this far from its reference (relative) ended near another mode


def sample_errors(x: np.ndarray, ref: np.ndarray, means: np.ndarray | None = None) -> dict:
  """Scores of end points ``x`` [B, D] against the reference ``ref`` [B, D].

  ``error`` is the batch's relative error ||x - ref|| / ||ref|| (the ranking score); ``median`` the
  median of the per-sample relative errors; ``far`` how many samples are more than :data:`FAR`
  (relative) from their reference. On sharp mixtures ``error`` is decided by the few trajectories
  near a boundary between modes (``far``), so it needs a large batch to be stable; ``median``
  measures the typical trajectory. With a mixture's component ``means`` [K, D] also ``flips`` (samples
  that end nearest another component than their reference) and ``kept_error``, the batch relative
  error over the other samples.
  """
  b = x.shape[0]
  if not np.all(np.isfinite(x)):
    out = {"error": float("inf"), "median": float("inf"), "far": int(b)}
    return out if means is None else {**out, "flips": int(b), "kept_error": float("inf")}
  return _scores(per_sample_errors(x, ref, means), flips=means is not None)


def _scores(p: dict, *, flips: bool) -> dict:
  """:func:`sample_errors`' fields from :func:`per_sample_errors`' arrays."""
  b = p["err_sq"].shape[0]
  rel = np.sqrt(p["err_sq"] / p["ref_sq"])
  out = {"error": batch_error(p, np.ones(b, bool)), "median": float(np.median(rel)), "far": int(np.sum(rel > FAR))}
  if flips:
    out["flips"] = int(b - p["kept"].sum())
    out["kept_error"] = batch_error(p, p["kept"])
  return out


def per_sample_errors(x: np.ndarray, ref: np.ndarray, means: np.ndarray | None = None) -> dict:
  """Per sample: squared error ``err_sq`` [B], squared reference norm ``ref_sq`` [B] and ``kept`` [B]
  (ends nearest the same component mean as its reference; all True without ``means``)."""
  b = x.shape[0]
  out = {"err_sq": np.sum(((x - ref) ** 2).reshape(b, -1), axis=1),
         "ref_sq": np.sum((ref * ref).reshape(b, -1), axis=1)}
  out["kept"] = (np.ones(b, bool) if means is None
                 else nearest_component(means, x.reshape(b, -1)) == nearest_component(means, ref.reshape(b, -1)))
  return out


def batch_error(per_sample: dict, mask: np.ndarray) -> float:
  """Relative error ||x - ref|| / ||ref|| over the samples selected by ``mask`` [B]."""
  return float(math.sqrt(per_sample["err_sq"][mask].sum() / per_sample["ref_sq"][mask].sum()))


def nearest_component(means: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Index of the component mean (``means`` [K, D]) nearest to each end point ``x`` [B, D] -> [B]."""
  d2 = np.sum((x[:, None, :] - means[None]) ** 2, axis=-1)  # [B, K]
  return np.argmin(d2, axis=1)


def best_vs_best(prob: Problem, nfes, batch: int, *, quick: bool = False, jdiff_names=None, seed: int = 42,
                 calib_batch: int = 256, calib_iterations: int = 200, log=print) -> dict:
  """Every diffusers configuration of :func:`diffusers_sweep` and every jdiff configuration of
  ``JDIFF_SWEEP`` and ``JDIFF_GRID`` on one problem; returns per NFE the best of each side and all
  scores. Calibrated grids are fitted on ``calib_batch`` noises of seed ``seed + 1000`` (the scored
  batch uses ``seed``)."""
  sched = schedules.scaled_linear(1000, 0.00085, 0.012)
  sched_cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
  abar = np.asarray(sched.alphas_cumprod).astype(np.float64)
  table_sig = np.sqrt((1 - abar) / abar)
  x_T = np.random.default_rng(seed).standard_normal((batch, prob.dim)).astype(np.float32)
  refs: dict = {}
  per_sample: dict = {}  # (side, name) -> per_sample_errors, for the common-set score of the best pair

  def score(x, sig0, y0, key):
    k = (round(sig0, 6), round(float(y0.ravel()[0] / x_T.ravel()[0]), 6))
    if k not in refs:
      refs[k] = reference_problem(prob, y0, sig0)
    if not np.all(np.isfinite(x)):
      return sample_errors(x, refs[k], prob.means)
    per_sample[key] = per_sample_errors(x, refs[k], prob.means)
    return _scores(per_sample[key], flips=prob.means is not None)

  jnames = tuple(jdiff_names or (tuple(JDIFF_SWEEP) + tuple(JDIFF_GRID)))
  out = {}
  for nfe in nfes:
    t0 = time.time()
    dscores = {}
    for cls, opts in diffusers_sweep(quick):
      try:
        x, calls, sig0, y0 = _run_diffusers(cls, opts, sched_cfg, nfe, x_T, prob.eps_np, table_sig)
      except Exception as e:  # a configuration diffusers rejects at this step count
        log(f"  skipped {config_name(cls, opts)}: {type(e).__name__}: {str(e)[:80]}")
        continue
      dname = config_name(cls, opts)
      dscores[dname] = {**score(x, sig0, y0, ("d", dname)), "calls": calls}
    jscores = {}
    sig0 = float(table_sig[-1])
    y0 = x_T.astype(np.float64) * math.sqrt(1 + sig0 * sig0)
    for name in jnames:
      extra = {}
      if name in JDIFF_GRID:
        method, opts, kind = JDIFF_GRID[name]
        tc = time.time()
        g = grid_sigmas(kind, prob, sched, nfe, calib_batch=calib_batch, calib_seed=seed + 1000,
                        iterations=calib_iterations, method=method, opts=opts)
        extra = {k: [float(v) for v in a] for k, a in g.items()}
        extra["grid_seconds"] = time.time() - tc
        opts = dict(opts, **g)
        run = jax.jit(lambda z, method=method, opts=opts: samplers.sample(method, prob.jax_fn, sched, z, **opts))
      else:
        method, opts = JDIFF_SWEEP[name]
        run = jax.jit(lambda z, method=method, opts=opts: samplers.sample(method, prob.jax_fn, sched, z,
                                                                          num_steps=nfe, **opts))
      try:
        x = np.asarray(run(jnp.asarray(x_T)), np.float64)
      except ValueError as e:  # an option combination jdiff rejects at this step count
        log(f"  skipped {name}: {str(e)[:80]}")
        continue
      jscores[name] = {**score(x, sig0, y0, ("j", name)), "calls": nfe, **extra}
    dbest = min(dscores, key=lambda k: dscores[k]["error"])
    jbest = min(jscores, key=lambda k: jscores[k]["error"])
    de, je = dscores[dbest]["error"], jscores[jbest]["error"]
    out[nfe] = {"diffusers_best": dbest, "diffusers_best_error": de, "jdiff_best": jbest, "jdiff_best_error": je,
                "ratio": de / je if je > 0 else float("inf"), "diffusers_configs": len(dscores),
                "diffusers_best_median": dscores[dbest]["median"], "jdiff_best_median": jscores[jbest]["median"],
                "diffusers_best_far": dscores[dbest]["far"], "jdiff_best_far": jscores[jbest]["far"],
                "batch": batch, "diffusers": dscores, "jdiff": jscores}
    if prob.means is not None and ("d", dbest) in per_sample and ("j", jbest) in per_sample:
      # the best pair on the samples that neither of them ends at another mode than the reference
      pd_, pj = per_sample[("d", dbest)], per_sample[("j", jbest)]
      common = pd_["kept"] & pj["kept"]
      dc, jc = batch_error(pd_, common), batch_error(pj, common)
      out[nfe].update(diffusers_best_flips=dscores[dbest]["flips"], jdiff_best_flips=jscores[jbest]["flips"],
                      common_samples=int(common.sum()), diffusers_best_common_error=dc, jdiff_best_common_error=jc,
                      common_ratio=dc / jc if jc > 0 else float("inf"))
    log(f"  {prob.name:8s} NFE {nfe:3d}: diffusers best {de:.3e} ({dbest}) | jdiff best {je:.3e} ({jbest}) | "
        f"ratio {de / je:.2f}x  [{len(dscores)} diffusers configs, {time.time() - t0:.0f}s]")
  return out


def format_best(best: dict) -> str:
  lines = ["\nbest against best: relative error at a budget of model calls (NFE); median = median per-sample "
           f"error, far = samples > {FAR} from their reference",
           f"{'problem':8s} {'NFE':>4s} {'batch':>5s} {'diffusers best':>14s} {'jdiff best':>11s} {'ratio':>6s} "
           f"{'median d/j':>19s} {'far d/j':>9s} {'flips d/j':>9s} {'no-flip ratio':>13s}  configurations"]
  for prob, per in best.items():
    for nfe, r in per.items():
      flips = f"{r['diffusers_best_flips']:4d}/{r['jdiff_best_flips']:<4d}" if "common_ratio" in r else f"{'-':>9s}"
      common = f"{r['common_ratio']:12.2f}x" if "common_ratio" in r else f"{'-':>13s}"
      lines.append(f"{prob:8s} {nfe:4d} {r['batch']:5d} {r['diffusers_best_error']:14.3e} {r['jdiff_best_error']:11.3e} "
                   f"{r['ratio']:5.2f}x {r['diffusers_best_median']:9.2e}/{r['jdiff_best_median']:9.2e} "
                   f"{r['diffusers_best_far']:4d}/{r['jdiff_best_far']:<4d} {flips} {common}  diffusers: "
                   f"{r['diffusers_best']} ({r['diffusers_configs']} tried); jdiff: {r['jdiff_best']}")
  lines.append("flips = samples ending nearest another component than their reference; no-flip ratio = the same "
               "pair's batch errors over the samples neither of them flips")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- mode flips vs steps

FLIP_STEPS = (10, 20, 40, 80, 160)


def flip_study(mix: Mixture, *, steps=FLIP_STEPS, orders=(1, 2, 3), batch: int = 4096, seed: int = 7,
               log=print) -> list[dict]:
  """How the end-point errors on a mixture fall with the number of steps, per solver order.

  DPM-Solver (noise prediction, multistep, ``order`` 1-3) on a Karras grid of ``n`` exact noise levels
  with the extrapolated last step, for each ``n`` in ``steps``, against the DOP853 reference of the
  same ``batch`` noises. Each row has the batch relative error, the median per-sample error, ``far``
  (samples > :data:`FAR` from their reference) and ``flips``: samples whose end point is nearest to
  another component's mean than the reference's is. The median falls like ``h^order``; the flips
  fall far more slowly (the trajectories that start near a boundary between two modes), so on sharp
  mixtures they decide the batch error at 10-20 calls whatever the order.
  """
  from jdiff.samplers import calibrate, levels
  sched = schedules.scaled_linear(1000, 0.00085, 0.012)
  prob = mixture_problem(mix, sched)
  lo, hi = calibrate.sigma_range(sched)
  x_T = np.random.default_rng(seed).standard_normal((batch, mix.dim)).astype(np.float32)
  t0 = time.time()
  ref = reference_problem(prob, x_T.astype(np.float64) * math.sqrt(1 + hi * hi), hi)
  log(f"  {mix.name}: reference for {batch} noises in {time.time() - t0:.0f}s")
  rows = []
  for n in steps:
    sig = np.concatenate([levels.karras(lo, hi, n), [0.0]]).astype(np.float32)
    for order in orders:
      run = jax.jit(lambda z, order=order, sig=sig: samplers.sample(
          "dpm_solver", prob.jax_fn, sched, z, order=order, algorithm="dpmsolver", final_step="extrapolate",
          sigmas=sig))
      x = np.asarray(run(jnp.asarray(x_T)), np.float64)
      row = {"problem": mix.name, "steps": n, "order": order, "batch": batch, **sample_errors(x, ref, mix.means)}
      rows.append(row)
      log(f"  {mix.name:7s} steps {n:4d} order {order}: error {row['error']:.3e} median {row['median']:.2e} "
          f"far {row['far']:4d} flips {row['flips']:4d} error without flips {row['kept_error']:.3e}")
  return rows


def format_flips(rows: list[dict]) -> str:
  lines = ["\nmode flips vs steps: DPM-Solver (noise prediction), Karras grid at exact levels, extrapolated "
           "last step; flips = end point nearest another component than the reference's",
           f"{'problem':8s} {'steps':>5s} {'order':>5s} {'batch':>5s} {'error':>10s} {'median':>9s} {'far':>5s} "
           f"{'flips':>5s} {'error without flips':>19s}"]
  for r in rows:
    lines.append(f"{r['problem']:8s} {r['steps']:5d} {r['order']:5d} {r['batch']:5d} {r['error']:10.3e} "
                 f"{r['median']:9.2e} {r['far']:5d} {r['flips']:5d} {r['kept_error']:19.3e}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- a trained denoiser

def trained_problem(sched, *, steps: int = 3000, width: int = 256, seed: int = 0, log=print) -> Problem:
  """An epsilon-prediction MLP trained here on scikit-learn's 8x8 digits (64 dims, scaled to [-1, 1]).

  Continuous timesteps (t in [0, 999], fractional allowed) with a sinusoidal embedding, so every
  sampler and the reference can query any noise level. Training: Adam, batch 256.
  """
  import optax
  from sklearn.datasets import load_digits
  data = jnp.asarray(load_digits().data / 8.0 - 1.0, jnp.float32)  # [1797, 64]
  abar = jnp.asarray(sched.alphas_cumprod, jnp.float32)
  log_sig = jnp.log(jnp.sqrt((1.0 - abar) / abar))
  num_t = abar.shape[0]

  def embed(t):  # [B] -> [B, 64]
    freqs = jnp.exp(-math.log(1000.0) * jnp.arange(32, dtype=jnp.float32) / 32)
    ang = t.reshape(-1, 1).astype(jnp.float32) * freqs.reshape(1, -1)
    return jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=1)

  def init(key):
    sizes = [(64 + 64, width), (width, width), (width, width), (width, 64)]
    keys = jax.random.split(key, len(sizes))
    return [(jax.random.normal(k, s, jnp.float32) / math.sqrt(s[0]), jnp.zeros((s[1],), jnp.float32))
            for k, s in zip(keys, sizes)]

  def net(params, x, t):
    h = jnp.concatenate([x, embed(t)], axis=1)
    for w, b in params[:-1]:
      h = jax.nn.silu(h @ w + b.reshape(1, -1))
    w, b = params[-1]
    return h @ w + b.reshape(1, -1)

  def abar_at(t):  # fractional t -> alpha-bar through the interpolated log sigma
    lo = jnp.clip(jnp.floor(t), 0, num_t - 2).astype(jnp.int32)
    fr = t - lo.astype(jnp.float32)
    sig = jnp.exp((1.0 - fr) * log_sig[lo] + fr * log_sig[lo + 1])
    return 1.0 / (1.0 + sig * sig)

  opt = optax.adam(optax.cosine_decay_schedule(2e-3, steps))

  @jax.jit
  def train_step(params, opt_state, key):
    k1, k2, k3 = jax.random.split(key, 3)
    x0 = data[jax.random.randint(k1, (256,), 0, data.shape[0])]
    t = jax.random.uniform(k2, (256,), jnp.float32, 0.0, num_t - 1.0)
    eps = jax.random.normal(k3, x0.shape, jnp.float32)
    a = abar_at(t).reshape(-1, 1)
    xt = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * eps

    def loss_fn(p):
      return jnp.mean((net(p, xt, t) - eps) ** 2)

    loss, g = jax.value_and_grad(loss_fn)(params)
    upd, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, upd), opt_state, loss

  key = jax.random.key(seed)
  params = init(key)
  opt_state = opt.init(params)
  t0 = time.time()
  for i in range(steps):
    params, opt_state, loss = train_step(params, opt_state, jax.random.fold_in(key, i))
  log(f"  trained the digits denoiser: {steps} steps, final loss {float(loss):.4f}, {time.time() - t0:.0f}s")

  def jax_fn(x, t):
    return net(params, x, t.astype(jnp.float32))

  # the same network in float64 numpy for the reference and diffusers' loop (a float32 right-hand
  # side would stall DOP853 at tight tolerances)
  p64 = [(np.asarray(w, np.float64), np.asarray(b, np.float64)) for w, b in params]
  freqs = np.exp(-math.log(1000.0) * np.arange(32, dtype=np.float64) / 32)
  abar64 = np.asarray(sched.alphas_cumprod, np.float64)
  table = np.log(np.sqrt((1 - abar64) / abar64))

  def eps_np(x, sig):
    t = float(np.clip(np.interp(math.log(sig), table, np.arange(len(table), dtype=np.float64)), 0,
                      len(table) - 1))
    ang = t * freqs
    h = np.concatenate([x, np.broadcast_to(np.concatenate([np.sin(ang), np.cos(ang)]), (x.shape[0], 64))], 1)
    for w, b in p64[:-1]:
      z = h @ w + b
      h = z / (1 + np.exp(-z))
    return h @ p64[-1][0] + p64[-1][1]

  return Problem("digits", 64, eps_np, jax_fn)


def format_table(results: dict, nfes) -> str:
  lines = []
  for prob, res in results.items():
    lines.append(f"\n{prob}: relative error vs ODE reference (jdiff / diffusers)")
    lines.append(f"{'sampler':32s}" + "".join(f"{'NFE ' + str(n):>22s}" for n in nfes))
    for name, r in res.items():
      cells = []
      for n in nfes:
        j = r["jdiff"].get(n)
        d = r["diffusers"].get(n)
        cells.append(f"{j:.2e} / {d:.2e}" if d is not None else f"{j:.2e} /    -    ")
      lines.append(f"{name:32s}" + "".join(f"{c:>22s}" for c in cells))
  return "\n".join(lines)


def plot(results: dict, nfes, path: str) -> bool:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed: skipping the plot", file=sys.stderr)
    return False
  fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 5), squeeze=False)
  for ax, (prob, res) in zip(axes[0], results.items()):
    for i, (name, r) in enumerate(res.items()):
      color = f"C{i % 10}"
      ax.loglog(nfes, [r["jdiff"][n] for n in nfes], "o-", color=color, label=f"{name} (jdiff)")
      if r["diffusers"]:
        ax.loglog(nfes, [r["diffusers"][n] for n in nfes], "x--", color=color, alpha=0.6)
    ax.set_title(f"{prob} mixture (dashed: diffusers)")
    ax.set_xlabel("model calls (NFE)")
    ax.set_ylabel("relative error vs ODE reference")
    ax.grid(True, which="both", alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="a few configurations at NFE 10, small problems")
  p.add_argument("--trained", action="store_true", help="also race on a denoiser trained here on 8x8 digits")
  p.add_argument("--out", default="bench_out", help="directory for samplers.json and samplers.png")
  p.add_argument("--batch", type=int, default=None,
                 help="test noises per problem (default 1024; 8 with --quick). On sharp mixtures the batch error "
                      "is decided by the few samples that end at another mode: small batches give lottery ratios")
  p.add_argument("--train-steps", type=int, default=3000)
  p.add_argument("--calib-batch", type=int, default=256, help="calibration noises per calibrated jdiff grid")
  p.add_argument("--best-only", action="store_true", help="skip the per-sampler jdiff/diffusers twin table")
  p.add_argument("--nfes", default=None, help="comma-separated model-call budgets of the race (default 5,10,20)")
  p.add_argument("--problems", default=None,
                 help="comma-separated subset of sharp,second,third,digits for the best-against-best race")
  p.add_argument("--flips", action="store_true",
                 help="only the mode-flip study: errors and flips vs steps (10-160) per solver order")
  p.add_argument("--steps", default=None, help="comma-separated step counts of --flips (default 10,20,40,80,160)")
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  sched = schedules.scaled_linear(1000, 0.00085, 0.012)
  if args.flips:
    return _flips_main(args)
  if args.quick:
    names, nfes, best_nfes, batch = QUICK, (10,), (10,), args.batch or 8
    mixes = [sharp_mixture(8), second_mixture(6)]
  else:
    names, nfes, best_nfes, batch = tuple(CONFIGS), NFES, (5, 10, 20), args.batch or 1024
    mixes = [sharp_mixture(), second_mixture(), third_mixture()]
  t0 = time.time()
  wanted = None if args.problems is None else set(args.problems.split(","))
  if wanted is not None:
    mixes = [m for m in mixes if m.name in wanted]
  results = {} if args.best_only else {m.name: run_problem(m, names, nfes, batch) for m in mixes}
  table = format_table(results, nfes)
  print(table)
  problems = [mixture_problem(m, sched) for m in mixes]
  if args.trained and (wanted is None or "digits" in wanted):
    problems.append(trained_problem(sched, steps=300 if args.quick else args.train_steps))
  if args.nfes:
    best_nfes = tuple(int(n) for n in args.nfes.split(","))
  jnames = JDIFF_QUICK if args.quick else None
  cal = dict(calib_batch=64, calib_iterations=40) if args.quick else dict(calib_batch=args.calib_batch)
  best = {pr.name: best_vs_best(pr, best_nfes, batch, quick=args.quick, jdiff_names=jnames, **cal) for pr in problems}
  print(format_best(best))
  summary = {prob: {str(nfe): {k: v for k, v in r.items() if k not in ("diffusers", "jdiff")}
                    for nfe, r in per.items()} for prob, per in best.items()}
  with open(os.path.join(args.out, "samplers.json"), "w") as f:
    json.dump({"nfes": list(nfes), "results": results, "best": {k: {str(n): r for n, r in v.items()}
                                                                 for k, v in best.items()},
               "summary": summary, "seconds": time.time() - t0}, f, indent=1)
  if results:
    plot(results, nfes, os.path.join(args.out, "samplers.png"))
  return {"results": results, "best": best, "summary": summary}


def _flips_main(args) -> dict:
  """``--flips``: :func:`flip_study` on the chosen mixtures; prints the table, writes flips.json."""
  steps = tuple(int(n) for n in args.steps.split(",")) if args.steps else FLIP_STEPS
  mixes = [sharp_mixture(8), second_mixture(6)] if args.quick else [sharp_mixture(), second_mixture(), third_mixture()]
  if args.problems is not None:
    mixes = [m for m in mixes if m.name in set(args.problems.split(","))]
  batch = args.batch or (64 if args.quick else 4096)
  rows = [r for m in mixes for r in flip_study(m, steps=steps, batch=batch)]
  print(format_flips(rows))
  with open(os.path.join(args.out, "flips.json"), "w") as f:
    json.dump({"rows": rows}, f, indent=1)
  return {"flips": rows}


if __name__ == "__main__":
  main()
