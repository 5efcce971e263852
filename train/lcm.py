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
pseudo-Huber distance. Training, checkpoints, resume and EMA weights are those of ``train.loop``
(the same machinery as ``train.ldm``); sample grids use the LCM sampler on the EMA weights.

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
import numpy as np
from flax import traverse_util

from jdiff import consistency, lora, parallel, samplers
from jdiff.models import AutoencoderKL, UNet
from train import loop

__all__ = ["Teacher", "LCMStudent", "load_teacher", "build", "make_task", "train_lcm", "load_from_workdir",
           "generate", "evaluate", "main"]

COND_PROJ = ("time_embedding", "cond_proj", "kernel")


# ----------------------------------------------------------------------------- the teacher


@dataclasses.dataclass
class Teacher:
  """A frozen latent diffusion model seen through what distillation needs.

  Attributes:
    unet, params: the teacher UNet and its parameters.
    vae, vae_params: the frozen autoencoder (``encode`` / ``scale_latents`` / ``decode``).
    text, text_params: the frozen text encoder (``encode_text(text_params, tokens) -> [B, L, D]``).
    tokenize: caption -> token ids [L] (numpy).
    schedule, prediction: the noise schedule and what the UNet predicts.
    latent_shape: (h, w, c) of the latents.
    data: the data section to train on (a train.ldm run's own data, or the config's).
    source: the teacher path.
  """

  unet: UNet
  params: Any
  vae: AutoencoderKL
  vae_params: Any
  text_params: Any
  encode_text: Callable[[Any, jax.Array], jax.Array]
  tokenize: Callable[[str], np.ndarray]
  schedule: Any
  prediction: str
  latent_shape: tuple[int, int, int]
  data: ml_collections.ConfigDict | None
  source: str

  def null_tokens(self) -> jax.Array:
    return jnp.asarray(self.tokenize(""))[None]  # [1, L]


def _is_diffusers(path: str) -> bool:
  return os.path.exists(os.path.join(path, "model_index.json"))


def load_teacher(path: str) -> Teacher:
  """Loads a ``train.ldm`` workdir or a diffusers Stable Diffusion folder as a :class:`Teacher`.

  Raises:
    FileNotFoundError: ``path`` is neither.
  """
  path = os.path.expanduser(path)
  if not path:
    raise FileNotFoundError("no teacher given: pass --teacher <train.ldm workdir or diffusers folder>")
  if _is_diffusers(path):
    return _teacher_from_diffusers(path)
  if not os.path.exists(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"teacher {path!r} is neither a train.ldm workdir (config.json) nor a diffusers "
                            "folder (model_index.json)")
  from train import ldm as ldm_train
  config, ldm, params = ldm_train.load_from_workdir(path)
  return Teacher(unet=ldm.unet, params=params, vae=ldm.vae, vae_params=ldm.vae_params,
                 text_params=ldm.text_params, encode_text=ldm.encode_text, tokenize=ldm.tokenize,
                 schedule=ldm.schedule, prediction=ldm.prediction, latent_shape=tuple(ldm.latent_shape),
                 data=config.data, source=path)


def _teacher_from_diffusers(path: str) -> Teacher:
  from jdiff.pipelines import StableDiffusion
  pipe = StableDiffusion.from_diffusers(path)
  vae_cfg = pipe.vae.config
  size = int(pipe.unet.config.sample_size)
  latent_shape = (size, size, int(vae_cfg.latent_channels))

  def encode_text(text_params, tokens):
    return pipe.text_encoder.apply({"params": text_params}, tokens, clip_skip=pipe.clip_skip).last_hidden_state

  def tokenize(text: str) -> np.ndarray:
    return np.asarray(pipe.tokenizer([text]))[0]

  return Teacher(unet=pipe.unet, params=pipe.unet_params, vae=pipe.vae, vae_params=pipe.vae_params,
                 text_params=pipe.text_params, encode_text=encode_text, tokenize=tokenize,
                 schedule=pipe.schedule, prediction=pipe.prediction, latent_shape=latent_shape, data=None,
                 source=path)


# ----------------------------------------------------------------------------- the student


@dataclasses.dataclass
class LCMStudent:
  """The student network around a teacher, and how its trained parameters become UNet parameters.

  Attributes:
    teacher: the :class:`Teacher`.
    unet: the student UNet (the teacher's config plus ``time_cond_proj_dim`` unless LoRA).
    w_dim: width of the guidance embedding (None: the student has no w input).
    lora_scales: the static alpha/r of each adapted kernel (LoRA only; None for a full student).
    num_ddim_timesteps, timestep_scaling: the distillation grid and boundary scaling.
  """

  teacher: Teacher
  unet: UNet
  w_dim: int | None
  lora_scales: tuple[tuple[str, float], ...] | None
  num_ddim_timesteps: int
  timestep_scaling: float

  @property
  def is_lora(self) -> bool:
    return self.lora_scales is not None

  def unet_params(self, trained: Any, teacher_params: Any) -> Any:
    """Full student UNet parameters from the trained tree (itself, or LoRA factors merged)."""
    if not self.is_lora:
      return trained
    factors = traverse_util.flatten_dict(trained, sep="/")
    paths = sorted({p.rsplit("/", 1)[0] for p in factors})
    adapter = lora.LoRA(factors={p: {"down": factors[p + "/down"], "up": factors[p + "/up"]} for p in paths},
                        scales=self.lora_scales)
    return lora.merge(teacher_params, adapter)

  def model_fn(self, unet_params: Any, ctx: jax.Array) -> consistency.GuidedFn:
    """``(x, t, w) -> output`` of the student for context [B, L, D]."""

    def fn(x, t, w):
      cond = None if self.w_dim is None else consistency.guidance_scale_embedding(w, self.w_dim)
      return self.unet.apply({"params": unet_params}, x, t, ctx, timestep_cond=cond)

    return fn


def _lora_targets(value) -> tuple[str, ...]:
  if isinstance(value, str):
    return tuple(v.strip() for v in value.split(",") if v.strip())
  return tuple(value)


def build(config: ml_collections.ConfigDict, teacher: Teacher) -> tuple[LCMStudent, Callable[[jax.Array], Any]]:
  """The student of ``config.lcm`` and its parameter initialiser ``key -> trained params``."""
  c = config.lcm
  if c.solver not in consistency.SOLVERS:
    raise ValueError(f"lcm.solver={c.solver!r}: expected one of {consistency.SOLVERS}")
  if c.loss_type not in consistency.DISTANCES:
    raise ValueError(f"lcm.loss_type={c.loss_type!r}: expected one of {consistency.DISTANCES}")
  consistency.skipping_timesteps(teacher.schedule.num_timesteps, int(c.num_ddim_timesteps))  # validates
  common = dict(num_ddim_timesteps=int(c.num_ddim_timesteps), timestep_scaling=float(c.timestep_scaling))
  if c.lora:
    targets = _lora_targets(c.lora_targets)
    lora_opts = dict(rank=int(c.lora_rank), alpha=float(c.lora_alpha or c.lora_rank), targets=targets)
    teacher_params = teacher.params
    adapter = jax.eval_shape(lambda: lora.init(jax.random.key(0), teacher_params, **lora_opts))
    student = LCMStudent(teacher=teacher, unet=teacher.unet, w_dim=None, lora_scales=adapter.scales, **common)

    def init_params(k):
      # Zero up-projections: the student starts as the teacher.
      factors = lora.init(k, teacher_params, **lora_opts).factors
      return traverse_util.unflatten_dict({f"{p}/{n}": v for p, f in factors.items() for n, v in f.items()},
                                          sep="/")

    return student, init_params

  w_dim = int(c.w_embedding_dim) or None
  cfg = dataclasses.replace(teacher.unet.config, time_cond_proj_dim=w_dim)
  # the teacher's UNet class (train.ldm's TextUNet feeds its pooled text condition itself)
  student = LCMStudent(teacher=teacher, unet=type(teacher.unet)(cfg), w_dim=w_dim, lora_scales=None, **common)
  if teacher.unet.config.time_cond_proj_dim is not None and teacher.unet.config.time_cond_proj_dim != w_dim:
    raise ValueError(f"the teacher UNet already has time_cond_proj_dim={teacher.unet.config.time_cond_proj_dim}; "
                     f"set lcm.w_embedding_dim to it (got {w_dim})")
  ch0 = cfg.block_out_channels[0]
  teacher_params = teacher.params

  def init_params(k):
    del k  # the student starts as the teacher
    params = jax.tree.map(jnp.asarray, teacher_params)
    if w_dim is not None and teacher.unet.config.time_cond_proj_dim is None:
      flat = traverse_util.flatten_dict(params)
      flat[COND_PROJ] = jnp.zeros((w_dim, ch0), jnp.float32)  # zero: f_student == teacher at step 0
      params = traverse_util.unflatten_dict(flat)
    return params

  return student, init_params


# ----------------------------------------------------------------------------- training


def _latents(teacher: Teacher, vae_params: Any, images: jax.Array, key: jax.Array) -> jax.Array:
  post = teacher.vae.apply({"params": vae_params}, images, method=AutoencoderKL.encode)
  return teacher.vae.apply({"params": vae_params}, post.sample(key), method=AutoencoderKL.scale_latents)


def generate(student: LCMStudent, unet_params: Any, tokens: jax.Array, key: jax.Array, *, num_steps: int = 4,
             guidance_scale: float = 3.0, text_params: Any = None, vae_params: Any = None) -> jax.Array:
  """Images [B, H, W, C] in [-1, 1] from token rows [B, L] with the LCM sampler (jit this).

  A student with a w embedding is given w = guidance_scale - 1 (no CFG pass); an LCM-LoRA
  student runs unguided.
  """
  t = student.teacher
  text_params = t.text_params if text_params is None else text_params
  vae_params = t.vae_params if vae_params is None else vae_params
  b = tokens.shape[0]
  ctx = t.encode_text(text_params, tokens)  # [B, L, D]
  w = jnp.full((b,), guidance_scale - 1.0, jnp.float32)
  fn = student.model_fn(unet_params, ctx)
  k_T, k_s = jax.random.split(key)
  x_T = jax.random.normal(k_T, (b,) + tuple(t.latent_shape), jnp.float32)
  z0 = samplers.sample("lcm", lambda x, tt: fn(x, tt, w), t.schedule, x_T, num_steps=num_steps, key=k_s,
                       prediction=t.prediction, original_inference_steps=student.num_ddim_timesteps,
                       timestep_scaling=student.timestep_scaling)
  z0 = t.vae.apply({"params": vae_params}, z0, method=AutoencoderKL.unscale_latents)
  return jnp.clip(t.vae.apply({"params": vae_params}, z0, method=AutoencoderKL.decode), -1.0, 1.0)


def make_task(config: ml_collections.ConfigDict, student: LCMStudent,
              init_params: Callable[[jax.Array], Any]) -> loop.Task:
  """The distillation task: loss over (trained params, batch, key, frozen), LCM sample grids."""
  c = config.lcm
  t = student.teacher
  sched = t.schedule
  opts = dict(num_ddim_timesteps=student.num_ddim_timesteps, w_min=float(c.w_min), w_max=float(c.w_max),
              solver=c.solver, loss_type=c.loss_type, huber_c=float(c.huber_c), prediction=t.prediction,
              timestep_scaling=student.timestep_scaling)

  def loss_fn(params, batch, key, frozen):
    k_z, k_loss = jax.random.split(key)
    z = _latents(t, frozen["vae"], batch["image"], k_z)  # [B, h, w, c]
    ctx = t.encode_text(frozen["text"], batch["tokens"])  # [B, L, D]
    null = t.encode_text(frozen["text"], frozen["null_tokens"])  # [1, L, D]
    unet_params = student.unet_params(params, frozen["teacher"])
    student_fn = student.model_fn(unet_params, ctx)
    teacher_fn = consistency.guided_teacher(
        lambda x, tt, cc: t.unet.apply({"params": frozen["teacher"]}, x, tt, cc), ctx, null)
    return consistency.distillation_loss(student_fn, teacher_fn, sched, z, k_loss, **opts)

  s = config.sample
  from train.ldm import digit_prompts
  prompts, _ = digit_prompts(max(1, min(int(s.per_prompt), 4)))
  tokens = jnp.asarray(np.stack([t.tokenize(p) for p in prompts]))
  teacher_params = t.params

  def sample_fn(ema, key):
    return generate(student, student.unet_params(ema, teacher_params), tokens, key,
                    num_steps=int(s.num_steps), guidance_scale=float(s.guidance_scale))

  frozen = {"vae": t.vae_params, "text": t.text_params, "null_tokens": t.null_tokens(), "teacher": t.params}
  return loop.Task(name="lcm_lora" if student.is_lora else "lcm", init_params=init_params, loss_fn=loss_fn,
                   frozen=frozen, batch_keys=("image", "tokens"), sample_fn=jax.jit(sample_fn), grid_cols=10)


def _data_config(config: ml_collections.ConfigDict, teacher: Teacher) -> ml_collections.ConfigDict:
  """The teacher run's data section, or ``config.data`` (for a diffusers teacher: resized to the
  UNet's default image size and converted to the VAE's channels)."""
  if config.data.get("from_teacher", True) and teacher.data is not None:
    return teacher.data
  data = ml_collections.ConfigDict(config.data.to_dict())
  if teacher.data is None:
    data.channels = int(teacher.vae.config.in_channels)
    data.image_size = int(teacher.latent_shape[0]) * int(teacher.vae.config.downsample_factor)
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


def load_from_workdir(workdir: str) -> tuple[ml_collections.ConfigDict, LCMStudent, Any]:
  """(config, student, EMA student UNet parameters) of a ``train.lcm`` run."""
  from train import vae as vae_train
  config = loop.read_config(workdir)
  if "lcm" not in config:
    raise ValueError(f"{workdir} is not a train.lcm workdir (its config has no 'lcm' section)")
  teacher = load_teacher(config.teacher)
  student, init_params = build(config, teacher)
  trained = vae_train.restore_checked_ema(workdir, jax.eval_shape(init_params, jax.random.key(0)),
                                          what="LCM checkpoint")
  return config, student, student.unet_params(trained, teacher.params)


def evaluate(workdir: str, *, num_steps: int = 4, per_digit: int = 20, guidance_scale: float | None = None,
             seed: int = 0, batch: int = 100) -> dict[str, Any]:
  """``sample.evaluate``'s digit accuracy and Frechet distance for an LCM run at ``num_steps``."""
  from sklearn.datasets import load_digits
  from sample import evaluate as ev
  from train.ldm import digit_prompts

  config, student, params = load_from_workdir(workdir)
  scale = float(config.sample.guidance_scale if guidance_scale is None else guidance_scale)
  prompts, labels = digit_prompts(per_digit)
  tokens = np.stack([student.teacher.tokenize(p) for p in prompts])
  gen = jax.jit(lambda p, tok, k: generate(student, p, tok, k, num_steps=num_steps, guidance_scale=scale))
  images, seconds = ev.generate_batched(lambda tok, k: gen(params, tok, k), tokens, key=jax.random.key(seed),
                                        batch=batch)
  feats = ev.downscale_to_8x8(images)
  clf, _, _ = ev.digit_classifier(seed)
  pred = clf.predict(feats)
  return {"workdir": workdir, "num_steps": int(num_steps), "guidance_scale": scale,
          "accuracy": float(np.mean(pred == labels)),
          "frechet_distance": ev.frechet_distance(load_digits().data, feats),
          "seconds_per_image": seconds / len(labels), "num_samples": int(len(labels))}


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
