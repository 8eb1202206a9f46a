"""Changing checkpoints: head-wise rewind plans and lists, interpolation between checkpoints."""
