"""The DP label histogram: Gaussian noise from the secret, its ledger segment, and calibration."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
from scipy import stats

from dpjax import privacy
from dpjax.privacy import histogram
from dpjax.privacy.secret import RunSecret


def test_release_is_counts_plus_secret_gaussian_noise():
  labels = np.repeat(np.arange(2000), 3)  # 2000 labels, 3 rows each: noise on 2000 counts
  secret = RunSecret.fresh()
  released = np.asarray(histogram.release(labels, 2000, 4.0, secret))
  noise = (released - 3.0) / 4.0
  assert stats.kstest(noise, "norm").pvalue > 1e-3
  assert abs(noise.std() - 1.0) < 0.06
  # A function of the secret: the same secret gives the same release, another secret another.
  np.testing.assert_array_equal(histogram.release(labels, 2000, 4.0, secret), released)
  other = np.asarray(histogram.release(labels, 2000, 4.0, RunSecret.fresh()))
  assert np.mean(other == released) < 0.01
  # Snapped to the power-of-two grid of σ (no low-order floating-point bits leak).
  grid = privacy.noise.snap_grid(4.0)
  np.testing.assert_array_equal(np.round(released / grid) * grid, released)


def test_segment_is_the_gaussian_mechanism_of_dp_accounting():
  n, sigma, delta = 1000, 3.0, 1e-5
  ledger = privacy.PrivacyLedger().record(histogram.segment(sigma, n))
  accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
  accountant.compose(dp_accounting.GaussianDpEvent(sigma))
  assert ledger.epsilon(delta) == pytest.approx(accountant.get_epsilon(delta), rel=1e-3)
  with pytest.raises(ValueError, match="histogram noise_multiplier must be >= 0.3"):
    histogram.segment(0.1, n)
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
    histogram.release(np.array([0, 2]), 2, 1.0, RunSecret.fresh())


def test_calibration_leaves_room_for_the_release():
  spec = privacy.MechanismSpec(target_epsilon=2.0)
  kwargs = {"dataset_size": 10_000, "expected_batch_size": 100.0, "steps": 200}
  alone = privacy.make_mechanism(spec, **kwargs)
  release = histogram.segment(2.0, 10_000)
  both = privacy.make_mechanism(spec, **kwargs, releases=(release,))
  assert both.noise_multiplier > alone.noise_multiplier
  assert 0.98 * 2.0 <= both.planned_epsilon() <= 2.0
  # The same σ without the release would have spent less than the target.
  assert alone.planned_epsilon() > both.epsilon(both.record(both.empty_ledger(), 200))


def test_proportions_clip_negative_counts():
  np.testing.assert_allclose(histogram.proportions([3.0, -1.0, 1.0]), [0.75, 0.0, 0.25])
  np.testing.assert_allclose(histogram.proportions([-2.0, -1.0]), [0.5, 0.5])
