"""train.ct: the discretisation curriculum against its closed forms, the loss follows it at the train
state's step with the EMA target, and a tiny end-to-end run (VAE from a tiny train.vae run) trains,
resumes bit-identically, loads with StableDiffusion.from_workdir and is scored by sample.evaluate."""

from __future__ import annotations

import io
import json
import math
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ct_tiny, vae_tiny
from jdiff import consistency, ldm
from jdiff.models import AutoencoderKL
from jdiff.pipelines import StableDiffusion
from train import ct
from train import vae as vae_train


def song_n(k: int, big_k: int, s0: int, s1: int) -> int:
  """N(k) of Song et al. (2023), Appendix C, in Python floats."""
  return math.ceil(math.sqrt(k / big_k * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1) + 1


def ict_n(k: int, big_k: int, s0: int, s1: int) -> int:
  """N(k) of Song & Dhariwal (2023), Eq. (6)."""
  k_prime = math.floor(big_k / (math.log2(math.floor(s1 / s0)) + 1))
  return min(s0 * 2 ** math.floor(k / k_prime), s1) + 1


@pytest.mark.parametrize("big_k,s0,s1,mu0", [(1000, 2, 200, 0.95), (37, 2, 150, 0.9), (5000, 3, 40, 0.99)])
def test_ct_curriculum_closed_form(big_k, s0, s1, mu0):
  n, mu = consistency.ct_curriculum(big_k, kind="ct", s0=s0, s1=s1, mu0=mu0)
  want = np.array([song_n(k, big_k, s0, s1) for k in range(big_k)])
  np.testing.assert_array_equal(n, want)
  np.testing.assert_allclose(mu, [math.exp(s0 * math.log(mu0) / v) for v in want], rtol=1e-12)
  assert n[0] == s0 and np.all(np.diff(n) >= 0) and n[-1] <= s1 + 1
  assert np.all(np.diff(mu) >= 0) and mu[0] == pytest.approx(mu0, rel=1e-12)


@pytest.mark.parametrize("big_k,s0,s1", [(1000, 10, 1280), (400, 2, 200), (7, 10, 40)])
def test_ict_curriculum_closed_form(big_k, s0, s1):
  n, mu = consistency.ct_curriculum(big_k, kind="ict", s0=s0, s1=s1)
  np.testing.assert_array_equal(n, [ict_n(k, big_k, s0, s1) for k in range(big_k)])
  assert np.all(mu == 0.0)


@pytest.mark.parametrize("big_k,s0,s1", [(3000, 1, 16), (100, 1, 8), (9, 2, 64)])
def test_ect_curriculum_doubles_the_divisor(big_k, s0, s1):
  """"ect" reads the doubling N(k) of iCT as the divisor of the gap; its target is the online network."""
  n, mu = consistency.ct_curriculum(big_k, kind="ect", s0=s0, s1=s1)
  np.testing.assert_array_equal(n, [ict_n(k, big_k, s0, s1) for k in range(big_k)])
  assert np.all(mu == 0.0)
  assert consistency.curriculum_spacing("ect") == "proportional"
  assert consistency.curriculum_spacing("ct") == consistency.curriculum_spacing("ict") == "grid"
  assert consistency.curriculum_sampling_grid("ect", s1, 1000) == 1000
  assert consistency.curriculum_sampling_grid("ict", s1, 1000) == s1


def test_proportional_pairs_closed_form():
  """s = t - ceil(t / d) in exact integers (at least one timestep apart, s = 0 for d = 1), traced d."""
  t = np.arange(1, 1000)
  pairs = jax.jit(lambda d, tt: consistency.proportional_pairs(1000, d, tt))
  for d in (1, 2, 3, 16, 999):
    tt, s = pairs(jnp.int32(d), jnp.asarray(t, jnp.int32))
    want = t - np.array([-(-v // d) for v in t])
    np.testing.assert_array_equal(tt, t)
    np.testing.assert_array_equal(s, want)
    assert np.all(np.asarray(s) < t) and np.all(np.asarray(s) >= 0)
  np.testing.assert_array_equal(pairs(jnp.int32(1), jnp.asarray(t, jnp.int32))[1], 0)


def test_proportional_loss_with_one_interval_is_the_denoising_loss():
  """With divisor 1 every pair ends at s = 0, where f(x, 0) = x: the loss is d(f(x_t, t), x_s) with x_s the
  data noised to t = 0 (sigma_0 = sqrt(beta_0)), recomputed in float64 from the closed form of the
  boundary scalings and the v parameterisation."""
  from jdiff import schedules
  sched = schedules.make("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
  abar = np.cumprod(1.0 - np.asarray(sched.betas, np.float64))
  rng = np.random.default_rng(0)
  x0 = rng.normal(size=(6, 4, 4, 2))
  z = rng.normal(size=x0.shape)
  t = np.array([1, 7, 250, 500, 998, 999])
  w = rng.normal(size=(1, 4, 4, 2)) * 0.3

  def model(x, tt):  # any deterministic function of (x, t)
    return jnp.tanh(x * jnp.asarray(w, jnp.float32)) + (tt.astype(jnp.float32) / 1000.0)[:, None, None, None]

  loss, _ = consistency.training_loss(model, sched, jnp.asarray(x0, jnp.float32), key=jax.random.key(0),
                                      num_ddim_timesteps=1, loss_type="l2", prediction="v", spacing="proportional",
                                      index=jnp.asarray(t, jnp.int32), noise=jnp.asarray(z, jnp.float32),
                                      reduce=False)
  a, s = np.sqrt(abar[t])[:, None, None, None], np.sqrt(1.0 - abar[t])[:, None, None, None]
  x_t = a * x0 + s * z
  v = np.tanh(x_t * w) + (t / 1000.0)[:, None, None, None]
  x0_hat = a * x_t - s * v
  c = (t * 10.0)[:, None, None, None]
  f = 0.25 / (c * c + 0.25) * x_t + c / np.sqrt(c * c + 0.25) * x0_hat
  x_s = np.sqrt(abar[0]) * x0 + np.sqrt(1.0 - abar[0]) * z  # f(x_s, 0) = x_s
  want = np.mean((f - x_s) ** 2, axis=(1, 2, 3))
  tol = 1e-5 * (np.mean(f ** 2, axis=(1, 2, 3)) + 1.0)  # float32 rounding of terms of size |f|^2
  np.testing.assert_allclose(np.asarray(loss, np.float64), want, rtol=0, atol=float(np.max(tol)))
  with pytest.raises(ValueError, match="spacing='log'"):
    consistency.training_loss(model, sched, jnp.asarray(x0, jnp.float32), key=jax.random.key(0), spacing="log")


def test_curriculum_bad_values_are_named():
  with pytest.raises(ValueError, match="curriculum"):
    consistency.ct_curriculum(10, kind="edm")
  with pytest.raises(ValueError, match="s0=5, s1=2"):
    consistency.ct_curriculum(10, s0=5, s1=2)
  with pytest.raises(ValueError, match="mu0"):
    consistency.ct_curriculum(10, mu0=1.0)


def test_traced_grid_equals_the_static_grid():
  index = jnp.arange(40, dtype=jnp.int32)
  pairs = jax.jit(lambda n, i: consistency.skipping_pairs(1000, n, i))
  for n in (1, 7, 40, 149):
    i = jnp.minimum(index, n - 1)
    t, s = pairs(jnp.int32(n), i)
    grid = consistency.skipping_timesteps(1000, n)
    np.testing.assert_array_equal(t, grid[np.asarray(i)])
    np.testing.assert_array_equal(s, np.maximum(grid[np.asarray(i)] - 1000 // n, 0))


# ----------------------------------------------------------------------------- the task


def _tiny_bundle(config):
  """The bundle train.ct builds, around a random tiny VAE (no training)."""
  vae = AutoencoderKL(vae_train.vae_config(vae_tiny.get_config().vae))
  vae_params = jax.jit(lambda k: vae.init(k, jnp.zeros((1, 32, 32, 1)))["params"])(jax.random.key(0))
  return ldm.from_config(config, vae, vae_params)


@pytest.mark.slow  # many jitted loss evaluations: ~1.5 min of CPU per curriculum
@pytest.mark.parametrize("kind", ["ct", "ect"])
def test_loss_follows_the_curriculum_and_the_target(kind):
  """At step k the loss is the library's training loss on the grid of N(k) - 1 intervals ("ct"), or
  with proportional gaps of divisor N(k) - 1 ("ect"), N from the closed form, with the target network
  of the state; gradients reach the online parameters only."""
  config = ct_tiny.get_config()
  config.train.steps = 20
  config.ct.update(dict(curriculum=kind, s0=2, s1=10, loss_type="l2"))
  closed_n = song_n if kind == "ct" else ict_n
  spacing = "grid" if kind == "ct" else "proportional"
  bundle = _tiny_bundle(config)
  task = ct.make_task(config, bundle)
  params = task.init_params(jax.random.key(1))
  target = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape), params)
  rng = np.random.default_rng(0)
  prompts = ["a handwritten digit three", "a handwritten digit seven", "a handwritten digit one", ""]
  batch = {"image": jnp.asarray(rng.uniform(-1, 1, (4, 32, 32, 1)), jnp.float32),
           "tokens": jnp.asarray(bundle.tokenize(prompts))}
  key = jax.random.key(3)

  @jax.jit
  def run(p, tg, step):
    state = SimpleNamespace(step=step, extra_ema={"target": tg})
    return jax.value_and_grad(lambda p, tg: task.loss_fn(p, batch, key, task.frozen, state), argnums=(0, 1),
                              has_aux=True)(p, tg)

  @jax.jit
  def reference(p, tg, n):
    k_z, k_loss = jax.random.split(key)
    z = bundle.encode_images(bundle.vae_params, batch["image"], key=k_z)
    fn = lambda q: bundle.model_fn(q["unet"], bundle.encode_text(q["text"], batch["tokens"]))  # noqa: E731
    return consistency.training_loss(fn(p), bundle.schedule, z, key=k_loss, target_fn=fn(tg), num_ddim_timesteps=n,
                                     loss_type="l2", prediction=config.diffusion.prediction,
                                     timestep_scaling=10.0, spacing=spacing)[0]

  seen = set()
  for k in (0, 3, 11, 19, 25):
    n = closed_n(min(k, 19), 20, 2, 10)
    (loss, aux), (g_online, g_target) = run(params, target, jnp.int32(k))
    assert int(aux["num_scales"]) == n
    np.testing.assert_allclose(float(loss), float(reference(params, target, n - 1)), rtol=1e-5)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(g_target))
    assert sum(float(jnp.sum(jnp.abs(x))) for x in jax.tree.leaves(g_online)) > 0.0
    seen.add(n)
  assert len(seen) >= 3  # the grid grew
  # The target network's decay is mu(N(k)) at the state's step ("ct"), 0 ("ect": the online network).
  decay = task.extra_ema["target"]
  for k in (0, 11, 19):
    want = math.exp(2 * math.log(0.95) / song_n(k, 20, 2, 10)) if kind == "ct" else 0.0
    np.testing.assert_allclose(float(decay(jnp.int32(k))), want, rtol=1e-6)


def test_digits_config_ties_f_to_its_input_near_t0():
  """The shipped config's consistency function is pinned to x_t near t = 0 whatever the UNet outputs
  (float64 closed form of f(x_t, t) - x_t over the first grid interval), so the data reach every
  pair through the boundary; "sample" with LCM's scaling 10 is not (f(x_1, 1) ~ the output) and is refused."""
  from configs import ct_digits
  from jdiff import schedules

  config = ct_digits.get_config()
  d, c = config.diffusion, config.ct
  sched = schedules.make(d.schedule, d.num_timesteps, beta_start=d.beta_start, beta_end=d.beta_end)
  abar = np.cumprod(1.0 - np.asarray(sched.betas, np.float64))
  k = d.num_timesteps // c.s1  # the first interval of the final grid: pairs (k - 1, 0)
  t = np.arange(1, k)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(len(t), 64))
  out = rng.choice([-1.0, 1.0], size=x.shape)  # any network output of unit size
  f = consistency.consistency_output(sched, jnp.asarray(out, jnp.float32), jnp.asarray(x, jnp.float32),
                                     jnp.asarray(t), prediction=d.prediction, timestep_scaling=c.timestep_scaling)
  ratio = np.sqrt((1.0 - abar[t]) / abar[t])[:, None]  # noise-to-signal ratio at t
  dev = np.abs(np.asarray(f, np.float64) - x)
  assert np.all(dev <= 2.0 * ratio * (np.abs(x) + 1.0)), (dev.max(axis=1), ratio.ravel())
  ct.check_anchored(sched, d.prediction, c.timestep_scaling)
  with pytest.raises(ValueError, match="prediction='sample' with ct.timestep_scaling=10 .* not tied to x_t"):
    ct.check_anchored(sched, "sample", 10.0)
  ct.check_anchored(sched, "epsilon", 10.0)


def test_bad_settings_are_named(tmp_path):
  config = ct_tiny.get_config()
  config.vae.pretrained = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="neither a train.vae workdir"):
    ct.build(config)
  config = ct_tiny.get_config()
  config.ct.curriculum = "edm"
  with pytest.raises(ValueError, match="ct: curriculum"):
    ct.curriculum(config)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def vae_workdir(tmp_path_factory):
  """A tiny finished train.vae run (1 step)."""
  workdir = str(tmp_path_factory.mktemp("vae"))
  config = vae_tiny.get_config()
  config.train.steps = 1
  vae_train.train_vae(config, workdir, stream=io.StringIO())
  return workdir


@pytest.mark.slow  # a VAE stage, a CT run and an evaluation: ~1.5 min of CPU
def test_end_to_end_trains_loads_and_evaluates(vae_workdir, tmp_path, capsys):
  """Two steps of the tiny config; the run loads with from_workdir (LCM sampler, unguided, on the
  curriculum's sampling grid) and sample.evaluate scores it at one step."""
  config = ct_tiny.get_config()
  config.vae.source = vae_workdir
  config.train.steps = 2
  workdir = str(tmp_path / "ct")
  out = io.StringIO()
  assert ct.train_ct(config, workdir, stream=out)["step"] == 2
  assert "[ct] step 2/2" in out.getvalue()
  # the written config points at the resolved VAE, so the run loads from any cwd
  assert json.load(open(os.path.join(workdir, "config.json")))["vae"]["pretrained"] == os.path.abspath(vae_workdir)
  pipe = StableDiffusion.from_workdir(workdir)
  assert pipe.defaults["sampler"] == "lcm" and not pipe.cfg and pipe.prediction == "v"
  assert config.ct.curriculum == "ect"  # the default: samples on every training timestep, not on a final grid
  assert pipe.sampler_options["original_inference_steps"] == 1000
  from sample import evaluate as ev
  capsys.readouterr()
  assert ev.main(["--workdir", workdir, "--per_digit", "1", "--num_steps", "1"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["num_steps"] == 1 and result["num_samples"] == 10 and 0.0 <= result["accuracy"] <= 1.0


@pytest.mark.slow
def test_resume_is_bit_identical_and_samples_at_1_2_4_steps(vae_workdir, tmp_path):
  """Train 2 steps (stop as if killed), resume to 3: bit-identical to an uninterrupted run (the target
  EMA included); the run samples at 1, 2 and 4 steps."""
  from tests.test_fault_tolerance import assert_states_equal, saved_state

  config = ct_tiny.get_config()
  config.vae.source = vae_workdir
  workdir = str(tmp_path / "ct")
  config.train.stop_at = 2
  assert ct.train_ct(config, workdir, stream=io.StringIO())["step"] == 2
  config.train.stop_at = 0
  out = io.StringIO()
  assert ct.train_ct(config, workdir, stream=out)["step"] == 3
  assert "resuming from step 2" in out.getvalue()
  straight = str(tmp_path / "ct_straight")
  ct.train_ct(config, straight, stream=io.StringIO())
  _, a, _ = saved_state(workdir, 3)
  _, b, _ = saved_state(straight, 3)
  assert set(a["extra_ema"]) == {"target"}
  assert_states_equal(a, b)
  pipe = StableDiffusion.from_workdir(workdir)
  for n in (1, 2, 4):
    img = pipe.generate(["a handwritten digit two"] * 2, key=jax.random.key(0), num_steps=n)
    assert img.shape == (2, 32, 32, 1) and bool(jnp.all((img >= 0.0) & (img <= 1.0)))


def test_cli_one_line_errors(tmp_path, capsys):
  workdir = str(tmp_path / "ct")
  assert ct.main(["train.ct", "--vae", str(tmp_path / "missing"), f"--workdir={workdir}",
                  "--config", os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "ct_tiny.py")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "missing" in err[0]
