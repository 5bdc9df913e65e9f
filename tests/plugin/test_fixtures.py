"""The suite's autouse fixtures in a real pytest subprocess: an interrupted run (Ctrl-C, or the SIGINT of
`timeout -s INT`, which GPU runs under a time limit use) ends with pytest's summary, not a traceback."""

from __future__ import annotations


def test_an_interrupted_run_ends_with_its_summary(tmp_path):
    """Before the fix, `_benchmark_published`'s teardown read `request.node.funcargs`, which pytest sets to None on
    an interrupt: an AttributeError traceback replaced the summary (durations, stage table, report)."""
    from tests.plugin.test_options import _pytest

    (tmp_path / "test_interrupted.py").write_text("def test_interrupted():\n    raise KeyboardInterrupt\n")
    completed = _pytest("-p", "no:cacheprovider", "-p", "quantsuite.plugin.fixtures", "test_interrupted.py",
                        cwd=tmp_path)  # fmt: skip
    output = completed.stdout + completed.stderr
    assert "KeyboardInterrupt" in output and "no tests ran" in output, output[-3000:]
    assert "Traceback" not in output and "Error" not in output.replace("KeyboardInterrupt", ""), output[-3000:]
