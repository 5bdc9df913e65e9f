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
