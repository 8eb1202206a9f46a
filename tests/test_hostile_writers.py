"""Hostile cases for every writer (issue 9, items 3, 9 and 14c), grouped here:

- the output rule: `scan`, `delta`, `rewind plan`, `rewind apply`, `interpolate --diagnostics-json` and the
  app's exports refuse — one line, exit 1 — an output that is, holds or lies in an input (the Hugging Face
  link layout included), and every input's sha256 is the same before and after;
- write failures: EFBIG (RLIMIT_FSIZE), EACCES (privileges dropped to nobody: CI runs as root, where chmod
  does not stop a write), ENOSPC (a full 1 MiB tmpfs) are one line naming the file, exit 1, no traceback and
  nothing half-written;
- interrupts: SIGTERM cleans up like Ctrl-C; after SIGKILL mid-write the next write removes the stale temp
  folder (only this host's dead processes' leftovers); a kill between the two renames of a `--force` swap
  never loses OUT (the next run restores the old copy, whole);
- a config without `model_type` (rxnfp) gets the inferred one in the output, which transformers loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from analysis.errors import DiffractError
from analysis.io import atomic, writer
from analysis.io.checkpoint import open_checkpoint
from analysis.io.guard import checkpoint_files
from analysis.run.tables import check_table_output, write_table
from conftest import llama_checkpoint, write_sharded_safetensors
from diffract_tui.cli import main

REPO = Path(__file__).resolve().parents[1]
ONE_LINE_PREFIX = "diffract-tui: error: "
L, H, HKV, DH, D = 2, 4, 2, 8, 32


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def tiny_llama(folder: Path, seed: int, hidden: int = D, vocab: int = 64) -> Path:
    """A 2-layer llama folder (model.safetensors + config.json + tokenizer.json)."""
    config, tensors = llama_checkpoint(layers=L, hidden=hidden, heads=H, kv_heads=HKV, vocab=vocab, seed=seed)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    return folder


def sha_tree(*roots: Path) -> dict[str, str]:
    """sha256 of every file under (or at) each root, links followed, keyed by path."""
    out: dict[str, str] = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def one_line_error(err: str, *fragments: str) -> None:
    """The stderr of a refused command: exactly one line, the project's prefix, each fragment, no traceback."""
    assert err.count("\n") == 1 and err.startswith(ONE_LINE_PREFIX), err
    assert "Traceback" not in err
    for frag in fragments:
        assert frag in err, (frag, err)


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """main(args) in-process: (exit code, stderr)."""
    capsys.readouterr()
    rc = main(args)
    return rc, capsys.readouterr().err


def entries(folder: Path) -> list[str]:
    """Every name in a folder, hidden ones included (temp leftovers show up here)."""
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture()
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return tiny_llama(tmp_path / "B", 0), tiny_llama(tmp_path / "C", 1)


@pytest.fixture()
def plan(tmp_path: Path, pair, capsys) -> Path:
    """A rewind list for pair (greedy 0.25) at tmp_path/list.json."""
    b, c = pair
    lst = tmp_path / "list.json"
    assert main(["rewind", "plan", str(b), str(c), "--fraction", "0.25", "--out", str(lst)]) == 0
    capsys.readouterr()
    return lst


# --------------------------------------------------------------------------------------------------
# item 3: every writer refuses to write onto, into or around an input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_args, fragment", [
    (lambda b, c: ["rewind", "plan", b, c, "--fraction", "0.25", "--out", f"{c}/model.safetensors"],
     "lies inside the input folder"),
    (lambda b, c: ["scan", b, c, "--out", f"{b}/config.json", "--no-cache", "-q"], "lies inside the input folder"),
    (lambda b, c: ["delta", b, c, "--out", f"{c}/config.json", "--no-cache"], "lies inside the input folder"),
    (lambda b, c: ["interpolate", c, "--base", b, "--alpha", "0.5", "--diagnostics-json", f"{c}/config.json"],
     "choose a path for --diagnostics-json outside every input checkpoint"),
    (lambda b, c: ["scan", f"{b}/model.safetensors", "--out", f"{b}/config.json", "--no-cache", "-q"],
     "the output is the input file"),
    (lambda b, c: ["scan", b, "--out", b, "--no-cache", "-q"], "cannot write a table"),
])
def test_table_list_and_report_writers_refuse_inputs(tmp_path, pair, capsys, make_args, fragment):
    b, c = pair
    before = sha_tree(b, c)
    rc, err = run_cli(make_args(str(b), str(c)), capsys)
    assert rc == 1
    one_line_error(err, fragment)
    assert sha_tree(b, c) == before
    assert entries(b) == entries(c) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_scan_refuses_the_index_of_a_sharded_input(tmp_path, capsys):
    config, tensors = llama_checkpoint()
    x = write_sharded_safetensors(tmp_path / "X", tensors, 2, config)
    before = sha_tree(x)
    rc, err = run_cli(["scan", str(x), "--out", str(x / "model.safetensors.index.json"), "--no-cache", "-q"], capsys)
    assert rc == 1
    one_line_error(err, "model.safetensors.index.json", "lies inside the input folder")
    assert sha_tree(x) == before


def test_table_refused_before_any_work(tmp_path, pair, monkeypatch, capsys):
    """The refusal comes before the scan: nothing is computed for an output that cannot be written."""
    import analysis.run.scan as scan_mod

    b, c = pair
    monkeypatch.setattr(scan_mod, "scan", lambda *a, **k: pytest.fail("scanned before refusing"))
    rc, err = run_cli(["scan", str(b), "--out", str(b / "t.csv"), "--no-cache", "-q"], capsys)
    assert rc == 1 and "lies inside the input folder" in err


def test_interpolate_report_refuses_the_scores_file(tmp_path, pair, capsys):
    b, c = pair
    scores = tmp_path / "scores.csv"
    scores.write_text("alpha,metric,score\n0,acc,0.5\n1,acc,0.7\n0.5,acc,0.55\n")
    before = sha_tree(b, c, scores)
    rc, err = run_cli(["interpolate", str(c), "--base", str(b), "--barrier", str(scores),
                       "--diagnostics-json", str(scores)], capsys)
    assert rc == 1
    one_line_error(err, "the output is the input file", "--diagnostics-json")
    assert sha_tree(b, c, scores) == before


def test_csv_sidecar_is_guarded_too(tmp_path):
    meta = tmp_path / "t.csv.meta.json"
    meta.write_text("{}")
    before = sha_tree(meta)
    with pytest.raises(DiffractError, match="the output is the input file"):
        write_table([{"a": 1}], tmp_path / "t.csv", metadata={"x": 1}, inputs=[meta])
    assert sha_tree(meta) == before and not (tmp_path / "t.csv").exists()


def test_rewind_apply_refuses_its_list_and_a_folder_holding_it(tmp_path, pair, plan, capsys):
    b, c = pair
    before = sha_tree(b, c, plan)
    rc, err = run_cli(["rewind", "apply", str(plan), "--out", str(plan), "--force"], capsys)
    assert rc == 1
    one_line_error(err, "the output is the input file", str(plan.resolve()))
    holder = tmp_path / "lists"
    holder.mkdir()
    inner = holder / "r.json"
    inner.write_bytes(plan.read_bytes())
    rc, err = run_cli(["rewind", "apply", str(inner), "--out", str(holder), "--force"], capsys)
    assert rc == 1
    one_line_error(err, "the output contains the input", "r.json")
    assert sha_tree(b, c, plan) == before and inner.read_bytes() == plan.read_bytes()
    # the list's folder itself is not protected: an output beside the list is fine
    assert main(["rewind", "apply", str(plan), "--out", str(tmp_path / "beside")]) == 0


def test_rewind_apply_refuses_the_target_of_a_hub_cache_link(tmp_path, pair, capsys):
    """in/model.safetensors -> real/model.safetensors (a Hugging Face cache): --out real --force deleted the
    target's real weights; now refused, nothing changes."""
    b, c = pair
    real, link_dir = tmp_path / "real", tmp_path / "in"
    real.mkdir()
    link_dir.mkdir()
    (c / "model.safetensors").rename(real / "model.safetensors")
    (link_dir / "model.safetensors").symlink_to(real / "model.safetensors")
    for name in ("config.json", "tokenizer.json"):
        (link_dir / name).write_bytes((c / name).read_bytes())
    lst = tmp_path / "list.json"
    assert main(["rewind", "plan", str(b), str(link_dir), "--fraction", "0.25", "--out", str(lst)]) == 0
    before = sha_tree(b, real, link_dir, lst)
    rc, err = run_cli(["rewind", "apply", str(lst), "--out", str(real), "--force"], capsys)
    assert rc == 1
    one_line_error(err, "the output contains the input", "real/model.safetensors")
    assert sha_tree(b, real, link_dir, lst) == before
    assert (link_dir / "model.safetensors").is_symlink() and entries(real) == ["model.safetensors"]


def test_app_exports_follow_the_rule(tmp_path, pair):
    """The explorer's exports (marks → rewind list, a view's table) use the same engine calls and refuse too."""
    from analysis.run.session import ExplorerSession

    b, c = pair
    before = sha_tree(b, c)
    session = ExplorerSession.open([b, c], cache_dir=tmp_path / "cache")
    try:
        session.toggle_mark(0, 1)
        with pytest.raises(DiffractError, match="lies inside the input folder"):
            session.export_marks(c / "config.json")
        with pytest.raises(DiffractError, match="lies inside the input folder"):
            write_table([{"a": 1}], b / "view.csv", metadata={},
                        inputs=[f for ck in session.checkpoints for f in checkpoint_files(ck)])
        assert session.export_marks(tmp_path / "marks.json") == tmp_path / "marks.json"
    finally:
        session.close()
    assert sha_tree(b, c) == before


def test_check_table_output_allows_a_table_beside_a_single_file_input(tmp_path, pair):
    b, _ = pair
    ck = open_checkpoint(b / "model.safetensors")
    assert check_table_output(b.parent / "b.csv", checkpoint_files(ck)) == b.parent / "b.csv"
    with pytest.raises(DiffractError, match="the output is the input file"):
        check_table_output(b / "tokenizer.json", checkpoint_files(ck))


# --------------------------------------------------------------------------------------------------
# item 9: OS errors are one line; nothing half-written
# --------------------------------------------------------------------------------------------------


def run_child(code: str, *, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -c code` with the repo importable, one compute thread."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "PYTHONDONTWRITEBYTECODE": "1",
           "OMP_NUM_THREADS": "1", "DIFFRACT_TUI_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def cli_code(args: list[str], prelude: str = "") -> str:
    """Child code: an optional hook (prelude), then the CLI with `args`, exiting with its status."""
    return (f"import sys\n{prelude}\nfrom diffract_tui.cli import main\n"
            f"sys.exit(main({[str(a) for a in args]!r}))\n")


FSIZE_PRELUDE = """
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
"""


@pytest.mark.parametrize("what, limit, args, fragment", [
    ("apply", 20_000, lambda t, lst: ["rewind", "apply", lst, "--out", t / "out"], "cannot write the checkpoint"),
    ("plan", 200, lambda t, lst: ["rewind", "plan", t / "B", t / "C", "--fraction", "0.25", "--out", t / "l2.json"],
     "cannot write the rewind list"),
    ("table", 200, lambda t, lst: ["scan", t / "B", "--out", t / "s.csv", "--no-cache", "-q"],
     "cannot write the table"),
])
def test_file_too_large_is_one_line(tmp_path, pair, plan, what, limit, args, fragment):
    """EFBIG: the file-size limit (SIGXFSZ ignored, as a shell with `ulimit -f` and a trap would do)."""
    b, c = pair
    before = sha_tree(b, c, plan)
    listing = entries(tmp_path)
    proc = run_child(cli_code(args(tmp_path, plan), FSIZE_PRELUDE.format(limit=limit)))
    assert proc.returncode == 1, proc.stderr
    one_line_error(proc.stderr, fragment, "File too large", "ulimit -f", "nothing was written")
    assert ".tmp-" not in proc.stderr and ".diffract-tmp-" not in proc.stderr  # names the file asked for
    assert entries(tmp_path) == listing  # nothing half-written, no temp left
    assert sha_tree(b, c, plan) == before


@pytest.fixture()
def world_readable_dir():
    """A folder outside pytest's 0700 tmp tree, so an unprivileged child can read the inputs in it."""
    d = Path(tempfile.mkdtemp(prefix="diffract-hostile-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", str(d)], check=False)


DROP_TO_NOBODY = """
import contextlib, io, os
from diffract_tui.cli import main as _warm
with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
    assert _warm({warm!r}) == 0  # as root first: every lazy import is loaded before the interpreter's
                                 # own files (under /root here) become unreadable
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
"""


@pytest.mark.skipif(not hasattr(os, "setuid") or os.geteuid() != 0, reason="needs root to drop privileges")
@pytest.mark.parametrize("args, fragment", [
    (lambda d, lst, o: ["rewind", "apply", lst, "--out", o / "out"], "cannot write the checkpoint"),
    (lambda d, lst, o: ["rewind", "plan", d / "B", d / "C", "--fraction", "0.25", "--out", o / "l.json"],
     "cannot write the rewind list"),
    (lambda d, lst, o: ["scan", d / "B", "--out", o / "s.json", "--no-cache", "-q"], "cannot write the table"),
])
def test_permission_denied_is_one_line(world_readable_dir, capsys, args, fragment):
    """EACCES: the child drops to nobody (65534); the output's folder belongs to root and is 0755."""
    d = world_readable_dir
    b, c = tiny_llama(d / "B", 0), tiny_llama(d / "C", 1)
    lst = d / "list.json"
    assert main(["rewind", "plan", str(b), str(c), "--fraction", "0.25", "--out", str(lst)]) == 0
    for f in (*b.iterdir(), *c.iterdir(), lst):
        f.chmod(0o644)  # safetensors saves 0600: the inputs must be readable by nobody, only the folder is not
    (d / "ro").mkdir(mode=0o755)
    (d / "warm").mkdir()
    before = sha_tree(b, c, lst)
    warm = [str(a) for a in args(d, lst, d / "warm")]
    proc = run_child(cli_code(args(d, lst, d / "ro"), DROP_TO_NOBODY.format(warm=warm)), cwd=d)
    assert proc.returncode == 1, proc.stderr
    one_line_error(proc.stderr, fragment, "Permission denied", "permissions", str(d / "ro"))
    assert entries(d / "ro") == []
    assert sha_tree(b, c, lst) == before


@pytest.fixture()
def full_tmpfs(tmp_path):
    """A 1 MiB tmpfs, mounted for the test; skipped (only these tests) where mounting is not permitted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"ENOSPC needs a small tmpfs and mounting is not permitted here: {proc.stderr.strip()}")
    try:
        filler = mnt / "filler"
        with open(filler, "wb") as fh:  # fill the disk to the last block
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError:
                pass
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("args, fragment", [
    (lambda m, lst, b, c: ["rewind", "apply", lst, "--out", m / "out"], "cannot write the checkpoint"),
    (lambda m, lst, b, c: ["rewind", "plan", b, c, "--fraction", "0.25", "--out", m / "l.json"],
     "cannot write the rewind list"),
    (lambda m, lst, b, c: ["delta", b, c, "--out", m / "d.parquet", "--no-cache"], "cannot write the table"),
])
def test_disk_full_is_one_line(pair, plan, full_tmpfs, capsys, args, fragment):
    """ENOSPC on a full tmpfs: one line naming the output, exit 1, nothing left on the small disk."""
    b, c = pair
    before = sha_tree(b, c, plan)
    rc, err = run_cli([str(a) for a in args(full_tmpfs, plan, b, c)], capsys)
    assert rc == 1
    one_line_error(err, fragment, "No space left on device", "free some space", str(full_tmpfs))
    assert entries(full_tmpfs) == ["filler"]
    assert sha_tree(b, c, plan) == before


# --------------------------------------------------------------------------------------------------
# item 9: interrupts, stale temp folders, the --force swap
# --------------------------------------------------------------------------------------------------

PAUSE_AT_SECOND_TENSOR = """
import os, sys, time
from analysis.io import writer
_real = writer._write_payload
_n = [0]
def _hook(fh, payload):
    _n[0] += 1
    _real(fh, payload)
    if _n[0] == 2:
        {action}
writer._write_payload = _hook
"""


def test_sigterm_cleans_up_like_ctrl_c(tmp_path, pair, plan):
    b, c = pair
    code = cli_code(["rewind", "apply", plan, "--out", tmp_path / "out"],
                    PAUSE_AT_SECOND_TENSOR.format(action="print('READY', flush=True); time.sleep(60)"))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "READY"
        assert [n for n in entries(tmp_path) if ".out.diffract-tmp-" in n]  # mid-write: the temp folder exists
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130, err  # what Ctrl-C gives (not -SIGTERM: the handler ran)
    assert "Traceback" not in out + err
    assert entries(tmp_path) == ["B", "C", "list.json"]


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_next_write_removes_only_this_hosts_dead_leftovers(tmp_path):
    host, dead, live = atomic.host_tag(), dead_pid(), os.getpid()
    out = tmp_path / "out"
    stale = tmp_path / f".out.diffract-tmp-{host}-{dead}-abc123"
    mine_live = tmp_path / f".out.diffract-tmp-{host}-{live}-abc123"
    other_host = tmp_path / f".out.diffract-tmp-otherhost-{dead}-abc123"
    stale_aside = tmp_path / f".out.diffract-old-{host}-{dead}-def456"
    for d in (stale, mine_live, other_host, stale_aside):
        d.mkdir()
        (d / "model-00001-of-00001.safetensors").write_bytes(b"x" * 100)
    (out).mkdir()  # OUT exists, so the dead aside is a finished swap's leftover: removed, not restored
    writer.write_checkpoint_streaming(out, [("w", torch.ones(2, 2))], force=True)
    assert entries(tmp_path) == sorted([".out.diffract-tmp-otherhost-" f"{dead}-abc123",
                                        f".out.diffract-tmp-{host}-{live}-abc123", "out"])
    # files: atomic writes remove this host's dead temp files for the same target only
    target = tmp_path / "t.json"
    dead_tmp = tmp_path / f".tmp-{host}-{dead}-0011223344556677-t.json"
    live_tmp = tmp_path / f".tmp-{host}-{live}-0011223344556677-t.json"
    other_tmp = tmp_path / f".tmp-elsewhere-{dead}-0011223344556677-t.json"
    other_name = tmp_path / f".tmp-{host}-{dead}-0011223344556677-u.json"
    for f in (dead_tmp, live_tmp, other_tmp, other_name):
        f.write_text("partial")
    atomic.write_text_atomic(target, "{}\n", "the test file")
    assert not dead_tmp.exists() and live_tmp.exists() and other_tmp.exists() and other_name.exists()


def test_temp_names_carry_host_and_pid(tmp_path, monkeypatch):
    seen: list[str] = []
    real = writer._swap_in
    monkeypatch.setattr(writer, "_swap_in", lambda tmp, out: (seen.append(tmp.name), real(tmp, out))[1])
    writer.write_checkpoint_streaming(tmp_path / "out", [("w", torch.ones(2))])
    prefix = f".out.diffract-tmp-{atomic.host_tag()}-{os.getpid()}-"
    assert len(seen) == 1 and seen[0].startswith(prefix), seen
    assert atomic.parse_owner(seen[0][len(".out.diffract-tmp-"):]) == (atomic.host_tag(), os.getpid())


def test_sigkill_mid_write_is_cleaned_by_the_next_run(tmp_path, pair, plan, capsys):
    proc = run_child(cli_code(["rewind", "apply", plan, "--out", tmp_path / "out"],
                              PAUSE_AT_SECOND_TENSOR.format(action="os.kill(os.getpid(), 9)")))
    assert proc.returncode == -signal.SIGKILL
    leftovers = [n for n in entries(tmp_path) if n.startswith(".out.diffract-tmp-")]
    assert len(leftovers) == 1 and not (tmp_path / "out").exists()  # what the issue saw: a hidden temp folder
    assert main(["rewind", "apply", str(plan), "--out", str(tmp_path / "out")]) == 0
    assert entries(tmp_path) == ["B", "C", "list.json", "out"]
    assert main(["rewind", "apply", str(plan), "--out", str(tmp_path / "clean")]) == 0
    by_name = lambda d: {Path(k).name: v for k, v in sha_tree(d).items()}  # noqa: E731
    assert by_name(tmp_path / "out") == by_name(tmp_path / "clean")  # whole: the same bytes as an undisturbed run


KILL_BETWEEN_RENAMES = """
import os
_real_rename = os.rename
def _rename(src, dst):
    if ".diffract-tmp-" in os.fspath(src) and not os.path.basename(os.fspath(dst)).startswith("."):
        os.kill(os.getpid(), 9)  # the old OUT is aside, the new one not yet in place
    return _real_rename(src, dst)
os.rename = _rename
"""


def test_kill_between_the_swap_renames_never_loses_out(tmp_path, pair, plan, capsys):
    b, c = pair
    out = tmp_path / "out"
    assert main(["rewind", "apply", str(plan), "--out", str(out)]) == 0
    old = sha_tree(out)
    proc = run_child(cli_code(["rewind", "apply", plan, "--out", out, "--force"], KILL_BETWEEN_RENAMES))
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # the state the issue saw: OUT missing, the old copy hidden
    assert [n for n in entries(tmp_path) if n.startswith(".out.diffract-old-")]
    rc, err = run_cli(["rewind", "apply", str(plan), "--out", str(out)], capsys)
    assert rc == 1 and "already exists" in err  # the next run put the old OUT back first
    assert sha_tree(out) == old  # whole
    assert entries(tmp_path) == ["B", "C", "list.json", "out"]  # no aside, no temp left
    assert main(["rewind", "apply", str(plan), "--out", str(out), "--force"]) == 0


def test_an_aside_of_a_live_or_foreign_process_is_not_restored(tmp_path):
    host = atomic.host_tag()
    live = tmp_path / f".out.diffract-old-{host}-{os.getpid()}-aaaa"
    foreign = tmp_path / f".out.diffract-old-otherhost-{dead_pid()}-bbbb"
    for d in (live, foreign):
        d.mkdir()
    writer.recover_interrupted(tmp_path / "out")
    assert not (tmp_path / "out").exists() and live.is_dir() and foreign.is_dir()


def test_swap_failure_puts_the_old_output_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    writer.write_checkpoint_streaming(out, [("w", torch.ones(2))])
    old = sha_tree(out)
    real = os.rename

    def failing(src, dst):
        if ".diffract-tmp-" in str(src) and Path(dst) == out:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(writer.os, "rename", failing)
    with pytest.raises(DiffractError, match="No space left on device"):
        writer.write_checkpoint_streaming(out, [("w", torch.zeros(2))], force=True)
    monkeypatch.undo()
    assert sha_tree(out) == old and entries(tmp_path) == ["out"]


# --------------------------------------------------------------------------------------------------
# item 14c: a config without model_type gets the inferred one, and transformers loads the output
# --------------------------------------------------------------------------------------------------


def _assert_loads_only_with_model_type(out: Path) -> None:
    """AutoModel loads `out`; the same folder without the added key would not (so the test can fail)."""
    from transformers import AutoConfig, AutoModel

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert"
    model = AutoModel.from_pretrained(str(out))
    assert type(model).__name__ == "BertModel"
    plain = out.parent / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "model_type"}))
    with pytest.raises(ValueError):
        AutoConfig.from_pretrained(str(plain))


def test_rxnfp_rewind_output_loads_in_transformers(tmp_path, rxnfp_dirs, capsys):
    base, target = rxnfp_dirs["bert_pretrained"], rxnfp_dirs["bert_ft"]
    assert "model_type" not in json.loads((target / "config.json").read_text())
    before = sha_tree(base, target)
    lst, out = tmp_path / "r.json", tmp_path / "rewound"
    assert main(["rewind", "plan", str(base), str(target), "--fraction", "0.25", "--out", str(lst)]) == 0
    capsys.readouterr()
    assert main(["rewind", "apply", str(lst), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert f"added model_type 'bert' to {out / 'config.json'}" in stdout
    _assert_loads_only_with_model_type(out)
    assert sha_tree(base, target) == before


def test_rxnfp_interpolate_output_loads_in_transformers(tmp_path, rxnfp_dirs, capsys):
    a, b = rxnfp_dirs["bert_pretrained"], rxnfp_dirs["bert_ft"]
    out = tmp_path / "mid"
    capsys.readouterr()
    assert main(["interpolate", str(a), str(b), "--alpha", "0.5", "--out", str(out)]) == 0
    assert f"added model_type 'bert' to {out / 'config.json'}" in capsys.readouterr().out
    _assert_loads_only_with_model_type(out)


def test_config_with_model_type_is_copied_byte_for_byte(tmp_path, pair, plan, capsys):
    b, c = pair
    capsys.readouterr()
    assert main(["rewind", "apply", str(plan), "--out", str(tmp_path / "out")]) == 0
    assert "added" not in capsys.readouterr().out
    assert (tmp_path / "out" / "config.json").read_bytes() == (c / "config.json").read_bytes()
