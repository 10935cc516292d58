"""The one-run white-box audit of a whole run: the shipped run passes, a run that samples at
8x its claimed rate is caught (Poisson sampling and composition are in the claim audited)."""

from dpjax.audit import whitebox_run
from dpjax.privacy import clipping, mechanism
from dpjax.privacy.secret import RunSecret

# α per bound; the shipped run is wrongly flagged with probability <= 2α = 1e-3.
ALPHA = 5e-4


def _plan(batch: float) -> mechanism.Mechanism:
  spec = mechanism.MechanismSpec(
    target_epsilon=2.0, delta=1e-5, clip=clipping.FlatClip(1.0), backend="vmap"
  )
  return mechanism.make_mechanism(
    spec, dataset_size=2000, expected_batch_size=batch, steps=100
  ).keyed(RunSecret.fresh())


def test_the_shipped_run_passes_and_a_run_sampling_more_than_claimed_is_caught():
  shipped = _plan(200.0)
  audit = whitebox_run.audit_run(shipped, canaries=1000, significance=ALPHA)
  assert audit.canaries == 1000 and 0 < audit.canaries_in < 1000 and audit.steps == 100
  assert 1.9 < audit.claimed_epsilon <= 2.0
  assert not audit.violated, audit
  assert audit.auroc > 0.55  # the canaries' coins reach the parameters
  # The same claim (q = 0.1, 100 steps, its σ), but batches drawn at q = 0.8.
  oversampled = _plan(1600.0).sampler()
  caught = whitebox_run.audit_run(shipped, canaries=1000, significance=ALPHA, sampler=oversampled)
  assert caught.claimed_epsilon == audit.claimed_epsilon
  assert caught.violated and caught.epsilon_lb_fdp > 1.5 * caught.claimed_epsilon, caught
