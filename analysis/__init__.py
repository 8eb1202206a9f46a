"""diffract-tui's analysis engine: checkpoints, head layouts, spectra, deltas, rewind.

Never imports textual: the CLI, the app and scripts all sit on top of this package.
"""

# 0.4: gram32 solves its float32 Gram in float64, λ_min empty below its resolution;
# 0.3: power-law fit in numpy (α, xmin, KS move at round-off); 0.2: TPL by Newton
ENGINE_VERSION = "0.4.0"

# What the app's views and widgets may import from the engine (tests/test_import_contract.py enforces it):
# the session — the one door, which also re-exports the result types the views draw — the result types'
# own module, the progress-and-cancel protocol and the errors. Everything else is reached through the session.
PUBLIC_SURFACE: tuple[str, ...] = (
    "analysis.run.session",
    "analysis.run.grids",
    "analysis.progress",
    "analysis.errors",
)
