"""BLEU, chrF++ and ROUGE-L against several references per input."""

import pytest

from dpjax import text_metrics

REFS = [
  ["the eagle is a pub near the river .", "by the river there is a pub called the eagle ."],
  ["aromi is a cheap coffee shop ."],
]


def test_exact_matches_score_100_and_the_best_reference_counts():
  perfect = text_metrics.generation_scores([REFS[0][1], REFS[1][0]], REFS)
  assert perfect["bleu"] == pytest.approx(100.0)
  assert perfect["rouge_l"] == pytest.approx(100.0) and perfect["chrf++"] == pytest.approx(100.0)
  assert perfect["inputs"] == 2 and perfect["references"] == 3
  assert perfect["signature"]["bleu"].startswith("nrefs:var|")  # 2 and 1 references
  wrong = text_metrics.generation_scores(["a bank in the city .", "the mill is closed ."], REFS)
  assert wrong["bleu"] < 10 and wrong["rouge_l"] < 50
  # An extra reference equal to the prediction lifts it to the top.
  helped = text_metrics.generation_scores(
    ["a bank in the city .", REFS[1][0]], [REFS[0] + ["a bank in the city ."], REFS[1]]
  )
  assert helped["bleu"] == pytest.approx(100.0) and helped["rouge_l"] == pytest.approx(100.0)


def test_bad_inputs_and_grouping():
  with pytest.raises(ValueError, match="one list of references per prediction"):
    text_metrics.generation_scores(["x"], REFS)
  with pytest.raises(ValueError, match="at least one reference"):
    text_metrics.generation_scores(["x"], [[]])
  prompts, targets = text_metrics.group_references(["a", "b", "a"], ["1", "2", "3"])
  assert prompts == ["a", "b"] and targets == [["1", "3"], ["2"]]
