"""Modal screens of the explorer: help, quit confirmation, export dialog."""
