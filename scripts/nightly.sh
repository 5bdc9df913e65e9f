#!/usr/bin/env bash
# The GPU nightly sequence, runnable on your own GPU box (the workflow in .github/workflows/gpu-nightly.yml
# calls this script). Environment:
#   QUANTSUITE_MODEL   --model value: a local Qwen2.5-VL-3B-Instruct directory or qwen2.5-vl-3b-shape (default)
#   QUANTSUITE_VLLM_PYTHON  python of your vLLM environment (vllm_compat tests skip without one)
#   GPUS               number of GPUs: >1 runs one scheme per GPU (pytest-xdist, --dist loadgroup)
#   RUN_ID             report directory name under reports/ (default nightly-<date>)
#   COMPARE            a previous benchmark JSON to compare against (fails on a >10% median regression)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${QUANTSUITE_MODEL:-qwen2.5-vl-3b-shape}
GPUS=${GPUS:-$(python3 -c "import torch; print(max(torch.cuda.device_count(), 1))")}
RUN_ID=${RUN_ID:-nightly-$(date +%Y%m%d)}
PYTEST=${PYTEST:-python3 -m pytest}
common=(--model "$MODEL" --drop-exports --run-id "$RUN_ID")
parallel=()
[ "$GPUS" -gt 1 ] && parallel=(-n "$GPUS" --dist loadgroup)
# 1. schemes, exports, drift, vLLM: one scheme per GPU when there are several
$PYTEST -m "autoquant or export or drift or vllm_compat" "${common[@]}" "${parallel[@]}" --no-report
# 2. benchmarks: one process, never under xdist; the report is written at the end of this run
compare=()
[ -n "${COMPARE:-}" ] && compare=(--benchmark-compare="$COMPARE" --benchmark-compare-fail=median:10%)
$PYTEST -m benchmark "${common[@]}" -p no:xdist --benchmark-json "reports/$RUN_ID-benchmarks.json" "${compare[@]}"
$PYTEST tests/test_report.py "${common[@]}" -p no:xdist --no-report
echo "report: reports/$RUN_ID/report.md"
