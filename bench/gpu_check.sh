#!/usr/bin/env bash
# One-call GPU check (H100/H200): build the extension for the card, run the GPU tests, run every benchmark
# in bench/, and write the tables with card, versions, date and command into bench/RESULTS.md (and $OUT).
#
#   bash bench/gpu_check.sh                      # everything (about 6-8 minutes on an H200)
#   GPU_CHECK_PARTS="tests bench" bash bench/gpu_check.sh
#
# Missing Python packages can travel as wheels in .whl/ (installed into /tmp/site first).
# On a machine without a GPU, GPU_CHECK_DRY=1 runs the same steps on the CPU (a check of the script).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
PARTS="${GPU_CHECK_PARTS:-build tests bench}"
LOG="$OUT/gpu_check.log"
: > "$LOG"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 FAMEVIL_FAST_BACKEND=""
status=0

say() { echo "== $*" | tee -a "$LOG"; }

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  say "installing carried wheels"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >>"$LOG" 2>&1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi

if [ "${GPU_CHECK_DRY:-0}" != "1" ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { say "no CUDA device"; exit 2; }
fi

if [[ " $PARTS " == *" build "* ]]; then
  say "building famevil_fast._C (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0})"
  start=$(date +%s)
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || { say "build FAILED"; status=1; }
  say "build took $(( $(date +%s) - start )) s"
  "$PY" -m famevil_fast info 2>&1 | tee -a "$LOG"
fi

if [[ " $PARTS " == *" tests "* ]]; then
  say "GPU tests"
  "$PY" -m pytest -q -p no:cacheprovider -k "gpu or cuda" \
    tests/test_adapter_op.py tests/test_cross_attention_op.py tests/test_contrastive_cuda.py \
    tests/test_eval_topk.py tests/test_eval_xmr.py 2>&1 | tee "$OUT/gpu_tests.txt" | tail -n 25 | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if [[ " $PARTS " == *" bench "* ]]; then
  say "benchmarks"
  "$PY" -m pytest -q -s -p no:cacheprovider --benchmark-disable -k "report or bench" bench \
    2>&1 | tee "$OUT/bench.txt" | tail -n 5 | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

"$PY" - "$OUT" "$status" "$PARTS" <<'PYEOF'
import datetime, pathlib, subprocess, sys
import torch
out, status, parts = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run)"
section = [
    f"## {datetime.date.today().isoformat()}: {card}",
    "",
    f"torch {torch.__version__}, triton {triton_version}, CUDA {torch.version.cuda}; "
    f"command: `bash bench/gpu_check.sh` (parts: {parts}); exit status {status}",
    "",
]
for name, title in (("gpu_tests.txt", "GPU tests"), ("bench.txt", "Benchmark tables")):
    path = out / name
    if path.exists():
        text = path.read_text()
        keep = [l for l in text.splitlines() if l.strip() and not l.startswith(("bench/", "tests/"))]
        section += [f"### {title}", "", "```", *keep[-400:], "```", ""]
results = pathlib.Path("bench/RESULTS.md") if torch.cuda.is_available() else out / "RESULTS.md"
header = "# GPU results\n\nEvery figure names its card; ratios compare configurations measured in the same run.\n\n"
previous = results.read_text() if results.exists() else header
results.write_text(previous.rstrip() + "\n\n" + "\n".join(section) + "\n")
(out / "RESULTS_section.md").write_text("\n".join(section) + "\n")
print(f"wrote {results} and {out / 'RESULTS_section.md'}")
PYEOF
say "done (status $status)"
exit "$status"
