#!/usr/bin/env bash
# The GPU nightly sequence, runnable on your own GPU box (the workflow in .github/workflows/gpu-nightly.yml
# calls this script). Environment:
#   QUANTSUITE_MODEL   --model value: a local Qwen2.5-VL-3B-Instruct directory or qwen2.5-vl-3b-shape (default)
#   QUANTSUITE_VLLM_PYTHON  python of your vLLM environment (vllm_compat tests skip without one)
#   PYTHON             interpreter with quantsuite's dependencies and CUDA torch (default python3)
#   GPUS               number of GPUs: >1 runs one scheme per GPU (pytest-xdist, --dist loadgroup)
#   RUN_ID             report directory name under reports/ (default nightly-<date>)
#   SCHEMES            space-separated scheme names or aliases to run (default: the whole catalog)
#   STEPS              space-separated steps to run, of: schemes research vllm-speed benchmark (default: all four,
#                      in that order). A later step reuses what an earlier one left in the cache and under reports/,
#                      so a runner held for less time than the whole nightly runs them as separate jobs (same
#                      RUN_ID and QUANTSUITE_CACHE); the report is written by the benchmark step.
#   COMPARE            a previous benchmark JSON: fails on a >10% median regression of the gated benchmarks
#                      (real-FP8 prefill at >= 8192 tokens; see GATED_KINDS in quantsuite/bench.py)
#   QUANTSUITE_BENCH_BATCH / QUANTSUITE_BENCH_PREFILL_TOKENS  prefill shape (default 8 x 1024 here)
#   QUANTSUITE_BENCH_ROUNDS / QUANTSUITE_BENCH_WARMUP         rounds per benchmark (default 5 / 2)
#   QUANTSUITE_COMPILED_DECODE_SCHEMES  schemes (comma-separated names) whose batch-1 decode is also timed with CUDA
#                      graphs (default here fp8_modelopt_default: each such pair compiles two whole forwards, 108 s
#                      for BF16's at the 3B shape on an H200); `all` for every scheme
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${QUANTSUITE_MODEL:-qwen2.5-vl-3b-shape}
PYTHON=${PYTHON:-python3}
GPUS=${GPUS:-$($PYTHON -c "import torch; print(max(torch.cuda.device_count(), 1))")}
RUN_ID=${RUN_ID:-nightly-$(date +%Y%m%d)}
PYTEST=${PYTEST:-$PYTHON -m pytest}
ALL_STEPS="schemes research vllm-speed benchmark"
STEPS=${STEPS:-$ALL_STEPS}
for name in $STEPS; do
  [[ " $ALL_STEPS " == *" $name "* ]] || { echo "nightly.sh: STEPS has '$name'; accepted steps: $ALL_STEPS" >&2; exit 2; }
done
common=(--model="$MODEL" --drop-exports --run-id="$RUN_ID")
for name in ${SCHEMES:-}; do common+=(--scheme="$name"); done
# Prefill benchmarks at a compute-bound shape: at 4 x 64 tokens eager PyTorch is host-bound and BF16 prefill
# moved 5000-9500 tokens/s between identical runs on an H200; at 8 x 1024 ratios repeated within 1%.
export QUANTSUITE_BENCH_BATCH=${QUANTSUITE_BENCH_BATCH:-8} QUANTSUITE_BENCH_PREFILL_TOKENS=${QUANTSUITE_BENCH_PREFILL_TOKENS:-1024}
export QUANTSUITE_COMPILED_DECODE_SCHEMES=${QUANTSUITE_COMPILED_DECODE_SCHEMES:-fp8_modelopt_default}
parallel=()
[ "$GPUS" -gt 1 ] && parallel=(-n "$GPUS" --dist loadgroup)
# 1. schemes, exports, drift, vLLM: one scheme per GPU when there are several
# A failing step (a scheme past its drift bound, say) is recorded and the later steps still run, so the report
# shows where it broke; the script exits non-zero at the end. Each step's wall time and exit status go to
# reports/$RUN_ID-nightly-steps.tsv (and stderr).
failed=()
mkdir -p reports
steps="reports/$RUN_ID-nightly-steps.tsv"
[ -e "$steps" ] || printf 'step\tseconds\texit\n' > "$steps"  # STEPS run as separate jobs add their rows
step() {  # step NAME COMMAND...: run it (if STEPS names it), record its wall time and exit status
  local name=$1 start=$SECONDS rc=0
  shift
  [[ " $STEPS " == *" $name "* ]] || return 0
  "$@" || rc=$?
  printf '%s\t%s\t%s\n' "$name" $((SECONDS - start)) $rc >> "$steps"
  echo "nightly: step $name took $((SECONDS - start)) s, exit $rc" >&2
  [ $rc -eq 0 ] || failed+=("$name")
}
step schemes $PYTEST -m "autoquant or export or drift or vllm_compat" "${common[@]}" "${parallel[@]}" --no-report
# 2. research (method comparison, Pareto sweep, optimality gap) and the report's own checks; before the
#    benchmarks, whose run writes reports/$RUN_ID/ from everything the earlier steps left
step research $PYTEST tests/test_report.py "${common[@]}" -p no:xdist --no-report
# 3. benchmarks: one process, never under xdist; the report is written at the end of this run
compare=()
if [ -n "${COMPARE:-}" ]; then  # gate only on benchmarks that repeat (quantsuite/bench.py GATED_KINDS)
  $PYTHON -m quantsuite.bench gate-baseline "$COMPARE" "reports/$RUN_ID-gate-baseline.json"
  compare=(--benchmark-compare="reports/$RUN_ID-gate-baseline.json" --benchmark-compare-fail=median:10%)
fi
# 3a. vLLM speed, BF16 and each scheme alternating inside one test (CUDA graphs): one scheme per GPU
step vllm-speed $PYTEST -m paired "${common[@]}" "${parallel[@]}" --no-report
# 3b. PyTorch benchmarks in one process; this run writes the report
step benchmark $PYTEST -m "benchmark and not paired" --benchmark-disable-gc "${common[@]}" -p no:xdist \
  --benchmark-json "reports/$RUN_ID-benchmarks.json" "${compare[@]}"
echo "report: reports/$RUN_ID/report.md; step times: $steps"
if [ ${#failed[@]} -gt 0 ]; then echo "nightly: failed steps: ${failed[*]}" >&2; exit 1; fi
