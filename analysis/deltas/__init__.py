"""Deltas between checkpoints: per-matrix and per-head statistics, agreement, SVD truncation, delta tables."""
