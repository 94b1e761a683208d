"""Preference-alignment losses and sequence log-probabilities."""
