"""diffract-tui: a terminal explorer of weight spectra across LLM checkpoints."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("diffract-tui")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.1.0"
