#!/usr/bin/env bash
# The whole test suite (what CI runs): everything on 2 xdist workers (vLLM tests grouped on one worker), then
# the benchmarks in one process (never under xdist), which write their JSON and the run's report.
set -euo pipefail
cd "$(dirname "$0")/.."
# one run id for both passes: the report joins the results of this run only (drift and vLLM from the first pass)
.venv/bin/pytest -n 2 --dist loadgroup -m "not benchmark" --run-id=latest-tiny --durations=25 "$@"
QUANTSUITE_BENCH_ROUNDS=${QUANTSUITE_BENCH_ROUNDS:-3} QUANTSUITE_BENCH_WARMUP=${QUANTSUITE_BENCH_WARMUP:-1} \
  .venv/bin/pytest -m benchmark --benchmark-disable-gc -p no:xdist --benchmark-json reports/benchmarks-tiny.json --run-id=latest-tiny --durations=15 "$@"
