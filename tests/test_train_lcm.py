"""train.lcm: the student starts as the teacher, the distillation loss trains, and a tiny
end-to-end run (teacher from a tiny train.ldm run) checkpoints, samples and resumes."""

from __future__ import annotations

import dataclasses
import io
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import lcm_digits, ldm_tiny
from jdiff import consistency
from jdiff.models import AutoencoderKL
from jdiff.pipelines import StableDiffusion
from train import lcm
from train import ldm as ldm_train
from train import vae as vae_train


def _tiny_teacher(seed: int = 0) -> StableDiffusion:
  """A teacher of random tiny networks built the way train.ldm builds them (no training)."""
  config = ldm_tiny.get_config()
  vae = AutoencoderKL(vae_train.vae_config(config.vae))
  vae_params = jax.jit(lambda k: vae.init(k, jnp.zeros((1, 32, 32, 1)))["params"])(jax.random.key(seed))
  bundle = ldm_train.build(config, vae, vae_params)
  params = jax.jit(bundle.init_unet)(jax.random.key(seed + 1))
  return dataclasses.replace(bundle, unet_params=params, data_config=config.data)


def _config(**lcm_overrides):
  config = lcm_digits.get_config()
  config.lcm.update(dict(w_embedding_dim=8, lora_rank=2, lora_alpha=2.0, **lcm_overrides))
  config.sample.update(dict(num_steps=2, per_prompt=1))
  return config


def _view(params, target=None):
  """The part of a train state the distillation loss reads: the target network."""
  return SimpleNamespace(step=jnp.int32(0), extra_ema={"target": params if target is None else target})


@pytest.fixture(scope="module")
def teacher():
  return _tiny_teacher()


@pytest.fixture(scope="module")
def batch(teacher):
  rng = np.random.default_rng(0)
  prompts = ["a handwritten digit three", "a handwritten digit seven", "", "a handwritten digit one"]
  return {"image": jnp.asarray(rng.uniform(-1, 1, (4, 32, 32, 1)), jnp.float32),
          "tokens": jnp.asarray(np.stack([teacher.tokenize(p) for p in prompts]))}


@pytest.mark.parametrize("use_lora", [False, True])
def test_student_starts_as_the_teacher(teacher, batch, use_lora):
  student, init_params = lcm.build(_config(lora=use_lora), teacher)
  trained = init_params(jax.random.key(5))
  params = student.unet_params(trained, teacher.unet_params)
  x = jax.random.normal(jax.random.key(1), (4,) + teacher.latent_shape)
  t = jnp.array([19, 399, 999, 0])
  ctx = jax.jit(teacher.encode_text)(teacher.text_params, batch["tokens"])
  ref = jax.jit(lambda p: teacher.unet.apply({"params": p}, x, t, ctx))(teacher.unet_params)
  run = jax.jit(lambda p: student.model_fn(p, ctx)(x, t, jnp.array([1.0, 2.0, 3.5, 0.0])))
  got = run(params)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  if use_lora:
    assert student.w_dim is None and set(jax.tree.leaves(jax.tree.map(lambda a: a.ndim, trained))) <= {2, 4}
    n_lora = sum(a.size for a in jax.tree.leaves(trained))
    assert 0 < n_lora < sum(a.size for a in jax.tree.leaves(teacher.unet_params)) // 2
  else:
    assert trained["time_embedding"]["cond_proj"]["kernel"].shape == (8, 16)
    # The w embedding reaches the output once cond_proj is non-zero.
    trained2 = jax.tree.map(lambda a: a, trained)
    trained2["time_embedding"]["cond_proj"]["kernel"] = jnp.ones((8, 16))
    moved = run(trained2)
    assert float(jnp.max(jnp.abs(moved - ref))) > 1e-4


@pytest.mark.parametrize("use_lora", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_distillation_loss_trains(teacher, batch, use_lora):
  """Adam on one batch and one key: the loss (finite, positive) goes down."""
  config = _config(lora=use_lora, loss_type="l2")
  student, init_params = lcm.build(config, teacher)
  task = lcm.make_task(config, student, init_params)
  params = init_params(jax.random.key(0))
  if use_lora:  # a non-zero adapter so the LoRA student differs from the teacher
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(7), a.shape), params)
  tx = optax.adam(3e-3)
  key = jax.random.key(11)

  @jax.jit
  def step(params, opt_state):
    state = _view(params)  # target = the online student (decay 0)
    (loss, aux), grads = jax.value_and_grad(task.loss_fn, has_aux=True)(params, batch, key, task.frozen, state)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux

  opt_state = tx.init(params)
  losses = []
  for _ in range(8):
    params, opt_state, loss, aux = step(params, opt_state)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and losses[0] > 0, losses
  assert losses[-1] < 0.7 * losses[0], losses
  assert 1.0 <= float(aux["w"]) <= 4.0


def test_loss_uses_the_target_network(teacher, batch):
  """The loss reads the EMA target of the train state: it equals the online-target loss when the
  target equals the student and changes with the target; gradients reach the online parameters only."""
  config = _config(loss_type="l2")
  student, init_params = lcm.build(config, teacher)
  task = lcm.make_task(config, student, init_params)
  assert task.extra_ema == {"target": 0.95}
  params = init_params(jax.random.key(0))
  params = jax.tree.map(lambda a: a + 0.02 * jax.random.normal(jax.random.key(1), a.shape), params)
  other = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape), params)
  key = jax.random.key(3)

  @jax.jit
  def run(p, target):
    return jax.value_and_grad(lambda p, tg: task.loss_fn(p, batch, key, task.frozen, _view(p, tg))[0],
                              argnums=(0, 1))(p, target)

  loss_same, (g_online, g_target) = run(params, params)
  loss_other, (_, g_target_other) = run(params, other)
  # Independent route: the library loss with the student as its own (stop-gradient) target, same draws.
  t, c = teacher, config.lcm

  @jax.jit
  def reference(p):
    k_z, k_loss = jax.random.split(key)
    z = t.encode_images(t.vae_params, batch["image"], key=k_z)
    ctx = t.encode_text(t.text_params, batch["tokens"])
    null = t.encode_text(t.text_params, t.null_ids())
    teacher_fn = consistency.guided_teacher(lambda x, tt, cc: t.model_fn(t.unet_params, cc)(x, tt), ctx, null)
    return consistency.distillation_loss(
        student.model_fn(p, ctx), teacher_fn, t.schedule, z, key=k_loss, num_ddim_timesteps=int(c.num_ddim_timesteps),
        w_min=float(c.w_min), w_max=float(c.w_max), solver=c.solver, loss_type=c.loss_type,
        huber_c=float(c.huber_c), prediction=t.prediction, timestep_scaling=float(c.timestep_scaling))[0]

  ref = reference(params)
  np.testing.assert_allclose(float(loss_same), float(ref), rtol=1e-5)
  assert abs(float(loss_other) - float(loss_same)) > 1e-3 * abs(float(loss_same))
  for g in (g_target, g_target_other):  # stop_gradient: nothing flows into the target branch
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(g))
  assert sum(float(jnp.sum(jnp.abs(x))) for x in jax.tree.leaves(g_online)) > 0.0


def test_bad_config_values_are_named(teacher):
  with pytest.raises(ValueError, match="lcm.solver"):
    lcm.build(_config(solver="heun"), teacher)
  with pytest.raises(ValueError, match="num_ddim_timesteps"):
    lcm.build(_config(num_ddim_timesteps=5000), teacher)
  config = _config(target_decay=1.5)
  student, init_params = lcm.build(config, teacher)
  with pytest.raises(ValueError, match="lcm.target_decay"):
    lcm.make_task(config, student, init_params)
  with pytest.raises(FileNotFoundError, match="neither"):
    lcm.load_teacher("/nonexistent/teacher")


@pytest.fixture(scope="module")
def teacher_workdir(tmp_path_factory):
  """A tiny finished train.ldm run (1 VAE step, 1 UNet step)."""
  workdir = str(tmp_path_factory.mktemp("ldm_teacher"))
  config = ldm_tiny.get_config()
  config.train.sample_every = 0
  ldm_train.train_ldm(config, workdir, stream=io.StringIO())
  return workdir


@pytest.mark.slow
def test_end_to_end_checkpoint_and_resume(teacher_workdir, tmp_path, capsys):
  """Distil the tiny LDM for 2 steps (stop as if killed), resume to 3 (bit-identical to an uninterrupted
  run); samples and evaluation load."""
  workdir = str(tmp_path / "lcm")
  config = _config()
  config.teacher = teacher_workdir
  config.train.update(dict(steps=3, stop_at=2, log_every=1, checkpoint_every=1, sample_every=3, warmup_steps=0,
                           learning_rate=1e-3))
  out1 = io.StringIO()
  res = lcm.train_lcm(config, workdir, stream=out1)
  assert res["step"] == 2
  assert "step 2/3" in out1.getvalue()
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "2"
  config.train.stop_at = 0
  out2 = io.StringIO()
  res = lcm.train_lcm(config, workdir, stream=out2)
  assert res["step"] == 3
  assert "resuming from step 2" in out2.getvalue()
  losses = [float(line.split(" loss ")[1].split()[0]) for line in (out1.getvalue() + out2.getvalue()).splitlines()
            if " loss " in line]
  assert len(losses) == 3 and np.all(np.isfinite(losses)), losses
  assert os.path.exists(os.path.join(workdir, "samples", "lcm_000003.png"))
  # Stopped after step 2 and resumed equals an uninterrupted run, bit for bit: params, sampling EMA and
  # the target network's EMA (a separate tree of the state).
  from tests.test_fault_tolerance import assert_states_equal, saved_state
  straight = str(tmp_path / "lcm_straight")
  lcm.train_lcm(config, straight, stream=io.StringIO())
  _, resumed_state, _ = saved_state(workdir, 3)
  _, straight_state, _ = saved_state(straight, 3)
  assert set(resumed_state["extra_ema"]) == {"target"}
  assert_states_equal(resumed_state, straight_state)
  kernel = lambda tree: np.asarray(tree["time_embedding"]["cond_proj"]["kernel"])  # noqa: E731
  assert not np.array_equal(kernel(resumed_state["extra_ema"]["target"]), kernel(resumed_state["params"]))
  # The run reloads for sampling: 1- and 2-step LCM images in [0, 1], equal to the trainer's generate
  # on the restored EMA student.
  pipe = StableDiffusion.from_workdir(workdir)
  assert pipe.defaults["sampler"] == "lcm" and pipe.guidance_embedding_dim == 8 and not pipe.cfg
  student, _ = lcm.build(config, lcm.load_teacher(teacher_workdir))
  tokens = jnp.asarray(pipe.tokenize(["a handwritten digit two"] * 2))
  for n in (1, 2):
    img = pipe.generate(["a handwritten digit two"] * 2, key=jax.random.key(0), num_steps=n, guidance_scale=3.0)
    assert img.shape == (2, 32, 32, 1) and bool(jnp.all((img >= 0.0) & (img <= 1.0)))
    ref = lcm.generate(student, pipe.unet_params, tokens, jax.random.key(0), num_steps=n, guidance_scale=3.0)
    np.testing.assert_allclose(np.asarray(img), np.asarray(ref) * 0.5 + 0.5, rtol=0, atol=1e-6)
  # sample.evaluate recognises the run; bench.lcm puts student and teacher rows side by side.
  import json
  from bench import lcm as bench_lcm
  from sample import evaluate as ev
  assert ev.workdir_kind(workdir) == "lcm" and ev.workdir_kind(teacher_workdir) == "ldm"
  capsys.readouterr()
  assert ev.main(["--workdir", workdir, "--per_digit", "1", "--num_steps", "1"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["num_steps"] == 1 and result["num_samples"] == 10 and 0.0 <= result["accuracy"] <= 1.0
  assert result["seconds_per_image"] > 0 and np.isfinite(result["frechet_distance"])
  rows = bench_lcm.run(teacher_workdir, workdir, teacher_steps=(2,), student_steps=(1,), guidances=(3.0,),
                       per_digit=1, log=lambda r: None)
  assert [(r["model"], r["steps"]) for r in rows] == [("teacher", 2), ("lcm", 1)]
  assert all(0.0 <= r["accuracy"] <= 1.0 and r["ms/image"] > 0 for r in rows)


@pytest.mark.slow
def test_cli_lora_run(teacher_workdir, tmp_path):
  workdir = str(tmp_path / "lcm_lora")
  rc = lcm.main(["train.lcm", "--teacher", teacher_workdir, "--lora", f"--workdir={workdir}",
                 "--config.lcm.lora_rank=2", "--config.train.steps=1", "--config.train.log_every=1",
                 "--config.train.sample_every=0", "--config.train.checkpoint_every=1"])
  assert rc == 0
  assert os.listdir(os.path.join(workdir, "checkpoints"))
  pipe = StableDiffusion.from_workdir(workdir)
  assert pipe.defaults["sampler"] == "lcm" and not pipe.cfg and pipe.guidance_embedding_dim is None
  # A user mistake is one line and exit code 2.
  assert lcm.main(["train.lcm", "--teacher", str(tmp_path / "missing"), f"--workdir={workdir}_x"]) == 2
