"""``python -m train.ldm``: latent diffusion (frozen VAE + frozen text encoder + trained UNet).

With no arguments it trains the default of ``configs/ldm_digits.py`` on the bundled digits: the
autoencoder first (in ``WORKDIR/vae``, unless ``vae.pretrained`` names a trained one), then the
latent UNet. One training step: encode images with the frozen VAE, sample the posterior, scale by
the VAE's scaling factor, encode captions (byte tokens) with the frozen, randomly initialised CLIP
text encoder, replace the condition by the empty caption's with probability ``cond_drop``
(:func:`jdiff.diffusion.drop_condition`) and regress the UNet on the epsilon or v target, with
optional min-SNR weighting (:func:`jdiff.diffusion.loss`). Sample grids use DDIM with
classifier-free guidance on the EMA weights.

Example:
  $ python -m train.ldm                                   # the whole default, ~15 min on 2 CPU cores
  $ python -m train.ldm --config configs/ldm_digits.py --config.train.steps=500 --workdir /tmp/ldm
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jdiff import diffusion, guidance, parallel, samplers, schedules
from jdiff.data import digits
from jdiff.models import AutoencoderKL, UNet, UNetConfig
from jdiff.models.text import CLIPTextConfig, CLIPTextModel
from jdiff.tokenizers import ByteTokenizer
from train import loop
from train import vae as vae_train

__all__ = ["byte_tokenize", "BYTE_VOCAB", "LatentDiffusion", "build", "make_task", "train_ldm",
           "load_from_workdir", "digit_prompts"]

BOS, EOS, PAD = ByteTokenizer.bos_token_id, ByteTokenizer.eos_token_id, ByteTokenizer.pad_token_id
BYTE_VOCAB = ByteTokenizer.vocab_size


def byte_tokenize(text: str, max_length: int) -> np.ndarray:
  """Token ids [max_length] of :class:`jdiff.tokenizers.ByteTokenizer`: bos, UTF-8 bytes, eos, pad.

  Example:
    >>> byte_tokenize("ab", 6).tolist()
    [257, 97, 98, 258, 256, 256]
  """
  return ByteTokenizer(max_length)(text)[0]


def digit_prompts(per_prompt: int) -> tuple[list[str], np.ndarray]:
  """Prompts "a handwritten digit zero" ... "nine", each repeated ``per_prompt`` times (digit-major
  columns: one row holds 0..9), and their labels."""
  labels = np.tile(np.arange(10), per_prompt)
  return [digits.caption_for(int(d)) for d in labels], labels


def _unet_config(section: ml_collections.ConfigDict, latent_channels: int) -> UNetConfig:
  overrides = {k: (tuple(v) if isinstance(v, list) else v) for k, v in section.items() if k != "preset"}
  overrides.setdefault("in_channels", latent_channels)
  overrides.setdefault("out_channels", latent_channels)
  try:
    return UNetConfig.preset(section.preset, **overrides)
  except TypeError as e:
    raise ValueError(f"unet config: {e}") from None


def _text_config(section: ml_collections.ConfigDict) -> CLIPTextConfig:
  return CLIPTextConfig(vocab_size=BYTE_VOCAB, hidden_size=section.hidden_size,
                        intermediate_size=section.intermediate_size,
                        num_hidden_layers=section.num_hidden_layers,
                        num_attention_heads=section.num_attention_heads,
                        max_position_embeddings=section.max_length, bos_token_id=BOS, eos_token_id=EOS,
                        pad_token_id=PAD)


@dataclasses.dataclass
class LatentDiffusion:
  """The frozen parts and the trained UNet of a latent diffusion model, with sampling.

  Attributes:
    unet: the UNet module (its parameters are trained).
    vae, vae_params: the frozen autoencoder.
    text, text_params: the frozen text encoder.
    schedule: the noise schedule.
    prediction: "epsilon" or "v".
    max_length: token length.
    latent_shape: (h, w, c) of the latents.
  """

  unet: UNet
  vae: AutoencoderKL
  vae_params: Any
  text: CLIPTextModel
  text_params: Any
  schedule: schedules.Schedule
  prediction: str
  max_length: int
  latent_shape: tuple[int, int, int]

  def tokenize(self, text: str) -> np.ndarray:
    return byte_tokenize(text, self.max_length)

  def frozen(self) -> dict[str, Any]:
    """What the train step receives as frozen inputs (VAE, text encoder, null-caption tokens)."""
    return {"vae": self.vae_params, "text": self.text_params,
            "null_tokens": jnp.asarray(self.tokenize(""))[None]}

  def encode_text(self, text_params: Any, tokens: jax.Array) -> jax.Array:
    """tokens [B, L] -> context [B, L, D]."""
    return self.text.apply({"params": text_params}, tokens).last_hidden_state

  def init_unet(self, key: jax.Array) -> Any:
    h, w, c = self.latent_shape
    ctx = jnp.zeros((1, self.max_length, self.text.config.hidden_size), jnp.float32)
    return self.unet.init(key, jnp.zeros((1, h, w, c), jnp.float32), jnp.zeros((1,), jnp.int32), ctx)["params"]

  def generate(self, unet_params: Any, tokens: jax.Array, key: jax.Array, *, sampler: str = "ddim",
               num_steps: int = 25, guidance_scale: float = 3.0) -> jax.Array:
    """Images [B, H, W, C] in [-1, 1] for token rows [B, L] with CFG (jit this)."""
    b = tokens.shape[0]
    ctx = self.encode_text(self.text_params, tokens)  # [B, L, D]
    null = self.encode_text(self.text_params, jnp.asarray(self.tokenize(""))[None])  # [1, L, D]

    def apply(x, t, c):
      return self.unet.apply({"params": unet_params}, x, t, c)

    model_fn = guidance.cfg(apply, ctx, null, guidance_scale)
    x_T = jax.random.normal(key, (b,) + tuple(self.latent_shape), jnp.float32)
    z0 = samplers.sample(sampler, model_fn, self.schedule, x_T, num_steps=num_steps,
                         prediction=self.prediction)
    z0 = self.vae.apply({"params": self.vae_params}, z0, method=AutoencoderKL.unscale_latents)
    images = self.vae.apply({"params": self.vae_params}, z0, method=AutoencoderKL.decode)
    return jnp.clip(images, -1.0, 1.0)


def build(config: ml_collections.ConfigDict, vae: AutoencoderKL, vae_params: Any) -> LatentDiffusion:
  """Builds the latent diffusion model of ``config`` around a trained VAE."""
  size = int(config.data.image_size)
  f = vae.config.downsample_factor
  if size % f:
    raise ValueError(f"data.image_size={size} is not divisible by the VAE's downsampling factor {f}")
  latent_shape = (size // f, size // f, vae.config.latent_channels)
  unet = UNet(_unet_config(config.unet, vae.config.latent_channels))
  dims = set(unet.config.per_block("cross_attention_dim"))
  if dims != {int(config.text.hidden_size)}:
    raise ValueError(f"unet.cross_attention_dim={unet.config.cross_attention_dim} must equal "
                     f"text.hidden_size={config.text.hidden_size}")
  text = CLIPTextModel(_text_config(config.text))
  text_params = text.init(jax.random.key(config.text.seed),
                          jnp.zeros((1, config.text.max_length), jnp.int32))["params"]
  d = config.diffusion
  sched = schedules.make(d.schedule, d.num_timesteps, beta_start=d.beta_start, beta_end=d.beta_end)
  return LatentDiffusion(unet=unet, vae=vae, vae_params=vae_params, text=text, text_params=text_params,
                         schedule=sched, prediction=diffusion.check_prediction(d.prediction),
                         max_length=int(config.text.max_length), latent_shape=latent_shape)


def make_task(config: ml_collections.ConfigDict, ldm: LatentDiffusion) -> loop.Task:
  """The latent UNet training task (loss, frozen inputs, CFG sample grids)."""
  d = config.diffusion
  weighting = d.weighting or None
  vae, unet, sched = ldm.vae, ldm.unet, ldm.schedule

  def loss_fn(params, batch, key, frozen):
    k_z, k_drop, k_loss = jax.random.split(key, 3)
    post = vae.apply({"params": frozen["vae"]}, batch["image"], method=AutoencoderKL.encode)
    z = vae.apply({"params": frozen["vae"]}, post.sample(k_z), method=AutoencoderKL.scale_latents)
    ctx = ldm.encode_text(frozen["text"], batch["tokens"])  # [B, L, D]
    null = ldm.encode_text(frozen["text"], frozen["null_tokens"])  # [1, L, D]
    ctx = diffusion.drop_condition(k_drop, ctx, null, d.cond_drop)

    def model_fn(x, t):
      return unet.apply({"params": params}, x, t, ctx)

    loss = diffusion.loss(model_fn, sched, z, k_loss, prediction=ldm.prediction, weighting=weighting,
                          min_snr_gamma=d.min_snr_gamma)
    return loss, {}

  s = config.sample
  prompts, _ = digit_prompts(max(1, min(int(s.per_prompt), 4)))
  tokens = jnp.asarray(np.stack([ldm.tokenize(p) for p in prompts]))
  gen = jax.jit(lambda p, k: ldm.generate(p, tokens, k, sampler=s.sampler, num_steps=s.num_steps,
                                          guidance_scale=s.guidance_scale))
  return loop.Task(name="ldm", init_params=ldm.init_unet, loss_fn=loss_fn, frozen=ldm.frozen(),
                   batch_keys=("image", "tokens"), sample_fn=gen, grid_cols=10)


def _vae_config_for(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  vc = ml_collections.ConfigDict({"seed": config.seed, "data": config.data, "vae": config.vae,
                                  "train": config.vae.train})
  return vc


def train_ldm(config: ml_collections.ConfigDict, workdir: str, *, stream=None) -> dict[str, Any]:
  """Trains the VAE if needed, then the latent UNet; returns timings and the final step."""
  t0 = time.perf_counter()
  loop.write_config(config, workdir)
  if config.vae.pretrained:
    vae, vae_params = vae_train.load_vae(os.path.expanduser(config.vae.pretrained))
  else:
    vdir = os.path.join(workdir, "vae")
    vcfg = _vae_config_for(config)
    if os.path.exists(os.path.join(vdir, "vae.json")) and _finished(vdir, int(config.vae.train.steps)):
      vae, vae_params = vae_train.load_vae(vdir)
    else:
      vae, vae_params = vae_train.train_vae(vcfg, vdir, train_cfg=config.vae.train, stream=stream)
  t_vae = time.perf_counter() - t0
  ldm = build(config, vae, vae_params)
  task = make_task(config, ldm)
  loader = vae_train.make_loader(config, tokenize=ldm.tokenize,
                                 batch_size=config.train.get("batch_size") or None)
  state = loop.train(config.train, task, loader, workdir, seed=config.seed, stream=stream)
  return {"step": int(state.step), "vae_seconds": t_vae, "total_seconds": time.perf_counter() - t0}


def _finished(workdir: str, steps: int) -> bool:
  from jdiff import checkpoint
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    return (ckpt.latest_step() or 0) >= steps
  finally:
    ckpt.close()


def load_from_workdir(workdir: str) -> tuple[ml_collections.ConfigDict, LatentDiffusion, Any]:
  """(config, model, EMA UNet params) of a finished ``train.ldm`` run, for sampling/evaluation."""
  from jdiff import checkpoint
  config = loop.read_config(workdir)
  vdir = os.path.expanduser(config.vae.pretrained) if config.vae.pretrained else os.path.join(workdir, "vae")
  vae, vae_params = vae_train.load_vae(vdir)
  ldm = build(config, vae, vae_params)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"no UNet checkpoint in {ckpt.directory}")
    params = vae_train.restore_ema(ckpt)
  finally:
    ckpt.close()
  expected = jax.eval_shape(ldm.init_unet, jax.random.key(0))
  checkpoint.check_shapes(params, expected, what=f"UNet checkpoint in {workdir}")
  return config, ldm, params


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  out = train_ldm(config, workdir)
  if parallel.is_main_process():
    print(f"[ldm] done in {out['total_seconds'] / 60:.1f} min (VAE {out['vae_seconds'] / 60:.1f} min); "
          f"evaluate with: python -m sample.evaluate --workdir {workdir}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return loop.main_wrapper(run, default_config=os.path.join(here, "configs", "ldm_digits.py"),
                           default_workdir="workdir/ldm_digits", argv=None if argv is None else list(argv))


if __name__ == "__main__":
  sys.exit(main())
