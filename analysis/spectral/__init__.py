"""Spectra of one matrix: the compute backend, eigenvalues, power-law fits, random-matrix edges."""
