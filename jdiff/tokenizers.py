"""Tokenizers: CLIP's byte-level BPE (read from a checkpoint's vocab.json / merges.txt) and a byte tokenizer.

:class:`CLIPTokenizer` reproduces transformers' ``CLIPTokenizer`` (v5, tokenizers-backed): special tokens are
cut out of the raw text first; each remaining segment is NFC-normalised, runs of whitespace become one space,
and it is lower-cased; the CLIP regex splits it into words (letter runs, single digits, punctuation runs,
English contractions); each word's UTF-8 bytes are mapped to printable characters (GPT-2's byte-to-unicode
table), ``</w>`` is attached to its last character, and BPE merges are applied in rank order. Sequences are
``[bos] + tokens + [eos]``, truncated to ``max_length`` (the eos is kept) and padded with the pad token.

Added tokens (:meth:`CLIPTokenizer.add_tokens`, e.g. textual-inversion tokens) get the ids after the vocabulary and
are matched as transformers matches non-special added tokens: in the normalised text, before BPE, leftmost-longest,
case-insensitively. As diffusers' pipelines do for multi-vector textual inversion, an added token ``t`` stands for
``t, t_1, t_2, ...`` while those are added tokens too.

:class:`ByteTokenizer` is the vocabulary-free tokenizer for text encoders trained from scratch here: one token
per UTF-8 byte, plus pad/bos/eos.

Example:
  >>> tok = CLIPTokenizer.from_pretrained("sd15/tokenizer")  # doctest: +SKIP
  >>> tok(["a red fox in snow"]).shape  # doctest: +SKIP
  (1, 77)
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CLIPTokenizer", "ByteTokenizer", "bytes_to_unicode"]

_SUFFIX = "</w>"


@functools.cache
def _patterns():
  """CLIP's word and whitespace patterns (the ``regex`` module: Python's ``re`` has no ``\\p{L}``), compiled
  on first use so that ``import jdiff`` works where only the array stack is installed."""
  import regex
  return (regex, regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
          regex.compile(r"\s+"))


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from the 256 byte values to printable unicode characters.

  Printable Latin-1 bytes map to themselves; the others (controls, space, ...) to code points from 256 up.

  Example:
    >>> bytes_to_unicode()[ord("a")], bytes_to_unicode()[ord(" ")]
    ('a', 'Ġ')
  """
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def _token_text(value: Any) -> str | None:
  """A special token from a tokenizer_config.json entry: a string or ``{"content": ...}``."""
  if isinstance(value, Mapping):
    return value.get("content")
  return value


def _merge(symbols: Sequence[str], a: str, b: str) -> tuple[str, ...]:
  """``symbols`` with every non-overlapping occurrence of the pair (a, b) merged, left to right."""
  merged, i = [], 0
  while i < len(symbols):
    if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
      merged.append(a + b)
      i += 2
    else:
      merged.append(symbols[i])
      i += 1
  return tuple(merged)


class CLIPTokenizer:
  """CLIP byte-level BPE tokenizer with fixed-length padding, equal to transformers' ``CLIPTokenizer``.

  Args:
    vocab: token string -> id (``vocab.json``).
    merges: BPE merges in rank order, each ``(left, right)``.
    max_length: padded/truncated sequence length (``model_max_length``; 77 for CLIP).
    bos_token / eos_token / pad_token / unk_token: special token strings (must be in ``vocab``).
    added_tokens: tokens added after the vocabulary, with ids ``len(vocab)``, ``len(vocab) + 1``, ... (see
      :meth:`add_tokens`).

  Example:
    >>> tok = CLIPTokenizer.from_files("vocab.json", "merges.txt")  # doctest: +SKIP
    >>> ids = tok(["a photo of a cat", "a dog"])  # [2, 77] int32  # doctest: +SKIP
  """

  def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], *, max_length: int = 77,
               bos_token: str = "<|startoftext|>", eos_token: str = "<|endoftext|>",
               pad_token: str = "<|endoftext|>", unk_token: str = "<|endoftext|>",
               added_tokens: Sequence[str] = ()):
    self.vocab = dict(vocab)
    self.added = {tok: len(self.vocab) + i for i, tok in enumerate(added_tokens)}
    clash = [tok for tok in self.added if tok in self.vocab] or sorted(
        {tok for tok in added_tokens if list(added_tokens).count(tok) > 1})
    if clash:
      raise ValueError(f"added tokens must be new and distinct: {clash} repeat a token")
    self.inverse = {i: s for s, i in [*self.vocab.items(), *self.added.items()]}
    self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
    for name, token in [("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token),
                        ("unk_token", unk_token)]:
      if token not in self.vocab:
        raise ValueError(f"{name} {token!r} is not in the vocabulary")
    if max_length < 2:
      raise ValueError(f"max_length must be >= 2 (room for bos and eos), got {max_length}")
    self.max_length = int(max_length)
    self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
    self.bos_token_id = self.vocab[bos_token]
    self.eos_token_id = self.vocab[eos_token]
    self.pad_token_id = self.vocab[pad_token]
    self.unk_token_id = self.vocab[unk_token]
    # Special tokens are cut out of the raw text before normalisation, as transformers does: with SD 2's
    # pad token "!", every "!" in a prompt becomes that token.
    self.specials = sorted({bos_token, eos_token, pad_token, unk_token}, key=len, reverse=True)
    regex = _patterns()[0]
    self._special_re = regex.compile("(" + "|".join(regex.escape(s) for s in self.specials) + ")")
    # added tokens are matched in the normalised text (their own text normalised too), longest first
    self._added_norm = {self.normalize(tok): tok for tok in self.added}
    self._added_re = regex.compile("(" + "|".join(regex.escape(s) for s in sorted(self._added_norm, key=len,
                                                                                  reverse=True)) + ")") \
        if self.added else None
    self._byte = bytes_to_unicode()
    self._unbyte = {c: b for b, c in self._byte.items()}
    self._bpe = functools.lru_cache(maxsize=65536)(self._bpe_uncached)

  @classmethod
  def from_files(cls, vocab_file: str | os.PathLike, merges_file: str | os.PathLike,
                 **kwargs: Any) -> CLIPTokenizer:
    """Reads ``vocab.json`` and ``merges.txt`` (first line ``#version: ...`` skipped if present).

    Raises:
      FileNotFoundError: a file is missing.
      ValueError: a file is malformed (the message names it and the bad line).
    """
    vocab_path, merges_path = Path(vocab_file), Path(merges_file)
    for path in (vocab_path, merges_path):
      if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
    try:
      vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
      raise ValueError(f"{str(vocab_path)!r} is not valid JSON: {err}") from None
    if not isinstance(vocab, dict):
      raise ValueError(f"{str(vocab_path)!r} must map token strings to ids")
    merges = []
    for lineno, line in enumerate(merges_path.read_text(encoding="utf-8").splitlines(), 1):
      if (lineno == 1 and line.startswith("#version")) or not line.strip():
        continue
      parts = line.split()
      if len(parts) != 2:
        raise ValueError(f"{str(merges_path)!r} line {lineno}: expected two symbols, got {line!r}")
      merges.append((parts[0], parts[1]))
    return cls(vocab, merges, **kwargs)

  @classmethod
  def from_pretrained(cls, folder: str | os.PathLike, **overrides: Any) -> CLIPTokenizer:
    """Loads a tokenizer folder (``vocab.json``, ``merges.txt`` and optionally ``tokenizer_config.json`` /
    ``special_tokens_map.json`` for special tokens, ``model_max_length`` and non-special added tokens), e.g.
    ``sd15/tokenizer``.

    Example:
      >>> tok = CLIPTokenizer.from_pretrained("sd21/tokenizer")  # pad token "!"  # doctest: +SKIP
    """
    path = Path(folder)
    if not path.is_dir():
      raise FileNotFoundError(f"tokenizer folder {str(path)!r} does not exist")
    kwargs: dict[str, Any] = {}
    declared: dict[int, Any] = {}  # id -> added token entry (tokenizer_config.json / tokenizer.json)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
      file = path / name
      if not file.is_file():
        continue
      try:
        config = json.loads(file.read_text(encoding="utf-8"))
      except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(file)!r} is not valid JSON: {err}") from None
      for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if _token_text(config.get(key)) is not None:
          kwargs[key] = _token_text(config[key])
      length = config.get("model_max_length")
      if isinstance(length, int) and length < 10**6:  # transformers writes a huge int for "no limit"
        kwargs["max_length"] = length
      for i, entry in (config.get("added_tokens_decoder") or {}).items():
        declared[int(i)] = entry
    kwargs.update(overrides)
    if not (path / "vocab.json").is_file() and (path / "tokenizer.json").is_file():
      tok = cls._from_tokenizer_json(path / "tokenizer.json", **kwargs)
      for entry in json.loads((path / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens") or []:
        declared[int(entry["id"])] = entry
    else:
      tok = cls.from_files(path / "vocab.json", path / "merges.txt", **kwargs)
    added = sorted((i, _token_text(e)) for i, e in declared.items()
                   if _token_text(e) not in tok.vocab and not (isinstance(e, Mapping) and e.get("special")))
    if not added:
      return tok
    ids = [i for i, _ in added]
    if ids != list(range(tok.vocab_size, tok.vocab_size + len(added))):
      raise ValueError(f"added tokens of {str(path)!r} have ids {ids}: expected consecutive ids from {tok.vocab_size}")
    return tok.add_tokens([t for _, t in added])

  @classmethod
  def _from_tokenizer_json(cls, file: Path, **kwargs: Any) -> CLIPTokenizer:
    """Vocabulary and merges from a tokenizers-library ``tokenizer.json`` (BPE model)."""
    try:
      model = json.loads(file.read_text(encoding="utf-8"))["model"]
      vocab, raw = model["vocab"], model["merges"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
      raise ValueError(f"{str(file)!r} is not a BPE tokenizer.json: {err}") from None
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in raw]
    return cls(vocab, merges, **kwargs)

  @classmethod
  def train(cls, texts: Sequence[str], *, num_merges: int, max_length: int = 77) -> CLIPTokenizer:
    """Learns a small CLIP BPE vocabulary from ``texts`` (for text encoders trained from scratch).

    The vocabulary holds CLIP's base symbols (the 256 byte characters, alone and with the end-of-word
    marker ``</w>``), so any text stays tokenizable, then one token per learned merge, then
    ``<|startoftext|>`` and ``<|endoftext|>`` (bos; eos = pad = unk), the layout of CLIP's own files.
    Merges are learned greedily on the normalised words of ``texts`` weighted by their counts: the
    most frequent adjacent pair is merged each round (ties broken by the pair's first occurrence),
    until ``num_merges`` merges or no pair occurs twice.

    Example:
      >>> tok = CLIPTokenizer.train(["a handwritten digit three"] * 4, num_merges=40, max_length=8)
      >>> tok.tokenize("a digit three")
      ['a</w>', 'digit</w>', 'three</w>']
    """
    if num_merges < 0:
      raise ValueError(f"num_merges must be >= 0, got {num_merges}")
    byte = bytes_to_unicode()
    base = list(byte.values())
    vocab_list = base + [c + _SUFFIX for c in base]
    counts: dict[tuple[str, ...], int] = {}
    normalizer = cls({s: i for i, s in enumerate(vocab_list + ["<|startoftext|>", "<|endoftext|>"])}, [],
                     max_length=max(2, max_length))
    for text in texts:
      for word in _patterns()[1].findall(normalizer.normalize(text)):
        chars = "".join(byte[b] for b in word.encode("utf-8"))
        symbols = tuple(chars[:-1]) + (chars[-1] + _SUFFIX,)
        counts[symbols] = counts.get(symbols, 0) + 1
    merges: list[tuple[str, str]] = []
    known = set(vocab_list)
    while len(merges) < num_merges:
      pairs: dict[tuple[str, str], int] = {}
      for symbols, n in counts.items():
        for pair in zip(symbols, symbols[1:]):
          pairs[pair] = pairs.get(pair, 0) + n
      if not pairs:
        break
      best = max(pairs.items(), key=lambda kv: kv[1])  # the first of equal counts (dicts keep order)
      if best[1] < 2:
        break
      a, b = best[0]
      merges.append((a, b))
      if a + b not in known:
        known.add(a + b)
        vocab_list.append(a + b)
      merged_counts: dict[tuple[str, ...], int] = {}
      for symbols, n in counts.items():
        out = _merge(symbols, a, b)
        merged_counts[out] = merged_counts.get(out, 0) + n
      counts = merged_counts
    vocab = {s: i for i, s in enumerate(vocab_list + ["<|startoftext|>", "<|endoftext|>"])}
    return cls(vocab, merges, max_length=max_length)

  def save_pretrained(self, folder: str | os.PathLike) -> Path:
    """Writes ``vocab.json``, ``merges.txt``, ``special_tokens_map.json`` and ``tokenizer_config.json``:
    a tokenizer folder that :meth:`from_pretrained` and transformers' ``CLIPTokenizer`` both read."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
    merges = sorted(self.ranks.items(), key=lambda kv: kv[1])
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for (a, b), _ in merges),
                                     encoding="utf-8")
    specials = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                "unk_token": self.unk_token}
    (path / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    config = {**specials, "model_max_length": self.max_length, "tokenizer_class": "CLIPTokenizer",
              "do_lower_case": True, "clean_up_tokenization_spaces": False}
    if self.added:  # transformers' layout of non-special added tokens
      config["added_tokens_decoder"] = {
          str(i): {"content": tok, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False,
                   "special": False} for tok, i in self.added.items()}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path

  @property
  def vocab_size(self) -> int:
    """Number of ids: the vocabulary plus the added tokens."""
    return len(self.vocab) + len(self.added)

  def add_tokens(self, tokens: Sequence[str]) -> CLIPTokenizer:
    """A new tokenizer with ``tokens`` added after the current ids (``vocab_size``, ``vocab_size + 1``, ...).

    Raises:
      ValueError: a token is already in the vocabulary or added, or repeats.

    Example:
      >>> tok2 = tok.add_tokens(["<cat-toy>"])  # doctest: +SKIP
      >>> tok2.encode("a <cat-toy>")[2] == tok.vocab_size  # doctest: +SKIP
      True
    """
    merges = [pair for pair, _ in sorted(self.ranks.items(), key=lambda kv: kv[1])]
    return type(self)(self.vocab, merges, max_length=self.max_length, bos_token=self.bos_token,
                      eos_token=self.eos_token, pad_token=self.pad_token, unk_token=self.unk_token,
                      added_tokens=[*self.added, *tokens])

  def _bpe_uncached(self, word: str) -> tuple[str, ...]:
    symbols = list(word[:-1]) + [word[-1] + _SUFFIX]
    while len(symbols) > 1:
      pairs = [(self.ranks.get((a, b), None), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
      ranked = [(r, i) for r, i in pairs if r is not None]
      if not ranked:
        break
      best = min(ranked)[0]
      a, b = next((symbols[i], symbols[i + 1]) for r, i in ranked if r == best)
      symbols = _merge(symbols, a, b)
    return tuple(symbols)

  def normalize(self, text: str) -> str:
    """NFC, whitespace runs -> one space, lower case (the normalisation applied between special tokens).

    Lower-casing is per character, as the tokenizers library does it (no Greek final-sigma rule).
    """
    text = _patterns()[2].sub(" ", unicodedata.normalize("NFC", text))
    return "".join(map(str.lower, text)) if "\u03a3" in text else text.lower()

  def tokenize(self, text: str) -> list[str]:
    """The BPE token strings of ``text`` (no bos/eos)."""
    tokens: list[str] = []
    for segment in self._special_re.split(text) if self.specials else [text]:
      if not segment:
        continue
      if segment in self.specials:
        tokens.append(segment)
        continue
      text = self.normalize(segment)
      for piece in self._added_re.split(text) if self._added_re is not None else [text]:
        if piece in self._added_norm:
          tok = self._added_norm[piece]
          tokens.append(tok)  # then tok_1, tok_2, ... (a multi-vector token)
          tokens.extend(itertools.takewhile(self.added.__contains__, (f"{tok}_{i}" for i in itertools.count(1))))
          continue
        for word in _patterns()[1].findall(piece):
          tokens.extend(self._bpe("".join(self._byte[b] for b in word.encode("utf-8"))))
    return tokens

  def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Token ids of one string, untruncated and unpadded (bos/eos added unless disabled).

    Example:
      >>> tok.encode("a cat")  # [bos, id("a</w>"), id("cat</w>"), eos]  # doctest: +SKIP
    """
    ids = [self.vocab.get(tok, self.added.get(tok, self.unk_token_id)) for tok in self.tokenize(text)]
    return [self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids

  def __call__(self, texts: str | Sequence[str], *, max_length: int | None = None,
               return_attention_mask: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Ids ``[B, max_length]`` int32: bos + tokens + eos, truncated (keeping eos) and padded.

    Args:
      texts: one string or a list of strings.
      max_length: sequence length; defaults to the tokenizer's ``max_length``.
      return_attention_mask: also return the ``[B, max_length]`` int32 mask (1 on real tokens).

    Example:
      >>> ids = tok(["a photo of a cat"])  # doctest: +SKIP
    """
    if isinstance(texts, str):
      texts = [texts]
    length = self.max_length if max_length is None else int(max_length)
    if length < 2:
      raise ValueError(f"max_length must be >= 2, got {length}")
    ids = np.full((len(texts), length), self.pad_token_id, np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for row, text in enumerate(texts):
      if not isinstance(text, str):
        raise TypeError(f"texts[{row}] is {type(text).__name__}, expected str")
      body = self.encode(text, add_special_tokens=False)[: length - 2]
      seq = [self.bos_token_id, *body, self.eos_token_id]
      ids[row, : len(seq)] = seq
      mask[row, : len(seq)] = 1
    return (ids, mask) if return_attention_mask else ids

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
    """Text of token ids (word boundaries from ``</w>``); lossy only in case and whitespace."""
    skip = {self.bos_token_id, self.eos_token_id, self.pad_token_id} if skip_special_tokens else set()
    pieces = [self.inverse.get(int(i), self.unk_token) for i in ids if int(i) not in skip]
    text = "".join(pieces)
    raw = bytearray()
    for ch in text.replace(_SUFFIX, " "):
      raw.extend(bytes([self._unbyte[ch]]) if ch in self._unbyte else ch.encode("utf-8"))
    return raw.decode("utf-8", errors="replace").strip()


class ByteTokenizer:
  """One token per UTF-8 byte (ids 0..255) plus pad=256, bos=257, eos=258; fixed ``max_length``.

  For text encoders trained from scratch in jdiff (no vocabulary files). Rows are
  ``[bos] + bytes + [eos]`` truncated to ``max_length`` (eos kept) and padded with ``pad``.

  Example:
    >>> tok = ByteTokenizer(max_length=8)
    >>> tok(["hi"]).tolist()
    [[257, 104, 105, 258, 256, 256, 256, 256]]
  """
  pad_token_id = 256
  bos_token_id = 257
  eos_token_id = 258
  vocab_size = 259

  def __init__(self, max_length: int = 77, *, lowercase: bool = False):
    if max_length < 2:
      raise ValueError(f"max_length must be >= 2 (room for bos and eos), got {max_length}")
    self.max_length = int(max_length)
    self.lowercase = lowercase

  def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
    if self.lowercase:
      text = text.lower()
    ids = list(unicodedata.normalize("NFC", text).encode("utf-8"))
    return [self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids

  def __call__(self, texts: str | Sequence[str], *, max_length: int | None = None,
               return_attention_mask: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Ids ``[B, max_length]`` int32 (and the attention mask when asked)."""
    if isinstance(texts, str):
      texts = [texts]
    length = self.max_length if max_length is None else int(max_length)
    ids = np.full((len(texts), length), self.pad_token_id, np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for row, text in enumerate(texts):
      body = self.encode(text, add_special_tokens=False)[: length - 2]
      seq = [self.bos_token_id, *body, self.eos_token_id]
      ids[row, : len(seq)] = seq
      mask[row, : len(seq)] = 1
    return (ids, mask) if return_attention_mask else ids

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
    data = bytes(int(i) for i in ids if int(i) < 256)
    return data.decode("utf-8", errors="replace")
