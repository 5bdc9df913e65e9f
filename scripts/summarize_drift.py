"""Print one line per scheme from reports/{manifests,drift,exports}/<model>/ (what a run measured).

python scripts/summarize_drift.py qwen2.5-vl-3b-shape
"""

import json
import sys
from pathlib import Path

reports = Path(__file__).resolve().parents[1] / "reports"
model = sys.argv[1] if len(sys.argv) > 1 else "tiny"
for path in sorted((reports / "drift" / model).glob("*.json")):
    drift = json.loads(path.read_text())
    totals = json.loads((reports / "manifests" / model / path.name).read_text())["totals"]
    export = json.loads((reports / "exports" / model / path.name).read_text())
    a, b, ab = drift["fake_quant"], drift["export"], drift["fake_vs_export"]
    print(
        f"{drift['scheme']:28s} cov={totals['coverage_by_weights']:.3f} eb={totals['lm_effective_bits']:.2f} "
        f"model_eb={totals['model_effective_bits']:.2f} kl={a['kl_mean']:.3e} p99={a['kl_p99']:.3e} "
        f"top1={a['top1_agreement']:.4f} dppl={a['perplexity_delta']:+.4f} | export kl={b['kl_mean']:.3e} "
        f"top1={b['top1_agreement']:.4f} | a~b kl={ab['kl_mean']:.3e} top1={ab['top1_agreement']:.4f} | "
        f"codes={drift['export_fidelity']['differing_code_share']:.4f} | {export['tensor_bytes'] / 1e9:.3f} GB"
    )
