"""vLLM compatibility of every export (-m vllm_compat), decided by real vLLM in its own environment."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from quantsuite.cache import write_atomic
from quantsuite.export import linked_copy
from quantsuite.vllm_compat import FLOOR_MAX, decide, is_cpu_build, model_free_verdict

pytestmark = pytest.mark.vllm_compat  # xdist groups: conftest (one per scheme on a GPU, one on the CPU build)


def judge_expected(scheme, check: str, failures: list[str]) -> None:
    """Strict expectations: an expected failure must fail with text matching its `match`; a pass, or a failure
    of another kind, is a test failure."""
    expectation = scheme.expect.vllm.get(check)
    if expectation is None or expectation.outcome == "pass":
        assert not failures, "\n".join(failures)
        return
    if not failures:
        pytest.fail(f"[XPASS(strict)] {check} was expected to fail ({expectation.reason}) but passed: update "
                    f"schemes.yaml (expect.vllm.{check} of {scheme.name})")  # fmt: skip
    text = "\n".join(failures)
    if not re.search(expectation.match, text):
        pytest.fail(f"{check} failed, but not as expected: expected /{expectation.match}/, got:\n{text}")
    pytest.xfail(f"{check}: {expectation.reason}")


def test_vllm(workbench, scheme, vllm_check, vllm_service, exported):
    """model_free: vLLM's reading agrees with disk and manifest; cpu / cpu_patched / cuda: the export loads and
    vLLM's teacher-forced logprobs agree with the PyTorch reference of the same checkpoint within NOISE_FACTOR x
    the BF16 export's (the noise floor). Expected failures must fail with their recorded text."""
    result = workbench.vllm_verdict(scheme, vllm_check, vllm_service)
    judge_expected(scheme, vllm_check, result["failures"])


def _backend(vllm_python) -> str:
    return "cpu_patched" if is_cpu_build(vllm_python) else "cuda"


def test_noise_floor_is_small(workbench, vllm_python, vllm_service):
    """The floor must itself be kernel noise: a BF16 load that computed something else would raise the bound of
    every scheme. Bound FLOOR_MAX set from measurement (see vllm_compat)."""
    floor = workbench.vllm_check(workbench.reference_scheme(), _backend(vllm_python), vllm_service)
    assert not floor.get("error"), floor["error"]
    assert floor["teacher_forced"]["logprob_mae"] <= FLOOR_MAX, floor["teacher_forced"]


@pytest.fixture(scope="module")
def top50_export(workbench, catalog):
    """A hard-linked copy of top50's export: another xdist worker's --drop-exports cannot pull it away."""
    scheme = catalog.scheme("top50")
    copy = Path(workbench.cache.root) / "tmp" / f"top50-{os.getpid()}"  # the cache's file system: hard links
    shutil.rmtree(copy, ignore_errors=True)
    export_dir = linked_copy(workbench.export(scheme), copy, hard=True)
    return export_dir, workbench.scheme(scheme).manifest


def _with_config(tmp_path, export_dir, edit):
    broken = linked_copy(export_dir, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    edit(config["quantization_config"])
    (broken / "config.json").write_text(json.dumps(config))
    return broken


def _fp8_block(manifest):
    return min(b["index"] for b in manifest["blocks"] if b["decision"] not in ("BF16", "mixed"))


BROKEN = {
    "q_proj excluded, k/v FP8": (
        lambda q, block: q["ignore"].append(f"model.layers.{block}.self_attn.q_proj"),
        r"Detected some but not all shards"),
    "exclusion list too short": (
        lambda q, block: q.__setitem__("ignore", ["visual*"]),
        r"vLLM treats it as FP8 but \[.*\] are BF16 on disk"),
    "exclusion list too long": (
        lambda q, block: q["ignore"].append(f"model.layers.{block}*"),
        r"vLLM leaves it unquantized but \[.*\] are FP8 on disk"),
    "wrong prefix": (
        lambda q, block: q.__setitem__("ignore", [p.replace("model.layers.", "decoder.layers.") for p in q["ignore"]]),
        r"vLLM treats it as FP8 but .* BF16 on disk"),
    "unsupported quant_algo": (
        lambda q, block: q.__setitem__("quant_algo", "W8A16"),
        r"vLLM rejects the export: ValueError: .*ModelOpt currently only supports"),
}  # fmt: skip


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_broken_export_caught_by_model_free_verdict(tmp_path, vllm_service, top50_export, case):
    export_dir, manifest = top50_export
    edit, message = BROKEN[case]
    broken = _with_config(tmp_path, export_dir, lambda q: edit(q, _fp8_block(manifest)))
    problems = model_free_verdict(vllm_service, broken, manifest)["problems"]
    assert problems, f"{case}: vLLM's reading was not flagged"
    assert any(re.search(message, line) for line in problems), problems


def test_garbage_load_is_not_called_compatible(tmp_path, workbench, vllm_python, vllm_service, top50_export):
    """Negative control: BF16 layers not excluded load in vLLM (with a warning) but compute garbage; the
    teacher-forced comparison against the reference of the intended checkpoint, not the absence of a crash,
    must decide, and it must decide "incompatible" with the same bound that passes the catalog."""
    export_dir, _ = top50_export
    keep_blocks_out = [
        p
        for p in json.loads((export_dir / "config.json").read_text())["quantization_config"]["ignore"]
        if not p.startswith("model.layers.")
    ]  # lm_head, embeddings, vision stay excluded
    broken = _with_config(tmp_path, export_dir, lambda q: q.__setitem__("ignore", keep_blocks_out))
    check = _backend(vllm_python)
    result = workbench.vllm_run(vllm_service, broken, check)
    assert result.get("loaded"), result.get("error")
    floor = workbench.vllm_check(workbench.reference_scheme(), check, vllm_service)["teacher_forced"]
    decision = decide(result["teacher_forced"], floor)
    record = {"teacher_forced": result["teacher_forced"], "floor": floor, "error_ratio": decision.error_ratio}
    write_atomic(workbench.reports_dir / "vllm" / workbench.model_tag / "_garbage_control.json", json.dumps(record))
    assert not decision.compatible, decision.text
