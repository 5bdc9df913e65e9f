"""vLLM compatibility of every export (-m vllm_compat), decided by real vLLM in its own environment."""

from __future__ import annotations

import json

import pytest

from quantsuite.export import linked_copy
from quantsuite.vllm_compat import PREFIX_AGREEMENT_MIN, model_free_verdict

pytestmark = [pytest.mark.vllm_compat, pytest.mark.xdist_group("vllm")]


def _expected(scheme, check):
    expectation = scheme.expect.vllm.get(check)
    return expectation.outcome if expectation else "pass", expectation.reason if expectation else ""


def test_vllm(request, workbench, scheme, vllm_check, vllm_python, exported):
    """model_free: vLLM's reading agrees with disk and manifest; cpu / cpu_patched / cuda: the export loads and
    its greedy tokens agree with the PyTorch reference. Expected failures are strict xfails with the reason."""
    outcome, reason = _expected(scheme, vllm_check)
    if outcome == "fail":
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"{vllm_check}: {reason}"))
    result = workbench.vllm_check(scheme, vllm_check, vllm_python)
    if vllm_check == "model_free":
        assert result["problems"] == [], "\n".join(result["problems"])
        return
    error = result.get("error")
    assert error is None, f"{error['stage']}: {error['type']}: {error['key_line']}"
    assert result["agreement"]["prefix_agreement"] >= PREFIX_AGREEMENT_MIN, result["agreement"]


@pytest.fixture(scope="module")
def top50_export(workbench, catalog):
    scheme = catalog.scheme("top50")
    return workbench.export(scheme), workbench.scheme(scheme).manifest


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
def test_broken_export_caught_by_model_free_verdict(tmp_path, vllm_python, top50_export, case):
    export_dir, manifest = top50_export
    edit, message = BROKEN[case]
    broken = _with_config(tmp_path, export_dir, lambda q: edit(q, _fp8_block(manifest)))
    problems = model_free_verdict(vllm_python, broken, manifest)["problems"]
    assert problems, f"{case}: vLLM's reading was not flagged"
    assert any(__import__("re").search(message, line) for line in problems), problems


def test_garbage_load_is_not_called_compatible(tmp_path, workbench, vllm_python, top50_export):
    """Negative control: BF16 layers not excluded load in vLLM (with a warning) but generate garbage; the
    agreement check, not the absence of a crash, must decide."""
    from quantsuite.vllm_compat import (
        MAX_NEW_TOKENS,
        agreement,
        is_cpu_build,
        prompt_token_ids,
        reference_generate,
        vllm_generate,
    )

    export_dir, _ = top50_export
    keep_blocks_out = [
        p
        for p in json.loads((export_dir / "config.json").read_text())["quantization_config"]["ignore"]
        if not p.startswith("model.layers.")
    ]  # lm_head, embeddings, vision stay excluded
    broken = _with_config(tmp_path, export_dir, lambda q: q.__setitem__("ignore", keep_blocks_out))
    prompts = prompt_token_ids(workbench.tokenizer)
    result = vllm_generate(vllm_python, broken, prompts, MAX_NEW_TOKENS, patched=is_cpu_build(vllm_python))
    assert result.get("loaded"), result.get("error")
    from quantsuite.export import load_export

    reference = reference_generate(load_export(export_dir, workbench.device), prompts, MAX_NEW_TOKENS, workbench.device)
    assert agreement(reference, result["outputs"])["prefix_agreement"] < PREFIX_AGREEMENT_MIN
