"""benchmarks/gpu_bench.py (run by benchmarks/gpu_check.sh on the GPU machine), proven on the CPU: the
`--cpu-smoke` run records every stage without an error, and its sweep point's loss is the one the project's
own `rewind apply` + `Evaluator.loss` give for the same candidate. (That the modules it loads import without
the app's packages is tests/test_metric_sets.py::test_engine_imports_and_scans_without_the_app_packages.)"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "gpu_bench.py"
STAGES = {"generate", "scan_fit_gram64", "sweep", "rescan_fit_gram64_cached", "delta_fit_cold", "delta_fit_cached",
          "scan_fit_gram32", "scan_all_gram64"}


def _bench():  # noqa: ANN202
    """The bench script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


@pytest.mark.slow  # ~8 s in the suite (transformers imported already), 30 s+ alone on a loaded core
def test_cpu_smoke_records_every_stage_and_the_sweep_point_loss_of_rewind_apply(tmp_path):
    from analysis.edit.rewind import apply_rewind, plan_rewind
    from analysis.eval.evaluator import Evaluator
    from analysis.eval.loss import load_model
    from analysis.eval.patch import rewind_description
    from analysis.io.checkpoint import open_checkpoint

    bench = _bench()
    out = tmp_path / "figures.json"
    rc = bench.main(["--cpu-smoke", "--out", str(out), "--workdir", str(tmp_path), "--keep"])
    doc = json.loads(out.read_text())
    stages = doc["stages"]
    assert set(stages) == STAGES
    assert not [n for n, s in stages.items() if "error" in s or "skipped" in s], stages
    assert rc == 0
    sw = stages["sweep"]
    for k in ("seconds", "first_call_s", "patch_restore_s", "loss_only_s"):
        assert math.isfinite(sw[k]) and sw[k] > 0, (k, sw[k])
    assert (sw["windows"], sw["tokens"], sw["pattern"], sw["heads"]) == (8, 64, "top", 1)
    assert sw["loss_candidate_repeats_equal"] is True

    # the oracle: the same candidate written by `rewind apply`, loaded fresh and evaluated on the same ids
    work = Path(doc["workdir"])
    target, base = open_checkpoint(work / "7b"), open_checkpoint(work / "7b_sweep_base")
    assert target.fingerprint != base.fingerprint
    rl = plan_rewind(base, target, pattern="top", fraction=sw["fraction"])
    assert rewind_description(rl)["heads"] == sw["heads_rewound"]
    apply_rewind(rl, tmp_path / "rewound")
    ids = bench.token_windows(target.config["vocab_size"], sw["windows"], sw["tokens"], sw["ids_seed"])
    losses = {}
    for name, folder in (("candidate", tmp_path / "rewound"), ("target", work / "7b")):
        lm = load_model(folder, device=torch.device("cpu"), dtype=torch.float32)
        et = bench.eval_text(lm, ids, sw["tokens"], sw["windows"], tmp_path)
        losses[name] = Evaluator(lm, open_checkpoint(folder).fingerprint).loss(et).loss
    assert sw["loss_candidate"] == losses["candidate"]
    assert sw["loss_target"] == losses["target"]
    assert sw["loss_candidate"] != sw["loss_target"]  # the rewound head really differs in the base
