"""Text generation: Hugging Face parity, KV cache == full recomputation, decoding rules.

The reference outputs (tests/fixtures/parity/gpt2_tiny/generate.npz) are those of
transformers' ``GPT2LMHeadModel.generate`` on the saved gpt2_tiny model; see
tests/fixtures/parity/README.md.
"""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import generate as gen
from dpjax.models import gpt2, lora, pretrained

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "parity"
SHARP = gpt2.GPT2Config(vocab_size=64, n_positions=48, n_embd=32, n_layer=2, n_head=4)
PROMPTS = [[5, 9, 33, 2, 17], [40], [7, 7, 8, 9, 10, 11, 12, 60, 61, 1, 2]]


@functools.cache
def tiny_hf():
  model, params, _ = pretrained.load(FIXTURES / "gpt2_tiny", with_tokenizer=False)
  return model, params, dict(np.load(FIXTURES / "gpt2_tiny" / "generate.npz"))


@functools.cache
def sharp_lora():
  """A random GPT-2 with LoRA on c_attn whose outputs vary (weights std 0.2, lora_b != 0).

  The default init (std 0.02) gives almost flat distributions and repeats one
  token; these weights make greedy, beam and sampled outputs all differ.
  """
  cfg = lora.LoraConfig(rank=2, alpha=4.0, targets=lora.LORA_TARGETS["gpt2"])
  model = gpt2.GPT2LMHeadModel(SHARP, cfg)
  ones = jnp.ones((1, 4), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), ones, ones)["params"]
  rng = np.random.default_rng(1)

  def draw(path, leaf):
    std = 0.1 if path[-1].key == "bias" else 0.2
    if path[-1].key == "scale":  # LayerNorm
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(leaf.shape), jnp.float32)
    return jnp.asarray(std * rng.standard_normal(leaf.shape), jnp.float32)

  return model, jax.tree_util.tree_map_with_path(draw, shapes)


def fixture_config(z, case):
  early = str(z[f"{case}/early_stopping"][0])
  eos = int(z[f"{case}/eos_token_id"][0])
  beams = int(z[f"{case}/num_beams"][0])
  return gen.GenerationConfig(
    max_new_tokens=int(z[f"{case}/max_new_tokens"][0]),
    strategy="beam" if beams > 1 else "greedy",
    num_beams=beams,
    length_penalty=float(z[f"{case}/length_penalty"][0]),
    early_stopping={"True": True, "False": False}.get(early, early),
    eos_token_id=None if eos < 0 else eos,
    pad_token_id=int(z["pad_token_id"][0]),
  )


CASES = ["greedy", "greedy_eos", "beam", "beam_eos", "beam_eos72_early", "beam_eos_never"]


@pytest.mark.parametrize("case", CASES)
def test_matches_transformers_generate(case):
  model, params, z = tiny_hf()
  assert case in z["cases"].tolist()
  prompts = [ids[m == 1].tolist() for ids, m in zip(z["input_ids"], z["attention_mask"])]
  assert [len(p) for p in prompts] == z["prompt_lengths"].tolist()
  config = fixture_config(z, case)
  want = z[f"{case}/output"]
  got = gen.generate(model, params, prompts, config)
  assert got.dtype == np.int32 and got.shape == want.shape
  np.testing.assert_array_equal(got, want)


def test_fixture_cases_are_not_trivial():
  """The HF cases exercise what they claim: EOS ends rows early, beam search differs from greedy."""
  _, _, z = tiny_hf()
  eos, pad = int(z["eos_token_id"][0]), int(z["pad_token_id"][0])
  for case in ("greedy_eos", "beam_eos"):
    ended = 0
    for row in z[f"{case}/output"].tolist():
      if eos in row[:-1]:
        ended += 1
        assert set(row[row.index(eos) + 1 :]) == {pad}
    assert ended >= 1
  assert not np.array_equal(z["beam/output"], z["greedy/output"][:, :8])
  assert not np.array_equal(z["beam/output"], z["beam_eos/output"])


def test_kv_cache_prefill_and_decode_match_transformers_logits():
  """Prefill 6 tokens, then decode one at a time: the logits of HF's full forward pass.

  expected.npz: batch 2 x 12 tokens, row 1 right-padded (its last 4 keys are
  masked), positions 0..11 (see tests/fixtures/parity/README.md).
  """
  model, params, _ = tiny_hf()
  want = dict(np.load(FIXTURES / "gpt2_tiny" / "expected.npz"))
  ids, mask, positions = want["input_ids"], want["attention_mask"], want["position_ids"]
  apply = jax.jit(model.apply)
  cache = gpt2.init_cache(model.config, 2, 12)
  logits, cache = apply({"params": params}, ids[:, :6], mask, positions[:, :6], cache=cache)
  assert int(cache["index"]) == 6
  steps = [logits]
  for t in range(6, 12):
    logits, cache = apply(
      {"params": params}, ids[:, t : t + 1], mask, positions[:, t : t + 1], cache=cache
    )
    steps.append(logits)
  assert int(cache["index"]) == 12
  np.testing.assert_allclose(np.concatenate(steps, axis=1), want["logits"], atol=1e-4)
  # Without a cache the call is unchanged: logits only.
  assert not isinstance(jax.eval_shape(model.apply, {"params": params}, ids, mask), tuple)


def _eos_from(out, row=0, step=3):
  """A token the decoder actually produces mid-row (so EOS matters)."""
  return int(out[row, step])


def test_cached_equals_uncached_greedy_with_lora_and_eos_then_padding():
  model, params = sharp_lora()
  config = gen.GenerationConfig(max_new_tokens=12, pad_token_id=0)
  plain = gen.generate(model, params, PROMPTS, config)
  np.testing.assert_array_equal(plain, gen.generate_uncached(model, params, PROMPTS, config))
  assert len({tuple(r) for r in plain.tolist()}) == 3 and len(set(plain[0].tolist())) > 3
  # LoRA is used: zeroing the adapters changes the output (same compiled program).
  no_lora = jax.tree_util.tree_map_with_path(
    lambda p, x: jnp.zeros_like(x) if p[-1].key == "lora_b" else x, params
  )
  assert not np.array_equal(gen.generate(model, no_lora, PROMPTS, config), plain)

  eos = _eos_from(plain)
  with_eos = gen.GenerationConfig(max_new_tokens=12, eos_token_id=eos, pad_token_id=63)
  out = gen.generate(model, params, PROMPTS, with_eos)
  np.testing.assert_array_equal(out, gen.generate_uncached(model, params, PROMPTS, with_eos))
  for row, ref in zip(out, plain):
    hits = np.flatnonzero(ref == eos)
    if hits.size == 0:
      np.testing.assert_array_equal(row, ref)
    else:  # the same tokens up to the first EOS (kept), then padding
      end = hits[0] + 1
      np.testing.assert_array_equal(row[:end], ref[:end])
      assert (row[end:] == 63).all()
  assert (out == 63).any()


@pytest.mark.parametrize("early_stopping", [False, True])
def test_cached_equals_uncached_beam(early_stopping):
  model, params = sharp_lora()
  config = gen.GenerationConfig(
    max_new_tokens=12, strategy="beam", num_beams=3, early_stopping=early_stopping
  )
  out = gen.generate(model, params, PROMPTS, config)
  np.testing.assert_array_equal(out, gen.generate_uncached(model, params, PROMPTS, config))
  greedy = gen.generate(model, params, PROMPTS, gen.GenerationConfig(max_new_tokens=12))
  assert not np.array_equal(out, greedy)  # beam search found other (better-scored) sequences
  eos = _eos_from(out, row=1, step=2)
  config = gen.GenerationConfig(
    max_new_tokens=12,
    strategy="beam",
    num_beams=3,
    early_stopping=early_stopping,
    eos_token_id=eos,
    length_penalty=0.5,
  )
  out = gen.generate(model, params, PROMPTS, config)
  np.testing.assert_array_equal(out, gen.generate_uncached(model, params, PROMPTS, config))


def _beam_steps(config, *probs):
  """Runs beam_search_step on one row with the given next-token probabilities per step."""
  state = gen.init_beam_state(1, config)
  for step, p in enumerate(probs):
    logits = jnp.log(jnp.asarray(p, jnp.float32)).reshape(config.num_beams, -1)
    state, _ = gen.beam_search_step(state, logits, step, config)
  return state


def test_beam_rows_close_when_no_running_beam_can_win():
  """Hand-computed (K=1, EOS 0, N=5): the closing heuristic of rule 5 decides the result.

  Step 0: candidates EOS (log .5 = -0.69, rank 0: finished with score -0.69) and
  token 1 (log .45 = -0.80, running). early_stopping=False scores the running
  beam at its current length: -0.80 / 1 <= -0.69, so the row closes and the
  search ends with [EOS]. With "never" it is scored at N=5: -0.80 / 5 > -0.69,
  so it stays open and at step 1 [1, EOS] scores (-0.80 - 0.02) / 2 = -0.41 > -0.69.
  """
  base = dict(max_new_tokens=5, strategy="beam", num_beams=1, eos_token_id=0, pad_token_id=9)
  step0, step1 = [0.5, 0.45, 0.05], [0.98, 0.01, 0.01]
  closed = _beam_steps(gen.GenerationConfig(**base), step0)
  assert not bool(closed.open_rows[0]) and bool(closed.done)
  np.testing.assert_array_equal(closed.finished_tokens[0, 0], [0, 9, 9, 9, 9])
  np.testing.assert_allclose(closed.finished_scores[0, 0], np.log(0.5), rtol=1e-6)
  never = gen.GenerationConfig(**base, early_stopping="never")
  state = _beam_steps(never, step0)
  assert bool(state.open_rows[0]) and not bool(state.done)
  state = _beam_steps(never, step0, step1)
  np.testing.assert_array_equal(state.finished_tokens[0, 0], [1, 0, 9, 9, 9])
  np.testing.assert_allclose(
    state.finished_scores[0, 0], (np.log(0.45) + np.log(0.98)) / 2, rtol=1e-6
  )
  # An EOS candidate of rank >= K is not offered (here rank 1 of 2K = 2).
  state = _beam_steps(gen.GenerationConfig(**base), [0.4, 0.5, 0.1])
  assert not bool(state.finished_flags[0, 0]) and int(state.running_tokens[0, 0, 0]) == 1


def test_sampling_cached_equals_uncached_and_follows_the_rng():
  model, params = sharp_lora()
  config = gen.GenerationConfig(
    max_new_tokens=12, strategy="sample", temperature=0.7, top_k=20, top_p=0.9
  )
  key = jax.random.PRNGKey(3)
  out = gen.generate(model, params, PROMPTS, config, rng=key)
  np.testing.assert_array_equal(out, gen.generate_uncached(model, params, PROMPTS, config, key))
  np.testing.assert_array_equal(out, gen.generate(model, params, PROMPTS, config, rng=key))
  other = gen.generate(model, params, PROMPTS, config, rng=jax.random.PRNGKey(4))
  assert not np.array_equal(out, other)
  with pytest.raises(ValueError, match="rng"):
    gen.generate(model, params, PROMPTS, config)


def test_top_k_1_sampling_is_greedy():
  model, params = sharp_lora()
  greedy = gen.generate(model, params, PROMPTS, gen.GenerationConfig(max_new_tokens=12))
  sample = gen.GenerationConfig(max_new_tokens=12, strategy="sample", top_k=1, temperature=2.0)
  for seed in range(2):
    got = gen.generate_uncached(model, params, PROMPTS, sample, jax.random.PRNGKey(seed))
    np.testing.assert_array_equal(got, greedy)


def _allowed(logits, top_k, top_p):
  """Reference for the warpers, row by row in float64: the token ids sampling may draw."""
  out = []
  for row in np.asarray(logits, np.float64):
    keep = np.ones(row.shape, bool)
    if top_k:
      keep &= row >= np.sort(row)[-top_k]
    if top_p < 1:
      order = [i for i in np.argsort(-row, kind="stable") if keep[i]]
      probs = np.exp(row[order] - row[order].max())
      probs /= probs.sum()
      # Most likely first: keep a token while the mass before it is < top_p.
      before = np.concatenate([[0.0], np.cumsum(probs)[:-1]])
      keep = np.zeros(row.shape, bool)
      keep[[i for i, b in zip(order, before) if b < top_p]] = True
    out.append(set(np.flatnonzero(keep).tolist()))
  return out


def test_warp_logits_on_hand_computed_cases():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = lambda **kw: np.flatnonzero(
    np.isfinite(gen.warp_logits(logits, gen.GenerationConfig(**kw))[0])
  ).tolist()
  assert kept() == [0, 1, 2, 3]
  assert kept(top_k=2) == [0, 1]
  assert kept(top_p=0.75) == [0, 1]  # 0.5 + 0.3 reaches 0.75
  assert kept(top_p=0.85) == [0, 1, 2]
  assert kept(top_p=0.4) == [0]
  assert kept(top_p=0.01) == [0]  # at least one token
  assert kept(top_k=3, top_p=0.6) == [0, 1]
  # Temperature first: scaled logits (shifted by their max), same order.
  warped = gen.warp_logits(logits, gen.GenerationConfig(temperature=0.5))
  np.testing.assert_allclose(warped, (logits - logits.max()) / 0.5, rtol=1e-6)
  # A tiny temperature is greedy, not an overflow to inf.
  cold = np.asarray(gen.warp_logits(logits, gen.GenerationConfig(temperature=1e-30)))
  assert cold[0, 0] == 0 and np.all(cold[0, 1:] < -1e20)
  # The boundary: equal logits give exact cumulative sums 0.25, 0.5, ...; a token
  # whose ascending cumulative probability equals 1 - top_p is removed.
  flat = jnp.zeros((1, 4))
  count = lambda top_p: int(
    np.isfinite(gen.warp_logits(flat, gen.GenerationConfig(top_p=top_p))).sum()
  )
  assert (count(0.5), count(0.75), count(0.76)) == (2, 3, 4)
  # Ties with the k-th logit stay (as in transformers).
  tied = jnp.array([[1.0, 2.0, 2.0, 0.0]])
  assert np.isfinite(gen.warp_logits(tied, gen.GenerationConfig(top_k=1))[0]).sum() == 2


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.5), (8, 0.7), (1, 0.3)])
def test_sampling_never_picks_a_token_outside_top_k_top_p(top_k, top_p):
  logits = 2.0 * jax.random.normal(jax.random.PRNGKey(0), (64, 20))
  config = gen.GenerationConfig(strategy="sample", top_k=top_k, top_p=top_p)
  allowed = _allowed(logits, top_k, top_p)
  kept = np.isfinite(np.asarray(gen.warp_logits(logits, config)))
  assert [set(np.flatnonzero(k).tolist()) for k in kept] == allowed
  draw = lambda step: gen.next_tokens(logits, config, jax.random.PRNGKey(1), step)
  drawn = np.asarray(jax.jit(jax.vmap(draw))(jnp.arange(50)))  # [step, row]
  for row, ok in enumerate(allowed):
    assert set(drawn[:, row].tolist()) <= ok
  if top_k != 1:  # and it does draw several tokens
    assert max(len(set(drawn[:, r].tolist())) for r in range(64)) > 1


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("max_new_tokens", 0, "max_new_tokens must be an integer >= 1"),
    ("max_new_tokens", 2.5, "max_new_tokens"),
    ("strategy", "topk", r"strategy must be one of \('greedy', 'sample', 'beam'\)"),
    ("temperature", 0.0, "temperature must be a finite number > 0"),
    ("temperature", float("nan"), "temperature"),
    ("top_k", -1, r"top_k must be an integer >= 0"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
    ("top_p", 1.5, "top_p"),
    ("num_beams", 0, "num_beams must be an integer >= 1"),
    ("num_beams", 3, "num_beams must be 1 unless strategy='beam'"),
    ("length_penalty", float("inf"), "length_penalty must be a finite number"),
    ("early_stopping", "always", "early_stopping must be True, False or 'never'"),
    ("eos_token_id", -2, "eos_token_id must be None or an integer >= 0"),
    ("pad_token_id", -1, "pad_token_id must be an integer >= 0"),
    ("pad_token_id", True, "pad_token_id"),
  ],
)
def test_bad_generation_config_raises_naming_the_field(field, value, match):
  with pytest.raises(ValueError, match=match):
    gen.GenerationConfig(**{field: value})


def test_bad_prompts_raise():
  model, params = sharp_lora()
  config = gen.GenerationConfig(max_new_tokens=40)
  with pytest.raises(ValueError, match=r"longest prompt \(9 tokens\).*n_positions \(48\)"):
    gen.generate(model, params, [[1] * 9], config)
  with pytest.raises(ValueError, match=r"n_positions"):
    gen.generate_uncached(model, params, [[1] * 9], config)
  small = gen.GenerationConfig(max_new_tokens=2)
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    gen.generate(model, params, [[1], []], small)
  with pytest.raises(ValueError, match="at least one prompt"):
    gen.generate(model, params, [], small)
  with pytest.raises(ValueError, match=r"outside \[0, vocab_size=64\)"):
    gen.generate(model, params, [[64]], small)
  with pytest.raises(ValueError, match="eos_token_id must be < vocab_size=64"):
    gen.generate(model, params, [[1]], gen.GenerationConfig(eos_token_id=64))


def test_prompt_buckets_share_one_compilation():
  assert gen.prompt_bucket(1, 8, 1024) == 8
  assert gen.prompt_bucket(9, 8, 1024) == 16
  assert gen.prompt_bucket(30, 10, 40) == 30  # capped by n_positions - max_new_tokens
  model, params, _ = tiny_hf()
  config = gen.GenerationConfig(max_new_tokens=10, pad_token_id=1)
  gen.generate(model, params, [[3, 4, 5] * 3, [1], [2, 2]], config)  # longest 9: bucket 16
  size = gen._generate_cached._cache_size()  # pylint: disable=protected-access
  for prompts in ([[5] * 10, [6, 7], [9]], [[8] * 16, [1], [2]]):  # longest 10, 16: bucket 16
    gen.generate(model, params, prompts, config)
  assert gen._generate_cached._cache_size() == size  # pylint: disable=protected-access
  gen.generate(model, params, [[8] * 17, [1], [2]], config)  # bucket 32: a new program
  assert gen._generate_cached._cache_size() == size + 1  # pylint: disable=protected-access


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.95])
def test_top_p_bisection_equals_the_sorted_rule(top_p):
  """The sort-free top-p equals sorting by probability and cutting the cumulative mass."""
  rng = np.random.default_rng(int(top_p * 100))
  logits = rng.normal(0, 3, (64, 2000)).astype(np.float32)
  logits[:8, ::7] = logits[:8, :1]  # ties, some of them at the boundary
  kept = np.isfinite(np.asarray(gen.warp_logits(logits, gen.GenerationConfig(top_p=top_p))))
  for row, keep in zip(logits, kept):
    probs = np.exp(row - row.max())
    probs /= probs.sum()
    order = np.argsort(probs, kind="stable")  # increasing, ties by id
    cumulative = np.cumsum(probs[order])
    remove = cumulative <= 1 - top_p
    remove[-1] = False
    expected = np.ones_like(keep)
    expected[order[remove]] = False
    np.testing.assert_array_equal(keep, expected)
