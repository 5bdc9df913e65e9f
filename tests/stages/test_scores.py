"""Scores stage (quantsuite/stages/scores.py): one scoring pass per plan, reused across schemes and runs, and a
cached search state that cannot carry code."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from quantsuite.manifest import decisions
from quantsuite.pipeline import Workbench

pytestmark = pytest.mark.autoquant


@pytest.mark.uses_schemes("top25", "top50")
def test_second_scheme_and_second_run_reuse_scores(tmp_path, monkeypatch, small_model_spec, data_config, catalog):
    """One scoring pass serves every scheme sharing (model, data, formats, method); a new run reuses the cache.
    On the tiny model whatever the run's (a fresh cache: at the 3B shape a cold scoring pass of its own)."""
    import modelopt.torch.quantization as mtq

    calls = []
    original = mtq.auto_quantize
    monkeypatch.setattr(mtq, "auto_quantize", lambda *a, **k: calls.append(1) or original(*a, **k))
    first = Workbench(small_model_spec, data_config, catalog, tmp_path / "cache", tmp_path / "reports")
    top25, top50 = catalog.scheme("top25"), catalog.scheme("top50")
    assert not first.schemes.result(top25).reused
    assert not first.schemes.result(top50).reused
    assert len(calls) == 1 and first.scores.runs == 1
    second = Workbench(small_model_spec, data_config, catalog, tmp_path / "cache", tmp_path / "reports")
    again = second.schemes.result(top50)
    assert again.reused and second.scores.runs == 0 and len(calls) == 1
    assert again.manifest == first.schemes.result(top50).manifest
    assert any(event.startswith("reused scores/") for event in second.context.cache.events)


@pytest.mark.uses_schemes("top50")
def test_scoring_is_deterministic(tmp_path, model_spec, data_config, catalog):
    """Two independent scoring runs (fresh caches) give the same per-layer decisions. On a quarter of the scoring
    and calibration captions: determinism does not depend on the amount (and it halves the test's 95 s)."""
    scheme = catalog.scheme("top50")
    smaller = dataclasses.replace(data_config, scoring_samples=16, calibration_samples=16)
    runs = [Workbench(model_spec, smaller, catalog, tmp_path / f"cache{i}", tmp_path / "r") for i in range(2)]
    assert decisions(runs[0].schemes.result(scheme).manifest) == decisions(runs[1].schemes.result(scheme).manifest)


class _Trap:
    """Pickles to a call of os.system: what a hostile cache entry would hold."""

    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/quantsuite-trap-fired",))


@pytest.mark.uses_schemes("top50")
def test_booby_trapped_search_state_is_refused(workbench, catalog, tmp_path):
    """Before: the state was read back with torch.load(weights_only=False), so a planted pickle ran code."""
    import pickle

    from quantsuite.autoquant import UnsafeCacheEntry, load_search_state

    marker = Path("/tmp/quantsuite-trap-fired")
    marker.unlink(missing_ok=True)
    scheme = catalog.scheme("top50")
    key = workbench.scores.scores_key(workbench.scores.plan(scheme))
    workbench.scores.state(workbench.scores.plan(scheme))  # the real entry exists
    genuine = load_search_state(workbench.context.cache.path("scores", key) / "search_state.pt")
    assert "candidate_stats" in genuine  # the safe loader reads what the suite writes
    trapped = tmp_path / "search_state.pt"
    trapped.write_bytes(pickle.dumps({"best": _Trap()}))
    with pytest.raises(UnsafeCacheEntry, match="refused, not plain data"):
        load_search_state(trapped)
    assert not marker.exists()
