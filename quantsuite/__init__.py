"""quantsuite: ModelOpt AutoQuant schemes for Qwen2.5-VL's language model, exported, measured and checked in vLLM."""

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # schemes.yaml, reports/, .quantsuite-cache/, .venv-vllm/
REPORTS_DIR = PROJECT_ROOT / "reports"

# The environment as the user gave it, before any import here lets a library fill in its own defaults (importing
# ModelOpt sets TORCHINDUCTOR_CACHE_DIR to torch's /tmp default); `cache.keep_toolchain_caches` reads it.
USER_ENVIRONMENT = dict(os.environ)
