"""Research stage (quantsuite/stages/research.py): published where the report reads it, one run's results."""

from __future__ import annotations

import json

from quantsuite.stages.research import SWEEP_TARGETS


def test_research_is_published_for_the_report_stamped_with_the_run(workbench):
    result = workbench.research.run()
    path = workbench.context.reports_dir / "research" / workbench.context.model_tag / "research.json"
    published = json.loads(path.read_text())
    assert published["run_id"] == workbench.context.run_id
    assert [point["target_effective_bits"] for point in published["sweep"]] == list(SWEEP_TARGETS)
    assert published["sweep"] == result["sweep"]
