"""``python -m train.ldm``: latent diffusion (frozen VAE + small CLIP text encoder + trained UNet).

With no arguments it trains the default of ``configs/ldm_digits.py`` on the bundled digits: the
autoencoder first (in ``WORKDIR/vae``, unless ``vae.pretrained`` names a trained one), then the
latent UNet. One training step: encode images with the frozen VAE, sample the posterior, scale by
the VAE's scaling factor, replace each caption (byte tokens) by the empty caption with probability
``cond_drop`` (:func:`jdiff.diffusion.drop_condition`, for classifier-free guidance), encode the
captions with the CLIP text encoder (trained jointly with the UNet when ``text.trainable``, else
frozen at its random initialisation) and regress the UNet on the epsilon or v target, with
optional min-SNR weighting (:func:`jdiff.diffusion.loss`). The UNet reads the text through
cross-attention and, when ``unet.class_embed_type`` is "projection" or "simple_projection", also
through the token-mean of the text embedding added to its time embedding (:class:`TextUNet`).
Sample grids use classifier-free guidance on the EMA weights.

Example:
  $ python -m train.ldm                                   # the whole default, ~15 min on 2 CPU cores
  $ python -m train.ldm --config configs/ldm_digits.py --config.train.steps=500 --workdir /tmp/ldm
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Mapping, Sequence

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

__all__ = ["byte_tokenize", "BYTE_VOCAB", "TextUNet", "LatentDiffusion", "build", "make_task", "train_ldm",
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


_POOLED_EMBED_TYPES = ("projection", "simple_projection")


def _unet_config(section: ml_collections.ConfigDict, latent_channels: int, text_dim: int) -> UNetConfig:
  overrides = {k: (tuple(v) if isinstance(v, list) else v) for k, v in section.items() if k != "preset"}
  overrides.setdefault("in_channels", latent_channels)
  overrides.setdefault("out_channels", latent_channels)
  if overrides.get("class_embed_type", None) == "":
    overrides["class_embed_type"] = None  # "" in configs (ml_collections cannot override a None)
  if overrides.get("class_embed_type") in _POOLED_EMBED_TYPES:
    dim = overrides.setdefault("projection_class_embeddings_input_dim", text_dim)
    if dim != text_dim:
      raise ValueError(f"unet.projection_class_embeddings_input_dim={dim} must equal "
                       f"text.hidden_size={text_dim} (the pooled text embedding feeds the class embedding)")
  elif overrides.get("class_embed_type") is not None or overrides.get("num_class_embeds") is not None:
    raise ValueError(f"unet.class_embed_type={overrides.get('class_embed_type')!r} / num_class_embeds: "
                     f"train.ldm conditions on text only; use \"\", \"projection\" or \"simple_projection\"")
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


def pooled_text(encoder_hidden_states: jax.Array) -> jax.Array:
  """The global text condition [B, D]: the causal text encoder's state at the last position, which
  has attended to every token (CLIP pools at its end token likewise). The token mean is dominated by
  the prompt template shared by all captions and barely tells them apart."""
  if encoder_hidden_states.ndim != 3:
    raise ValueError(f"encoder_hidden_states must be [B, L, D], got {encoder_hidden_states.shape}")
  return encoder_hidden_states[:, -1].astype(jnp.float32)


class TextUNet(UNet):
  """A :class:`~jdiff.models.UNet` that also feeds the pooled text embedding to its class embedding.

  When ``config.class_embed_type`` is "projection" or "simple_projection" and no ``class_labels``
  are given, the class embedding receives :func:`pooled_text` of ``encoder_hidden_states``
  ([B, D]): a global text condition added to the time embedding of every resnet, on top of the
  per-token cross-attention. The parameters and every other behaviour are the UNet's, so any
  ``unet.apply({"params": p}, x, t, context)`` caller (CFG, distillation) works unchanged.

  Example:
    >>> cfg = UNetConfig.tiny(class_embed_type="projection", projection_class_embeddings_input_dim=32)
    >>> unet = TextUNet(cfg)
    >>> x, ctx = jnp.zeros((1, 16, 16, 4)), jnp.zeros((1, 7, 32))
    >>> params = unet.init(jax.random.key(0), x, jnp.array([10]), ctx)["params"]
  """

  def __call__(self, x: jax.Array, t: jax.Array, encoder_hidden_states: jax.Array, *,
               class_labels: jax.Array | None = None, **kwargs) -> jax.Array:
    if class_labels is None and self.config.class_embed_type in _POOLED_EMBED_TYPES:
      class_labels = pooled_text(encoder_hidden_states)  # [B, D]
    return super().__call__(x, t, encoder_hidden_states, class_labels=class_labels, **kwargs)


@dataclasses.dataclass
class LatentDiffusion:
  """The frozen parts and the trained networks of a latent diffusion model, with sampling.

  The trained parameters are the UNet's, or ``{"unet": ..., "text": ...}`` when the text encoder
  is trained jointly (``text_trainable``); :meth:`split` separates them.

  Attributes:
    unet: the UNet module (its parameters are trained).
    vae, vae_params: the frozen autoencoder.
    text, text_params: the text encoder and its initial (or, after :func:`load_from_workdir`,
      trained) parameters.
    schedule: the noise schedule.
    prediction: "epsilon" or "v".
    max_length: token length.
    latent_shape: (h, w, c) of the latents.
    text_trainable: whether the text encoder is trained with the UNet.
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
  text_trainable: bool = False

  def tokenize(self, text: str) -> np.ndarray:
    return byte_tokenize(text, self.max_length)

  def frozen(self) -> dict[str, Any]:
    """What the train step receives as frozen inputs (VAE, frozen text encoder, null-caption tokens)."""
    out = {"vae": self.vae_params, "null_tokens": jnp.asarray(self.tokenize(""))[None]}
    if not self.text_trainable:
      out["text"] = self.text_params
    return out

  def split(self, params: Any) -> tuple[Any, Any]:
    """(UNet params, text params) of trained ``params`` (UNet params alone: the model's text params)."""
    if isinstance(params, Mapping) and set(params) == {"unet", "text"}:
      return params["unet"], params["text"]
    return params, self.text_params

  def init_params(self, key: jax.Array) -> Any:
    """The trained parameters at initialisation: the UNet's, with the text encoder's if trainable."""
    unet = self.init_unet(key)
    return {"unet": unet, "text": self.text_params} if self.text_trainable else unet

  def encode_text(self, text_params: Any, tokens: jax.Array) -> jax.Array:
    """tokens [B, L] -> context [B, L, D]."""
    return self.text.apply({"params": text_params}, tokens).last_hidden_state

  def init_unet(self, key: jax.Array) -> Any:
    h, w, c = self.latent_shape
    ctx = jnp.zeros((1, self.max_length, self.text.config.hidden_size), jnp.float32)
    return self.unet.init(key, jnp.zeros((1, h, w, c), jnp.float32), jnp.zeros((1,), jnp.int32), ctx)["params"]

  def generate(self, params: Any, tokens: jax.Array, key: jax.Array, *, sampler: str = "ddim",
               num_steps: int = 25, guidance_scale: float = 3.0) -> jax.Array:
    """Images [B, H, W, C] in [-1, 1] for token rows [B, L] with CFG (jit this).

    ``params``: UNet parameters, or the trained ``{"unet", "text"}`` tree (see :meth:`split`).
    """
    unet_params, text_params = self.split(params)
    b = tokens.shape[0]
    ctx = self.encode_text(text_params, tokens)  # [B, L, D]
    null = self.encode_text(text_params, jnp.asarray(self.tokenize(""))[None])  # [1, L, D]

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
  unet = TextUNet(_unet_config(config.unet, vae.config.latent_channels, int(config.text.hidden_size)))
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
                         max_length=int(config.text.max_length), latent_shape=latent_shape,
                         text_trainable=bool(config.text.get("trainable", False)))


def make_task(config: ml_collections.ConfigDict, ldm: LatentDiffusion) -> loop.Task:
  """The latent UNet training task (loss, frozen inputs, CFG sample grids)."""
  d = config.diffusion
  weighting = d.weighting or None
  vae, unet, sched = ldm.vae, ldm.unet, ldm.schedule

  def loss_fn(params, batch, key, frozen):
    k_z, k_drop, k_loss = jax.random.split(key, 3)
    unet_params, text_params = ldm.split(params) if ldm.text_trainable else (params, frozen["text"])
    post = vae.apply({"params": frozen["vae"]}, batch["image"], method=AutoencoderKL.encode)
    z = vae.apply({"params": frozen["vae"]}, post.sample(k_z), method=AutoencoderKL.scale_latents)
    # Dropping the caption (not its embedding) trains the null embedding of a trainable encoder too.
    tokens = diffusion.drop_condition(k_drop, batch["tokens"], frozen["null_tokens"], d.cond_drop)  # [B, L]
    ctx = ldm.encode_text(text_params, tokens)  # [B, L, D]

    def model_fn(x, t):
      return unet.apply({"params": unet_params}, x, t, ctx)

    loss = diffusion.loss(model_fn, sched, z, k_loss, prediction=ldm.prediction, weighting=weighting,
                          min_snr_gamma=d.min_snr_gamma)
    return loss, {}

  s = config.sample
  prompts, _ = digit_prompts(max(1, min(int(s.per_prompt), 4)))
  tokens = jnp.asarray(np.stack([ldm.tokenize(p) for p in prompts]))
  gen = jax.jit(lambda p, k: ldm.generate(p, tokens, k, sampler=s.sampler, num_steps=s.num_steps,
                                          guidance_scale=s.guidance_scale))
  return loop.Task(name="ldm", init_params=ldm.init_params, loss_fn=loss_fn, frozen=ldm.frozen(),
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
  """(config, model, EMA UNet params) of a finished ``train.ldm`` run, for sampling/evaluation.

  When the run trained its text encoder, the returned model carries the EMA text parameters.
  """
  config = loop.read_config(workdir)
  vdir = os.path.expanduser(config.vae.pretrained) if config.vae.pretrained else os.path.join(workdir, "vae")
  vae, vae_params = vae_train.load_vae(vdir)
  ldm = build(config, vae, vae_params)
  params = vae_train.restore_checked_ema(workdir, jax.eval_shape(ldm.init_params, jax.random.key(0)),
                                         what="UNet checkpoint")
  if ldm.text_trainable:
    ldm = dataclasses.replace(ldm, text_params=params["text"])
    params = params["unet"]
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
