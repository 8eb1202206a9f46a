"""The demo's tiny real models (`analysis.tiny_models`, `diffract-tui demo --family cpt|series`): a build is
reused once finished and never reused half-made, the CPT family is a real CPT, the series is in step order, the
demo opens the right checkpoints and held-out texts, and without the eval extra it is one line. The suite's
session-built family and series are reused (linked into the demo's cache folder) rather than trained again."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from analysis.io.atomic import TMP_PREFIX  # noqa: E402
from analysis import tiny_models  # noqa: E402
from diffract_tui.cli import main  # noqa: E402
from diffract_tui.cli.demo import CPT_FOLDER, SERIES_FOLDER  # noqa: E402
from series_run import NAMES, series_run  # noqa: E402,F401 — the session fixture
from test_launch import no_screen  # noqa: E402,F401 — the app runner replaced by a recorder
from tiny_cpt import family  # noqa: E402,F401 — the session fixture

INSTALL = "pip install 'diffract-tui[eval]'"


def _tree_sha(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _siblings(root: Path) -> list[str]:
    """What lies beside `root` in its folder (temp folders of a build included)."""
    return sorted(p.name for p in root.parent.iterdir()) if root.parent.is_dir() else []


def _linked_cache(tmp_path: Path, folder: str, built: Path) -> Path:
    """A demo cache folder whose `folder` is a link to an already built family (so nothing is trained)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / folder).symlink_to(built, target_is_directory=True)
    return cache


@pytest.fixture
def open_kwargs(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """The keyword arguments of every `ExplorerSession.open` call (the session then opens as usual)."""
    from analysis.run.session import ExplorerSession

    calls: list[dict] = []
    real = ExplorerSession.open

    def recording(cls, *args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ExplorerSession, "open", classmethod(recording))
    return calls


# ------------------------------------------------------------------------------------------------ the build


def _fake_train(calls: list[Path], fail: bool = False):
    def train(work: Path) -> None:
        calls.append(work)
        (work / "half").mkdir()
        (work / "half" / "weights.bin").write_bytes(b"x" * 10)
        if fail:
            raise RuntimeError("killed mid-way")
    return train


def test_a_finished_build_is_reused_and_trains_nothing(tmp_path: Path) -> None:
    root, stamp, calls = tmp_path / "fam", {"recipe": "t/1"}, []
    assert tiny_models.build_once(root, stamp, _fake_train(calls)) is True
    mtime = (root / tiny_models.STAMP_FILE).stat().st_mtime_ns
    assert tiny_models.build_once(root, stamp, _fake_train(calls)) is False
    assert len(calls) == 1 and (root / tiny_models.STAMP_FILE).stat().st_mtime_ns == mtime
    assert _siblings(root) == ["fam"]  # the temp folder became the root
    # another recipe version is not this build: trained again, replacing the old one whole
    assert tiny_models.build_once(root, {"recipe": "t/2"}, _fake_train(calls)) is True
    assert len(calls) == 2 and json.loads((root / tiny_models.STAMP_FILE).read_text()) == {"recipe": "t/2"}
    assert _siblings(root) == ["fam"]


def test_a_failed_build_leaves_nothing_that_is_reused(tmp_path: Path) -> None:
    root, stamp, calls = tmp_path / "fam", {"recipe": "t/1"}, []
    with pytest.raises(RuntimeError, match="killed mid-way"):
        tiny_models.build_once(root, stamp, _fake_train(calls, fail=True))
    assert _siblings(root) == []  # neither the root nor a temp folder
    assert tiny_models.build_once(root, stamp, _fake_train(calls)) is True
    assert len(calls) == 2 and tiny_models.stamp_matches(root, stamp)


def test_a_hard_killed_build_is_removed_not_reused(tmp_path: Path) -> None:
    """What a SIGKILLed build leaves (a temp folder of a dead process, even one already stamped) and a root
    with no stamp are neither reused nor left behind."""
    root, stamp, calls = tmp_path / "fam", {"recipe": "t/1"}, []
    dead = tmp_path / f"{TMP_PREFIX}{tiny_models.owner_tag().rsplit('-', 1)[0]}-{2 ** 22 + 7}-abcd-fam"
    dead.mkdir()
    (dead / tiny_models.STAMP_FILE).write_text(json.dumps(stamp))
    root.mkdir()
    (root / "half-written.safetensors").write_bytes(b"")
    assert not tiny_models.stamp_matches(root, stamp)
    assert tiny_models.build_once(root, stamp, _fake_train(calls)) is True
    assert len(calls) == 1 and _siblings(root) == ["fam"]
    assert sorted(p.name for p in root.iterdir()) == ["half", tiny_models.STAMP_FILE]


@pytest.mark.slow  # two real trainings of the series (~3-8 s on a loaded core)
def test_a_series_build_killed_in_training_is_redone_bit_for_bit(series_run, tmp_path: Path, monkeypatch,  # noqa: F811
                                                                 capsys, no_screen) -> None:  # noqa: F811
    """A real build that dies after two of its checkpoints leaves no folder; the demo then trains the whole
    run once, with one line, into its cache folder, bit-identical to the suite's run, and reuses it after."""
    cache = tmp_path / "cache"
    root = cache / SERIES_FOLDER
    real_step, steps = torch.optim.AdamW.step, []

    def dying_step(self, *args, **kwargs):
        steps.append(1)
        if len(steps) > 15:
            raise RuntimeError("killed mid-way")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    with pytest.raises(RuntimeError, match="killed mid-way"):
        tiny_models.build_series(root)
    assert _siblings(root) == []
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)

    assert main(["demo", "--family", "series", "--cache-dir", str(cache), "--device", "cpu"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "first use: training" in err[0] and str(root) in err[0], err
    assert _tree_sha(root) == _tree_sha(series_run.root)
    stamp_mtime = (root / tiny_models.STAMP_FILE).stat().st_mtime_ns
    assert main(["demo", "--family", "series", "--cache-dir", str(cache), "--device", "cpu"]) == 0
    assert capsys.readouterr().err.strip() == ""  # reused: no training line
    assert (root / tiny_models.STAMP_FILE).stat().st_mtime_ns == stamp_mtime
    assert [c.fingerprint for c in no_screen[0].checkpoints] == [c.fingerprint for c in no_screen[1].checkpoints]


def test_building_the_cpt_family_twice_trains_nothing_the_second_time(family, monkeypatch) -> None:  # noqa: F811
    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(tiny_models, "_train_family", no_training)
    mtime = (family.root / tiny_models.STAMP_FILE).stat().st_mtime_ns
    assert tiny_models.build_cpt_family(family.root) == family
    assert (family.root / tiny_models.STAMP_FILE).stat().st_mtime_ns == mtime


# ------------------------------------------------------------------------------------------------ the demo


def test_demo_cpt_opens_the_family_with_its_held_out_texts(family, tmp_path: Path, capsys, no_screen,  # noqa: F811
                                                           open_kwargs) -> None:
    """base + code + code2 under the cache folder, the held-out code as the domain text and the held-out prose as
    the general text; and it is a real CPT: the continued model's code loss is below the base's."""
    from analysis.eval.evaluator import Evaluator, prepare_text
    from analysis.eval.loss import load_model
    from analysis.eval.texts import load_text

    cache = _linked_cache(tmp_path, CPT_FOLDER, family.root)
    assert main(["demo", "--family", "cpt", "--cache-dir", str(cache), "--device", "cpu"]) == 0
    assert capsys.readouterr().err.strip() == ""  # a finished family: nothing trained, nothing said
    (session,) = no_screen
    assert session.labels == ["base", "code", "code2"]
    assert [Path(c.path) for c in session.checkpoints] == [family.base, family.code, family.code2]  # link resolved
    (kwargs,) = open_kwargs
    assert kwargs["texts"] == [cache / CPT_FOLDER / "code.txt"]
    assert kwargs["general_texts"] == [cache / CPT_FOLDER / "prose.txt"]
    assert session.cache.root == cache

    torch.set_num_threads(1)
    losses = {}
    for name in ("base", "code"):
        lm = load_model(cache / CPT_FOLDER / name, device=torch.device("cpu"), dtype=torch.float32)
        losses[name] = Evaluator(lm, name).loss(prepare_text(lm, load_text(kwargs["texts"][0]), 64, 8)).loss
    assert losses["code"] < losses["base"] - 0.1, losses


def test_demo_series_opens_the_run_in_step_order(series_run, tmp_path: Path, no_screen,  # noqa: F811
                                                 open_kwargs) -> None:
    cache = _linked_cache(tmp_path, SERIES_FOLDER, series_run.root)
    assert main(["demo", "--family", "series", "--cache-dir", str(cache), "--device", "cpu"]) == 0
    (session,) = no_screen
    assert session.labels == [NAMES[s] for s in sorted(NAMES)]
    ordered, steps = session.series_order()
    assert steps == [0, 10, 20, 30, 40] and [c.label for c in ordered] == session.labels
    assert open_kwargs[0]["texts"] == [] and open_kwargs[0]["general_texts"] == []


def test_demo_synthetic_flag_and_family_are_the_same(tmp_path: Path, no_screen) -> None:  # noqa: F811
    cache = tmp_path / "cache"
    assert main(["demo", "--family", "synthetic", "--cache-dir", str(cache), "--device", "cpu"]) == 0
    assert main(["demo", "--synthetic", "--cache-dir", str(cache), "--device", "cpu"]) == 0
    assert [c.fingerprint for c in no_screen[0].checkpoints] == [c.fingerprint for c in no_screen[1].checkpoints]


@pytest.mark.parametrize(("argv", "fragment"), [
    (["--family", "gpt5"], "unknown demo family 'gpt5'"),
    (["--synthetic", "--family", "cpt"], "cannot go with --family cpt"),
])
def test_bad_demo_family_is_a_usage_error(argv, fragment, tmp_path: Path, capsys, no_screen) -> None:  # noqa: F811
    assert main(["demo", *argv, "--cache-dir", str(tmp_path / "cache")]) == 2
    assert fragment in capsys.readouterr().err
    assert no_screen == [] and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(("family_name", "missing"), [
    ("cpt", "transformers"), ("cpt", "tokenizers"), ("series", "transformers")])
def test_demo_without_the_eval_extra_is_one_line(family_name, missing, tmp_path: Path, monkeypatch, capsys,
                                                 no_screen) -> None:  # noqa: F811
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` raises ImportError
    cache = tmp_path / "cache"
    assert main(["demo", "--family", family_name, "--cache-dir", str(cache)]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("diffract-tui: error: ") and INSTALL in lines[0] and missing in lines[0]
    assert no_screen == [] and not cache.exists()


def test_a_finished_series_opens_without_transformers(series_run, tmp_path: Path, monkeypatch,  # noqa: F811
                                                      no_screen) -> None:  # noqa: F811
    """Only training needs the extra: a series already in the cache opens without it."""
    cache = _linked_cache(tmp_path, SERIES_FOLDER, series_run.root)
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert main(["demo", "--family", "series", "--cache-dir", str(cache), "--device", "cpu"]) == 0
    assert len(no_screen) == 1 and os.path.samefile(no_screen[0].checkpoints[0].path, series_run.paths[0])
