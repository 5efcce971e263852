"""``python -m train.ct --vae DIR``: consistency training without a teacher (Song et al., 2023).

A text-conditioned latent consistency model learned from data alone: the frozen VAE of a finished
``train.vae`` workdir or of a ``train.ldm`` run (``--vae``, default ``workdir/ldm_digits``), the byte
text encoder and UNet of the config trained from scratch (the bundle of :func:`jdiff.ldm.from_config`).

One step (:func:`jdiff.consistency.training_loss`): encode images to latents, draw a pair of
timesteps t > s and one noise z, and regress f(x_t, t) on stopgrad f_target(x_s, s), both noised with
the same z, through the LCM boundary-condition scalings. The pair comes from the discretisation
curriculum (:func:`jdiff.consistency.ct_curriculum`, read by the step from the train state's step):
for ``ct.curriculum="ct"`` / ``"ict"`` it is a neighbouring pair (t_{n+1}, t_n) of a grid of N(k) - 1
intervals; for ``"ect"`` t is uniform in [1, T - 1] and s = t - ceil(t / (N(k) - 1)) (the gap a
fraction of t, halved at each stage; :func:`jdiff.consistency.proportional_pairs`). The target
network is an EMA of the trained parameters with decay mu(k) (0 for "ict" / "ect": the stop-gradient
online network); it lives in the train state beside the sampling EMA (``train.ema_decay``), so a
resumed run continues bit-for-bit. Training, checkpoints and resume are those of ``train.loop``; sample grids
use the LCM sampler on the EMA weights. A finished run loads with ``StableDiffusion.from_workdir``
and is scored by ``sample.evaluate``.

Example:
  $ python -m train.ldm --workdir workdir/ldm_digits                  # or: python -m train.vae
  $ python -m train.ct --vae workdir/ldm_digits                       # workdir/ct_digits
  $ python -m sample.evaluate --workdir workdir/ct_digits --num_steps 1
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from jdiff import consistency, diffusion, ldm, parallel
from jdiff.evaluation import digit_prompts
from jdiff.pipelines import StableDiffusion
from train import loop

__all__ = ["build", "check_anchored", "curriculum", "make_task", "train_ct", "main"]


def build(config: ml_collections.ConfigDict) -> StableDiffusion:
  """The bundle of ``config`` around the VAE of ``config.vae.pretrained`` (UNet parameters not yet set).

  Raises:
    FileNotFoundError: no trained VAE there; ValueError: a bad ``ct.*`` or model setting (one line).
  """
  c = config.ct
  if c.loss_type not in consistency.DISTANCES:
    raise ValueError(f"ct.loss_type={c.loss_type!r}: expected one of {consistency.DISTANCES}")
  diffusion.check_prediction(config.diffusion.prediction)
  vae, vae_params = ldm.load_vae(ldm.vae_workdir(config.vae.pretrained))
  bundle = ldm.from_config(config, vae, vae_params)
  big_t = bundle.schedule.num_timesteps
  if not 1 <= int(c.s1) <= big_t:
    raise ValueError(f"ct.s1={c.s1}: the final grid needs 1 <= s1 <= diffusion.num_timesteps={big_t}")
  curriculum(config)  # validates the curriculum settings
  check_anchored(bundle.schedule, bundle.prediction, float(c.timestep_scaling))
  return bundle


def check_anchored(schedule, prediction: str, timestep_scaling: float) -> None:
  """Refuses a parameterisation whose consistency function is not tied to its input near t = 0.

  Without a teacher the data enter the loss only through the boundary condition. Written as
  f(x_t, t) = a_x x_t + a_out output (:func:`jdiff.consistency.affine_coefficients`), the first noisy
  timestep t = 1 must have |a_x - 1| and |a_out| within twice its noise-to-signal ratio sigma_1 /
  alpha_1 (as "epsilon" and "v" have); otherwise ("sample" with timestep scaling 10: a_out(1) ~ 1)
  only the pairs ending exactly at t = 0 see the data and the model learns a self-consistent map
  unrelated to them.

  Raises:
    ValueError: the parameterisation, named, with the values at t = 1.
  """
  a_x, a_out = (float(v[0]) for v in consistency.affine_coefficients(
      schedule, jnp.array([1]), prediction=prediction, timestep_scaling=timestep_scaling))
  ratio = float(schedule.sqrt_one_minus_alphas_cumprod[1] / schedule.sqrt_alphas_cumprod[1])
  if abs(a_x - 1.0) > 2.0 * ratio or abs(a_out) > 2.0 * ratio:
    raise ValueError(f"ct: diffusion.prediction={prediction!r} with ct.timestep_scaling={timestep_scaling:g} gives "
                     f"f(x_t, 1) = {a_x:.3g} x_t + {a_out:.3g} output (noise-to-signal ratio {ratio:.3g}): the "
                     "consistency function is not tied to x_t near t = 0; use prediction 'v' or 'epsilon'")


def curriculum(config: ml_collections.ConfigDict):
  """(N [K], mu [K]) of ``config.ct`` over ``config.train.steps`` (:func:`jdiff.consistency.ct_curriculum`).

  Raises:
    ValueError: a bad ``ct.*`` value, named.
  """
  c = config.ct
  try:
    return consistency.ct_curriculum(int(config.train.steps), kind=c.curriculum, s0=int(c.s0), s1=int(c.s1),
                                     mu0=float(c.mu0))
  except ValueError as e:
    raise ValueError(f"ct: {e}") from None


def make_task(config: ml_collections.ConfigDict, bundle: StableDiffusion) -> loop.Task:
  """The consistency-training task: loss over (params, batch, key, frozen, state), LCM sample grids.

  The loss reads the train state's step for the curriculum and ``state.extra_ema["target"]`` for
  the target network; metrics add ``num_scales`` (N(k)) and the mean ``t`` drawn.
  """
  c = config.ct
  trainable = bool(config.text.get("trainable", False))
  n_table, mu_table = curriculum(config)
  last = len(n_table) - 1
  opts = dict(loss_type=c.loss_type, huber_c=float(c.huber_c), prediction=bundle.prediction,
              timestep_scaling=float(c.timestep_scaling), spacing=consistency.curriculum_spacing(c.curriculum))

  def split(params, text_params):
    return (params["unet"], params["text"]) if trainable else (params, text_params)

  def at(table, step):  # the curriculum's value at a step (held after the last one)
    return jnp.asarray(table)[jnp.minimum(step, last)]

  def loss_fn(params, batch, key, frozen, state):
    k_z, k_loss = jax.random.split(key)
    z = bundle.encode_images(frozen["vae"], batch["image"], key=k_z)  # [B, h, w, c]
    unet_params, text_params = split(params, frozen.get("text"))
    target_unet, target_text = split(state.extra_ema["target"], frozen.get("text"))
    student = bundle.model_fn(unet_params, bundle.encode_text(text_params, batch["tokens"]))
    target = bundle.model_fn(target_unet, bundle.encode_text(target_text, batch["tokens"]))
    n = at(n_table.astype("int32"), state.step)
    loss, aux = consistency.training_loss(student, bundle.schedule, z, key=k_loss, target_fn=target,
                                          num_ddim_timesteps=n - 1, **opts)
    return loss, {**aux, "num_scales": n.astype(jnp.float32)}

  grid = consistency.curriculum_sampling_grid(c.curriculum, int(c.s1), bundle.schedule.num_timesteps)
  sampling = ldm.lcm_student(bundle, w_dim=None, num_ddim_timesteps=grid, timestep_scaling=float(c.timestep_scaling))
  s = config.sample
  prompts, _ = digit_prompts(max(1, min(int(s.per_prompt), 4)))
  tokens = jnp.asarray(bundle.tokenize(prompts))

  @jax.jit
  def sample_fn(ema, key):
    unet_params, text_params = split(ema, bundle.text_params)
    noise = jax.random.normal(key, (tokens.shape[0],) + bundle.latent_shape, jnp.float32)
    return sampling.sample(unet_params, tokens, noise, key=jax.random.fold_in(key, 1), text_params=text_params,
                           sampler="lcm", num_steps=int(s.num_steps))

  frozen = {"vae": bundle.vae_params}
  if not trainable:
    frozen["text"] = bundle.text_params
  mu32 = mu_table.astype("float32")
  return loop.Task(name="ct", init_params=lambda k: ldm.trained_params(config, bundle, bundle.init_unet(k)),
                   loss_fn=loss_fn, frozen=frozen, batch_keys=("image", "tokens"), sample_fn=sample_fn,
                   grid_cols=10, extra_ema={"target": lambda step: at(mu32, step)})


def train_ct(config: ml_collections.ConfigDict, workdir: str, *, stream=None) -> dict[str, Any]:
  """Consistency-trains the model of ``config`` in ``workdir`` (resumable); the VAE comes from
  ``config.vae.source`` (recorded, resolved, as ``config.vae.pretrained``)."""
  from train import vae as vae_train
  t0 = time.perf_counter()
  source = config.vae.source
  if source and not source.startswith(("gs://", "s3://")):
    source = os.path.abspath(os.path.expanduser(source))  # config.json stays valid from any cwd
  config.vae.source = source
  config.vae.pretrained = os.path.abspath(ldm.vae_workdir(source))
  bundle = build(config)
  loop.write_config(config, workdir)
  task = make_task(config, bundle)
  loader = vae_train.make_loader(config, tokenize=bundle.tokenize,
                                 batch_size=int(config.train.get("batch_size") or 0) or None)
  state = loop.train(config.train, task, loader, workdir, seed=config.seed, stream=stream)
  return {"step": int(state.step), "total_seconds": time.perf_counter() - t0}


def main(argv: Sequence[str] | None = None) -> int:
  """``--vae DIR`` sets ``config.vae.source``; the rest is ``train.loop``'s ``--config FILE
  --config.a.b=v --workdir DIR``."""
  argv = list(sys.argv if argv is None else argv)
  argv, vae_dir = loop.pop_flag(argv, "vae")

  def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    if vae_dir is not None:
      config.vae.source = vae_dir
    out = train_ct(config, workdir)
    if parallel.is_main_process():
      print(f"[ct] done in {out['total_seconds'] / 60:.1f} min; evaluate with: python -m sample.evaluate "
            f"--workdir {workdir} --num_steps 1", flush=True)

  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return loop.main_wrapper(run, default_config=os.path.join(here, "configs", "ct_digits.py"),
                           default_workdir="workdir/ct_digits", argv=argv)


if __name__ == "__main__":
  sys.exit(main())
