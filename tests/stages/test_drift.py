"""Drift stage (quantsuite/stages/drift.py): measurements cached per export key; a cached one needs no export."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.drift


@pytest.fixture(scope="session")
def measurement(workbench, scheme, fake_quant_model, exported):
    return workbench.drift.measure(scheme)


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
