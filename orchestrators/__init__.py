"""Deterministic orchestrator generators: no I/O, no settings, no clock, no randomness."""
