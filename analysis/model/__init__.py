"""Architectures: which tensor is which projection, and where each attention head's slice lies."""
