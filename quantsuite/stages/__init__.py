"""The suite's stages, one module each; data flows one way, and `quantsuite.pipeline.Workbench` only wires them.

    context (model, data, catalog, cache, reports/, device)
      -> scores   AutoQuant search state per scoring plan              cache scores/<key>
      -> scheme   decisions + manifest per scheme; quantized models    cache schemes/<key>, reports/manifests/
      -> export   HF checkpoint per scheme                             cache exports/<key>, reports/exports/
      -> drift    PyTorch drift of fake quant and reloaded export      cache drift/<key>,   reports/drift/
      -> vllm     vLLM verdicts (teacher-forced) and paired speed      cache vllm/<key>,    reports/vllm/
      -> research sensitivity, Pareto sweep, optimality gap            cache research/<key>, reports/research/

Each stage owns its inputs, its cache key (which hashes the code that produces the artifact) and its `reports/`
JSON (written through `RunContext.publish`, stamped with the run id). A stage calls only stages to its left.
"""
