"""Checkpoint series (SPEC §10): step numbers parsed from names in every format runs use, series recognised
only when every input says a distinct step, and `scan`/`delta` on a real short training run given in shuffled
order — steps recovered in order, a `step` (and `tokens`) column, each row the scan of that checkpoint alone."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from analysis.run.series import detect_series, parse_step, parse_steps_option
from analysis.run.tables import read_table
from diffract_tui.cli import main
from series_run import NAMES, TOKENS, series_run  # noqa: F401 — the session fixture

SHUFFLED = [30, 0, 40, 10, 20]


@pytest.mark.parametrize("name, expected", [
    ("step-1000", (1000, None)), ("step1000", (1000, None)), ("step_20", (20, None)),
    ("checkpoint-500", (500, None)), ("ckpt-3", (3, None)), ("global_step300", (300, None)),
    ("stage1-step2000-tokens8B", (2000, 8_000_000_000)), ("stage1-step40-tokens1M", (40, 1_000_000)),
    ("olmo-step1000-100B", (1000, 100_000_000_000)), ("step-10-tokens-1.5T", (10, 1_500_000_000_000)),
    ("allenai/OLMo-2-1124-7B@stage1-step1000-tokens5B", (1000, 5_000_000_000)),
    ("org/name@step1000", (1000, None)), ("runs/checkpoint-500/model.safetensors", (500, None)),
    ("Llama-2-7B", (None, None)), ("timestep5", (None, None)), ("base", (None, None)),
    ("org/name@main", (None, None)), ("Llama-2-7B-step100", (100, None)),
])
def test_parse_step(name, expected):
    assert parse_step(name) == expected


def test_detect_mixed_formats_in_shuffled_order():
    names = ["runs/global_step300", "org/m@step100", "stage1-step200-tokens4B", "checkpoint-0", "x-step400-8B"]
    s = detect_series(names)
    assert s is not None
    assert s.steps == (0, 100, 200, 300, 400)
    assert s.reorder(names) == ["checkpoint-0", "org/m@step100", "stage1-step200-tokens4B", "runs/global_step300",
                                "x-step400-8B"]
    assert s.tokens == (None, None, 4_000_000_000, None, 8_000_000_000)
    assert s.columns(2) == {"step": 200, "tokens": 4_000_000_000}


@pytest.mark.parametrize("names", [
    ["step-0", "base"],                      # one name says no step
    ["a/step-10", "b/checkpoint-10"],        # two say the same step
    ["step-10"],                             # one input is no series
])
def test_no_series(names):
    assert detect_series(names) is None


def test_disabled_and_explicit_steps():
    assert detect_series(["step-0", "step-10"], enabled=False) is None
    s = detect_series(["b", "a", "c"], explicit_steps=[500, 0, 1000], enabled=False)
    assert s is not None and s.order == (1, 0, 2) and s.steps == (0, 500, 1000)
    with pytest.raises(ValueError, match="gives 2 step"):
        detect_series(["a", "b", "c"], explicit_steps=[0, 1])
    with pytest.raises(ValueError, match="repeats a step"):
        detect_series(["a", "b"], explicit_steps=[5, 5])
    with pytest.raises(ValueError, match="not a comma-separated"):
        parse_steps_option("0,five")


# ------------------------------------------------------------------------------------------------
# the CLI on a real training run
# ------------------------------------------------------------------------------------------------


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    return a == b


def _scan(args: list[str], out: Path, capsys) -> tuple[int, list[dict], dict, str]:
    code = main(["scan", *args, "--out", str(out), "--quiet", "--device", "cpu", "--threads", "1"])
    err = capsys.readouterr().err
    if code != 0:
        return code, [], {}, err
    rows, meta = read_table(out)
    return code, rows, meta, err


@pytest.fixture(scope="module")
def scanned(series_run, tmp_path_factory):  # noqa: F811
    """The shuffled series scanned with heads into one table (cache in tmp)."""
    root = tmp_path_factory.mktemp("series-scan")
    out = root / "series.json"
    args = [str(series_run.paths[s]) for s in SHUFFLED]
    code = main(["scan", *args, "--heads", "--out", str(out), "--quiet", "--device", "cpu", "--threads", "1",
                 "--cache-dir", str(root / "cache")])
    assert code == 0
    rows, meta = read_table(out)
    return root, rows, meta


def test_scan_orders_a_shuffled_run_by_step(series_run, scanned):
    _, rows, meta = scanned
    labels = [NAMES[s] for s in sorted(NAMES)]
    seen = list(dict.fromkeys(r["checkpoint"] for r in rows))
    assert seen == labels                                   # step order, not argument order
    assert meta["series"]["steps"] == sorted(NAMES)
    assert [c["label"] for c in meta["checkpoints"]] == labels
    for r in rows:
        step = next(s for s, n in NAMES.items() if n == r["checkpoint"])
        assert r["step"] == step
        assert r["tokens"] == TOKENS[step] or (TOKENS[step] is None and r["tokens"] in (None, "")) \
            or (TOKENS[step] is None and isinstance(r["tokens"], float) and math.isnan(r["tokens"]))


def test_each_row_is_the_scan_of_that_checkpoint_alone(series_run, scanned, tmp_path, capsys):
    root, rows, _ = scanned
    for step, path in series_run.paths.items():
        code, alone, _, err = _scan([str(path), "--heads", "--no-cache"], tmp_path / f"{step}.json", capsys)
        assert code == 0, err
        mine = [r for r in rows if r["checkpoint"] == NAMES[step]]
        assert len(mine) == len(alone) > 0
        for a, b in zip(mine, alone):
            assert {k: v for k, v in a.items() if k not in ("step", "tokens")}.keys() == b.keys()
            assert all(_same(a[k], b[k]) for k in b), (step, a["tensor"])


def test_no_series_keeps_argument_order_and_adds_no_step(series_run, tmp_path, capsys):
    args = [str(series_run.paths[s]) for s in (30, 0)]
    code, rows, meta, err = _scan([*args, "--no-series", "--no-cache"], tmp_path / "n.json", capsys)
    assert code == 0, err
    assert list(dict.fromkeys(r["checkpoint"] for r in rows)) == [NAMES[30], NAMES[0]]
    assert "step" not in rows[0] and "series" not in meta


def test_explicit_steps_reorder_and_label(series_run, tmp_path, capsys):
    args = [str(series_run.paths[s]) for s in (30, 0)]
    code, rows, meta, err = _scan([*args, "--steps", "7,3", "--no-cache"], tmp_path / "e.json", capsys)
    assert code == 0, err
    assert list(dict.fromkeys(r["checkpoint"] for r in rows)) == [NAMES[0], NAMES[30]]
    assert {r["checkpoint"]: r["step"] for r in rows} == {NAMES[0]: 3, NAMES[30]: 7}


def test_delta_is_against_the_first_step_whatever_the_argument_order(series_run, tmp_path, capsys):
    out, ref = tmp_path / "d.json", tmp_path / "ref.json"
    args = [str(series_run.paths[s]) for s in (20, 40, 0, 10)]
    code = main(["delta", *args, "--out", str(out), "--no-cache", "--no-spectral", "--threads", "1",
                 "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    rows, meta = read_table(out)
    assert meta["base"]["label"] == NAMES[0]
    assert [t["label"] for t in meta["targets"]] == [NAMES[10], NAMES[20], NAMES[40]]
    assert {r["checkpoint"]: r["step"] for r in rows} == {NAMES[10]: 10, NAMES[20]: 20, NAMES[40]: 40}
    # the same numbers as the plain delta of that pair, given in the usual order
    code = main(["delta", str(series_run.paths[0]), str(series_run.paths[20]), "--out", str(ref), "--no-cache",
                 "--no-spectral", "--no-series", "--threads", "1", "--device", "cpu"])
    assert code == 0
    pair, _ = read_table(ref)
    mine = [r for r in rows if r["checkpoint"] == NAMES[20]]
    assert len(mine) == len(pair) > 0
    for a, b in zip(mine, pair):
        assert {k for k in b if not _same(a[k], b[k])} == set(), a["tensor"]


# ------------------------------------------------------------------------------------------------
# the Evolution view's engine: ExplorerSession.evolution
# ------------------------------------------------------------------------------------------------


class _Node:
    def __init__(self, layer, module, head=None):
        self.layer, self.module, self.head = layer, module, head


@pytest.fixture(scope="module")
def session(series_run, tmp_path_factory):
    """The explorer's session over the shuffled series, with its own (empty) cache: numbers computed afresh."""
    import torch

    from analysis.run.session import ExplorerSession

    torch.set_num_threads(1)
    s = ExplorerSession.open([str(series_run.paths[st]) for st in SHUFFLED], device="cpu",
                             cache_dir=tmp_path_factory.mktemp("evolution-cache"))
    yield s
    s.close()


def _scan_value(rows, label, layer, module, head, metric, operation="weight"):
    slot = "kv_head" if module in ("k", "v") else "head"  # a k/v head slice is a kv head
    (row,) = [r for r in rows if r["checkpoint"] == label and r["layer"] == layer and r["module"] == module
              and r.get(slot) == head and r["operation"] == operation]
    return row[metric]


@pytest.mark.parametrize("metric", ["pl_alpha", "stable_rank", "l2_norm", "mp_soft_rank"])
def test_evolution_of_a_projection_equals_the_scan_rows(session, scanned, metric):
    _, rows, _ = scanned
    ev = session.evolution(_Node(1, "q"), metric)
    labels = [NAMES[s] for s in sorted(NAMES)]
    assert ev.steps == tuple(sorted(NAMES)) and ev.labels == tuple(labels)
    assert all(_same(v, _scan_value(rows, lab, 1, "q", None, metric)) for v, lab in zip(ev.values, labels))
    assert [line.name for line in ev.lines] == [f"head {h}" for h in range(4)]
    for h, line in enumerate(ev.lines):
        assert all(_same(v, _scan_value(rows, lab, 1, "q", h, metric)) for v, lab in zip(line.values, labels))
    assert len(set(ev.values)) == len(ev.values)  # the run changed it at every step (no constant line)


def test_evolution_of_a_delta_metric_is_against_the_first_step(session, series_run):
    import torch

    from analysis.io.checkpoint import open_checkpoint
    from analysis.run.scan import scan
    from analysis.spectral.backend import SpectralSettings

    torch.set_num_threads(1)
    ordered = [open_checkpoint(series_run.paths[s]) for s in sorted(NAMES)]
    try:
        rows = list(scan(ordered, heads=True, delta=True, settings=SpectralSettings(device="cpu"), cache=None))
    finally:
        for c in ordered:
            c.close()
    ev = session.evolution(_Node(0, "k"), "delta_rel")
    labels = [NAMES[s] for s in sorted(NAMES)]
    assert ev.values[0] is None
    assert all(_same(v, _scan_value(rows, lab, 0, "k", None, "delta_rel", "delta"))
               for v, lab in zip(ev.values[1:], labels[1:]))
    assert [line.name for line in ev.lines] == ["head 0", "head 1"]  # k: one line per kv head
    for h, line in enumerate(ev.lines):
        assert all(_same(v, _scan_value(rows, lab, 0, "k", h, "delta_rel", "delta"))
                   for v, lab in zip(line.values[1:], labels[1:]))
    assert all(v > 0 for v in ev.values[1:])


def test_evolution_of_a_layer_has_one_line_per_matrix(session, scanned):
    _, rows, _ = scanned
    ev = session.evolution(_Node(0, None), "pl_alpha")
    assert [line.name for line in ev.lines] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert ev.values == ()
    gate = ev.lines[4]
    assert all(_same(v, _scan_value(rows, NAMES[s], 0, "gate", None, "pl_alpha"))
               for v, s in zip(gate.values, sorted(NAMES)))


def test_delta_previous_is_each_step_against_the_one_before(series_run, tmp_path, capsys):
    out, ref = tmp_path / "p.json", tmp_path / "pref.json"
    args = [str(series_run.paths[s]) for s in (20, 0, 10)]
    code = main(["delta", *args, "--previous", "--out", str(out), "--no-cache", "--no-spectral", "--threads", "1",
                 "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    rows, meta = read_table(out)
    assert meta["against"] == "previous"
    assert {(r["checkpoint"], r["against"], r["step"]) for r in rows} == {
        (NAMES[10], NAMES[0], 10), (NAMES[20], NAMES[10], 20)}
    code = main(["delta", str(series_run.paths[10]), str(series_run.paths[20]), "--out", str(ref), "--no-cache",
                 "--no-spectral", "--no-series", "--threads", "1", "--device", "cpu"])
    assert code == 0
    pair, _ = read_table(ref)
    mine = [r for r in rows if r["checkpoint"] == NAMES[20]]
    assert len(mine) == len(pair) > 0
    for a, b in zip(mine, pair):
        assert {k for k in b if not _same(a[k], b[k])} == set(), a["tensor"]



def test_rescan_after_adding_a_step_computes_only_the_new_one(series_run, tmp_path):
    """The cache makes the earlier checkpoints of a growing series free: only the added step's rows are computed."""
    import torch

    from analysis.io.checkpoint import open_checkpoint
    from analysis.run.cache import Cache
    from analysis.run.scan import scan
    from analysis.run.series import detect_series
    from analysis.spectral.backend import SpectralSettings

    class Counting(Cache):
        computed = 0

        def put_json(self, key, value):
            type(self).computed += 1
            super().put_json(key, value)

    def run(steps):
        Counting.computed = 0
        paths = [str(series_run.paths[s]) for s in steps]
        ckpts = [open_checkpoint(p) for p in detect_series(paths).reorder(paths)]
        try:
            rows = list(scan(ckpts, heads=True, settings=SpectralSettings(device="cpu"), cache=Counting(tmp_path)))
        finally:
            for c in ckpts:
                c.close()
        return rows, Counting.computed

    torch.set_num_threads(1)
    first, computed = run([10, 0, 20, 30])
    assert computed == len(first) and len(first) % 4 == 0
    second, computed = run([40, 30, 0, 20, 10])
    assert computed == len(first) // 4 == len(second) // 5  # one checkpoint's rows, the added one's
    earlier = [r for r in second if r["checkpoint"] != NAMES[40]]
    assert len(earlier) == len(first)
    assert all(a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a) for a, b in zip(earlier, first))
