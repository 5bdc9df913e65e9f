"""Export stage (quantsuite/stages/export.py): one checkpoint per scheme, verified; a damaged one is rebuilt."""

from __future__ import annotations

import json

import pytest

from quantsuite.checkpoint import ExportError, tensor_index, verify_export
from quantsuite.pipeline import Workbench

pytestmark = pytest.mark.export


@pytest.mark.uses_schemes("default")
@pytest.mark.parametrize("damage", ["truncate", "unfinished"])
def test_corrupt_or_half_written_export_is_rebuilt(tmp_path, small_model_spec, data_config, catalog, damage):
    scheme = catalog.scheme("default")  # a plain scheme: no scoring pass in the fresh cache
    bench = Workbench(small_model_spec, data_config, catalog, tmp_path / "cache", tmp_path / "reports")
    path = bench.exports.path(scheme)
    good = (path / "model.safetensors").read_bytes()
    if damage == "truncate":
        (path / "model.safetensors").write_bytes(good[: len(good) // 2])
        with pytest.raises(ExportError, match="truncated"):
            verify_export(path, bench.schemes.result(scheme).manifest)
    else:
        (path / ".complete").unlink()  # a crash mid-build: the directory is never read
        assert not bench.context.cache.is_complete("exports", path.name)
    again = Workbench(small_model_spec, data_config, catalog, tmp_path / "cache", tmp_path / "reports")
    rebuilt = again.exports.path(scheme)
    assert rebuilt == path and (rebuilt / "model.safetensors").read_bytes() == good
    assert any(e.startswith(("rebuilt exports/", "built exports/")) for e in again.context.cache.events)


@pytest.mark.uses_schemes("top50")
def test_tensor_bytes_come_from_the_export_and_its_pointer_says_the_same(workbench, catalog):
    scheme = catalog.scheme("top50")
    path = workbench.exports.path(scheme)
    size = sum(entry["bytes"] for entry in tensor_index(path).values())
    assert workbench.exports.tensor_bytes(scheme) == size
    pointer = workbench.context.reports_dir / "exports" / workbench.context.model_tag / f"{scheme.name}.json"
    assert json.loads(pointer.read_text())["tensor_bytes"] == size


@pytest.mark.uses_schemes("bf16", "default")
def test_drop_keeps_the_bf16_reference(tmp_path, small_model_spec, data_config, catalog):
    bench = Workbench(small_model_spec, data_config, catalog, tmp_path / "cache", tmp_path / "reports")
    reference, plain = catalog.scheme("bf16"), catalog.scheme("default")
    kept, dropped = bench.exports.path(reference), bench.exports.path(plain)
    bench.exports.drop(reference)
    bench.exports.drop(plain)
    assert kept.is_dir() and not dropped.exists()
    assert bench.exports.path(plain) == dropped and dropped.is_dir()  # rebuilt on demand


@pytest.mark.uses_schemes("bf16", "default")
def test_rebuild_builds_a_schemes_export_in_its_place_and_leaves_the_bf16_reference(tmp_path, small_model_spec,
                                                                                    data_config, catalog):  # fmt: skip
    """What the export benchmark times: a scheme's export built afresh where the later tests find it (one build,
    not one beside it); the BF16 reference's, read by every worker, is built beside it and left as it was."""
    bench = Workbench(small_model_spec, data_config, catalog, tmp_path / "cache", tmp_path / "reports")
    reference, plain = catalog.scheme("bf16"), catalog.scheme("default")
    kept, built = bench.exports.path(reference), bench.exports.path(plain)
    for directory in (kept, built):
        (directory / "old-build").write_text("")  # what a build afresh does not have
    events = len(bench.context.cache.events)
    assert bench.exports.rebuild(plain) == built and not (built / "old-build").exists()
    assert bench.exports.rebuild(reference) == kept and (kept / "old-build").exists()
    assert [e.split()[2] for e in bench.context.cache.events[events:] if e.startswith("built exports/")] == [
        "fp8_modelopt_default"]  # fmt: skip
    verify_export(built, bench.schemes.result(plain).manifest)
