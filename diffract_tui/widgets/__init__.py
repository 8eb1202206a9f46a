"""Reusable widgets of the explorer: the model tree, metric panel, status line and chart helpers."""
