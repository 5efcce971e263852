"""``python -m train.lcm --teacher DIR``: latent consistency distillation (LCM / LCM-LoRA).

The teacher is a finished ``train.ldm`` workdir (its EMA UNet, frozen VAE and text encoder) or a
diffusers Stable Diffusion folder (``model_index.json``). The student is

* by default the full teacher UNet with a guidance-scale embedding (``time_cond_proj_dim``): it
  starts as an exact copy of the teacher (the new ``cond_proj`` kernel is zero) and learns the
  CFG-guided consistency function for every w in [w_min, w_max];
* with ``--lora`` an LCM-LoRA: low-rank factors (:mod:`jdiff.lora`) over the frozen teacher UNet,
  without a w input (sampled without CFG).

One step (:func:`jdiff.consistency.distillation_loss`): encode images to latents with the frozen
VAE, captions with the frozen text encoder, draw a skipping-step pair (t, t - k), the guidance
scale w and the noise, solve the CFG teacher's ODE from t to t - k (DDIM or DPM-Solver-2) and
regress f_student(x_t, t, w) on the stop-gradient f_student(x_{t-k}, t - k, w) with a
pseudo-Huber distance. The target network is an EMA of the student with its own decay
(``lcm.target_decay``, 0.95 as in the LCM paper; 0 makes it a stop-gradient copy of the online
student), kept in the train state beside the sampling EMA (``train.ema_decay``), so a resumed run
continues bit-for-bit. Training, checkpoints, resume and EMA weights are those of ``train.loop``
(the same machinery as ``train.ldm``); sample grids use the LCM sampler on the EMA weights. Teacher
and student are the library's bundle (:func:`jdiff.ldm.load_path`, :func:`jdiff.ldm.lcm_student`); a
finished run loads with ``StableDiffusion.from_workdir`` and is scored by ``sample.evaluate``.

Example:
  $ python -m train.ldm --workdir workdir/ldm_digits
  $ python -m train.lcm --teacher workdir/ldm_digits                 # workdir/lcm_digits
  $ python -m train.lcm --teacher workdir/ldm_digits --lora --workdir workdir/lcm_lora_digits
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from jdiff import consistency, ldm, lora, parallel
from jdiff.evaluation import digit_prompts
from jdiff.pipelines import StableDiffusion
from train import loop

__all__ = ["LCMStudent", "load_teacher", "build", "make_task", "generate", "train_lcm", "main"]


def load_teacher(path: str) -> StableDiffusion:
  """The teacher: a training workdir or a diffusers Stable Diffusion folder (:func:`jdiff.ldm.load_path`).

  Raises:
    FileNotFoundError: ``path`` is neither.
  """
  return ldm.load_path(path, what="teacher", flag="--teacher")


# ----------------------------------------------------------------------------- the student


@dataclasses.dataclass
class LCMStudent:
  """The student around a teacher, and how its trained parameters become UNet parameters.

  Attributes:
    teacher: the frozen teacher bundle (:class:`jdiff.pipelines.StableDiffusion`).
    bundle: the student's bundle (:func:`jdiff.ldm.lcm_student`: the teacher's parts, the student
      UNet, the LCM sampler on the distillation grid).
    w_dim: width of the guidance embedding (None: the student has no w input).
    lora_scales: the static alpha/r of each adapted kernel (LoRA only; None for a full student).
  """

  teacher: StableDiffusion
  bundle: StableDiffusion
  w_dim: int | None
  lora_scales: tuple[tuple[str, float], ...] | None

  @property
  def is_lora(self) -> bool:
    return self.lora_scales is not None

  @property
  def unet(self):
    return self.bundle.unet

  @property
  def num_ddim_timesteps(self) -> int:
    return int(self.bundle.sampler_options["original_inference_steps"])

  @property
  def timestep_scaling(self) -> float:
    return float(self.bundle.sampler_options["timestep_scaling"])

  def unet_params(self, trained: Any, teacher_params: Any) -> Any:
    """Full student UNet parameters from the trained tree (itself, or LoRA factors merged)."""
    if not self.is_lora:
      return trained
    return lora.merge(teacher_params, ldm.tree_to_lora(trained, self.lora_scales))

  def model_fn(self, unet_params: Any, ctx: jax.Array) -> consistency.GuidedFn:
    """``(x, t, w) -> output`` of the student for context [B, L, D]."""

    def fn(x, t, w):
      cond = None if self.w_dim is None else consistency.guidance_scale_embedding(w, self.w_dim)
      return self.bundle.model_fn(unet_params, ctx, timestep_cond=cond)(x, t)

    return fn


def build(config: ml_collections.ConfigDict, teacher: StableDiffusion) -> tuple[LCMStudent, Callable[[jax.Array], Any]]:
  """The student of ``config.lcm`` and its parameter initialiser ``key -> trained params``."""
  c = config.lcm
  if c.solver not in consistency.SOLVERS:
    raise ValueError(f"lcm.solver={c.solver!r}: expected one of {consistency.SOLVERS}")
  if c.loss_type not in consistency.DISTANCES:
    raise ValueError(f"lcm.loss_type={c.loss_type!r}: expected one of {consistency.DISTANCES}")
  common = dict(num_ddim_timesteps=int(c.num_ddim_timesteps), timestep_scaling=float(c.timestep_scaling))
  teacher_params = teacher.unet_params
  if c.lora:
    lora_opts = dict(rank=int(c.lora_rank), alpha=float(c.lora_alpha or c.lora_rank),
                     targets=ldm.lora_targets(c.lora_targets))
    adapter = jax.eval_shape(lambda: lora.init(teacher_params, key=jax.random.key(0), **lora_opts))
    student = LCMStudent(teacher=teacher, bundle=ldm.lcm_student(teacher, w_dim=None, **common), w_dim=None,
                         lora_scales=adapter.scales)

    def init_params(k):
      # Zero up-projections: the student starts as the teacher.
      return ldm.factors_to_tree(lora.init(teacher_params, key=k, **lora_opts).factors)

    return student, init_params

  w_dim = int(c.w_embedding_dim) or None
  # the teacher's UNet class (the digits TextUNet feeds its pooled text condition itself)
  student = LCMStudent(teacher=teacher, bundle=ldm.lcm_student(teacher, w_dim=w_dim, **common), w_dim=w_dim,
                       lora_scales=None)

  def init_params(k):
    del k  # the student starts as the teacher (a zero cond_proj: f_student == teacher at step 0)
    return ldm.with_guidance_embedding(teacher_params, teacher.unet.config, w_dim)

  return student, init_params


# ----------------------------------------------------------------------------- training


def generate(student: LCMStudent, unet_params: Any, tokens: jax.Array, key: jax.Array, *, num_steps: int = 4,
             guidance_scale: float = 3.0) -> jax.Array:
  """Images [B, H, W, C] in [-1, 1] from token rows [B, L] with the LCM sampler (jit this).

  A student with a w embedding is given w = guidance_scale - 1 (no CFG pass); an LCM-LoRA
  student runs unguided (the student bundle's :meth:`~jdiff.pipelines.StableDiffusion.sample`).
  """
  k_T, k_s = jax.random.split(key)
  noise = jax.random.normal(k_T, (tokens.shape[0],) + student.bundle.latent_shape, jnp.float32)
  return student.bundle.sample(unet_params, tokens, noise, key=k_s, sampler="lcm", num_steps=num_steps,
                               guidance_scale=guidance_scale)


def make_task(config: ml_collections.ConfigDict, student: LCMStudent,
              init_params: Callable[[jax.Array], Any]) -> loop.Task:
  """The distillation task: loss over (trained params, batch, key, frozen, state), LCM sample grids.

  The target network is ``state.extra_ema["target"]`` (an EMA of the trained parameters with decay
  ``lcm.target_decay``), evaluated under ``stop_gradient``.

  Raises:
    ValueError: ``lcm.target_decay`` outside [0, 1].
  """
  c = config.lcm
  target_decay = float(c.get("target_decay", 0.95))
  if not 0.0 <= target_decay <= 1.0:
    raise ValueError(f"lcm.target_decay={c.target_decay!r}: expected a number in [0, 1]")
  t = student.teacher
  opts = dict(num_ddim_timesteps=student.num_ddim_timesteps, w_min=float(c.w_min), w_max=float(c.w_max),
              solver=c.solver, loss_type=c.loss_type, huber_c=float(c.huber_c), prediction=t.prediction,
              timestep_scaling=student.timestep_scaling)

  def loss_fn(params, batch, key, frozen, state):
    k_z, k_loss = jax.random.split(key)
    z = t.encode_images(frozen["vae"], batch["image"], key=k_z)  # [B, h, w, c]
    ctx = t.encode_text(frozen["text"], batch["tokens"])  # [B, L, D]
    null = t.encode_text(frozen["text"], frozen["null_tokens"])  # [1, L, D]
    unet_params = student.unet_params(params, frozen["teacher"])
    student_fn = student.model_fn(unet_params, ctx)
    target_fn = student.model_fn(student.unet_params(state.extra_ema["target"], frozen["teacher"]), ctx)
    teacher_fn = consistency.guided_teacher(lambda x, tt, cc: t.model_fn(frozen["teacher"], cc)(x, tt), ctx, null)
    return consistency.distillation_loss(student_fn, teacher_fn, t.schedule, z, key=k_loss, target_fn=target_fn,
                                         **opts)

  s = config.sample
  prompts, _ = digit_prompts(max(1, min(int(s.per_prompt), 4)))
  tokens = jnp.asarray(t.tokenize(prompts))
  teacher_params = t.unet_params

  def sample_fn(ema, key):
    return generate(student, student.unet_params(ema, teacher_params), tokens, key,
                    num_steps=int(s.num_steps), guidance_scale=float(s.guidance_scale))

  frozen = {"vae": t.vae_params, "text": t.text_params, "null_tokens": t.null_ids(), "teacher": t.unet_params}
  return loop.Task(name="lcm_lora" if student.is_lora else "lcm", init_params=init_params, loss_fn=loss_fn,
                   frozen=frozen, batch_keys=("image", "tokens"), sample_fn=jax.jit(sample_fn), grid_cols=10,
                   extra_ema={"target": target_decay})


def _data_config(config: ml_collections.ConfigDict, teacher: StableDiffusion) -> ml_collections.ConfigDict:
  """The teacher run's data section, or ``config.data`` (for a diffusers teacher: resized to the
  UNet's default image size and converted to the VAE's channels)."""
  if config.data.get("from_teacher", True) and teacher.data_config is not None:
    return teacher.data_config
  data = ml_collections.ConfigDict(config.data.to_dict())
  if teacher.data_config is None:
    data.channels = int(teacher.vae.config.in_channels)
    data.image_size = int(teacher.default_size)
  return data


def train_lcm(config: ml_collections.ConfigDict, workdir: str, *, stream=None) -> dict[str, Any]:
  """Distils the teacher of ``config.teacher`` into a consistency model in ``workdir`` (resumable)."""
  from train import vae as vae_train
  t0 = time.perf_counter()
  if config.teacher and not config.teacher.startswith(("gs://", "s3://")):
    config.teacher = os.path.abspath(os.path.expanduser(config.teacher))  # config.json stays valid from any cwd
  teacher = load_teacher(config.teacher)
  student, init_params = build(config, teacher)
  loop.write_config(config, workdir)
  task = make_task(config, student, init_params)
  data_cfg = ml_collections.ConfigDict({"data": _data_config(config, teacher)})
  loader = vae_train.make_loader(data_cfg, tokenize=teacher.tokenize,
                                 batch_size=int(config.train.get("batch_size") or 0) or None)
  state = loop.train(config.train, task, loader, workdir, seed=config.seed, stream=stream)
  return {"step": int(state.step), "total_seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
  """``--teacher DIR`` and ``--lora`` set ``config.teacher`` / ``config.lcm.lora``; the rest is
  ``train.loop``'s ``--config FILE --config.a.b=v --workdir DIR``."""
  argv = list(sys.argv if argv is None else argv)
  argv, teacher = loop.pop_flag(argv, "teacher")
  argv, use_lora = loop.pop_flag(argv, "lora", has_value=False)

  def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    if teacher is not None:
      config.teacher = teacher
    if use_lora:
      config.lcm.lora = True
    out = train_lcm(config, workdir)
    if parallel.is_main_process():
      print(f"[lcm] done in {out['total_seconds'] / 60:.1f} min: {workdir}", flush=True)

  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return loop.main_wrapper(run, default_config=os.path.join(here, "configs", "lcm_digits.py"),
                           default_workdir="workdir/lcm_digits", argv=argv)


if __name__ == "__main__":
  sys.exit(main())
