"""Release a trained run as a Hugging Face directory: weights, config, tokenizer, public DP facts.

    python -m dpjax.export --workdir=DIR --out=DIR

A workdir is secret material (its checkpoints hold the run's random secret and
private statistics); the release holds only what may be published, and nothing else.
A classifier (``model.task`` classify or label_words, BERT-family encoder):

  model.safetensors  the backbone under Hugging Face names (``bert.``/``roberta.`` prefix), LoRA
                     adapters merged into their kernels (W + (alpha / rank) A B), and the head;
  config.json        the backbone's Hugging Face config;
  dpjax_head.json    the head: task, pooling, labels or label words, its tensors and formula;
  tokenizer.json     the run's tokenizer;
  dp_summary.json    the public fields of the run's summary.json (ε, δ, σ, q, steps, ...),
                     when the run wrote one.

A causal LM (``model.task = causal_lm``, GPT-2 decoder), a ``GPT2LMHeadModel`` directory:

  model.safetensors     the decoder under Hugging Face names (``transformer.`` prefix; Conv1D
                        kernels ``[in, out]`` as GPT-2 stores them), LoRA adapters merged;
                        no ``lm_head.weight``: the output layer is tied to
                        ``transformer.wte.weight`` (what ``save_pretrained`` writes, and what
                        ``from_pretrained`` ties back with ``tie_word_embeddings``);
  config.json           the ``GPT2LMHeadModel`` config, with the bos/eos/pad token ids of the
                        run's data format and every dropout 0;
  dpjax_generation.json how the run wrote its sequences, to prompt the model as it was
                        trained: task, template and label words, bos/eos/pad ids, and
                        the prompt ids of each label when the template holds only ``{label}``;
  tokenizer.json, dp_summary.json  as for a classifier.

Head tensors (``[out, in]`` weights, as ``torch.nn.Linear`` stores them):

* classify, pooling=pooler: ``bert.pooler.dense.*`` + ``classifier.*``
  (BertForSequenceClassification), or ``classifier.dense.*`` + ``classifier.out_proj.*``
  (RobertaForSequenceClassification);
* classify, pooling=cls or mean: ``classifier.dpjax_head.*``; no Hugging Face class computes
  this head, so its names match none (they still nest under ``classifier.``, where checkpoint
  loaders look for heads);
* label_words: ``cls.predictions.transform.*`` + ``cls.predictions.bias`` (BertForMaskedLM)
  or ``lm_head.*`` (RobertaForMaskedLM); the decoder is tied to the word embeddings.

The directory is written next to ``--out`` under a temporary name and renamed at the end, so
it is complete or absent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags, logging
from flax import traverse_util
from safetensors.numpy import save as safetensors_bytes

import dpjax
from dpjax import _cli
from dpjax.data import causal, tokenizer_utils
from dpjax.models import bert, gpt2, heads, layers, lora, pretrained
from dpjax.models.pretrained import PretrainedError
from dpjax.train import loop, splits
from dpjax.train.config import ConfigError
from dpjax.trained import Trained, load_trained

PyTree = Any
FLAGS = flags.FLAGS
# summary.json fields that may be published; any other field stays in the workdir.
PUBLIC_SUMMARY_FIELDS = (
  "epsilon",
  "delta",
  "epsilon_replace_one",
  "epsilon_interval",
  "attacker",
  "noise_multiplier",
  "sampling_prob",
  "steps",
  "planned_steps",
  "accountant",
  "dp",
  "target_epsilon",
  "epsilon_budget",
  "sigma_from",
  "sensitivity",
  "dataset_size",
  "unit",
  "max_examples_per_user",
  "num_users",
  "expected_batch_size",
  "clip",
  "clip_norm",
  "adaptive_clipping",  # dp.clip=quantile: γ, η, σ_b, z_Δ, C_0 (public plan)
  "final_clip_norm",  # its last bound: a function of the released noisy counts
  "neighboring_relation",
  "guarantee",
  "eval",
  "params_sha256",
  "model",
  "noise",
  "releases",
)
# The files of a release (dp_summary.json only when the run wrote its summary).
FILES = ("model.safetensors", "config.json", "dpjax_head.json", "tokenizer.json", "dp_summary.json")
GENERATION_FILE = "dpjax_generation.json"
CAUSAL_LM_FILES = (
  "model.safetensors",
  "config.json",
  GENERATION_FILE,
  "tokenizer.json",
  "dp_summary.json",
)
GPT2_PREFIX = "transformer."


class ExportError(ValueError):
  """The workdir cannot be released to the requested directory."""


def merge_lora(params: PyTree, lora_config: layers.LoraConfig | None) -> PyTree:
  """``params`` without adapter leaves: each adapted kernel W becomes W + (α / r) · A · B.

  Raises:
    ExportError: the tree holds adapters but ``lora_config`` is None.
  """
  flat = traverse_util.flatten_dict(params)
  adapted = {path[:-1] for path in flat if path[-1] in lora.LORA_LEAVES}
  if adapted and lora_config is None:
    raise ExportError("the parameters hold LoRA adapters but the model has no LoRA config")
  merged = {}
  for path, value in flat.items():
    if path[-1] in lora.LORA_LEAVES:
      continue
    value = np.asarray(value, np.float32)
    if path[-1] == "kernel" and path[:-1] in adapted:
      a = np.asarray(flat[path[:-1] + ("lora_a",)], np.float64)
      b = np.asarray(flat[path[:-1] + ("lora_b",)], np.float64)
      scale = lora_config.alpha / lora_config.rank
      value = (value.astype(np.float64) + scale * (a @ b)).astype(np.float32)
    merged[path] = value
  return traverse_util.unflatten_dict(merged)


def backbone_tensors(
  config: bert.BertConfig | gpt2.GPT2Config, params: PyTree
) -> dict[str, np.ndarray]:
  """Backbone params (no adapters) -> the tensors ``pretrained.load`` reads, with the prefix of
  the Hugging Face task model (``bert.``, ``roberta.``, ``transformer.``).

  Names and orientation are those of :func:`dpjax.models.pretrained.load`: ``embedding``/``scale``
  leaves are called ``weight``; BERT-family kernels are stored transposed ([out, in]), GPT-2's
  as they are ([in, out], Hugging Face's Conv1D).
  """
  is_gpt2 = isinstance(config, gpt2.GPT2Config)
  prefix = GPT2_PREFIX if is_gpt2 else f"{config.model_type}."
  tensors = {}
  for path, value in traverse_util.flatten_dict(params).items():
    name, is_kernel = pretrained._hf_name(path)  # pylint: disable=protected-access
    value = np.asarray(value)
    tensors[prefix + name] = value.T if is_kernel and not is_gpt2 else value
  return tensors


def _linear(dense: PyTree, name: str) -> dict[str, np.ndarray]:
  """A Dense ``{kernel [in, out], bias}`` as ``{name.weight [out, in], name.bias}``."""
  return {
    f"{name}.weight": np.asarray(dense["kernel"]).T,
    f"{name}.bias": np.asarray(dense["bias"]),
  }


def _classifier_layout(model: heads.SequenceClassifier) -> tuple[str | None, str, str | None]:
  """(pooler tensor name or None, classifier tensor name, Hugging Face architecture or None)."""
  if model.pooling != "pooler":
    return None, "classifier.dpjax_head", None
  if model.backbone.model_type == "roberta":
    return "classifier.dense", "classifier.out_proj", "RobertaForSequenceClassification"
  return "bert.pooler.dense", "classifier", "BertForSequenceClassification"


def _mlm_layout(model: heads.LabelWordClassifier) -> tuple[str, str, str, str]:
  """(dense, LayerNorm, bias tensor names, Hugging Face architecture) of the MLM head."""
  if model.backbone.model_type == "roberta":
    return "lm_head.dense", "lm_head.layer_norm", "lm_head.bias", "RobertaForMaskedLM"
  return (
    "cls.predictions.transform.dense",
    "cls.predictions.transform.LayerNorm",
    "cls.predictions.bias",
    "BertForMaskedLM",
  )


def head_tensors(
  model: heads.SequenceClassifier | heads.LabelWordClassifier, params: PyTree
) -> tuple[dict[str, np.ndarray], str | None]:
  """(head tensors, Hugging Face architecture or None) from params without adapters."""
  if isinstance(model, heads.LabelWordClassifier):
    dense, norm, bias, architecture = _mlm_layout(model)
    head = params["lm_head"]
    return (
      {
        **_linear(head["dense"], dense),
        f"{norm}.weight": np.asarray(head["LayerNorm"]["scale"]),
        f"{norm}.bias": np.asarray(head["LayerNorm"]["bias"]),
        bias: np.asarray(head["bias"]),
      },
      architecture,
    )
  pooler, classifier, architecture = _classifier_layout(model)
  tensors = _linear(params["head"], classifier)
  if pooler is not None:
    tensors.update(_linear(params["pooler"]["dense"], pooler))
  return tensors, architecture


def model_tensors(
  model: heads.SequenceClassifier | heads.LabelWordClassifier | gpt2.GPT2LMHeadModel,
  params: PyTree,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str | None]:
  """(backbone tensors, head tensors, Hugging Face architecture of the head or None).

  LoRA adapters are merged first, so the tensors describe a plain model; all are
  contiguous float32 and no name is in both dicts. A GPT-2 decoder has no head tensors
  (its output layer is tied to ``transformer.wte.weight``).

  Raises:
    ExportError: the model is neither a task model on a BERT-family backbone nor GPT-2.
  """
  as_f32 = lambda tensors: {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
  if isinstance(model, gpt2.GPT2LMHeadModel):
    params = merge_lora(params, model.lora)
    return as_f32(backbone_tensors(model.config, params)), {}, "GPT2LMHeadModel"
  if not isinstance(model, (heads.SequenceClassifier, heads.LabelWordClassifier)):
    raise ExportError(f"cannot export a {type(model).__name__}; only dpjax task models")
  params = merge_lora(params, model.lora)
  head, architecture = head_tensors(model, params)
  backbone = backbone_tensors(model.backbone, params["backbone"])
  if backbone.keys() & head.keys():
    raise ExportError(f"head tensors collide with the backbone's: {backbone.keys() & head.keys()}")
  return as_f32(backbone), as_f32(head), architecture


def hf_config(
  config: bert.BertConfig, architecture: str | None, num_labels: int | None
) -> dict[str, Any]:
  """The Hugging Face ``config.json`` of a BERT-family backbone (read back by ``read_config``).

  Raises:
    ExportError: the config would not read back to ``config`` (dropout aside).
  """
  default = "RobertaModel" if config.model_type == "roberta" else "BertModel"
  out = {"architectures": [architecture or default], "model_type": config.model_type}
  for field in (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "hidden_act",
    "pad_token_id",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
  ):
    out[field] = getattr(config, field)
  out["position_embedding_type"] = "absolute"
  if num_labels is not None:
    out["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
    out["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
  no_dropout = dataclasses.replace(
    config, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
  )
  if bert.BertConfig.from_hf(out) != no_dropout:
    raise ExportError(f"the backbone config {config} has no Hugging Face equivalent")
  return out


def gpt2_hf_config(config: gpt2.GPT2Config, bos: int, eos: int, pad: int) -> dict[str, Any]:
  """The ``GPT2LMHeadModel`` ``config.json`` of a decoder (read back by ``read_config``).

  Every dropout is 0 (the release is for inference); the output layer is tied to the token
  embedding; ``bos``/``eos``/``pad`` are the token ids the run wrote its sequences with.

  Raises:
    ExportError: the config would not read back to ``config`` (dropout aside).
  """
  out = {
    "architectures": ["GPT2LMHeadModel"],
    "model_type": "gpt2",
    "vocab_size": config.vocab_size,
    "n_positions": config.n_positions,
    "n_embd": config.n_embd,
    "n_layer": config.n_layer,
    "n_head": config.n_head,
    "n_inner": config.n_inner,
    "activation_function": config.activation_function,
    "layer_norm_epsilon": config.layer_norm_epsilon,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "summary_first_dropout": 0.0,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "bos_token_id": int(bos),
    "eos_token_id": int(eos),
    "pad_token_id": int(pad),
    "tie_word_embeddings": True,
    "use_cache": True,
  }
  if gpt2.GPT2Config.from_hf(out) != dataclasses.replace(config, dropout=0.0):
    raise ExportError(f"the decoder config {config} has no Hugging Face equivalent")
  return out


def _causal_format(trained: Trained) -> tuple[causal.CausalFormat, tuple[int, int, int]]:
  """(the run's causal-LM format, its (bos, eos, pad) ids)."""
  fmt = splits.causal_format_for(trained.config)
  if fmt is None:
    raise ExportError(f"the run's model.task is {trained.config.model.task!r}, not causal_lm")
  try:
    return fmt, fmt.special_ids(trained.tokenizer)
  except ValueError as err:
    raise ExportError(f"the run's special tokens: {err}") from None


def generation_description(trained: Trained) -> dict[str, Any]:
  """What ``dpjax_generation.json`` says: how the run wrote its sequences, to prompt it alike."""
  c = trained.config
  fmt, (bos, eos, pad) = _causal_format(trained)
  out = {
    "dpjax_version": dpjax.__version__,
    "task": c.model.task,
    "architecture": "GPT2LMHeadModel",
    "template": fmt.template,
    "label_words": list(fmt.label_words),
    "bos_token_id": int(bos),
    "eos_token_id": int(eos),
    "pad_token_id": int(pad),
    "max_length": int(c.data.max_length),
    "sequence": (
      "training sequences were [bos_token_id] + encode(prompt) + encode(completion) + "
      "[eos_token_id], each encode(...) = tokenizer.encode(text, add_special_tokens=False).ids "
      "with no padding or truncation; prompt = template with {prompt} replaced by the row's "
      "prompt and {label} by label_words[label]; to generate, feed [bos_token_id] + "
      "encode(prompt) and stop at eos_token_id"
    ),
  }
  if fmt.uses_label and not fmt.uses_prompt:
    plain = tokenizer_utils.unpadded_copy(trained.tokenizer)
    out["label_prompt_ids"] = [
      [int(bos), *plain.encode(fmt.prompt_text(None, label), add_special_tokens=False).ids]
      for label in range(len(fmt.label_words))
    ]
  return out


def _logits_formula(model: heads.SequenceClassifier | heads.LabelWordClassifier) -> str:
  """How the head computes its logits from ``last_hidden_state``, in the release's names."""
  if isinstance(model, heads.LabelWordClassifier):
    dense, norm, bias, _ = _mlm_layout(model)
    embeddings = f"{model.backbone.model_type}.embeddings.word_embeddings.weight"
    return (
      f"h = last_hidden_state at the template's mask token; t = {norm}(hidden_act(h @ "
      f"{dense}.weight.T + {dense}.bias)); logits = t @ {embeddings}[label_word_ids].T + "
      f"{bias}[label_word_ids]"
    )
  pooler, classifier, _ = _classifier_layout(model)
  pooled = {
    "cls": "last_hidden_state[:, 0]",
    "mean": "the mean of last_hidden_state over the positions where attention_mask = 1",
    "pooler": f"tanh(last_hidden_state[:, 0] @ {pooler}.weight.T + {pooler}.bias)",
  }
  return (
    f"logits = pooled @ {classifier}.weight.T + {classifier}.bias, pooled = "
    + pooled[model.pooling]
  )


def head_description(
  trained: Trained, head: dict[str, np.ndarray], architecture: str | None
) -> dict[str, Any]:
  """What ``dpjax_head.json`` says: enough to rebuild the head from the release's tensors."""
  c, model = trained.config, trained.model
  out = {
    "dpjax_version": dpjax.__version__,
    "task": c.model.task,
    "architecture": architecture,
    "num_labels": int(c.data.num_labels),
    "max_length": int(c.data.max_length),
  }
  if isinstance(model, heads.LabelWordClassifier):
    out.update(
      {
        "template": c.data.template,
        "label_words": list(c.data.label_words),
        "label_word_ids": [int(i) for i in model.label_word_ids],
        "hidden_act": model.backbone.hidden_act,
        "layer_norm_eps": model.backbone.layer_norm_eps,
      }
    )
  else:
    out["pooling"] = model.pooling
  out["logits"] = _logits_formula(model)
  out["tensors"] = {name: list(tensor.shape) for name, tensor in head.items()}
  return out


def public_summary(summary: dict[str, Any]) -> dict[str, Any]:
  """The allow-listed fields of a run summary (only those present)."""
  return {key: summary[key] for key in PUBLIC_SUMMARY_FIELDS if key in summary}


def run_summary(workdir: Path, trained: Trained) -> dict[str, Any] | None:
  """``workdir/summary.json`` if the run wrote one; it must describe ``trained``.

  Raises:
    ExportError: the summary is unreadable, or describes another step or other parameters.
  """
  file = workdir / "summary.json"
  if not file.is_file():
    return None
  try:
    summary = json.loads(file.read_text())
  except (ValueError, UnicodeDecodeError) as err:
    raise ExportError(f"{file} is not JSON: {err}") from None
  if not isinstance(summary, dict):
    raise ExportError(f"{file} is not a run summary")
  if summary.get("steps") != trained.step:
    raise ExportError(
      f"{file} was written at step {summary.get('steps')} but the latest "
      f"checkpoint is step {trained.step}: resume the run (python -m dpjax.main "
      "with this --workdir) until it writes its summary again"
    )
  if "params_sha256" in summary and summary["params_sha256"] != loop.params_sha256(trained.params):
    raise ExportError(
      f"the parameters restored from {workdir} differ from those {file} "
      "describes (params_sha256); has the pretrained model changed?"
    )
  return summary


def _tokenizer_json(trained: Trained) -> bytes:
  """The run's tokenizer.json: the pretrained model's file, or the loaded one for ``tiny``."""
  name = trained.config.model.name
  if name == "tiny":
    return trained.tokenizer.to_str(pretty=True).encode()
  return (pretrained.resolve(name) / "tokenizer.json").read_bytes()


def _json(value: Any) -> bytes:
  return (json.dumps(value, indent=2) + "\n").encode()


def _classifier_files(trained: Trained) -> dict[str, bytes]:
  backbone, head, architecture = model_tensors(trained.model, trained.params)
  num_labels = (
    int(trained.config.data.num_labels) if trained.config.model.task == "classify" else None
  )
  return {
    "model.safetensors": safetensors_bytes({**backbone, **head}, metadata={"format": "pt"}),
    "config.json": _json(hf_config(trained.model.backbone, architecture, num_labels)),
    "dpjax_head.json": _json(head_description(trained, head, architecture)),
  }


def _causal_lm_files(trained: Trained) -> dict[str, bytes]:
  tensors, _, _ = model_tensors(trained.model, trained.params)
  _, special_ids = _causal_format(trained)
  return {
    "model.safetensors": safetensors_bytes(tensors, metadata={"format": "pt"}),
    "config.json": _json(gpt2_hf_config(trained.model.config, *special_ids)),
    GENERATION_FILE: _json(generation_description(trained)),
  }


def release_files(trained: Trained, summary: dict[str, Any] | None) -> dict[str, bytes]:
  """{file name: contents} of the release of ``trained`` (dp_summary.json only with a summary):
  :data:`FILES` for a classifier, :data:`CAUSAL_LM_FILES` for a causal LM."""
  if isinstance(trained.model, gpt2.GPT2LMHeadModel):
    files = _causal_lm_files(trained)
  else:
    files = _classifier_files(trained)
  files["tokenizer.json"] = _tokenizer_json(trained)
  if summary is not None:
    files["dp_summary.json"] = _json(public_summary(summary))
  return files


def _check_out(out: Path) -> None:
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise ExportError(f"--out {out} exists and is not an empty directory")


def _write_atomically(out: Path, files: dict[str, bytes]) -> None:
  """Writes ``files`` into a fresh directory beside ``out``, then renames it to ``out``."""
  partial = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:12]}"
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    partial.mkdir()
    for name, data in files.items():
      (partial / name).write_bytes(data)
    os.rename(partial, out)  # Replaces an empty directory; fails on a non-empty one.
  except OSError as err:
    raise ExportError(f"cannot write {out}: {err.strerror or err}") from None
  finally:
    if partial.exists():
      shutil.rmtree(partial, ignore_errors=True)


def export(workdir: str | Path, out_dir: str | Path) -> Path:
  """Writes the release of ``workdir``'s latest checkpoint to ``out_dir``; returns its path.

  Raises:
    ExportError: ``out_dir`` is not empty, ``workdir`` does not exist, or its summary.json
      does not describe its latest checkpoint.
    ConfigError: ``workdir`` is not a run or has no checkpoint.
    PretrainedError: the run's pretrained model cannot be loaded.
  """
  workdir, out = Path(workdir), Path(out_dir).absolute()
  _check_out(out)
  if not workdir.is_dir():
    raise ExportError(f"--workdir {workdir} does not exist")
  trained = load_trained(workdir)
  files = release_files(trained, run_summary(workdir, trained))
  _write_atomically(out, files)
  return out


def _define_flags() -> None:
  """The CLI flags (defined only when run as a program: other modules define --workdir too)."""
  flags.DEFINE_string("workdir", None, "A dpjax.main workdir.")
  flags.DEFINE_string("out", None, "The directory to write (absent or empty).")


def main(argv: list[str]) -> None:
  """Prints the release's path; on a user mistake, one ``error:`` line and exit status 2."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Library INFO logs (checkpointing) off by default.
  if len(argv) > 1 or not FLAGS.workdir or not FLAGS.out:
    print("error: usage: python -m dpjax.export --workdir=DIR --out=DIR", file=sys.stderr)
    sys.exit(2)
  try:
    out = export(FLAGS.workdir, FLAGS.out)
  except (ExportError, ConfigError, PretrainedError) as err:
    print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
    sys.exit(2)
  print(out)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=_cli.parse_flags)
