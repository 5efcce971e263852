"""Precomputed encoder outputs: written per process as array_record, read back equal to the
encoders run on the fly on the same crops, and batched by the loader."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import data
from jdiff.models import AutoencoderKL, DiagonalGaussian, VAEConfig

RES, BATCH, VOCAB, WIDTH, LENGTH = 16, 4, 32, 6, 5


@pytest.fixture(scope="module")
def encoders():
  cfg = VAEConfig.preset("tiny", block_out_channels=(8, 8), norm_num_groups=4, latent_channels=2)
  vae = AutoencoderKL(cfg)
  init = jax.jit(functools.partial(vae.init, method=AutoencoderKL.encode))  # the encoder only
  params = init(jax.random.key(0), jnp.zeros((1, RES, RES, 3)))["params"]
  table = jax.random.normal(jax.random.key(1), (VOCAB, WIDTH))

  @jax.jit
  def posterior(x):
    post = vae.apply({"params": params}, x, method=AutoencoderKL.encode)
    return post.mean, post.logvar

  @jax.jit
  def encode_text(ids):  # [B, L] -> a hidden state [B, L, D] and a pooled vector [B, D]
    h = jnp.tanh(table[ids])
    return h, h.mean(axis=1)

  def tokenize(caption):
    ids = np.frombuffer(caption.encode()[:LENGTH], np.uint8) % VOCAB
    return np.pad(ids, (0, LENGTH - len(ids)))

  return posterior, encode_text, tokenize


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  from PIL import Image
  root = tmp_path_factory.mktemp("imgs")
  rng = np.random.default_rng(0)
  lines = []
  for k in range(11):
    h, w = (20, 28) if k % 2 else (24, 17)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{k:02d}.png")
    lines.append(json.dumps({"file_name": f"{k:02d}.png", "text": f"cat {k}"}))
  (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
  raw = (root / "05.png").read_bytes()
  (root / "05.png").write_bytes(raw[:60])  # unreadable: left out of the precomputed data
  return str(root)


def _write(folder, out, encoders, **kw):
  posterior, encode_text, tokenize = encoders
  src = data.ImageFolder(folder, verify="none")
  for k in range(2):  # two processes, each its own contiguous block
    data.precompute(src, out, encode_image=posterior, encode_text=encode_text, tokenize=tokenize,
                    batch_size=BATCH, image_size=RES, crop="random", flip=True, seed=7, shard_index=k,
                    shard_count=2, **kw)
  return src


def test_round_trip_equals_encoding_on_the_fly(tmp_path, folder, encoders):
  posterior, encode_text, tokenize = encoders
  src = _write(folder, tmp_path / "pre", encoders)
  pre = data.PrecomputedSource(tmp_path / "pre")
  assert len(pre) == 10 and pre.unreadable == [os.path.join(folder, "05.png")]
  assert pre.config["image_size"] == RES and pre.config["crop"] == "random"
  prep = data.Preprocess(image_size=RES, crop="random", flip=True, seed=7, tokenize=tokenize)
  indices = [pre[j]["index"] for j in range(len(pre))]
  assert [int(i) for i in indices] == [i for i in range(11) if i != 5]
  # On the fly: the epoch-0 crop/flip of each example through the same encoders, batched alone.
  for j in range(len(pre)):
    rec = pre[j]
    i = int(rec["index"])
    ex = prep(src[i], i, 0)
    mean, logvar = posterior(ex["image"][None])
    hidden, pooled = encode_text(ex["tokens"][None])
    # The same function on a batch of 4 (precompute) or 1 (here): float32 rounding of the convs.
    tol = dict(rtol=1e-5, atol=1e-5 * float(np.abs(mean).max()))
    np.testing.assert_allclose(rec["latent_mean"], mean[0], **tol)
    np.testing.assert_allclose(rec["latent_logvar"], logvar[0], rtol=1e-5, atol=1e-5 * float(np.abs(logvar).max()))
    np.testing.assert_allclose(rec["text"]["0"], hidden[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rec["text"]["1"], pooled[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(rec["crops_coords_top_left"], ex["crops_coords_top_left"])
    np.testing.assert_array_equal(rec["original_size"], src[i]["image"].shape[:2])
    # The latent drawn from stored moments with a step key is the live posterior's draw.
    key = jax.random.fold_in(jax.random.key(3), j)
    live = posterior(ex["image"][None])
    want = DiagonalGaussian(mean=live[0], logvar=live[1]).sample(key=key)
    got = data.sample_latents(rec["latent_mean"][None], rec["latent_logvar"][None], key=key)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_loader_over_precomputed_data(tmp_path, folder, encoders):
  _write(folder, tmp_path / "pre", encoders)
  pre = data.PrecomputedSource(tmp_path / "pre")
  shards = [data.Loader(pre, batch_size=4, seed=2, shard_index=k, shard_count=2) for k in range(2)]
  whole = data.Loader(pre, batch_size=4, seed=2, shard_index=0, shard_count=1)
  for _ in range(5):
    parts = [next(s) for s in shards]
    b = next(whole)
    assert set(b) == {"latent_mean", "latent_logvar", "text", "label", "original_size", "crops_coords_top_left"}
    assert b["latent_mean"].shape == (4, RES // 2, RES // 2, 2) and b["text"]["0"].shape == (4, LENGTH, WIDTH)
    # The per-process blocks make up the single-process global batch.
    np.testing.assert_array_equal(np.concatenate([p["latent_mean"] for p in parts]), b["latent_mean"])
    np.testing.assert_array_equal(np.concatenate([p["text"]["1"] for p in parts]), b["text"]["1"])


def test_precompute_refusals(tmp_path, folder, encoders):
  posterior, encode_text, tokenize = encoders
  src = data.ImageFolder(folder, verify="none")
  with pytest.raises(ValueError) as e:
    data.precompute(src, tmp_path / "x", encode_image=posterior, encode_text=encode_text, tokenize=tokenize,
                    image_size=RES, text_trainable=True, shard_index=0, shard_count=1)
  assert "text encoder trains" in str(e.value) and "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "x")
  data.precompute(src, tmp_path / "half", encode_image=posterior, image_size=RES, batch_size=BATCH,
                  shard_index=0, shard_count=2)
  with pytest.raises(FileNotFoundError) as e:
    data.PrecomputedSource(tmp_path / "half")
  assert "part 1 of 2" in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(FileNotFoundError, match="no precomputed data"):
    data.make_source(kind="precomputed", path=str(tmp_path))


def test_precompute_reuses_a_complete_part_with_the_same_settings(tmp_path, folder, encoders):
  posterior = encoders[0]
  calls = []

  def counting(x):
    calls.append(len(x))
    return posterior(x)

  src = data.ImageFolder(folder, verify="none")
  kw = dict(encode_image=counting, image_size=RES, batch_size=BATCH, shard_index=0, shard_count=1)
  data.precompute(src, tmp_path / "p", tag="vae-a", **kw)
  assert calls == [BATCH] * 3  # 10 readable examples: two full calls and one padded
  data.precompute(src, tmp_path / "p", tag="vae-a", **kw)
  assert len(calls) == 3
  data.precompute(src, tmp_path / "p", tag="vae-b", **kw)  # other encoders: written again
  assert len(calls) == 6 and data.PrecomputedSource(tmp_path / "p").config["tag"] == "vae-b"
