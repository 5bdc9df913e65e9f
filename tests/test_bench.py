"""Benchmarks (-m benchmark; pytest-benchmark, never under xdist). Results: --benchmark-json under reports/.

Every entry carries scheme, kind, tokens, device and versions in extra_info; the report divides each scheme's
tokens/s by BF16's from the same JSON (same run, same device).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from quantsuite.bench import Fp8MatmulUnavailable, decode_step, fp8_matmul_support, prefill_step, to_scaled_mm
from quantsuite.export import export_model, load_export

pytestmark = pytest.mark.benchmark
BATCH, PREFILL_TOKENS, PROMPT, NEW_TOKENS = 4, 64, 16, 16
ROUNDS, WARMUP = int(os.environ.get("QUANTSUITE_BENCH_ROUNDS", 5)), int(os.environ.get("QUANTSUITE_BENCH_WARMUP", 2))


@pytest.fixture(autouse=True)
def _not_under_xdist():
    if os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("benchmarks never run under pytest-xdist (workers share the CPU/GPU); run them with -p no:xdist")


def _info(benchmark, workbench, scheme_name: str, kind: str, tokens: int) -> None:
    benchmark.extra_info.update({"scheme": scheme_name, "kind": kind, "tokens": tokens, "model": workbench.model_tag,
                                 "device": workbench.device_name,
                                 "versions": workbench.versions})  # fmt: skip


def _vocab(workbench) -> int:
    return len(workbench.tokenizer)


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_fake_quant_throughput(benchmark, workbench, scheme, kind):
    model = workbench.quantized_model(scheme)
    if kind == "prefill":
        step, tokens = prefill_step(model, BATCH, PREFILL_TOKENS, workbench.device, _vocab(workbench))
    else:
        step, tokens = decode_step(model, BATCH, PROMPT, NEW_TOKENS, workbench.device, _vocab(workbench))
    _info(benchmark, workbench, scheme.name, f"fake_quant_{kind}", tokens)
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP)


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_real_fp8_throughput(benchmark, workbench, scheme, exported, kind):
    """The exported checkpoint with real FP8 GEMMs (torch._scaled_mm); BF16 export as its baseline."""
    reason = fp8_matmul_support(workbench.device)
    if reason:
        pytest.skip(reason)
    model = load_export(exported, workbench.device)
    try:
        to_scaled_mm(model, workbench.device)
    except Fp8MatmulUnavailable as error:
        pytest.skip(str(error))
    maker = prefill_step if kind == "prefill" else decode_step
    arguments = (BATCH, PREFILL_TOKENS) if kind == "prefill" else (BATCH, PROMPT, NEW_TOKENS)
    step, tokens = maker(model, *arguments, workbench.device, _vocab(workbench))
    _info(benchmark, workbench, scheme.name, f"real_fp8_{kind}", tokens)
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP)


@pytest.mark.parametrize("phase", ["calibration", "scoring"])
def test_autoquant_time(benchmark, workbench, catalog, phase):
    """AutoQuant's calibration (mtq.quantize with the FP8 format, same batches) and full scoring pass."""
    from quantsuite.autoquant import apply_config, run_scoring

    scheme = next(s for s in catalog.schemes if s.mode == "autoquant" and s.method == "gradient")
    plan = workbench.scoring_plan(scheme)
    batches = workbench.batches("scoring", plan.score_samples)

    def fresh():
        return (workbench.load().model,), {}

    if phase == "calibration":
        config = catalog.formats[scheme.formats[0]].quant_config()

        def target(model):
            apply_config(model, config, batches, workbench.device)
    else:

        def target(model):
            run_scoring(model, plan, batches, workbench.device)

    _info(benchmark, workbench, scheme.name, f"autoquant_{phase}", 0)
    benchmark.pedantic(target, setup=fresh, rounds=2)


@pytest.mark.scheme_modes("autoquant")
def test_autoquant_resolve_time(benchmark, workbench, scheme):
    from quantsuite.autoquant import resolve_config

    state, _ = workbench.scoring_state(workbench.scoring_plan(scheme))
    _info(benchmark, workbench, scheme.name, "autoquant_resolve", 0)
    benchmark.pedantic(resolve_config, args=(state, scheme), rounds=10, warmup_rounds=1)


def test_export_time_and_size(benchmark, workbench, scheme, scheme_result):
    model = workbench.quantized_model(scheme)

    def setup():
        return (copy.deepcopy(model), Path(tempfile.mkdtemp(prefix="quantsuite-export-bench-"))), {}

    sizes = []

    def target(copied, directory):
        export_model(copied, scheme_result.manifest, workbench.source_dir, directory)
        sizes.append(sum(f.stat().st_size for f in directory.iterdir() if f.is_file()))

    _info(benchmark, workbench, scheme.name, "export", 0)
    benchmark.pedantic(target, setup=setup, teardown=lambda copied, directory: shutil.rmtree(directory), rounds=2)
    benchmark.extra_info["checkpoint_bytes"] = sizes[-1]


def test_vllm_throughput(benchmark, workbench, scheme, vllm_python, exported):
    """vLLM output tokens/s of each export (16 prompts x 32 tokens, median of 3 rounds after a warm-up, timed
    inside the vLLM process); the benchmark's own clock covers the whole subprocess (engine start included)."""
    from quantsuite import vllm_compat

    check = "cpu_patched" if vllm_compat.is_cpu_build(vllm_python) else "cuda"
    expected = scheme.expect.vllm.get(check)
    if expected is not None and expected.outcome == "fail":
        pytest.skip(f"expected to fail in vLLM ({check}): {expected.reason}")
    prompts = vllm_compat.prompt_token_ids(workbench.tokenizer)
    results = []

    def run():
        results.append(vllm_compat.vllm_generate(vllm_python, exported, prompts, 4, patched=check == "cpu_patched",
                                                 throughput=True))  # fmt: skip

    _info(benchmark, workbench, scheme.name, "vllm_end_to_end", 0)
    benchmark.pedantic(run, rounds=1)
    result = results[-1]
    assert result.get("throughput"), result.get("error")
    benchmark.extra_info.update({"vllm_check": check, "vllm": vllm_compat.vllm_version(vllm_python),
                                 "vllm_output_tokens_per_s": result["throughput"]["output_tokens_per_s"],
                                 "vllm_rounds_s": result["throughput"]["rounds_s"]})  # fmt: skip
