"""What a run tells at its end: time per stage over all xdist workers, time per scheme (each scheme's tests), the
artifacts built or reused, and reports/<run-id>/report.md joined from the JSON this run left."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from quantsuite.plugin.collection import first_scheme_named
from quantsuite.plugin.session import WANT_REPORT, WORKBENCH, settings
from quantsuite.timing import SchemeTimes

WORKER_STAGE_TIMES = pytest.StashKey[list]()
SESSION_STARTED = pytest.StashKey[float]()


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[SESSION_STARTED] = time.perf_counter()
    if not hasattr(session.config, "workerinput"):  # the controller gets every worker's test reports too
        names_by_key = settings(session.config).catalog.names_by_key()
        session.config.pluginmanager.register(SchemeTimer(names_by_key), "quantsuite-scheme-times")


class SchemeTimer:
    """Each test's set-up, call and teardown seconds under the scheme its id belongs to (`first_scheme_named`): the
    "quantsuite time per scheme" table at the end, from this process's reports or, under xdist, its workers'."""

    def __init__(self, names_by_key: dict[str, str]) -> None:
        self.names_by_key = names_by_key
        self.times = SchemeTimes()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        scheme = first_scheme_named(report.nodeid, self.names_by_key)
        self.times.add(scheme, report.nodeid, report.duration)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """An xdist worker hands the controller (xdist's workeroutput) its time per stage, and whether it ran a stage's
    tests (the controller collects nothing, so it learns from its workers that a report is wanted)."""
    from quantsuite.timing import STAGE_TIMES

    config = session.config
    if hasattr(config, "workeroutput"):
        seconds = time.perf_counter() - config.stash[SESSION_STARTED]
        config.workeroutput["quantsuite_stage_times"] = {"stages": STAGE_TIMES.as_dict(), "seconds": seconds}
        config.workeroutput["quantsuite_want_report"] = config.stash.get(WANT_REPORT, False)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    output = getattr(node, "workeroutput", {})
    if output.get("quantsuite_stage_times"):
        node.config.stash.setdefault(WORKER_STAGE_TIMES, []).append(output["quantsuite_stage_times"])
    if output.get("quantsuite_want_report"):
        node.config.stash[WANT_REPORT] = True


def _stage_time_lines(config: pytest.Config) -> list[str]:
    """This run's time per stage, summed over this process and its xdist workers (quantsuite.timing)."""
    from quantsuite.timing import STAGE_TIMES, StageTimes

    workers = config.stash.get(WORKER_STAGE_TIMES, [])
    merged = StageTimes()
    merged.merge(STAGE_TIMES.as_dict())
    for table in workers:
        merged.merge(table["stages"])
    if not merged.seconds:
        return []
    own_seconds = time.perf_counter() - config.stash[SESSION_STARTED]
    process_seconds = sum(table["seconds"] for table in workers) if workers else own_seconds
    where = f"{len(workers)} xdist workers, {process_seconds:.0f} worker-seconds" if workers else "one process"
    memory = "; peak GiB: the highest CUDA allocation of one process while the stage ran, inner stages included"
    return [f"summed over {where}; each stage's own time (a stage inside another is not counted twice)"
            + (memory if any(merged.peak_bytes.values()) else ""), *merged.lines(process_seconds)]  # fmt: skip


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    stage_lines = _stage_time_lines(config)
    if stage_lines:
        terminalreporter.section("quantsuite time per stage")
        for line in stage_lines:
            terminalreporter.write_line(line)
    timer = config.pluginmanager.get_plugin("quantsuite-scheme-times")
    if timer is not None and any(scheme is not None for scheme in timer.times.schemes()):
        terminalreporter.section("quantsuite time per scheme")
        terminalreporter.write_line("each scheme's tests, set-up + call + teardown, in the order the schemes ran")
        for line in timer.times.lines():
            terminalreporter.write_line(line)
    bench = config.stash.get(WORKBENCH, None)
    if bench is None or not bench.context.cache.events:
        return
    terminalreporter.section("quantsuite artifacts")
    for event in bench.context.cache.events:
        terminalreporter.write_line(event)
    terminalreporter.write_line(f"AutoQuant scoring runs this session: {bench.scores.runs}")
    terminalreporter.write_line(f"manifests: {bench.context.reports_dir / 'manifests' / bench.context.model_tag}")


def pytest_unconfigure(config: pytest.Config) -> None:
    """After a run that exercised schemes: reports/<run-id>/report.md from the JSON the run left (controller
    process only; after pytest-benchmark has written --benchmark-json)."""
    if hasattr(config, "workerinput") or config.getoption("--no-report") or not config.stash.get(WANT_REPORT, False):
        return
    from quantsuite.report import build_report

    reports = Path(config.getoption("--reports-dir"))
    tag = settings(config).model_spec.tag
    if (reports / "manifests" / tag).is_dir():
        run_id = config.getoption("--run-id")
        try:
            out = build_report(reports, tag, run_id, results_of=run_id)
        except FileNotFoundError as error:  # the run made no manifest (it failed before): nothing to join
            print(f"\nquantsuite report not written: {error}")
            return
        print(f"\nquantsuite report: {out / 'report.md'}")
