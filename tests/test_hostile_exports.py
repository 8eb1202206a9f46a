"""The explorer's exports under hostile conditions: started from inside an input checkpoint, a chosen folder
inside another input or missing, a corrupt / FIFO / nested settings file, no ~/Downloads. Every export (`x`
table, `e` rewind list, the Rewind view's `e`, the palette's Screenshot) goes to the export folder, never into
an input (sha256 of every input file before and after), and the folder the user chose is remembered by the
next run."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
import torch

from analysis.run.session import ExplorerSession
from diffract_tui import settings as app_settings
from tests.conftest import llama_checkpoint, write_safetensors


def write_folder(folder: Path, config: dict, tensors: dict) -> Path:
    write_safetensors(folder / "model.safetensors", tensors)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def family(tmp_path: Path) -> list[Path]:
    """A tiny Llama base (2 layers, 4 heads, 2 kv groups) and one CPT checkpoint 'chem'."""
    config, base = llama_checkpoint(layers=2, hidden=64, heads=4, kv_heads=2, seed=0)
    g = torch.Generator().manual_seed(1)
    cpt = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.dim() == 2 else v.clone() for k, v in base.items()}
    return [write_folder(tmp_path / "base", config, base), write_folder(tmp_path / "chem", config, cpt)]


@pytest.fixture
def session(family: list[Path], tmp_path: Path) -> ExplorerSession:
    s = ExplorerSession.open(family, device="cpu", cache_dir=tmp_path / "cache")
    yield s
    s.close()


@pytest.fixture
def exports(tmp_path: Path) -> Path:
    folder = tmp_path / "exports"
    folder.mkdir()
    return folder


def snapshot(folders: list[Path]) -> dict[str, str]:
    """Every file under the input folders (relative path → sha256): a new file or a changed byte shows."""
    out = {}
    for folder in folders:
        for root, _dirs, files in os.walk(folder):
            for name in files:
                p = Path(root, name)
                out[str(p.relative_to(folder.parent))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


async def settle(pilot, app) -> None:
    """Until every worker has finished (at most 20 s)."""
    for _ in range(200):
        await pilot.pause(0.1)
        await app.workers.wait_for_complete()
        if not app.busy:
            break
    await pilot.pause()


async def to_layer1_q_head0(pilot, app) -> None:
    for key in ("right_square_bracket", "right_square_bracket", "l", "l", "l", "l"):
        await pilot.press(key)
    await settle(pilot, app)


async def palette(pilot, text: str) -> None:
    """ctrl+p, type `text`, enter."""
    await pilot.press("ctrl+p")
    await pilot.pause(0.2)
    for ch in text:
        await pilot.press("space" if ch == " " else ch)
    await pilot.pause(0.4)
    await pilot.press("enter")
    await pilot.pause(0.4)


def notices(app) -> list[str]:
    return [n.message for n in app._notifications]


def problem_text(app) -> str:
    return str(app.screen.query_one("#problem").render())


def make_app(session: ExplorerSession):
    from diffract_tui.ui import DiffractApp

    return DiffractApp(session)


# ------------------------------------------------------------------------------------------------
# settings file
# ------------------------------------------------------------------------------------------------


def test_settings_round_trip_and_fall_back(tmp_path: Path, exports: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert app_settings.export_folder() == tmp_path  # nothing remembered: the current folder
    written = app_settings.remember_export_folder(exports)
    assert written == app_settings.settings_path()
    assert json.loads(written.read_text(encoding="utf-8")) == {"export_folder": str(exports.resolve())}
    assert app_settings.export_folder() == exports.resolve()
    assert [p.name for p in written.parent.iterdir()] == ["settings.json"]  # atomic: no temp file left
    exports.rmdir()  # a remembered folder that is gone falls back to the current folder
    assert app_settings.export_folder() == tmp_path


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "[" * 100_000 + "]" * 100_000, '{"export_folder": 5}',
                                     '{"export_folder": "relative/dir"}', "x" * (app_settings.MAX_SETTINGS_BYTES + 1)])
def test_bad_settings_files_read_as_nothing_remembered(content: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = app_settings.settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8")
    assert app_settings.remembered_export_folder() is None
    assert app_settings.export_folder() == tmp_path


def test_a_fifo_settings_file_does_not_hang(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = app_settings.settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    result: list[Path] = []
    t = threading.Thread(target=lambda: result.append(app_settings.export_folder()), daemon=True)
    t.start()
    t.join(5)
    assert result == [tmp_path]


def test_export_path_refuses_inputs(family: list[Path], tmp_path: Path) -> None:
    from analysis.errors import DiffractError

    with pytest.raises(DiffractError, match="inside the input folder"):
        app_settings.export_path(family[0] / "sub", "x.csv", family)
    with pytest.raises(DiffractError, match="inside the input folder"):
        app_settings.export_path(tmp_path, family[1] / "model.safetensors", family)  # an absolute name
    weights = family[1] / "model.safetensors"  # a single-file input: its folder is fine, the file is not
    with pytest.raises(DiffractError, match="is the input file"):
        app_settings.export_path(family[1], "model.safetensors", [weights])
    assert app_settings.export_path(family[1], "x.csv", [weights]) == (family[1] / "x.csv").resolve()
    assert app_settings.export_path(tmp_path, "x.csv", family) == (tmp_path / "x.csv").resolve()
    assert "there is no folder" in app_settings.export_folder_problem(tmp_path / "nope", family, "x.csv")
    assert app_settings.export_folder_problem(tmp_path, family, "x.csv") is None


# ------------------------------------------------------------------------------------------------
# the app
# ------------------------------------------------------------------------------------------------


def test_table_export_from_inside_an_input_asks_for_another_folder(session: ExplorerSession, family: list[Path],
                                                                   tmp_path: Path, exports: Path,
                                                                   monkeypatch) -> None:
    """cwd = the base checkpoint's folder: `x` writes nothing there; it asks, refuses the other input and a
    missing folder, then writes where the user said, says the full path, and remembers the folder."""
    from diffract_tui.screens.export import FolderScreen
    from textual.widgets import Input

    monkeypatch.chdir(family[0])
    before = snapshot(family)
    seen: dict[str, object] = {}

    async def run() -> None:
        app = make_app(session)
        async with app.run_test(size=(100, 30)) as pilot:
            await to_layer1_q_head0(pilot, app)
            await pilot.press("x")
            await pilot.pause()
            assert isinstance(app.screen, FolderScreen)
            assert "inside the input folder" in problem_text(app)
            assert snapshot(family) == before
            field = app.screen.query_one("#folder", Input)
            for refused, why in ((family[1], "inside the input folder"), (tmp_path / "missing", "no folder")):
                field.value = str(refused)
                await pilot.press("enter")
                await pilot.pause()
                assert isinstance(app.screen, FolderScreen), refused
                assert why in problem_text(app)
            field.value = str(exports)
            await pilot.press("enter")
            await pilot.pause()
            assert not isinstance(app.screen, FolderScreen)
            seen["notices"] = notices(app)

    asyncio.run(run())
    (csv_file,) = exports.glob("diffract-spectrum-L1-q-h0-*.csv")
    assert (exports / f"{csv_file.name}.meta.json").is_file()
    assert any(str(csv_file.resolve()) in n for n in seen["notices"]), seen["notices"]
    assert snapshot(family) == before
    assert not (tmp_path / "missing").exists()
    assert app_settings.remembered_export_folder() == exports.resolve()


def test_the_chosen_folder_is_remembered_by_a_new_app(session: ExplorerSession, family: list[Path], tmp_path: Path,
                                                      exports: Path, monkeypatch) -> None:
    """Palette "Export folder…" in one run; the next app (a new session) writes `x` there, not in the cwd."""
    from diffract_tui.screens.export import FolderScreen
    from textual.widgets import Input

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)

    async def choose() -> None:
        app = make_app(session)
        async with app.run_test(size=(100, 30)) as pilot:
            await palette(pilot, "Export folder")
            assert isinstance(app.screen, FolderScreen)
            assert app.screen.query_one("#folder", Input).value == str(work)  # the default: the current folder
            app.screen.query_one("#folder", Input).value = str(exports)
            await pilot.press("enter")
            await pilot.pause()
            assert not isinstance(app.screen, FolderScreen)

    asyncio.run(choose())
    assert json.loads(app_settings.settings_path().read_text(encoding="utf-8"))["export_folder"] == str(exports)

    second = ExplorerSession.open(family, device="cpu", cache_dir=tmp_path / "cache")
    seen: dict[str, object] = {}

    async def export() -> None:
        app = make_app(second)
        async with app.run_test(size=(100, 30)) as pilot:
            await to_layer1_q_head0(pilot, app)
            await pilot.press("x")
            await pilot.pause()
            seen["notices"] = notices(app)

    try:
        asyncio.run(export())
    finally:
        second.close()
    (csv_file,) = exports.glob("diffract-spectrum-*.csv")
    assert list(work.iterdir()) == []
    assert any(str(csv_file) in n for n in seen["notices"]), seen["notices"]


def test_screenshot_lands_in_the_export_folder(session: ExplorerSession, family: list[Path], tmp_path: Path,
                                               exports: Path, monkeypatch) -> None:
    """The palette's Screenshot with no ~/Downloads: started inside an input it asks, then writes the SVG into
    the chosen folder; the next screenshot goes straight there."""
    from diffract_tui.screens.export import FolderScreen
    from textual.widgets import Input

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # no Downloads folder anywhere
    monkeypatch.chdir(family[1])
    before = snapshot(family)

    async def run() -> None:
        app = make_app(session)
        async with app.run_test(size=(100, 30)) as pilot:
            await settle(pilot, app)
            await palette(pilot, "Screenshot")
            await pilot.pause(0.3)
            assert isinstance(app.screen, FolderScreen)
            assert snapshot(family) == before
            app.screen.query_one("#folder", Input).value = str(exports)
            await pilot.press("enter")
            await pilot.pause()
            assert len(list(exports.glob("*.svg"))) == 1
            await pilot.pause(1.1)  # a new second: a new file name
            await palette(pilot, "Screenshot")
            await pilot.pause(0.3)
            assert not isinstance(app.screen, FolderScreen)

    asyncio.run(run())
    shots = sorted(exports.glob("diffract-tui-*.svg"))
    assert len(shots) == 2
    assert all(s.read_text(encoding="utf-8").lstrip().startswith("<svg") for s in shots)
    assert not (home / "Downloads").exists()
    assert snapshot(family) == before


def test_rewind_list_dialog_refuses_an_input_folder(session: ExplorerSession, family: list[Path], exports: Path,
                                                    monkeypatch) -> None:
    """`e` started inside the base folder: the dialog says so at once, enter does not write, another folder does."""
    from analysis.edit.rewind_list import read_rewind_list
    from diffract_tui.screens.export import ExportScreen
    from textual.widgets import Input

    monkeypatch.chdir(family[0])
    before = snapshot(family)

    async def run() -> None:
        app = make_app(session)
        async with app.run_test(size=(100, 30)) as pilot:
            await to_layer1_q_head0(pilot, app)
            await pilot.press("space")
            await pilot.press("e")
            await pilot.pause()
            assert isinstance(app.screen, ExportScreen)
            assert "inside the input folder" in problem_text(app)
            await pilot.press("enter")
            await pilot.pause()
            assert isinstance(app.screen, ExportScreen)
            assert snapshot(family) == before
            app.screen.query_one("#folder", Input).value = str(exports)
            await pilot.press("enter")
            await pilot.pause()
            assert not isinstance(app.screen, ExportScreen)
            assert any(str(exports / "rewind-chem.json") in n for n in notices(app))

    asyncio.run(run())
    assert [(h.layer, h.head) for h in read_rewind_list(exports / "rewind-chem.json").heads] == [(1, 0)]
    assert snapshot(family) == before
    assert app_settings.remembered_export_folder() == exports.resolve()


def test_rewind_view_export_refuses_an_input_folder(session: ExplorerSession, family: list[Path], exports: Path,
                                                    monkeypatch) -> None:
    """The Rewind view's own `e` offers the export folder; inside an input it asks again instead of writing."""
    from diffract_tui.views.rewind import PromptInput, RewindView

    monkeypatch.chdir(family[0])
    before = snapshot(family)

    async def run() -> None:
        app = make_app(session)
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("4")
            await settle(pilot, app)
            view = app.query_one(RewindView)
            assert view.plan is not None
            await pilot.press("e")
            await pilot.pause()
            prompt = view.query_one(PromptInput)
            assert Path(prompt.value).parent == family[0]  # the export folder: here, the current folder
            await pilot.press("enter")
            await pilot.pause()
            assert view.prompt_action == "export"  # asked again
            assert "inside the input folder" in str(view.query_one("#rewind-prompt-label").render())
            assert snapshot(family) == before
            name = Path(prompt.value).name
            prompt.value = str(exports / name)
            await pilot.press("enter")
            await pilot.pause()
            assert view.prompt_action is None
            assert (exports / name).is_file()

    asyncio.run(run())
    assert snapshot(family) == before
