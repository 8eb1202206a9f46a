"""What the explorer remembers across runs — today the export folder — and where an export may go.

The settings are a small JSON object in `settings.json` in the user config folder (`$DIFFRACT_TUI_CONFIG_DIR`
when set, else platformdirs' `user_config_dir("diffract-tui")`), written atomically. A missing, unreadable or
malformed file reads as "nothing remembered": settings never stop the app. An export goes into the export
folder (the remembered one while it exists, else the current folder) and, like every writer, never into an
input checkpoint (`analysis.io.guard.refuse_input_overlap`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

CONFIG_ENV_VAR = "DIFFRACT_TUI_CONFIG_DIR"
SETTINGS_FILE = "settings.json"
EXPORT_FOLDER_KEY = "export_folder"
MAX_SETTINGS_BYTES = 64 * 1024     # a settings file is a few hundred bytes; anything larger is not ours
PROBE_NAME = "diffract-export"     # stands for "a file in the folder" when only the folder is checked


def config_dir() -> Path:
    """`$DIFFRACT_TUI_CONFIG_DIR` when set and non-empty, else the platform's user config folder."""
    env = os.environ.get(CONFIG_ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("diffract-tui"))


def settings_path() -> Path:
    """The settings file."""
    return config_dir() / SETTINGS_FILE


def load_settings() -> dict[str, Any]:
    """The saved settings; {} when the file is missing, not a regular file, too large or not a JSON object."""
    path = settings_path()
    try:
        if not path.is_file() or path.stat().st_size > MAX_SETTINGS_BYTES:  # a FIFO would block the read
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def save_settings(values: Mapping[str, Any]) -> Path:
    """Merge `values` into the saved settings and write the file atomically; OSError when it cannot be written."""
    from analysis.io.atomic import atomic_writer

    merged = {**load_settings(), **values}
    path = settings_path()
    with atomic_writer(path, "w") as handle:
        json.dump(merged, handle, indent=1, sort_keys=True)
        handle.write("\n")
    return path


def remembered_export_folder() -> Path | None:
    """The export folder chosen in an earlier run, when it is an absolute path that is still a folder."""
    value = load_settings().get(EXPORT_FOLDER_KEY)
    if not isinstance(value, str) or not value:
        return None
    folder = Path(value)
    return folder if folder.is_absolute() and folder.is_dir() else None


def export_folder() -> Path:
    """Where exports go: the remembered folder while it exists, else the current working folder."""
    return remembered_export_folder() or Path.cwd()


def remember_export_folder(folder: str | Path) -> Path:
    """Save `folder` (made absolute) as the export folder of later runs; returns the settings file."""
    return save_settings({EXPORT_FOLDER_KEY: str(Path(folder).expanduser().resolve())})


def export_path(folder: str | Path, name: str | Path, inputs: Iterable[str | Path]) -> Path:
    """`folder / name` resolved; DiffractError when it is, holds, or lies inside an input checkpoint.

    An absolute `name` stands on its own (the folder is then ignored), as a path typed by the user would.
    """
    from analysis.io.guard import refuse_input_overlap

    path = Path(folder).expanduser() / Path(name).expanduser()
    return refuse_input_overlap(path, inputs, option="the export folder")


def export_folder_problem(folder: str | Path, inputs: Iterable[str | Path], name: str | Path = PROBE_NAME
                          ) -> str | None:
    """Why a file `name` cannot be written into `folder` (one line), or None when it can: the folder must
    exist (a typo should not create folders) and lie outside every input."""
    from analysis.errors import DiffractError

    try:
        path = export_path(folder, name, inputs)
    except DiffractError as err:
        return str(err).splitlines()[0]
    if not path.parent.is_dir():
        return f"there is no folder {path.parent} — create it or choose an existing one"
    return None
