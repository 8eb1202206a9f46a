"""Bad `--executor` / `--ray-address` input, without a Ray cluster: Ray not installed, an unknown executor, an
unreachable address, an address without `--executor ray` — each one line (usage: exit 2, else 1), before any
work, no output written and every input byte unchanged."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from analysis.generate import write_checkpoint
from diffract_tui.cli import main
from tests.test_hostile_writers import one_line_error, sha_tree


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> list[Path]:
    """Two tiny llama checkpoints (one layer, hidden 32)."""
    root = tmp_path_factory.mktemp("ray-hostile")
    return [write_checkpoint(root / name, "llama", seed=seed, num_layers=1, hidden_size=32, num_heads=2,
                             num_kv_heads=1, head_dim=16, intermediate_size=48, vocab_size=64)
            for seed, name in enumerate(("base", "cpt"))]


def _closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", ["scan", "delta"])
def test_executor_ray_without_ray_installed_says_what_to_install(pair, tmp_path, capsys, monkeypatch, command):
    monkeypatch.setitem(sys.modules, "ray", None)   # `import ray` raises ImportError
    before = sha_tree(*pair)
    out = tmp_path / "t.csv"
    assert main([command, *map(str, pair), "--out", str(out), "--executor", "ray"]) == 1
    one_line_error(capsys.readouterr().err, "--executor ray needs Ray", "pip install 'diffract-tui[ray]'")
    assert not out.exists() and sha_tree(*pair) == before


@pytest.mark.parametrize("command", ["scan", "delta"])
def test_an_unknown_executor_is_a_usage_error(pair, tmp_path, capsys, command):
    out = tmp_path / "t.csv"
    assert main([command, *map(str, pair), "--out", str(out), "--executor", "dask"]) == 2
    err = capsys.readouterr().err
    assert "unknown executor 'dask'" in err and "local or ray" in err and "Traceback" not in err
    assert not out.exists()


def test_an_unreachable_ray_address_fails_fast_in_one_line(pair, tmp_path, capsys, monkeypatch):
    import ray
    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def no_init(*args, **kwargs):
        raise AssertionError("ray.init was called for an address nothing listens on")

    monkeypatch.setattr(ray, "init", no_init)
    before = sha_tree(*pair)
    out = tmp_path / "t.csv"
    address = f"127.0.0.1:{_closed_port()}"
    assert main(["scan", *map(str, pair), "--out", str(out), "--executor", "ray", "--ray-address", address]) == 1
    one_line_error(capsys.readouterr().err, f"cannot reach the Ray cluster at {address}", "--ray-address")
    assert not out.exists() and sha_tree(*pair) == before


def test_ray_init_failing_is_one_line(pair, tmp_path, capsys, monkeypatch):
    import ray
    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def refused(*args, **kwargs):
        raise ConnectionError("Could not find any running Ray instance.\nPlease specify the one to connect to")

    monkeypatch.setattr(ray, "init", refused)
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    out = tmp_path / "t.csv"
    assert main(["delta", *map(str, pair), "--out", str(out), "--executor", "ray"]) == 1
    one_line_error(capsys.readouterr().err, "cannot start or reach the Ray cluster at auto",
                   "Could not find any running Ray instance")
    assert not out.exists()


def test_a_ray_address_without_executor_ray_is_a_usage_error(pair, tmp_path, capsys):
    out = tmp_path / "t.csv"
    assert main(["scan", *map(str, pair), "--out", str(out), "--ray-address", "10.0.0.1:6379"]) == 2
    assert "only with --executor ray" in capsys.readouterr().err
    assert not out.exists()


def test_the_explorer_rejects_an_unknown_executor_before_the_screen(pair, capsys):
    assert main(["open", *map(str, pair), "--executor", "dask"]) == 2
    assert "unknown executor 'dask'" in capsys.readouterr().err


def test_rewind_sweep_rejects_an_unknown_executor(pair, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("some text")
    assert main(["rewind", "sweep", *map(str, pair), "--text", str(text), "--out", str(tmp_path / "s.csv"),
                 "--executor", "dask"]) == 2
    assert "unknown executor 'dask'" in capsys.readouterr().err


def _sweep_args(pair: list[Path], tmp_path: Path, out: Path, *extra: str) -> list[str]:
    """A `rewind sweep` of the pair on one small text (the executor is opened before any model is loaded)."""
    text = tmp_path / "t.txt"
    text.write_text("some text to evaluate")
    return ["rewind", "sweep", *map(str, pair), "--text", str(text), "--no-cache", "--out", str(out), *extra]


def test_rewind_sweep_with_executor_ray_without_ray_installed_says_what_to_install(pair, tmp_path, capsys,
                                                                                    monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)   # `import ray` raises ImportError
    before = sha_tree(*pair)
    out = tmp_path / "s.csv"
    assert main(_sweep_args(pair, tmp_path, out, "--executor", "ray")) == 1
    one_line_error(capsys.readouterr().err, "--executor ray needs Ray", "pip install 'diffract-tui[ray]'")
    assert not out.exists() and sha_tree(*pair) == before


def test_rewind_sweep_at_an_unreachable_ray_address_fails_fast_in_one_line(pair, tmp_path, capsys, monkeypatch):
    import time

    import ray
    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def no_init(*args, **kwargs):
        raise AssertionError("ray.init was called for an address nothing listens on")

    monkeypatch.setattr(ray, "init", no_init)
    before = sha_tree(*pair)
    out = tmp_path / "s.csv"
    address = f"127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    assert main(_sweep_args(pair, tmp_path, out, "--executor", "ray", "--ray-address", address)) == 1
    assert time.monotonic() - start < 3.0, "an unreachable address took longer than the connect timeout"
    one_line_error(capsys.readouterr().err, f"cannot reach the Ray cluster at {address}", "--ray-address")
    assert not out.exists() and sha_tree(*pair) == before


@pytest.mark.parametrize("option", [["--ray-address", "10.0.0.1:6379"], ["--batch", "4"]])
def test_rewind_sweep_ray_options_without_executor_ray_are_usage_errors(pair, tmp_path, capsys, option):
    out = tmp_path / "s.csv"
    assert main(_sweep_args(pair, tmp_path, out, *option)) == 2
    err = capsys.readouterr().err
    assert "only with --executor ray" in err and option[0] in err and "Traceback" not in err
    assert not out.exists()
