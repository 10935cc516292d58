"""Text generation with the GPT-2 decoder: greedy, sampling and beam search on a KV cache.

    config = GenerationConfig(max_new_tokens=32, strategy="beam", num_beams=4, eos_token_id=50256)
    new_tokens = generate(model, params, [[464, 3290, 318], [15496]], config)  # int32 [2, 32]

The decoding rules are those of Hugging Face transformers' ``generate`` (checked
token for token against it, tests/models/test_generate.py):

* prompts of different lengths are left-padded; position ids are
  ``cumsum(attention_mask) - 1`` (0 on padding), so padding changes nothing;
* greedy takes the arg max of the logits; sampling draws from the logits after
  temperature, then top-k, then top-p filtering (:func:`warp_logits`);
* once a row has produced ``eos_token_id`` it is finished: every later token
  of that row is ``pad_token_id`` (the EOS itself is kept);
* beam search keeps ``num_beams`` running hypotheses per row and a set of at
  most ``num_beams`` finished ones, scored by sum of log-probs divided by
  ``length ** length_penalty`` (length = number of new tokens, EOS included);
  see :func:`beam_search_step` for the rule of one step.

:func:`generate` runs the prompt through the model once (prefill), then one
cached decode step per new token inside a jitted ``lax.while_loop`` that stops
as soon as every row is finished. It compiles once per model, batch size,
prompt length bucket and (strategy, max_new_tokens, num_beams, top_k, whether
top_p < 1); the other config fields are traced. The padded prompt length is
rounded up to a power of two (at least 8), so prompt sets of similar lengths
reuse one executable. :func:`generate_uncached` applies the same rules but
recomputes the full forward pass at every step; it is the reference for the
cache.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.models import gpt2

PyTree = Any

STRATEGIES = ("greedy", "sample", "beam")
# The "very large negative" score Hugging Face's beam search adds to exclude a candidate.
_EXCLUDED = -1.0e9
_MIN_BUCKET = 8


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(
    x, (bool, np.bool_)
  )


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """How to decode (the fields and their meaning follow Hugging Face's ``GenerationConfig``).

  Attributes:
    max_new_tokens: number of tokens to generate per row, >= 1.
    strategy: ``"greedy"`` (arg max), ``"sample"`` (draw from the warped
      distribution, :func:`warp_logits`) or ``"beam"`` (beam search).
    temperature: > 0; sampling divides the logits by it (greedy and beam
      search ignore it, as Hugging Face does without ``do_sample``).
    top_k: >= 0; sampling keeps the ``top_k`` most likely tokens (and any tied
      with the k-th); 0 keeps all.
    top_p: in (0, 1]; sampling keeps the most likely tokens whose probabilities
      add up to ``top_p`` (at least one; exact rule: :func:`warp_logits`); 1.0 keeps all.
    num_beams: beams per row, >= 1; must be 1 unless ``strategy="beam"``.
    length_penalty: finite; a finished beam scores
      ``sum_logprobs / num_new_tokens ** length_penalty``.
    early_stopping: beam search stopping rule, as in Hugging Face: ``True``
      stops a row once it has ``num_beams`` finished hypotheses; ``False``
      also stops once the best running beam, scored at its current length,
      cannot beat the worst finished one; ``"never"`` scores the running beam
      at ``max_new_tokens`` instead when ``length_penalty > 0``.
    eos_token_id: end-of-sequence id (>= 0, < vocab size) or None (never stop early).
    pad_token_id: >= 0; fills a row's positions after its EOS.
  """

  max_new_tokens: int = 20
  strategy: str = "greedy"
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  num_beams: int = 1
  length_penalty: float = 1.0
  early_stopping: bool | str = False
  eos_token_id: int | None = None
  pad_token_id: int = 0

  def __post_init__(self):
    if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be an integer >= 1 (got {self.max_new_tokens!r})")
    if self.strategy not in STRATEGIES:
      raise ValueError(f"strategy must be one of {STRATEGIES} (got {self.strategy!r})")
    if not _is_number(self.temperature) or not (
      math.isfinite(self.temperature) and self.temperature > 0
    ):
      raise ValueError(f"temperature must be a finite number > 0 (got {self.temperature!r})")
    if not _is_int(self.top_k) or self.top_k < 0:
      raise ValueError(f"top_k must be an integer >= 0, 0 = off (got {self.top_k!r})")
    if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], 1.0 = off (got {self.top_p!r})")
    if not _is_int(self.num_beams) or self.num_beams < 1:
      raise ValueError(f"num_beams must be an integer >= 1 (got {self.num_beams!r})")
    if self.num_beams != 1 and self.strategy != "beam":
      raise ValueError(
        f"num_beams must be 1 unless strategy='beam' (got num_beams={self.num_beams!r} "
        f"with strategy={self.strategy!r})"
      )
    if not _is_number(self.length_penalty) or not math.isfinite(self.length_penalty):
      raise ValueError(f"length_penalty must be a finite number (got {self.length_penalty!r})")
    if not (
      self.early_stopping is True or self.early_stopping is False or self.early_stopping == "never"
    ):
      raise ValueError(
        f"early_stopping must be True, False or 'never' (got {self.early_stopping!r})"
      )
    if self.eos_token_id is not None and (not _is_int(self.eos_token_id) or self.eos_token_id < 0):
      raise ValueError(f"eos_token_id must be None or an integer >= 0 (got {self.eos_token_id!r})")
    if not _is_int(self.pad_token_id) or self.pad_token_id < 0:
      raise ValueError(f"pad_token_id must be an integer >= 0 (got {self.pad_token_id!r})")
    # Plain Python values, so that configs are equal (and hash equal) whatever the input types.
    for name in ("max_new_tokens", "top_k", "num_beams", "pad_token_id"):
      object.__setattr__(self, name, int(getattr(self, name)))
    for name in ("temperature", "top_p", "length_penalty"):
      object.__setattr__(self, name, float(getattr(self, name)))
    if self.eos_token_id is not None:
      object.__setattr__(self, "eos_token_id", int(self.eos_token_id))


# ----------------------------------------------------------------------------
# decoding rules (shared by the cached and the uncached paths)


@dataclasses.dataclass(frozen=True)
class _Program:
  """The part of a config that shapes the compiled program (static under jit)."""

  strategy: str
  max_new_tokens: int
  num_beams: int
  top_k: int
  top_p_on: bool


class _Rules(NamedTuple):
  """The rest of a config, as arrays: changing them does not recompile."""

  eos: jax.Array  # int32; -1: no EOS
  pad: jax.Array  # int32
  temperature: jax.Array  # float32
  top_p_threshold: jax.Array  # float32: 1 - top_p (rounded from float64, as in HF)
  penalties: jax.Array  # float32 [N]: L ** length_penalty for L = 1..N
  stop_when_full: jax.Array  # bool: early_stopping is True
  score_at_max_length: jax.Array  # bool: early_stopping == "never" and length_penalty > 0


def _split(config: GenerationConfig) -> tuple[_Program, _Rules]:
  program = _Program(
    strategy=config.strategy,
    max_new_tokens=config.max_new_tokens,
    num_beams=config.num_beams,
    top_k=config.top_k,
    top_p_on=config.top_p < 1.0,
  )
  # Computed in float64 then rounded, as Hugging Face divides by a Python float.
  lengths = np.arange(1, config.max_new_tokens + 1, dtype=np.float64)
  rules = _Rules(
    eos=np.int32(-1 if config.eos_token_id is None else config.eos_token_id),
    pad=np.int32(config.pad_token_id),
    temperature=np.float32(config.temperature),
    top_p_threshold=np.float32(1.0 - config.top_p),
    penalties=(lengths**config.length_penalty).astype(np.float32),
    stop_when_full=np.bool_(config.early_stopping is True),
    score_at_max_length=np.bool_(config.early_stopping == "never" and config.length_penalty > 0),
  )
  return program, rules


def _warp(logits: jax.Array, program: _Program, rules: _Rules) -> jax.Array:
  logits = logits.astype(jnp.float32)
  # Shifted first, so that a tiny temperature cannot overflow the largest logit to inf.
  logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / rules.temperature
  if program.top_k > 0:
    k = min(program.top_k, logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if program.top_p_on:
    logits = jnp.where(_top_p_removed(logits, rules.top_p_threshold), -jnp.inf, logits)
  return logits


def _top_p_removed(logits: jax.Array, threshold: jax.Array) -> jax.Array:
  """bool [..., V]: the tokens top-p removes, without sorting the vocabulary.

  The rule (Hugging Face's): in increasing order of probability (ties by
  increasing token id), remove each token whose cumulative probability,
  itself included, is <= ``threshold`` = 1 - top_p; the last token is kept.
  Sorting 50k logits per row per step dominates sampling on a CPU, so the
  boundary is found by bisection instead: over the bit patterns of the float32
  probabilities (ordered like the values, since they are >= 0), 32 steps find
  the largest value v with mass(p <= v) <= threshold; every token at or below v
  goes, and of the tokens tied at the next value, as many as still fit, lowest
  ids first. O(32 V) per row.
  """
  probs = jax.nn.softmax(logits, axis=-1)
  bits = jax.lax.bitcast_convert_type(probs, jnp.int32)
  mass_upto = lambda t: jnp.sum(jnp.where(bits <= t[..., None], probs, 0.0), axis=-1)

  def halve(_, bounds):  # invariant: mass_upto(lo) <= threshold, unless lo == hi
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    fits = mass_upto(mid) <= threshold
    return jnp.where(fits, mid, lo), jnp.where(fits, hi, mid)

  start = (jnp.full(bits.shape[:-1], -1, jnp.int32), jnp.max(bits, axis=-1))
  lo, _ = jax.lax.fori_loop(0, 32, halve, start)
  removed = bits <= lo[..., None]
  # The tied group just above the boundary: remove its first r tokens (by id).
  above = jnp.where(bits > lo[..., None], bits, jnp.iinfo(jnp.int32).max)
  group = bits == jnp.min(above, axis=-1, keepdims=True)
  p_group = jnp.max(jnp.where(group, probs, 0.0), axis=-1)
  room = (threshold - mass_upto(lo)) / jnp.maximum(p_group, jnp.finfo(jnp.float32).tiny)
  rank = jnp.cumsum(group, axis=-1)
  removed |= group & (rank <= jnp.floor(room)[..., None])
  # The last token of the increasing order (the most likely, highest id on ties) stays.
  last = probs.shape[-1] - 1 - jnp.argmax(jnp.flip(probs, -1), axis=-1)
  return removed & (jnp.arange(probs.shape[-1]) != last[..., None])


def warp_logits(logits: jax.Array, config: GenerationConfig) -> jax.Array:
  """The sampling distribution's logits: removed tokens get ``-inf``.

  Rules (Hugging Face's logits warpers, in this order):

  1. temperature: ``logits / temperature``;
  2. top-k (if ``top_k > 0``): remove every token whose logit is below the
     ``min(top_k, vocab)``-th largest (ties with it stay);
  3. top-p (if ``top_p < 1``): sort the remaining tokens by increasing logit
     and remove those whose cumulative probability (including their own) is
     ``<= 1 - top_p``; the most likely token is always kept.

  Args:
    logits: [..., vocab] float logits.
    config: supplies ``temperature``, ``top_k`` and ``top_p``.

  Returns:
    float32 logits of the same shape.
  """
  return _warp(logits, *_split(config))


def _pick(logits, program: _Program, rules: _Rules, rng, step) -> jax.Array:
  if program.strategy == "greedy":
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  key = jax.random.fold_in(rng, step)
  return jax.random.categorical(key, _warp(logits, program, rules), axis=-1).astype(jnp.int32)


def next_tokens(
  logits: jax.Array, config: GenerationConfig, rng: jax.Array, step: jax.Array | int
) -> jax.Array:
  """The token each row picks from its logits [B, V] at ``step`` (greedy or sampling).

  Greedy: the arg max (the first one on ties). Sampling: a draw from
  ``softmax(warp_logits(logits))`` with the key ``fold_in(rng, step)``.
  """
  return _pick(logits, *_split(config), rng, step)


def _greedy_update(tokens, finished, logits, step, program: _Program, rules: _Rules, rng):
  """Writes the tokens of ``step`` (pad for finished rows) and marks rows that hit EOS."""
  token = jnp.where(finished, rules.pad, _pick(logits, program, rules, rng, step))
  tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, step, axis=1)
  return tokens, finished | (token == rules.eos)


class BeamState(NamedTuple):
  """Beam search state for B rows of K beams generating N tokens.

  Attributes:
    running_tokens: [B, K, N] int32, the running hypotheses (pad after the current step).
    running_scores: [B, K] float32, their summed log-probabilities.
    finished_tokens: [B, K, N] int32, the finished hypotheses, best first.
    finished_scores: [B, K] float32, their length-penalized scores (-1e9: empty slot).
    finished_flags: [B, K] bool, which finished slots hold a hypothesis.
    open_rows: [B] bool, rows that may still gain a better finished hypothesis.
    done: bool scalar, whether the search is over.
  """

  running_tokens: jax.Array
  running_scores: jax.Array
  finished_tokens: jax.Array
  finished_scores: jax.Array
  finished_flags: jax.Array
  open_rows: jax.Array
  done: jax.Array


def init_beam_state(batch: int, config: GenerationConfig) -> BeamState:
  """Beam 0 of each row starts at score 0 and the others at -1e9 (so step 0 expands beam 0 only)."""
  return _init_beam(batch, config.num_beams, config.max_new_tokens, config.pad_token_id)


def _init_beam(batch: int, k: int, n: int, pad: jax.Array | int) -> BeamState:
  running_scores = jnp.zeros((batch, k), jnp.float32).at[:, 1:].set(_EXCLUDED)
  pads = jnp.full((batch, k, n), pad, jnp.int32)
  return BeamState(
    running_tokens=pads,
    running_scores=running_scores,
    finished_tokens=pads,
    finished_scores=jnp.full((batch, k), _EXCLUDED, jnp.float32),
    finished_flags=jnp.zeros((batch, k), bool),
    open_rows=jnp.ones((batch,), bool),
    done=jnp.zeros((), bool),
  )


def _gather_beams(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [B, M, ...], index [B, K] -> x[b, index[b, k], ...]."""
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def beam_search_step(
  state: BeamState, logits: jax.Array, step: jax.Array | int, config: GenerationConfig
) -> tuple[BeamState, jax.Array]:
  """One step of Hugging Face's beam search, from the running beams' next-token logits.

  Rule (``L = step + 1`` new tokens after this step, N = ``max_new_tokens``):

  1. every continuation (beam b, token v) scores
     ``running_scores[b] + log_softmax(logits[b])[v]``; the 2K best over
     beams x vocabulary are the candidates, ranked by that score;
  2. a candidate ends its hypothesis if its token is EOS or ``L == N``;
  3. the K best candidates that do not end become the running beams;
  4. an ending candidate of rank < K is offered to the finished set with
     score ``sum_logprobs / L ** length_penalty``, unless its row is closed
     (rule 5) or, with ``early_stopping=True``, already has K finished ones;
     the finished set keeps the K best scores of the old ones and the offers;
  5. a row closes (and stays closed) once all K finished slots are full and
     the best running beam's ``score / L' ** length_penalty`` is not above the
     worst finished score, where ``L' = N`` if ``early_stopping == "never"``
     and ``length_penalty > 0``, else ``L' = L``;
  6. the search is done when every row is closed, or (``early_stopping=True``)
     every row has K finished hypotheses, or ``L == N``.

  Args:
    state: the state before this step.
    logits: [B*K, V] next-token logits of the running beams (row-major: row b's
      beams are b*K .. b*K+K-1).
    step: index of the token generated now (0-based).
    config: the beam search settings.

  Returns:
    The new state and the parent beam [B, K] of each new running beam (to
    reorder a KV cache).
  """
  return _beam_step(state, logits, step, _split(config)[1])


def _beam_step(
  state: BeamState, logits: jax.Array, step: jax.Array | int, rules: _Rules
) -> tuple[BeamState, jax.Array]:
  b, k, n = state.running_tokens.shape
  vocab = logits.shape[-1]
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, k, vocab)
  totals = (log_probs + state.running_scores[:, :, None]).reshape(b, k * vocab)
  # 1. candidates
  scores, flat = jax.lax.top_k(totals, 2 * k)
  parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
  candidates = _gather_beams(state.running_tokens, parent)
  candidates = jax.lax.dynamic_update_index_in_dim(candidates, token, step, axis=2)
  # 2. which end
  ends = (token == rules.eos) | (step + 1 >= n)

  # 3. the next running beams
  running = scores + ends.astype(jnp.float32) * _EXCLUDED
  _, keep = jax.lax.top_k(running, k)
  running_tokens = _gather_beams(candidates, keep)
  running_scores = _gather_beams(running, keep)
  parent = _gather_beams(parent, keep)

  # 4. the finished set
  offered = ends & (jnp.arange(2 * k) < k)[None, :]
  final = scores / rules.penalties[step]
  full = jnp.all(state.finished_flags, axis=-1, keepdims=True) & rules.stop_when_full
  final = final + full.astype(jnp.float32) * _EXCLUDED
  final = final + (~state.open_rows[:, None]).astype(jnp.float32) * _EXCLUDED
  final = final + (~offered).astype(jnp.float32) * _EXCLUDED
  merged_scores = jnp.concatenate([state.finished_scores, final], axis=1)
  _, best = jax.lax.top_k(merged_scores, k)
  finished_tokens = _gather_beams(jnp.concatenate([state.finished_tokens, candidates], 1), best)
  finished_scores = _gather_beams(merged_scores, best)
  finished_flags = _gather_beams(jnp.concatenate([state.finished_flags, offered], 1), best)

  # 5. rows that cannot improve close
  hypothetical = jnp.where(rules.score_at_max_length, rules.penalties[-1], rules.penalties[step])
  best_running = running_scores[:, :1] / hypothetical
  worst_finished = jnp.where(
    finished_flags, jnp.min(finished_scores, axis=1, keepdims=True), _EXCLUDED
  )
  open_rows = state.open_rows & jnp.any(best_running > worst_finished, axis=-1)

  # 6. stop
  done = ~jnp.any(open_rows) | jnp.all(ends) | (step + 1 >= n)
  done = done | (jnp.all(finished_flags) & rules.stop_when_full)
  new_state = BeamState(
    running_tokens=running_tokens,
    running_scores=running_scores,
    finished_tokens=finished_tokens,
    finished_scores=finished_scores,
    finished_flags=finished_flags,
    open_rows=open_rows,
    done=done,
  )
  return new_state, parent


_greedy_update_jit = jax.jit(_greedy_update, static_argnames="program")
_beam_step_jit = jax.jit(_beam_step)


# ----------------------------------------------------------------------------
# inputs


def _check_inputs(
  model: gpt2.GPT2LMHeadModel, prompts: Sequence[Sequence[int]], config: GenerationConfig
) -> list[list[int]]:
  if not isinstance(config, GenerationConfig):
    raise TypeError(f"config must be a GenerationConfig (got {type(config).__name__})")
  if not isinstance(model, gpt2.GPT2LMHeadModel):
    raise TypeError(f"model must be a GPT2LMHeadModel (got {type(model).__name__})")
  c = model.config
  rows = [[int(t) for t in p] for p in prompts]
  if not rows:
    raise ValueError("prompts must hold at least one prompt")
  for i, row in enumerate(rows):
    if not row:
      raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
    if min(row) < 0 or max(row) >= c.vocab_size:
      raise ValueError(f"prompt {i} has token ids outside [0, vocab_size={c.vocab_size})")
  longest = max(len(r) for r in rows)
  if longest + config.max_new_tokens > c.n_positions:
    raise ValueError(
      f"the longest prompt ({longest} tokens) + max_new_tokens ({config.max_new_tokens}) "
      f"exceeds the model's n_positions ({c.n_positions})"
    )
  if config.eos_token_id is not None and config.eos_token_id >= c.vocab_size:
    raise ValueError(
      f"eos_token_id must be < vocab_size={c.vocab_size} (got {config.eos_token_id})"
    )
  if config.strategy == "beam" and 2 * config.num_beams > config.num_beams * c.vocab_size:
    raise ValueError(f"num_beams={config.num_beams} needs a vocabulary of >= 2 tokens")
  return rows


def prompt_bucket(longest: int, max_new_tokens: int, n_positions: int) -> int:
  """The padded prompt length: the next power of two >= ``longest`` (at least 8).

  Capped at ``n_positions - max_new_tokens`` so the cache never has more slots
  than the model has positions (never below ``longest``).
  """
  bucket = max(_MIN_BUCKET, 1 << (longest - 1).bit_length())
  return max(longest, min(bucket, n_positions - max_new_tokens))


def left_pad(rows: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, ...]:
  """Left-pads token lists to ``length``: (input_ids, attention_mask), int32 [B, length]."""
  ids = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    ids[i, length - len(row) :] = row
    mask[i, length - len(row) :] = 1
  return ids, mask


def _positions(mask: jax.Array) -> jax.Array:
  """Hugging Face generate's position ids: cumsum(mask) - 1, 0 on padding."""
  return jnp.where(mask > 0, jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)


def _feed(tokens: jax.Array, vocab: int) -> jax.Array:
  # Pad ids may lie outside the vocabulary; they are fed only where nothing reads them.
  return jnp.clip(tokens, 0, vocab - 1)


def _rng(rng: jax.Array | None, config: GenerationConfig) -> jax.Array:
  if rng is None:
    if config.strategy == "sample":
      raise ValueError("strategy='sample' needs an rng (a jax.random key)")
    return jax.random.PRNGKey(0)
  return rng


# ----------------------------------------------------------------------------
# cached generation


@functools.partial(jax.jit, static_argnames=("model", "program"))
def _generate_cached(
  model: gpt2.GPT2LMHeadModel,
  program: _Program,
  rules: _Rules,
  params: PyTree,
  input_ids: jax.Array,
  attention_mask: jax.Array,
  rng: jax.Array,
) -> jax.Array:
  """Prefill + a while_loop of cached decode steps; returns int32 [B, max_new_tokens]."""
  batch, prompt_len = input_ids.shape
  n, k = program.max_new_tokens, program.num_beams
  vocab = model.config.vocab_size
  beam = program.strategy == "beam"
  rows = batch * k if beam else batch
  # Cache slots: the padded prompt, then one per new token (the causal rule
  # hides the slots not written yet, so their mask can be 1 already).
  mask = jnp.concatenate([attention_mask, jnp.ones((batch, n), attention_mask.dtype)], axis=1)
  lengths = jnp.sum(attention_mask, axis=-1).astype(jnp.int32)
  dtype = params["wte"]["embedding"].dtype
  cache = gpt2.init_cache(model.config, batch, prompt_len + n, dtype)
  logits, cache = model.apply(
    {"params": params},
    _feed(input_ids, vocab),
    mask,
    _positions(attention_mask),
    cache=cache,
  )
  logits = logits[:, -1].astype(jnp.float32)
  if beam:  # every beam starts from the prompt
    cache = jax.tree_util.tree_map(lambda x: jnp.repeat(x, k, axis=0) if x.ndim else x, cache)
    logits = jnp.repeat(logits, k, axis=0)
    mask = jnp.repeat(mask, k, axis=0)
    lengths = jnp.repeat(lengths, k, axis=0)

  def decode(cache, tokens, step):
    """Logits for ``step``: feeds the tokens of ``step - 1`` (cache slot prompt_len + step - 1)."""
    logits, cache = model.apply(
      {"params": params},
      _feed(tokens, vocab)[:, None],
      mask,
      (lengths + step - 1)[:, None],
      cache=cache,
    )
    return logits[:, 0].astype(jnp.float32), cache

  def next_logits(go_on, cache, tokens, step):
    """Decodes only if another step follows (the model is inlined once, in the loop)."""
    return jax.lax.cond(
      go_on, decode, lambda c, *_: (jnp.zeros_like(logits), c), cache, tokens, step
    )

  # Each loop iteration picks the tokens of ``step`` from ``logits``, then
  # computes the logits of step + 1 from them.
  if not beam:

    def cond(carry):
      return ~carry[-1]

    def body(carry):
      step, tokens, finished, logits, cache, _ = carry
      tokens, finished = _greedy_update(tokens, finished, logits, step, program, rules, rng)
      stop = (step + 1 >= n) | jnp.all(finished)
      logits, cache = next_logits(~stop, cache, tokens[:, step], step + 1)
      return step + 1, tokens, finished, logits, cache, stop

    tokens = jnp.full((batch, n), rules.pad, jnp.int32)
    finished = jnp.zeros((batch,), bool)
    init = (jnp.int32(0), tokens, finished, logits, cache, jnp.zeros((), bool))
    return jax.lax.while_loop(cond, body, init)[1]

  offsets = (jnp.arange(batch) * k)[:, None]

  def reorder(cache, parent):
    flat = (parent + offsets).reshape(rows)
    layers = jax.tree_util.tree_map(lambda x: x[flat], cache["layers"])
    return gpt2.KVCache(layers=layers, index=cache["index"])

  def beam_cond(carry):
    return ~carry[1].done

  def beam_body(carry):
    step, state, logits, cache = carry
    state, parent = _beam_step(state, logits, step, rules)
    new = jax.lax.dynamic_index_in_dim(state.running_tokens, step, axis=2, keepdims=False)
    logits, cache = next_logits(~state.done, reorder(cache, parent), new.reshape(rows), step + 1)
    return step + 1, state, logits, cache

  init = (jnp.int32(0), _init_beam(batch, k, n, rules.pad), logits, cache)
  return jax.lax.while_loop(beam_cond, beam_body, init)[1].finished_tokens[:, 0]


def generate(
  model: gpt2.GPT2LMHeadModel,
  params: PyTree,
  prompts: Sequence[Sequence[int]],
  config: GenerationConfig,
  rng: jax.Array | None = None,
) -> np.ndarray:
  """Generates ``config.max_new_tokens`` tokens after each prompt, on a KV cache.

  Prompts are left-padded to a length bucket (:func:`prompt_bucket`) with
  position ids ``cumsum(mask) - 1``; one forward pass over the prompts fills
  the cache, then each new token costs one single-token forward pass inside a
  jitted ``lax.while_loop`` that ends early once every row is finished.
  Compiled once per model, batch size, bucket and (strategy, max_new_tokens,
  num_beams, top_k, top_p < 1); the other config fields (EOS and pad ids,
  temperature, top_p, length_penalty, early_stopping) are traced arguments.

  Args:
    model: a GPT-2 LM (LoRA adapters are used if it has them).
    params: its full parameters (``model.init(...)["params"]``, LoRA included).
    prompts: B lists of token ids, of any lengths >= 1.
    config: the decoding rules.
    rng: a ``jax.random`` key; required for ``strategy="sample"`` (step t uses
      ``fold_in(rng, t)``), ignored otherwise.

  Returns:
    int32 [B, max_new_tokens]: the new tokens of each row (for beam search,
    of its best hypothesis); after a row's EOS (kept), ``pad_token_id``.

  Raises:
    ValueError: no prompt, an empty prompt, a token outside the vocabulary, a
      prompt longer than ``n_positions - max_new_tokens``, an EOS id outside
      the vocabulary, or sampling without ``rng``.
  """
  rows = _check_inputs(model, prompts, config)
  rng = _rng(rng, config)
  longest = max(len(r) for r in rows)
  bucket = prompt_bucket(longest, config.max_new_tokens, model.config.n_positions)
  input_ids, attention_mask = left_pad(rows, bucket, config.pad_token_id)
  program, rules = _split(config)
  tokens = _generate_cached(model, program, rules, params, input_ids, attention_mask, rng)
  return np.asarray(tokens, np.int32)


def generate_in_batches(
  model: gpt2.GPT2LMHeadModel,
  params: PyTree,
  prompts: Sequence[Sequence[int]],
  config: GenerationConfig,
  rng: jax.Array,
  batch_size: int,
) -> np.ndarray:
  """:func:`generate` over any number of prompts, ``batch_size`` at a time.

  The last batch is padded with copies of its first prompt, so one batch shape
  is compiled; batch ``b`` (prompts ``b*batch_size ...``) samples with
  ``fold_in(rng, b*batch_size)``. Returns int32 [len(prompts), max_new_tokens].
  """
  out = []
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start : start + batch_size])
    padded = chunk + [chunk[0]] * (batch_size - len(chunk))
    tokens = generate(model, params, padded, config, jax.random.fold_in(rng, start))
    out.append(tokens[: len(chunk)])
  return np.concatenate(out) if out else np.zeros((0, config.max_new_tokens), np.int32)


# ----------------------------------------------------------------------------
# reference: no cache


@functools.partial(jax.jit, static_argnames="model")
def _last_logits(model, params, input_ids, attention_mask, index):
  """Full forward pass; the float32 logits at position ``index`` [B, V]."""
  logits = model.apply({"params": params}, input_ids, attention_mask, _positions(attention_mask))
  return jax.lax.dynamic_index_in_dim(logits, index, axis=1, keepdims=False).astype(jnp.float32)


def generate_uncached(
  model: gpt2.GPT2LMHeadModel,
  params: PyTree,
  prompts: Sequence[Sequence[int]],
  config: GenerationConfig,
  rng: jax.Array | None = None,
) -> np.ndarray:
  """:func:`generate` without a cache: each step reruns the model on prompt + tokens so far.

  The same decoding rules, arguments and result as :func:`generate` (prompts
  are left-padded to the longest one, with no bucket); a Python loop over
  steps, each a full forward pass of length prompt + ``max_new_tokens`` (the
  tokens not generated yet are masked out by causality). Slow: a reference
  for tests.
  """
  rows = _check_inputs(model, prompts, config)
  rng = _rng(rng, config)
  program, rules = _split(config)
  n, k = config.max_new_tokens, config.num_beams
  vocab = model.config.vocab_size
  prompt_len = max(len(r) for r in rows)
  input_ids, attention_mask = left_pad(rows, prompt_len, config.pad_token_id)
  batch = len(rows)
  beam = config.strategy == "beam"
  if beam:
    input_ids, attention_mask = np.repeat(input_ids, k, 0), np.repeat(attention_mask, k, 0)
  mask = np.concatenate([attention_mask, np.ones((len(input_ids), n), np.int32)], axis=1)

  def logits_at(generated, step):  # generated: [rows, n]
    sequence = _feed(jnp.concatenate([input_ids, generated], axis=1), vocab)
    return _last_logits(model, params, sequence, mask, prompt_len + step - 1)

  if not beam:
    tokens = jnp.full((batch, n), config.pad_token_id, jnp.int32)
    finished = jnp.zeros((batch,), bool)
    for step in range(n):
      logits = logits_at(tokens, step)
      tokens, finished = _greedy_update_jit(tokens, finished, logits, step, program, rules, rng)
      if bool(jnp.all(finished)):
        break
    return np.asarray(tokens, np.int32)

  state = init_beam_state(batch, config)
  for step in range(n):
    state, _ = _beam_step_jit(
      state, logits_at(state.running_tokens.reshape(batch * k, n), step), step, rules
    )
    if bool(state.done):
      break
  return np.asarray(state.finished_tokens[:, 0], np.int32)


# ----------------------------------------------------------------------------
# command line: python -m dpjax.generate --workdir=DIR


def _define_flags() -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel

  flags.DEFINE_string("workdir", None, "A model.task=causal_lm dpjax.main workdir.")
  flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable), for templates with {prompt}.")
  flags.DEFINE_string(
    "prompts_file", None, "Prompts, one per line (or JSONL with the run's field)."
  )
  flags.DEFINE_multi_string("label", [], "A label word (repeatable), for templates with {label}.")
  flags.DEFINE_integer("num", 1, "Generations per prompt (sampling) or texts from the template.")
  flags.DEFINE_enum("strategy", None, STRATEGIES, "Decoding (default: config.generate).")
  flags.DEFINE_integer("max_new_tokens", None, "New tokens per text.")
  flags.DEFINE_integer("num_beams", None, "Beams (strategy=beam).")
  flags.DEFINE_float("temperature", None, "Sampling temperature.")
  flags.DEFINE_integer("top_k", None, "Sampling: keep the k most likely tokens (0 = all).")
  flags.DEFINE_float("top_p", None, "Sampling: nucleus mass in (0, 1].")
  flags.DEFINE_integer("seed", 0, "Sampling seed (generation is post-processing: public).")
  flags.DEFINE_integer("batch_size", None, "Prompts decoded together.")


def _read_prompts(path: str, field: str) -> list[str]:
  from dpjax.data import DataError  # pylint: disable=import-outside-toplevel

  try:
    lines = [line for line in open(path, encoding="utf-8").read().splitlines() if line.strip()]
  except OSError as err:
    raise DataError(f"{path}: cannot read: {err.strerror or err}") from None
  prompts = []
  for number, line in enumerate(lines, 1):
    if path.endswith(".jsonl"):
      import json  # pylint: disable=import-outside-toplevel

      try:
        value = json.loads(line)[field]
      except (ValueError, KeyError, TypeError):
        value = None
      if not isinstance(value, str) or not value.strip():
        raise DataError(f"{path}:{number}: expected a JSON object with a text field {field!r}")
      prompts.append(value)
    else:
      prompts.append(line)
  return prompts


def generate_from_workdir(workdir, prompt_texts, labels, num, overrides, seed, batch_size):
  """Rows ``{"prompt", "label", "generation"}`` from the run's model (see the CLI flags).

  Raises:
    ConfigError: the run is not a causal LM, or the prompts do not fit its template.
  """
  from dpjax import prompts as prompts_lib  # pylint: disable=import-outside-toplevel
  from dpjax.train.config import (  # pylint: disable=import-outside-toplevel
    ConfigError,
    generation_config,
  )
  from dpjax.trained import load_trained  # pylint: disable=import-outside-toplevel

  trained = load_trained(workdir)
  c = trained.config
  fmt = prompts_lib.RunFormat(c, trained.tokenizer)
  if fmt.format.uses_prompt and not prompt_texts:
    raise ConfigError(
      f"the run's template {fmt.format.template!r} needs --prompt or --prompts_file"
    )
  if not fmt.format.uses_prompt and prompt_texts:
    raise ConfigError(f"the run's template {fmt.format.template!r} takes no prompt text")
  if fmt.format.uses_label:
    try:
      label_ids = [fmt.label_of(w) for w in labels] or list(range(len(fmt.label_words)))
    except ValueError as err:
      raise ConfigError(f"--label: {err}") from None
  elif labels:
    raise ConfigError(f"the run's template {fmt.format.template!r} takes no label")
  else:
    label_ids = [None]
  if isinstance(num, bool) or not isinstance(num, int) or num < 1:
    raise ConfigError(f"--num must be an integer >= 1 (got {num!r})")
  config = generation_config(c, **overrides, eos_token_id=fmt.eos_id, pad_token_id=fmt.pad_id)
  size = int(c.generate.batch_size if batch_size is None else batch_size)
  if size < 1:
    raise ConfigError(f"--batch_size must be an integer >= 1 (got {size})")
  jobs = [(p, label) for p in (prompt_texts or [None]) for label in label_ids for _ in range(num)]
  ids = [fmt.prompt_ids(p, label) for p, label in jobs]
  try:
    _check_inputs(trained.model, ids, config)
  except ValueError as err:
    raise ConfigError(str(err)) from None
  rng = jax.random.PRNGKey(seed)
  out = generate_in_batches(trained.model, trained.params, ids, config, rng, size)
  rows = [
    {
      "prompt": prompt,
      "label": None if label is None else fmt.label_words[label],
      "generation": fmt.decode(tokens),
    }
    for (prompt, label), tokens in zip(jobs, out)
  ]
  return rows


def main(argv: list[str]) -> None:
  """Prints one JSON line per generation; a user mistake is one ``error:`` line, exit 2."""
  import json  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  from absl import flags, logging  # pylint: disable=import-outside-toplevel

  from dpjax.data import DataError  # pylint: disable=import-outside-toplevel
  from dpjax.models.pretrained import PretrainedError  # pylint: disable=import-outside-toplevel
  from dpjax.train.config import ConfigError  # pylint: disable=import-outside-toplevel
  from dpjax.trained import read_config  # pylint: disable=import-outside-toplevel

  FLAGS = flags.FLAGS
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1 or not FLAGS.workdir:
    print("error: usage: python -m dpjax.generate --workdir=DIR [--prompt=TEXT]", file=sys.stderr)
    sys.exit(2)
  overrides = {
    key: FLAGS[key].value
    for key in ("strategy", "max_new_tokens", "num_beams", "temperature", "top_k", "top_p")
    if FLAGS[key].value is not None
  }
  try:
    texts = list(FLAGS.prompt)
    if FLAGS.prompts_file:
      field = read_config(FLAGS.workdir).data.prompt_field or "prompt"
      texts += _read_prompts(FLAGS.prompts_file, field)
    # Through the imported module: run as ``-m``, this file is ``__main__``, whose classes
    # differ from the ones the rest of dpjax imports.
    from dpjax import generate as library  # pylint: disable=import-outside-toplevel

    rows = library.generate_from_workdir(
      FLAGS.workdir, texts, list(FLAGS.label), FLAGS.num, overrides, FLAGS.seed, FLAGS.batch_size
    )
  except (ConfigError, DataError, PretrainedError) as err:
    print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
    sys.exit(2)
  for row in rows:
    print(json.dumps(row))


if __name__ == "__main__":
  from absl import app  # pylint: disable=import-outside-toplevel

  from dpjax import _cli  # pylint: disable=import-outside-toplevel

  _define_flags()
  app.run(main, flags_parser=_cli.parse_flags)
