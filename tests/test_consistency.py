"""Consistency models (jdiff.consistency): boundary condition, guidance embedding, target-network
update, teacher steps and the distillation / training losses on closed-form Gaussian data.

For data x0 ~ N(mu, s^2 I) under x_t = a_t x0 + sigma_t eps, with v_t = a_t^2 s^2 + sigma_t^2:
  exact noise prediction  E[eps | x_t]   = sigma_t (x_t - a_t mu) / v_t,
  PF-ODE flow map t -> u                 x_u = a_u mu + sqrt(v_u / v_t) (x_t - a_t mu),
  exact consistency function (u = "0")   F(x_t, t) = mu + s (x_t - a_t mu) / sqrt(v_t).
A CFG mix of two such predictors with the same s is again one, with mean (1 + w) mu_c - w mu_u.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import consistency, diffusion, samplers, schedules

T = 1000
SHAPE = (4, 3, 3, 2)  # [B, H, W, C]


@pytest.fixture(scope="module")
def sched():
  return schedules.scaled_linear(T, 0.00085, 0.012)


@pytest.fixture(scope="module")
def sched_zero():
  """The same schedule with beta_0 = 0, so alpha-bar_0 = 1 and x at t = 0 is the data itself."""
  betas = np.asarray(schedules.scaled_linear(T, 0.00085, 0.012).betas, np.float64)
  betas[0] = 0.0
  with np.errstate(invalid="ignore"):  # the posterior variance at t = 0 is 0/0 (unused here)
    return schedules.from_betas(betas)


# ----------------------------------------------------------------------------- Gaussian helpers


class Gaussian:
  """Closed forms for x0 ~ N(mean, s^2) per element, with CFG over (mu_c, mu_u) and per-example w."""

  def __init__(self, sched, mu_c, mu_u, s):
    self.sched, self.mu_c, self.mu_u, self.s = sched, mu_c, mu_u, s

  def mean(self, w):  # [B, H, W, C] mean of the guided model for guidance scales w [B]
    w = w.reshape(-1, 1, 1, 1)
    return (1.0 + w) * self.mu_c[None] - w * self.mu_u[None]

  def coefs(self, t, x):
    a, sig = diffusion.q_mean_std(self.sched, t, x)
    return a, sig, a * a * self.s ** 2 + sig * sig

  def eps(self, x, t, mu):
    a, sig, v = self.coefs(t, x)
    return sig * (x - a * mu) / v

  def flow(self, x, t, u, mu):
    a_t, _, v_t = self.coefs(t, x)
    a_u, _, v_u = self.coefs(u, x)
    return a_u * mu + jnp.sqrt(v_u / v_t) * (x - a_t * mu)

  def F(self, x, t, mu):
    a, _, v = self.coefs(t, x)
    return mu + self.s * (x - a * mu) / jnp.sqrt(v)

  def teacher(self, x, t, w):
    """Exact epsilon predictor, mixed by CFG: cond + w (cond - uncond)."""
    c = self.eps(x, t, jnp.broadcast_to(self.mu_c[None], x.shape))
    u = self.eps(x, t, jnp.broadcast_to(self.mu_u[None], x.shape))
    return c + diffusion.broadcast_to(w, x) * (c - u)

  def student(self, prediction, **scal):
    """A network whose consistency output is exactly F (where c_out > 0)."""

    def fn(x, t, w):
      f = self.F(x, t, self.mean(w))
      c_skip, c_out = consistency.boundary_scalings(t, **scal)
      c_skip, c_out = diffusion.broadcast_to(c_skip, x), diffusion.broadcast_to(c_out, x)
      x0 = jnp.where(c_out > 0, (f - c_skip * x) / jnp.where(c_out > 0, c_out, 1.0), 0.0)
      if prediction == "sample":
        return x0
      a, sig, _ = self.coefs(t, x)
      return (x - a * x0) / sig

    return fn

  def exact_solver(self, model_fn, schedule, x, t, u, *, prediction):
    """The exact flow map, with the Gaussian's mean read off the (guided) teacher output."""
    assert prediction == "epsilon"
    eps = model_fn(x, t)
    a, sig, v = self.coefs(t, x)
    mu = (x - v * eps / sig) / a
    return self.flow(x, t, u, mu)


def _gauss(sched, key=jax.random.key(3), s=0.7):
  k1, k2 = jax.random.split(key)
  mu_c = 0.8 * jax.random.normal(k1, SHAPE[1:])
  mu_u = 0.5 * jax.random.normal(k2, SHAPE[1:])
  return Gaussian(sched, mu_c, mu_u, s)


def _data(g, key, w):
  return g.mean(w) + g.s * jax.random.normal(key, SHAPE)


# ----------------------------------------------------------------------------- parameterisation


def test_boundary_scalings_match_lcm_scheduler_and_closed_form():
  from diffusers import LCMScheduler
  ref = LCMScheduler(num_train_timesteps=T, timestep_scaling=10.0)
  ts = np.array([0, 1, 3, 19, 259, 999])
  c_skip, c_out = consistency.boundary_scalings(jnp.asarray(ts))
  for i, t in enumerate(ts):
    rs, ro = ref.get_scalings_for_boundary_condition_discrete(int(t))
    np.testing.assert_allclose(c_skip[i], rs, rtol=1e-6)
    np.testing.assert_allclose(c_out[i], ro, rtol=1e-6)
  # Other scaling and sigma_data, against float64.
  s = ts.astype(np.float64) * 3.0
  cs, co = consistency.boundary_scalings(jnp.asarray(ts), timestep_scaling=3.0, sigma_data=0.8)
  np.testing.assert_allclose(cs, 0.64 / (s * s + 0.64), rtol=1e-6)
  np.testing.assert_allclose(co, s / np.sqrt(s * s + 0.64), rtol=1e-6)
  # The LCM sampler uses the same scalings.
  from jdiff.samplers.lcm import boundary_scalings as sampler_scalings
  ss, so = sampler_scalings(jnp.asarray(ts), 10.0)
  np.testing.assert_allclose(ss, c_skip, rtol=1e-6)
  np.testing.assert_allclose(so, c_out, rtol=1e-6)


@pytest.mark.parametrize("prediction", ["epsilon", "v", "sample"])
def test_boundary_condition_f_at_t0_is_identity(sched, key, prediction):
  x = jax.random.normal(key, SHAPE)
  out = 3.0 * jax.random.normal(jax.random.fold_in(key, 1), SHAPE)  # any network output
  t0 = jnp.zeros((SHAPE[0],), jnp.int32)
  c_skip, c_out = consistency.boundary_scalings(t0)
  assert np.all(np.asarray(c_skip) == 1.0) and np.all(np.asarray(c_out) == 0.0)
  f = consistency.consistency_output(sched, out, x, t0, prediction=prediction)
  np.testing.assert_array_equal(f, x)
  # Away from 0: c_skip x + c_out x0_hat with x0_hat from diffusion.to_x0, against float64.
  t = jnp.array([5, 50, 500, 999])
  f = consistency.consistency_output(sched, out, x, t, prediction=prediction)
  abar = np.asarray(sched.alphas_cumprod, np.float64)[np.asarray(t)].reshape(-1, 1, 1, 1)
  a, sg = np.sqrt(abar), np.sqrt(1.0 - abar)
  xn, on = np.asarray(x, np.float64), np.asarray(out, np.float64)
  x0 = {"epsilon": (xn - sg * on) / a, "sample": on, "v": a * xn - sg * on}[prediction]
  sc = np.asarray(t, np.float64).reshape(-1, 1, 1, 1) * 10.0
  ref = 0.25 / (sc ** 2 + 0.25) * xn + sc / np.sqrt(sc ** 2 + 0.25) * x0
  np.testing.assert_allclose(f, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "v", "sample"])
def test_affine_coefficients_match_consistency_output_and_float64(sched, key, prediction):
  """f(x_t, t) = a_x x_t + a_out output, with (a_x, a_out) from a float64 recomputation of the schedule."""
  t = jnp.array([0, 1, 4, 50, 999])
  x = jax.random.normal(key, (5, 3, 3, 2))
  out = 2.0 * jax.random.normal(jax.random.fold_in(key, 1), x.shape)
  a_x, a_out = consistency.affine_coefficients(sched, t, prediction=prediction)
  f = consistency.consistency_output(sched, out, x, t, prediction=prediction)
  np.testing.assert_allclose(f, diffusion.broadcast_to(a_x, x) * x + diffusion.broadcast_to(a_out, x) * out,
                             rtol=1e-5, atol=1e-5)
  abar = np.cumprod(1.0 - np.asarray(sched.betas, np.float64))[np.asarray(t)]
  a, sg = np.sqrt(abar), np.sqrt(1.0 - abar)
  sc = np.asarray(t, np.float64) * 10.0
  c_skip, c_out = 0.25 / (sc ** 2 + 0.25), sc / np.sqrt(sc ** 2 + 0.25)
  b_x, b_out = {"epsilon": (1.0 / a, -sg / a), "sample": (0.0 * a, 1.0 + 0.0 * a), "v": (a, -sg)}[prediction]
  np.testing.assert_allclose(a_x, c_skip + c_out * b_x, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(a_out, c_out * b_out, rtol=1e-5, atol=1e-6)
  # The boundary condition at t = 0 for every type; near t = 0 only where the output is scaled by sigma.
  assert float(a_x[0]) == 1.0 and float(a_out[0]) == 0.0
  near = abs(float(a_out[1])) <= 2.0 * sg[1] / a[1] and abs(float(a_x[1]) - 1.0) <= 2.0 * sg[1] / a[1]
  assert near == (prediction != "sample")


def test_guidance_scale_embedding_matches_diffusers():
  import torch
  from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import \
      LatentConsistencyModelPipeline
  w = np.array([0.0, 1.5, 7.0, 14.0], np.float32)
  for dim in (256, 33):
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor(w), embedding_dim=dim)
    got = consistency.guidance_scale_embedding(jnp.asarray(w), dim)
    assert got.shape == (4, dim)
    # float32 sin/cos of arguments up to 1.4e4: one ulp of the argument is ~1e-3 there, so the
    # tolerance scales with the argument 1000 w freq.
    half = dim // 2
    freq = np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))
    arg = 1000.0 * w[:, None] * np.concatenate([freq, freq, np.zeros(dim - 2 * half)])[None]
    assert np.all(np.abs(np.asarray(got) - ref.numpy()) <= 2e-7 * arg + 1e-6)
  with pytest.raises(ValueError, match="batch"):
    consistency.guidance_scale_embedding(jnp.ones((2, 2)), 8)


def test_guided_teacher_is_cfg_with_one_plus_w(key):
  def apply(x, t, c):
    return jnp.sin(x) * c.reshape(-1, 1, 1, 1) + t.reshape(-1, 1, 1, 1) / 10.0
  x = jax.random.normal(key, SHAPE)
  t = jnp.array([1, 2, 3, 4])
  cond, uncond = jnp.array([1.0, 2.0, 3.0, 4.0]), jnp.array([0.5])
  w = jnp.array([0.0, 1.0, 2.5, 7.0])
  got = consistency.guided_teacher(apply, cond, uncond)(x, t, w)
  c, u = apply(x, t, cond), apply(x, t, jnp.full((4,), 0.5))
  np.testing.assert_allclose(got, c + w.reshape(-1, 1, 1, 1) * (c - u), rtol=1e-5, atol=1e-5)


def test_ema_update_matches_formula(key):
  tree = {"a": jax.random.normal(key, (3, 2)), "b": {"c": jnp.arange(4.0)}}
  online = jax.tree.map(lambda x: 2.0 * x + 1.0, tree)
  for decay in (0.0, 0.95, 0.999):
    got = consistency.ema_update(tree, online, decay)
    for g, t_, o in zip(jax.tree.leaves(got), jax.tree.leaves(tree), jax.tree.leaves(online)):
      ref = decay * np.asarray(t_, np.float64) + (1.0 - decay) * np.asarray(o, np.float64)
      np.testing.assert_allclose(g, ref, rtol=1e-6, atol=1e-6)
  # Repeated updates towards a fixed online network converge geometrically: error * decay^n.
  tgt = tree
  for _ in range(5):
    tgt = consistency.ema_update(tgt, online, 0.5)
  np.testing.assert_allclose(tgt["a"], online["a"] + (tree["a"] - online["a"]) * 0.5 ** 5, rtol=1e-5, atol=1e-6)


def test_pseudo_huber_and_l2_match_formulas(key):
  a = jax.random.normal(key, SHAPE)
  b = a + 0.01 * jax.random.normal(jax.random.fold_in(key, 1), SHAPE) ** 3
  an, bn = np.asarray(a, np.float64), np.asarray(b, np.float64)
  for c in (0.001, 0.03, 1.0):
    ref = np.mean(np.sqrt((an - bn) ** 2 + c * c) - c, axis=(1, 2, 3))
    np.testing.assert_allclose(consistency.distance(a, b, kind="huber", huber_c=c), ref, rtol=2e-3, atol=1e-9)
  np.testing.assert_allclose(consistency.distance(a, b, kind="l2"), np.mean((an - bn) ** 2, axis=(1, 2, 3)),
                             rtol=1e-4)
  # Large differences: pseudo-Huber ~ |d| - c; small ones: d^2 / (2c).
  big = consistency.pseudo_huber(jnp.full((1, 2), 5.0), jnp.zeros((1, 2)), 0.01)
  np.testing.assert_allclose(big, [np.sqrt(25.0 + 1e-4) - 0.01], rtol=1e-6)
  with pytest.raises(ValueError, match="loss_type"):
    consistency.distance(a, b, kind="l1")


# ----------------------------------------------------------------------------- grid and teacher steps


def test_skipping_grid_matches_lcm_scheduler():
  from diffusers import LCMScheduler
  for n in (50, 8):
    grid = consistency.skipping_timesteps(T, n)
    ref = LCMScheduler(num_train_timesteps=T)
    ref.set_timesteps(num_inference_steps=n, original_inference_steps=n)
    np.testing.assert_array_equal(grid[::-1], ref.timesteps.numpy())
  t, s = consistency.skipping_pairs(T, 50, jnp.array([0, 1, 49]))
  np.testing.assert_array_equal(t, [19, 39, 999])
  np.testing.assert_array_equal(s, [0, 19, 979])
  with pytest.raises(ValueError, match="num_ddim_timesteps"):
    consistency.skipping_timesteps(T, 0)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_ddim_teacher_step_matches_ddim_sampler(sched, key, prediction):
  """One DDIM step from grid point n to n - 1 equals one step of samplers.ddim on the same grid
  (trailing spacing; the last step lands on alpha-bar_0, set_alpha_to_one=False)."""
  n = 20  # k = 50

  def model_fn(x, t):
    return jnp.tanh(x) * 0.7 + jnp.cos(t.astype(jnp.float32) / 97.0).reshape(-1, 1, 1, 1)

  x = jax.random.normal(key, SHAPE)
  for idx in (n - 1, 7, 0):
    index = jnp.full((SHAPE[0],), idx, jnp.int32)
    t, s = consistency.skipping_pairs(T, n, index)
    got = consistency.teacher_step(model_fn, sched, x, t, s, solver="ddim", prediction=prediction)
    _, traj = samplers.ddim(model_fn, sched, x, num_steps=n, timestep_spacing="trailing",
                            set_alpha_to_one=False, prediction=prediction, start_step=n - 1 - idx,
                            return_trajectory=True)
    np.testing.assert_allclose(got, traj[0], rtol=1e-5, atol=1e-5)


def test_teacher_solvers_converge_on_gaussian(sched, key):
  """DDIM (first order) and DPM-Solver-2 (second order) against the exact flow map: the one-step
  error falls ~k^2 and ~k^3 when the step k shrinks, and DPM-Solver-2 is the more accurate."""
  g = _gauss(sched)
  w = jnp.array([0.0, 1.0, 2.0, 3.0])
  x = jax.random.normal(key, SHAPE) * 1.3
  t = jnp.full((SHAPE[0],), 600, jnp.int32)
  mu = g.mean(w)
  errs = {"ddim": [], "dpm_solver_2": []}
  for k in (160, 80, 40):
    s = t - k
    exact = g.flow(x, t, s, mu)
    for solver in errs:
      got = consistency.teacher_step(lambda xx, tt: g.teacher(xx, tt, w), sched, x, t, s, solver=solver)
      errs[solver].append(float(jnp.max(jnp.abs(got - exact))))
  d, p = np.array(errs["ddim"]), np.array(errs["dpm_solver_2"])
  assert np.all(d[:-1] / d[1:] > 3.0), d   # ~4 for a first-order method's local error
  assert np.all(p[:-1] / p[1:] > 6.0), p   # ~8 for second order
  assert np.all(p < d / 5), (p, d)
  with pytest.raises(ValueError, match="solver"):
    consistency.teacher_step(lambda xx, tt: xx, sched, x, t, t - 1, solver="euler")


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("loss_type", ["l2", "huber"])
def test_distillation_loss_zero_for_exact_student_and_teacher(sched, sched_zero, key, loss_type):
  """Student = exact consistency function of the guided Gaussian, teacher = exact epsilon
  predictor with an exact ODE step: the loss vanishes for every grid index (0 included) and w."""
  g = _gauss(sched_zero)
  w = jnp.array([0.0, 1.5, 4.0, 8.0])
  x0 = _data(g, key, w)
  kw = dict(num_ddim_timesteps=25, loss_type=loss_type, solver=g.exact_solver, prediction="sample",
            teacher_prediction="epsilon", w=w)
  for i, index in enumerate([jnp.array([0, 3, 12, 24]), None]):
    loss, aux = consistency.distillation_loss(g.student("sample"), g.teacher, sched_zero, x0,
                                              key=jax.random.fold_in(key, i), index=index, **kw)
    assert float(loss) < (1e-10 if loss_type == "l2" else 1e-7), float(loss)
    np.testing.assert_allclose(aux["w"], np.mean(np.asarray(w)), rtol=1e-6)
  # The same with an epsilon-predicting student away from t = 0 on the usual schedule.
  g2 = _gauss(sched)
  loss, _ = consistency.distillation_loss(g2.student("epsilon"), g2.teacher, sched, _data(g2, key, w), key=key,
                                          index=jnp.array([1, 5, 30, 49]), num_ddim_timesteps=50,
                                          loss_type=loss_type, solver=g2.exact_solver, w=w)
  assert float(loss) < (1e-9 if loss_type == "l2" else 1e-6), float(loss)
  # A student of the wrong guidance (the conditional model for every w) is penalised.
  wrong, _ = consistency.distillation_loss(lambda x, t, w_: g.student("sample")(x, t, jnp.zeros_like(w_)),
                                           g.teacher, sched_zero, x0, key=key, index=jnp.array([3, 6, 12, 24]), **kw)
  assert float(wrong) > (1e-3 if loss_type == "l2" else 1e-2), float(wrong)


def test_distillation_loss_with_ddim_teacher_vanishes_with_step(sched_zero, key):
  """With the DDIM teacher (the method as used) the loss of the exact student is the teacher's
  discretisation error only: it falls at least ~k^4 (squared first-order local error) with k."""
  g = _gauss(sched_zero)
  w = jnp.array([0.5, 1.5, 2.0, 3.0])
  x0 = _data(g, key, w)
  losses = []
  for n in (10, 20, 40):
    loss, _ = consistency.distillation_loss(g.student("sample"), g.teacher, sched_zero, x0, key=key,
                                            index=jnp.array([n // 2, n // 2 + 1, n - 2, n - 1]),
                                            num_ddim_timesteps=n, loss_type="l2", prediction="sample",
                                            teacher_prediction="epsilon", w=w)
    losses.append(float(loss))
  losses = np.array(losses)
  assert losses[0] > 1e-8
  assert np.all(losses[:-1] / losses[1:] > 8.0), losses


def test_distillation_loss_samples_w_and_grid_and_is_jittable(sched, key):
  g = _gauss(sched)
  x0 = jax.random.normal(key, SHAPE)
  student = g.student("epsilon")
  fn = jax.jit(lambda x, k: consistency.distillation_loss(student, g.teacher, sched, x, key=k, w_min=2.0,
                                                          w_max=5.0, num_ddim_timesteps=50, reduce=False))
  per_ex, _ = fn(x0, key)
  assert per_ex.shape == (SHAPE[0],) and bool(jnp.all(jnp.isfinite(per_ex)))
  fn(x0, jax.random.fold_in(key, 1))
  assert fn._cache_size() == 1  # no recompilation for a new key
  big = jax.jit(lambda k: consistency.distillation_loss(student, g.teacher, sched,
                                                        jnp.zeros((512,) + SHAPE[1:]), key=k, w_min=2.0, w_max=5.0))
  _, aux = big(key)
  assert 3.2 < float(aux["w"]) < 3.8  # mean of U[2, 5]
  assert 420 < float(aux["t"]) < 600  # mean of the grid 19, 39, ..., 999 is 509
  with pytest.raises(ValueError, match="w_min"):
    consistency.distillation_loss(student, g.teacher, sched, x0, key=key, w_min=5.0, w_max=1.0)


def test_gradients_flow_only_through_the_student(sched, key):
  """target_fn=None means stop-gradient of the student: the gradient equals that with a frozen copy
  of the parameters as the target network."""
  x0 = jax.random.normal(key, SHAPE)

  def net(p, x, t, w):
    return jnp.tanh(p["a"] * x + p["b"] * t.astype(jnp.float32).reshape(-1, 1, 1, 1) / 1000.0
                    + w.reshape(-1, 1, 1, 1) * 0.01)

  p = {"a": jnp.float32(0.7), "b": jnp.float32(-0.3)}
  teacher = lambda x, t, w: jnp.tanh(0.5 * x)  # noqa: E731
  kw = dict(num_ddim_timesteps=20, loss_type="huber", huber_c=0.01)

  def loss_self(p):
    return consistency.distillation_loss(lambda x, t, w: net(p, x, t, w), teacher, sched, x0, key=key, **kw)[0]

  def loss_frozen(p, q):
    return consistency.distillation_loss(lambda x, t, w: net(p, x, t, w), teacher, sched, x0, key=key,
                                         target_fn=lambda x, t, w: net(q, x, t, w), **kw)[0]

  g_self = jax.grad(loss_self)(p)
  g_frozen = jax.grad(loss_frozen)(p, p)
  for k in p:
    np.testing.assert_allclose(g_self[k], g_frozen[k], rtol=1e-6)
    assert abs(float(g_self[k])) > 0


def test_consistency_training_is_distillation_with_the_noise_as_teacher(sched, key):
  """The teacher-free estimator: same noise at both timesteps == a DDIM teacher step whose noise
  prediction is the noise actually used."""
  x0 = jax.random.normal(key, SHAPE)
  noise = jax.random.normal(jax.random.fold_in(key, 1), SHAPE)
  index = jnp.array([0, 4, 20, 49])

  def student(x, t):
    return jnp.tanh(0.9 * x) + t.astype(jnp.float32).reshape(-1, 1, 1, 1) / 3000.0

  ct, _ = consistency.training_loss(student, sched, x0, key=key, index=index, noise=noise, loss_type="l2")
  cd, _ = consistency.distillation_loss(lambda x, t, w: student(x, t), lambda x, t, w: noise, sched, x0, key=key,
                                        index=index, noise=noise, loss_type="l2", w_min=0.0, w_max=0.0)
  np.testing.assert_allclose(ct, cd, rtol=1e-4)
  assert float(ct) > 1e-4
  # Against a direct float64 evaluation of d(f(x_t, t), f(x_s, s)).
  t, s = consistency.skipping_pairs(T, 50, index)
  xt = diffusion.q_sample(sched, x0, t, noise)
  xs = diffusion.q_sample(sched, x0, s, noise)
  ft = consistency.consistency_output(sched, student(xt, t), xt, t)
  fs = consistency.consistency_output(sched, student(xs, s), xs, s)
  np.testing.assert_allclose(ct, np.mean((np.asarray(ft, np.float64) - np.asarray(fs, np.float64)) ** 2),
                             rtol=1e-4)
  # The exact consistency function of Gaussian data is a fixed point in expectation only: the
  # one-sample loss does not vanish (unlike distillation with an exact teacher).
  g = _gauss(sched)
  ct_exact, _ = consistency.training_loss(lambda x, t: g.student("epsilon")(x, t, jnp.zeros((x.shape[0],))),
                                          sched, _data(g, key, jnp.zeros((4,))), key=key, index=jnp.array([5, 9, 20, 40]),
                                          loss_type="l2")
  assert float(ct_exact) > 1e-6
