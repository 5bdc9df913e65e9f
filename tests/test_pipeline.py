"""The orchestrator (quantsuite/pipeline.py): stages wired one way, each key covering the code that made it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from quantsuite import PROJECT_ROOT
from quantsuite.pipeline import Workbench

STAGES = ["context", "scores", "scheme", "export", "drift", "vllm", "research", "benchmarks"]  # left to right
STAGES_DIR = PROJECT_ROOT / "quantsuite" / "stages"


def stage_imports(stage: str) -> set[str]:
    """The stages a stage module imports (quantsuite.stages.<name>)."""
    tree = ast.parse((STAGES_DIR / f"{stage}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("quantsuite.stages."):
            found.add(node.module.rsplit(".", 1)[1])
    return found


def test_stages_call_only_stages_to_their_left():
    """Data flows one way: no stage imports a stage after it (before: Workbench.scheme() <-> quantized_model(),
    export() -> export_key() -> scheme() inside one class of 22 methods)."""
    assert sorted(p.stem for p in STAGES_DIR.glob("*.py") if p.stem != "__init__") == sorted(STAGES)
    for position, stage in enumerate(STAGES):
        later = stage_imports(stage) - set(STAGES[:position])
        assert not later, f"quantsuite/stages/{stage}.py imports {sorted(later)}, which come after it"


def test_a_stage_importing_a_later_one_is_caught(tmp_path, monkeypatch):
    """The check above can fail: a scores module that imports the export stage is reported."""
    copy = tmp_path / "stages"
    copy.mkdir()
    for path in Path(STAGES_DIR).glob("*.py"):
        (copy / path.name).write_text(path.read_text())
    scores = copy / "scores.py"
    scores.write_text(scores.read_text() + "\nfrom quantsuite.stages.export import Exports\n")
    monkeypatch.setattr(f"{__name__}.STAGES_DIR", copy)
    with pytest.raises(AssertionError, match=r"scores.py imports \['export'\]"):
        test_stages_call_only_stages_to_their_left()


def test_the_orchestrator_shares_one_context(workbench):
    stages = [workbench.scores, workbench.schemes, workbench.exports, workbench.drift, workbench.vllm,
              workbench.research, workbench.benchmarks]  # fmt: skip
    assert all(stage.context is workbench.context for stage in stages)
    assert workbench.exports.schemes is workbench.schemes and workbench.drift.exports is workbench.exports


def test_a_code_change_means_a_rebuild(tmp_path, monkeypatch, workbench, model_spec, data_config, catalog):
    """Each stage's key covers the code that makes its artifact (before: only package versions, so a changed
    compare() or export_model reused old artifacts): an edited producer changes its stage's key and every key
    downstream, none upstream."""
    from quantsuite import autoquant, checkpoint

    scheme = catalog.scheme("top50")

    def keys(bench):
        return (bench.scores.scores_key(bench.scores.plan(scheme)), bench.schemes.result(scheme).artifact_dir.name,
                bench.exports.export_key(scheme))  # fmt: skip

    def edit(module, name: str) -> None:
        edited = tmp_path / name
        edited.write_text(Path(module.__file__).read_text() + "\n# an edit\n")
        monkeypatch.setattr(module, "__file__", str(edited))

    before = keys(workbench)
    edit(checkpoint, "checkpoint.py")  # scores and decisions keep their keys (no rescoring)
    cache = workbench.context.cache.root
    after_export_edit = keys(Workbench(model_spec, data_config, catalog, cache, tmp_path / "reports"))
    assert after_export_edit[:2] == before[:2] and after_export_edit[2] != before[2], (before, after_export_edit)
    edit(autoquant, "autoquant.py")
    after = keys(Workbench(model_spec, data_config, catalog, tmp_path / "cache", tmp_path / "reports"))
    assert all(b != a for b, a in zip(before, after, strict=True)), (before, after)
