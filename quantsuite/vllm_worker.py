"""Runs inside the vLLM environment (a subprocess of the suite); prints one JSON result line.

Not imported by the suite: `python vllm_worker.py verdict EXPORT_DIR` or
`python vllm_worker.py generate EXPORT_DIR PROMPTS_JSON MAX_TOKENS [--patch] [--throughput]`. Only the standard library,
torch, safetensors and vLLM are used, so it runs in vLLM's own environment.

- verdict: vLLM's own ModelOpt config class (chosen by vLLM's `override_quantization_method`, as the engine
  does), its `apply_vllm_mapper` with Qwen2.5-VL's `hf_to_vllm_mapper`, and `is_layer_excluded` per vLLM
  linear layer (q/k/v and gate/up fused as `packed_modules_mapping` says): FP8 or unquantized, per layer.
- generate: `LLM(model=EXPORT_DIR, quantization="modelopt" when the export is quantized, enforce_eager=True)`,
  greedy decoding with logprobs. `--patch` applies quantsuite's opt-in CPU FP8 compatibility layer first.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

MARKER = "QUANTSUITE_RESULT "


def emit(result: dict) -> None:
    print(MARKER + json.dumps(result), flush=True)


def error_record(error: BaseException) -> dict:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return {"type": type(error).__name__, "key_line": lines[0][:500] if lines else "", "traceback":
            traceback.format_exc()[-3000:]}  # fmt: skip


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
            "layers": [{"prefix": name, "shards": [name], "fp8": False, "disk": [d]} for name, d in linear.items()]
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
        result["error"] = error_record(error)
        return result
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
        entry = {"prefix": prefix, "shards": shards, "disk": [linear[s] for s in shards], "fp8": None, "error": None}
        try:
            entry["fp8"] = not quant_config.is_layer_excluded(prefix)
        except Exception as error:
            entry["error"] = error_record(error)
        result["layers"].append(entry)
    return result


def generate(export_dir: Path, prompts_file: Path, max_tokens: int, patch: bool, throughput: bool = False) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prompts = json.loads(prompts_file.read_text())
    result: dict = {"loaded": False, "patched": patch, "error": None, "outputs": [], "load_seconds": None}
    if patch:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import vllm_cpu_fp8_compat

        result["patches"] = vllm_cpu_fp8_compat.apply()
    import vllm
    from vllm import LLM, SamplingParams

    result["vllm_version"] = vllm.__version__
    quantized = "quantization_config" in json.loads((export_dir / "config.json").read_text())
    started = time.perf_counter()
    try:
        llm = LLM(
            model=str(export_dir), quantization="modelopt" if quantized else None, enforce_eager=True,
            dtype="bfloat16", max_model_len=512, limit_mm_per_prompt={"image": 0, "video": 0}, seed=0,
        )  # fmt: skip
    except Exception as error:
        result["error"] = error_record(error) | {"stage": "load"}
        return result
    result["loaded"] = True
    result["load_seconds"] = time.perf_counter() - started
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=1, ignore_eos=True)
    try:
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params)
    except Exception as error:
        result["error"] = error_record(error) | {"stage": "generate"}
        return result
    for output in outputs:
        completion = output.outputs[0]
        logprobs = [float(step[token].logprob) for step, token in zip(completion.logprobs or [], completion.token_ids,
                                                                       strict=False)]  # fmt: skip
        result["outputs"].append({"token_ids": list(completion.token_ids), "logprobs": logprobs})
    if throughput:  # batch of 16 x 32 new tokens: one warm-up round, then 3 timed rounds
        batch = [{"prompt_token_ids": prompts[i % len(prompts)]} for i in range(16)]
        timed = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
        llm.generate(batch, timed, use_tqdm=False)
        rounds = []
        for _ in range(3):
            started = time.perf_counter()
            llm.generate(batch, timed, use_tqdm=False)
            rounds.append(time.perf_counter() - started)
        median = sorted(rounds)[1]
        result["throughput"] = {
            "batch": 16,
            "new_tokens": 32,
            "rounds_s": rounds,
            "output_tokens_per_s": 16 * 32 / median,
        }
    return result


if __name__ == "__main__":
    command, directory = sys.argv[1], Path(sys.argv[2])
    try:
        if command == "verdict":
            emit(verdict(directory))
        else:
            flags = sys.argv[5:]
            emit(generate(directory, Path(sys.argv[3]), int(sys.argv[4]), "--patch" in flags, "--throughput" in flags))
    except Exception as error:
        emit({"error": error_record(error) | {"stage": "worker"}})
