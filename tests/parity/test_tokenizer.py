"""CLIP BPE tokenizer parity with transformers' CLIPTokenizer on a small vocabulary written by the test."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from jdiff.tokenizers import ByteTokenizer, CLIPTokenizer, bytes_to_unicode

transformers = pytest.importorskip("transformers")

WORDS = ["a", "photo", "of", "the", "cat", "dog", "astronaut", "riding", "horse", "on", "mars", "don", "'t",
         "'s", "numbers", "and", "lots", "whitespace", "café", "naïve", "東京", "ß", "hyphen", "words", "!!",
         "...", "1", "2", "in", "snow", "red", "fox", "with", "high", "detail", "ated", "es", "ing", "er"]

TEXTS = [
    "a photo of a cat",
    "A PHOTO Of The CAT!!!",
    "it's, don't you'll we'd they've I'm we're",
    "numbers 12345 and 3.14, 1e-9 and ⅔ ²",
    "  lots\t\nof   whitespace\u00a0\u2003here  ",
    "café naïve résumé — “quotes” … 東京 🙂 Ünïcödé ß İstanbul ΣΟΦΟΣ",
    "cafe\u0301 (decomposed accent)",
    "hyphen-ated words/with slashes & symbols #1 @home $5 % ^_^ <tag>",
    "an astronaut riding a horse on mars, high detail, 8k, trending on artstation " * 6,
    "",
    "<|startoftext|>inner text<|endoftext|> and after",
]


def _vocab_and_merges(seed: int = 0):
  """Byte-level base symbols (with and without </w>), merges that build WORDS left to right plus a few
  competing merges; every merge comes after the merges that build its parts."""
  base = list(bytes_to_unicode().values())
  vocab = base + [c + "</w>" for c in base]
  merges: set[tuple[str, str]] = set()
  for word in WORDS:
    chars = "".join(bytes_to_unicode()[b] for b in word.encode("utf-8"))
    symbols = list(chars[:-1]) + [chars[-1] + "</w>"]
    left = symbols[0]
    for right in symbols[1:]:
      merges.add((left, right))
      left = left + right
    if len(symbols) > 2:  # a competing merge in the middle of the word
      merges.add((symbols[1], symbols[2]))
  rng = random.Random(seed)
  merges = sorted(merges)
  rng.shuffle(merges)
  merges.sort(key=lambda m: len(m[0] + m[1]))  # parts before wholes; random order within a length
  for a, b in merges:
    if a + b not in vocab:
      vocab.append(a + b)
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  return {tok: i for i, tok in enumerate(vocab)}, merges


def write_clip_vocab(folder) -> int:
  """Writes vocab.json and merges.txt of the test vocabulary into ``folder``; returns the vocab size."""
  folder.mkdir(parents=True, exist_ok=True)
  vocab, merges = _vocab_and_merges()
  (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
  lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
  (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
  return len(vocab)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  folder = tmp_path_factory.mktemp("clip_tok")
  write_clip_vocab(folder)
  return folder


@pytest.mark.parametrize("max_length", [77, 16])
def test_ids_equal_transformers(files, max_length):
  ref = transformers.CLIPTokenizer(vocab=str(files / "vocab.json"), merges=str(files / "merges.txt"))
  mine = CLIPTokenizer.from_files(files / "vocab.json", files / "merges.txt")
  want = ref(TEXTS, padding="max_length", max_length=max_length, truncation=True).input_ids
  got = mine(TEXTS, max_length=max_length)
  assert got.dtype == np.int32 and got.shape == (len(TEXTS), max_length)
  for text, g, w in zip(TEXTS, got.tolist(), want):
    assert g == w, text
  # untruncated ids too (what diffusers uses to report truncation)
  for text in TEXTS:
    assert mine.encode(text) == ref(text).input_ids, text


def test_merges_do_something(files):
  mine = CLIPTokenizer.from_files(files / "vocab.json", files / "merges.txt")
  tokens = mine.tokenize("a photo of the astronaut")
  assert tokens[0] == "a</w>" and tokens[-1].endswith("</w>") and "of</w>" in tokens
  assert len(tokens) < len("aphotooftheastronaut")  # merges applied (competing merges may split words)
  assert len(mine.tokenize("zebra")) == 5  # no merges for it: one symbol per byte


def test_from_pretrained_reads_special_tokens(files, tmp_path):
  """An SD2-style tokenizer folder (pad token "!") saved by transformers loads with the same ids."""
  ref = transformers.CLIPTokenizer(vocab=str(files / "vocab.json"), merges=str(files / "merges.txt"),
                                   pad_token="!", model_max_length=20)
  ref.save_pretrained(tmp_path)
  if not (tmp_path / "vocab.json").exists():  # transformers 5 may write only tokenizer.json
    for name in ("vocab.json", "merges.txt"):
      (tmp_path / name).write_bytes((files / name).read_bytes())
  mine = CLIPTokenizer.from_pretrained(tmp_path)
  assert mine.pad_token == "!" and mine.max_length == 20
  want = ref(TEXTS, padding="max_length", max_length=20, truncation=True).input_ids
  assert mine(TEXTS).tolist() == want
  ids, mask = mine(["a cat"], return_attention_mask=True)
  assert mask.tolist() == [[1] * 4 + [0] * 16]


def test_decode_roundtrip(files):
  mine = CLIPTokenizer.from_files(files / "vocab.json", files / "merges.txt")
  assert mine.decode(mine.encode("A photo of 東京, don't!")) == "a photo of 東京 , don 't !"


def test_errors(files, tmp_path):
  with pytest.raises(FileNotFoundError, match="merges.txt"):
    CLIPTokenizer.from_files(files / "vocab.json", tmp_path / "merges.txt")
  (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
  with pytest.raises(ValueError, match="line 2"):
    CLIPTokenizer.from_files(files / "vocab.json", tmp_path / "merges.txt")
  with pytest.raises(ValueError, match="pad_token"):
    CLIPTokenizer.from_files(files / "vocab.json", files / "merges.txt", pad_token="<pad>")


def test_byte_tokenizer():
  tok = ByteTokenizer(max_length=6)
  ids = tok(["hé", "a long prompt"])
  assert ids.tolist() == [[257, 104, 0xC3, 0xA9, 258, 256], [257, 97, 32, 108, 111, 258]]
  assert tok.decode(ids[0]) == "hé"
  assert tok.vocab_size == 259


def test_trained_vocabulary_saved_loads_in_transformers(tmp_path):
  """A vocabulary learned from captions and written by ``save_pretrained`` is read by transformers'
  CLIPTokenizer (as a diffusers pipeline folder's tokenizer) with the same ids, seen words or not."""
  from jdiff.data import digits
  captions = [c for label in range(10) for c in digits.captions_for(label)] * 3  # each seen a few times
  tok = CLIPTokenizer.train(captions, num_merges=120, max_length=16)
  # Frequent words become single tokens; the merges are learned, not given.
  assert tok.tokenize("a handwritten digit seven 7") == ["a</w>", "handwritten</w>", "digit</w>", "seven</w>",
                                                         "7</w>"]
  folder = tok.save_pretrained(tmp_path / "tokenizer")
  ref = transformers.CLIPTokenizer.from_pretrained(str(folder))
  again = CLIPTokenizer.from_pretrained(folder)
  assert again.max_length == 16 and again.vocab == tok.vocab
  for text in TEXTS + captions[:12] + ["a handwritten digit 3", "digits of a hand, written!"]:
    want = ref(text, padding="max_length", max_length=16, truncation=True)["input_ids"]
    np.testing.assert_array_equal(tok([text])[0], want)
    np.testing.assert_array_equal(again([text])[0], want)
