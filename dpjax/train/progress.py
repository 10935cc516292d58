"""What a run shows while it trains: public facts everywhere, timings on the terminal only.

* Every ``log_every`` steps (and at the last one) a plain line: the step and the ε
  spent, both public (ε is a function of the plan). With ``train.private_metrics``
  the line goes on with the statistics of the private batches (loss, throughput),
  labelled as not covered by (ε, δ).
* On an interactive terminal (process 0's stdout is a TTY) a ``tqdm`` bar under
  those lines is redrawn as the steps go: step / total, ε spent, the last
  evaluation, the elapsed time and an ETA.

Step times depend on the size of each Poisson sample (microbatches of pure padding
are skipped), so timings are statistics of the private batches: operator-only
(DESIGN rule 13). The bar is drawn on the terminal and never written anywhere: a
run whose output goes to a file or a pipe shows the plain lines alone.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any, TextIO


def _epsilon_text(epsilon: float) -> str:
  return f"{epsilon:.3f}" if math.isfinite(epsilon) else "inf"


class Progress:
  """The progress of steps ``start+1 .. total`` (see the module docstring).

  Args:
    start: the step the run resumes from (0 for a new run).
    total: the last step this run executes.
    log_every: a plain line every this many steps (and at ``total``).
    stream: where lines go (stdout).
    interactive: draw the live bar; default: ``stream`` is a TTY.
    enabled: False on the processes other than process 0 (they show nothing).
  """

  def __init__(
    self,
    start: int,
    total: int,
    log_every: int,
    stream: TextIO | None = None,
    interactive: bool | None = None,
    enabled: bool = True,
  ):
    self.total, self.log_every, self.enabled = total, max(1, int(log_every)), enabled
    self.stream = sys.stdout if stream is None else stream
    if interactive is None:
      interactive = bool(getattr(self.stream, "isatty", lambda: False)())
    self._bar = None
    self._epsilon: float | None = None
    self._eval = ""
    if enabled and interactive and total > start:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel

      self._bar = tqdm(
        total=total,
        initial=start,
        file=self.stream,
        unit="step",
        dynamic_ncols=True,
        leave=False,
        # The ETA ({remaining}) is a timing: labelled as the operator's, not covered by ε.
        bar_format=(
          "step {n_fmt}/{total_fmt} |{bar:16}| {desc} "
          "| {elapsed}, ETA {remaining} (timings: operator only)"
        ),
      )

  def say(self, text: str) -> None:
    """A line of the run's log (above the bar when there is one)."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text, file=self.stream)
    else:
      print(text, file=self.stream, flush=True)

  def step(self, done: int, epsilon: float | None, private: dict[str, float] | None) -> None:
    """Step ``done`` finished; ``epsilon`` (ε spent) is given on the logged steps."""
    if epsilon is not None:
      self._epsilon = epsilon
    if epsilon is not None or private is not None:
      self.say(self._line(done, epsilon, private))
    if self._bar is not None:
      self._bar.update(done - self._bar.n)
      self._bar.set_description_str(self._status(), refresh=False)

  def evaluated(self, done: int, result: dict[str, Any]) -> None:
    """An evaluation on the held-out split at step ``done``: a line, and the bar keeps it."""
    metric = next((k for k in ("accuracy", "perplexity") if k in result), None)
    if metric is not None:
      self._eval = f"eval {metric} {result[metric]:.4g} @{done}"
    self.say(f"eval step {done}: {json.dumps(result)}")

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def _status(self) -> str:
    parts = [] if self._epsilon is None else [f"eps {_epsilon_text(self._epsilon)}"]
    return " · ".join([*parts, *([self._eval] if self._eval else [])])

  def _line(self, done: int, epsilon: float | None, private: dict[str, float] | None) -> str:
    text = f"step {done}/{self.total}"
    if epsilon is not None and math.isfinite(epsilon):
      text += f" eps {epsilon:.3f}"
    if private is not None:
      accuracy = f"acc {private['accuracy']:.3f} " if "accuracy" in private else ""
      text += (
        f" | private, not covered by (eps, delta): loss {private['loss']:.4f} "
        f"{accuracy}{private['examples_per_second']:.1f} ex/s"
      )
    return text
