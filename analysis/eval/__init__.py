"""Held-out loss in the loop (SPEC §9): texts, token windows, the model's loss, in-memory rewinds and
interpolations, the Taylor head score, sweeps and loss paths. Needs the `eval` extra (transformers)."""
