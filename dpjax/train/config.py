"""The experiment config: every key with its type and default, and one-line validation.

Experiment files in ``experiments/`` start from :func:`default_config` and
override fields; ``--config.a.b=value`` flags override them again. The config is
locked, so a misspelled key is an error, not a silently ignored setting.
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Any

import ml_collections
from ml_collections import config_dict

from dpjax import data as data_lib
from dpjax import parallel, privacy
from dpjax.models import heads
from dpjax.models import lora as lora_lib
from dpjax.privacy import accounting, mechanism, per_example

# Choices that belong to the training driver; the library's own (poolings, accountants,
# backends) are imported from the modules that read them.
CLIPS = ("flat", "per_layer", "automatic", "quantile")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("linear", "constant")
TASKS = ("classify", "label_words", "causal_lm")
TRAINS = ("all", "lora", "head")
DTYPES = ("float32", "bfloat16")  # model.dtype: the compute dtype
RESUME = ("same_config", "allow_changes")
UNITS = ("example", "user")
USER_SAMPLINGS = ("els", "uls")
USER_CONTRIBUTIONS = ("sum", "mean")
#: What data.train and data.eval take, for messages.
DATA_FORMS = f"{data_lib.TfdsSpec.FORM}, sst2:train, sst2:validation or a .tsv/.csv/.jsonl path"

# Library argument names -> the config keys they come from (for one-line errors).
_KEY_OF_ARGUMENT = {
  "batch_size": "train.batch_size",
  "delta": "dp.delta",
  "noise_multiplier": "dp.noise_multiplier",
  "target_epsilon": "dp.epsilon",
  "epsilon_budget": "dp.epsilon_budget",
  "steps": "train.steps",
  "data": "parallel.data",
  "fsdp": "parallel.fsdp",
  "rules": "parallel.rules",
  "max_examples_per_user": "dp.max_examples_per_user",
  "accountant": "dp.accountant",
  "count_noise": "dp.clip_count_noise",
}


class ConfigError(ValueError):
  """A config value is invalid; the message names the key and the valid range."""


def default_config() -> ml_collections.ConfigDict:
  """All keys, with defaults for DP fine-tuning of MiniLM on SST-2."""
  c = ml_collections.ConfigDict()
  # Initialization, dropout and subset selection. NOT the noise or the sampling: those come
  # from a fresh secret drawn from OS entropy at the start of each run (see dp.*).
  c.seed = 0
  # same_config: resume only a workdir made with an identical config; allow_changes:
  # continue it with this config (the ledger still counts every step taken).
  c.resume = "same_config"

  c.model = ml_collections.ConfigDict()
  c.model.name = "minilm"  # "minilm", a checkpoint directory, or "tiny" (random init)
  # classify | label_words (cloze, Li et al. 2022) | causal_lm (GPT-2: learn to write
  # data.text_field, conditioned on data.template; see dpjax.data.causal)
  c.model.task = "classify"
  # label_words needs the checkpoint's masked-LM head (it scores the label words); a model
  # without one (all-MiniLM-L6-v2 ships none) is refused unless this is True, which trains
  # a freshly initialised head instead.
  c.model.allow_fresh_mlm_head = False
  c.model.pooling = "mean"  # cls | mean | pooler (classify only)
  c.model.train = "all"  # all | lora | head | a regex over "a/b/kernel" paths
  c.model.lora_rank = 8  # model.train=lora: the adapters' rank r
  c.model.lora_alpha = 16.0  # LoRA scale alpha: the update is (alpha / r) B A
  # Regexes over Dense module paths that get adapters; () = the preset of the model type
  # (BERT: attention/self/(query|value)); e.g. ("layer_[345]/.*(query|value|dense)",).
  c.model.lora_targets = ()
  c.model.dropout = 0.0  # >0: hidden and attention dropout, a key per example
  # Compute dtype: float32 | bfloat16 (mixed precision: weights, optimizer state, losses,
  # per-example norms, clip factors, noise and sums stay float32).
  c.model.dtype = "float32"
  # Classify without dropout: compute what the frozen part of the model gives each training
  # row once, in memory: the backbone's features under model.train=head, or the input of
  # the first trained encoder layer when the embeddings and bottom layers are frozen (LoRA
  # or a pattern on top layers). Same result; each step skips the frozen part.
  c.model.cache_features = True
  # Architecture of name="tiny" (random init, MiniLM's tokenizer): a BERT encoder, or for
  # causal_lm a GPT-2 decoder with 256 positions.
  c.model.tiny_hidden = 32
  c.model.tiny_layers = 2  # (name="tiny") its number of layers; tiny_hidden: its width

  c.data = ml_collections.ConfigDict()
  # sst2:train, a .tsv/.csv/.jsonl file, or tfds:NAME[/CONFIG][:VERSION]:SPLIT: a split of a
  # TFDS dataset prepared as array_record in data.tfds_dir, its features named by
  # data.text_field, data.label_field (data.user_field, data.prompt_field). A slice
  # (train[:10%]) keeps rows by position: ε is for the slice as the dataset, not for the
  # whole split (subsample private data with data.train_fraction instead).
  c.data.train = "sst2:train"
  # The held-out split: sst2:validation, a .tsv/.csv/.jsonl file or a tfds: split (as
  # data.train) whose labels lie in [0, data.num_labels) (refused otherwise). A custom
  # data.train with the default SST-2 eval is refused unless data.num_labels=2 (SST-2's binary
  # labels: e.g. a file of SST-2 rows).
  c.data.eval = "sst2:validation"
  # Where tfds: datasets were prepared (download_and_prepare(file_format="array_record"));
  # "": TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets). Nothing is downloaded.
  c.data.tfds_dir = ""
  c.data.text_field = "sentence"  # the text to classify; for causal_lm the completion
  c.data.label_field = "label"  # "": unlabeled (causal_lm without {label} only)
  # causal_lm: the field holding each row's prompt ("" = none); the loss is on the
  # completion only.
  c.data.prompt_field = ""
  # The column/field of data.train holding each row's user id (read only when dp.unit=user,
  # and then required: a row without one is a bad row, see data.skip_bad_rows). data.eval
  # needs no such column.
  c.data.user_field = ""
  c.data.num_labels = 2  # classes; labels are the integers 0..num_labels-1
  # The name of each class, in label order (one per label), e.g. ("negative", "positive"):
  # what dpjax.predict and dpjax.evaluate print. (): the integer ids are the names.
  c.data.label_names = ()
  c.data.max_length = 64  # tokens per row (longer rows are cut; causal_lm: see too_long)
  c.data.buckets = (32, 64)  # padded lengths: each row goes to the shortest that holds it
  # <1: keep each training row iff a hash of its content (keyed by seed) is below this
  # fraction; the kept rows ARE the dataset (adding/removing a file row changes them by at
  # most that row)
  c.data.train_fraction = 1.0
  c.data.eval_limit = config_dict.placeholder(int)  # None: the whole eval split
  # label_words: the cloze, e.g. "{text} It was [MASK] ."; causal_lm: the prompt, with
  # {prompt} (the prompt field) and/or {label} (the label's word: a control code for
  # label-conditioned generation), e.g. "sentiment: {label} ."; "": "{prompt}" when
  # data.prompt_field is set, else no prompt (plain text).
  c.data.template = ""
  c.data.label_words = ("terrible", "great")  # one word per label, for [MASK] or {label}
  # causal_lm: a sequence over max_length: "truncate" its completion (counted in the log)
  # or "refuse" the row.
  c.data.too_long = "truncate"
  # causal_lm special tokens (token strings), or "auto": <|endoftext|> (GPT-2), <s> </s> or
  # [CLS] [SEP], whichever the tokenizer has; pad: its own padding token, else eos.
  c.data.bos_token = "auto"
  c.data.eos_token = "auto"  # see bos_token
  c.data.pad_token = "auto"  # see bos_token
  # True: skip unreadable rows of a .tsv/.csv/.jsonl file with a warning (else refuse); a bad
  # tfds: record is always refused
  c.data.skip_bad_rows = False
  c.data.cache_dir = config_dict.placeholder(str)  # token cache; None: <workdir>/token_cache

  c.dp = ml_collections.ConfigDict()
  c.dp.enabled = True  # False: the non-private baseline (same loop, ε = inf)
  # The privacy unit. example: (ε, δ) for adding/removing one training row. user: for one
  # user and all their rows (user-level DP, Charles et al. 2024): training keeps each
  # user's first dp.max_examples_per_user rows of data.train (in file order) and samples
  # by dp.user_sampling; δ, ε and N are per user. With dp.enabled=False the rows are
  # still capped and sampled the same way (a baseline on the same data), nothing accounted.
  c.dp.unit = "example"
  # How user-level DP samples (dp.unit=user only). els: Poisson over rows, per-row clipping,
  # mixture-of-Gaussians accounting (PLD only). uls: Poisson over USERS (train.batch_size
  # is then the expected number of users per step, train.epochs counts passes over users),
  # each sampled user's rows clipped together to dp.clip_norm; accounted as ordinary
  # DP-SGD over the users (any accountant).
  c.dp.user_sampling = "els"
  # uls only: a user's clipped contribution is the sum or the mean of their rows' gradients.
  c.dp.user_contribution = "sum"
  # k, the most rows of one user that training keeps (dp.unit=user only, and required then);
  # ε grows with k, and building the accounting takes longer (σ calibration: 30 s to minutes).
  c.dp.max_examples_per_user = config_dict.placeholder(int)
  # Target ε: σ is calibrated so that the planned steps spend exactly this much
  # (not used when dp.noise_multiplier is given).
  c.dp.epsilon = 8.0
  # σ given instead of calibrated: ε is then reported, not targeted.
  c.dp.noise_multiplier = config_dict.placeholder(float)
  # Hard budget: training stops before ε would exceed it. None: dp.epsilon when σ is
  # calibrated; no budget when σ is given.
  c.dp.epsilon_budget = config_dict.placeholder(float)
  c.dp.delta = config_dict.placeholder(float)  # None: N^-1.1; must be < 1/N
  c.dp.clip = "flat"  # flat | per_layer | automatic | quantile (adaptive, see below)
  c.dp.clip_norm = 1.0  # C; for dp.clip=quantile the initial bound C_0
  # dp.clip=quantile (Andrew et al. 2021): the bound C_t learns the dp.clip_quantile quantile
  # of the per-example gradient norms, C <- C·exp(-dp.clip_quantile_lr·(b - γ)), b the noisy
  # fraction of unclipped examples. The target ε is unchanged: the gradient noise grows to
  # σ_Δ = (σ^-2 - (2·dp.clip_count_noise)^-2)^-1/2 to pay for the count.
  c.dp.clip_quantile = 0.5  # γ, the fraction of examples left unclipped, in (0, 1)
  c.dp.clip_quantile_lr = 0.2  # η > 0, the geometric learning rate of the bound
  # σ_b > σ/2, the noise std of the unclipped count; None: train.batch_size / 20 (the paper's).
  c.dp.clip_count_noise = config_dict.placeholder(float)
  c.dp.accountant = "pld"  # pld | rdp | prv (all rigorous; summary.json brackets ε by PLD and PRV)
  c.dp.backend = "auto"  # auto (bookkeeping when the model allows) | bookkeeping | vmap
  c.dp.microbatch_size = 16  # examples per scan iteration (users under dp.user_sampling=uls)
  # An integer makes noise and sampling a public function of it: reproducible, and NO
  # privacy guarantee (for tests and debugging; the summary says so). None: secret.
  c.dp.insecure_fixed_noise_seed = config_dict.placeholder(int)
  # σ of a DP histogram of the training labels released with the run (Gaussian, sensitivity
  # 1, its own ledger segment inside the target ε), e.g. for synthetic data in the private
  # label proportions (python -m dpjax.synthesize). 0: no histogram. Without DP the
  # exact counts are kept instead.
  c.dp.label_histogram_noise = 0.0

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 256  # expected (Poisson) batch size B
  c.train.epochs = 1.0  # expected passes over the data (steps = epochs·N/B)
  c.train.steps = config_dict.placeholder(int)  # given: overrides epochs
  c.train.optimizer = "adamw"  # adamw | sgd (after the privatizer)
  c.train.learning_rate = 1e-3  # peak learning rate
  c.train.weight_decay = 0.0  # adamw's decoupled weight decay
  c.train.momentum = 0.9  # sgd only: heavy-ball momentum (0: none)
  c.train.warmup_steps = 0  # linear warmup from 0 over this many steps
  c.train.schedule = "linear"  # linear decay to 0 | constant
  # Evaluate on the held-out split every k steps and at the end; 0: at the end only;
  # None: about 5 evaluations per run (every round(steps / 5)).
  c.train.eval_every_steps = config_dict.placeholder(int)
  c.train.eval_batch_size = 64  # rows per evaluation batch (no effect on the result)
  # A progress line (and ε in metrics.jsonl) every k steps; 0: about 20 per run.
  c.train.log_every_steps = 0
  c.train.checkpoint_every_steps = 50  # 0: at the end only (and on SIGTERM)
  c.train.keep_checkpoints = 3  # the newest k checkpoints are kept
  # Also write statistics of the private batches (train loss/accuracy, realized batch
  # sizes, clipped fraction, timings) to private_metrics.jsonl and the progress lines.
  # They are NOT covered by (ε, δ): operator-only, never for publication.
  c.train.private_metrics = False

  # Decoding of a causal_lm run (python -m dpjax.generate and dpjax.synthesize, and the
  # generation eval below); the meaning of each key is dpjax.generate.GenerationConfig's.
  c.generate = ml_collections.ConfigDict()
  c.generate.strategy = "greedy"  # greedy | sample | beam
  c.generate.max_new_tokens = 64  # tokens generated after each prompt, at most
  c.generate.num_beams = 1  # > 1 only with beam
  c.generate.length_penalty = 1.0  # beam: a finished beam scores logp / length^this
  c.generate.temperature = 1.0  # sample only
  c.generate.top_k = 0  # sample: keep the k most likely tokens; 0 = all
  c.generate.top_p = 1.0  # sample: nucleus mass; 1.0 = all
  c.generate.batch_size = 32  # prompts decoded together
  # >0: after training, generate for up to this many distinct eval prompts and score
  # BLEU / chrF++ / ROUGE-L against every eval completion of the same prompt (the eval
  # file is public; table-to-text). 0: off.
  c.generate.eval_prompts = 0

  # Canaries for the one-run audit (python -m dpjax.audit --reports=canaries).
  c.audit = ml_collections.ConfigDict()
  # m synthetic examples (random words, random label), each added to the training set by a
  # fair coin: they count in N and are sampled, clipped, noised and accounted like any row.
  # 0: none.
  c.audit.canaries = 0
  # Seed of the canaries' words, labels and coins (public: they are synthetic).
  c.audit.canary_seed = 0

  # Devices: a ("data", "fsdp") mesh over all devices of all processes (dpjax.parallel).
  c.parallel = ml_collections.ConfigDict()
  c.parallel.data = config_dict.placeholder(int)  # examples split this many ways; None: the rest
  c.parallel.fsdp = 1  # params + optimizer state split this many ways (ZeRO-3); None: the rest
  c.parallel.fsdp_min_size = parallel.DEFAULT_FSDP_MIN_SIZE  # smaller arrays stay replicated
  c.parallel.rules = ()  # "REGEX=SPEC" overrides, e.g. "word_embeddings=fsdp,None"
  return c


def documented_keys() -> list[tuple[str, str]]:
  """(dotted key, its comment) for every key of :func:`default_config`, in order.

  The comment is the block of ``#`` lines right above the key's assignment plus
  its inline comment (read from this module's source), e.g. for ``--config_keys``.
  """
  lines = inspect.getsource(default_config).splitlines()
  out, block = [], []
  for line in lines:
    text = line.strip()
    if text.startswith("#"):
      block.append(text.lstrip("#").strip())
      continue
    match = re.match(r"c\.([\w.]+) = (.*)$", text)
    if match and "ConfigDict()" not in match.group(2):
      inline = match.group(2).split("  # ", 1)[1] if "  # " in match.group(2) else ""
      out.append((match.group(1), " ".join(block + ([inline] if inline else []))))
    block = []
  return out


def check_data_spec(key: str, spec: Any) -> None:
  """Refuses a ``data.train`` / ``data.eval`` value that is not a string or a malformed
  ``tfds:`` spec (files and SST-2 splits are checked when they are read).

  Args:
    key: what named ``spec`` in the message (``"config.data.train"``, ``"--data"``).
    spec: the value.

  Raises:
    ConfigError: naming ``key``, the valid forms and what is wrong.
  """
  if not isinstance(spec, str) or not spec:
    raise ConfigError(f"{key} must be {DATA_FORMS} (got {spec!r})")
  if not data_lib.TfdsSpec.matches(spec):
    return
  try:
    data_lib.TfdsSpec.parse(spec)
  except ValueError as err:
    raise ConfigError(f"{key} must be {DATA_FORMS} (got {spec!r}: {err})") from None


def _fail(key: str, value: Any, valid: str) -> ConfigError:
  return ConfigError(f"config.{key} must be {valid} (got {value!r})")


def _one_of(c, key: str, options: tuple[str, ...]) -> None:
  value = _get(c, key)
  if value not in options:
    raise _fail(key, value, f"one of {options}")


def _positive(c, key: str, allow_zero: bool = False, integer: bool = False) -> None:
  value = _get(c, key)
  kind = "an integer" if integer else "a number"
  ok = isinstance(value, int) if integer else isinstance(value, (int, float))
  ok = ok and not isinstance(value, bool) and math.isfinite(value)
  ok = ok and (value >= 0 if allow_zero else value > 0)
  if not ok:
    raise _fail(key, value, f"{kind} {'>= 0' if allow_zero else '> 0'}")


def _optional(c, key: str, check) -> None:
  """Runs ``check(key)`` unless the value is None (a placeholder left unset).

  A failed check's message says that None is valid too.
  """
  if _get(c, key) is None:
    return
  try:
    check(key)
  except ConfigError as err:
    raise ConfigError(str(err).replace(" (got ", ", or None (got ", 1)) from None


def _in_open_unit_interval(c, key: str) -> None:
  value = _get(c, key)
  number = isinstance(value, (int, float)) and not isinstance(value, bool)
  if not number or not 0 < value < 1:
    raise _fail(key, value, "in (0, 1)")


def _get(c, key: str) -> Any:
  node = c
  for part in key.split("."):
    node = node[part]
  return node


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first invalid key and its valid range."""
  _positive(c, "seed", allow_zero=True, integer=True)
  _one_of(c, "resume", RESUME)
  _one_of(c, "model.task", TASKS)
  _one_of(c, "model.pooling", heads.POOLINGS)
  _one_of(c, "model.dtype", DTYPES)
  if c.model.train not in TRAINS:
    try:
      re.compile(c.model.train)
    except (re.error, TypeError):
      raise _fail(
        "model.train",
        c.model.train,
        f"one of {TRAINS} or a regular expression over parameter paths",
      ) from None
  _positive(c, "model.lora_rank", integer=True)
  _positive(c, "model.lora_alpha")
  targets = c.model.lora_targets
  valid_targets = "a tuple of regular expressions over Dense module paths, or () for the preset"
  if not isinstance(targets, (tuple, list)) or not all(isinstance(t, str) and t for t in targets):
    raise _fail("model.lora_targets", targets, valid_targets)
  for target in targets:
    try:
      re.compile(target)
    except re.error:
      raise _fail("model.lora_targets", tuple(targets), valid_targets) from None
  if not isinstance(c.model.dropout, (int, float)) or not 0 <= c.model.dropout < 1:
    raise _fail("model.dropout", c.model.dropout, "in [0, 1)")
  _positive(c, "data.num_labels", integer=True)
  if c.data.num_labels < 2:
    raise _fail("data.num_labels", c.data.num_labels, "an integer >= 2")
  _validate_label_names(c)
  check_data_spec("config.data.train", c.data.train)
  check_data_spec("config.data.eval", c.data.eval)
  if not isinstance(c.data.tfds_dir, str):
    raise _fail("data.tfds_dir", c.data.tfds_dir, 'a directory path, or "" for TFDS\'s default')
  train, evals = str(c.data.train), str(c.data.eval)
  if not train.startswith("sst2:") and evals.startswith("sst2:") and c.data.num_labels != 2:
    raise ConfigError(
      f"config.data.eval={evals!r} (binary SST-2) cannot score a model of "
      f"config.data.num_labels={c.data.num_labels} classes trained on "
      f"config.data.train={train!r}: set --config.data.eval to a held-out file or tfds: "
      "split of that task"
    )
  _positive(c, "data.max_length", integer=True)
  if c.data.max_length < 4:
    raise _fail("data.max_length", c.data.max_length, "an integer >= 4")
  buckets = tuple(c.data.buckets)
  if not buckets or any(not isinstance(b, int) or b < 1 or b > c.data.max_length for b in buckets):
    raise _fail(
      "data.buckets",
      buckets,
      f"a non-empty tuple of lengths in [1, max_length={c.data.max_length}]",
    )
  fraction = c.data.train_fraction
  if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction <= 1:
    raise _fail("data.train_fraction", fraction, "a number in (0, 1]")
  _optional(c, "data.eval_limit", lambda key: _positive(c, key, integer=True))
  if c.model.task == "label_words":
    if "[MASK]" not in c.data.template and "<mask>" not in c.data.template:
      raise _fail(
        "data.template",
        c.data.template,
        "a prompt with {text} and one [MASK] (or <mask>) when model.task=label_words",
      )
    if len(tuple(c.data.label_words)) != c.data.num_labels:
      raise _fail(
        "data.label_words",
        tuple(c.data.label_words),
        f"one word per label (data.num_labels={c.data.num_labels})",
      )
  if c.model.task == "causal_lm":
    _validate_causal(c)
  if not isinstance(c.dp.enabled, bool):
    raise _fail("dp.enabled", c.dp.enabled, "True or False")
  if c.dp.enabled:
    _positive(c, "dp.epsilon")
    if c.dp.epsilon > accounting.MAX_TARGET_EPSILON:
      raise _fail(
        "dp.epsilon",
        c.dp.epsilon,
        f"in (0, {accounting.MAX_TARGET_EPSILON:g}] (for no privacy, set dp.enabled=False)",
      )
    _optional(c, "dp.delta", lambda key: _in_open_unit_interval(c, key))
    if c.dp.noise_multiplier == 0:
      raise _fail("dp.noise_multiplier", 0.0, "> 0, or None (for no noise, set dp.enabled=False)")
    _optional(c, "dp.noise_multiplier", lambda key: _positive(c, key))
    _optional(c, "dp.epsilon_budget", lambda key: _positive(c, key))
    _one_of(c, "dp.clip", CLIPS)
    _positive(c, "dp.clip_norm")
    _in_open_unit_interval(c, "dp.clip_quantile")
    _positive(c, "dp.clip_quantile_lr")
    _optional(c, "dp.clip_count_noise", lambda key: _positive(c, key))
    _one_of(c, "dp.accountant", accounting.ACCOUNTANTS)
    _one_of(c, "dp.backend", per_example.BACKENDS)
  _positive(c, "dp.microbatch_size", integer=True)
  fixed = c.dp.insecure_fixed_noise_seed
  if fixed is not None and (not isinstance(fixed, int) or isinstance(fixed, bool) or fixed < 0):
    raise _fail("dp.insecure_fixed_noise_seed", fixed, "None or an integer >= 0")
  value = c.dp.label_histogram_noise
  if (
    isinstance(value, bool)
    or not isinstance(value, (int, float))
    or not (value == 0 or value >= 0.3)
  ):
    raise _fail("dp.label_histogram_noise", value, "0 (no histogram) or a number >= 0.3")
  if value:
    if not c.data.label_field:
      raise _fail("data.label_field", "", "a field name when dp.label_histogram_noise is set")
  _validate_unit(c)
  for key in ("train.private_metrics", "model.cache_features"):
    section, name = key.split(".")
    if not isinstance(c[section][name], bool):
      raise _fail(key, c[section][name], "True or False")
  _positive(c, "train.batch_size")
  _positive(c, "train.epochs", allow_zero=True)
  _optional(c, "train.steps", lambda key: _positive(c, key, integer=True))
  if c.train.steps is None and c.train.epochs == 0:
    raise _fail("train.epochs", 0, "> 0 when train.steps is None")
  _one_of(c, "train.optimizer", OPTIMIZERS)
  _positive(c, "train.learning_rate")
  _positive(c, "train.weight_decay", allow_zero=True)
  _positive(c, "train.momentum", allow_zero=True)
  _positive(c, "train.warmup_steps", allow_zero=True, integer=True)
  _one_of(c, "train.schedule", SCHEDULES)
  _optional(
    c, "train.eval_every_steps", lambda key: _positive(c, key, allow_zero=True, integer=True)
  )
  for key in ("checkpoint_every_steps", "log_every_steps"):
    _positive(c, f"train.{key}", allow_zero=True, integer=True)
  for key in ("eval_batch_size", "keep_checkpoints"):
    _positive(c, f"train.{key}", integer=True)
  _validate_generate(c)
  _positive(c, "audit.canaries", allow_zero=True, integer=True)
  if 0 < c.audit.canaries < 10:
    raise _fail(
      "audit.canaries", c.audit.canaries, "0 (none) or an integer >= 10 (~1000 for power)"
    )
  _positive(c, "audit.canary_seed", allow_zero=True, integer=True)
  for key in ("data", "fsdp"):
    _optional(c, f"parallel.{key}", lambda key: _positive(c, key, integer=True))
  if c.parallel.data is None and c.parallel.fsdp is None:
    raise _fail("parallel.fsdp", None, "an integer >= 1 when parallel.data is None")
  _positive(c, "parallel.fsdp_min_size", allow_zero=True, integer=True)
  try:
    parallel.parse_rules(tuple(c.parallel.rules))
  except parallel.ParallelError as err:
    raise config_error(err) from None


def _validate_label_names(c: ml_collections.ConfigDict) -> None:
  names = c.data.label_names
  valid = f"() or one distinct non-empty string per label (data.num_labels={c.data.num_labels})"
  if not isinstance(names, (tuple, list)):
    raise _fail("data.label_names", names, valid)
  names = tuple(names)
  if names and (
    len(names) != c.data.num_labels
    or not all(isinstance(n, str) and n.strip() for n in names)
    or len(set(names)) != len(names)
  ):
    raise _fail("data.label_names", names, valid)


def label_names(c: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The name of each class: ``data.label_names``, or ``"0"``, ``"1"``, ... when unset."""
  return tuple(c.data.label_names) or tuple(str(k) for k in range(c.data.num_labels))


def _validate_unit(c: ml_collections.ConfigDict) -> None:
  """dp.unit and what user-level DP needs: k, a user column, and no example-level extras."""
  _one_of(c, "dp.unit", UNITS)
  _one_of(c, "dp.user_sampling", USER_SAMPLINGS)
  _one_of(c, "dp.user_contribution", USER_CONTRIBUTIONS)
  k = c.dp.max_examples_per_user
  if c.dp.unit == "example":
    if k is not None:
      raise _fail("dp.max_examples_per_user", k, "None when dp.unit=example")
    return
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise _fail("dp.max_examples_per_user", k, "an integer >= 1 when dp.unit=user")
  if not isinstance(c.data.user_field, str) or not c.data.user_field:
    raise _fail("data.user_field", c.data.user_field, "a column/field name when dp.unit=user")
  if str(c.data.train).startswith("sst2:"):
    raise _fail(
      "data.train",
      c.data.train,
      "a .tsv/.csv/.jsonl file or a tfds: split with a data.user_field column or feature when "
      "dp.unit=user (SST-2 has no user ids)",
    )
  if c.dp.user_sampling == "uls" and c.dp.clip == "quantile":
    raise _fail(
      "dp.clip",
      c.dp.clip,
      "flat, per_layer or automatic when dp.user_sampling=uls (the quantile rule's noisy "
      "count is per row)",
    )
  if c.dp.enabled and c.dp.user_sampling == "els" and c.dp.accountant != "pld":
    raise _fail(
      "dp.accountant",
      c.dp.accountant,
      "pld when dp.unit=user and dp.user_sampling=els (only PLD accounts it; uls takes any)",
    )
  if c.dp.enabled and c.dp.label_histogram_noise:
    raise _fail(
      "dp.label_histogram_noise",
      c.dp.label_histogram_noise,
      "0 when dp.unit=user (the histogram is accounted per row)",
    )
  if c.audit.canaries:
    raise _fail(
      "audit.canaries", c.audit.canaries, "0 when dp.unit=user (canaries are single rows)"
    )


def causal_template(c: ml_collections.ConfigDict) -> str:
  """The causal-LM prompt template: ``data.template``, or ``"{prompt}"`` / ``""`` by default."""
  if c.data.template:
    return c.data.template
  return "{prompt}" if c.data.prompt_field else ""


def generation_config(c: ml_collections.ConfigDict, **overrides):
  """The :class:`dpjax.generate.GenerationConfig` of ``config.generate`` (ids added by callers).

  Raises:
    ConfigError: naming the ``generate.*`` key out of range.
  """
  from dpjax import generate  # pylint: disable=import-outside-toplevel

  # Every generate.* key but the two that say how many prompts, not how to decode them.
  fields = {k: v for k, v in c.generate.items() if k not in ("batch_size", "eval_prompts")}
  fields.update(overrides)
  try:
    return generate.GenerationConfig(**fields)
  except ValueError as err:
    raise ConfigError(f"config.generate.{err}") from None


def _validate_generate(c: ml_collections.ConfigDict) -> None:
  generation_config(c)
  _positive(c, "generate.batch_size", integer=True)
  _positive(c, "generate.eval_prompts", allow_zero=True, integer=True)
  if c.generate.eval_prompts and (c.model.task != "causal_lm" or not c.data.prompt_field):
    raise _fail(
      "generate.eval_prompts",
      c.generate.eval_prompts,
      "0 unless model.task=causal_lm with a data.prompt_field",
    )


def _validate_causal(c: ml_collections.ConfigDict) -> None:
  template = causal_template(c)
  if not isinstance(c.data.prompt_field, str):
    raise _fail("data.prompt_field", c.data.prompt_field, 'a field name, or "" for none')
  if "{prompt}" in template and not c.data.prompt_field:
    raise _fail("data.prompt_field", "", "a field name when data.template uses {prompt}")
  if c.data.prompt_field and "{prompt}" not in template:
    raise _fail("data.template", template, "a prompt with {prompt} when data.prompt_field is set")
  if template.count("{prompt}") > 1 or template.count("{label}") > 1:
    raise _fail("data.template", template, "a prompt with {prompt} and {label} at most once each")
  if "{label}" in template:
    if not c.data.label_field:
      raise _fail("data.label_field", "", "a field name when data.template uses {label}")
    if len(tuple(c.data.label_words)) != c.data.num_labels or not all(
      isinstance(w, str) and w.strip() for w in c.data.label_words
    ):
      raise _fail(
        "data.label_words",
        tuple(c.data.label_words),
        f"one non-empty word per label (data.num_labels={c.data.num_labels}) for {{label}}",
      )
  _one_of(c, "data.too_long", ("truncate", "refuse"))
  for key in ("bos_token", "eos_token", "pad_token"):
    value = c.data[key]
    if not isinstance(value, str) or not value:
      raise _fail(f"data.{key}", value, '"auto" or a token of the tokenizer')
  if c.model.train == "head":
    raise _fail("model.train", "head", "all, lora or a regex for causal_lm (GPT-2 has no head)")
  if c.audit.canaries:
    raise _fail("audit.canaries", c.audit.canaries, "0 for causal_lm (canaries are classification)")


def clip_rule(c: ml_collections.ConfigDict) -> privacy.ClipRule:
  """The clip rule of ``dp.clip`` with bound ``dp.clip_norm`` (quantile: its initial bound)."""
  if c.dp.clip == "automatic":
    return privacy.AutomaticClip()
  if c.dp.clip == "per_layer":
    return privacy.PerLayerClip(c.dp.clip_norm)
  if c.dp.clip == "quantile":
    count_noise = c.dp.clip_count_noise
    return privacy.QuantileClip(
      target_quantile=float(c.dp.clip_quantile),
      learning_rate=float(c.dp.clip_quantile_lr),
      count_noise=float(c.train.batch_size) / 20 if count_noise is None else float(count_noise),
      initial_clip_norm=float(c.dp.clip_norm),
    )
  return privacy.FlatClip(c.dp.clip_norm)


def mechanism_spec(c: ml_collections.ConfigDict) -> mechanism.MechanismSpec:
  """What ``config.dp`` asks of the mechanism (calibrated later, once N is known)."""
  return mechanism.MechanismSpec(
    private=bool(c.dp.enabled),
    clip=clip_rule(c),
    target_epsilon=float(c.dp.epsilon),
    noise_multiplier=c.dp.noise_multiplier,
    epsilon_budget=c.dp.epsilon_budget,
    delta=c.dp.delta,
    accountant=c.dp.accountant,
    backend=c.dp.backend,
    microbatch_size=c.dp.microbatch_size,
    max_examples_per_user=c.dp.max_examples_per_user if c.dp.unit == "user" else None,
    user_sampling=c.dp.user_sampling,
    user_contribution=c.dp.user_contribution,
  )


def samples_users(c: ml_collections.ConfigDict) -> bool:
  """True for user-level DP by user sampling (batches of users, epochs over users)."""
  return c.dp.unit == "user" and c.dp.user_sampling == "uls"


def planned_steps(c: ml_collections.ConfigDict, dataset_size: int) -> int:
  """``train.steps``, or ``train.epochs`` passes (:func:`dpjax.privacy.steps_for_epochs`).

  ``dataset_size``: what the sampler draws from (the number of users under user sampling).
  """
  if c.train.steps is not None:
    return int(c.train.steps)
  return privacy.steps_for_epochs(c.train.epochs, dataset_size, float(c.train.batch_size))


def config_error(err: ValueError) -> ConfigError:
  """A library ``ValueError`` about an argument, restated with the config key it came from."""
  message = str(err)
  for argument, key in _KEY_OF_ARGUMENT.items():
    if message.startswith((f"{argument} must", f"{argument}=", f"{argument} entry")):
      return ConfigError(f"config.{key}{message[len(argument) :]}")
  return ConfigError(message)


def lora_config(c: ml_collections.ConfigDict, model_type: str) -> lora_lib.LoraConfig | None:
  """The LoRA adapters of the config (only when model.train = lora)."""
  if c.model.train != "lora":
    return None
  targets = tuple(c.model.lora_targets) or lora_lib.LORA_TARGETS[model_type]
  return lora_lib.LoraConfig(c.model.lora_rank, float(c.model.lora_alpha), targets)


def with_defaults(saved: dict[str, Any], defaults: dict[str, Any] | None = None) -> dict[str, Any]:
  """A saved config (JSON dict) with the keys added to :func:`default_config` since, at
  their defaults: a run saved before a key existed behaved as its default says."""
  if defaults is None:
    defaults = default_config().to_dict()
  out = dict(saved)
  for key, value in defaults.items():
    if key not in out:
      out[key] = value
    elif isinstance(value, dict) and isinstance(out[key], dict):
      out[key] = with_defaults(out[key], value)
  return out


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
  """Keys (dotted) whose values differ between two config dicts; ``resume`` is ignored."""
  keys = sorted(set(old) | set(new))
  out = []
  for key in keys:
    name = f"{prefix}{key}"
    if name == "resume":
      continue
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += differences(a, b, f"{name}.")
    elif (list(a) if isinstance(a, (list, tuple)) else a) != (
      list(b) if isinstance(b, (list, tuple)) else b
    ):
      out.append(name)
  return out
