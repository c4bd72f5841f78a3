"""Loading models and computing per-sequence log-probabilities."""
