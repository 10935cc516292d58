"""ROC, AUROC, TPR at FPR and the ε lower bounds of dpjax.audit.statistics."""

import dp_accounting
import numpy as np
import pytest
from scipy import stats

from dpjax.audit import statistics


def deterministic_normal(mean: float, n: int) -> np.ndarray:
  """n scores at the mid-quantiles of N(mean, 1): a noise-free Gaussian sample."""
  return stats.norm.ppf((np.arange(n) + 0.5) / n) + mean


@pytest.mark.parametrize(
  "shift, one_run, one_run_fdp",
  [(1, 1.13346, 2.164749), (2, 2.311945, 4.7218075), (4, 4.395568, 9.133752)],
)
def test_one_run_bounds_reproduce_the_published_values(shift, one_run, one_run_fdp):
  # 10,000 IN scores ~ N(shift, 1) and 10,000 OUT scores ~ N(0, 1), significance 0.05,
  # δ = 1e-6, thresholds on the ROC hull: jax_privacy's reference values for the two bounds.
  audit = statistics.ScoreAudit(
    deterministic_normal(shift, 10_000), deterministic_normal(0, 10_000)
  )
  np.testing.assert_allclose(audit.epsilon_one_run(0.05, 1e-6, "hull"), one_run, rtol=1e-5)
  np.testing.assert_allclose(audit.epsilon_one_run_fdp(0.05, 1e-6, "hull"), one_run_fdp, rtol=1e-5)
  # The coin-blind family (the default) is valid, and here stronger: its 48 thresholds cost
  # less Bonferroni than the hull's ~400, which matters where the 2mδ term dominates.
  assert one_run <= audit.epsilon_one_run(0.05, 1e-6) < statistics.gaussian_epsilon(shift, 1e-6)


def test_one_run_p_value_equals_the_theorem_written_as_a_loop():
  for m, guesses, correct, eps, delta in [(100, 10, 9, 0.5, 1e-3), (1000, 100, 80, 1.0, 1e-6)]:
    q = np.exp(eps) / (1 + np.exp(eps))
    tail = stats.binom.sf(correct - 1, guesses, q)
    best, running = 0.0, 0.0
    for i in range(1, correct + 1):
      running += stats.binom.pmf(correct - i, guesses, q)
      best = max(best, running / i)
    expected = min(tail + 2 * m * delta * best, 1)
    got = statistics.one_run_p_value(m, guesses, correct, eps, delta)
    np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_clopper_pearson_upper_has_its_coverage():
  rng = np.random.default_rng(0)
  for n, k in [(100, 30), (1000, 5)]:
    p = statistics.clopper_pearson_upper(k, n, 0.05)
    np.testing.assert_allclose(np.mean(rng.binomial(n, p, 200_000) <= k), 0.05, rtol=0.05)
  assert statistics.clopper_pearson_upper(10, 10, 0.05) == 1.0


@pytest.mark.parametrize("thresholds", statistics.THRESHOLD_STRATEGIES)
@pytest.mark.parametrize("mu", [0.5, 1.0])
def test_clopper_pearson_bound_is_below_and_near_the_true_epsilon(mu, thresholds):
  delta = 0.05
  audit = statistics.ScoreAudit(deterministic_normal(mu, 400_000), deterministic_normal(0, 400_000))
  eps, _ = audit.epsilon_clopper_pearson(0.1, delta, thresholds)
  true = dp_accounting.get_epsilon_gaussian(1 / mu, delta)
  assert 0.8 * true < eps < true


def test_clopper_pearson_at_a_fixed_threshold_is_the_formula():
  in_scores, out_scores = deterministic_normal(1, 1000), deterministic_normal(0, 1000)
  audit = statistics.ScoreAudit(in_scores, out_scores)
  eps, threshold = audit.epsilon_clopper_pearson(0.1, 0.0, "hull")
  tp, fp = np.sum(in_scores >= threshold), np.sum(out_scores >= threshold)
  alpha = 0.1 / len(audit.thresholds) / 2
  tpr_lb = 1 - statistics.clopper_pearson_upper(1000 - tp, 1000, alpha)
  fpr_ub = statistics.clopper_pearson_upper(fp, 1000, alpha)
  np.testing.assert_allclose(eps, np.log(tpr_lb / fpr_ub))


def test_the_default_families_reject_a_true_null_at_most_at_the_nominal_rate():
  # Scores that carry no information about the coins: every ε >= 0 claim is true, so any
  # positive lower bound is a false rejection; it must happen at most α of the time.
  rng = np.random.default_rng(0)
  reps, alpha = 400, 0.05
  false_one_run = false_cp = 0
  for _ in range(reps):
    scores, coins = rng.normal(size=1000), rng.random(1000) < 0.5
    audit = statistics.ScoreAudit(scores[coins], scores[~coins])
    false_one_run += audit.epsilon_one_run(alpha, 0.0) > 0
    false_cp += audit.epsilon_clopper_pearson(alpha, 0.0)[0] > 0
  # Binomial(400, 0.05) exceeds 31 with probability < 1%.
  assert false_one_run <= 31 and false_cp <= 31, (false_one_run, false_cp)


def test_gdp_fit_recovers_mu():
  for mu in (0.5, 2.0):
    audit = statistics.ScoreAudit(
      deterministic_normal(mu, 200_000), deterministic_normal(0, 200_000)
    )
    assert 0.85 * mu < audit.gdp_mu(0.05) < mu
    np.testing.assert_allclose(
      statistics.gaussian_epsilon(mu, 1e-5), dp_accounting.get_epsilon_gaussian(1 / mu, 1e-5)
    )


def test_auroc_and_tpr_at_fpr_of_gaussian_scores():
  mu = 1.0
  audit = statistics.ScoreAudit(deterministic_normal(mu, 20_000), deterministic_normal(0, 20_000))
  np.testing.assert_allclose(audit.auroc(), stats.norm.cdf(mu / np.sqrt(2)), atol=2e-3)
  for fpr in (0.001, 0.01, 0.1):
    expected = stats.norm.sf(stats.norm.isf(fpr) - mu)
    np.testing.assert_allclose(audit.tpr_at_fpr(fpr), expected, atol=5e-3)


def test_roc_of_small_samples_is_the_concave_hull():
  audit = statistics.ScoreAudit([0, 4, 6, 7], [1, 2, 3, 5])
  # Threshold points (FP, TP): (0,0) (0,2) (1,2) (1,3) (2,3) (3,3) (3,4) (4,4); the hull
  # keeps (0,0) (0,2) (1,3) (4,4): area (0 + 2.5 + 10.5) / 16.
  fpr, tpr = audit.roc()
  np.testing.assert_allclose(fpr * 4, [0, 0, 1, 4])
  np.testing.assert_allclose(tpr * 4, [0, 2, 3, 4])
  assert audit.auroc() == pytest.approx(13 / 16)
  assert audit.tpr_at_fpr(0.0) == 0.5
  assert audit.tpr_at_fpr(0.5) == pytest.approx((3 + (2 - 1) / 3) / 4)
  separable = statistics.ScoreAudit([1.0] * 5, [0.0] * 5)
  assert separable.auroc() == 1.0 and separable.tpr_at_fpr(0.0) == 1.0
  reversed_scores = statistics.ScoreAudit([0.0] * 5, [1.0] * 5)
  assert reversed_scores.auroc() == 0.5  # the hull: no threshold does better than chance


def test_bootstrap_interval_covers_the_estimate_and_the_truth():
  rng = np.random.default_rng(0)
  audit = statistics.ScoreAudit(rng.normal(1, 1, 2000), rng.normal(0, 1, 2000))
  interval = audit.bootstrap(lambda a: a.auroc(), samples=200, seed=1)
  assert interval.low < audit.auroc() < interval.high
  assert interval.low < stats.norm.cdf(1 / np.sqrt(2)) < interval.high
  assert interval.high - interval.low < 0.05


def test_auroc_bca_interval_covers_the_true_auroc():
  # Gaussian scores shifted by d have AUROC Φ(d/√2); near 1 a percentile or DeLong
  # interval under-covers (0.88 / 0.85 at d = 3, n = 50 in 1000 replications).
  rng = np.random.default_rng(2024)
  shifts = (0.0, 1.0, 2.5)
  covered, widths = 0, []
  for replication in range(200):
    shift = shifts[replication % 3]
    members, non_members = rng.normal(shift, 1, 150), rng.normal(0, 1, 150)
    interval = statistics.auroc_interval(members, non_members, samples=1000, seed=replication)
    covered += interval.low <= stats.norm.cdf(shift / np.sqrt(2)) <= interval.high
    widths.append(interval.high - interval.low)
    assert interval.low <= statistics.mann_whitney_auroc(members, non_members) <= interval.high
  assert covered >= 0.92 * 200, covered
  assert np.mean(widths) < 0.12  # not covering by being vacuous
  assert interval.method == "BCa bootstrap, 1000 resamples" and interval.note is None


def test_the_auroc_lies_inside_its_interval_with_ties_and_constant_scores():
  rng = np.random.default_rng(7)
  for draw in range(150):
    n_in, n_out = rng.integers(2, 60, size=2)
    # Scores rounded to few values: many ties within and across the samples.
    members = np.round(rng.normal(rng.uniform(-1, 3), 1, n_in), int(rng.integers(0, 2)))
    non_members = np.round(rng.normal(0, 1, n_out), int(rng.integers(0, 2)))
    interval = statistics.auroc_interval(members, non_members, samples=int(rng.integers(20, 300)))
    estimate = statistics.mann_whitney_auroc(members, non_members)
    assert 0 <= interval.low <= estimate <= interval.high <= 1, (draw, interval, estimate)
  for members, non_members, value in (([1.0] * 5, [1.0] * 7, 0.5), ([2.0] * 3, [0.0, 1.0], 1.0)):
    interval = statistics.auroc_interval(members, non_members, samples=50)
    assert statistics.mann_whitney_auroc(members, non_members) == value
    assert (interval.low, interval.high) == (value, value) and "no variation" in interval.note


def test_mann_whitney_auroc_and_its_jackknife_from_placement_values():
  members, non_members = np.array([0.0, 1, 1, 2, 3]), np.array([1.0, 0, 0.5, 1])
  pairs = np.sign(members[:, None] - non_members[None, :])
  assert statistics.mann_whitney_auroc(members, non_members) == np.mean((pairs + 1) / 2)
  auroc = statistics.mann_whitney_auroc(members, non_members)
  v_in, v_out = statistics.placement_values(members, non_members)
  # Leave-one-out AUROCs recomputed: their jackknife influence values are V - A exactly.
  for sample, placements, other in ((members, v_in, 0), (non_members, v_out, 1)):
    left_out = np.array(
      [
        statistics.mann_whitney_auroc(
          *((np.delete(sample, i), non_members) if other == 0 else (members, np.delete(sample, i)))
        )
        for i in range(sample.size)
      ]
    )
    influence = (sample.size - 1) * (left_out.mean() - left_out)
    np.testing.assert_allclose(influence, placements - auroc, atol=1e-12)


def test_bca_interval_agrees_with_scipy():
  rng = np.random.default_rng(3)
  members, non_members = rng.normal(0.8, 1, 40), rng.normal(0, 1, 30)
  ours = statistics.auroc_interval(members, non_members, samples=20_000, seed=1)
  theirs = stats.bootstrap(
    (members, non_members),
    statistics.mann_whitney_auroc,
    n_resamples=20_000,
    vectorized=False,
    method="BCa",
    random_state=np.random.default_rng(2),
  ).confidence_interval
  np.testing.assert_allclose([ours.low, ours.high], [theirs.low, theirs.high], atol=0.006)
  # Without skew or bias (a = z0 = 0) BCa is the percentile interval.
  replicates = np.linspace(-1, 1, 1001)
  low, high = statistics.bca_interval(0.0, replicates, [np.array([1.0, -1.0])], 0.9)
  np.testing.assert_allclose([low, high], np.quantile(replicates, [0.05, 0.95]))


def test_tpr_at_fpr_interval_covers_the_true_tpr_and_flags_too_few_non_members():
  rng = np.random.default_rng(11)
  shift, fpr = 1.0, 0.1
  true_tpr = stats.norm.sf(stats.norm.isf(fpr) - shift)
  covered = 0
  for _ in range(200):
    members, non_members = rng.normal(shift, 1, 150), rng.normal(0, 1, 150)
    estimate, interval = statistics.tpr_at_fpr_interval(members, non_members, fpr)
    assert interval.low <= estimate <= interval.high and interval.note is None
    covered += interval.low <= true_tpr <= interval.high
  assert covered >= 0.95 * 200, covered  # conservative by construction
  # The estimate: the fraction of members above the (k+1)-th highest non-member, k = ⌊fpr·n⌋.
  # Non-members -0.5 .. 8.5, FPR 0.2: k = 2, threshold 6.5 (the third highest); 7, 8, 9 above.
  estimate, _ = statistics.tpr_at_fpr_interval([5, 6, 7, 8, 9], np.arange(10) - 0.5, 0.2)
  assert estimate == 3 / 5
  # 150 non-members are too few for FPR 0.1% (and to bound 1% from below): said, lower end 0.
  estimate, interval = statistics.tpr_at_fpr_interval(members, non_members, 0.001)
  assert interval.low == 0 and "fewer than 1/FPR = 1000" in interval.note
  assert np.mean(members > non_members.max()) == estimate <= interval.high < 1
  _, interval = statistics.tpr_at_fpr_interval(members, non_members, 0.01)
  assert interval.low == 0 and "needs >= 437" in interval.note
  many = rng.normal(0, 1, 5000)
  _, interval = statistics.tpr_at_fpr_interval(rng.normal(shift, 1, 5000), many, 0.01)
  assert interval.note is None and interval.low < stats.norm.sf(stats.norm.isf(0.01) - shift)
  assert 0 < interval.low


def test_bad_inputs_name_the_argument():
  with pytest.raises(ValueError, match="in_scores must not be empty"):
    statistics.ScoreAudit([], [1.0])
  with pytest.raises(ValueError, match="out_scores must be finite"):
    statistics.ScoreAudit([1.0], [np.nan])
  audit = statistics.ScoreAudit([1.0, 2.0], [0.0, 1.0])
  with pytest.raises(ValueError, match="significance must be in"):
    audit.epsilon_clopper_pearson(0.7)
  with pytest.raises(ValueError, match="thresholds must be one of"):
    audit.epsilon_clopper_pearson(0.05, 0.0, "best")
  with pytest.raises(ValueError, match="fpr must be in"):
    audit.tpr_at_fpr(1.5)
