"""What a latent diffusion bundle needs beyond a diffusers folder: the digits model's pieces and the
training workdirs of ``train.ldm``, ``train.lora``, ``train.lcm`` and ``train.controlnet``.

The bundle itself is :class:`jdiff.pipelines.StableDiffusion`; :func:`load` (its ``from_workdir``) and
:func:`load_path` build one from a workdir (or either kind of folder), reading the run's saved
``config.json`` and its Orbax checkpoint (EMA parameters, :mod:`jdiff.checkpoint`):

* ``train.ldm``: the trained VAE (``vae/vae.json`` + checkpoint, or ``vae.pretrained``), the byte
  tokenizer and CLIP text encoder of the config (trained parameters when ``text.trainable``), and
  the denoiser, a :class:`TextUNet` (or, with ``denoiser="mmdit"``, a text-conditioned MMDiT,
  :class:`jdiff.models.text_dit.TextDiT`);
* ``train.lora``: the base with the EMA LoRA factors merged into its UNet;
* ``train.lcm``: the teacher with the student UNet (a guidance-scale embedding, or LoRA factors
  merged, sampled without classifier-free guidance) and the LCM sampler as default;
* ``train.controlnet``: the base with the trained ControlNet attached;
* ``train.ct``: a consistency-trained model (no teacher): the VAE of ``vae.pretrained``, the text
  encoder and UNet of the config, sampled unguided with the LCM sampler on the final grid of the
  run's discretisation curriculum.

Example:
  >>> pipe = StableDiffusion.from_workdir("workdir/ldm_digits")  # doctest: +SKIP
  >>> images = pipe.generate(["a handwritten digit three"] * 4, key=jax.random.key(0), num_steps=25,
  ...                        guidance_scale=3.0)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from jdiff import checkpoint, consistency, lora, parallel, schedules
from jdiff.models import AutoencoderKL, UNet, UNetConfig, VAEConfig
from jdiff.models.text import CLIPTextConfig, CLIPTextModel
from jdiff.tokenizers import ByteTokenizer

__all__ = ["POOLED_EMBED_TYPES", "DENOISERS", "TextUNet", "denoiser_for", "pooled_text", "class_kwargs",
           "unet_config", "text_config",
           "from_config", "trained_params", "read_config", "load_vae", "restore_ema", "restore_checked_ema",
           "is_diffusers_folder", "load_path", "load", "factors_to_tree", "tree_to_lora", "lora_targets",
           "hint_channels", "controlnet_for", "lcm_student", "with_guidance_embedding", "COND_PROJ",
           "vae_workdir"]

POOLED_EMBED_TYPES = ("projection", "simple_projection")
COND_PROJ = ("time_embedding", "cond_proj", "kernel")  # the guidance-embedding kernel of an LCM student


# ----------------------------------------------------------------------------- the digits text-UNet


def pooled_text(encoder_hidden_states: jax.Array) -> jax.Array:
  """The global text condition [B, D]: the causal text encoder's state at the last position, which
  has attended to every token (CLIP pools at its end token likewise). The token mean is dominated by
  the prompt template shared by all captions and barely tells them apart."""
  if encoder_hidden_states.ndim != 3:
    raise ValueError(f"encoder_hidden_states must be [B, L, D], got {encoder_hidden_states.shape}")
  return encoder_hidden_states[:, -1].astype(jnp.float32)


def class_kwargs(unet_config: UNetConfig, context: jax.Array) -> dict[str, jax.Array]:
  """``{"class_labels": pooled_text(context)}`` for a UNet (or its ControlNet) whose class embedding
  takes the pooled text ("projection" / "simple_projection"), else nothing."""
  if unet_config.class_embed_type in POOLED_EMBED_TYPES:
    return {"class_labels": pooled_text(context)}  # [B, D]
  return {}


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
    if class_labels is None and self.config.class_embed_type in POOLED_EMBED_TYPES:
      class_labels = pooled_text(encoder_hidden_states)  # [B, D]
    return super().__call__(x, t, encoder_hidden_states, class_labels=class_labels, **kwargs)


# ----------------------------------------------------------------------------- a train.ldm config


def unet_config(section: Mapping[str, Any], latent_channels: int, text_dim: int) -> UNetConfig:
  """The UNetConfig of a ``unet`` config section (preset + overrides) for text of width ``text_dim``.

  Raises:
    ValueError: a class conditioning other than the pooled text, or a mismatched projection width.
  """
  overrides = {k: (tuple(v) if isinstance(v, list) else v) for k, v in section.items() if k != "preset"}
  overrides.setdefault("in_channels", latent_channels)
  overrides.setdefault("out_channels", latent_channels)
  if overrides.get("class_embed_type", None) == "":
    overrides["class_embed_type"] = None  # "" in configs (ml_collections cannot override a None)
  if overrides.get("class_embed_type") in POOLED_EMBED_TYPES:
    dim = overrides.setdefault("projection_class_embeddings_input_dim", text_dim)
    if dim != text_dim:
      raise ValueError(f"unet.projection_class_embeddings_input_dim={dim} must equal "
                       f"text.hidden_size={text_dim} (the pooled text embedding feeds the class embedding)")
  elif overrides.get("class_embed_type") is not None or overrides.get("num_class_embeds") is not None:
    raise ValueError(f"unet.class_embed_type={overrides.get('class_embed_type')!r} / num_class_embeds: "
                     f"train.ldm conditions on text only; use \"\", \"projection\" or \"simple_projection\"")
  try:
    return UNetConfig.preset(section["preset"], **overrides)
  except TypeError as e:
    raise ValueError(f"unet config: {e}") from None


DENOISERS = ("unet", "mmdit")


def denoiser_for(config: Mapping[str, Any], latent_channels: int, latent_size: int, text_dim: int):
  """The denoiser module of a ``train.ldm`` config: ``denoiser="unet"`` (default) a :class:`TextUNet` of
  the ``unet`` section, ``"mmdit"`` a :class:`jdiff.models.text_dit.TextDiT` of the ``dit`` section; both
  are called as ``(x, t, context)``.

  Raises:
    ValueError: an unknown denoiser, or widths that do not match the text encoder's.
  """
  kind = str(config.get("denoiser", "unet") or "unet")
  if kind not in DENOISERS:
    raise ValueError(f"unknown denoiser {kind!r}; expected one of {DENOISERS}")
  if kind == "mmdit":
    from jdiff.models.text_dit import TextDiT, text_dit_config

    return TextDiT(text_dit_config(config["dit"], latent_channels=latent_channels, latent_size=latent_size,
                                   text_dim=text_dim))
  unet = TextUNet(unet_config(config["unet"], latent_channels, text_dim))
  if set(unet.config.per_block("cross_attention_dim")) != {text_dim}:
    raise ValueError(f"unet.cross_attention_dim={unet.config.cross_attention_dim} must equal "
                     f"text.hidden_size={text_dim}")
  return unet


def text_config(section: Mapping[str, Any], tokenizer: Any = None) -> CLIPTextConfig:
  """The CLIPTextConfig of a ``text`` config section, over the byte tokenizer's vocabulary (or that of
  ``tokenizer``, a :class:`~jdiff.tokenizers.CLIPTokenizer`)."""
  tok = tokenizer if tokenizer is not None else ByteTokenizer
  vocab = tok.vocab_size
  return CLIPTextConfig(vocab_size=vocab, hidden_size=section["hidden_size"],
                        intermediate_size=section["intermediate_size"],
                        num_hidden_layers=section["num_hidden_layers"],
                        num_attention_heads=section["num_attention_heads"],
                        max_position_embeddings=section["max_length"], bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


TOKENIZERS = ("bytes", "bpe")


def bpe_tokenizer(section: Mapping[str, Any]):
  """The CLIP BPE tokenizer a ``text`` section with ``tokenizer="bpe"`` learns from the bundled digits'
  captions (both spellings of every digit; ``num_merges`` merges, ``max_length`` tokens)."""
  from jdiff.data import digits
  from jdiff.tokenizers import CLIPTokenizer

  captions = [c for label in range(10) for c in digits.captions_for(label)] * 2
  return CLIPTokenizer.train(captions, num_merges=int(section.get("num_merges", 200)),
                             max_length=int(section["max_length"]))


def from_config(config: Mapping[str, Any], vae: AutoencoderKL, vae_params: Any, unet_params: Any = None,
                tokenizer: Any = None):
  """The bundle of a ``train.ldm`` config around a VAE: text encoder at its seeded initialisation,
  byte tokenizer, schedule and prediction of ``config.diffusion``, denoiser module (:func:`denoiser_for`;
  ``unet_params`` as given).

  Raises:
    ValueError: an image size the VAE does not divide, or text / UNet widths that do not match.
  """
  from jdiff.pipelines import StableDiffusion

  size = int(config["data"]["image_size"])
  f = vae.config.downsample_factor
  if size % f:
    raise ValueError(f"data.image_size={size} is not divisible by the VAE's downsampling factor {f}")
  text_section = config["text"]
  kind = text_section.get("tokenizer", "bytes")
  if kind not in TOKENIZERS:
    raise ValueError(f"unknown text.tokenizer {kind!r}; expected one of {TOKENIZERS}")
  max_length = int(text_section["max_length"])
  if kind == "bytes":
    tokenizer = ByteTokenizer(max_length)
  elif tokenizer is None:
    tokenizer = bpe_tokenizer(text_section)
  hidden = int(text_section["hidden_size"])
  unet = denoiser_for(config, vae.config.latent_channels, size // f, hidden)
  text = CLIPTextModel(text_config(text_section, None if kind == "bytes" else tokenizer))
  text_params = jax.jit(lambda k: text.init(k, jnp.zeros((1, max_length), jnp.int32))["params"])(
      jax.random.key(text_section["seed"]))
  d = config["diffusion"]
  if d["prediction"] in ("flow", "flow_prediction"):  # the flow path uses only the schedule's length T
    sched = schedules.make("linear", d["num_timesteps"])
  else:
    sched = schedules.make(d["schedule"], d["num_timesteps"], beta_start=d["beta_start"], beta_end=d["beta_end"])
  s = config.get("sample", None) or {}
  defaults = {k: s[k] for k in ("sampler", "num_steps", "guidance_scale") if k in s}
  return StableDiffusion(unet=unet, unet_params=unet_params, vae=vae, vae_params=vae_params, text_encoder=text,
                         text_params=text_params, tokenizer=tokenizer, schedule=sched,
                         prediction=d["prediction"], scaling_factor=float(vae.config.scaling_factor),
                         shift_factor=float(vae.config.shift_factor or 0.0), image_size=size, defaults=defaults,
                         scheduler_config=scheduler_config(d))


def scheduler_config(diffusion_section: Mapping[str, Any]) -> dict[str, Any]:
  """The diffusers ``scheduler_config.json`` (a DDIMScheduler) of a ``train.ldm`` run's diffusion section:
  its beta schedule and prediction type, with the sampler settings jdiff's samplers default to (so a
  pipeline loaded from the export samples as the run's own bundle does); a FlowMatchEulerDiscreteScheduler
  for ``prediction="flow"``."""
  d = diffusion_section
  if d["prediction"] in ("flow", "flow_prediction"):
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": int(d["num_timesteps"]),
            "shift": float(d.get("shift", 1.0))}
  names = {"epsilon": "epsilon", "v": "v_prediction", "sample": "sample"}
  beta_schedule = {"cosine": "squaredcos_cap_v2"}.get(d["schedule"], d["schedule"])
  return {"_class_name": "DDIMScheduler", "num_train_timesteps": int(d["num_timesteps"]),
          "beta_schedule": beta_schedule, "beta_start": float(d["beta_start"]), "beta_end": float(d["beta_end"]),
          "prediction_type": names[d["prediction"]], "clip_sample": False, "set_alpha_to_one": True,
          "steps_offset": 0, "timestep_spacing": "leading"}


def abstract_bundle(family: str, *, dtype: str = "float32", remat: Any = False, prediction: str = "epsilon",
                    image_size: int | None = None):
  """A bundle with a Stable Diffusion family's real module shapes ("sd15", "sd21" or "sdxl": SDXL 1.0 base,
  a :class:`jdiff.sdxl.StableDiffusionXL` whose VAE computes in float32 as :func:`finetune_bundle`'s) and no
  weights (parameter trees None): for ``jax.eval_shape``, lowering and memory planning of training steps
  without a checkpoint on disk. Its tokenizers are stand-ins of the right length (77)."""
  from jdiff.pipelines import StableDiffusion
  from jdiff.tokenizers import CLIPTokenizer

  if family not in ("sd15", "sd21", "sdxl"):
    raise ValueError(f"unknown model family {family!r}; expected 'sd15', 'sd21' or 'sdxl'")
  schedule = schedules.scaled_linear(1000, 0.00085, 0.012)
  if family == "sdxl":
    from jdiff.sdxl import StableDiffusionXL

    vae = AutoencoderKL(VAEConfig.sdxl(dtype="float32"))
    return StableDiffusionXL(
        unet=UNet(UNetConfig.sdxl_base(dtype=dtype, remat=remat)), unet_params=None, vae=vae, vae_params=None,
        text_encoder=CLIPTextModel(CLIPTextConfig.sdxl(dtype=dtype)), text_params=None,
        tokenizer=CLIPTokenizer.train([], num_merges=0, max_length=77),
        text_encoder_2=CLIPTextModel(CLIPTextConfig.sdxl_2(dtype=dtype)), text_params_2=None,
        tokenizer_2=CLIPTokenizer.train([], num_merges=0, max_length=77), schedule=schedule,
        prediction=prediction, scaling_factor=float(vae.config.scaling_factor), image_size=image_size)
  unet = UNet(getattr(UNetConfig, family)(dtype=dtype, remat=remat))
  vae = AutoencoderKL(getattr(VAEConfig, family)(dtype=dtype))
  text = CLIPTextModel(getattr(CLIPTextConfig, family)(dtype=dtype))
  return StableDiffusion(unet=unet, unet_params=None, vae=vae, vae_params=None, text_encoder=text,
                         text_params=None, tokenizer=CLIPTokenizer.train([], num_merges=0, max_length=77),
                         schedule=schedule, prediction=prediction,
                         scaling_factor=float(vae.config.scaling_factor), image_size=image_size)


def finetune_bundle(config: Mapping[str, Any]):
  """The bundle of a fine-tune run (``config.pretrained``, a diffusers Stable Diffusion or SDXL base
  folder): its UNet at the run's compute dtype and remat policy (``config.unet``), the prediction type of
  ``config.diffusion.prediction`` or else of the folder's scheduler, and the run's image size. An SDXL
  folder gives a :class:`jdiff.sdxl.StableDiffusionXL` whose VAE computes in float32 when its config says
  ``force_upcast`` (as diffusers' SDXL training script keeps it).

  Raises:
    FileNotFoundError / ValueError: not a Stable Diffusion folder, an inpainting UNet, an image size the
      VAE does not divide, or for SDXL a refiner, ``text.trainable``, ``data.precompute`` or no
      ``data.crop`` (one line each).
  """
  from jdiff.data import transforms
  from jdiff.pipelines import StableDiffusion

  path = os.path.expanduser(str(config["pretrained"]))
  u = config.get("unet", None) or {}
  bundle = StableDiffusion.from_diffusers(path, dtype=u.get("dtype") or None)
  c = int(bundle.vae.config.latent_channels)
  if int(bundle.unet.config.in_channels) != c:
    raise ValueError(f"{path!r} holds an inpainting UNet ({bundle.unet.config.in_channels} input channels); "
                     f"fine-tuning trains text-to-image UNets ({c} input channels)")
  size = int(config["data"]["image_size"])
  transforms.check_resolution(size, bundle.vae_factor)
  prediction = (config.get("diffusion", None) or {}).get("prediction") or bundle.prediction
  unet = bundle.unet
  if u.get("remat"):
    unet = type(unet)(dataclasses.replace(unet.config, remat=u["remat"]))
  extra = {}
  from jdiff.sdxl import StableDiffusionXL

  if isinstance(bundle, StableDiffusionXL):
    _check_sdxl_finetune(config, bundle, path)
    if bundle.vae.config.force_upcast:
      extra["vae"] = type(bundle.vae)(dataclasses.replace(bundle.vae.config, dtype="float32"))
  return dataclasses.replace(bundle, unet=unet, prediction=prediction, image_size=size, **extra)


def _check_sdxl_finetune(config: Mapping[str, Any], bundle, path: str) -> None:
  """One-line refusals of what an SDXL fine-tune does not do."""
  if bundle.text_encoder is None or bundle.requires_aesthetics_score:
    raise ValueError(f"{path!r} is an SDXL refiner (aesthetic-score time ids); fine-tuning trains SDXL base UNets")
  if bool(config["text"].get("trainable", False)):
    raise ValueError("text.trainable=True: an SDXL fine-tune keeps both text encoders frozen")
  d = config["data"]
  if d.get("precompute"):
    raise ValueError("data.precompute stores one text embedding per caption; an SDXL fine-tune encodes its "
                     "two encoders' conditioning live (set data.precompute='')")
  if not d.get("crop"):
    raise ValueError("data.crop is empty: SDXL's micro-conditioning needs the original size and crop corner "
                     "of a 'center' or 'random' crop")


def trained_params(config: Mapping[str, Any], bundle, unet_params: Any) -> Any:
  """The tree a ``train.ldm`` run trains and checkpoints: the UNet's parameters, or
  ``{"unet": ..., "text": ...}`` when ``text.trainable``."""
  if bool(config["text"].get("trainable", False)):
    return {"unet": unet_params, "text": bundle.text_params}
  return unet_params


# ----------------------------------------------------------------------------- workdir files


def read_config(workdir: str):
  """The config a run in ``workdir`` was trained with (its ``config.json``) as a ConfigDict."""
  import ml_collections

  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
  with open(path) as fh:
    return ml_collections.ConfigDict(json.load(fh))


def restore_ema(ckpt: checkpoint.Checkpointer, step: int | None = None, *, ema: bool = True) -> Any:
  """The EMA parameters (or, with ``ema=False``, the online parameters) of a saved TrainState, restored
  replicated (shapes from the checkpoint); the online parameters of a run that kept no EMA."""
  import orbax.checkpoint as ocp

  step = ckpt.latest_step() if step is None else step
  sharding = parallel.replicated(parallel.make_mesh())
  saved = ckpt.saved_shapes(step)
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), saved)
  out = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  state = out["state"]
  return state["ema_params"] if ema and state.get("ema_params") is not None else state["params"]


def restore_checked_ema(workdir: str, expected: Any, *, what: str, ema: bool = True) -> Any:
  """The EMA parameters (online ones with ``ema=False``) of the latest checkpoint in
  ``WORKDIR/checkpoints``, checked leaf by leaf against the abstract tree ``expected`` (one-line error
  naming ``what`` on a mismatch).

  Raises:
    FileNotFoundError: no checkpoint saved yet.
    ValueError: the checkpoint's tree or shapes differ from ``expected``.
  """
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"no {what} in {ckpt.directory}")
    params = restore_ema(ckpt, ema=ema)
  finally:
    ckpt.close()
  checkpoint.check_shapes(params, expected, what=f"{what} in {workdir}")
  return params


def load_vae(workdir: str) -> tuple[AutoencoderKL, Any]:
  """A trained VAE (EMA params) of a ``train.vae`` workdir (``vae.json`` + checkpoint).

  Raises:
    FileNotFoundError: ``workdir`` has no finished VAE.
  """
  meta_path = os.path.join(workdir, "vae.json")
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"no trained VAE in {workdir} (missing {meta_path})")
  with open(meta_path) as fh:
    meta = json.load(fh)
  cfg = VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"no VAE checkpoint in {ckpt.directory}")
    params = restore_ema(ckpt, step)
  finally:
    ckpt.close()
  return AutoencoderKL(cfg), params


def vae_workdir(path: str) -> str:
  """The ``train.vae`` workdir of ``path``: ``path`` itself (``vae.json``), or the VAE a ``train.ldm``
  workdir was trained with (its ``vae.pretrained``, else ``PATH/vae``).

  Raises:
    FileNotFoundError: neither kind of workdir, or the ``train.ldm`` run has no finished VAE.
  """
  path = os.path.expanduser(path or "")
  if os.path.exists(os.path.join(path, "vae.json")):
    return path
  if not os.path.exists(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"{path!r} is neither a train.vae workdir (vae.json) nor a train.ldm workdir "
                            "(config.json)")
  config = read_config(path)
  if "vae" not in config:
    raise FileNotFoundError(f"{path!r} is not a train.ldm workdir (its config has no vae section)")
  pretrained = config.vae.get("pretrained", "")
  vdir = os.path.expanduser(pretrained) if pretrained else os.path.join(path, "vae")
  if not os.path.exists(os.path.join(vdir, "vae.json")):
    raise FileNotFoundError(f"the train.ldm workdir {path!r} has no trained VAE (missing {vdir}/vae.json)")
  return vdir


# ----------------------------------------------------------------------------- LoRA and ControlNet trees


def factors_to_tree(factors: Mapping[str, Mapping[str, jax.Array]]) -> dict[str, Any]:
  """``{"a/b/kernel": {"down", "up"}}`` -> nested ``{"a": {"b": {"kernel": {"down", "up"}}}}`` (the
  trained pytree: plain nested dicts checkpoint as they are)."""
  flat = {f"{p}/{n}": v for p, f in factors.items() for n, v in f.items()}
  return traverse_util.unflatten_dict(flat, sep="/")


def tree_to_lora(tree: Any, scales: tuple[tuple[str, float], ...]) -> lora.LoRA:
  """Inverse of :func:`factors_to_tree`, with the adapter's static alpha / r scales."""
  flat = traverse_util.flatten_dict(dict(tree), sep="/")
  paths = sorted({p.rsplit("/", 1)[0] for p in flat})
  return lora.LoRA(factors={p: {"down": flat[p + "/down"], "up": flat[p + "/up"]} for p in paths}, scales=scales)


def lora_targets(value: Any) -> tuple[str, ...]:
  """LoRA targets from a config value: a comma-separated string or a sequence."""
  if isinstance(value, str):
    return tuple(v.strip() for v in value.split(",") if v.strip())
  return tuple(value)


def hint_channels(widths: Any, vae_factor: int) -> tuple[int, ...]:
  """The ControlNet hint encoder's widths: ``widths`` checked against the VAE factor, or a default.

  Raises:
    ValueError: a factor that is not a power of 2, or a number of widths that does not reach it.
  """
  widths = tuple(int(c) for c in widths)
  n = int(round(math.log2(vae_factor))) + 1
  if 2 ** (n - 1) != vae_factor:
    raise ValueError(f"the VAE's downsampling factor {vae_factor} is not a power of 2")
  if not widths:
    return tuple(16 * 2 ** i for i in range(n))
  if len(widths) != n:
    raise ValueError(f"controlnet.conditioning_embedding_out_channels={widths} halves the control image "
                     f"{len(widths) - 1} times; the VAE downsamples {vae_factor}x, so {n} widths are needed")
  return widths


def controlnet_for(bundle, widths: Any = ()):
  """A ControlNet for ``bundle``'s UNet and ``key -> params`` copying the UNet's encoder (zero convs zero).

  Returns:
    ``(net, init)`` with ``init(key) -> ControlNet params`` (:func:`jdiff.models.controlnet.init_from_unet`).
  """
  from jdiff.models.controlnet import ControlNet, ControlNetConfig, init_from_unet

  cfg = ControlNetConfig(unet=bundle.unet.config, conditioning_channels=3,
                         conditioning_embedding_out_channels=hint_channels(widths, bundle.vae_factor))
  net = ControlNet(cfg)
  h, w, c = bundle.latent_shape
  x = jnp.zeros((1, h, w, c), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  ctx = jnp.zeros((1, 1, bundle.unet.config.per_block("cross_attention_dim")[0]), jnp.float32)
  hint = jnp.zeros((1, bundle.default_size, bundle.default_size, 3), jnp.float32)
  unet_params = bundle.unet_params

  def init(key):
    return init_from_unet(unet_params, net, x, t, ctx, hint, key=key, **class_kwargs(bundle.unet.config, ctx))

  return net, init


# ----------------------------------------------------------------------------- loading


def is_diffusers_folder(path: str) -> bool:
  return os.path.exists(os.path.join(path, "model_index.json"))


def load_path(path: str, *, what: str = "model", flag: str | None = None):
  """A diffusers Stable Diffusion folder (``model_index.json``) or a training workdir, as a bundle.

  Raises:
    FileNotFoundError: ``path`` is empty, missing, or neither kind of folder.
  """
  from jdiff.pipelines import StableDiffusion

  from jdiff.convert import refuse_pickle

  path = os.path.expanduser(path or "")
  if not path:
    raise FileNotFoundError(f"no {what} given: pass {flag or '--' + what} <train.ldm workdir or diffusers folder>")
  refuse_pickle(path, what=what)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{what} {path!r} is neither a train.ldm workdir nor a diffusers folder: it does "
                            "not exist")
  if is_diffusers_folder(path):
    return StableDiffusion.from_diffusers(path)
  if not os.path.exists(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"{what} {path!r} is neither a train.ldm workdir (config.json) nor a diffusers "
                            "folder (model_index.json)")
  return load(path)


def load(workdir: str):
  """The bundle of a ``train.ldm`` / ``train.lora`` / ``train.lcm`` / ``train.ct`` / ``train.controlnet``
  workdir (EMA weights; the kind is read from its ``config.json``).

  Raises:
    FileNotFoundError: no config, VAE or checkpoint; ValueError: a checkpoint of another model.
  """
  config = read_config(workdir)
  if config.get("pretrained"):
    return _load_finetune(workdir, config)
  if "ct" in config:
    return _load_ct(workdir, config)
  if "lcm" in config:
    return _load_lcm(workdir, config)
  if "controlnet" in config:
    return _load_controlnet(workdir, config)
  if "lora" in config:
    return _load_lora(workdir, config)
  if "vae" in config and ("unet" in config or "dit" in config):
    return _load_ldm(workdir, config)
  raise FileNotFoundError(f"{workdir!r} is not a train.ldm, train.lora, train.lcm, train.ct or train.controlnet "
                          "workdir (its config has none of their sections)")


def _with_training(bundle, config):
  s = config.get("sample", None) or {}
  defaults = {**dict(bundle.defaults), **{k: s[k] for k in ("sampler", "num_steps", "guidance_scale") if k in s}}
  data = config.get("data", None)
  return dataclasses.replace(bundle, defaults=defaults, data_config=data if data is not None else bundle.data_config)


def _load_ldm(workdir: str, config):
  pretrained = config.vae.get("pretrained", "")
  vdir = os.path.expanduser(pretrained) if pretrained else os.path.join(workdir, "vae")
  vae, vae_params = load_vae(vdir)
  tokenizer = None
  if os.path.isdir(os.path.join(workdir, "tokenizer")):
    from jdiff.tokenizers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(workdir, "tokenizer"))
  bundle = from_config(config, vae, vae_params, tokenizer=tokenizer)
  expected = jax.eval_shape(lambda k: trained_params(config, bundle, bundle.init_unet(k)), jax.random.key(0))
  params = restore_checked_ema(workdir, expected, what="UNet checkpoint")
  if isinstance(params, Mapping) and set(params) == {"unet", "text"}:
    bundle = dataclasses.replace(bundle, unet_params=params["unet"], text_params=params["text"])
  else:
    bundle = dataclasses.replace(bundle, unet_params=params)
  return dataclasses.replace(bundle, data_config=config.data)


def _load_finetune(workdir: str, config):
  bundle = finetune_bundle(config)
  expected = jax.eval_shape(lambda: trained_params(config, bundle, bundle.unet_params))
  params = restore_checked_ema(workdir, expected, what="UNet checkpoint")
  if isinstance(params, Mapping) and set(params) == {"unet", "text"}:
    bundle = dataclasses.replace(bundle, unet_params=params["unet"], text_params=params["text"])
  else:
    bundle = dataclasses.replace(bundle, unet_params=params)
  return _with_training(bundle, config)


def _load_lora(workdir: str, config):
  base = load_path(config.base, what="base")
  c = config.lora
  opts = dict(rank=int(c.rank), alpha=float(c.alpha or c.rank), targets=lora_targets(c.targets))
  params = base.unet_params
  adapter = jax.eval_shape(lambda: lora.init(params, key=jax.random.key(0), **opts))
  trained = restore_checked_ema(workdir, factors_to_tree(adapter.factors), what="LoRA checkpoint")
  merged = lora.merge(params, tree_to_lora(trained, adapter.scales))
  return _with_training(dataclasses.replace(base, unet_params=merged), config)


def lcm_student(teacher, *, w_dim: int | None, num_ddim_timesteps: int, timestep_scaling: float,
                unet_params: Any = None):
  """The bundle of a latent consistency student of ``teacher``: the teacher's UNet with a
  guidance-scale embedding of width ``w_dim`` (None: the teacher's UNet, e.g. for LCM-LoRA), sampled
  unguided with the LCM sampler on the distillation grid (``num_ddim_timesteps`` points,
  ``timestep_scaling``). ``unet_params`` default to the teacher's.

  Raises:
    ValueError: the teacher UNet has a guidance embedding of another width, or a grid that does not fit.
  """
  from jdiff import consistency

  consistency.skipping_timesteps(teacher.schedule.num_timesteps, int(num_ddim_timesteps))  # validates
  have = teacher.unet.config.time_cond_proj_dim
  if w_dim is not None and have is not None and have != w_dim:
    raise ValueError(f"the teacher UNet already has time_cond_proj_dim={have}; set lcm.w_embedding_dim to it "
                     f"(got {w_dim})")
  unet = teacher.unet
  if w_dim is not None:
    unet = type(teacher.unet)(dataclasses.replace(teacher.unet.config, time_cond_proj_dim=w_dim))
  options = {"original_inference_steps": int(num_ddim_timesteps), "timestep_scaling": float(timestep_scaling)}
  return dataclasses.replace(teacher, unet=unet, unet_params=teacher.unet_params if unet_params is None
                             else unet_params, cfg=False, sampler_options=options,
                             defaults={**dict(teacher.defaults), "sampler": "lcm"})


def _load_lcm(workdir: str, config):
  teacher = load_path(config.teacher, what="teacher")
  c = config.lcm
  common = dict(num_ddim_timesteps=int(c.num_ddim_timesteps), timestep_scaling=float(c.timestep_scaling))
  params = teacher.unet_params
  if c.lora:
    opts = dict(rank=int(c.lora_rank), alpha=float(c.lora_alpha or c.lora_rank), targets=lora_targets(c.lora_targets))
    adapter = jax.eval_shape(lambda: lora.init(params, key=jax.random.key(0), **opts))
    trained = restore_checked_ema(workdir, factors_to_tree(adapter.factors), what="LCM checkpoint")
    student = lcm_student(teacher, w_dim=None, unet_params=lora.merge(params, tree_to_lora(trained, adapter.scales)),
                          **common)
  else:
    w_dim = int(c.w_embedding_dim) or None
    expected = jax.eval_shape(lambda: with_guidance_embedding(params, teacher.unet.config, w_dim))
    trained = restore_checked_ema(workdir, expected, what="LCM checkpoint")
    student = lcm_student(teacher, w_dim=w_dim, unet_params=trained, **common)
  s = config.get("sample", None) or {}
  defaults = {**dict(student.defaults), **{k: s[k] for k in ("num_steps", "guidance_scale") if k in s}}
  data = teacher.data_config if config.data.get("from_teacher", True) and teacher.data_config is not None \
      else config.data
  return dataclasses.replace(student, defaults=defaults, data_config=data)


def _load_ct(workdir: str, config):
  bundle = _load_ldm(workdir, config)  # the VAE of vae.pretrained, the config's text encoder and UNet, EMA weights
  c = config.ct
  grid = consistency.curriculum_sampling_grid(c.get("curriculum", "ct"), int(c.s1), bundle.schedule.num_timesteps)
  model = lcm_student(bundle, w_dim=None, num_ddim_timesteps=grid, timestep_scaling=float(c.timestep_scaling),
                      unet_params=bundle.unet_params)
  s = config.get("sample", None) or {}
  defaults = {**dict(model.defaults), **{k: s[k] for k in ("num_steps", "guidance_scale") if k in s}}
  return dataclasses.replace(model, defaults=defaults)


def with_guidance_embedding(unet_params: Any, unet_config: UNetConfig, w_dim: int | None) -> Any:
  """``unet_params`` plus a zero guidance-embedding kernel ``cond_proj`` [w_dim, C0] (an LCM student
  that starts as its teacher), unless the UNet has one already or ``w_dim`` is None."""
  params = jax.tree.map(jnp.asarray, unet_params)
  if w_dim is not None and unet_config.time_cond_proj_dim is None:
    flat = traverse_util.flatten_dict(params)
    flat[COND_PROJ] = jnp.zeros((w_dim, unet_config.block_out_channels[0]), jnp.float32)
    params = traverse_util.unflatten_dict(flat)
  return params


def _load_controlnet(workdir: str, config):
  base = load_path(config.base, what="base")
  net, init = controlnet_for(base, config.controlnet.conditioning_embedding_out_channels)
  expected = {"controlnet": jax.eval_shape(init, jax.random.key(0))}
  trained = restore_checked_ema(workdir, expected, what="ControlNet checkpoint")
  bundle = dataclasses.replace(base, controlnets=(net,), controlnet_params=(trained["controlnet"],))
  return _with_training(bundle, config)
