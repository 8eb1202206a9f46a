"""diffract-tui's analysis engine: checkpoints, head layouts, spectra, deltas, rewind.

Never imports textual: the CLI, the app and scripts all sit on top of this package.
"""

ENGINE_VERSION = "0.2.0"   # 0.2: TPL fitted by Newton (sharper optimum than Nelder–Mead)
