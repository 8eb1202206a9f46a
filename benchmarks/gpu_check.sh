#!/usr/bin/env bash
# The GPU check (issue 13 item 5), under 8 minutes on one H200: the CUDA tests, then the scan, sweep-point
# and delta benchmarks on a 7B-shaped generated checkpoint (benchmarks/gpu_bench.py), figures to one JSON file.
#
#   benchmarks/gpu_check.sh [FIGURES.json] [--cpu-smoke]
#
# FIGURES.json defaults to $OUT/gpu_figures.json (the device runner's output folder), else
# benchmarks/out/gpu_figures.json. --cpu-smoke runs everything on a tiny model on the CPU (the CUDA tests
# then skip): it proves the script end to end on a machine without a GPU.
# Engine only: the GPU machine has torch, numpy, scipy, safetensors, pytest, typer, rich … but no textual,
# plotext, platformdirs, gguf or ray, so nothing here imports the app; the cache folder is passed explicitly.
# The sweep stage builds the model with transformers (there) and imports nothing else.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
out="${OUT:+$OUT/gpu_figures.json}"
out="${out:-benchmarks/out/gpu_figures.json}"
smoke=()
for arg in "$@"; do
    case "$arg" in
        --cpu-smoke) smoke=(--cpu-smoke) ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        -*) echo "gpu_check.sh: error: unknown option $arg — use [FIGURES.json] [--cpu-smoke]" >&2; exit 2 ;;
        *) out="$arg" ;;
    esac
done
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export DIFFRACT_TUI_CACHE_DIR="${DIFFRACT_TUI_CACHE_DIR:-$(mktemp -d)/cache}"
mkdir -p "$(dirname "$out")"
tests_json="${out%.json}.tests.txt"
start=$(date +%s)

echo "== engine import without the app's packages" >&2
"$PY" -c "import analysis.run.scan, analysis.deltas.delta_table, analysis.io.checkpoint, analysis.eval.sweep, \
analysis.eval.loss, analysis.edit.rewind, analysis.tiny_models; print('engine imports')" \
    || { echo "gpu_check.sh: error: the engine does not import here" >&2; exit 1; }
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

echo "== CUDA tests" >&2
# tests/test_cuda_device.py: GPU-vs-CPU numbers (skipped without CUDA); tests/test_backend.py: device policy
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -p no:textual-snapshot tests/test_cuda_device.py tests/test_backend.py -rs \
    > "$tests_json" 2>&1
tests_rc=$?
tail -n 25 "$tests_json" >&2

echo "== benchmarks" >&2
left=$(( 450 - ($(date +%s) - start) ))      # 7.5 min for the whole script, whatever the tests took
# SIGTERM at the limit (the bench removes its ~21 GB of generated models on the way out), SIGKILL 15 s later
timeout -k 15 $(( left > 30 ? left : 30 )) "$PY" benchmarks/gpu_bench.py --out "$out" --budget $(( left - 20 > 10 ? left - 20 : 10 )) \
    "${smoke[@]}"
bench_rc=$?

"$PY" - "$out" "$tests_json" "$tests_rc" "$bench_rc" "$(( $(date +%s) - start ))" <<'EOF'
import json, sys
out, tests, tests_rc, bench_rc, seconds = sys.argv[1:]
try:
    doc = json.load(open(out))
except (OSError, ValueError):
    doc = {"stages": {}}
lines = open(tests).read().strip().splitlines()
doc["tests"] = {"rc": int(tests_rc), "summary": lines[-1] if lines else "", "skipped": [l for l in lines if "SKIP" in l][:5]}
doc["bench_rc"], doc["total_seconds"] = int(bench_rc), int(seconds)
json.dump(doc, open(out, "w"), indent=1)
print(json.dumps({"tests": doc["tests"]["summary"], **{k: v.get("seconds", v) for k, v in doc["stages"].items()}},
                 indent=1))
EOF
echo "figures: $out" >&2
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
