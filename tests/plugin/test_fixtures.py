"""The suite's autouse fixtures in a real pytest subprocess: an interrupted run (Ctrl-C, or the SIGINT of
`timeout -s INT`, which GPU runs under a time limit use) ends with pytest's summary, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys


def test_an_interrupted_run_ends_with_its_summary(tmp_path):
    """Before the fix, `_benchmark_published`'s teardown read `request.node.funcargs`, which pytest sets to None on
    an interrupt: an AttributeError traceback replaced the summary (durations, stage table, report)."""
    (tmp_path / "test_interrupted.py").write_text("def test_interrupted():\n    raise KeyboardInterrupt\n")
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "QUANTSUITE_"))}
    completed = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-p",
                                "quantsuite.plugin.fixtures", "test_interrupted.py"], cwd=tmp_path, text=True,
                               capture_output=True, timeout=120, env=environment)  # fmt: skip
    output = completed.stdout + completed.stderr
    assert "KeyboardInterrupt" in output and "no tests ran" in output, output[-3000:]
    assert "Traceback" not in output and "Error" not in output.replace("KeyboardInterrupt", ""), output[-3000:]
