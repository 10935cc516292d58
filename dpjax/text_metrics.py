"""Generation quality against references: BLEU and chrF++ (sacrebleu), ROUGE-L (rouge-score).

The table-to-text benchmarks (E2E, DART) give several references per input; each
prediction is scored against all of its input's references:

* BLEU: corpus BLEU-4 (Papineni et al. 2002) with multiple references, sacrebleu's
  defaults (13a tokenization, exponential smoothing); its signature is returned
  so the number is reproducible.
* chrF++: character n-gram F-score with word bigrams (Popović 2017), sacrebleu.
* ROUGE-L: the F-measure of the longest common subsequence (Lin 2004), the best
  reference per prediction, averaged over predictions (rouge-score, no stemming).

METEOR needs the WordNet database, which cannot be fetched offline; chrF++ is the
maintained character-level alternative reported instead. Scores are on a 0-100 scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def generation_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
  """BLEU, chrF++ and ROUGE-L of ``predictions[i]`` against ``references[i]`` (one or more).

  Raises:
    ValueError: the lists differ in length, are empty, or an input has no reference.
  """
  from rouge_score import rouge_scorer  # pylint: disable=import-outside-toplevel
  from sacrebleu.metrics import BLEU, CHRF  # pylint: disable=import-outside-toplevel

  if len(predictions) != len(references) or not predictions:
    raise ValueError(
      f"need one list of references per prediction (got {len(predictions)} predictions, "
      f"{len(references)} reference lists)"
    )
  if any(not refs for refs in references):
    raise ValueError("every prediction needs at least one reference")
  most = max(len(refs) for refs in references)
  # sacrebleu takes reference streams; inputs with fewer references pad theirs with None.
  streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(most)]
  bleu, chrf = BLEU(), CHRF(word_order=2)
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
  rouge = [
    max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in refs)
    for pred, refs in zip(predictions, references)
  ]
  out: dict[str, Any] = {
    "bleu": bleu.corpus_score(list(predictions), streams).score,
    "chrf++": chrf.corpus_score(list(predictions), streams).score,
    "rouge_l": 100.0 * sum(rouge) / len(rouge),
    "inputs": len(predictions),
    "references": sum(len(refs) for refs in references),
    "signature": {"bleu": str(bleu.get_signature()), "chrf++": str(chrf.get_signature())},
  }
  return out


def group_references(prompts: Sequence[str], targets: Sequence[str]) -> tuple[list, list]:
  """(unique prompts in first-seen order, the targets of each) from parallel rows."""
  order: dict[str, list[str]] = {}
  for prompt, target in zip(prompts, targets):
    order.setdefault(prompt, []).append(target)
  return list(order), list(order.values())
