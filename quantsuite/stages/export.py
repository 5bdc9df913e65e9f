"""Export stage: each scheme's Hugging Face checkpoint (ModelOpt's unified export), verified against the manifest;
a corrupt cached export is deleted and rebuilt, never loaded.

    >>> path = Exports(context, schemes).path(context.catalog.scheme("top50"))  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

from quantsuite import checkpoint, formats
from quantsuite.cache import code_hash
from quantsuite.catalog import SchemeSpec
from quantsuite.checkpoint import ExportError, export_model, tensor_index, verify_export
from quantsuite.stages.context import RunContext
from quantsuite.stages.scheme import Schemes


class Exports:
    """Checkpoints under `exports/<key>` (key: the scheme's artifact + code), pointed to by
    reports/exports/<model>/<scheme>.json (directory, tensor bytes, file bytes)."""

    def __init__(self, context: RunContext, schemes: Schemes) -> None:
        self.context = context
        self.schemes = schemes
        self._paths: dict[str, Path] = {}
        self._tensor_bytes: dict[str, int] = {}

    def export_key(self, scheme: SchemeSpec) -> str:
        """Cache key of the scheme's export, known without building it: later stages key on it."""
        code = code_hash(checkpoint, formats, sys.modules[__name__])
        inputs = {"scheme": self.schemes.result(scheme).artifact_dir.name, "versions": self.context.versions}
        return self.context.cache.key(inputs | {"stage": "export", "code": code})

    def path(self, scheme: SchemeSpec) -> Path:
        """The scheme's checkpoint directory (built once)."""
        if scheme.name in self._paths:
            return self._paths[scheme.name]
        manifest, key = self.schemes.result(scheme).manifest, self.export_key(scheme)
        build = functools.partial(self._build, scheme)
        cache = self.context.cache
        path, reused = cache.get_or_build("exports", key, build, scheme.name)
        try:
            verify_export(path, manifest)
        except ExportError as error:
            if not reused:
                raise
            cache.events.append(f"rebuilt exports/{key} {scheme.name}: {error}")
            cache.remove("exports", key)
            path, _ = cache.get_or_build("exports", key, build, scheme.name)
            verify_export(path, manifest)
        size = sum(entry["bytes"] for entry in tensor_index(path).values())
        pointer = {"scheme": scheme.name, "export_dir": str(path), "tensor_bytes": size,
                   "files_bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file())}  # fmt: skip
        self.context.publish("exports", scheme.name, pointer)
        self._paths[scheme.name], self._tensor_bytes[key] = path, size
        return path

    def is_built(self, scheme: SchemeSpec) -> bool:
        """Whether the scheme's checkpoint is in the cache, complete (looked up, not built)."""
        return self.context.cache.is_complete("exports", self.export_key(scheme))

    def tensor_bytes(self, scheme: SchemeSpec) -> int:
        """Tensor bytes of the scheme's checkpoint (kept from its export, so a dropped export is not rebuilt)."""
        key = self.export_key(scheme)
        if key not in self._tensor_bytes:
            self.path(scheme)
        return self._tensor_bytes[key]

    def _build(self, scheme: SchemeSpec, directory: Path) -> None:
        started = time.perf_counter()
        manifest = self.schemes.result(scheme).manifest
        export_model(copy.deepcopy(self.schemes.model(scheme)), manifest, self.context.source_dir, directory)
        (directory / "timing.json").write_text(json.dumps({"export_s": time.perf_counter() - started}))

    def rebuild(self, scheme: SchemeSpec) -> Path:
        """Build the scheme's checkpoint afresh in its cache place (the cached one, if any, deleted first under its
        lock), verified, and return it: what the export benchmark times, so that the export it builds is the one
        the scheme's later tests load, not one more. The BF16 reference's cached export, which every worker reads
        (noise floor, speed baseline), is never deleted: it is built beside it and discarded."""
        if scheme.mode == "none" and self.is_built(scheme):
            with tempfile.TemporaryDirectory(prefix="quantsuite-export-") as directory:
                self._build(scheme, Path(directory))
                verify_export(Path(directory), self.schemes.result(scheme).manifest)
            return self.path(scheme)
        self._paths.pop(scheme.name, None)
        self.context.cache.remove("exports", self.export_key(scheme))
        return self.path(scheme)

    def drop(self, scheme: SchemeSpec) -> None:
        """Delete the scheme's export from the cache (measurements stay); a later path() rebuilds it."""
        if scheme.mode == "none":
            return  # the BF16 reference is loaded by every worker (vLLM noise floor, speed baseline): kept
        path = self._paths.pop(scheme.name, None)
        if path is not None and self.context.cache.remove(path.parent.name, path.name):
            self.context.cache.events.append(f"dropped {path.parent.name}/{path.name} {scheme.name}")
