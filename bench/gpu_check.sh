#!/usr/bin/env bash
# One-call GPU check (H100/H200): build the extension for the card, run the GPU tests, run every benchmark
# in bench/, and write the tables with card, versions, date and command into bench/RESULTS.md (and $OUT).
#
#   bash bench/gpu_check.sh                      # everything (about 7 minutes on an H200)
#   GPU_CHECK_PARTS="tests bench" bash bench/gpu_check.sh
#   GPU_CHECK_BENCH="train_step caption" bash bench/gpu_check.sh   # some benchmarks only
#   GPU_CHECK_PARTS="build demo" bash bench/gpu_check.sh   # the README's main job, short
#   GPU_CHECK_BENCH=tiles TILE_SWEEP=split bash bench/gpu_check.sh   # some tile-sweep families only
#
# Missing Python packages can travel as wheels in .whl/ (installed into /tmp/site first); DALI, too large
# for one call, travels in parts with bench/carry_dali.sh; the run-time packages the demo needs and the
# cards lack (ftfy, open_clip's vocabulary, pycocoevalcap) in .carry/site, made by bench/carry_runtime.sh.
# On a machine without a GPU, GPU_CHECK_DRY=1 runs the same steps on the CPU (a check of the script); its
# build compiles into /tmp/gpu_check_dry_build and installs nothing, and its results go to $OUT only.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
# the caller's settings that shape the run (read before the script exports its own), for the command line
# the results name
SETTINGS=$(env | grep -E '^(GPU_CHECK_[A-Z_]+|GPU_SESSION_BUDGET|TRAIN_STEP_[A-Z_]+|BENCH_[A-Z_]+|TILE_SWEEP|TORCH_CUDA_ARCH_LIST|PYTHON)=' \
  | grep -v '^GPU_CHECK_DRY=0$' | sort | sed -E "s/^([A-Z_]+)=(.*)$/\1='\2'/" | tr '\n' ' ')
OUT="${OUT:-bench/out}"
PARTS_DIR="${GPU_CHECK_PARTS_DIR:-/tmp/gpu_check_parts}"  # full outputs; packed into $OUT/parts.tar.gz
rm -rf "$PARTS_DIR"; mkdir -p "$OUT" "$PARTS_DIR"  # this run's outputs only
PY="${PYTHON:-python3}"
PARTS="${GPU_CHECK_PARTS:-build tests bench}"
PARTS="${PARTS//,/ }"
# GPU_CHECK_BENCH picks benchmarks by name and runs them in the order given (default: all but "tiles", the
# launch-configuration sweep behind kernels/configs.py, "train_compiled", the torch.compile baselines of
# the frozen ITC step, about a minute of compiling per configuration, and "contrastive_huge", the Triton loss
# at 1,048,576 rows, about 12 s a run, and "caption_compiled", the compiled decoding steps beside graph
# replay of the plain one (BENCH_CAPTION_CASES, BENCH_CAPTION_METHODS: see bench_caption.py), and
# "train_levers", the training step's untimed levers (bf16 stream, QuickGELU kernels, master weights) beside
# the graphed plain steps at 64:all4 and 64:itc (TRAIN_STEP_CELLS and TRAIN_STEP_CONFIGS override), and
# "train_levers_check", the first step's losses and gradients of those levers against the faithful step's
# (the four-task step at batch 64); in this order)
BENCHES="${GPU_CHECK_BENCH:-contrastive adapter adapter_dtypes activation xattn train_step caption retrieval imtl data}"
BENCHES="${BENCHES//,/ }"
KNOWN_PARTS="build tests demo bench"
KNOWN_BENCHES="contrastive contrastive_huge adapter adapter_dtypes activation xattn train_step train_compiled train_levers train_levers_check caption caption_compiled retrieval imtl data tiles"
TRAIN_LEVERS="plain_graphed,plain_frozen_graphed,fast,fast_bf16_stream_quick_gelu,fast_master_weights"
TRAIN_LEVERS+=",fast_master_weights_torch_ops,fast_frozen_bf16_stream_quick_gelu,fast_frozen_master_weights"
LOG="$OUT/gpu_check.log"
: > "$LOG"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 FAMEVIL_FAST_BACKEND=""
status=0

say() { echo "== $*" | tee -a "$LOG"; }

# a misspelt name would otherwise cost the call: refused before anything runs
for p in $PARTS; do
  [[ " $KNOWN_PARTS " == *" $p "* ]] || { say "unknown part '$p' in GPU_CHECK_PARTS (known: $KNOWN_PARTS)"; exit 2; }
done
if [[ " $PARTS " == *" bench "* ]]; then
  for b in $BENCHES; do
    [[ " $KNOWN_BENCHES " == *" $b "* ]] || { say "unknown benchmark '$b' in GPU_CHECK_BENCH (known: $KNOWN_BENCHES)"; exit 2; }
  done
fi

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  say "installing carried wheels"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >>"$LOG" 2>&1
fi
# /tmp/site also holds what bench/carry_dali.sh installed in the calls before this one
[ -d /tmp/site ] && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
[ -d .carry/site ] && export PYTHONPATH="$PWD/.carry/site:${PYTHONPATH:-}"

if [ "${GPU_CHECK_DRY:-0}" != "1" ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { say "no CUDA device"; exit 2; }
fi

# Every part runs under its own time limit, cut to what is left of GPU_CHECK_BUDGET seconds (default 480,
# counted from the start of the script, less RESERVE for writing the results), in order of importance, so
# that a slow part cannot starve the rest and the outputs under $OUT stay usable.
BUDGET="${GPU_CHECK_BUDGET:-480}"
RESERVE=15
limit() {  # limit MAX: seconds the next part may take (0 when too little is left)
  local left=$(( BUDGET - RESERVE - ($(date +%s) - T0) ))
  local t=$(( $1 < left ? $1 : left ))
  [ "$t" -ge 20 ] && echo "$t" || echo 0
}
part() {  # part NAME MAX FILE COMMAND...: run under timeout, output to $OUT/FILE, tail into the log
  local name=$1 max=$2 file=$3; shift 3
  local t; t=$(limit "$max")
  if [ "$t" = 0 ]; then say "$name: skipped (budget spent)"; return; fi
  say "$name (limit $t s)"
  local start; start=$(date +%s)
  timeout -k 5 "$t" "$@" > "$PARTS_DIR/$file" 2>&1
  local rc=$?
  tail -n 30 "$PARTS_DIR/$file" | tee -a "$LOG"
  say "$name: exit $rc after $(( $(date +%s) - start )) s"
  [ "$rc" = 0 ] || status=1
  tar -czf "$OUT/parts.tar.gz" -C "$PARTS_DIR" .  # what is done so far comes back even if the call is cut
}

if [[ " $PARTS " == *" build "* ]]; then
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
  if [ "${GPU_CHECK_DRY:-0}" = "1" ]; then  # compile only: the environment and the tree stay as they are
    part "build famevil_fast._C (dry run: compile only)" 240 build.txt "$PY" setup.py build_ext \
      --build-temp /tmp/gpu_check_dry_build/temp --build-lib /tmp/gpu_check_dry_build/lib
  else
    part "build famevil_fast._C for $TORCH_CUDA_ARCH_LIST" 240 build.txt bash -c \
      "'$PY' -m pip install -v --no-deps --no-build-isolation -e . || '$PY' setup.py build_ext --inplace"
  fi
  "$PY" -m famevil_fast info 2>&1 | tee -a "$LOG"
fi

PYTEST=("$PY" -m pytest -q -s -p no:cacheprovider -rfE)
if [[ " $PARTS " == *" tests "* ]]; then
  # GPU_CHECK_TESTS replaces the list of test files; GPU_CHECK_TESTS_LIMIT the part's 120 s limit
  TESTS="${GPU_CHECK_TESTS:-tests/test_adapter_op.py tests/test_activation_op.py tests/test_residual_stream.py tests/test_cross_attention_op.py tests/test_contrastive_cuda.py \
tests/test_eval_topk.py tests/test_eval_xmr.py tests/test_cuda_graph_step.py tests/test_generation.py tests/test_decode_step.py tests/test_compiled_decoding.py \
tests/test_contrastive_triton.py tests/test_data_backends.py tests/test_data_transforms.py tests/test_master_weights.py}"
  # spread over GPU_CHECK_TEST_WORKERS processes (default 8; 1: one process) when pytest-xdist is installed,
  # as on the lent cards: compiling the kernels for each test's shapes takes most of the time, on the CPU
  WORKERS=()
  if [ "${GPU_CHECK_TEST_WORKERS:-8}" -gt 1 ] && "$PY" -c "import xdist" 2>/dev/null; then
    WORKERS=(-n "${GPU_CHECK_TEST_WORKERS:-8}")
  fi
  # shellcheck disable=SC2086
  part "GPU tests" "${GPU_CHECK_TESTS_LIMIT:-120}" gpu_tests.txt "${PYTEST[@]}" ${WORKERS[@]+"${WORKERS[@]}"} -k "gpu or cuda or contrastive_triton" $TESTS
fi

# "demo" (not in the default parts): the README's main job on the card, `famevil-fast demo` with the GPU recipe,
# on fewer products and updates (GPU_CHECK_DEMO_PRODUCTS, GPU_CHECK_DEMO_UPDATES): a check that it runs
demo_skipped() {  # demo_skipped REASON: in the log and in the results section
  say "demo: skipped ($1)"; echo "skipped: $1" > "$PARTS_DIR/demo.txt"; status=1
}
if [[ " $PARTS " == *" demo "* ]]; then
  if ! "$PY" -c "import famevil_fast.configs, famevil_fast.kernels" 2>/dev/null; then
    demo_skipped "famevil_fast.configs or .kernels not importable: the package is not installed here (build part)"
  elif ! "$PY" -c "import ftfy, pycocoevalcap, importlib.util as u; assert u.find_spec('open_clip')" 2>/dev/null; then
    demo_skipped "ftfy, open_clip or pycocoevalcap missing: run bench/carry_runtime.sh here and carry .carry/site"
  else
    part "demo (demo_gpu recipe, short)" 240 demo.txt "$PY" -m famevil_fast demo --out /tmp/gpu_check_demo \
      --products "${GPU_CHECK_DEMO_PRODUCTS:-1000}" --updates "${GPU_CHECK_DEMO_UPDATES:-60}" \
      --set schedule.warmup_updates=6 "--set=schedule.decay_at=[40, 50]" --set eval.every=0
  fi
fi

BENCH=("${PYTEST[@]}" --benchmark-disable)
run_bench() {  # run_bench NAME: one benchmark as a part, under its own limit
  case "$1" in
    contrastive) part "bench: contrastive losses" 75 bench_contrastive.txt "${BENCH[@]}" bench/bench_contrastive.py ;;
    contrastive_huge) part "bench: contrastive loss at 1,048,576 rows (Triton)" 75 bench_contrastive_huge.txt \
      env BENCH_HUGE=1 "${BENCH[@]}" bench/bench_contrastive.py -k "million_rows and triton" ;;
    adapter) part "bench: fused adapter" 75 bench_adapter.txt "${BENCH[@]}" bench/bench_adapter.py \
      -k "report and not training_dtypes" ;;
    adapter_dtypes) part "bench: fused adapter with a training step's dtypes" 90 bench_adapter_dtypes.txt \
      "${BENCH[@]}" bench/bench_adapter.py -k training_dtypes ;;
    activation) part "bench: QuickGELU" 90 bench_activation.txt "${BENCH[@]}" bench/bench_activation.py \
      -k "report or matches" ;;
    xattn) part "bench: cross-attention adapter" 60 bench_xattn.txt "${BENCH[@]}" bench/bench_cross_attention.py -k report ;;
    train_step) part "bench: training step" 240 bench_train_step.txt "${BENCH[@]}" bench/bench_train_step.py ;;
    train_compiled) part "bench: training step with torch.compile (frozen ITC)" 270 bench_train_compiled.txt \
      env TRAIN_STEP_COMPILE=1 TRAIN_STEP_CELLS=64:itc \
      TRAIN_STEP_CONFIGS=faithful,plain_frozen,plain_frozen_graphed,plain_frozen_compiled,fast_frozen,fast_frozen_compiled \
      "${BENCH[@]}" bench/bench_train_step.py -k report ;;
    train_levers) part "bench: training-step levers (bf16 stream, QuickGELU, master weights)" 300 \
      bench_train_levers.txt env TRAIN_STEP_CELLS="${TRAIN_STEP_CELLS:-64:all4,64:itc}" \
      TRAIN_STEP_CONFIGS="${TRAIN_STEP_CONFIGS:-$TRAIN_LEVERS}" "${BENCH[@]}" bench/bench_train_step.py -k report ;;
    train_levers_check) part "bench: training-step levers, first step against the faithful one" 150 \
      bench_train_levers_check.txt env TRAIN_STEP_CONFIGS="${TRAIN_STEP_CONFIGS:-$TRAIN_LEVERS}" "${BENCH[@]}" \
      bench/bench_train_step.py -k "first_step_losses_agree and (master or quick_gelu)" ;;
    caption) part "bench: caption decoding" 130 bench_caption.txt "${BENCH[@]}" bench/bench_caption.py ;;
    caption_compiled) part "bench: compiled caption decoding" 200 bench_caption_compiled.txt \
      env BENCH_CAPTION_CASES="${BENCH_CAPTION_CASES:-16:76:1,64:76:1}" \
      BENCH_CAPTION_METHODS="${BENCH_CAPTION_METHODS:-kv+graph,compiled,compiled+graph}" \
      TORCH_LOGS="${TORCH_LOGS:-recompiles,graph_breaks}" \
      "${BENCH[@]}" bench/bench_caption.py ;;
    retrieval) part "bench: retrieval" 45 bench_retrieval.txt "${BENCH[@]}" bench/bench_retrieval.py ;;
    imtl) part "bench: IMTL-G combination" 45 bench_imtl.txt "${BENCH[@]}" bench/bench_imtl.py ;;
    data) part "bench: data" 60 bench_data.txt "${BENCH[@]}" bench/bench_data.py -k report ;;
    tiles) part "bench: tile sweep" 150 bench_tiles.txt "${BENCH[@]}" bench/bench_tiles.py ;;
    *) say "unknown benchmark '$1' (known: $KNOWN_BENCHES)"; status=1 ;;
  esac
}
if [[ " $PARTS " == *" bench "* ]]; then
  for name in $BENCHES; do run_bench "$name"; done
fi

COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo "unknown")
if [ "$COMMIT" != unknown ] && [ -n "$(GIT_OPTIONAL_LOCKS=0 git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  COMMIT="$COMMIT with uncommitted changes"
fi
"$PY" - "$OUT" "$PARTS_DIR" "$status" "$PARTS" "$BENCHES" "$SETTINGS" "$COMMIT" <<'PYEOF' || { say "writing the results failed"; status=1; }
import datetime, pathlib, sys
import torch
out, parts_dir, status, parts = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3], sys.argv[4]
benches, settings, commit = sys.argv[5], sys.argv[6].strip(), sys.argv[7]
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
    f"command: `{settings + ' ' if settings else ''}bash bench/gpu_check.sh` at commit {commit} (parts: {parts}"
    + (f"; benchmarks: {benches}" if " bench " in f" {parts} " else "")
    + f"); exit status {status}",
    "",
]
for name, title in (
    ("gpu_tests.txt", "GPU tests"),
    ("demo.txt", "Demo (demo_gpu recipe, short)"),
    ("bench_contrastive.txt", "Contrastive losses"),
    ("bench_contrastive_huge.txt", "Contrastive loss at 1,048,576 rows"),
    ("bench_adapter.txt", "Fused adapter"),
    ("bench_adapter_dtypes.txt", "Fused adapter with a training step's dtypes"),
    ("bench_activation.txt", "QuickGELU"),
    ("bench_xattn.txt", "Cross-attention adapter block"),
    ("bench_train_step.txt", "Training step"),
    ("bench_train_compiled.txt", "Training step with torch.compile (frozen ITC)"),
    ("bench_train_levers.txt", "Training-step levers (bf16 stream, QuickGELU kernels, master weights)"),
    ("bench_train_levers_check.txt", "Training-step levers: first step against the faithful one"),
    ("bench_caption.txt", "Caption decoding"),
    ("bench_caption_compiled.txt", "Compiled caption decoding"),
    ("bench_retrieval.txt", "Retrieval"),
    ("bench_imtl.txt", "IMTL-G combination"),
    ("bench_data.txt", "Data"),
    ("bench_tiles.txt", "Tile sweep"),
):
    path = parts_dir / name
    if path.exists():
        text = path.read_text()
        keep = [l for l in text.splitlines() if l.strip() and not l.startswith(("bench/", "tests/"))]
        section += [f"### {title}", "", "```", *keep[-120:], "```", ""]
results = pathlib.Path("bench/RESULTS.md") if torch.cuda.is_available() else out / "RESULTS.md"
header = "# GPU results\n\nEvery figure names its card; ratios compare configurations measured in the same run.\n\n"
previous = results.read_text() if results.exists() else header
results.write_text(previous.rstrip() + "\n\n" + "\n".join(section) + "\n")
(out / "RESULTS_section.md").write_text("\n".join(section) + "\n")
print(f"wrote {results} and {out / 'RESULTS_section.md'}")
PYEOF
say "done (status $status)"
exit "$status"
