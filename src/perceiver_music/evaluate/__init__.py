"""Evaluation: likelihood of a checkpoint on a split (likelihood.py, needs torch) and the
PerceiverS metric suite on sets of MIDI files (metrics.py, repetition.py, sets.py; numpy only)."""
