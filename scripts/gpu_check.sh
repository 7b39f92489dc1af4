#!/usr/bin/env bash
# Every GPU figure fraglm tracks, in one command, within about 8 minutes:
#
#   scripts/gpu_check.sh [REPORT_DIR]
#
# On a CUDA machine: the CUDA tests (tests/test_cuda.py, tests/attention/test_triton.py on the GPU),
# bench_attention (bf16 and fp16; T = 512 ... 16384; head dims 64 and 16; fragment on the
# Triton kernels and on the torch tile loop, SDPA's flash and memory-efficient kernels,
# FlexAttention with a document BlockMask, the packed-document variants) and bench_train
# (bf16, and fp16 + GradScaler; fragment vs sdpa vs transformers' Llama). Every part has
# its own time limit and a failing part does not stop the others; what a part printed
# before its limit stays in the report. The report is one markdown file in REPORT_DIR
# (default: $OUT if set, else runs/gpu_check), whose path is printed at the start and end.
#
# First, on a CUDA machine, the ahead-of-time compile check (scripts/compile_check.py) for
# the GPU's capability. On a machine without CUDA it says so and runs the compile check for
# every capability and the Triton kernels' interpreter tests.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline
BUDGET=${GPU_CHECK_BUDGET_S:-480}  # seconds for all parts together
dir=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$dir"
report="$dir/gpu_check-$(date +%Y%m%d-%H%M%S).md"
echo "gpu_check: report -> $report"

section() { printf '\n## %s\n\n' "$1" >>"$report"; }

# run LIMIT_S TITLE COMMAND...: the command's output as a section, cut at LIMIT_S seconds
# (or at what is left of the budget, whichever is less)
run() {
  local limit=$1 title=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  ((left < limit)) && limit=$left
  section "$title"
  if ((limit < 10)); then
    echo "skipped: the time budget (${BUDGET}s) is spent" >>"$report"
    echo "gpu_check: skipped $title (budget spent)"
    return
  fi
  echo "gpu_check: $title (limit ${limit}s)"
  local start=$SECONDS out
  out=$(timeout --kill-after=10 "$limit" "$@" 2>&1)
  local rc=$?
  local note="exit $rc"
  ((rc == 124 || rc == 137)) && note="stopped at the ${limit}s limit"
  {
    echo "\`$*\` ($note, $((SECONDS - start)) s)"
    echo
    # markdown tables and target lines as they are; everything else as a log block
    printf '%s\n' "$out" | grep -E '^(\||- |Machine|Shape|Load|Targets)' || true
    echo
    echo '<details><summary>log</summary>'
    echo
    echo '```'
    printf '%s\n' "$out" | grep -vE '^(\||USDT)' | tail -n 60
    echo '```'
    echo '</details>'
  } >>"$report"
}

{
  echo "# fraglm GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  python - <<'EOF'
import platform, torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "not installed"
print(f"python {platform.python_version()}, torch {torch.__version__}, triton {tv}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB")
EOF
} >>"$report" 2>&1

if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA GPU here; running the Triton kernels through the interpreter only"
  echo "No CUDA GPU on this machine: the compile check and the interpreter tests only." >>"$report"
  run 240 "Ahead-of-time compile check, every capability" python scripts/compile_check.py
  run 300 "Triton kernels through the interpreter" env TRITON_INTERPRET=1 \
    python -m pytest -q -p no:cacheprovider tests/attention/test_triton.py
  run 120 "Ring attention on the Triton kernels" \
    python -m pytest -q -p no:cacheprovider tests/parallel/test_ring.py -k triton
  echo "gpu_check: done -> $report"
  exit 0
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >>"$report" 2>&1

# the kernels compiled ahead of time for this GPU's capability: what the GPU would load
cap=$(python -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
if python -c "import sys; from fraglm.attention.compile_check import CAPABILITIES as C; \
sys.exit(0 if tuple(map(int, '$cap'.split('.'))) in C else 1)"; then
  run 90 "Ahead-of-time compile check, capability $cap" python scripts/compile_check.py \
    --capability "$cap"
else
  section "Ahead-of-time compile check"
  echo "capability $cap is not among the compile check's targets (8.0, 8.6, 8.9, 9.0)" >>"$report"
fi

run 120 "CUDA tests" python -m pytest -q -p no:cacheprovider \
  tests/test_cuda.py tests/attention/test_triton.py

LENS="512 1024 2048 4096 8192 16384"
FAST="sdpa-flash sdpa-efficient fragment-triton fragment-triton-doc sdpa-doc"
for dim in 64 16; do
  run 75 "Attention, head dim $dim (bf16, fp16)" python scripts/bench_attention.py \
    --device cuda --dtypes bf16 fp16 --head-dim "$dim" --seq-lens $LENS --backends $FAST \
    --repeats 5
done
# FlexAttention compiles once per shape: two lengths, the document target's among them
run 75 "Packed documents: FragmentStream vs FlexAttention (bf16)" python scripts/bench_attention.py \
  --device cuda --dtypes bf16 --head-dim 64 --seq-lens 2048 8192 \
  --backends sdpa-flash fragment-triton-doc flex-doc sdpa-doc --repeats 5
# the P100's path (no Triton there), at the p100 config's head dim
run 45 "Torch tile loop on the GPU (bf16, head dim 16)" python scripts/bench_attention.py \
  --device cuda --dtypes bf16 --head-dim 16 --seq-lens 512 1024 2048 4096 \
  --backends sdpa fragment-triton fragment-torch fragment-torch-doc --repeats 3
run 50 "Training step, bf16" python scripts/bench_train.py --device cuda --precision bf16
run 50 "Training step, fp16 + GradScaler" python scripts/bench_train.py --device cuda \
  --precision fp16

echo "gpu_check: done in ${SECONDS}s -> $report"
