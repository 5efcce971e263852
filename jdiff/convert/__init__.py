"""diffusers/transformers checkpoint folders (config.json + safetensors) <-> jdiff modules and params.

Never unpickles anything; sharded safetensors (index json) load transparently.

Example:
  >>> from jdiff import convert
  >>> unet, params = convert.load_unet("sd15/unet")  # doctest: +SKIP
  >>> convert.save_unet(unet, params, "out/unet")  # doctest: +SKIP
"""

from jdiff.convert._io import read_safetensors, refuse_pickle
from jdiff.convert.dit import (dit_param_shapes, load_dit, load_sd3_transformer, save_dit, save_sd3_transformer,
                               sd3_param_shapes)
from jdiff.convert.single_file import (load_sdxl_single_file_bundle, load_single_file_bundle, read_sdxl_single_file,
                                      read_single_file, save_single_file_bundle, write_sdxl_single_file,
                                      write_single_file)
from jdiff.convert.text import load_text_encoder, save_text_encoder
from jdiff.convert.unet import load_unet, save_unet, unet_param_shapes
from jdiff.convert.vae import load_vae, save_vae, vae_param_shapes

__all__ = ["read_safetensors", "refuse_pickle", "load_unet", "save_unet", "load_vae", "save_vae", "load_text_encoder",
           "save_text_encoder", "unet_param_shapes", "vae_param_shapes", "read_single_file", "write_single_file",
           "load_single_file_bundle", "save_single_file_bundle", "read_sdxl_single_file", "write_sdxl_single_file",
           "load_sdxl_single_file_bundle", "load_dit", "save_dit", "dit_param_shapes",
           "load_sd3_transformer", "save_sd3_transformer", "sd3_param_shapes"]
