"""Hugging Face repo ids (`org/name[@revision]`) and hub-cache folders as checkpoint arguments (issue 12 item 2).

The hub cache is laid out by the test exactly as huggingface_hub lays it out — `models--org--name/blobs/<sha>`,
`snapshots/<commit>/<file> -> ../../blobs/<sha>` relative links, `refs/<name>` holding the commit — under a
temporary HF_HUB_CACHE with HF_HUB_OFFLINE=1, with real tiny safetensors Llama checkpoints. The online error
paths (gated, no such repo, unreachable hub) run against a local fake hub endpoint: this machine has no network.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import llama_checkpoint, write_safetensors

from analysis.io.checkpoint import open_checkpoint
from analysis.io.hub import hub_label, parse_repo_spec, resolve_checkpoint_arg
from diffract_tui.cli import main

REPO = "org/tiny"
MAIN_COMMIT = "a" * 39 + "1"
STEP_COMMIT = "b" * 39 + "2"
SEEDS = {MAIN_COMMIT: 0, STEP_COMMIT: 1}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _add_blob(repo_dir: Path, snapshot: Path, name: str, data: bytes) -> None:
    """Store `data` as blobs/<sha256> and link snapshots/<commit>/<name> to it relatively, as the hub does."""
    sha = hashlib.sha256(data).hexdigest()
    blob = repo_dir / "blobs" / sha
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = snapshot / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))


def make_hub_repo(cache: Path, repo: str, commits: dict[str, int], refs: dict[str, str],
                  weights: bool = True) -> Path:
    """A `models--org--name` folder in `cache`: one snapshot per commit (a tiny Llama of that seed; config only
    when `weights` is False) and `refs/<name>` files holding commits (no newline, as the hub writes them)."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    scratch = cache.parent / "scratch"
    for commit, seed in commits.items():
        config, tensors = llama_checkpoint(layers=2, hidden=32, heads=4, kv_heads=2, intermediate=48, vocab=40,
                                           seed=seed)
        snapshot = repo_dir / "snapshots" / commit
        snapshot.mkdir(parents=True)
        _add_blob(repo_dir, snapshot, "config.json", json.dumps(config).encode())
        if weights:
            data = write_safetensors(scratch / f"{commit}.safetensors", tensors).read_bytes()
            _add_blob(repo_dir, snapshot, "model.safetensors", data)
    for name, commit in refs.items():
        ref = repo_dir / "refs" / name
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
    return repo_dir


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary HF_HUB_CACHE holding org/tiny (main, step1000), offline; huggingface_hub's constants follow."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    make_hub_repo(cache, REPO, SEEDS, {"main": MAIN_COMMIT, "step1000": STEP_COMMIT})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read at import: set as a fresh process would
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    return cache


def _expected(seed: int) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in llama_checkpoint(layers=2, hidden=32, heads=4, kv_heads=2,
                                                                      intermediate=48, vocab=40, seed=seed)[1].items()}


def _snapshot(cache: Path, commit: str) -> Path:
    return cache / "models--org--tiny" / "snapshots" / commit


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The single stderr line of a failed command (asserting it is one line)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("diffract-tui: error: ")
    return err[0]


# ---- resolution and labels ----------------------------------------------------------------------------------------

def test_repo_id_opens_the_main_snapshot_with_the_repo_id_label(hub_cache: Path) -> None:
    with open_checkpoint(REPO) as ck:
        assert ck.path == _snapshot(hub_cache, MAIN_COMMIT).resolve()
        assert ck.label == REPO
        assert ck.config["num_hidden_layers"] == 2
        exp = _expected(0)
        assert set(ck.keys()) == set(exp)
        assert all(torch.equal(ck.tensor(k), exp[k]) for k in exp)


@pytest.mark.parametrize("spec, commit, label", [
    ("org/tiny@step1000", STEP_COMMIT, "org/tiny@step1000"),
    ("org/tiny@main", MAIN_COMMIT, "org/tiny"),
    (f"org/tiny@{STEP_COMMIT}", STEP_COMMIT, f"org/tiny@{STEP_COMMIT}"),
])
def test_revision_opens_that_snapshot_and_labels_it(hub_cache: Path, spec: str, commit: str, label: str) -> None:
    with open_checkpoint(spec) as ck:
        assert ck.path == _snapshot(hub_cache, commit).resolve()
        assert ck.label == label
        exp = _expected(SEEDS[commit])
        assert torch.equal(ck.tensor("layers.1.self_attn.q_proj.weight"), exp["layers.1.self_attn.q_proj.weight"])


def test_repo_folder_opens_refs_main_with_the_repo_id_label(hub_cache: Path) -> None:
    with open_checkpoint(hub_cache / "models--org--tiny") as ck:
        assert ck.path == _snapshot(hub_cache, MAIN_COMMIT).resolve()
        assert ck.label == REPO


@pytest.mark.parametrize("commit, label", [(MAIN_COMMIT, "org/tiny"), (STEP_COMMIT, "org/tiny@step1000")])
def test_snapshot_folder_opens_with_the_repo_id_label(hub_cache: Path, commit: str, label: str) -> None:
    with open_checkpoint(_snapshot(hub_cache, commit)) as ck:
        assert ck.label == label
        assert ck.path == _snapshot(hub_cache, commit).resolve()
        assert torch.equal(ck.tensor("norm.weight"), _expected(SEEDS[commit])["norm.weight"])


def test_file_in_a_snapshot_opens_with_its_config_and_label(hub_cache: Path) -> None:
    link = _snapshot(hub_cache, STEP_COMMIT) / "model.safetensors"
    with open_checkpoint(link) as ck:
        assert ck.label == "org/tiny@step1000" and ck.path == link  # not the suffix-less blob it links to
        assert ck.config["num_hidden_layers"] == 2 and [p.name for p in ck.aux_files] == ["config.json"]
        assert torch.equal(ck.tensor("norm.weight"), _expected(1)["norm.weight"])


def test_snapshot_no_ref_names_is_labelled_by_its_short_commit(hub_cache: Path) -> None:
    (hub_cache / "models--org--tiny" / "refs" / "step1000").unlink()
    assert hub_label(_snapshot(hub_cache, STEP_COMMIT)) == f"org/tiny@{STEP_COMMIT[:12]}"
    assert hub_label(_snapshot(hub_cache, STEP_COMMIT) / "model.safetensors") == f"org/tiny@{STEP_COMMIT[:12]}"


def test_paths_outside_a_hub_cache_have_no_hub_label(tmp_path: Path) -> None:
    (tmp_path / "models--x" / "y").mkdir(parents=True)  # named like one, but no snapshots/ folder
    assert hub_label(tmp_path) is None and hub_label(tmp_path / "models--x" / "y") is None


def test_an_existing_path_wins_over_a_repo_id(hub_cache: Path, tmp_path: Path) -> None:
    config, tensors = llama_checkpoint(layers=1, hidden=32, heads=4, kv_heads=2, intermediate=48, vocab=40, seed=7)
    local = tmp_path / "org" / "tiny"
    write_safetensors(local / "model.safetensors", tensors)
    (local / "config.json").write_text(json.dumps(config))
    assert resolve_checkpoint_arg(REPO) == (Path(REPO), None)
    with open_checkpoint(REPO) as ck:
        assert ck.path == local.resolve() and ck.label == "tiny" and ck.config["num_hidden_layers"] == 1


@pytest.mark.parametrize("arg, parsed", [
    ("org/name", ("org/name", None)), ("org/name@step1000", ("org/name", "step1000")),
    ("HuggingFaceTB/SmolLM2-135M", ("HuggingFaceTB/SmolLM2-135M", None)),
    ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
    ("name", None), ("/abs/path", None), ("a/b/c", None), ("org/na--me", None), ("./org/name", None),
])
def test_repo_spec_parsing(arg: str, parsed: tuple | None) -> None:
    assert parse_repo_spec(arg) == parsed


# ---- commands -------------------------------------------------------------------------------------------------------

def test_info_shows_the_repo_id_labels(hub_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", REPO, "org/tiny@step1000", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [c["label"] for c in data["checkpoints"]] == [REPO, "org/tiny@step1000"]
    assert data["checkpoints"][0]["layers"] == 2
    assert main(["info", str(_snapshot(hub_cache, STEP_COMMIT))]) == 0
    assert "org/tiny@step1000" in capsys.readouterr().out


def test_scan_labels_rows_with_the_repo_id(hub_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "scan.json"
    assert main(["scan", REPO, "org/tiny@step1000", "--out", str(out), "--quiet", "--no-cache"]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"] if isinstance(data, dict) else data
    assert {r["checkpoint"] for r in rows} == {REPO, "org/tiny@step1000"}


def test_hub_home_and_offline_are_read_from_the_environment(tmp_path: Path) -> None:
    """A fresh process: HF_HOME=<h> means the cache <h>/hub (huggingface_hub's rule), HF_HUB_OFFLINE=1 no network."""
    home = tmp_path / "hf-home"
    make_hub_repo(home / "hub", REPO, SEEDS, {"main": MAIN_COMMIT, "step1000": STEP_COMMIT})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    code = "import sys; from diffract_tui.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, "info", "org/tiny@step1000", "--json"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["checkpoints"][0]["label"] == "org/tiny@step1000"
    done = subprocess.run([sys.executable, "-c", code, "info", "org/other"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and str(home / "hub") in done.stderr and "HF_HUB_OFFLINE is set" in done.stderr


# ---- errors: one line, exit 1 ----------------------------------------------------------------------------------------

def test_missing_repo_offline_is_one_line(hub_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "org/absent"]) == 1
    line = _error_line(capsys)
    assert "org/absent: no such file or folder, and the Hugging Face repo org/absent is not in the hub cache" in line
    assert str(hub_cache) in line and "(HF_HUB_OFFLINE is set)" in line
    assert "run `hf download org/absent` on a machine with network" in line and "unset HF_HUB_OFFLINE" in line


def test_missing_revision_offline_names_the_cached_refs(hub_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scan", "org/tiny@step9", "--out", "t.csv"]) == 1
    line = _error_line(capsys)
    assert "revision step9 of org/tiny is not in the hub cache" in line and "(cached refs: main, step1000)" in line
    assert "`hf download org/tiny --revision step9`" in line
    assert not Path("t.csv").exists()


def test_cached_snapshot_without_weights_offline(hub_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_hub_repo(hub_cache, "org/configonly", {MAIN_COMMIT: 0}, {"main": MAIN_COMMIT}, weights=False)
    assert main(["delta", "org/configonly", REPO, "--out", "d.csv"]) == 1
    line = _error_line(capsys)
    assert "the hub cache holds org/configonly without weight files (HF_HUB_OFFLINE is set)" in line
    assert "hf download org/configonly" in line


def test_repo_folder_without_refs_main(hub_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (hub_cache / "models--org--tiny" / "refs" / "main").unlink()
    assert main(["info", str(hub_cache / "models--org--tiny")]) == 1
    assert "hub-cache folder has no snapshot for refs/main" in _error_line(capsys)


SERVED_COMMIT = "c" * 39 + "3"
SERVED: dict[str, bytes] = {}  # org/served's files at SERVED_COMMIT, filled by the `online` fixture


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """The hub API as huggingface_hub calls it: org/served is a real repo (revision info, tree listing, file
    downloads); every other repo answers with the error its name asks for (X-Error-Code, as the real hub does)."""

    def _send(self, code: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(code)
        for k, v in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    def _served(self) -> bool:
        """Answer a call about org/served; False when the call is about another repo."""
        path = self.path.split("?")[0]
        if path == "/api/models/org/served/revision/main":
            body = json.dumps({"id": "org/served", "sha": SERVED_COMMIT,
                               "siblings": [{"rfilename": n} for n in SERVED]}).encode()
        elif path == f"/api/models/org/served/tree/{SERVED_COMMIT}":
            body = json.dumps([{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                               for n, d in SERVED.items()]).encode()
        elif path.startswith(f"/org/served/resolve/{SERVED_COMMIT}/") and path.rsplit("/", 1)[1] in SERVED:
            data = SERVED[path.rsplit("/", 1)[1]]
            if self.command == "GET":
                self.server.downloaded.append(path.rsplit("/", 1)[1])  # type: ignore[attr-defined]
            self._send(200, data, {"X-Repo-Commit": SERVED_COMMIT, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                                   "Content-Type": "application/octet-stream"})
            return True
        else:
            return False
        self._send(200, body, {"Content-Type": "application/json", "X-Repo-Commit": SERVED_COMMIT})
        return True

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if "/org/served/" in self.path and self._served():
            return
        code, error = (403, "GatedRepo") if "gated" in self.path else (404, "RepoNotFound")
        if "badrev" in self.path:
            code, error = 404, "RevisionNotFound"
        body = json.dumps({"error": error}).encode()
        self.send_response(code)
        self.send_header("X-Error-Code", error)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def online(hub_cache: Path, monkeypatch: pytest.MonkeyPatch):
    """Downloads allowed (HF_HUB_OFFLINE unset) against a local fake hub endpoint."""
    from huggingface_hub import constants

    config, tensors = llama_checkpoint(layers=2, hidden=32, heads=4, kv_heads=2, intermediate=48, vocab=40, seed=5)
    weights = write_safetensors(hub_cache.parent / "served.safetensors", tensors).read_bytes()
    SERVED.clear()
    SERVED.update({"config.json": json.dumps(config).encode(), "model.safetensors": weights,
                   "pytorch_model.bin": b"not fetched: safetensors are", "README.md": b"# served"})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    server.downloaded = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)  # both read HF_ENDPOINT at import, as a fresh process would
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_TOKEN", "")
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("spec, fragments", [
    ("org/gated-model", ["the Hugging Face repo org/gated-model is gated", "accept its terms on "
                         "https://huggingface.co/org/gated-model", "HF_TOKEN"]),
    ("org/absent", ["no such file or folder, and no Hugging Face repo org/absent (or it is private)",
                    "check the path or the repo id"]),
    ("org/model@badrev", ["revision badrev does not exist in the Hugging Face repo org/model"]),
])
def test_online_hub_errors_are_one_line(online, hub_cache: Path, capsys: pytest.CaptureFixture[str],
                                        spec: str, fragments: list[str]) -> None:
    assert main(["info", spec]) == 1
    line = _error_line(capsys)
    assert all(f in line for f in fragments), line
    assert not (hub_cache / ("models--" + spec.split("@")[0].replace("/", "--")) / "snapshots").exists()


def test_repo_id_missing_from_the_cache_is_downloaded_when_allowed(online, hub_cache: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "org/served", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["checkpoints"][0]["label"] == "org/served"
    snapshot = hub_cache / "models--org--served" / "snapshots" / SERVED_COMMIT
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "model.safetensors"]  # weights in one format
    assert (hub_cache / "models--org--served" / "refs" / "main").read_text() == SERVED_COMMIT
    assert hashlib.sha256((snapshot / "model.safetensors").read_bytes()).digest() == hashlib.sha256(
        SERVED["model.safetensors"]).digest()
    assert sorted(online.downloaded) == ["config.json", "model.safetensors"]
    assert "Fetching 2 files" in captured.err  # the hub's progress bar, on stderr
    online.shutdown()
    online.server_close()  # the second open needs no hub: the cache serves it
    with open_checkpoint("org/served") as ck:
        assert ck.path == snapshot.resolve()
        assert torch.equal(ck.tensor("norm.weight"), _expected(5)["norm.weight"])


def test_unreachable_hub_is_one_line(online, hub_cache: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from huggingface_hub import constants

    online.shutdown()
    online.server_close()  # nothing listens there any more: a connection error, as with no network
    assert main(["info", "org/elsewhere"]) == 1
    line = _error_line(capsys)
    assert "cannot reach the Hugging Face hub to download org/elsewhere, and it is not in the hub cache" in line
    assert "check the network, or run `hf download org/elsewhere` on a machine with network" in line
    assert "HF_HUB_OFFLINE" not in line  # it is not set: no advice to unset it
    assert constants.HF_HUB_OFFLINE is False


def test_cached_repo_opens_online_without_asking_the_hub(online, hub_cache: Path) -> None:
    online.shutdown()
    online.server_close()
    with open_checkpoint("org/tiny@step1000") as ck:
        assert ck.label == "org/tiny@step1000"


# ---- the output guard through the links ---------------------------------------------------------------------------

def test_rewind_apply_refuses_the_blob_folder(hub_cache: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "plan.json"
    assert main(["rewind", "plan", REPO, "org/tiny@step1000", "--out", str(plan), "--fraction", "0.25"]) == 0
    capsys.readouterr()
    blobs = hub_cache / "models--org--tiny" / "blobs"
    before = {p.name: _sha256(p) for p in blobs.iterdir()}
    assert main(["rewind", "apply", str(plan), "--out", str(blobs), "--force"]) == 1
    line = _error_line(capsys)
    assert f"{blobs}: the output contains the input {blobs}/" in line and "choose a path for --out" in line
    assert {p.name: _sha256(p) for p in blobs.iterdir()} == before


def test_explorer_session_opens_repo_ids_with_their_labels(hub_cache: Path) -> None:
    from analysis.run.session import ExplorerSession, parse_labels

    specs = [REPO, "org/tiny@step1000"]
    session = ExplorerSession.open(specs, labels=parse_labels([], specs), device="cpu",
                                   cache_dir=hub_cache.parent / "spectra")
    try:
        assert [c.label for c in session.checkpoints] == specs
        assert session.layout.num_layers == 2
    finally:
        session.close()


def test_interpolate_refuses_writing_into_the_blob_folder(hub_cache: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    blobs = hub_cache / "models--org--tiny" / "blobs"
    before = {p.name: _sha256(p) for p in blobs.iterdir()}
    assert main(["interpolate", REPO, "org/tiny@step1000", "--alpha", "0.5", "--out", str(blobs), "--force"]) == 1
    line = _error_line(capsys)
    assert f"{blobs}: the output contains the input {blobs}/" in line
    assert {p.name: _sha256(p) for p in blobs.iterdir()} == before
