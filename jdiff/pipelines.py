"""Text-to-image and image-to-image generation built from jdiff's pieces.

:class:`StableDiffusion` bundles a UNet, a KL autoencoder, a CLIP text encoder (modules and parameter trees),
a tokenizer and the training noise schedule. ``generate`` is tokenize -> encode text -> classifier-free
guidance (:func:`jdiff.guidance.cfg`) -> a registered sampler (:func:`jdiff.samplers.sample`) -> VAE decode,
compiled as ONE XLA program per static configuration (sampler, steps, options) and input shape.
``img2img`` and ``inpaint`` encode images with the VAE, noise them to the first level the strength keeps and
run any sampler from there (its plan cut at that step: :func:`jdiff.samplers.plan`, :func:`jdiff.samplers.cut`);
``invert`` maps images to the noise DDIM brings back to them. LoRA adapters
(``lora=``) are merged into the parameter trees, which are program arguments, so switching adapters
or scales never recompiles. ControlNets (``controlnets``, ``from_diffusers(..., controlnet=...)``)
add their residuals to the UNet's inside the same program (``control_images=`` of ``generate``, ``img2img``
and ``inpaint``; :meth:`StableDiffusion.with_controlnets` attaches nets to any bundle).

Numerics follow diffusers' ``StableDiffusionPipeline``: unconditional embeddings from the empty prompt
(or the negative prompt), guidance only when ``guidance_scale > 1``, latents divided by the VAE's
``scaling_factor`` before decoding, images mapped from [-1, 1] to [0, 1] and clipped.

Example:
  >>> pipe = StableDiffusion.from_diffusers("checkpoints/sd15")  # doctest: +SKIP
  >>> images = pipe.generate(["a red fox in snow"], key=jax.random.key(0), num_steps=20)  # doctest: +SKIP
  >>> images.shape  # doctest: +SKIP
  (1, 512, 512, 3)
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import control_images as _control
from jdiff import diffusion, guidance, samplers, schedules
from jdiff import lora as _lora
from jdiff.convert import _io
from jdiff.convert.text import load_text_encoder
from jdiff.models.controlnet import combine_residuals, guidance_active
from jdiff.schedules import Schedule
from jdiff.tokenizers import ByteTokenizer, CLIPTokenizer

__all__ = ["StableDiffusion", "Control", "schedule_from_config", "sampler_options_from_config", "SCHEDULER_SAMPLERS",
           "sampler_from_scheduler_config", "accepted_options", "static_key", "prompt_lists", "strength_start",
           "image_batch", "latent_multiple"]

# scheduler_config.json keys that define the training schedule rather than a sampler option
_SCHEDULE_KEYS = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "rescale_betas_zero_snr", "prediction_type", "_class_name", "_diffusers_version"}
# diffusers scheduler option name -> jdiff sampler option name, where they differ
_OPTION_ALIASES = {"solver_order": "order", "algorithm_type": "algorithm"}
# diffusers scheduler class -> (the jdiff sampler that runs it, options the class implies); a folder's
# scheduler is its pipelines' default sampler (another class: DDIM)
SCHEDULER_SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DDIMScheduler": ("ddim", {}),
    "DDPMScheduler": ("ddpm", {}),
    "DPMSolverMultistepScheduler": ("dpm_solver", {}),
    "DPMSolverSinglestepScheduler": ("dpm_solver", {"singlestep": True}),
    "EulerDiscreteScheduler": ("euler", {}),
    "EulerAncestralDiscreteScheduler": ("euler_ancestral", {}),
    "HeunDiscreteScheduler": ("heun", {}),
    "UniPCMultistepScheduler": ("unipc", {}),
    "LCMScheduler": ("lcm", {}),
    "FlowMatchEulerDiscreteScheduler": ("flow_euler", {}),
    "FlowMatchHeunDiscreteScheduler": ("flow_heun", {}),
}


def sampler_from_scheduler_config(config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
  """The jdiff sampler and its options for a diffusers ``scheduler_config.json`` dict.

  The class (``_class_name``) picks the sampler (:data:`SCHEDULER_SAMPLERS`); its options keep
  diffusers' names (:func:`sampler_options_from_config`), restricted to those the sampler takes.

  Raises:
    ValueError: a scheduler class without a jdiff sampler.

  Example:
    >>> sampler_from_scheduler_config({"_class_name": "DDIMScheduler", "clip_sample": False})
    ('ddim', {'clip_sample': False})
  """
  name = config.get("_class_name")
  if name not in SCHEDULER_SAMPLERS:
    raise ValueError(f"scheduler {name!r} has no jdiff sampler (supported: {', '.join(SCHEDULER_SAMPLERS)})")
  method, implied = SCHEDULER_SAMPLERS[name]
  return method, {**accepted_options(method, sampler_options_from_config(config)), **implied}


def schedule_from_config(config: Mapping[str, Any]) -> Schedule:
  """The training noise schedule described by a diffusers ``scheduler_config.json`` dict.

  Example:
    >>> sched = schedule_from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085,
    ...                               "beta_end": 0.012, "num_train_timesteps": 1000})
  """
  rescale = bool(config.get("rescale_betas_zero_snr", False))
  if config.get("trained_betas") is not None:
    sched = schedules.from_betas(np.asarray(config["trained_betas"], np.float64))
    return schedules.rescale_zero_terminal_snr(sched) if rescale else sched
  return schedules.make(config.get("beta_schedule", "linear"), int(config.get("num_train_timesteps", 1000)),
                        beta_start=float(config.get("beta_start", 1e-4)),
                        beta_end=float(config.get("beta_end", 0.02)), rescale_zero_snr=rescale)


def sampler_options_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """Sampler options (diffusers names, e.g. ``steps_offset``, ``timestep_spacing``, ``clip_sample``) of a
  scheduler config, renamed where jdiff's names differ (``solver_order`` -> ``order``)."""
  return {_OPTION_ALIASES.get(k, k): v for k, v in config.items() if k not in _SCHEDULE_KEYS}


def accepted_options(method: str | Callable[..., Any], options: Mapping[str, Any]) -> dict[str, Any]:
  """The subset of ``options`` that sampler ``method`` (a registered name or a function) takes as keywords."""
  params = inspect.signature(method if callable(method) else samplers.get(method)).parameters
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
    return dict(options)
  return {k: v for k, v in options.items() if k in params}


def static_key(value: Any) -> Any:
  """``value`` (options: dicts, lists, scalars) as a hashable key of a compiled-program cache."""
  if isinstance(value, (list, tuple)):
    return tuple(static_key(v) for v in value)
  if isinstance(value, dict):
    return tuple(sorted((k, static_key(v)) for k, v in value.items()))
  return value


def prompt_lists(prompts: str | Sequence[str],
                 negative_prompts: str | Sequence[str] | None) -> tuple[list[str], list[str]]:
  """Prompts and their negatives as two lists of equal length (the empty prompt, or one string, repeated)."""
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  if not prompts:
    raise ValueError("prompts is empty")
  if negative_prompts is None:
    return prompts, [""] * len(prompts)
  if isinstance(negative_prompts, str):
    return prompts, [negative_prompts] * len(prompts)
  negative = list(negative_prompts)
  if len(negative) != len(prompts):
    raise ValueError(f"{len(negative)} negative_prompts for {len(prompts)} prompts")
  return prompts, negative


def strength_start(num_steps: int, strength: float) -> tuple[int, int]:
  """(n, the first step kept) of an n-step grid at img2img ``strength``: the last
  ``min(int(n * strength), n)`` steps run, as diffusers' pipelines cut their timesteps."""
  if not 0.0 < float(strength) <= 1.0:
    raise ValueError(f"strength must be in (0, 1], got {strength}")
  n = int(num_steps)
  init_steps = min(int(n * float(strength)), n)
  if init_steps < 1:
    raise ValueError(f"strength={strength} with num_steps={n} leaves no denoising step; raise either")
  return n, n - init_steps


def latent_multiple(config: Any) -> int:
  """What the denoiser with ``config`` needs latent heights and widths to be multiples of: a transformer's
  ``patch_size`` (DiT, MMDiT), a UNet's ``2 ** (levels - 1)`` (one halving per down block after the first)."""
  patch = getattr(config, "patch_size", None)
  if patch:
    return int(patch)
  return 2 ** (len(config.block_out_channels) - 1)


def image_batch(images: Any, channels: int = 3) -> jax.Array:
  """Images as float32 ``[B, H, W, channels]`` in [0, 1].

  Accepts ``[H, W]``, ``[H, W, C]`` or ``[B, H, W, C]`` arrays (or PIL images) with C = 1 (gray:
  replicated to RGB), 3 (RGB) or 4 (RGBA: the alpha channel is not used), uint8 (0-255) or float
  (already in [0, 1]). For a one-channel model (``channels=1``) RGB becomes luma, as PIL's "L" mode
  (0.299 R + 0.587 G + 0.114 B).

  Raises:
    ValueError: another dtype or shape (one line).

  Example:
    >>> image_batch(np.zeros((8, 8), np.uint8)).shape
    (1, 8, 8, 3)
  """
  arr = np.asarray(images)  # host arrays: IEEE division, the same values whatever the input's device
  if arr.dtype == np.uint8:
    arr = arr.astype(np.float32) / np.float32(255.0)
  elif np.issubdtype(arr.dtype, np.floating):
    arr = arr.astype(np.float32)
  else:
    raise ValueError(f"images must be uint8 (0-255) or float ([0, 1]), got dtype {arr.dtype}")
  if arr.ndim == 2:
    arr = arr[None, :, :, None]
  elif arr.ndim == 3:
    arr = arr[None]
  if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
    raise ValueError(f"images must be [H, W], [H, W, C] or [B, H, W, C] with C = 1 (gray), 3 (RGB) or 4 (RGBA), "
                     f"got shape {tuple(arr.shape)}")
  arr = arr[..., :3]  # RGBA: alpha is not used
  if arr.shape[-1] == channels:
    return jnp.asarray(arr)
  if channels == 3:  # gray
    return jnp.asarray(np.repeat(arr, 3, axis=-1))
  if channels == 1:  # RGB -> luma
    return jnp.asarray(arr @ np.asarray([0.299, 0.587, 0.114], np.float32))[..., None]
  raise ValueError(f"images have {arr.shape[-1]} channel(s); the model takes {channels}")


def _per_net(value: Any, n: int, name: str) -> list[Any]:
  """A scalar broadcast to ``n`` ControlNets, or a list of exactly ``n`` values."""
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"{name} has {len(value)} entries for {n} ControlNet(s)")
    return list(value)
  return [value] * n


@dataclasses.dataclass(frozen=True, eq=False)
class Control:
  """A ControlNet as a transformation of the model function (:meth:`StableDiffusion.model_fn`): its
  residuals for control images ``image`` ``[B, H, W, 3]``, times ``scale``, are added to the UNet's.

  Attributes:
    net, params: the ControlNet module and its parameters.
    image: the control images, one per example.
    scale: the residuals' weight: a number, per-example weights ``[B]``, or a function of the
      timesteps ``t [N] -> [N]`` (e.g. diffusers' ``control_guidance_start/end`` windows).
    guess_mode: diffusers' guess mode: residuals scaled from 0.1 (shallowest) to 1 (middle), and
      under classifier-free guidance only the conditional half gets them.

  Example:
    >>> fn = pipe.model_fn(params, ctx, controls=[Control(net, net_params, edges)])  # doctest: +SKIP
  """
  net: Any
  params: Any
  image: jax.Array
  scale: float | jax.Array | Callable[[jax.Array], jax.Array] = 1.0
  guess_mode: bool = False


@dataclasses.dataclass(eq=False)
class StableDiffusion:
  """A latent text-to-image model: modules, parameter trees, tokenizer and schedule.

  Attributes:
    unet, unet_params: the denoiser (:class:`jdiff.models.UNet`) and its parameters.
    vae, vae_params: the autoencoder (:class:`jdiff.models.AutoencoderKL`) and its parameters.
    text_encoder, text_params: the text encoder (:class:`jdiff.models.CLIPTextModel`) and its parameters.
    tokenizer: a :class:`~jdiff.tokenizers.CLIPTokenizer` or :class:`~jdiff.tokenizers.ByteTokenizer`.
    schedule: the training noise schedule.
    prediction: what the UNet predicts: "epsilon", "v" or "sample".
    scaling_factor: latents are divided by this before decoding (0.18215 for SD 1.x/2.x).
    sampler_options: default sampler options (diffusers names) from the scheduler config; each sampler
      receives the ones it accepts, and ``generate``'s own keyword options override them.
    clip_skip: use the text encoder's output this many blocks before the last (diffusers' ``clip_skip``).
    controlnets, controlnet_params: ControlNet modules (:class:`jdiff.models.ControlNet`) and their
      parameter trees, one per net; empty for plain text-to-image.
    shift_factor: subtracted from VAE latents before scaling (0 for SD 1.x/2.x).
    image_size: default image height/width (None: the UNet's ``sample_size`` times the VAE factor).
    cfg: whether a guidance scale means classifier-free guidance (False for consistency-distilled
      models, sampled unguided; a UNet with a guidance embedding takes the scale as ``timestep_cond``).
    defaults: the generation defaults of a trained run (``sampler``, ``num_steps``, ``guidance_scale``).
    data_config: the data section of the training run that produced the model (None otherwise).
    scheduler_config: the diffusers ``scheduler_config.json`` dict the schedule was built from (written
      back by :meth:`save_pretrained`).
    source: the diffusers folder the bundle was loaded from (None otherwise).

  Pure pieces for trainers and research code: :meth:`tokenize`, :meth:`null_ids`, :meth:`encode_text`,
  :meth:`encode_images`, :meth:`decode`, :meth:`init_unet`, :meth:`model_fn`, :meth:`sample`.
  Constructors: :meth:`from_diffusers` (a diffusers folder), :meth:`from_workdir` (a training workdir,
  :mod:`jdiff.ldm`).

  Example:
    >>> pipe = StableDiffusion.from_diffusers("sd15")  # doctest: +SKIP
    >>> imgs = pipe.generate(["a cat"], key=jax.random.key(1), num_steps=25, sampler="dpm_solver")  # doctest: +SKIP
  """
  unet: Any
  unet_params: Any
  vae: Any
  vae_params: Any
  text_encoder: Any
  text_params: Any
  tokenizer: CLIPTokenizer | ByteTokenizer
  schedule: Schedule
  prediction: str = "epsilon"
  scaling_factor: float = 0.18215
  sampler_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  clip_skip: int = 0
  controlnets: Sequence[Any] = ()
  controlnet_params: Sequence[Any] = ()
  shift_factor: float = 0.0
  image_size: int | None = None
  cfg: bool = True
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  data_config: Any = None
  scheduler_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  source: str | None = None
  _programs: dict = dataclasses.field(default_factory=dict, init=False, repr=False)
  _loras: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

  def __post_init__(self):
    self.prediction = diffusion.check_prediction(self.prediction)
    self.controlnets, self.controlnet_params = tuple(self.controlnets), tuple(self.controlnet_params)
    # device arrays once (not numpy re-sent every call); LoRA-merged trees are device arrays too, so the
    # jitted programs see the same argument kinds with and without adapters (no recompilation)
    as_device = lambda tree: jax.tree.map(jnp.asarray, tree)
    self.unet_params, self.vae_params = as_device(self.unet_params), as_device(self.vae_params)
    self.text_params = as_device(self.text_params)
    self.controlnet_params = tuple(as_device(p) for p in self.controlnet_params)
    if len(self.controlnets) != len(self.controlnet_params):
      raise ValueError(f"{len(self.controlnets)} ControlNets but {len(self.controlnet_params)} parameter trees")

  @classmethod
  def from_diffusers(cls, path: str | os.PathLike, *, dtype: str | None = None, clip_skip: int = 0,
                     controlnet: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> StableDiffusion:
    """Loads a diffusers Stable Diffusion folder (``model_index.json`` with ``unet/``, ``vae/``,
    ``text_encoder/``, ``tokenizer/``, ``scheduler/``); safetensors only, no torch. A folder whose
    ``model_index.json`` names an SDXL pipeline loads as :class:`jdiff.sdxl.StableDiffusionXL`, an SD3 one as
    :class:`jdiff.sd3_pipeline.StableDiffusion3`.

    Args:
      path: the pipeline folder.
      dtype: compute dtype of the three networks ("bfloat16"); parameters stay float32.
      clip_skip: see the class attributes.
      controlnet: a diffusers ``ControlNetModel`` folder, or a list of them (several nets at once).

    Raises:
      FileNotFoundError: the folder or one of its parts is missing.
      ValueError: an unsupported config or a missing / mis-shaped tensor (named).

    Example:
      >>> pipe = StableDiffusion.from_diffusers("checkpoints/sd21", dtype="bfloat16")  # doctest: +SKIP
      >>> canny_pipe = StableDiffusion.from_diffusers("sd15", controlnet="sd-controlnet-canny")  # doctest: +SKIP
    """
    from jdiff.convert import load_unet, load_vae  # the model converters import heavier modules
    from jdiff.convert.controlnet import load_controlnets

    root = Path(path)
    _io.refuse_pickle(root, what="pipeline")  # a single .ckpt file is named as what it is
    if not root.is_dir():
      raise FileNotFoundError(f"diffusers pipeline folder {str(root)!r} does not exist")
    index = _io.read_config(root, name="model_index.json")
    if str(index.get("_class_name", "")).startswith("StableDiffusionXL"):  # two text encoders: the subclass
      from jdiff.sdxl import StableDiffusionXL
      return StableDiffusionXL.from_diffusers(root, dtype=dtype, clip_skip=clip_skip, controlnet=controlnet)
    if str(index.get("_class_name", "")).startswith("StableDiffusion3"):  # an MMDiT and two encoders: the subclass
      from jdiff.sd3_pipeline import StableDiffusion3
      return StableDiffusion3.from_diffusers(root, dtype=dtype, clip_skip=clip_skip, controlnet=controlnet)
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
      if part not in index:
        raise ValueError(f"{str(root / 'model_index.json')!r} lists no {part!r}; is this a Stable Diffusion "
                         "pipeline?")
      if not (root / part).is_dir():
        raise FileNotFoundError(f"pipeline part {str(root / part)!r} does not exist")
    sched_config = _io.read_config(root / "scheduler", name="scheduler_config.json")
    method, implied = SCHEDULER_SAMPLERS.get(sched_config.get("_class_name"), ("ddim", {}))
    unet, unet_params = load_unet(root / "unet", dtype=dtype)
    vae, vae_params = load_vae(root / "vae", dtype=dtype)
    c, c_in = int(vae.config.latent_channels), int(unet.config.in_channels)
    if c_in not in (c, 2 * c + 1):
      raise ValueError(f"{str(root / 'unet')!r} takes {c_in} input channels; with the VAE's {c} latent channels a "
                       f"UNet takes {c} (text-to-image) or {2 * c + 1} (inpainting)")
    text, text_params = load_text_encoder(root / "text_encoder", dtype=dtype)
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    nets, net_params = (), ()
    if controlnet is not None:
      nets, net_params = load_controlnets(controlnet, unet.config, dtype=dtype)
    return cls(unet=unet, unet_params=unet_params, vae=vae, vae_params=vae_params, text_encoder=text,
               text_params=text_params, tokenizer=tokenizer, schedule=schedule_from_config(sched_config),
               prediction=sched_config.get("prediction_type", "epsilon"),
               scaling_factor=float(vae.config.scaling_factor), shift_factor=float(vae.config.shift_factor or 0.0),
               sampler_options={**sampler_options_from_config(sched_config), **implied}, clip_skip=clip_skip,
               controlnets=tuple(nets), controlnet_params=tuple(net_params), scheduler_config=sched_config,
               defaults={"sampler": method}, source=os.fspath(root))

  @classmethod
  def from_workdir(cls, workdir: str | os.PathLike) -> StableDiffusion:
    """Loads a training workdir of ``train.ldm``, ``train.lora``, ``train.lcm`` or ``train.controlnet``
    (EMA weights; see :func:`jdiff.ldm.load`).

    Raises:
      FileNotFoundError: no ``config.json``, VAE or checkpoint; ValueError: a checkpoint of another model.

    Example:
      >>> pipe = StableDiffusion.from_workdir("workdir/ldm_digits")  # doctest: +SKIP
    """
    from jdiff import ldm

    return ldm.load(os.fspath(workdir))

  @classmethod
  def from_single_file(cls, path: str | os.PathLike, *, family: str | None = None,
                       config: str | os.PathLike | None = None, tokenizer: Any = None,
                       dtype: str | None = None) -> StableDiffusion:
    """Loads an original-layout single ``.safetensors`` checkpoint (SD 1.x / 2.x), given its model
    ``family`` ("sd15", "sd21", "sd21-base"; then a ``tokenizer``) or a diffusers folder ``config``
    (:func:`jdiff.convert.single_file.load_single_file_bundle`). Pickled ``.ckpt`` files are refused. A file
    with SDXL's ``conditioner.embedders.*`` text encoders loads as :class:`jdiff.sdxl.StableDiffusionXL`
    (:meth:`jdiff.sdxl.StableDiffusionXL.from_single_file`; ``tokenizer`` is then the first encoder's).

    Example:
      >>> pipe = StableDiffusion.from_single_file("v1-5.safetensors", config="sd15_folder")  # doctest: +SKIP
    """
    from jdiff.convert.single_file import is_sdxl_file, load_single_file_bundle

    if is_sdxl_file(path):
      from jdiff.sdxl import StableDiffusionXL
      return StableDiffusionXL.from_single_file(path, family=family, config=config, tokenizer=tokenizer,
                                                dtype=dtype)
    return load_single_file_bundle(path, family=family, config=config, tokenizer=tokenizer, dtype=dtype)

  def save_single_file(self, path: str | os.PathLike, *, family: str | None = None,
                       dtype: str = "float32") -> Path:
    """Writes the UNet, VAE and text encoder(s) as one original-layout ``.safetensors`` file
    (:func:`jdiff.convert.single_file.save_single_file_bundle`; an SDXL bundle in SDXL's layout)."""
    from jdiff.convert.single_file import save_single_file_bundle

    return save_single_file_bundle(self, path, family=family, dtype=dtype)

  def with_controlnets(self, controlnet: str | os.PathLike | Sequence[str | os.PathLike], *,
                       dtype: str | None = None) -> StableDiffusion:
    """A copy of this bundle whose ControlNets are the diffusers ``ControlNetModel`` folder(s)
    ``controlnet`` (replacing any it holds), computing in ``dtype`` (default: the UNet's), whatever the
    bundle was loaded from (a single file, a training workdir).

    Raises:
      FileNotFoundError: a missing folder; ValueError: a net whose widths differ from the UNet's.

    Example:
      >>> pipe = StableDiffusion.from_single_file("v1-5.safetensors", config="sd15")  # doctest: +SKIP
      >>> canny_pipe = pipe.with_controlnets("sd-controlnet-canny")  # doctest: +SKIP
    """
    from jdiff.convert.controlnet import load_controlnet

    dtype = getattr(self.unet.config, "dtype", None) if dtype is None else dtype
    nets, params = [], []
    for folder in [controlnet] if isinstance(controlnet, (str, os.PathLike)) else list(controlnet):
      if not Path(folder).is_dir():
        raise FileNotFoundError(f"ControlNet folder {str(folder)!r} does not exist")
      net, p = load_controlnet(folder, dtype=dtype)
      if net.config.unet.block_out_channels != self.unet.config.block_out_channels:
        raise ValueError(f"ControlNet {str(folder)!r} has block_out_channels {net.config.unet.block_out_channels}, "
                         f"the UNet {self.unet.config.block_out_channels}")
      nets.append(net)
      params.append(p)
    return dataclasses.replace(self, controlnets=tuple(nets), controlnet_params=tuple(params))

  def load_textual_inversion(self, path: str | os.PathLike, *, token: str | None = None) -> StableDiffusion:
    """A copy of this bundle with a textual-inversion embedding (safetensors) added to its tokenizer
    and text encoder (:func:`jdiff.textual_inversion.load_textual_inversion`).

    Example:
      >>> pipe = pipe.load_textual_inversion("cat-toy.safetensors", token="<cat-toy>")  # doctest: +SKIP
    """
    from jdiff.textual_inversion import load_textual_inversion

    return load_textual_inversion(self, path, token=token)

  def save_pretrained(self, folder: str | os.PathLike, *, copy_from: str | os.PathLike | None = None,
                      copy_parts: Sequence[str] = ()) -> Path:
    """Writes a diffusers Stable Diffusion folder that ``StableDiffusionPipeline.from_pretrained`` and
    :meth:`from_diffusers` load: ``unet/``, ``vae/``, ``text_encoder/`` from this bundle's parameter
    trees, ``tokenizer/``, ``scheduler/`` (:attr:`scheduler_config`) and ``model_index.json``.

    Args:
      folder: the output folder (created; parts already there are replaced).
      copy_from: a diffusers folder (default :attr:`source`) whose ``copy_parts`` are copied byte for byte
        instead of written (a fine-tune's frozen VAE and text encoder), together with its
        ``model_index.json`` and any part this bundle does not hold (safety checker, feature extractor).
      copy_parts: which of "vae", "text_encoder", "tokenizer", "scheduler" to copy.

    Raises:
      ValueError: a part that has no diffusers layout (a byte tokenizer, a UNet conditioned on pooled text
        through its class embedding, ControlNets), or an unknown part name.

    Example:
      >>> pipe.save_pretrained("out/sd15-finetuned", copy_parts=("vae", "text_encoder", "tokenizer"))  # doctest: +SKIP
    """
    import shutil

    from jdiff.convert import save_unet, save_vae
    from jdiff.convert.text import save_text_encoder
    from jdiff.ldm import TextUNet

    known = ("vae", "text_encoder", "tokenizer", "scheduler")
    unknown = sorted(set(copy_parts) - set(known))
    if unknown:
      raise ValueError(f"unknown pipeline parts {unknown}; expected some of {known}")
    src = Path(copy_from if copy_from is not None else self.source) if (copy_from or self.source) else None
    if copy_parts and src is None:
      raise ValueError("copy_parts needs copy_from (or a bundle loaded from a diffusers folder)")
    if isinstance(self.tokenizer, ByteTokenizer) and "tokenizer" not in copy_parts:
      raise ValueError("a byte-tokenizer model has no diffusers layout (diffusers pipelines take a CLIP BPE "
                       "tokenizer); train an SD-layout config, e.g. configs/ldm_digits_sd.py")
    if isinstance(self.unet, TextUNet) and self.unet.config.class_embed_type:
      raise ValueError(f"a UNet with class_embed_type={self.unet.config.class_embed_type!r} reading the pooled "
                       "text has no Stable Diffusion layout (the pipeline passes no class labels)")
    if self.controlnets:
      raise ValueError("save the ControlNets on their own (jdiff.convert.controlnet.save_controlnet)")
    if not self.scheduler_config and "scheduler" not in copy_parts:
      raise ValueError("the bundle has no scheduler_config to write")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.31.0",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", self.scheduler_config.get("_class_name", "DDIMScheduler")],
             "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    if src is not None and copy_parts:
      index = _io.read_config(src, name="model_index.json")
      for part, spec in index.items():
        holds = isinstance(spec, list) and spec and spec[0] is not None
        if holds and (part in copy_parts or part not in known + ("unet",)) and (src / part).is_dir():
          shutil.rmtree(out / part, ignore_errors=True)
          shutil.copytree(src / part, out / part)
    # the bundle's own parts
    unet_config = self.unet.config
    if self.image_size:  # diffusers' default resolution is the UNet's sample_size times the VAE factor
      unet_config = dataclasses.replace(unet_config, sample_size=int(self.image_size) // self.vae_factor)
    save_unet(unet_config, self.unet_params, out / "unet")  # the config files hold no compute dtype
    if "vae" not in copy_parts:
      save_vae(self.vae.config, self.vae_params, out / "vae")
    if "text_encoder" not in copy_parts:
      save_text_encoder(self.text_encoder.config, self.text_params, out / "text_encoder")
    if "tokenizer" not in copy_parts:
      self.tokenizer.save_pretrained(out / "tokenizer")
    if "scheduler" not in copy_parts:
      _io.write_config(out / "scheduler", self.scheduler_config, name="scheduler_config.json")
    _io.write_config(out, index, name="model_index.json")
    return out

  # ---- pieces (pure functions of parameter trees: jit them, differentiate them, train with them) ----

  @property
  def latent_channels(self) -> int:
    """Channels of the latents (the VAE's; an inpainting UNet takes more inputs)."""
    return int(self.vae.config.latent_channels)

  @property
  def vae_factor(self) -> int:
    return int(self.vae.config.downsample_factor)

  @property
  def default_size(self) -> int:
    """Default image height/width: ``image_size`` when set, else the UNet's ``sample_size`` times the
    VAE's downsampling factor."""
    if self.image_size:
      return int(self.image_size)
    return int(self.unet.config.sample_size) * self.vae_factor

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    """(h, w, C) of the latents at the default size."""
    h = self.default_size // self.vae_factor
    return (h, h, self.latent_channels)

  @property
  def guidance_embedding_dim(self) -> int | None:
    """The width of the UNet's guidance-scale embedding (a guidance-distilled model), or None."""
    return self.unet.config.time_cond_proj_dim

  def tokenize(self, text: str | Sequence[str]) -> np.ndarray:
    """Token ids: ``[L]`` for one string, ``[B, L]`` for a sequence of strings (numpy int32)."""
    if isinstance(text, str):
      return np.asarray(self.tokenizer([text]))[0]
    return np.asarray(self.tokenizer(list(text)))

  def null_ids(self) -> jax.Array:
    """Token ids ``[1, L]`` of the empty prompt (the unconditional text of classifier-free guidance)."""
    return jnp.asarray(self.tokenize(""))[None]

  def encode_text(self, text_params: Any, ids: jax.Array) -> jax.Array:
    """Token ids ``[B, L]`` -> the UNet's ``encoder_hidden_states`` ``[B, L, D]`` (``clip_skip`` applied)."""
    out = self.text_encoder.apply({"params": text_params}, ids, clip_skip=self.clip_skip)
    return out.last_hidden_state  # [B, L, D]

  def encode_prompts(self, prompts: Sequence[str]) -> jax.Array:
    """Text embeddings ``[B, L, D]`` of prompts (the UNet's ``encoder_hidden_states``)."""
    return self.encode_text(self.text_params, jnp.asarray(self.tokenizer(list(prompts))))

  # ---- the text conditioning of training batches ----

  @property
  def batch_condition_keys(self) -> tuple[str, ...]:
    """The entries of a training batch :meth:`encode_batch` reads: ``("tokens",)`` (SDXL adds the loader's
    ``original_size`` and ``crops_coords_top_left``)."""
    return ("tokens",)

  def batch_tokenize(self, text: str | Sequence[str]) -> np.ndarray:
    """``caption(s) -> token ids`` as a training batch holds them: ``[L]`` for one string, ``[B, L]`` for
    a list (:meth:`tokenize`)."""
    return self.tokenize(text)

  def batch_null_tokens(self) -> jax.Array:
    """The empty prompt's ids as :meth:`batch_tokenize` lays them out, ``[1, L]`` (:meth:`null_ids`), the
    caption-dropout target of a training step."""
    return self.null_ids()

  def all_text_params(self, text_params: Any = None) -> Any:
    """The text parameters :meth:`encode_text` takes for every encoder (``text_params`` replaces the
    first encoder's; here the only one)."""
    return self.text_params if text_params is None else text_params

  def encode_batch(self, text_params: Any, tokens: jax.Array, batch: Mapping[str, Any]) -> Any:
    """The UNet's context for a training batch: :meth:`encode_text` of ``tokens`` ``[B, L]`` (the batch's
    ``"tokens"``, possibly dropped to :meth:`batch_null_tokens`), ``[B, L, D]``. ``batch`` supplies the
    other entries of :attr:`batch_condition_keys` (none here)."""
    del batch
    return self.encode_text(text_params, tokens)

  def encode_images(self, vae_params: Any, images: jax.Array, *, key: jax.Array | None = None,
                    sample: bool | jax.Array = True) -> jax.Array:
    """Images ``[B, H, W, C]`` in [-1, 1] -> latents as the UNet sees them, ``(z - shift) * scaling``
    ``[B, h, w, C_latent]``, with ``z`` a posterior sample drawn with ``key`` (or, where the possibly
    traced flag ``sample`` is false, the posterior mean)."""
    posterior = self.vae.apply({"params": vae_params}, images, method=self.vae.encode)
    if sample is True:
      z = posterior.sample(key=key)
    elif sample is False:
      z = posterior.mode()
    else:
      z = jnp.where(sample, posterior.sample(key=key), posterior.mode())
    return self.scale_latents(z)

  def scale_latents(self, z: jax.Array) -> jax.Array:
    """VAE latents ``z`` -> the UNet's latents ``(z - shift) * scaling`` ``[B, h, w, C]``."""
    if self.shift_factor:
      z = z - self.shift_factor
    return z * self.scaling_factor  # [B, h, w, C]

  def encode_moments(self, vae_params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images ``[B, H, W, C]`` in [-1, 1] -> the VAE posterior's (mean, logvar) ``[B, h, w, C_latent]`` (what
    :func:`jdiff.data.precompute` stores; :func:`jdiff.data.sample_latents` draws from them)."""
    posterior = self.vae.apply({"params": vae_params}, images, method=self.vae.encode)
    return posterior.mean, posterior.logvar

  def decode(self, vae_params: Any, latents: jax.Array) -> jax.Array:
    """Latents ``[B, h, w, C]`` (as the UNet sees them) -> float32 images ``[B, H, W, C_img]`` in [-1, 1]."""
    z = latents / self.scaling_factor
    if self.shift_factor:
      z = z + self.shift_factor
    images = self.vae.apply({"params": vae_params}, z, method=self.vae.decode)
    return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)

  def init_unet(self, key: jax.Array) -> Any:
    """Fresh UNet parameters for this bundle's latents and text width (trainers start from these)."""
    h, w, _ = self.latent_shape
    c = int(self.unet.config.in_channels)
    length = int(self.tokenize("").shape[0])
    ctx = jnp.zeros((1, length, self.unet.config.per_block("cross_attention_dim")[0]), jnp.float32)
    return self.unet.init(key, jnp.zeros((1, h, w, c), jnp.float32), jnp.zeros((1,), jnp.int32), ctx)["params"]

  def model_fn(self, unet_params: Any, context: Any, *, null_context: Any = None,
               guidance_scale: float | jax.Array | None = None, guidance_rescale: float = 0.0,
               timestep_cond: jax.Array | None = None, controls: Sequence[Control] = (),
               concat: jax.Array | None = None, lora: _lora.LoRA | None = None, lora_scale: float = 1.0,
               lora_dropout: float = 0.0, key: jax.Array | None = None) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The denoiser as ``model_fn(x_t [B, h, w, C], t [B]) -> output`` for text ``context [B, L, D]``.

    ``context`` may also be a dict ``{"text": [B, L, D], **more}`` whose other entries are further UNet
    inputs (SDXL's pooled ``text_embeds`` and ``time_ids``); ``null_context`` then has the same keys.

    Each option is a transformation of the plain UNet call: ``lora`` merges an adapter into
    ``unet_params`` (:func:`jdiff.lora.merge`, with rank dropout ``lora_dropout`` keyed by ``key``);
    ``controls`` add ControlNet residuals (:class:`Control`, summed over nets; the nets see ``x_t``);
    ``concat`` ``[B, h, w, C']`` is appended to ``x_t`` on the channel axis (an inpainting UNet's mask
    and masked-image latents); ``guidance_scale`` with ``null_context`` ``[1 or B, L, D]`` wraps the
    result in classifier-free guidance (:func:`jdiff.guidance.cfg`, one doubled batch, with
    ``guidance_rescale``); ``timestep_cond`` ``[B, d]`` feeds a guidance-scale embedding (unguided
    calls only).

    Example:
      >>> fn = pipe.model_fn(pipe.unet_params, ctx, null_context=null, guidance_scale=3.0)  # doctest: +SKIP
      >>> loss = diffusion.loss(pipe.model_fn(params, ctx), pipe.schedule, z, key=key)  # doctest: +SKIP
    """
    from jdiff.ldm import class_kwargs

    if lora is not None:
      unet_params = _lora.merge(unet_params, lora, lora_scale, dropout=lora_dropout,
                                key=key if lora_dropout else None)
    extra = {} if timestep_cond is None else {"timestep_cond": timestep_cond}
    if guidance_scale is not None and timestep_cond is not None:
      raise ValueError("timestep_cond (a guidance embedding) and classifier-free guidance exclude each other")
    controls = tuple(controls)

    def apply(x, t, c):
      # t [N] with N = B (or 2B under guidance); c["on"] [N] is 0 where guess mode drops the residuals
      t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
      kwargs = dict(extra)
      if controls:
        outputs, weights = [], []
        for k, ctl in enumerate(controls):
          outputs.append(ctl.net.apply({"params": ctl.params}, x, t, c["text"], c["images"][k],
                                       guess_mode=ctl.guess_mode, **class_kwargs(self.unet.config, c["text"]),
                                       **c["added"]))
          w = ctl.scale(t) if callable(ctl.scale) else ctl.scale
          weights.append((w * c["on"]).reshape((-1, 1, 1, 1)))  # [N, 1, 1, 1]
        kwargs["down_residuals"], kwargs["mid_residual"] = combine_residuals(outputs, weights)
      x_in = x if concat is None else jnp.concatenate([x, c["concat"].astype(x.dtype)], axis=-1)
      return self.unet.apply({"params": unet_params}, x_in, t, c["text"], **kwargs, **c["added"])

    def split(ctx):
      if ctx is None or not isinstance(ctx, Mapping):
        return ctx, {}
      return ctx["text"], {k: v for k, v in ctx.items() if k != "text"}

    context, added = split(context)
    null_context, null_added = split(null_context)
    if null_context is not None and set(null_added) != set(added):
      raise ValueError(f"null_context has UNet inputs {sorted(null_added)}, context {sorted(added)}")
    b = context.shape[0]
    cond = {"text": context, "added": added}
    uncond = None if null_context is None else {"text": null_context, "added": null_added}
    if concat is not None:
      if concat.ndim != 4 or concat.shape[0] != b:
        raise ValueError(f"concat must be [B={b}, h, w, C'], got shape {concat.shape}")
      cond["concat"] = concat
      if uncond is not None:
        uncond["concat"] = concat
    if controls:
      images = tuple(ctl.image for ctl in controls)
      cond.update(images=images, on=jnp.ones((b,), jnp.float32))
      if uncond is not None:
        # diffusers' guess mode runs the ControlNets on the conditional half only (zeros for the other)
        on_uncond = (jnp.zeros if any(ctl.guess_mode for ctl in controls) else jnp.ones)((b,), jnp.float32)
        uncond.update(images=images, on=on_uncond)
    if guidance_scale is None:
      return lambda x, t: apply(x, t, cond)
    if null_context is None:
      raise ValueError("classifier-free guidance needs null_context (the empty prompt's embedding)")
    return guidance.cfg(apply, cond, uncond, guidance_scale, guidance_rescale=guidance_rescale)

  def guidance_kwargs(self, text_params: Any, batch: int, guidance_scale: float | jax.Array | None,
                      neg_ids: jax.Array | None = None) -> dict[str, Any]:
    """How this model takes a guidance scale, as :meth:`model_fn` keywords: classifier-free guidance
    against the empty (or ``neg_ids``) prompt; the scale embedding ``w = scale - 1`` of a
    guidance-distilled UNet; nothing for a model sampled unguided (``cfg`` false) or a None scale."""
    if guidance_scale is None:
      return {}
    if self.guidance_embedding_dim:
      from jdiff.consistency import guidance_scale_embedding

      w = jnp.broadcast_to(jnp.asarray(guidance_scale, jnp.float32) - 1.0, (batch,))
      return {"timestep_cond": guidance_scale_embedding(w, self.guidance_embedding_dim)}
    if not self.cfg:
      return {}
    null = self.encode_text(text_params, self.null_ids() if neg_ids is None else neg_ids)
    return {"null_context": null, "guidance_scale": guidance_scale}

  def sample(self, unet_params: Any, ids: jax.Array, noise: jax.Array, *, key: jax.Array | None = None,
             guidance_scale: float | jax.Array | None = None, guidance_rescale: float = 0.0,
             sampler: str | None = None, num_steps: int | None = None, neg_ids: jax.Array | None = None,
             text_params: Any = None,
             vae_params: Any = None, controls: Sequence[Control] = (), **options: Any) -> jax.Array:
    """Pure generation (jit it): token ids ``[B, L]`` and initial noise ``[B, h, w, C]`` -> images
    ``[B, H, W, C_img]`` in [-1, 1].

    Args:
      unet_params: the denoiser's parameters (e.g. a trainer's EMA tree).
      ids, noise: the prompts' token ids and the starting latents x_T.
      key: the sampler's key (stochastic samplers); None for deterministic ones.
      guidance_scale: see :meth:`guidance_kwargs` (classifier-free guidance at any scale, even <= 1).
      guidance_rescale: guidance rescale weight (with classifier-free guidance).
      sampler, num_steps: default ``defaults["sampler"]`` / ``defaults["num_steps"]`` (else ddim, 25).
      neg_ids: unconditional prompts' ids (default: the empty prompt).
      text_params, vae_params: default the bundle's own.
      controls: ControlNets (:class:`Control`) applied in every model call.
      **options: sampler options over the bundle's ``sampler_options``.
    """
    text_params = self.text_params if text_params is None else text_params
    vae_params = self.vae_params if vae_params is None else vae_params
    sampler = sampler or self.defaults.get("sampler", "ddim")
    num_steps = int(num_steps or self.defaults.get("num_steps", 25))
    context = self.encode_text(text_params, ids)  # [B, L, D]
    guide = self.guidance_kwargs(text_params, noise.shape[0], guidance_scale, neg_ids)
    if "null_context" in guide:
      guide["guidance_rescale"] = guidance_rescale
    fn = self.model_fn(unet_params, context, controls=controls, **guide)
    z0 = samplers.sample(sampler, fn, self.schedule, noise, num_steps=num_steps, key=key, prediction=self.prediction,
                         **{**accepted_options(sampler, self.sampler_options), **options})
    return self.decode(vae_params, z0)

  def _model_fn(self, params, ids, neg_ids, scale, guided: bool, *, rescale=0.0, control=None,
                guess_mode: bool = False, timesteps=None, concat=None) -> Callable[[jax.Array, jax.Array], jax.Array]:
    unet_params, _, text_params, cn_params = params
    cond = self.encode_text(text_params, ids)  # [B, L, D]
    kwargs: dict[str, Any] = {"concat": concat}
    if self.guidance_embedding_dim:
      kwargs.update(self.guidance_kwargs(text_params, ids.shape[0], scale))
    elif guided:
      kwargs.update(null_context=self.encode_text(text_params, neg_ids), guidance_scale=scale,
                    guidance_rescale=rescale)
    if control is not None:
      kwargs["controls"] = self._controls(cn_params, control, guess_mode, timesteps)
    return self.model_fn(unet_params, cond, **kwargs)

  def _controls(self, cn_params, control, guess_mode: bool, timesteps) -> list[Control]:
    """One :class:`Control` per net for :meth:`_control_inputs`' ``control``, each weighted by its scale at
    the steps of its window on the sampler grid's ``timesteps`` [n] and 0 elsewhere."""
    active = control["active"]  # [nets, n]: whether net k acts at step i of the grid

    def window(k):  # net k's weight at model timesteps t [N]
      def scale_at(t):
        hit = jnp.asarray(t, timesteps.dtype)[:, None] == timesteps[None, :]  # [N, n]
        return control["scales"][k] * jnp.any(hit & active[k][None, :], axis=1).astype(jnp.float32)
      return scale_at

    return [Control(net, p, control["images"][k], window(k), guess_mode)
            for k, (net, p) in enumerate(zip(self.controlnets, cn_params))]

  def _start(self, schedule, method: str, num_steps: int, start_step: int, options: dict[str, Any]):
    """The plan of ``method`` (:func:`jdiff.samplers.plan`) and its grid cut at ``start_step``."""
    plan = samplers.plan(method, schedule, num_steps, prediction=self.prediction, **options)
    return plan, samplers.cut(plan.grid, start_step)

  def _program(self, kind: str, method: str, num_steps: int, guided: bool, options: dict[str, Any],
               extra: tuple = ()) -> Callable[..., jax.Array]:
    """The jitted program for one static configuration (jax.jit adds one compilation per shape)."""
    cache_key = (kind, method, num_steps, guided, static_key(options), extra)
    if cache_key in self._programs:
      return self._programs[cache_key]

    if kind == "txt2img":
      guess_mode, = extra

      def run(params, schedule, ids, neg_ids, latents, scale, rescale, key, control):
        timesteps = None
        if control is not None:
          timesteps = samplers.plan(method, schedule, num_steps, prediction=self.prediction, **options).grid.timesteps
        model_fn = self._model_fn(params, ids, neg_ids, scale, guided, rescale=rescale, control=control,
                                  guess_mode=guess_mode, timesteps=timesteps)
        z0 = samplers.sample(method, model_fn, schedule, latents, num_steps=num_steps, key=key,
                             prediction=self.prediction, **options)
        return self.decode(params[1], z0) * 0.5 + 0.5  # [B, H, W, 3] in [0, 1]
    elif kind == "img2img":
      start_step, guess_mode = extra

      def run(params, schedule, ids, neg_ids, images, noise, scale, rescale, key, sample_posterior, control):
        encode_key, sample_key = jax.random.split(key)
        z = self.encode_images(params[1], images * 2.0 - 1.0, key=encode_key, sample=sample_posterior)
        plan, g = self._start(schedule, method, num_steps, start_step, options)
        model_fn = self._model_fn(params, ids, neg_ids, scale, guided, rescale=rescale, control=control,
                                  guess_mode=guess_mode, timesteps=g.timesteps)
        z0 = samplers.solve(model_fn, g, g.alpha[0] * z + g.sigma[0] * noise, plan.rule, key=sample_key)
        return self.decode(params[1], z0) * 0.5 + 0.5  # [B, H, W, 3] in [0, 1]
    elif kind == "inpaint":
      start_step, guess_mode = extra
      inpainting_unet = self.unet.config.in_channels != self.latent_channels
      f = self.vae_factor

      def run(params, schedule, ids, neg_ids, images, masks, noise, scale, rescale, key, sample_posterior, control):
        encode_key, masked_key, sample_key = jax.random.split(key, 3)
        plan, g = self._start(schedule, method, num_steps, start_step, options)
        mask_latents = masks[:, ::f, ::f, :]  # [B, h, w, 1]: nearest resize, as torch's interpolate
        pixels = images * 2.0 - 1.0
        need_image = not inpainting_unet or start_step > 0
        z = self.encode_images(params[1], pixels, key=encode_key, sample=sample_posterior) if need_image else None
        x = noise * plan.noise_scale if start_step == 0 else g.alpha[0] * z + g.sigma[0] * noise
        rule, concat = plan.rule, None
        if inpainting_unet:  # the mask and the masked image's latents are inputs of the UNet
          masked = self.encode_images(params[1], pixels * (masks < 0.5), key=masked_key, sample=sample_posterior)
          concat = jnp.concatenate([mask_latents, masked], axis=-1)
        else:  # the known region is pinned to the image latents after every step
          rule = samplers.masked_rule(rule, z, noise, mask_latents)
        model_fn = self._model_fn(params, ids, neg_ids, scale, guided, rescale=rescale, concat=concat,
                                  control=control, guess_mode=guess_mode, timesteps=g.timesteps)
        z0 = samplers.solve(model_fn, g, x, rule, key=sample_key)
        return self.decode(params[1], z0) * 0.5 + 0.5
    else:
      raise ValueError(f"unknown program kind {kind!r}")
    program = jax.jit(run)
    self._programs[cache_key] = program
    return program

  def _defaults(self, num_steps, guidance_scale, sampler) -> tuple[int, float, str]:
    """``generate``'s None arguments from :attr:`defaults`, else diffusers' pipeline defaults."""
    num_steps = int(self.defaults.get("num_steps", 50) if num_steps is None else num_steps)
    guidance_scale = float(self.defaults.get("guidance_scale", 7.5) if guidance_scale is None else guidance_scale)
    sampler = str(self.defaults.get("sampler", "ddim") if sampler is None else sampler)
    return num_steps, guidance_scale, sampler

  def _guided(self, guidance_scale: float) -> bool:
    """Whether ``generate`` runs classifier-free guidance (diffusers: scale > 1, a cfg model, no embedding)."""
    return bool(self.cfg and not self.guidance_embedding_dim and float(guidance_scale) > 1.0)

  def _options(self, sampler: str, user: Mapping[str, Any]) -> dict[str, Any]:
    samplers.get(sampler)  # a clear error for an unknown sampler name
    return {**accepted_options(sampler, self.sampler_options), **dict(user)}

  def _prompt_ids(self, prompts: str | Sequence[str], negative_prompts: str | Sequence[str] | None):
    prompts, negative = prompt_lists(prompts, negative_prompts)
    return jnp.asarray(self.tokenizer(prompts)), jnp.asarray(self.tokenizer(negative))

  @property
  def size_multiple(self) -> int:
    """What image heights and widths must be multiples of: the VAE factor times the denoiser's latent
    multiple (:func:`latent_multiple`)."""
    return self.vae_factor * latent_multiple(self.unet.config)

  def _check_size(self, height: int, width: int) -> None:
    f = self.size_multiple
    if height % f or width % f or height <= 0 or width <= 0:
      what = "patch size" if getattr(self.unet.config, "patch_size", None) else "downsampling"
      raise ValueError(f"height and width must be positive multiples of {f} (the VAE factor {self.vae_factor} "
                       f"times the denoiser's {what} {f // self.vae_factor}), got {height}x{width}")

  def _latent_shape(self, batch: int, height: int | None, width: int | None) -> tuple[int, int, int, int]:
    height = self.default_size if height is None else int(height)
    width = self.default_size if width is None else int(width)
    self._check_size(height, width)
    return (batch, height // self.vae_factor, width // self.vae_factor, self.latent_channels)

  # ---- LoRA ----

  def _lora_targets(self) -> dict[str, Any]:
    """The parameter trees LoRA adapters can adapt, by component name (SDXL adds "text_encoder_2")."""
    return {"unet": self.unet_params, "text_encoder": self.text_params}

  def load_lora(self, spec: Any) -> dict[str, Any]:
    """A LoRA spec (file, ``{"unet": LoRA, "text_encoder": LoRA}`` or a UNet :class:`~jdiff.lora.LoRA`)
    as a component dict; files are read once and cached by path and modification time."""
    if isinstance(spec, _lora.LoRA):
      return {"unet": spec}
    if isinstance(spec, Mapping):
      names = list(self._lora_targets())
      if set(spec) - set(names) or not all(isinstance(v, _lora.LoRA) for v in spec.values()):
        raise ValueError(f"a LoRA dict maps {' / '.join(map(repr, names))} to jdiff.lora.LoRA, got keys "
                         f"{sorted(spec)}")
      return dict(spec)
    if isinstance(spec, (str, os.PathLike)):
      path = Path(spec)
      if not path.is_file():
        raise FileNotFoundError(f"LoRA file {str(path)!r} does not exist")
      cache_key = (str(path.resolve()), path.stat().st_mtime_ns)
      if cache_key not in self._loras:
        self._loras[cache_key] = _lora.load(path, self._lora_targets())
      return self._loras[cache_key]
    raise ValueError(f"lora must be a file path, a jdiff.lora.LoRA or a component dict, got {type(spec).__name__}")

  def lora_params(self, lora: Any = None, lora_scale: float = 1.0) -> tuple[Any, Any]:
    """UNet and text-encoder parameters with LoRA adapters merged (:func:`jdiff.lora.merge_many`).

    Args:
      lora: None, one adapter (a ``.safetensors`` path in diffusers/PEFT or kohya layout, a
        ``{"unet": LoRA, "text_encoder": LoRA}`` dict, or a UNet ``LoRA``), or a list whose entries
        are adapters or ``(adapter, scale)`` pairs.
      lora_scale: the scale of adapters given without one (diffusers' ``cross_attention_kwargs``
        ``{"scale": s}`` / ``fuse_lora(lora_scale=s)``).

    Returns:
      ``(unet_params, text_params)``; the stored base parameters are never modified.

    Example:
      >>> unet_p, text_p = pipe.lora_params([("style.safetensors", 0.8), ("detail.safetensors", 0.3)])  # doctest: +SKIP
    """
    trees = self._lora_trees(lora, lora_scale)
    return trees["unet"], trees.get("text_encoder", self.text_params)

  def _lora_trees(self, lora: Any, lora_scale: float) -> dict[str, Any]:
    """Every tree of :meth:`_lora_targets` with the adapters of ``lora`` merged (see :meth:`lora_params`)."""
    targets = self._lora_targets()
    if lora is None:
      return targets
    entries = list(lora) if isinstance(lora, (list, tuple)) else [lora]
    by_component: dict[str, list] = {comp: [] for comp in targets}
    for entry in entries:
      spec, scale = entry if isinstance(entry, tuple) else (entry, lora_scale)
      for comp, adapter in self.load_lora(spec).items():
        by_component[comp].append((adapter, float(scale)))
    return {comp: _lora.merge_many(targets[comp], adapters) if adapters else targets[comp]
            for comp, adapters in by_component.items()}

  def _params(self, lora: Any, lora_scale: float) -> tuple:
    unet, text = self.lora_params(lora, lora_scale)
    return (unet, self.vae_params, text, tuple(self.controlnet_params))

  # ---- ControlNet ----

  def _per_net_images(self, control_images: Any) -> list[Any]:
    """``control_images`` split into one entry (an image or a batch) per ControlNet."""
    n = len(self.controlnets)
    if control_images is None:
      raise ValueError(f"this pipeline has {n} ControlNet(s): pass control_images")
    if n == 1:
      return [control_images]
    if not isinstance(control_images, (list, tuple)) or len(control_images) != n:
      raise ValueError(f"pass one control image (or batch) per ControlNet: {n} expected")
    return list(control_images)

  def _control_inputs(self, control_images: Any, batch: int, height: int, width: int, conditioning_scale: Any,
                      start: Any, end: Any, num_steps: int) -> dict[str, Any]:
    """Control images [B, H, W, 3] per net, per-net scales [nets] and the steps each net acts at [nets, n]."""
    n = len(self.controlnets)
    per_net = self._per_net_images(control_images)
    images = []
    for k, item in enumerate(per_net):
      items = list(item) if isinstance(item, (list, tuple)) else None
      if items is None and np.ndim(item) == 4:
        items = list(np.asarray(item))
      if items is None:
        items = [item]
      arr = np.stack([_control.prepare(im, height, width) for im in items])  # [b, H, W, 3]
      if arr.shape[0] == 1:
        arr = np.repeat(arr, batch, axis=0)
      if arr.shape[0] != batch:
        raise ValueError(f"ControlNet {k}: {arr.shape[0]} control images for {batch} prompts")
      images.append(jnp.asarray(arr))
    scales = [float(s) for s in _per_net(conditioning_scale, n, "controlnet_conditioning_scale")]
    starts = [float(s) for s in _per_net(start, n, "control_guidance_start")]
    ends = [float(e) for e in _per_net(end, n, "control_guidance_end")]
    active = np.ones((n, num_steps), bool)
    for k, (s, e) in enumerate(zip(starts, ends)):
      if not 0.0 <= s < e <= 1.0:
        raise ValueError(f"control_guidance_start/end must satisfy 0 <= start < end <= 1, got {s}, {e}")
      active[k] = np.asarray(guidance_active(np.arange(num_steps), num_steps, s, e)) > 0
    return {"images": tuple(images), "scales": jnp.asarray(scales, jnp.float32), "active": jnp.asarray(active)}

  def _control_setup(self, control_images: Any, batch: int, height: int, width: int, conditioning_scale: Any,
                     start: Any, end: Any, num_steps: int, guess_mode: bool) -> tuple[dict[str, Any] | None, bool]:
    """The ControlNet inputs of one call (:meth:`_control_inputs` over the ``num_steps`` steps that run;
    None without ControlNets) and its guess mode (also on for nets with ``global_pool_conditions``)."""
    if not self.controlnets:
      if control_images is not None:
        raise ValueError("control_images given but the pipeline has no ControlNet "
                         "(from_diffusers(..., controlnet=...) or with_controlnets)")
      return None, False
    control = self._control_inputs(control_images, batch, height, width, conditioning_scale, start, end, num_steps)
    return control, bool(guess_mode or self.controlnets[0].config.global_pool_conditions)

  # ---- generation ----

  def generate(self, prompts: str | Sequence[str], *, key: jax.Array, num_steps: int | None = None,
               guidance_scale: float | None = None, guidance_rescale: float = 0.0, sampler: str | None = None,
               negative_prompts: str | Sequence[str] | None = None, height: int | None = None,
               width: int | None = None, latents: jax.Array | None = None, lora: Any = None,
               lora_scale: float = 1.0, control_images: Any = None,
               controlnet_conditioning_scale: float | Sequence[float] = 1.0, guess_mode: bool = False,
               control_guidance_start: float | Sequence[float] = 0.0,
               control_guidance_end: float | Sequence[float] = 1.0, **sampler_options: Any) -> jax.Array:
    """Text-to-image generation, optionally with LoRA adapters and ControlNets.

    Args:
      prompts: one prompt or a list (one image each; repeat a prompt for several images).
      key: PRNG key for the initial latents (when ``latents`` is None) and stochastic samplers.
      num_steps: sampler steps (model evaluations for first-order samplers); default
        ``defaults["num_steps"]``, else 50.
      guidance_scale: classifier-free guidance weight; <= 1 runs the conditional model alone (a
        guidance-distilled UNet gets it as its embedding, a ``cfg=False`` model ignores it); default
        ``defaults["guidance_scale"]``, else 7.5.
      guidance_rescale: guidance rescale weight phi in [0, 1] (diffusers' ``guidance_rescale``).
      sampler: a registered sampler name (``jdiff.samplers.available()``); default
        ``defaults["sampler"]``, else "ddim".
      negative_prompts: the unconditional prompts (default: the empty prompt).
      height, width: image size in pixels (default: the size of ``latents``, else of the first control
        image, else the UNet's sample size times the VAE factor).
      latents: initial noise ``[B, h, w, C]`` (NHWC, unit variance) instead of drawing it from ``key``.
      lora, lora_scale: LoRA adapters merged into the UNet / text encoder, see :meth:`lora_params`.
      control_images: with ControlNets: per net, one control image or one per prompt (paths, PIL
        images, or arrays ``[H, W, 3]`` / ``[B, H, W, 3]`` in [0, 1] or uint8); a list of those with
        several nets. Resized to the generation size as diffusers does
        (:func:`jdiff.control_images.prepare`).
      controlnet_conditioning_scale: residual weight, one value or one per net.
      guess_mode: diffusers' guess mode: residuals scaled from 0.1 (shallowest) to 1 (middle), and
        under guidance only the conditional branch gets them.
      control_guidance_start, control_guidance_end: fraction of the steps during which each net is
        active (one value or one per net), any sampler.
      **sampler_options: override the scheduler-config defaults (``eta``, ``order``, ...).

    Returns:
      float32 images ``[B, H, W, 3]`` in [0, 1].

    Example:
      >>> imgs = pipe.generate(["a cat", "a dog"], key=jax.random.key(0), num_steps=20)  # doctest: +SKIP
      >>> imgs = pipe.generate("a cat", key=key, lora=[("a.safetensors", 0.8), ("b.safetensors", 0.5)])  # doctest: +SKIP
      >>> imgs = canny_pipe.generate("a bird", key=key, control_images=edges,
      ...                            controlnet_conditioning_scale=0.7)  # doctest: +SKIP
    """
    num_steps, guidance_scale, sampler = self._defaults(num_steps, guidance_scale, sampler)
    ids, neg_ids = self._prompt_ids(prompts, negative_prompts)
    batch = ids.shape[0]
    noise_key, sample_key = jax.random.split(key)
    if latents is not None:
      latents = jnp.asarray(latents, jnp.float32)
      if latents.ndim != 4 or latents.shape[0] != batch or latents.shape[-1] != self.latent_channels:
        raise ValueError(f"latents must be [B={batch}, h, w, {self.latent_channels}], got {latents.shape}")
      height, width = latents.shape[1] * self.vae_factor, latents.shape[2] * self.vae_factor
    elif self.controlnets and control_images is not None and (height is None or width is None):
      h0, w0 = self._image_size(self._per_net_images(control_images)[0])
      height = h0 if height is None else height
      width = w0 if width is None else width
    shape = self._latent_shape(batch, height, width)
    if latents is None:
      latents = jax.random.normal(noise_key, shape, jnp.float32)
    height, width = shape[1] * self.vae_factor, shape[2] * self.vae_factor
    options = self._options(sampler, sampler_options)
    guided = self._guided(guidance_scale)
    control, guess_mode = self._control_setup(control_images, batch, height, width, controlnet_conditioning_scale,
                                              control_guidance_start, control_guidance_end, int(num_steps),
                                              guess_mode)
    program = self._program("txt2img", sampler, int(num_steps), guided, options, (guess_mode,))
    return program(self._params(lora, lora_scale), self.schedule, ids, neg_ids, latents,
                   jnp.float32(guidance_scale), jnp.float32(guidance_rescale), sample_key, control)

  @staticmethod
  def _image_size(image: Any) -> tuple[int, int]:
    """(height, width) of a control image given as a path, PIL image, array or list of those."""
    from PIL import Image

    if isinstance(image, (list, tuple)):
      if not image:
        raise ValueError("empty control image list")
      image = image[0]
    if isinstance(image, (str, os.PathLike)):
      image = _control.load_control_image(image)
    if isinstance(image, Image.Image):
      return image.height, image.width
    shape = np.shape(image)
    return (shape[1], shape[2]) if len(shape) == 4 else (shape[0], shape[1])

  def img2img(self, images: Any, prompts: str | Sequence[str], *, key: jax.Array, strength: float = 0.8,
              num_steps: int = 50, guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
              sampler: str = "ddim", negative_prompts: str | Sequence[str] | None = None,
              noise: jax.Array | None = None, sample_posterior: bool = True, lora: Any = None,
              lora_scale: float = 1.0, control_images: Any = None,
              controlnet_conditioning_scale: float | Sequence[float] = 1.0, guess_mode: bool = False,
              control_guidance_start: float | Sequence[float] = 0.0,
              control_guidance_end: float | Sequence[float] = 1.0, **sampler_options: Any) -> jax.Array:
    """Image-to-image generation (diffusers' ``StableDiffusionImg2ImgPipeline``; with ControlNets its
    ``StableDiffusionControlNetImg2ImgPipeline``), any sampler.

    The images are encoded with the VAE (a posterior sample, or its mean when ``sample_posterior``
    is False) and scaled by ``scaling_factor``; of the sampler's ``num_steps`` grid
    (:func:`jdiff.samplers.plan`) the last ``min(int(num_steps * strength), num_steps)`` steps run
    (:func:`jdiff.samplers.cut`), starting from the latents noised to the first of their levels,
    ``alpha z + sigma noise`` (diffusers' ``add_noise``).

    Args:
      images: ``[B, H, W, C]``, ``[H, W, C]`` or ``[H, W]``: C = 3 (RGB), 1 (gray, replicated) or 4
        (RGBA: the alpha channel is not used), float in [0, 1] or uint8 (PIL images too); H and W
        multiples of :attr:`size_multiple`. One image is repeated for every prompt; one prompt (a
        string) for every image.
      prompts: as in :meth:`generate`.
      key: PRNG key for the posterior sample, the noise (when ``noise`` is None) and the sampler.
      strength: in (0, 1]: how much of the noise schedule to traverse (1 ignores the image).
      num_steps: the grid size before truncation by ``strength``.
      guidance_scale, guidance_rescale, sampler, negative_prompts, lora, lora_scale: as in
        :meth:`generate`.
      noise: ``[B, h, w, C]`` standard-normal noise added to the image latents, instead of drawing it.
      sample_posterior: sample the VAE posterior (diffusers' default) rather than take its mean.
      control_images, controlnet_conditioning_scale, guess_mode, control_guidance_start,
      control_guidance_end: with ControlNets, as in :meth:`generate`; control images are resized to
        the images' size, and the start/end fractions apply to the steps that run (after ``strength``).
      **sampler_options: as in :meth:`generate`.

    Returns:
      float32 images ``[B, H, W, 3]`` in [0, 1].

    Raises:
      ValueError: strength outside (0, 1] or too small for one step, mis-shaped images or noise.

    Example:
      >>> out = pipe.img2img(photo[None], "an oil painting", key=jax.random.key(0), strength=0.6,
      ...                    num_steps=30)  # doctest: +SKIP
    """
    n, start_step = strength_start(num_steps, strength)
    options = self._options(sampler, sampler_options)
    images, ids, neg_ids = self._image_inputs(images, prompts, negative_prompts)
    control, guess_mode = self._control_setup(control_images, *images.shape[:3], controlnet_conditioning_scale,
                                              control_guidance_start, control_guidance_end, n - start_step,
                                              guess_mode)
    noise, run_key = self._noise(key, images, noise)
    program = self._program("img2img", sampler, n, self._guided(guidance_scale), options, (start_step, guess_mode))
    return program(self._params(lora, lora_scale), self.schedule, ids, neg_ids, images, noise,
                   jnp.float32(guidance_scale), jnp.float32(guidance_rescale), run_key,
                   jnp.asarray(bool(sample_posterior)), control)

  def _image_inputs(self, images: Any, prompts: str | Sequence[str],
                    negative_prompts: str | Sequence[str] | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Images ``[B, H, W, C]`` in [0, 1] with the VAE's channels (:func:`image_batch`; one image repeated
    for every prompt, one prompt for every image) and the prompts' token ids."""
    images = image_batch(images, int(getattr(self.vae.config, "in_channels", 3)))
    if isinstance(prompts, str):
      prompts = [prompts] * images.shape[0]
    ids, neg_ids = self._prompt_ids(prompts, negative_prompts)
    batch = jax.tree.leaves(ids)[0].shape[0]  # ids: a subclass's conditioning may be a pytree (SDXL)
    if images.shape[0] == 1 and batch > 1:
      images = jnp.broadcast_to(images, (batch,) + images.shape[1:])
    if images.shape[0] != batch:
      raise ValueError(f"{images.shape[0]} images for {batch} prompts")
    self._check_size(images.shape[1], images.shape[2])
    return images, ids, neg_ids

  def _noise(self, key: jax.Array, images: jax.Array, noise: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Standard-normal latent noise for ``images`` (drawn, or the given array checked) and a key for the rest."""
    shape = (images.shape[0], images.shape[1] // self.vae_factor, images.shape[2] // self.vae_factor,
             self.latent_channels)
    noise_key, run_key = jax.random.split(key)
    if noise is None:
      return jax.random.normal(noise_key, shape, jnp.float32), run_key
    noise = jnp.asarray(noise, jnp.float32)
    if noise.shape != shape:
      raise ValueError(f"noise must have shape {shape}, got {noise.shape}")
    return noise, run_key

  def inpaint(self, images: Any, masks: Any, prompts: str | Sequence[str], *, key: jax.Array, strength: float = 1.0,
              num_steps: int = 50, guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
              sampler: str = "ddim", negative_prompts: str | Sequence[str] | None = None,
              noise: jax.Array | None = None, sample_posterior: bool = True, lora: Any = None,
              lora_scale: float = 1.0, control_images: Any = None,
              controlnet_conditioning_scale: float | Sequence[float] = 1.0, guess_mode: bool = False,
              control_guidance_start: float | Sequence[float] = 0.0,
              control_guidance_end: float | Sequence[float] = 1.0, **sampler_options: Any) -> jax.Array:
    """Inpainting (diffusers' ``StableDiffusionInpaintPipeline``; with ControlNets its
    ``StableDiffusionControlNetInpaintPipeline``): regenerates where ``masks`` is white.

    Masks are binarised at 0.5 and resized to the latents by nearest neighbour. An inpainting UNet
    (more input channels than the latents: 9 for SD) gets the latent mask and the latents of the
    image with the masked region blanked as extra input channels. An ordinary UNet keeps the
    unmasked region pinned to the image latents noised to each step's level
    (:func:`jdiff.samplers.masked_rule`; not Heun). At ``strength`` 1 sampling starts from noise;
    below 1 from the image latents noised to the first step kept, as in :meth:`img2img`. ControlNets
    see the latents without the inpainting UNet's extra channels, as diffusers' ControlNet
    inpainting pipeline does.

    Args:
      images: as in :meth:`img2img` (RGB, gray or RGBA; float in [0, 1] or uint8).
      masks: ``[B, H, W]``, ``[B, H, W, 1]`` (or one ``[H, W]`` / ``[H, W, 1]``), float in [0, 1] or
        uint8, the size of ``images``; 1 (white) is regenerated, 0 kept.
      prompts, key, strength, num_steps, guidance_scale, guidance_rescale, sampler,
      negative_prompts, noise, sample_posterior, lora, lora_scale, control_images,
      controlnet_conditioning_scale, guess_mode, control_guidance_start, control_guidance_end,
      **sampler_options: as in :meth:`img2img` (``noise`` is also the starting latents at strength 1).

    Returns:
      float32 images ``[B, H, W, 3]`` in [0, 1].

    Raises:
      ValueError: a mask whose size differs from the images', a bad strength, a sampler that
        cannot pin known data (Heun) with an ordinary UNet.

    Example:
      >>> out = pipe.inpaint(photo, mask, "a red door", key=jax.random.key(0), num_steps=30)  # doctest: +SKIP
    """
    n, start_step = strength_start(num_steps, strength)
    options = self._options(sampler, sampler_options)
    images, ids, neg_ids = self._image_inputs(images, prompts, negative_prompts)
    masks = np.asarray(masks)
    if masks.dtype == np.uint8:
      masks = masks.astype(np.float32) / np.float32(255.0)
    elif not np.issubdtype(masks.dtype, np.floating) and masks.dtype != bool:
      raise ValueError(f"masks must be uint8 (0-255), bool or float ([0, 1]), got dtype {masks.dtype}")
    masks = jnp.asarray(masks, jnp.float32)
    if masks.ndim in (3, 4) and masks.shape[-1] == 1:
      masks = masks[..., 0]
    if masks.ndim == 2:
      masks = masks[None]
    if masks.ndim != 3 or masks.shape[1:] != images.shape[1:3]:
      raise ValueError(f"masks must be [B, H, W] with the images' size {tuple(images.shape[1:3])}, "
                       f"got shape {tuple(masks.shape)}")
    if masks.shape[0] == 1 and images.shape[0] > 1:
      masks = jnp.broadcast_to(masks, images.shape[:3])
    if masks.shape[0] != images.shape[0]:
      raise ValueError(f"{masks.shape[0]} masks for {images.shape[0]} images")
    masks = (masks >= 0.5).astype(jnp.float32)[..., None]  # [B, H, W, 1], binarised as diffusers does
    extra = self.unet.config.in_channels - self.latent_channels
    if extra not in (0, self.latent_channels + 1):
      raise ValueError(f"a UNet with {self.unet.config.in_channels} input channels is neither an ordinary "
                       f"({self.latent_channels}) nor an inpainting ({2 * self.latent_channels + 1}) UNet")
    if not extra and samplers.plan(sampler, self.schedule, n, **options).rule.with_sample is None:
      raise ValueError(f"sampler {sampler!r} cannot keep the unmasked region between its steps; "
                       "use another sampler or an inpainting UNet")
    control, guess_mode = self._control_setup(control_images, *images.shape[:3], controlnet_conditioning_scale,
                                              control_guidance_start, control_guidance_end, n - start_step,
                                              guess_mode)
    noise, run_key = self._noise(key, images, noise)
    program = self._program("inpaint", sampler, n, self._guided(guidance_scale), options, (start_step, guess_mode))
    return program(self._params(lora, lora_scale), self.schedule, ids, neg_ids, images, masks, noise,
                   jnp.float32(guidance_scale), jnp.float32(guidance_rescale), run_key,
                   jnp.asarray(bool(sample_posterior)), control)

  def invert(self, images: Any, prompts: str | Sequence[str], *, num_steps: int = 50, guidance_scale: float = 1.0,
             guidance_rescale: float = 0.0, negative_prompts: str | Sequence[str] | None = None,
             sample_posterior: bool = False, key: jax.Array | None = None, **inversion_options: Any) -> jax.Array:
    """DDIM inversion of images under prompts: the latent noise that DDIM sampling maps back to them.

    The images are encoded (the posterior mean unless ``sample_posterior``), then
    :func:`jdiff.samplers.ddim_inversion` runs the guided model from data to noise. Regenerate with
    ``generate(prompts, latents=z_T, sampler="ddim", num_steps=num_steps, guidance_scale=...)``.

    Args:
      images, prompts, negative_prompts: as in :meth:`img2img`.
      num_steps: inversion steps.
      guidance_scale: classifier-free guidance during inversion (1: the conditional model).
      guidance_rescale: guidance rescale weight under guidance (as in :meth:`generate`).
      sample_posterior: encode with a posterior sample (drawn with ``key``) instead of the mean.
      **inversion_options: ``timestep_spacing``, ``steps_offset``, ``set_alpha_to_one``, ... of
        :func:`jdiff.samplers.ddim_inversion` (default: the bundle's scheduler config).

    Returns:
      float32 latents ``[B, h, w, C]`` (unit-variance scale, as ``generate``'s ``latents``).

    Example:
      >>> z_T = pipe.invert(photo, "a photo of a cat", num_steps=50)  # doctest: +SKIP
      >>> again = pipe.generate("a photo of a cat", key=key, latents=z_T, num_steps=50, guidance_scale=1.0)  # doctest: +SKIP
    """
    images, ids, neg_ids = self._image_inputs(images, prompts, negative_prompts)
    if sample_posterior and key is None:
      raise ValueError("sample_posterior=True needs a key")
    options = {**accepted_options(samplers.ddim_inversion, self.sampler_options), **inversion_options}
    guided = self._guided(guidance_scale)
    cache_key = ("invert", int(num_steps), guided, bool(sample_posterior), static_key(options))
    if cache_key not in self._programs:
      def run(params, schedule, ids, neg_ids, images, scale, rescale, key):
        z = self.encode_images(params[1], images * 2.0 - 1.0, key=key, sample=sample_posterior)
        model_fn = self._model_fn(params, ids, neg_ids, scale, guided, rescale=rescale)
        return samplers.ddim_inversion(model_fn, schedule, z, num_steps=int(num_steps), prediction=self.prediction,
                                       **options)
      self._programs[cache_key] = jax.jit(run)
    key = jax.random.key(0) if key is None else key
    return self._programs[cache_key](self._params(None, 1.0), self.schedule, ids, neg_ids, images,
                                     jnp.float32(guidance_scale), jnp.float32(guidance_rescale), key)
