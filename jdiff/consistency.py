"""Consistency models: the boundary-condition parameterisation, consistency distillation (LCM) and
consistency training, as pure functions of model functions, a schedule, data and a PRNG key.

A consistency model maps any point x_t of a probability-flow ODE trajectory to the trajectory's
origin x_0 (Song et al., 2023, "Consistency Models"). Latent consistency models (Luo et al., 2023,
"Latent Consistency Models") distil one from a (latent) diffusion model. The pieces:

* :func:`boundary_scalings` / :func:`consistency_output`: ``f(x_t, t) = c_skip(t) x_t +
  c_out(t) x0_hat(output)`` with LCM's discrete-time scalings (sigma_data = 0.5, timestep scaled
  by ``timestep_scaling``), so c_skip(0) = 1 and c_out(0) = 0: f(x, 0) = x exactly;
  :func:`affine_coefficients` gives f as ``a_x x_t + a_out output`` (whether the boundary
  condition also holds near t = 0, which consistency training without a teacher relies on).
* :func:`guidance_scale_embedding`: the sinusoidal features of the guidance scale w that an LCM
  UNet (``time_cond_proj_dim``) adds to its timestep features.
* :func:`skipping_timesteps` and :func:`teacher_step`: the skipping-step grid t_n = (n + 1) k - 1
  (k = T // num_ddim_timesteps) and one teacher ODE step from t_{n+k} to t_n with DDIM or
  DPM-Solver-2.
* :func:`distillation_loss` (LCD: CFG-augmented teacher with w drawn per example) and
  :func:`training_loss` (consistency training without a teacher: the same noise at adjacent
  timesteps), each ``d(f_student(x_{t_{n+k}}), stopgrad f_target(x_{t_n}))`` with an L2 or
  pseudo-Huber distance :func:`distance`; :func:`ema_update` moves a target network.

Guidance convention: LCM's w guides the teacher as ``cond + w (cond - uncond)``, which is
:func:`jdiff.guidance.cfg` with scale ``1 + w``; the student embeds w itself. A sampler run with
guidance scale g therefore embeds ``g - 1`` (as diffusers' LCM pipeline does).

Model functions: a student/target is ``(x [B, ...], t [B] int32, w [B] float32) -> output`` (w is
ignored by networks without a w embedding, e.g. LCM-LoRA), a teacher is ``(x, t, w) -> guided
output``; outputs have the type ``prediction`` ("epsilon", "v" or "sample").

Example:
  >>> loss = consistency.distillation_loss(student, teacher, sched, latents, key=key,
  ...                                      num_ddim_timesteps=50, w_min=3.0, w_max=15.0)
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdiff import diffusion, guidance
from jdiff.schedules import Schedule

__all__ = [
    "SIGMA_DATA",
    "SOLVERS",
    "DISTANCES",
    "boundary_scalings",
    "consistency_output",
    "affine_coefficients",
    "guidance_scale_embedding",
    "guided_teacher",
    "skipping_timesteps",
    "skipping_pairs",
    "proportional_pairs",
    "ddim_step",
    "dpm_solver_2_step",
    "teacher_step",
    "pseudo_huber",
    "distance",
    "ema_update",
    "distillation_loss",
    "training_loss",
    "CURRICULA",
    "ct_curriculum",
    "curriculum_spacing",
    "curriculum_sampling_grid",
]

SIGMA_DATA = 0.5
SOLVERS = ("ddim", "dpm_solver_2")
DISTANCES = ("huber", "l2")
SPACINGS = ("grid", "proportional")

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
GuidedFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
Solver = Callable[..., jax.Array]


# ----------------------------------------------------------------------------- parameterisation


def boundary_scalings(t: jax.Array, timestep_scaling: float = 10.0, *,
                      sigma_data: float = SIGMA_DATA) -> tuple[jax.Array, jax.Array]:
  """c_skip(t) and c_out(t) of LCM's discrete-time consistency parameterisation.

  With s = t * timestep_scaling: c_skip = sigma_data^2 / (s^2 + sigma_data^2) and
  c_out = s / sqrt(s^2 + sigma_data^2) (diffusers' ``LCMScheduler``
  ``get_scalings_for_boundary_condition_discrete``). At t = 0, c_skip = 1 and c_out = 0 exactly.

  Args:
    t: timesteps (any shape; int or float).
    timestep_scaling: multiplier of the timestep (LCM uses 10).
    sigma_data: the data standard deviation of the parameterisation.

  Returns:
    (c_skip, c_out), float32 arrays of the shape of ``t``.

  Example:
    >>> c_skip, c_out = consistency.boundary_scalings(jnp.array([0, 999]))
  """
  s = jnp.asarray(t, jnp.float32) * jnp.float32(timestep_scaling)
  sd2 = jnp.float32(sigma_data) ** 2
  c_skip = sd2 / (s * s + sd2)
  c_out = s / jnp.sqrt(s * s + sd2)
  return c_skip, c_out


def consistency_output(schedule: Schedule, output: jax.Array, x_t: jax.Array, t: jax.Array, *,
                       prediction: str = "epsilon", timestep_scaling: float = 10.0,
                       sigma_data: float = SIGMA_DATA) -> jax.Array:
  """The consistency function f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat from a network output.

  Args:
    schedule: the noise schedule.
    output: the network output at (x_t, t), of type ``prediction`` [B, ...].
    x_t: the noisy input [B, ...].
    t: int timesteps [B].
    prediction: "epsilon", "v" or "sample".
    timestep_scaling, sigma_data: see :func:`boundary_scalings`.

  Returns:
    f(x_t, t) in float32, shape of ``x_t``.

  Example:
    >>> f = consistency.consistency_output(sched, unet.apply(p, x, t, c), x, t)
  """
  t = jnp.asarray(t)
  if t.ndim != 1 or t.shape[0] != x_t.shape[0]:
    raise ValueError(f"t must have shape [batch]={x_t.shape[:1]}, got {t.shape}")
  if output.shape != x_t.shape:
    raise ValueError(f"model output shape {output.shape} != input shape {x_t.shape}")
  x_t = x_t.astype(jnp.float32)
  alpha, sigma = diffusion.q_mean_std(schedule, t, x_t)
  x0 = diffusion.to_x0(output.astype(jnp.float32), x_t, alpha, sigma, prediction)
  c_skip, c_out = boundary_scalings(t, timestep_scaling=timestep_scaling, sigma_data=sigma_data)
  return diffusion.broadcast_to(c_skip, x_t) * x_t + diffusion.broadcast_to(c_out, x_t) * x0


def affine_coefficients(schedule: Schedule, t: jax.Array, *, prediction: str = "epsilon",
                        timestep_scaling: float = 10.0, sigma_data: float = SIGMA_DATA) -> tuple[jax.Array, jax.Array]:
  """(a_x, a_out) [t.shape] with ``consistency_output(...) = a_x x_t + a_out output`` elementwise.

  :func:`consistency_output` is affine in the noisy input and in the network output: with x0_hat =
  b_x x_t + b_out output (b = (1/alpha_t, -sigma_t/alpha_t) for "epsilon", (0, 1) for "sample",
  (alpha_t, -sigma_t) for "v"), a_x = c_skip + c_out b_x and a_out = c_out b_out. The boundary
  condition f(x, 0) = x holds at t = 0 for every prediction type (c_out(0) = 0); it holds *near*
  t = 0, whatever the network outputs, only when a_x -> 1 and a_out -> 0 as t -> 0. That is what
  ties a consistency-trained model (no teacher) to the data: "epsilon" and "v" have |a_out| ~ sigma_t,
  "sample" with LCM's timestep scaling 10 has a_out(1) = c_out(1) ~ 1, so only the pairs that end
  exactly at t = 0 see the data.

  Example:
    >>> a_x, a_out = consistency.affine_coefficients(sched, jnp.array([1]), prediction="v")
  """
  prediction = diffusion.check_prediction(prediction, flow=False)
  t = jnp.asarray(t)
  alpha = schedule.sqrt_alphas_cumprod[t].astype(jnp.float32)
  sigma = schedule.sqrt_one_minus_alphas_cumprod[t].astype(jnp.float32)
  b_x, b_out = {"epsilon": (1.0 / alpha, -sigma / alpha), "sample": (jnp.zeros_like(alpha), jnp.ones_like(alpha)),
                "v": (alpha, -sigma)}[prediction]
  c_skip, c_out = boundary_scalings(t, timestep_scaling=timestep_scaling, sigma_data=sigma_data)
  return c_skip + c_out * b_x, c_out * b_out


def guidance_scale_embedding(w: jax.Array, dim: int, *, dtype=jnp.float32) -> jax.Array:
  """Sinusoidal features of guidance scales [B] -> [B, dim] (diffusers' LCM ``get_guidance_scale_embedding``).

  The scale is multiplied by 1000 and embedded with frequencies exp(-log(10000) i / (dim/2 - 1)),
  sines first then cosines; an odd ``dim`` is zero-padded by one column.

  Example:
    >>> emb = consistency.guidance_scale_embedding(jnp.full((4,), 7.5 - 1.0), 256)  # [4, 256]
  """
  w = jnp.asarray(w, jnp.float32)
  if w.ndim != 1:
    raise ValueError(f"w must have shape [batch], got {w.shape}")
  dim = int(dim)
  half = dim // 2
  if half < 2:
    raise ValueError(f"guidance embedding dim must be >= 4, got {dim}")
  step = jnp.log(jnp.float32(10000.0)) / jnp.float32(half - 1)  # float32 throughout, as diffusers
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -step)
  args = (w * 1000.0).reshape(-1, 1) * freqs.reshape(1, -1)  # [B, half]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb.astype(dtype)  # [B, dim]


def guided_teacher(apply: Callable[[jax.Array, jax.Array, Any], jax.Array], cond: Any,
                   uncond: Any) -> GuidedFn:
  """A CFG teacher ``(x, t, w) -> uncond + (1 + w) (cond - uncond)`` (one doubled batch per call).

  Example:
    >>> teacher = consistency.guided_teacher(lambda x, t, c: unet.apply(p, x, t, c), ctx, null)
  """

  def teacher(x: jax.Array, t: jax.Array, w: jax.Array) -> jax.Array:
    return guidance.cfg(apply, cond, uncond, 1.0 + jnp.asarray(w, jnp.float32))(x, t)

  return teacher


# ----------------------------------------------------------------------------- skipping-step grid


def skipping_timesteps(num_train_timesteps: int, num_ddim_timesteps: int) -> np.ndarray:
  """The ascending skipping-step grid (n + 1) k - 1, n = 0..N-1, k = T // N (int64 [N]).

  This is the grid LCM is distilled on and the one diffusers' ``LCMScheduler`` samples from with
  ``original_inference_steps = N``.

  Example:
    >>> consistency.skipping_timesteps(1000, 50)[:3].tolist()
    [19, 39, 59]
  """
  big_t, n = int(num_train_timesteps), int(num_ddim_timesteps)
  if not 1 <= n <= big_t:
    raise ValueError(f"num_ddim_timesteps must be in [1, {big_t}], got {num_ddim_timesteps}")
  k = big_t // n
  return np.arange(1, n + 1, dtype=np.int64) * k - 1


def skipping_pairs(num_train_timesteps: int, num_ddim_timesteps: int | jax.Array,
                   index: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(t_{n+k}, t_n) for grid indices [B]: the grid point (n + 1) k - 1 and the one k timesteps earlier
  (>= 0). ``num_ddim_timesteps`` may be a traced int32 scalar (a grid that grows during consistency
  training, :func:`ct_curriculum`)."""
  if isinstance(num_ddim_timesteps, (int, np.integer)):
    skipping_timesteps(num_train_timesteps, num_ddim_timesteps)  # validates the range
  k = jnp.int32(num_train_timesteps) // jnp.asarray(num_ddim_timesteps, jnp.int32)
  t_start = (jnp.asarray(index, jnp.int32) + 1) * k - 1
  return t_start, jnp.maximum(t_start - k, 0)


def proportional_pairs(num_train_timesteps: int, num_intervals: int | jax.Array,
                       t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(t, s) with s = t - ceil(t / num_intervals) for timesteps t in [1, T - 1] [B]: the pair whose gap is
  the fraction 1 / num_intervals of t (at least one timestep). With one interval s = 0 for every t (the
  consistency loss is then the denoising loss f(x_t, t) ~ x_0); each doubling halves the gap (the
  continuous-time curriculum of Geng et al., 2024, "Consistency Models Made Easy", on a discrete
  schedule). ``num_intervals`` may be a traced int32 scalar."""
  del num_train_timesteps  # t is drawn by the caller; kept for the signature of skipping_pairs
  t = jnp.asarray(t, jnp.int32)
  d = jnp.asarray(num_intervals, jnp.int32)
  return t, t - (t + d - 1) // d


# ----------------------------------------------------------------------------- teacher ODE steps


def ddim_step(schedule: Schedule, output: jax.Array, x_t: jax.Array, t: jax.Array, s: jax.Array, *,
              prediction: str = "epsilon") -> jax.Array:
  """The deterministic DDIM step x_s = alpha_s x0_hat + sigma_s eps_hat from the output at (x_t, t).

  Args:
    schedule: the noise schedule.
    output: the (guided) network output at (x_t, t), of type ``prediction``.
    x_t: [B, ...]; t, s: int timesteps [B] (s < t; s = 0 lands on alpha-bar_0).

  Example:
    >>> x_s = consistency.ddim_step(sched, teacher(x, t, w), x, t, s)
  """
  x_t = x_t.astype(jnp.float32)
  out = output.astype(jnp.float32)
  a_t, sig_t = diffusion.q_mean_std(schedule, t, x_t)
  a_s, sig_s = diffusion.q_mean_std(schedule, s, x_t)
  x0 = diffusion.to_x0(out, x_t, a_t, sig_t, prediction)
  eps = diffusion.to_epsilon(out, x_t, a_t, sig_t, prediction)
  return a_s * x0 + sig_s * eps


def dpm_solver_2_step(model_fn: ModelFn, schedule: Schedule, x_t: jax.Array, t: jax.Array, s: jax.Array, *,
                      prediction: str = "epsilon", output_t: jax.Array | None = None) -> jax.Array:
  """One singlestep DPM-Solver-2 step (Lu et al., 2022, noise-prediction form) from t to s.

  The intermediate point is the integer timestep u = s + (t - s) // 2, so the schedule is used at
  its own discrete values (no interpolation); r = (lambda_u - lambda_t) / h with h = lambda_s -
  lambda_t and lambda = log(alpha / sigma):

    x_u = (alpha_u / alpha_t) x_t - sigma_u (e^{r h} - 1) eps_t
    x_s = (alpha_s / alpha_t) x_t - sigma_s (e^h - 1) eps_t - sigma_s / (2 r) (e^h - 1) (eps_u - eps_t)

  Two model calls (one if ``output_t`` is given). Needs t - s >= 1 for every example.

  Example:
    >>> x_s = consistency.dpm_solver_2_step(lambda x, t: teacher(x, t, w), sched, x, t, s)
  """
  x_t = x_t.astype(jnp.float32)
  u = s + (t - s) // 2

  def coeffs(tt):
    a, sig = diffusion.q_mean_std(schedule, tt, x_t)
    return a, sig, jnp.log(a) - jnp.log(sig)

  a_t, sig_t, lam_t = coeffs(t)
  a_u, sig_u, lam_u = coeffs(u)
  a_s, sig_s, lam_s = coeffs(s)
  h = lam_s - lam_t
  r = (lam_u - lam_t) / h
  out_t = model_fn(x_t, t) if output_t is None else output_t
  eps_t = diffusion.to_epsilon(out_t.astype(jnp.float32), x_t, a_t, sig_t, prediction)
  x_u = (a_u / a_t) * x_t - sig_u * jnp.expm1(r * h) * eps_t
  eps_u = diffusion.to_epsilon(model_fn(x_u, u).astype(jnp.float32), x_u, a_u, sig_u, prediction)
  return (a_s / a_t) * x_t - sig_s * jnp.expm1(h) * eps_t - (sig_s / (2.0 * r)) * jnp.expm1(h) * (eps_u - eps_t)


def teacher_step(model_fn: ModelFn, schedule: Schedule, x_t: jax.Array, t: jax.Array, s: jax.Array, *,
                 solver: str | Solver = "ddim", prediction: str = "epsilon") -> jax.Array:
  """One step of the teacher's probability-flow ODE from t to s with ``solver``.

  Args:
    model_fn: ``(x, t) -> output`` (the guided teacher, w closed over).
    schedule: the noise schedule.
    x_t: [B, ...]; t, s: int timesteps [B].
    solver: "ddim", "dpm_solver_2", or a callable ``(model_fn, schedule, x_t, t, s, prediction=)``.
    prediction: the teacher's prediction type.

  Example:
    >>> x_s = consistency.teacher_step(lambda x, t: teacher(x, t, w), sched, x, t, s, solver="ddim")
  """
  if callable(solver):
    return solver(model_fn, schedule, x_t, t, s, prediction=prediction)
  if solver == "ddim":
    return ddim_step(schedule, model_fn(x_t, t), x_t, t, s, prediction=prediction)
  if solver == "dpm_solver_2":
    return dpm_solver_2_step(model_fn, schedule, x_t, t, s, prediction=prediction)
  raise ValueError(f"unknown teacher solver {solver!r}; expected one of {SOLVERS} or a callable")


# ----------------------------------------------------------------------------- distances, EMA


def pseudo_huber(a: jax.Array, b: jax.Array, c: float) -> jax.Array:
  """Elementwise pseudo-Huber distance sqrt((a - b)^2 + c^2) - c, averaged per example -> [B].

  This is LCM's "huber" loss (elementwise, then averaged); it is ~(a - b)^2 / (2c) for small
  differences and ~|a - b| for large ones.
  """
  d = a.astype(jnp.float32) - b.astype(jnp.float32)
  c = jnp.float32(c)
  per = jnp.sqrt(d * d + c * c) - c
  return jnp.mean(per, axis=tuple(range(1, per.ndim)))


def distance(a: jax.Array, b: jax.Array, *, kind: str = "huber", huber_c: float = 0.001) -> jax.Array:
  """Per-example distance [B]: ``"l2"`` (mean squared error) or ``"huber"`` (:func:`pseudo_huber`).

  Example:
    >>> d = consistency.distance(f_student, f_target, kind="huber", huber_c=0.001)  # [B]
  """
  if a.shape != b.shape:
    raise ValueError(f"distance between arrays of different shapes {a.shape} and {b.shape}")
  if kind == "l2":
    d = a.astype(jnp.float32) - b.astype(jnp.float32)
    return jnp.mean(d * d, axis=tuple(range(1, d.ndim)))
  if kind == "huber":
    return pseudo_huber(a, b, huber_c)
  raise ValueError(f"unknown loss_type {kind!r}; expected one of {DISTANCES}")


def ema_update(target: Any, online: Any, decay: float | jax.Array) -> Any:
  """Target-network update theta^- <- decay theta^- + (1 - decay) theta (decay 0: a plain copy).

  Example:
    >>> target = consistency.ema_update(target, params, 0.95)
  """
  return optax.incremental_update(online, target, 1.0 - jnp.asarray(decay, jnp.float32))


# ----------------------------------------------------------------------------- losses


def _check_w_range(w_min: float, w_max: float) -> None:
  if isinstance(w_min, (int, float)) and isinstance(w_max, (int, float)) and w_min > w_max:
    raise ValueError(f"w_min={w_min} must not exceed w_max={w_max}")


def _draw_index(key, b, num_ddim_timesteps, index):
  if index is None:
    return jax.random.randint(key, (b,), 0, num_ddim_timesteps, dtype=jnp.int32)
  index = jnp.asarray(index, jnp.int32)
  if index.shape != (b,):
    raise ValueError(f"index must have shape [{b}], got {index.shape}")
  return index


def _draw_pair(k_idx: jax.Array, k_noise: jax.Array, schedule: Schedule, x0: jax.Array, num_ddim_timesteps: int,
               index: jax.Array | None, noise: jax.Array | None):
  """float32 x0, the skipping-step pair (t, s) [B] and float32 noise of one consistency loss
  (``index`` / ``noise`` drawn from the keys unless given)."""
  x0 = x0.astype(jnp.float32)
  index = _draw_index(k_idx, x0.shape[0], num_ddim_timesteps, index)
  t, s = skipping_pairs(schedule.num_timesteps, num_ddim_timesteps, index)
  if noise is None:
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  return x0, t, s, noise.astype(jnp.float32)


def distillation_loss(student_fn: GuidedFn, teacher_fn: GuidedFn, schedule: Schedule, x0: jax.Array, *,
                      key: jax.Array, target_fn: GuidedFn | None = None, num_ddim_timesteps: int = 50,
                      w_min: float = 3.0, w_max: float = 15.0, solver: str | Solver = "ddim",
                      loss_type: str = "huber", huber_c: float = 0.001, prediction: str = "epsilon",
                      teacher_prediction: str | None = None, timestep_scaling: float = 10.0,
                      sigma_data: float = SIGMA_DATA, index: jax.Array | None = None,
                      noise: jax.Array | None = None, w: jax.Array | None = None,
                      reduce: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The (latent) consistency distillation loss of Luo et al. (2023), one sample per example.

  Per example: a grid index n ~ U{0..N-1}, t = (n + 1) k - 1, s = max(t - k, 0); w ~ U[w_min,
  w_max]; x_t = q_sample(x0, t, eps); the teacher solves its guided ODE from t to s,
  x_s = solver(teacher(., ., w), x_t, t, s); the loss is
  d(f_student(x_t, t, w), stopgrad f_target(x_s, s, w)).

  Args:
    student_fn: ``(x, t, w) -> output`` of the trained network.
    teacher_fn: ``(x, t, w) -> guided output`` (see :func:`guided_teacher`); never differentiated.
    schedule: the noise schedule.
    x0: clean data (latents) [B, ...].
    key: PRNG key (index, noise, w).
    target_fn: the target network ``(x, t, w) -> output`` (e.g. EMA parameters); default the
      student itself. Always under ``stop_gradient``.
    num_ddim_timesteps: N, the skipping-step grid size (k = T // N).
    w_min, w_max: range of the per-example guidance scale w (teacher: cond + w (cond - uncond)).
    solver: "ddim", "dpm_solver_2" or a callable (see :func:`teacher_step`).
    loss_type: "huber" (pseudo-Huber with ``huber_c``) or "l2".
    prediction: what the student/target output; teacher_prediction: the teacher's (default same).
    timestep_scaling, sigma_data: the boundary-condition scalings.
    index, noise, w: optional fixed grid indices [B], noise (shape of x0) and guidance scales [B].
    reduce: return the batch mean (True) or per-example losses [B].

  Returns:
    (loss, metrics): metrics holds ``w`` mean and the mean ``t`` sampled (scalars).

  Example:
    >>> student = lambda x, t, w: unet.apply(p, x, t, ctx, timestep_cond=guidance_scale_embedding(w, 256))
    >>> teacher = guided_teacher(lambda x, t, c: unet.apply(tp, x, t, c), ctx, null)
    >>> loss, aux = distillation_loss(student, teacher, sched, latents, key=key)
  """
  _check_w_range(w_min, w_max)
  prediction = diffusion.check_prediction(prediction)
  teacher_prediction = diffusion.check_prediction(teacher_prediction or prediction)
  k_idx, k_noise, k_w = jax.random.split(key, 3)
  b = x0.shape[0]
  x0, t, s, noise = _draw_pair(k_idx, k_noise, schedule, x0, num_ddim_timesteps, index, noise)
  if w is None:
    w = jax.random.uniform(k_w, (b,), jnp.float32, w_min, w_max)
  w = jnp.broadcast_to(jnp.asarray(w, jnp.float32), (b,))
  x_t = diffusion.q_sample(schedule, x0, t, noise)
  scal = dict(timestep_scaling=timestep_scaling, sigma_data=sigma_data)

  f_student = consistency_output(schedule, student_fn(x_t, t, w), x_t, t, prediction=prediction, **scal)
  x_s = teacher_step(lambda x, tt: teacher_fn(x, tt, w), schedule, jax.lax.stop_gradient(x_t), t, s,
                     solver=solver, prediction=teacher_prediction)
  x_s = jax.lax.stop_gradient(x_s)
  tgt_fn = student_fn if target_fn is None else target_fn
  f_target = jax.lax.stop_gradient(
      consistency_output(schedule, tgt_fn(x_s, s, w), x_s, s, prediction=prediction, **scal))
  per_ex = distance(f_student, f_target, kind=loss_type, huber_c=huber_c)
  metrics = {"w": jnp.mean(w), "t": jnp.mean(t.astype(jnp.float32))}
  return (jnp.mean(per_ex) if reduce else per_ex), metrics


def training_loss(student_fn: ModelFn, schedule: Schedule, x0: jax.Array, *, key: jax.Array,
                  target_fn: ModelFn | None = None, num_ddim_timesteps: int = 50, loss_type: str = "huber",
                  huber_c: float = 0.001, prediction: str = "epsilon", timestep_scaling: float = 10.0,
                  sigma_data: float = SIGMA_DATA, index: jax.Array | None = None,
                  noise: jax.Array | None = None, reduce: bool = True,
                  spacing: str = "grid") -> tuple[jax.Array, dict[str, jax.Array]]:
  """Consistency training without a teacher (Song et al., 2023), on the skipping-step grid or with
  proportional gaps.

  The teacher's ODE step is replaced by the exact-score-free estimate: with one noise draw z,
  x_t = alpha_t x0 + sigma_t z and x_s = alpha_s x0 + sigma_s z, which is the DDIM step from x_t
  with the noise prediction replaced by its one-sample estimate z. The loss is
  d(f_student(x_t, t), stopgrad f_target(x_s, s)).

  Args:
    student_fn: ``(x, t) -> output`` of type ``prediction``.
    schedule: the noise schedule.
    x0: clean data [B, ...].
    key: PRNG key (index and noise).
    target_fn: the target network (default: the student, under stop_gradient).
    num_ddim_timesteps: the grid size; an int, or a traced int32 scalar (the curriculum's N(k) - 1
      intervals, :func:`ct_curriculum`). With ``spacing="proportional"``: the divisor of t in the gap.
    loss_type, huber_c, prediction, timestep_scaling, sigma_data, noise,
    reduce: as in :func:`distillation_loss`.
    index: grid indices [B] ("grid"), or the timesteps t in [1, T - 1] ("proportional"); drawn
      uniformly from ``key`` when None.
    spacing: "grid" (pairs (t_{n+k}, t_n) of :func:`skipping_pairs`) or "proportional" (t uniform in
      [1, T - 1], s = t - ceil(t / num_ddim_timesteps): :func:`proportional_pairs`).

  Returns:
    (loss, metrics) with the mean ``t`` sampled.

  Example:
    >>> loss, _ = consistency.training_loss(lambda x, t: unet.apply(p, x, t, c), sched, x0, key=key)
  """
  prediction = diffusion.check_prediction(prediction)
  if spacing not in SPACINGS:
    raise ValueError(f"spacing={spacing!r}: expected one of {SPACINGS}")
  k_idx, k_noise = jax.random.split(key)
  if spacing == "grid":
    x0, t, s, noise = _draw_pair(k_idx, k_noise, schedule, x0, num_ddim_timesteps, index, noise)
  else:
    big_t = schedule.num_timesteps
    if index is None:
      index = jax.random.randint(k_idx, (x0.shape[0],), 1, big_t, dtype=jnp.int32)
    elif jnp.shape(index) != (x0.shape[0],):
      raise ValueError(f"index must have shape [{x0.shape[0]}], got {jnp.shape(index)}")
    t, s = proportional_pairs(big_t, num_ddim_timesteps, index)
    x0 = x0.astype(jnp.float32)
    noise = (jax.random.normal(k_noise, x0.shape, jnp.float32) if noise is None else noise).astype(jnp.float32)
  x_t = diffusion.q_sample(schedule, x0, t, noise)
  x_s = diffusion.q_sample(schedule, x0, s, noise)
  scal = dict(timestep_scaling=timestep_scaling, sigma_data=sigma_data)
  f_student = consistency_output(schedule, student_fn(x_t, t), x_t, t, prediction=prediction, **scal)
  tgt_fn = student_fn if target_fn is None else target_fn
  f_target = jax.lax.stop_gradient(
      consistency_output(schedule, tgt_fn(x_s, s), x_s, s, prediction=prediction, **scal))
  per_ex = distance(f_student, f_target, kind=loss_type, huber_c=huber_c)
  return (jnp.mean(per_ex) if reduce else per_ex), {"t": jnp.mean(t.astype(jnp.float32))}


# ----------------------------------------------------------------------------- consistency training curriculum

CURRICULA = ("ct", "ict", "ect")


def ct_curriculum(total_steps: int, *, kind: str = "ct", s0: int = 2, s1: int = 200,
                  mu0: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
  """The discretisation curriculum of consistency training: N(k) and the target decay mu(k), k = 0..K-1.

  N(k) is the number of discretisation points at training step k of K (so N(k) - 1 intervals: the
  ``num_ddim_timesteps`` of :func:`training_loss`), growing from s0 to s1 + 1:

  * ``"ct"`` (Song et al., 2023, "Consistency Models"): N(k) = ceil(sqrt(k / K ((s1 + 1)^2 - s0^2)
    + s0^2) - 1) + 1 and mu(k) = exp(s0 log(mu0) / N(k)) (the target network's EMA decay);
  * ``"ict"`` (Song & Dhariwal, 2023, "Improved Techniques for Training Consistency Models"):
    N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = floor(K / (log2(floor(s1 / s0)) + 1)), and
    mu(k) = 0 (the target is the stop-gradient online network);
  * ``"ect"``: the same doubling N(k) and mu(k) = 0, read as the divisor of the proportional gaps
    (``training_loss(..., spacing="proportional")``, :func:`proportional_pairs`): with s0 = 1 the
    first stage is the denoising loss at every t, and each later stage halves the gap (Geng et al.,
    2024, "Consistency Models Made Easy").

  Computed on the host in float64 / exact integers; a train step reads them by its step.

  Args:
    total_steps: K, the training steps the curriculum spans.
    kind: "ct", "ict" or "ect".
    s0, s1: the initial and final number of intervals (s0 >= 1, s1 >= s0).
    mu0: the target decay at N = s0 ("ct" only), in [0, 1).

  Returns:
    (N [K] int32, mu [K] float64).

  Raises:
    ValueError: an unknown kind or out-of-range values (naming the argument).

  Example:
    >>> n, mu = consistency.ct_curriculum(1000, s0=2, s1=200, mu0=0.95)
    >>> int(n[0]), int(n[-1]), round(float(mu[0]), 4)
    (2, 201, 0.95)
  """
  if kind not in CURRICULA:
    raise ValueError(f"curriculum {kind!r}: expected one of {CURRICULA}")
  big_k, s0, s1 = int(total_steps), int(s0), int(s1)
  if big_k < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  if not 1 <= s0 <= s1:
    raise ValueError(f"s0={s0}, s1={s1}: need 1 <= s0 <= s1")
  if not 0.0 <= float(mu0) < 1.0:
    raise ValueError(f"mu0={mu0}: expected a number in [0, 1)")
  k = np.arange(big_k, dtype=np.int64)
  if kind == "ct":
    # ceil(sqrt(x)) for x = k / K ((s1 + 1)^2 - s0^2) + s0^2, exactly: the smallest m with m^2 K >= K x.
    kx = k * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2 * big_k  # K x, an integer
    m = np.ceil(np.sqrt(kx / big_k)).astype(np.int64)
    m = np.where((m - 1) ** 2 * big_k >= kx, m - 1, m)
    m = np.where(m * m * big_k < kx, m + 1, m)
    n = m  # ceil(sqrt(x) - 1) + 1 = ceil(sqrt(x))
    mu = np.exp(s0 * np.log(float(mu0)) / n) if mu0 > 0 else np.zeros(big_k)
  else:  # "ict" and "ect"
    k_prime = max(1, int(np.floor(big_k / (np.log2(s1 // s0) + 1.0))))
    n = np.minimum(s0 * 2 ** (k // k_prime), s1) + 1
    mu = np.zeros(big_k)
  return n.astype(np.int32), mu.astype(np.float64)


def curriculum_spacing(kind: str) -> str:
  """The ``training_loss`` spacing a curriculum is read with: "proportional" for "ect", else "grid"."""
  if kind not in CURRICULA:
    raise ValueError(f"curriculum {kind!r}: expected one of {CURRICULA}")
  return "proportional" if kind == "ect" else "grid"


def curriculum_sampling_grid(kind: str, s1: int, num_train_timesteps: int) -> int:
  """The skipping-step grid a consistency-trained model samples on: its final training grid (s1
  points) for "ct" / "ict"; every timestep for "ect", whose pairs start anywhere in [1, T - 1]."""
  return int(num_train_timesteps) if curriculum_spacing(kind) == "proportional" else int(s1)
