"""The release of a run (python -m dpjax.export): Hugging Face files only, equal to the run.

Three tiny runs are exported: two classifiers (full fine-tuning with a mean-pooled head:
the suite's shared 16-step run, and LoRA with BERT's pooler, where merging the adapters
matters, trained here for 2 steps) and a causal LM (GPT-2 with LoRA on attn/c_attn, the
shared generator run), each only when a test asks for it.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from dpjax import data as data_lib
from dpjax import export as export_lib
from dpjax.data import causal
from dpjax.models import bert, gpt2, heads, layers, pretrained
from dpjax.train import loop, splits
from dpjax.train.config import ConfigError
from dpjax.trained import load_trained
from experiments import sst2
from tests.causal_runs import generator  # noqa: F401  (a fixture)
from tests.shared_fixtures import shared_once
from tests.train.runs import SHARED_RUN, shared_run

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ["a gorgeous , witty , seductive movie .", "dull", "it is n't a bad film at all"]
# "full" (full fine-tuning, mean pooling: the tiny preset) is the suite's shared finished run;
# "lora" is trained here for 2 steps.
RUNS = {"full": {}, "lora": {"model.train": "lora", "model.pooling": "pooler"}}
STEPS = {"full": SHARED_RUN["train.steps"], "lora": 2}
CAUSAL = "causal_lora"  # the causal-LM run's name among the parametrized ones


def _train(workdir: Path, token_cache: str, overrides: dict, experiment=sst2) -> Path:
  c = experiment.get_config("tiny")
  c.data.cache_dir = token_cache
  c.train.steps = 2
  for key, value in overrides.items():
    section, leaf = key.split(".")
    c[section][leaf] = value
  loop.train_and_evaluate(c, workdir)
  return workdir


def _train_and_export(root: Path, full: Path) -> None:
  export_lib.export(full, root / "full" / "release")
  workdir = _train(root / "run_lora", str(root / "token_cache"), RUNS["lora"])
  export_lib.export(workdir, root / "lora" / "release")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{name: (workdir, release directory)} of the two tiny runs, each exported once per test run."""
  full = shared_run(tmp_path_factory)  # read only: the export writes nothing into a workdir
  root = shared_once(tmp_path_factory, "export_runs", lambda r: _train_and_export(r, full))
  workdirs = {"full": full, "lora": root / "run_lora"}
  return {name: (workdirs[name], root / name / "release") for name in RUNS}


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory, generator):  # noqa: F811
  """(workdir, release directory) of the shared tiny causal LM run (LoRA), exported once."""
  build = lambda root: export_lib.export(generator, root / "release")
  root = shared_once(tmp_path_factory, "export_causal_run", build)
  return generator, root / "release"


def _run(request, name: str) -> tuple[Path, Path]:
  """(workdir, release) of the run ``name``; trains it (once) only when a test asks for it."""
  if name == CAUSAL:
    return request.getfixturevalue("causal_run")
  return request.getfixturevalue("runs")[name]


def _tensors(directory: Path) -> dict[str, np.ndarray]:
  with safe_open(str(directory / "model.safetensors"), framework="np") as f:
    return {name: f.get_tensor(name) for name in f.keys()}


def _token_rows(tokenizer: tokenizers.Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  encodings = tokenizer.encode_batch(SENTENCES)
  return (
    np.array([e.ids for e in encodings], np.int32),
    np.array([e.attention_mask for e in encodings], np.int32),
  )


def _head_logits(tensors: dict, head: dict, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """The classifier's logits rebuilt from the release's tensors and dpjax_head.json."""
  hidden = np.asarray(hidden, np.float64)
  if head["pooling"] == "mean":
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  elif head["pooling"] == "pooler":
    pooled = np.tanh(
      hidden[:, 0] @ tensors["bert.pooler.dense.weight"].T + tensors["bert.pooler.dense.bias"]
    )
  else:
    pooled = hidden[:, 0]
  name = "classifier" if head["architecture"] else "classifier.dpjax_head"
  return pooled @ tensors[f"{name}.weight"].T + tensors[f"{name}.bias"]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_release_loads_back_and_computes_what_the_run_trained(runs, name):
  workdir, release = runs[name]
  trained = load_trained(workdir)
  summary = json.loads((workdir / "summary.json").read_text())
  # The restored parameters are exactly those the run finished with.
  assert trained.step == summary["steps"] == STEPS[name]
  assert loop.params_sha256(trained.params) == summary["params_sha256"]
  model, params, tokenizer = pretrained.load(release)
  assert model.config == trained.model.backbone and model.lora is None
  ids, mask = _token_rows(tokenizer)
  backbone = bert.BertModel(trained.model.backbone, trained.model.lora)
  want = backbone.apply({"params": trained.params["backbone"]}, ids, mask)
  got = model.apply({"params": params}, ids, mask)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  # The head, rebuilt from its tensors as dpjax_head.json describes it, gives the run's logits.
  head = json.loads((release / "dpjax_head.json").read_text())
  batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
  logits = trained.model.apply({"params": trained.params}, batch)
  np.testing.assert_allclose(
    _head_logits(_tensors(release), head, got, mask), logits, atol=1e-5, rtol=0
  )
  if name == "lora":
    assert head["architecture"] == "BertForSequenceClassification"
    # The adapters trained away from B = 0: leaving them out would change the model.
    without = bert.BertModel(trained.model.backbone).apply(
      {"params": _drop_adapters(trained.params["backbone"])}, ids, mask
    )
    assert float(jnp.max(jnp.abs(without - want))) > 1e-4


def _causal_rows(trained, tmp_path: Path) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
  """(ids, attention mask, prompts) of SENTENCES written as the run wrote its training rows
  (``[bos] prompt sentence [eos]``, alternating labels), right-padded with the pad id."""
  rows = tmp_path / "rows.jsonl"
  rows.write_text(
    "".join(json.dumps({"sentence": t, "label": i % 2}) + "\n" for i, t in enumerate(SENTENCES))
  )
  fmt = splits.causal_format_for(trained.config)
  encoded = causal.tokenize(data_lib.TextFileSource(rows), trained.tokenizer, 48, fmt)
  offsets = encoded.offsets
  sequences = [encoded.ids[offsets[i] : offsets[i + 1]].tolist() for i in range(len(SENTENCES))]
  prompts = [seq[:n] for seq, n in zip(sequences, encoded.prompt_lengths)]
  _, _, pad = fmt.special_ids(trained.tokenizer)
  ids = np.full((len(sequences), max(map(len, sequences))), pad, np.int32)
  mask = np.zeros_like(ids)
  for i, seq in enumerate(sequences):
    ids[i, : len(seq)], mask[i, : len(seq)] = seq, 1
  return ids, mask, prompts


def test_causal_release_is_a_tied_gpt2_lm_equal_to_the_run(causal_run, tmp_path):
  workdir, release = causal_run
  trained = load_trained(workdir)
  summary = json.loads((workdir / "summary.json").read_text())
  assert trained.step == summary["steps"] == 6  # the shared synthetic_sst2.py:tiny run
  assert loop.params_sha256(trained.params) == summary["params_sha256"]
  model, params, tokenizer = pretrained.load(release)
  assert isinstance(model, gpt2.GPT2LMHeadModel) and model.lora is None
  assert model.config == trained.model.config
  assert tokenizer.to_str() == trained.tokenizer.to_str()
  ids, mask, prompts = _causal_rows(trained, tmp_path)
  want = trained.model.apply({"params": trained.params}, ids, mask)
  got = model.apply({"params": params}, ids, mask)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  # The adapters trained away from B = 0: leaving them out would change the model.
  without = gpt2.GPT2LMHeadModel(trained.model.config).apply(
    {"params": _drop_adapters(trained.params)}, ids, mask
  )
  assert float(jnp.max(jnp.abs(without - want))) > 1e-4
  # config.json: a tied GPT2LMHeadModel without dropout, with the run's special tokens.
  bos, eos, pad = splits.causal_format_for(trained.config).special_ids(trained.tokenizer)
  config = json.loads((release / "config.json").read_text())
  assert config["architectures"] == ["GPT2LMHeadModel"] and config["model_type"] == "gpt2"
  assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (bos, eos, pad)
  assert config["tie_word_embeddings"] is True
  assert config["resid_pdrop"] == config["embd_pdrop"] == config["attn_pdrop"] == 0.0
  assert "lm_head.weight" not in _tensors(release)  # tied, as save_pretrained writes it
  # dpjax_generation.json: the run's format; each label's prompt as training wrote it.
  generation = json.loads((release / export_lib.GENERATION_FILE).read_text())
  assert generation["task"] == "causal_lm" and generation["architecture"] == "GPT2LMHeadModel"
  assert generation["template"] == trained.config.data.template == "sentiment: {label} :"
  assert generation["label_words"] == ["negative", "positive"]
  assert (
    generation["bos_token_id"],
    generation["eos_token_id"],
    generation["pad_token_id"],
  ) == (bos, eos, pad)
  assert [generation["label_prompt_ids"][i % 2] for i in range(len(SENTENCES))] == prompts


def test_causal_release_merges_lora_into_the_conv1d_kernels(causal_run):
  workdir, release = causal_run
  trained = load_trained(workdir)
  tensors = _tensors(release)
  adapters = trained.model.lora
  assert adapters.targets == ("attn/c_attn",)
  flat = traverse_util.flatten_dict(trained.params)
  names = {}
  for path in flat:
    if path[-1] not in ("lora_a", "lora_b"):
      names["transformer." + pretrained._hf_name(path)[0]] = path  # pylint: disable=protected-access
  assert set(tensors) == set(names)  # Every parameter, no adapter, no lm_head.weight.
  merged = 0
  for name, path in names.items():
    value = np.asarray(flat[path], np.float64)
    if path[-2] == "c_attn" and path[-1] == "kernel":
      a, b = (np.asarray(flat[path[:-1] + (leaf,)], np.float64) for leaf in ("lora_a", "lora_b"))
      want = value + adapters.alpha / adapters.rank * (a @ b)  # [in, out] like Conv1D
      assert tensors[name].shape == value.shape == (32, 96)
      np.testing.assert_allclose(tensors[name], want, atol=1e-6, rtol=0)
      assert np.max(np.abs(tensors[name] - value)) > 1e-5
      merged += 1
    else:
      np.testing.assert_array_equal(tensors[name], value.astype(np.float32))
  assert merged == trained.model.config.n_layer == 2


def _drop_adapters(tree):
  if isinstance(tree, dict):
    return {k: _drop_adapters(v) for k, v in tree.items() if k not in ("lora_a", "lora_b")}
  return tree


def _meta(workdir: Path, step: int) -> dict:
  """The checkpoint's JSON metadata item (orbax JsonSave ``meta``)."""
  files = [p for p in (workdir / "checkpoints" / str(step) / "meta").iterdir() if p.is_file()]
  for file in files:
    try:
      meta = json.loads(file.read_text())
    except ValueError:
      continue
    if isinstance(meta, dict) and meta.get("step") == step:
      return meta
  raise AssertionError(f"no meta JSON among {files}")


@pytest.mark.parametrize("name", [*sorted(RUNS), CAUSAL])
def test_release_holds_only_public_files_and_no_secret(request, name):
  workdir, release = _run(request, name)
  files = export_lib.CAUSAL_LM_FILES if name == CAUSAL else export_lib.FILES
  assert sorted(p.name for p in release.iterdir()) == sorted(files)
  summary = json.loads((workdir / "summary.json").read_text())
  public = json.loads((release / "dp_summary.json").read_text())
  assert set(public) <= set(export_lib.PUBLIC_SUMMARY_FIELDS)
  assert public == {k: v for k, v in summary.items() if k in export_lib.PUBLIC_SUMMARY_FIELDS}
  assert "workdir" not in public and "examples_seen" not in public
  assert "params_global_norm" not in public and "ledger" not in public
  assert public["epsilon"] == summary["epsilon"] and public["steps"] == summary["steps"]
  assert public["steps"] == (6 if name == CAUSAL else STEPS[name])
  assert "seed" not in json.loads((release / "config.json").read_text())
  contents = {p.name: p.read_bytes() for p in release.iterdir()}
  assert not any(str(workdir).encode() in data for data in contents.values())
  # The checkpoint's secret must appear in no released file: neither as hex, nor as raw
  # bytes, nor as a decimal integer.
  secret = _meta(workdir, public["steps"])["secret"]["value"]
  assert len(secret) == 64
  forms = [
    secret.encode(),
    secret.lower().encode(),
    secret.upper().encode(),
    bytes.fromhex(secret),
    str(int(secret, 16)).encode(),
  ]
  for file, data in contents.items():
    assert not any(form in data for form in forms), f"{file} holds the run's secret"


def _roundtrip_dir(tmp_path: Path, model, params) -> tuple[Path, dict, dict]:
  backbone, head, architecture = export_lib.model_tensors(model, params)
  save_file({**backbone, **head}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  config = export_lib.hf_config(model.backbone, architecture, None)
  (tmp_path / "config.json").write_text(json.dumps(config))
  return tmp_path, head, config


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
@pytest.mark.parametrize("task", ["label_words", "pooler"])
def test_heads_and_adapters_map_to_hugging_face_names(tmp_path, model_type, task):
  """Without training: every head layout and merged adapters read back through pretrained.py."""
  pad = 1 if model_type == "roberta" else 0
  config = bert.BertConfig(
    vocab_size=50,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=40,
    pad_token_id=pad,
    position_offset=pad + 1 if model_type == "roberta" else 0,
    model_type=model_type,
  )
  adapters = layers.LoraConfig(rank=2, alpha=4.0, targets=("query", "value"))
  if task == "label_words":
    model = heads.LabelWordClassifier(config, (7, 9), lora=adapters)
  else:
    model = heads.SequenceClassifier(config, 3, "pooler", lora=adapters)
  ids = jnp.array([[2, 5, 7, 3, pad], [2, 11, 12, 13, 3]], jnp.int32)
  batch = {
    "input_ids": ids,
    "attention_mask": (ids != pad).astype(jnp.int32),
    "mask_position": jnp.array([2, 1], jnp.int32),
  }
  params = model.init(jax.random.PRNGKey(0), batch)["params"]
  params = jax.tree_util.tree_map_with_path(  # Non-zero B: the adapters change the model.
    lambda path, v: v + 0.1 if path[-1].key == "lora_b" else v, params
  )
  directory, head, config_json = _roundtrip_dir(tmp_path, model, params)
  loaded, loaded_params, _ = pretrained.load(directory, with_tokenizer=False)
  assert loaded.config == config
  want = bert.BertModel(config, adapters).apply(
    {"params": params["backbone"]}, ids, batch["attention_mask"]
  )
  got = loaded.apply({"params": loaded_params}, ids, batch["attention_mask"])
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  prefix = "Roberta" if model_type == "roberta" else "Bert"
  if task == "label_words":
    assert config_json["architectures"] == [f"{prefix}ForMaskedLM"]
    restored = pretrained.load_head_params(directory)["lm_head"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, params["lm_head"])
  else:
    assert config_json["architectures"] == [f"{prefix}ForSequenceClassification"]
    names = (
      {
        "classifier.dense.weight",
        "classifier.dense.bias",
        "classifier.out_proj.weight",
        "classifier.out_proj.bias",
      }
      if model_type == "roberta"
      else {
        "bert.pooler.dense.weight",
        "bert.pooler.dense.bias",
        "classifier.weight",
        "classifier.bias",
      }
    )
    assert set(head) == names


def test_stale_or_missing_summary(runs, tmp_path):
  """A summary of another step is refused; without one, the release has no dp_summary.json."""
  workdir = tmp_path / "run"
  shutil.copytree(runs["full"][0], workdir)
  summary_file = workdir / "summary.json"
  summary = json.loads(summary_file.read_text())
  summary_file.write_text(json.dumps({**summary, "steps": 1}))
  latest = STEPS["full"]
  with pytest.raises(
    export_lib.ExportError, match=f"step 1 but the latest checkpoint is step {latest}"
  ):
    export_lib.export(workdir, tmp_path / "stale")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
  summary_file.unlink()
  release = export_lib.export(workdir, tmp_path / "bare")
  assert sorted(p.name for p in release.iterdir()) == sorted(
    set(export_lib.FILES) - {"dp_summary.json"}
  )


def test_failed_write_leaves_nothing(runs, tmp_path, monkeypatch):
  def fail(*args):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(export_lib.os, "rename", fail)
  with pytest.raises(export_lib.ExportError, match="No space left"):
    export_lib.export(runs["full"][0], tmp_path / "release")
  assert not any(tmp_path.iterdir())


def test_workdir_without_checkpoint_is_refused(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(sst2.get_config("tiny").to_json())
  with pytest.raises(ConfigError, match="no checkpoint"):
    export_lib.export(workdir, tmp_path / "release")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
  assert sorted(p.name for p in workdir.iterdir()) == ["config.json"]


def _cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "dpjax.export", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_cli_refuses_bad_inputs_with_one_line(runs, tmp_path):
  missing = _cli(f"--workdir={tmp_path / 'none'}", f"--out={tmp_path / 'release'}")
  assert missing.returncode == 2 and missing.stdout == ""
  assert missing.stderr.startswith("error:") and len(missing.stderr.splitlines()) == 1
  assert "does not exist" in missing.stderr and not (tmp_path / "release").exists()
  occupied = tmp_path / "occupied"
  occupied.mkdir()
  (occupied / "notes.txt").write_text("mine")
  busy = _cli(f"--workdir={runs['full'][0]}", f"--out={occupied}")
  assert busy.returncode == 2 and busy.stderr.startswith("error:")
  assert len(busy.stderr.splitlines()) == 1 and "not an empty directory" in busy.stderr
  assert [p.name for p in occupied.iterdir()] == ["notes.txt"]
