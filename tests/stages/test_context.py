"""Run context (quantsuite/stages/context.py): what every stage shares."""

from __future__ import annotations

import json

import pytest

from quantsuite import PROJECT_ROOT
from quantsuite.data import CaptionDataError
from quantsuite.stages.context import RunContext


@pytest.fixture
def context(tmp_path, model_spec, data_config, catalog):
    return RunContext(model_spec, data_config, catalog, tmp_path / "cache", tmp_path / "reports", run_id="run-x")


def test_publish_writes_one_stamped_json_per_stage_result(context, tmp_path):
    path = context.publish("drift", "top50", {"kl_mean": 0.1})
    assert path == tmp_path / "reports" / "drift" / context.model_tag / "top50.json"
    assert json.loads(path.read_text()) == {"kl_mean": 0.1, "run_id": "run-x"}
    assert [p.name for p in path.parent.iterdir()] == ["top50.json"]  # written via a temp file and a rename


def test_publish_part_keeps_this_runs_other_parts_and_drops_another_runs(context, model_spec, data_config,
                                                                         catalog, tmp_path):  # fmt: skip
    context.publish_part("vllm", "top50", "model_free", {"failures": []})
    path = context.publish_part("vllm", "top50", "cpu", {"failures": ["x"]})
    both = {"model_free": {"failures": []}, "cpu": {"failures": ["x"]}, "run_id": "run-x"}
    assert json.loads(path.read_text()) == both
    later = RunContext(model_spec, data_config, catalog, tmp_path / "cache", tmp_path / "reports", run_id="run-y")
    later.publish_part("vllm", "top50", "cpu", {"failures": []})
    assert json.loads(path.read_text()) == {"cpu": {"failures": []}, "run_id": "run-y"}


def test_asking_for_more_samples_than_the_split_holds_names_the_option(context):
    held = len(context.splits.calibration)
    with pytest.raises(CaptionDataError, match="raise --calib-samples"):
        context.batches("calibration", held + 1)
    assert len(context.batches("calibration", held)) >= 1


def test_release_drops_what_every_stage_keeps(context):
    kept = {"a": object()}
    context.holds_device_memory(kept.clear)
    context.release()
    assert kept == {}


def test_a_catalog_without_a_bf16_reference_is_refused_by_name(context, catalog):
    context.catalog = catalog.model_copy(update={"schemes": tuple(s for s in catalog.schemes if s.mode != "none")})
    with pytest.raises(ValueError, match="no scheme with `mode: none`"):
        context.reference_scheme()


def _scores_and_scheme_keys(context) -> tuple[str, str]:
    """Two stages' keys built on the base key: the scores of top50 and the bf16 scheme's artifact."""
    from quantsuite.stages.scores import Scores

    scores = Scores(context)
    return scores.scores_key(scores.plan(context.catalog.scheme("top50"))), context.cache.key(context.base_key())


def _rekeyed(context, monkeypatch, target: str, value) -> tuple[str, str]:
    before = _scores_and_scheme_keys(context)
    monkeypatch.setattr(target, value)
    return before, _scores_and_scheme_keys(context)


@pytest.mark.parametrize("package", ["scipy", "numpy", "pulp", "accelerate", "safetensors", "torch"])
def test_another_version_of_a_result_package_means_new_keys(tmp_path, model_spec, data_config, catalog, monkeypatch,
                                                            package):  # fmt: skip
    """scipy's MILP and PuLP's CBC make the exact and LP picks: a cache built with other versions is not reused."""
    from importlib import metadata

    first = RunContext(model_spec, data_config, catalog, tmp_path / "cache")
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "0.0-other" if name.lower() == package else real(name))
    second = RunContext(model_spec, data_config, catalog, tmp_path / "cache")
    assert second.versions[package] == "0.0-other" != first.versions[package]
    assert set(_scores_and_scheme_keys(first)).isdisjoint(_scores_and_scheme_keys(second))


def test_edited_model_or_data_code_means_new_keys(context, monkeypatch):
    """The 3B/7B shape definitions and the loading code live in models.py, splitting and tokenizing in data.py: an
    edit there (same weights, same captions) rebuilds everything."""
    from quantsuite import data, models
    from quantsuite.cache import code_hash
    from quantsuite.stages import context as context_module

    assert context.base_key()["model_and_data_code"] == code_hash(models, data)
    before, after = _rekeyed(context, monkeypatch, f"{context_module.__name__}.code_hash",
                             lambda *modules: "edited" if models in modules else code_hash(*modules))  # fmt: skip
    assert set(before).isdisjoint(after)


def test_another_gpu_or_cpu_kernel_set_means_new_keys(context, monkeypatch):
    """An H100 and an H200 (or an AVX-512 and an AVX2 box) compute differently: they share no artifact."""
    import torch

    from quantsuite.stages.context import device_identity

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    h100 = device_identity(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert device_identity(torch.device("cuda")) != h100 and "H200" in device_identity(torch.device("cuda"))
    h200 = device_identity(torch.device("cuda"))
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")  # measure_bounds' no-split-k kernel set
    assert device_identity(torch.device("cuda")) == h200 + " CUBLAS_WORKSPACE_CONFIG=:0:0"
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    assert context.base_key()["device"] == device_identity(context.device)
    capability = torch.backends.cpu.get_cpu_capability()
    other = "AVX2" if capability != "AVX2" else "DEFAULT"
    before, after = _rekeyed(context, monkeypatch, "torch.backends.cpu.get_cpu_capability", lambda: other)
    assert set(before).isdisjoint(after)
    import os

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41" if os.environ.get("ONEDNN_MAX_CPU_ISA") != "SSE41" else "AVX2")
    assert _scores_and_scheme_keys(context) != after


def test_every_reports_folder_has_one_writer():
    """reports/<kind>/ is written by one stage, through RunContext.publish / publish_part, and by nothing else: a
    second module (a test, conftest, another stage) that publishes a kind, or a kind that is not a literal, fails."""
    import ast

    root = PROJECT_ROOT
    writers: dict[str, set[str]] = {}
    sources = sorted([*root.glob("quantsuite/**/*.py"), *root.glob("tests/**/*.py"), root / "conftest.py"])
    for path in [p for p in sources if p.stem not in ("context", "test_context")]:  # publish itself and its tests
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("publish", "publish_part")):  # fmt: skip
                continue
            where = str(path.relative_to(root))
            kind = node.args[0] if node.args else None
            assert isinstance(kind, ast.Constant) and isinstance(kind.value, str), f"{where}:{node.lineno}"
            writers.setdefault(kind.value, set()).add(where)
    assert writers, "no publish call found"
    for kind, modules in writers.items():
        assert len(modules) == 1 and next(iter(modules)).startswith("quantsuite/stages/"), (kind, modules)
