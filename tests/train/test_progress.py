"""Progress of a run: public lines everywhere, the live bar (with timings) on a terminal only."""

from __future__ import annotations

import io

from dpjax.train.progress import Progress


def _run(stream: io.StringIO, **kwargs) -> str:
  progress = Progress(0, 6, log_every=3, stream=stream, **kwargs)
  for done in range(1, 7):
    logged = done % 3 == 0
    progress.step(done, 0.5 * done if logged else None, None)
    if done == 4:
      progress.evaluated(done, {"accuracy": 0.75, "epsilon": 2.0})
  progress.close()
  return stream.getvalue()


class _Terminal(io.StringIO):
  def isatty(self) -> bool:
    return True


def test_a_file_or_pipe_gets_public_lines_and_no_timings():
  text = _run(io.StringIO())
  assert text.splitlines() == [
    "step 3/6 eps 1.500",
    'eval step 4: {"accuracy": 0.75, "epsilon": 2.0}',
    "step 6/6 eps 3.000",
  ]


def test_a_terminal_also_gets_the_bar_with_eta_labelled_operator_only():
  text = _run(_Terminal())
  lines = [part.strip() for part in text.replace("\r", "\n").splitlines() if part.strip()]
  assert {"step 3/6 eps 1.500", "step 6/6 eps 3.000"} <= set(lines)
  bars = [line for line in lines if "ETA" in line]
  assert bars and all(line.endswith("(timings: operator only)") for line in bars)
  assert any("eps 1.500 · eval accuracy 0.75 @4" in line for line in bars)


def test_private_statistics_are_labelled_and_other_processes_show_nothing():
  stream = io.StringIO()
  progress = Progress(0, 2, log_every=1, stream=stream)
  progress.step(1, 1.0, {"loss": 0.5, "examples_per_second": 12.0})
  assert stream.getvalue() == (
    "step 1/2 eps 1.000 | private, not covered by (eps, delta): loss 0.5000 12.0 ex/s\n"
  )
  quiet = io.StringIO()
  _run(quiet, interactive=True, enabled=False)
  assert quiet.getvalue() == ""
