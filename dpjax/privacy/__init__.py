"""The DP core: clipping, per-example gradients, noise, sampling and accounting.

Pure JAX and dp_accounting; knows nothing of models, files or training loops.
"""

from dpjax.privacy.accounting import (
  PrivacyLedger,
  Segment,
  calibrate_noise,
  compute_epsilon,
  default_delta,
  group_privacy_epsilon,
)
from dpjax.privacy.clipping import (
  AutomaticClip,
  ClipRule,
  FlatClip,
  PerLayerClip,
  clip_and_sum,
  clip_per_example,
)
from dpjax.privacy.mechanism import Mechanism, MechanismSpec, make_mechanism
from dpjax.privacy.noise import gaussian_privatizer
from dpjax.privacy.per_example import ClippedGradAux, check_finite, clipped_grad
from dpjax.privacy.quantile import QuantileClip, quantile_privatizer
from dpjax.privacy.sampling import PoissonSampler, steps_for_epochs, steps_per_epoch

__all__ = [
  "AutomaticClip",
  "ClipRule",
  "ClippedGradAux",
  "FlatClip",
  "PerLayerClip",
  "PoissonSampler",
  "PrivacyLedger",
  "QuantileClip",
  "Segment",
  "calibrate_noise",
  "check_finite",
  "clip_and_sum",
  "clip_per_example",
  "clipped_grad",
  "compute_epsilon",
  "default_delta",
  "gaussian_privatizer",
  "group_privacy_epsilon",
  "make_mechanism",
  "quantile_privatizer",
  "Mechanism",
  "MechanismSpec",
  "steps_for_epochs",
  "steps_per_epoch",
]
