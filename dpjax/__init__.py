"""dpjax: differentially private fine-tuning of language models in JAX/Flax.

``dpjax.load_trained(workdir)`` (from :mod:`dpjax.trained`) is the model of a finished run;
:mod:`dpjax.predict` scores texts with it. Both import JAX only when first used.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {"load_trained": "dpjax.trained", "Trained": "dpjax.trained"}
__all__ = ["Trained", "load_trained"]


def __getattr__(name: str):
  """``load_trained`` and ``Trained``, imported on first use (``import dpjax`` stays light)."""
  if name in _LAZY:
    import importlib  # pylint: disable=import-outside-toplevel

    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'dpjax' has no attribute {name!r}")
