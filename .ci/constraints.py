"""The pip constraints file (constraints.txt): write it from a fresh venv's `pip freeze`, or check that it
was made from the dependency lists pyproject.toml has now.

Its first line records a sha256 of what `make install` installs: pyproject's [project] dependencies, the
optional-dependencies of the extras the Makefile installs, and the pins the Makefile adds (torch, rxnfp).
When any of them changes, `check` fails with one line saying to run `make constraints`.

    pip freeze --exclude-editable | python .ci/constraints.py write --extras dev --also torch==2.13.0 ...
    python .ci/constraints.py check --extras dev --also torch==2.13.0 ...

Standard library only (Python >= 3.11 for tomllib, else the tomli package): it runs before any install.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from pathlib import Path

HASH_KEY = "pyproject-deps-sha256"
HEADER = re.compile(rf"^# {HASH_KEY}: ([0-9a-f]{{64}})\s*$")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^+\s;]+)(\+[^\s;]+)?\s*$")


def _load_toml(path: Path) -> dict:
    """pyproject.toml as a dict (tomllib, or tomli on Python 3.10)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            sys.exit("constraints: reading pyproject.toml needs Python >= 3.11 or the tomli package")
    with path.open("rb") as fh:
        return tomllib.load(fh)


def deps_hash(pyproject: Path, extras: list[str], also: list[str]) -> str:
    """sha256 of the requirement lists `make install` installs from (order and comments do not count)."""
    project = _load_toml(pyproject).get("project", {})
    optional = project.get("optional-dependencies", {})
    missing = [e for e in extras if e not in optional]
    if missing:
        sys.exit(f"constraints: no extra {', '.join(missing)} in {pyproject} — fix EXTRAS in the Makefile")
    material = {
        "dependencies": sorted(project.get("dependencies", [])),
        "extras": {e: sorted(optional[e]) for e in sorted(extras)},
        "also": sorted(also),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def recorded_hash(constraints: Path) -> str | None:
    """The hash on the first line of the constraints file, or None when the file or the line is missing."""
    try:
        first = constraints.read_text(encoding="utf-8").splitlines()[:1]
    except FileNotFoundError:
        return None
    match = HEADER.match(first[0]) if first else None
    return match.group(1) if match else None


def pins_from_freeze(freeze: str, exclude: set[str]) -> list[str]:
    """`name==version` lines from `pip freeze`, without the excluded projects and without local versions
    (`torch==2.13.0+cpu` -> `torch==2.13.0`, which the local CPU wheel and a CUDA build both satisfy)."""
    pins: list[str] = []
    for line in freeze.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        if match is None:
            sys.exit(f"constraints: cannot pin {line!r} from pip freeze (an editable or URL install?)")
        name, version = match.group(1), match.group(2)
        if _canonical(name) not in exclude:
            pins.append(f"{name}=={version}")
    return sorted(pins, key=lambda p: _canonical(p.split("==")[0]))


def _canonical(name: str) -> str:
    """A project name as pip compares it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def write(constraints: Path, digest: str, extras: list[str], also: list[str], freeze: str) -> None:
    """Write the constraints file (header + pins) atomically."""
    pins = pins_from_freeze(freeze, exclude={"diffract-tui"})
    header = [
        f"# {HASH_KEY}: {digest}",
        "# Made by `make constraints` (a throwaway venv's pip freeze) from pyproject's dependencies, the extras "
        f"[{','.join(extras)}] and {' '.join(also)}. Do not edit by hand.",
    ]
    tmp = constraints.with_name(f".{constraints.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(header + pins) + "\n", encoding="utf-8")
    os.replace(tmp, constraints)
    print(f"constraints: wrote {len(pins)} pins to {constraints}")


def main(argv: list[str] | None = None) -> int:
    """`write` (pip freeze on stdin) or `check`; exit 1 with one line when the file is stale."""
    parser = argparse.ArgumentParser(prog=".ci/constraints.py")
    parser.add_argument("action", choices=["write", "check"])
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("--constraints", type=Path, default=Path("constraints.txt"))
    parser.add_argument("--extras", default="", help="Comma-separated extras that `make install` installs.")
    parser.add_argument("--also", nargs="*", default=[], help="Pins the Makefile installs besides pyproject's.")
    args = parser.parse_args(argv)
    extras = [e.strip() for e in args.extras.split(",") if e.strip()]
    digest = deps_hash(args.pyproject, extras, args.also)
    if args.action == "write":
        write(args.constraints, digest, extras, args.also, sys.stdin.read())
        return 0
    if recorded_hash(args.constraints) != digest:
        print(f"error: {args.constraints} is stale: {args.pyproject}'s dependencies (or the Makefile's EXTRAS, "
              "TORCH or RXNFP) changed since it was made — run `make constraints` and commit it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
