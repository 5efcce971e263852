"""Textual inversion: learned token embeddings added to a CLIP tokenizer and text encoder.

Files are read from safetensors only:

* diffusers' ``learned_embeds.safetensors``: one tensor named by its token, ``[D]`` or ``[N, D]``;
* A1111-style safetensors: ``emb_params`` ``[N, D]`` (or a flattened ``string_to_param.*``), the token
  being the ``name`` metadata entry or else the file name without its suffix (the A1111 convention).

Pickled embeddings (``.pt``, ``.bin``) are refused with one line: unpickling runs arbitrary code. An
embedding of N > 1 vectors becomes the tokens ``t, t_1, ..., t_{N-1}`` (diffusers' names); the tokenizer
expands ``t`` in a prompt into all of them (:class:`jdiff.tokenizers.CLIPTokenizer`), which is where
diffusers' pipelines expand it too (``maybe_convert_prompt``). New ids follow the tokenizer's, and the
token embedding table is cut or kept at the tokenizer's size before the rows are appended, as diffusers'
``resize_token_embeddings(len(tokenizer) + k)`` does.

Example:
  >>> pipe = load_textual_inversion(pipe, "cat-toy/learned_embeds.safetensors")  # doctest: +SKIP
  >>> imgs = pipe.generate(["a photo of <cat-toy>"], key=jax.random.key(0))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jdiff.tokenizers import CLIPTokenizer

__all__ = ["read_embeddings", "add_tokens", "load_textual_inversion", "token_names"]

_DIFFUSERS_FILE = "learned_embeds.safetensors"
_A1111_KEYS = ("emb_params", "string_to_param.*")


def read_embeddings(path: str | os.PathLike, *, token: str | None = None) -> dict[str, np.ndarray]:
  """Reads one textual-inversion file into ``{token: [N, D] float32}``.

  Args:
    path: a ``.safetensors`` file, or a folder holding diffusers' ``learned_embeds.safetensors``.
    token: the token to use instead of the file's own (the tensor's name in a diffusers file; the
      ``name`` metadata entry, else the file name, in an A1111 file).

  Returns:
    One entry: the token and its N vectors (N = 1 for a single-vector embedding).

  Raises:
    FileNotFoundError: no such file, or a folder without ``learned_embeds.safetensors``.
    ValueError: a pickle file (``.pt``, ``.bin``, ...), a file that is not safetensors, or tensors
      that are not one embedding of shape [D] or [N, D] (one line each).

  Example:
    >>> read_embeddings("cat-toy/learned_embeds.safetensors")  # doctest: +SKIP
    {'<cat-toy>': array([[...]], dtype=float32)}  # [1, 768]
  """
  from jdiff.convert import read_safetensors, refuse_pickle

  file = Path(path)
  refuse_pickle(file, what="textual-inversion embedding")
  if file.is_dir():
    inside = file / _DIFFUSERS_FILE
    if not inside.is_file():
      for pickled in ("learned_embeds.bin", "learned_embeds.pt"):
        if (file / pickled).is_file():
          refuse_pickle(file / pickled, what="textual-inversion embedding")
      raise FileNotFoundError(f"textual-inversion folder {str(file)!r} holds no {_DIFFUSERS_FILE}")
    file = inside
  if not file.is_file():
    raise FileNotFoundError(f"textual-inversion embedding {str(file)!r} does not exist")
  if file.suffix.lower() != ".safetensors":
    raise ValueError(f"textual-inversion embedding {str(file)!r}: only .safetensors files are read")
  tensors, meta = read_safetensors(file)
  a1111 = [k for k in _A1111_KEYS if k in tensors]
  if len(tensors) != 1:
    raise ValueError(f"{str(file)!r} holds tensors {sorted(tensors)[:6]}: expected one embedding (a token's "
                     f"tensor, or {_A1111_KEYS[0]!r}); two-encoder (SDXL) embeddings are not supported")
  (key, emb), = tensors.items()
  if token is None:
    token = (meta.get("name") or file.stem) if a1111 else key
  emb = np.asarray(emb, np.float32)
  if emb.ndim == 1:
    emb = emb[None]
  if emb.ndim != 2 or emb.shape[0] < 1 or emb.shape[1] < 1:
    raise ValueError(f"{str(file)!r}: embedding {key!r} has shape {tuple(tensors[key].shape)}, expected [D] or [N, D]")
  if not token or not token.strip():
    raise ValueError(f"{str(file)!r}: empty token name; pass token=")
  return {token: emb}


def token_names(token: str, num_vectors: int) -> list[str]:
  """The tokens of an N-vector embedding: ``token, token_1, ..., token_{N-1}`` (diffusers' names)."""
  return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def _table(text_params: Mapping[str, Any]) -> Any:
  try:
    return text_params["embeddings"]["token_embedding"]["embedding"]
  except (KeyError, TypeError):
    raise ValueError("text_params has no embeddings/token_embedding/embedding table (not a jdiff CLIP text "
                     "encoder's parameters)") from None


def add_tokens(tokenizer: CLIPTokenizer, text_params: Mapping[str, Any],
               embeddings: Mapping[str, np.ndarray], *, source: str = "embedding") -> tuple[CLIPTokenizer, Any]:
  """Adds textual-inversion tokens to a tokenizer and their rows to a text encoder's token embeddings.

  Args:
    tokenizer: the CLIP BPE tokenizer.
    text_params: the CLIP text encoder's parameters (``embeddings/token_embedding/embedding`` [V', D]).
    embeddings: ``{token: [N, D] or [D]}`` (:func:`read_embeddings`).
    source: what the embeddings came from, for error messages.

  Returns:
    ``(tokenizer, text_params)``: new objects; the table has ``tokenizer.vocab_size`` rows (the text
    encoder's config needs ``vocab_size`` set to that: :func:`load_textual_inversion` does it). A
    multi-vector token ``t`` is expanded in prompts by the new tokenizer.

  Raises:
    ValueError: a byte tokenizer, a token (or one of its ``t_i``) already known, a width other than
      the text encoder's, or a table smaller than the tokenizer's ids.

  Example:
    >>> tok, params = add_tokens(tok, params, read_embeddings("a1111/cat-toy.safetensors"))  # doctest: +SKIP
  """
  if not isinstance(tokenizer, CLIPTokenizer):
    raise ValueError(f"textual inversion needs a CLIP BPE tokenizer, got {type(tokenizer).__name__}")
  table = _table(text_params)
  rows, width = int(table.shape[0]), int(table.shape[1])
  names, vectors = [], []
  for token, emb in embeddings.items():
    emb = np.asarray(emb, np.float32)
    emb = emb[None] if emb.ndim == 1 else emb
    if emb.shape[-1] != width:
      raise ValueError(f"{source}: token {token!r} has width {emb.shape[-1]} but the text encoder's token "
                       f"embeddings are {width} wide (an embedding trained for another model family?)")
    for name in token_names(token, emb.shape[0]):
      if name in tokenizer.vocab or name in tokenizer.added or name in names:
        raise ValueError(f"{source}: token {name!r} is already in the tokenizer; pass another token=")
      names.append(name)
    vectors.append(emb)
  if rows < tokenizer.vocab_size:
    raise ValueError(f"the text encoder's token table has {rows} rows but the tokenizer has {tokenizer.vocab_size} "
                     "ids")
  new_rows = jnp.asarray(np.concatenate(vectors), table.dtype)
  new_table = jnp.concatenate([jnp.asarray(table)[:tokenizer.vocab_size], new_rows])
  params = dict(text_params)
  params["embeddings"] = dict(params["embeddings"])
  params["embeddings"]["token_embedding"] = {**params["embeddings"]["token_embedding"], "embedding": new_table}
  return tokenizer.add_tokens(names), params


def load_textual_inversion(bundle: Any, path: str | os.PathLike, *, token: str | None = None) -> Any:
  """A copy of a :class:`jdiff.pipelines.StableDiffusion` bundle with a textual-inversion embedding loaded.

  The bundle's tokenizer gains the token(s), its text parameters the rows and its text encoder's config
  the vocabulary size; the original bundle is unchanged.

  Args:
    bundle: the pipeline bundle (CLIP BPE tokenizer, jdiff CLIP text encoder).
    path: the embedding (see :func:`read_embeddings`).
    token: the token to use instead of the file's own.

  Returns:
    The new bundle: ``bundle.generate(["a photo of <token>"], ...)`` uses the embedding.

  Raises:
    FileNotFoundError / ValueError: see :func:`read_embeddings` and :func:`add_tokens`.

  Example:
    >>> pipe = load_textual_inversion(pipe, "embeddings/cat-toy.safetensors", token="<cat-toy>")  # doctest: +SKIP
  """
  embeddings = read_embeddings(path, token=token)
  tokenizer, text_params = add_tokens(bundle.tokenizer, bundle.text_params, embeddings, source=os.fspath(path))
  encoder = bundle.text_encoder
  config = dataclasses.replace(encoder.config, vocab_size=int(_table(text_params).shape[0]))
  return dataclasses.replace(bundle, tokenizer=tokenizer, text_params=text_params,
                             text_encoder=encoder.clone(config=config))
