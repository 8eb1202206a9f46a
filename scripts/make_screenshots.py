"""Regenerate `screenshots/*.svg`: one screenshot per view of the real explorer on the demo checkpoints
(the rxnfp BERT trio: pretrained base and two fine-tunes), driven by keys through Textual's pilot.

    python scripts/make_screenshots.py [--size 120x36] [--out screenshots] [--cache-dir DIR] [--synthetic]

`--synthetic` uses a generated base + two domains (`analysis.generate.write_family`) instead of rxnfp.
Spectra go to the usual cache (`--cache-dir`, else $DIFFRACT_TUI_CACHE_DIR, else the user cache folder), so a
rerun is quick; the first run scans the whole trio for the Table view (minutes on a small CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class Shot:
    """One screenshot: the file name, the tree node to show, and the keys pressed before it is taken."""

    name: str
    node: tuple[int | None, str | None, int | None]
    keys: tuple[str, ...]


SHOTS: tuple[Shot, ...] = (
    Shot("spectrum", (11, "fc_in", None), ("1",)),
    Shot("delta", (11, "q", None), ("2",)),
    Shot("grid", (5, "q", 2), ("3", "tab", "space", "j", "j", "l", "space")),
    Shot("rewind", (0, None, None), ("4", "plus", "plus")),
    Shot("table", (0, None, None), ("5", "tab", "right", "right", "S")),
)


def demo_paths(synthetic: bool, work: Path) -> tuple[list[Path], list[str]]:
    """The checkpoints and labels to open: the rxnfp trio, or a generated family in `work`."""
    if synthetic:
        from analysis.generate import write_family

        family = write_family(work / "family")
        return [family.base, *family.domains.values()], ["base", *family.domains]
    from analysis.realmodels import RXNFP_MODELS, rxnfp_checkpoints
    from diffract_tui.cli.demo import RXNFP_LABELS

    found = rxnfp_checkpoints()
    return [found[name] for name in RXNFP_MODELS], [RXNFP_LABELS[name] for name in RXNFP_MODELS]


async def settle(pilot, rounds: int = 3) -> None:
    """Let timers fire and every worker finish, then let the UI draw."""
    app = pilot.app
    for _ in range(rounds):
        await pilot.pause(0.2)
        await app.workers.wait_for_complete()
    await pilot.pause()


async def take(shot: Shot, paths: list[Path], labels: list[str], cache: Path | None, size: tuple[int, int],
               out: Path) -> Path:
    """Open a fresh app, walk to the shot's node, press its keys and save the SVG."""
    from analysis.run.session import ExplorerSession
    from diffract_tui.node import NodeRef
    from diffract_tui.ui import DiffractApp

    session = ExplorerSession.open(paths, labels=labels, device="cpu", cache_dir=cache)
    try:
        app = DiffractApp(session)
        async with app.run_test(size=size) as pilot:
            await settle(pilot, 1)
            app.go_to_node(NodeRef(*shot.node))
            await settle(pilot, 1)
            for key in shot.keys:
                await pilot.press(key)
                await settle(pilot, 2)
            await settle(pilot)
            return Path(app.save_screenshot(filename=f"{shot.name}.svg", path=str(out)))
    finally:
        session.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="120x36", help="terminal COLUMNSxLINES (default 120x36)")
    parser.add_argument("--out", type=Path, default=REPO / "screenshots", help="output folder")
    parser.add_argument("--cache-dir", type=Path, default=None, help="spectra cache (default: the user cache)")
    parser.add_argument("--synthetic", action="store_true", help="a generated family instead of rxnfp")
    parser.add_argument("--only", nargs="*", default=None, help="views to shoot (default: all)")
    args = parser.parse_args(argv)
    cols, lines = (int(x) for x in args.size.lower().split("x"))

    import torch

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="diffract-shots-") as tmp:
        work = Path(tmp)
        cache = args.cache_dir  # None: the session's default cache folder
        paths, labels = demo_paths(args.synthetic, work)
        for shot in SHOTS:
            if args.only and shot.name not in args.only:
                continue
            start = time.perf_counter()
            path = asyncio.run(take(shot, paths, labels, cache, (cols, lines), args.out))
            print(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}  "
                  f"({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
