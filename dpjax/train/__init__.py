"""Training: the config, the pure train step, checkpoints with the privacy ledger, the loop."""
