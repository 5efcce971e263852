"""Sampler accuracy per model call on problems with an exact answer.

Data: isotropic Gaussian mixtures in tens of dimensions, whose exact epsilon-predictor is closed
form. For the same starting noise, a high-accuracy solution of the probability-flow ODE (scipy's
``solve_ivp``, DOP853 in log-sigma time, rtol 1e-10) is the reference; every deterministic jdiff
sampler and its diffusers twin (same options, same problem) are scored by the relative error
||x - x_ref|| / ||x_ref|| at 5, 10, 20 and 50 model calls. Prints a table, writes JSON and a
log-log PNG.

    python -m bench.samplers [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
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
  atol = 1e-10 to sigma = 1e-6, where the remaining change is O(sigma^2).
  """
  from scipy.integrate import solve_ivp
  shape = y0.shape

  def rhs(u, yflat):
    sig = math.exp(u)
    alpha = 1 / math.sqrt(1 + sig * sig)
    y = yflat.reshape(shape)
    return (sig * _eps_np(mix, y * alpha, alpha, sig * alpha)).ravel()

  sol = solve_ivp(rhs, (math.log(sigma_start), math.log(sigma_end)), y0.astype(np.float64).ravel(),
                  method="DOP853", rtol=1e-10, atol=1e-10)
  if not sol.success:
    raise RuntimeError(f"reference ODE solve failed: {sol.message}")
  return sol.y[:, -1].reshape(shape)


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
  import torch  # noqa: F401  (diffusers' loop)
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
        from jdiff.samplers import _sigmas
        sp = jopts.get("timestep_spacing", "linspace")
        _, sig = _sigmas.euler_grid(abar, n, spacing=sp,
                                    sigma_schedule="karras" if jopts.get("use_karras_sigmas") else None)
        top = float(np.max(sig))
        sig0, y0 = _start(float(sig[0]), "ve", top if sp != "leading" else math.sqrt(top * top + 1), x_T)
      else:
        sig0 = float(table_sig[-1])
        y0 = x_T.astype(np.float64) * math.sqrt(1 + sig0 * sig0)
      ref = ref_for(sig0, y0)
      out[name]["jdiff"][nfe] = float(np.linalg.norm(x0 - ref) / np.linalg.norm(ref))
      if dcls is not None:
        import torch
        with warnings.catch_warnings():
          warnings.simplefilter("ignore")
          sch = _diffusers_scheduler(dcls, dopts, sched_cfg)
          sch.set_timesteps(n)
          x = torch.from_numpy(x_T) * sch.init_noise_sigma
          for t in sch.timesteps:
            x = sch.step(tmodel(sch.scale_model_input(x, t), t), t, x).prev_sample
        out[name]["diffusers"][nfe] = float(np.linalg.norm(x.numpy() - ref) / np.linalg.norm(ref))
      log(f"  {mix.name:7s} {name:30s} NFE {nfe:3d}: jdiff {out[name]['jdiff'][nfe]:.3e}  diffusers "
          + (f"{out[name]['diffusers'][nfe]:.3e}" if dcls else "   -"))
  return out


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
  p.add_argument("--out", default="bench_out", help="directory for samplers.json and samplers.png")
  p.add_argument("--batch", type=int, default=None)
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  if args.quick:
    names, nfes, batch = QUICK, (10,), args.batch or 8
    mixes = [sharp_mixture(8), second_mixture(6)]
  else:
    names, nfes, batch = tuple(CONFIGS), NFES, args.batch or 64
    mixes = [sharp_mixture(), second_mixture()]
  t0 = time.time()
  results = {m.name: run_problem(m, names, nfes, batch) for m in mixes}
  table = format_table(results, nfes)
  print(table)
  summary = {}
  for prob, res in results.items():
    base = res["unipc3_karras_trailing"]["diffusers"].get(10)
    best = min(r["jdiff"].get(10, np.inf) for n, r in res.items() if n.startswith("jdiff_"))
    summary[prob] = {"diffusers_best_10nfe_unipc3_karras_trailing": base, "jdiff_best_10nfe": best,
                     "improvement": base / best if base else None}
  print("\n10-NFE summary:", json.dumps(summary, indent=1))
  with open(os.path.join(args.out, "samplers.json"), "w") as f:
    json.dump({"nfes": list(nfes), "results": results, "summary": summary, "seconds": time.time() - t0}, f,
              indent=1)
  plot(results, nfes, os.path.join(args.out, "samplers.png"))
  return {"results": results, "summary": summary}


if __name__ == "__main__":
  main()
