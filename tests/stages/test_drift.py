"""Drift stage (quantsuite/stages/drift.py): measurements cached per export key; a cached one needs no export."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.drift


def test_cached_drift_touches_no_export(workbench, scheme, measurement, tmp_path):
    """A later session that finds the drift cached must not build (or even look up) the export: at 3B each is
    5-7.5 GB, and re-exporting every scheme filled the nightly's disk."""
    from quantsuite.pipeline import Workbench

    later = Workbench(
        workbench.context.model_spec,
        workbench.context.data_config,
        workbench.context.catalog,
        workbench.context.cache.root,
        tmp_path,
    )
    assert later.drift.measure(scheme) == measurement
    assert not [event for event in later.context.cache.events if "exports/" in event], later.context.cache.events


@pytest.mark.parametrize("name", ["top50"])  # one real pytest run is enough; --scheme deselects it with top50
def test_a_drift_test_served_from_the_cache_builds_no_export(pytestconfig, workbench, catalog, name, tmp_path):
    """The drift tests' fixture, in a real pytest run that finds the drift cached, looks up neither the export nor
    the fake-quant model (it used to ask for both: a re-run with --drop-exports on the 3B shape rebuilt every
    scheme's export, run gpu-26). Before: 'reused exports/...' and 'reused schemes/...' in its artifacts. The run
    gets this run's model and data options: on the 3B shape it had run the tiny model and built its export (gpu-36)."""
    from quantsuite.plugin.options import run_input_arguments
    from tests.plugin.test_options import _pytest

    workbench.drift.measure(catalog.select([name])[0])
    done = _pytest("tests/test_drift.py", "-k", "test_drift_within_bounds", f"--scheme={name}",
                   *run_input_arguments(pytestconfig), f"--cache-dir={workbench.context.cache.root}",
                   f"--reports-dir={tmp_path}", "--no-report")  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    artifacts = done.stdout.split("quantsuite artifacts", 1)[1]
    assert "reused drift/" in artifacts and "exports/" not in artifacts, artifacts


@pytest.mark.uses_schemes("default", "fp8_all_layers")
def test_a_catalog_reader_keeps_no_export_it_built_only_for_drift(tmp_path, small_model_spec, data_config, catalog):
    """The research studies and the nested-scheme check read every catalog scheme's drift; on a cache without it
    (a fresh runner, the other shard's schemes) each built the scheme's export and kept it: 4-6 GiB a scheme at 3B,
    enough to fill a 64 GiB runner (gpu-37). With keep_export=False such an export goes once its drift is measured,
    and an export that was there before stays. Planted: keeping the built export fails the first check."""
    from quantsuite.pipeline import Workbench

    bench = Workbench(small_model_spec, data_config, catalog, tmp_path / "cache", tmp_path / "reports")
    there_before, read_once = catalog.scheme("default"), catalog.scheme("fp8_all_layers")
    kept = bench.exports.path(there_before)
    for scheme in (there_before, read_once):
        bench.drift.measure(scheme, keep_export=False)
    assert not bench.exports.is_built(read_once), bench.context.cache.events
    assert bench.exports.is_built(there_before) and kept.is_dir()
    later = Workbench(small_model_spec, data_config, catalog, tmp_path / "cache", tmp_path / "reports")
    assert later.drift.measure(read_once)["scheme"] == "fp8_all_layers"  # served from the cache: no export
    assert not later.exports.is_built(read_once)
