#!/usr/bin/env bash
# The GPU nightly sequence, runnable on your own GPU box (the workflow in .github/workflows/gpu-nightly.yml
# calls this script); its steps are declared in quantsuite/steps.py (nightly_steps). Environment:
#   QUANTSUITE_MODEL   --model value: a local Qwen2.5-VL-3B-Instruct directory or qwen2.5-vl-3b-shape (default)
#   QUANTSUITE_VLLM_PYTHON  python of your vLLM environment (vllm_compat tests skip without one)
#   PYTHON             interpreter with quantsuite's dependencies and CUDA torch (default python3)
#   PYTEST             the pytest command (default: $PYTHON -m pytest)
#   GPUS               number of GPUs: >1 runs one scheme per GPU (pytest-xdist, --dist loadgroup); the schemes'
#                      PyTorch benchmarks then run in the benchmark step (on one GPU, in the schemes step)
#   RUN_ID             report directory name under reports/ (default nightly-<date>)
#   SCHEMES            space-separated scheme names or aliases to run (default: the whole catalog)
#   SHARD              K/N: this runner's shard of the run (each scheme's tests on one shard, in every step); the
#                      shards' reports/ folders merge into one report: python -m quantsuite.report --merge ...
#                      The research step reads every scheme's results: run it once, after the shards (STEPS=research,
#                      no SHARD), on their merged caches (python -m quantsuite.cache --merge ...), as the workflow does;
#                      on a shard it builds the other shards' schemes again. The studies step reads none: run it beside
#                      the shards (STEPS=studies, no SHARD) and merge its cache too
#   STEPS              space-separated steps to run, of: schemes machinery studies research benchmark (default: all,
#                      in that order). A later step reuses what an earlier one left in the cache and under reports/,
#                      so a runner held for less time than the whole nightly runs them as separate jobs (same
#                      RUN_ID and QUANTSUITE_CACHE); the report is written by the benchmark step.
#   COMPARE            a previous benchmark JSON: fails on a >10% median regression of the gated benchmarks
#                      (real-FP8 prefill at >= 8192 tokens; see GATED_KINDS in quantsuite/bench.py)
#   QUANTSUITE_BENCH_BATCH / QUANTSUITE_BENCH_PREFILL_TOKENS  prefill shape (default 8 x 1024 here)
#   QUANTSUITE_BENCH_ROUNDS / QUANTSUITE_BENCH_WARMUP         rounds per benchmark (default 5 / 2)
#   QUANTSUITE_BENCH_DECODE_TOKENS  new tokens of each PyTorch decode round (default 16)
#   QUANTSUITE_DECODE_SCHEMES  schemes (comma-separated names or aliases) whose PyTorch decode is timed: fake-quant,
#                      real-FP8, and batch-1 pairs with BF16, eager and with CUDA graphs (default here
#                      fp8_modelopt_default: eager decode is host-bound and each compiled pair compiles two whole
#                      forwards; vLLM's paired runs time every scheme's decode); `all` or `none`
#   QUANTSUITE_VLLM_BATCH_SCHEMES  the same for vLLM's large-batch and image-prompt workloads of the paired speed
#                      runs (default here fp8_modelopt_default: host-bound on an H200; batch 1 is timed for every scheme)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m quantsuite.steps nightly
