"""The suite's fixtures in a real pytest subprocess: an interrupted run (Ctrl-C, or the SIGINT of `timeout -s INT`,
which GPU runs under a time limit use) ends with pytest's summary, not a traceback; a fixture's model does not
outlive its test."""

from __future__ import annotations


def test_an_interrupted_run_ends_with_its_summary(tmp_path):
    """Before the fix, `_benchmark_published`'s teardown read `request.node.funcargs`, which pytest sets to None on
    an interrupt: an AttributeError traceback replaced the summary (durations, stage table, report)."""
    from tests.plugin.test_options import _pytest, suite_plugins

    (tmp_path / "test_interrupted.py").write_text("def test_interrupted():\n    raise KeyboardInterrupt\n")
    completed = _pytest("-p", "no:cacheprovider", *suite_plugins("fixtures"), "test_interrupted.py",
                        cwd=tmp_path)  # fmt: skip
    output = completed.stdout + completed.stderr
    assert "KeyboardInterrupt" in output and "no tests ran" in output, output[-3000:]
    assert "Traceback" not in output and "Error" not in output.replace("KeyboardInterrupt", ""), output[-3000:]


HELD_AFTER_ITS_TEST = """
import gc
import weakref

from quantsuite.stages import scheme as schemes_stage

schemes_stage.SMALL_MODELS_BYTES = 0  # as for a 7B model: the release drops every model the stage keeps
held = []


def test_uses_the_model(fake_quant_model):
    held.append(weakref.ref(fake_quant_model))


def test_a_later_test_releases_the_device(workbench):
    workbench.context.release()
    gc.collect()
    assert held and held[0]() is None, "the fake-quant model outlived its test and the release"
"""


def test_the_fake_quant_model_is_freed_by_a_release_after_its_test(pytestconfig, tmp_path):
    """A session-scoped `fake_quant_model` kept the scheme's model through the scheme's later tests, where
    `RunContext.release` (before a vLLM engine or a PyTorch reference takes the device) could not free it: on an
    80 GiB H100 at 7B (run gpu-43) a verdict's reference reload ran out of memory with it on the card."""
    from tests.plugin.test_options import _pytest, suite_plugins

    (tmp_path / "test_held.py").write_text(HELD_AFTER_ITS_TEST)
    plugins = suite_plugins("options", "session", "collection", "fixtures")
    completed = _pytest("-p", "no:cacheprovider", *plugins, "--scheme=default",
                        f"--cache-dir={pytestconfig.getoption('--cache-dir')}", f"--reports-dir={tmp_path / 'reports'}",
                        "test_held.py", cwd=tmp_path)  # fmt: skip
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-3000:]
    assert "2 passed" in completed.stdout, completed.stdout[-3000:]
